"""Mixture of LoRA experts: batched per-request mixing, PEFT export/import, routing scope."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration

from smartpath.model.experts import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    ExpertRouting,
    MixtureLoRALinear,
    apply_routing,
    attach_experts,
    expert_modules,
    expert_parameters,
    export_expert,
    import_expert,
)
from tests.model.tiny import VOCAB, randomise_experts, tiny_qwen

TARGETS = ("q_proj", "v_proj", "down_proj")


def set_strategy(model: nn.Module, strategy: str) -> None:
    for m in expert_modules(model).values():
        m.strategy = strategy


@pytest.fixture(scope="module")
def base() -> Qwen2_5_VLForConditionalGeneration:
    return tiny_qwen()


@pytest.fixture
def moe(base) -> Qwen2_5_VLForConditionalGeneration:
    model = copy.deepcopy(base)
    attach_experts(model, TARGETS, num_experts=4, rank=4, alpha=8)
    randomise_experts(model)
    return model


def test_attach_wraps_only_language_model_targets(base) -> None:
    model = copy.deepcopy(base)
    names = attach_experts(model, ["q_proj", "v_proj", "down_proj"], 3, rank=4, alpha=8)
    assert len(names) == 2 * 3  # 2 layers x 3 targets; the vision tower's down_proj untouched
    assert all(n.startswith("model.language_model.layers.") for n in names)
    assert isinstance(model.model.visual.blocks[0].mlp.down_proj, nn.Linear)
    q = model.get_submodule("model.language_model.layers.0.self_attn.q_proj")
    assert isinstance(q, MixtureLoRALinear)
    assert q.lora_A.shape == (3, 4, 32) and q.lora_B.shape == (3, 32, 4)
    assert q.scaling == 2.0 and not q.weight.requires_grad and not q.bias.requires_grad
    assert torch.count_nonzero(q.lora_B) == 0 and torch.count_nonzero(q.lora_A) > 0
    # Base parameter names are unchanged, so a base checkpoint loads into the expert model.
    keys = set(model.state_dict())
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in keys
    assert "model.language_model.layers.0.self_attn.q_proj.lora_A" in keys
    assert len(expert_parameters(model)) == 2 * len(names)
    with pytest.raises(ValueError, match="already attached"):
        attach_experts(model, ["q_proj"], 3, rank=4, alpha=8)
    # Attaching to the bare language model names layers relative to it.
    text_model = copy.deepcopy(base).model.language_model
    assert attach_experts(text_model, ["v_proj"], 2, rank=2, alpha=2) == [
        "layers.0.self_attn.v_proj",
        "layers.1.self_attn.v_proj",
    ]
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        attach_experts(copy.deepcopy(base), ["nonexistent_proj"], 3, rank=4, alpha=8)


def test_fresh_experts_and_missing_routing_are_the_base_model(base, moe) -> None:
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        fresh = copy.deepcopy(base)
        attach_experts(fresh, TARGETS, 4, rank=4, alpha=8)  # B = 0: every expert is a no-op
        with apply_routing(fresh, ExpertRouting(torch.tensor([[0, 3], [1, 2]]), torch.ones(2, 2))):
            assert torch.equal(fresh(input_ids=ids).logits, ref)
        assert torch.allclose(moe(input_ids=ids).logits, ref, atol=1e-6)  # no routing
        with apply_routing(moe, ExpertRouting(torch.tensor([[0], [1]]), torch.ones(2, 1))):
            routed = moe(input_ids=ids).logits
    assert (routed - ref).abs().max() > 1e-2  # the randomised experts do change the output


@pytest.mark.parametrize("strategy", ["dense", "gather"])
def test_module_matches_merged_weights(strategy: str) -> None:
    """Independent reference: y_b = x_b (W + s·Σ_j w_bj B_e A_e)ᵀ + bias, per request."""
    torch.manual_seed(0)
    m = MixtureLoRALinear(nn.Linear(12, 10), num_experts=5, rank=3, alpha=6, strategy=strategy)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(3, 4, 12)
    idx = torch.tensor([[4, 0], [2, 2], [1, 3]])  # a repeated expert adds up
    w = torch.tensor([[0.6, 0.4], [0.5, 0.25], [0.0, 1.0]])
    m.routing = ExpertRouting(idx, w)
    out = m(x)
    for b in range(3):
        weight = m.weight.clone()
        for j in range(2):
            e = int(idx[b, j])
            weight += w[b, j] * 2.0 * m.lora_B[e] @ m.lora_A[e]
        assert torch.allclose(out[b], F.linear(x[b], weight, m.bias), atol=1e-5)


@pytest.mark.parametrize("strategy", ["dense", "gather"])
def test_batched_mixed_experts_equal_each_request_alone(moe, strategy: str) -> None:
    set_strategy(moe, strategy)
    lengths = [5, 9, 3, 7]
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (4, 9), generator=gen)
    mask = torch.zeros(4, 9, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1  # right padding
    ids = ids.masked_fill(mask == 0, 0)
    routing = ExpertRouting(
        torch.tensor([[0, 1], [2, 3], [3, 0], [1, 1]]),
        torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.0, 0.0], [0.4, 0.6]]),  # row 2: base only
    )
    with torch.no_grad(), apply_routing(moe, routing):
        batched = moe(input_ids=ids, attention_mask=mask).logits
    singles = []
    for b, n in enumerate(lengths):
        with torch.no_grad(), apply_routing(moe, routing.select([b])):
            single = moe(input_ids=ids[b : b + 1, :n]).logits[0]
        singles.append(single)
        assert (batched[b, :n] - single).abs().max() <= 1e-5
    # The requests really used different experts (not all equal to one shared adapter).
    with torch.no_grad(), apply_routing(moe, ExpertRouting.single([2, 3], [0.5, 0.5])):
        other = moe(input_ids=ids[:1, :5]).logits[0]
    assert (other - singles[0]).abs().max() > 1e-2
    with torch.no_grad():
        base_only = moe(input_ids=ids[2:3, :3]).logits[0]
    assert (base_only - singles[2]).abs().max() <= 1e-5


def test_dense_and_gather_give_same_gradients(moe) -> None:
    ids = torch.randint(0, VOCAB, (3, 5))
    routing = ExpertRouting(torch.tensor([[0, 2], [2, 1], [1, 0]]), torch.rand(3, 2))
    grads = {}
    for strategy in ("dense", "gather"):
        set_strategy(moe, strategy)
        moe.zero_grad()
        with apply_routing(moe, routing):
            moe(input_ids=ids).logits.square().mean().backward()
        grads[strategy] = [p.grad.clone() for p in expert_parameters(moe)]
    for d, g in zip(grads["dense"], grads["gather"], strict=True):
        assert torch.allclose(d, g, atol=1e-6, rtol=1e-4)
    # Expert 3 is never selected: it gets exactly zero gradient in both kernels.
    for g in grads["dense"]:
        assert torch.count_nonzero(g[3]) == 0 and torch.count_nonzero(g[:3]) > 0


def test_apply_routing_scopes_validates_and_restores(moe) -> None:
    modules = list(expert_modules(moe).values())
    outer = ExpertRouting.single([1], [1.0])
    inner = ExpertRouting.single([2, 3], [0.5, 0.5])
    with apply_routing(moe, outer):
        assert all(m.routing is not None and m.routing.top_k == 1 for m in modules)
        with apply_routing(moe, inner):
            assert all(m.routing.top_k == 2 for m in modules)
        assert all(m.routing.top_k == 1 for m in modules)
        with pytest.raises(ValueError, match="routing is for 1 requests"):
            moe(input_ids=torch.zeros(2, 3, dtype=torch.long))
    assert all(m.routing is None for m in modules)
    with (
        pytest.raises(ValueError, match="out of range"),
        apply_routing(moe, ExpertRouting.single([4], [1.0])),
    ):
        pass
    with pytest.raises(ValueError, match="no experts"), apply_routing(nn.Linear(2, 2), outer):
        pass


def test_routing_cat_pads_and_selects() -> None:
    r = ExpertRouting.cat(
        [ExpertRouting.single([3], [1.0]), None, ExpertRouting.single([0, 2], [0.25, 0.75])]
    )
    assert r.indices.tolist() == [[3, 0], [0, 0], [0, 2]]
    assert r.weights.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.25, 0.75]]
    assert r.select([2]).indices.tolist() == [[0, 2]]
    with pytest.raises(ValueError):
        ExpertRouting(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3))


def test_exported_expert_loads_in_peft_with_identical_logits(base, moe, tmp_path: Path) -> None:
    from peft import PeftModel

    e = 2
    out = export_expert(moe, e, tmp_path / "expert2", base_model_name_or_path="tiny-qwen")
    cfg = json.loads((out / ADAPTER_CONFIG_NAME).read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == "tiny-qwen"
    # down_proj also exists in the vision tower, so the exact module paths are exported.
    assert sorted(cfg["target_modules"]) == sorted(expert_modules(moe))
    keys = set(load_file(str(out / ADAPTER_WEIGHTS_NAME)))
    assert "base_model.model.model.language_model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * len(expert_modules(moe))

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
        with apply_routing(moe, ExpertRouting(torch.full((2, 1), e), torch.ones(2, 1))):
            ours = moe(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert (theirs - ours).abs().max() <= 1e-5
    assert (theirs - plain).abs().max() > 1e-2  # the adapter is not a no-op


def test_export_uses_short_target_names_when_unambiguous(base, tmp_path: Path) -> None:
    model = copy.deepcopy(base)
    attach_experts(model, ["q_proj", "v_proj"], 2, rank=2, alpha=4)
    cfg = json.loads((export_expert(model, 0, tmp_path) / ADAPTER_CONFIG_NAME).read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


def _logits(model: nn.Module, ids: torch.Tensor, routing: ExpertRouting | None) -> torch.Tensor:
    with torch.no_grad(), apply_routing(model, routing):
        return model(input_ids=ids).logits


def test_import_round_trip_into_another_slot(base, moe, tmp_path: Path) -> None:
    export_expert(moe, 2, tmp_path / "e2")
    other = copy.deepcopy(base)
    attach_experts(other, TARGETS, 4, rank=4, alpha=8)
    randomise_experts(other, seed=9)
    loaded = import_expert(other, 0, tmp_path / "e2")
    assert loaded == sorted(expert_modules(other))
    for name, m in expert_modules(other).items():
        src = expert_modules(moe)[name]
        assert torch.equal(m.lora_A[0], src.lora_A[2]) and torch.equal(m.lora_B[0], src.lora_B[2])
    ids = torch.randint(0, VOCAB, (1, 6))
    want = _logits(moe, ids, ExpertRouting.single([2], [1.0]))
    assert (_logits(other, ids, ExpertRouting.single([0], [1.0])) - want).abs().max() <= 1e-5
    # Slot 1 kept its own (different) expert.
    assert (_logits(other, ids, ExpertRouting.single([1], [1.0])) - want).abs().max() > 1e-2


def test_import_adapts_alpha_old_key_layout_and_partial_targets(base, moe, tmp_path: Path) -> None:
    src = export_expert(moe, 1, tmp_path / "src")
    # Rewrite as an adapter with alpha 16 (B halved), keys in the old Qwen layout
    # (model.layers.N…), and only the q_proj layers.
    cfg = json.loads((src / ADAPTER_CONFIG_NAME).read_text())
    cfg["lora_alpha"] = 16
    state = load_file(str(src / ADAPTER_WEIGHTS_NAME))
    rewritten = {
        k.replace("model.language_model.", "model."): (v / 2 if ".lora_B." in k else v)
        for k, v in state.items()
        if "q_proj" in k
    }
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg))
    save_file(rewritten, str(dst / ADAPTER_WEIGHTS_NAME))
    other = copy.deepcopy(base)
    attach_experts(other, TARGETS, 4, rank=4, alpha=8)
    randomise_experts(other, seed=5)
    loaded = import_expert(other, 3, dst)
    assert loaded == sorted(n for n in expert_modules(other) if n.endswith("q_proj"))
    # Reference: moe's expert 1 restricted to q_proj (B of the other layers zeroed).
    ref = copy.deepcopy(moe)
    with torch.no_grad():
        for name, m in expert_modules(ref).items():
            if not name.endswith("q_proj"):
                m.lora_B[1].zero_()
    ids = torch.randint(0, VOCAB, (1, 6))
    got = _logits(other, ids, ExpertRouting.single([3], [1.0]))
    assert (got - _logits(ref, ids, ExpertRouting.single([1], [1.0]))).abs().max() <= 1e-5


def test_import_native_peft_adapter_of_smaller_rank(base, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"], use_rslora=True),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    peft_model.save_pretrained(str(tmp_path))
    model = copy.deepcopy(base)
    attach_experts(model, ["q_proj", "v_proj"], 2, rank=4, alpha=8)
    import_expert(model, 1, tmp_path)
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        theirs = peft_model.eval()(input_ids=ids).logits
    ours = _logits(model, ids, ExpertRouting(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1)))
    assert (theirs - ours).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="exceeds"):
        small = copy.deepcopy(base)
        attach_experts(small, ["q_proj", "v_proj"], 2, rank=1, alpha=1)
        import_expert(small, 0, tmp_path)
