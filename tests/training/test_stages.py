"""Stages and rewards chosen by name: the registry, and what is refused before any worker starts;
what makes a 7B run fit on GPUs: the run's dtype and DeepSpeed's precision, gradient
checkpointing with the experts' routing, and GRPO's reference made of the trainable parameters
only (no Ray needed; DeepSpeed runs in a subprocess)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from smartpath.core.config import load_config
from smartpath.core.config.model import ModelConfig
from smartpath.core.config.training import DistributedConfig, GrpoConfig, OptimConfig
from smartpath.model.base import base_from_config
from smartpath.model.experts import expert_modules
from smartpath.model.grammar import Task
from smartpath.model.mllm import SlideInput, SmartPathModel
from smartpath.training.collate import Collator
from smartpath.training.data import load_items
from smartpath.training.engine import (
    deepspeed_config,
    enable_gradient_checkpointing,
    get_stage,
    run_stage,
    stages,
    train_worker,
    trainable_parameters,
)
from smartpath.training.grpo import GrpoStage, ReferencePolicy
from smartpath.training.manifest import WsiSample
from smartpath.training.objectives import sft_loss
from smartpath.training.rollout import completion_logprobs
from smartpath.training.sft import SftStage
from smartpath.training.synthetic.dataset import generate_roi_dataset
from tests.conftest import run_deepspeed_script
from tests.model.tiny import randomise_experts


def test_registry_holds_the_built_in_stages() -> None:
    known = stages()
    assert known["sft"] is SftStage and known["grpo"] is GrpoStage
    assert get_stage("sft") is SftStage and get_stage("grpo") is GrpoStage


def test_unknown_stage_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown training stage 'dpo'; known stages: grpo, sft"):
        get_stage("dpo")
    with pytest.raises(ValueError, match=r"known stages: grpo, sft"):
        run_stage(load_config(), "dpo")


def test_the_worker_entry_pickles_by_reference() -> None:
    # Ray ships the per-worker function to the workers; the stage travels by name.
    assert pickle.loads(pickle.dumps(train_worker)) is train_worker


def test_grpo_refuses_an_unknown_reward_before_starting() -> None:
    config = load_config(training={"grpo": {"rewards": ["task", "exact"]}})
    with pytest.raises(
        ValueError,
        match=r"unknown reward\(s\) 'exact'; known rewards: "
        r"classification, detection, detection_giou, format, segmentation, task, vqa",
    ):
        run_stage(config, "grpo")


def test_reward_weights_from_the_config() -> None:
    assert GrpoConfig().reward_weights() == {"task": 1.0, "format": 0.1}
    assert GrpoConfig(format_weight=0.5).reward_weights() == {"task": 1.0, "format": 0.5}
    assert GrpoConfig(rewards=["task"], format_weight=0.5).reward_weights() == {"task": 1.0}
    with pytest.raises(ValidationError):
        GrpoConfig(rewards=[])
    with pytest.raises(ValidationError, match="twice"):
        GrpoConfig(rewards=["task", "task"])


# ---------------------------------------------------------------------------------------------
# Precision, gradient checkpointing and the GRPO reference

CFG = ModelConfig(
    preset="tiny",
    image_positions=True,
    aggregator={"feature_dim": 32, "num_tokens": 4},
    router={"hidden_size": 16},
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """(tokenizer, collator, a batch with two ROI images and a slide, its labels)."""
    _, tokenizer = base_from_config(CFG)
    roi = generate_roi_dataset(
        tmp_path_factory.mktemp("roi"), 2, seed=0, tasks=(Task.CLASSIFICATION,)
    )
    items = load_items([str(roi)], "train")[:2]
    sample = items[0][0]
    wsi = WsiSample(
        id="slide",
        features="unused.npz",
        task="classification",
        target=sample.target,
        labels=sample.labels,
    )
    gen = torch.Generator().manual_seed(0)
    slide = SlideInput(torch.randn(20, 32, generator=gen), torch.rand(20, 2, generator=gen) * 1e4)
    collator = Collator(CFG, tokenizer, CFG.aggregator.num_tokens)
    batch, labels = collator([*items, (wsi, slide)])
    assert batch.pixel_values is not None and batch.slides is not None
    return tokenizer, collator, batch, labels


def fresh_model(tokenizer) -> SmartPathModel:
    """The tiny model (same weights every call), experts with non-zero B, parts trainable."""
    base, _ = base_from_config(CFG, tokenizer)
    model = SmartPathModel(CFG, base, tokenizer)
    randomise_experts(model, seed=1, std=0.2)
    trainable_parameters(model, train_base=False)
    return model.train()


def loss_and_grads(model: SmartPathModel, batch, labels) -> tuple[dict, int]:
    """Gradients of SFT's loss for every trainable parameter, and the bytes the forward saved
    for the backward (parameters excluded)."""
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch)
        loss = sft_loss(out.logits, labels) + model.router.aux_loss(out.router)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, sum(v for k, v in storages.items() if k not in params)


def test_gradient_checkpointing_keeps_the_expert_gradients(tiny) -> None:
    tokenizer, _, batch, labels = tiny
    model = fresh_model(tokenizer)
    plain, saved_plain = loss_and_grads(model, batch, labels)
    enable_gradient_checkpointing(model)
    checkpointed = [
        type(m).__name__ for m in model.base.modules() if getattr(m, "gradient_checkpointing", 0)
    ]
    assert "Qwen2_5_VLDecoderLayer" in checkpointed and "Qwen2_5_VLVisionBlock" in checkpointed
    ckpt, saved_ckpt = loss_and_grads(model, batch, labels)
    assert saved_ckpt < saved_plain / 2  # the decoder blocks' activations were not kept
    assert set(ckpt) == set(plain) and all(g is not None for g in ckpt.values())
    lora = [n for n in plain if ".lora_" in n]
    assert lora and all(plain[n].abs().max() > 0 for n in lora)
    # The base is frozen; the experts (recomputed with their routing), the router (through
    # the gate weights), the aggregator and the image positions get the same gradients.
    frozen = [p for n, p in model.named_parameters() if n.startswith("base.") and ".lora_" not in n]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert {n.split(".")[0] for n in plain} == {"base", "aggregator", "router", "image_position"}
    for name in plain:
        assert torch.allclose(ckpt[name], plain[name], rtol=1e-5, atol=1e-7), name
    assert all(m.routing is None for m in expert_modules(model).values())  # restored


def test_reference_is_the_starting_model_as_trainable_tensors_only(tiny, tmp_path: Path) -> None:
    tokenizer, _, batch, labels = tiny
    model = fresh_model(tokenizer)
    model.save(tmp_path / "start")
    reference = ReferencePolicy(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert reference.numel == trainable and trainable < total / 3
    assert set(reference.tensors) == {n for n, p in model.named_parameters() if p.requires_grad}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        out = model(batch)
        (sft_loss(out.logits, labels) + model.router.aux_loss(out.router)).backward()
        optimizer.step()

    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    params = dict(model.named_parameters())
    ref, mask, _ = completion_logprobs(reference, batch, labels)
    assert model.training and not any(t.requires_grad for t in reference.tensors.values())
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)  # the policy is untouched
    assert all(params[n] is p for n, p in model.named_parameters())
    assert not ref.requires_grad

    frozen_copy = SmartPathModel.load(tmp_path / "start")
    with torch.no_grad():
        expected, _, _ = completion_logprobs(frozen_copy, batch, labels)
        policy, _, _ = completion_logprobs(model.eval(), batch, labels)
    assert torch.allclose(ref[mask], expected[mask], atol=1e-5)
    assert not torch.allclose(policy[mask], expected[mask], atol=1e-3)  # the policy moved


def test_deepspeed_config_follows_the_run_dtype() -> None:
    dist, optim = DistributedConfig(), OptimConfig()
    assert deepspeed_config(dist, 2, optim, torch.bfloat16)["bf16"] == {"enabled": True}
    assert deepspeed_config(dist, 2, optim, torch.float16)["fp16"] == {"enabled": True}
    plain = deepspeed_config(dist, 2, optim, torch.float32)
    assert "bf16" not in plain and "fp16" not in plain
    assert plain["zero_optimization"]["stage"] == 2
    assert DistributedConfig().gradient_checkpointing is False
    config = load_config(training={"distributed": {"gradient_checkpointing": True}})
    assert config.training.distributed.gradient_checkpointing is True


DEEPSPEED_SCRIPT = """
import json, torch, torch.distributed as dist
from smartpath.core.config.model import ModelConfig
from smartpath.core.config.training import DistributedConfig, OptimConfig
from smartpath.model.base import base_from_config
from smartpath.model.experts import expert_modules
from smartpath.model.mllm import MultimodalBatch, SmartPathModel
from smartpath.training.engine import (
    DeepSpeedRun, enable_gradient_checkpointing, trainable_parameters,
)

dist.init_process_group("gloo", rank=0, world_size=1)
cfg = ModelConfig(preset="tiny", dtype="bfloat16", aggregator={"feature_dim": 32})
base, tokenizer = base_from_config(cfg, dtype=torch.float32)
model = SmartPathModel(cfg, base, tokenizer)
params = trainable_parameters(model, train_base=False)
enable_gradient_checkpointing(model)
run = DeepSpeedRun(model, params, OptimConfig(lr=1e-2, warmup_steps=0), DistributedConfig(),
                   batch_size=2, total_steps=2, device=torch.device("cpu"))
frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
ids = torch.randint(10, 200, (2, 16), generator=torch.Generator().manual_seed(0))
batch = MultimodalBatch(input_ids=ids, attention_mask=torch.ones_like(ids),
                        task_ids=torch.tensor([0, 1]), scale_ids=torch.tensor([0, 0]))
for _ in range(2):
    run.engine.train()
    out = run.engine(batch)
    run.backward(out.logits.float().log_softmax(-1)[..., 5].mean().neg())
    run.engine.step()
managed = [p for group in run.optimizer.bit16_groups for p in group]
named = list(model.named_parameters())
print(json.dumps({
    "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
    "managed": sorted(n for n, p in model.named_parameters() if any(p is q for q in managed)),
    "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
    "master": sorted({str(t.dtype) for t in run.optimizer.single_partition_of_fp32_groups}),
    "master_numel": sum(t.numel() for t in run.optimizer.single_partition_of_fp32_groups),
    "trainable_numel": sum(p.numel() for p in params),
    "frozen_same": all(torch.equal(p, frozen[n]) for n, p in named if n in frozen),
    "moved": sum(not torch.equal(p, trained[n]) for n, p in named if n in trained),
    "run_dtype": str(run.dtype),
}))
"""


def test_deepspeed_bf16_run_trains_only_the_trainable_parameters(tmp_path: Path) -> None:
    result = run_deepspeed_script(DEEPSPEED_SCRIPT, cwd=tmp_path)
    # The frozen base was cast to bf16 with the trainable parts; ZeRO manages exactly the
    # trainable parameters, with an fp32 master copy; a step moves them and nothing else.
    assert result["dtypes"] == ["torch.bfloat16"] and result["run_dtype"] == "torch.bfloat16"
    assert result["managed"] == result["trainable"] and result["trainable"]
    assert all(".lora_" in n or n.startswith(("aggregator.", "router.")) for n in result["managed"])
    assert result["master"] == ["torch.float32"]
    assert result["master_numel"] >= result["trainable_numel"]
    assert result["frozen_same"] and result["moved"] > 0


RESUME_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from smartpath.core.config.model import ModelConfig
from smartpath.core.config.training import DistributedConfig, OptimConfig
from smartpath.model.base import base_from_config
from smartpath.model.mllm import MultimodalBatch, SmartPathModel
from smartpath.training.checkpoint_trust import CheckpointIntegrityError
from smartpath.training.engine import DeepSpeedRun, trainable_parameters

dist.init_process_group("gloo", rank=0, world_size=1)
cfg = ModelConfig(preset="tiny", aggregator={"feature_dim": 32})
base, tokenizer = base_from_config(cfg, dtype=torch.float32)
model = SmartPathModel(cfg, base, tokenizer)
params = trainable_parameters(model, train_base=False)
run = DeepSpeedRun(model, params, OptimConfig(lr=1e-2, warmup_steps=1), DistributedConfig(),
                   batch_size=2, total_steps=8, device=torch.device("cpu"))
ids = torch.randint(10, 200, (2, 16), generator=torch.Generator().manual_seed(0))
batch = MultimodalBatch(input_ids=ids, attention_mask=torch.ones_like(ids),
                        task_ids=torch.tensor([0, 1]), scale_ids=torch.tensor([0, 0]))

def step():
    run.engine.train()
    run.backward(run.engine(batch).logits.float().log_softmax(-1)[..., 5].mean().neg())
    run.engine.step()

def snapshot():
    moments = [t.clone() for s in run.optimizer.optimizer.state.values() for t in s.values()
               if torch.is_tensor(t)]
    return [p.detach().clone() for p in params], moments

for _ in range(2):
    step()
saved, digest = snapshot(), run.state_digest()
run.save(sys.argv[1], step=2, history=[])
step()
moved = run.state_digest() != digest
first, _ = run.load(sys.argv[1])
restored = snapshot()
same = all(torch.equal(a, b) for a, b in zip(saved[0] + saved[1], restored[0] + restored[1]))
# A resume that brings back the weights but not the optimizer's moments is refused.
step()
real = run.engine.load_checkpoint  # patched on this instance only
run.engine.load_checkpoint = lambda *a, **k: real(*a, **k, load_optimizer_states=False)
try:
    run.load(sys.argv[1])
    refused = False
except CheckpointIntegrityError:
    refused = True
print(json.dumps({"first": first, "moved": moved, "same": same, "refused": refused,
                  "n_moments": len(saved[1])}))
"""


def test_a_resume_restores_parameters_and_optimizer_state_tensor_for_tensor(
    tmp_path: Path,
) -> None:
    result = run_deepspeed_script(RESUME_SCRIPT, str(tmp_path / "ckpt"), cwd=tmp_path)
    assert result["first"] == 2 and result["moved"]  # a step after the save changed the state
    assert result["n_moments"] > 0
    assert result["same"]  # every parameter and Adam moment equals the saved one
    assert result["refused"]  # weights alone (stale moments) fail the state digest
