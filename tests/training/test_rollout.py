"""GRPO rollouts: batched mixed-expert generation against the sequential reference, rewards,
advantages, and the policy batch's log-probs against the generation."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from smartpath.core.config.model import ModelConfig
from smartpath.core.config.training import GrpoConfig
from smartpath.model.base import base_from_config
from smartpath.model.grammar import Task, format_completion, parse_answer
from smartpath.model.logprobs import sequence_logprobs
from smartpath.model.mllm import IGNORE_INDEX, SmartPathModel
from smartpath.model.vision import make_image_processor
from smartpath.training.collate import Collator
from smartpath.training.data import load_items
from smartpath.training.engine import trainable_parameters
from smartpath.training.grpo import ReferencePolicy, grpo_update
from smartpath.training.manifest import sample_task
from smartpath.training.objectives import group_advantages
from smartpath.training.rewards import format_reward, task_reward
from smartpath.training.rollout import completion_logprobs, policy_batch, rollout, score
from smartpath.training.synthetic.dataset import generate_roi_dataset
from tests.model.tiny import randomise_experts


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", experts={"num_experts": 4, "top_k": 1})
    base, tokenizer = base_from_config(cfg)
    model = SmartPathModel(cfg, base, tokenizer).eval()
    with torch.no_grad():  # peaky logits, so greedy paths differ between experts
        base.model.language_model.norm.weight.mul_(10.0)
    randomise_experts(model, seed=3, std=0.3)
    # The router gets weights of its own seed, so the prompts' routes do not depend on how many
    # modules were initialised before it; seed 4 sends them to different experts (asserted).
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.router.parameters():
            p.normal_(0.0, 1.0, generator=gen)
    out = Path(tmp_path_factory.mktemp("roi"))
    manifest = generate_roi_dataset(out, 3, seed=0, tasks=(Task.CLASSIFICATION, Task.VQA))
    items = load_items([str(manifest)], "train") + load_items([str(manifest)], "test")
    collator = Collator(make_image_processor(cfg.vision, max_pixels=112 * 112), tokenizer)
    return model, collator, items[:3]


def test_batched_mixed_expert_rollouts_equal_sequential(setup) -> None:
    model, collator, prompts = setup
    batch = collator.prompts(prompts)
    experts = model.route(batch, model.embed(batch)[2]).indices[:, 0].tolist()
    assert len(set(experts)) > 1, "prompts should route to different experts"
    kw = dict(group_size=2, max_new_tokens=12, temperature=0.0, seed=0)
    batched = rollout(model, collator, prompts, **kw)
    sequential = rollout(model, collator, prompts, sequential=True, **kw)
    assert batched.completions == sequential.completions
    assert len(batched.completions) == 6 and all(len(c) >= 1 for c in batched.completions)


def test_rewards_and_group_advantages(setup) -> None:
    model, collator, prompts = setup
    rolls = rollout(
        model, collator, prompts, group_size=3, max_new_tokens=10, temperature=1.5, seed=1,
        reward_weights={"task": 1.0, "format": 0.5},
    )  # fmt: skip
    samples = [s for s, _ in rolls.items]
    assert [s.id for s in samples] == [s.id for s, _ in prompts for _ in range(3)]
    expected = task_reward(
        rolls.texts,
        [sample_task(s) for s in samples],
        [s.target for s in samples],
        labels=[s.labels for s in samples],
        options=[s.options for s in samples],
    )
    assert rolls.task_rewards.tolist() == pytest.approx(expected)
    total = torch.tensor(expected) + 0.5 * torch.tensor(format_reward(rolls.texts))
    assert rolls.rewards.tolist() == pytest.approx(total.tolist())
    assert torch.allclose(rolls.advantages, group_advantages(rolls.rewards, 3))
    assert set(rolls.reward_by_key()) == {"classification/roi", "vqa/roi"} & {
        f"{s.task}/roi" for s, _ in prompts
    }


def test_policy_batch_logprobs_match_greedy_generation(setup) -> None:
    model, collator, prompts = setup
    # Unconstrained: greedy tokens are then the argmax of the model's own logits.
    rolls = rollout(
        model, collator, prompts, group_size=1, max_new_tokens=8, temperature=0.0,
        constrained=False,
    )  # fmt: skip
    batch, labels = policy_batch(collator, rolls)
    for i, completion in enumerate(rolls.completions):
        assert labels[i][labels[i] != IGNORE_INDEX].tolist() == completion
    with torch.no_grad():
        logprobs, mask, _ = completion_logprobs(model, batch, labels)
        logits = model(batch).logits
    # Teacher-forced full forward agrees with the cached generation: every generated token is
    # the argmax of the previous position's logits, and its log-prob is the max log-prob.
    best = torch.log_softmax(logits[:, :-1].float(), -1).max(-1)  # (B, T-1)
    shifted = mask[:, 1:]
    assert torch.equal(best.indices[shifted], batch.input_ids[:, 1:][shifted])
    assert torch.allclose(logprobs[:, 1:][shifted], best.values[shifted], atol=1e-4)
    assert bool((logprobs[~mask] == 0).all())


def _scored_completions(prompts) -> tuple[list[str], list]:
    """Per prompt: a correct well-formed answer, the bare answer, a wrong well-formed answer and
    a completion with no answer block."""
    texts, samples = [], []
    for sample, _ in prompts:
        for text in (
            format_completion("looking", sample.target),
            sample.target,
            format_completion("looking", "no idea"),
            "<think>looking</think>",
        ):
            texts.append(text)
            samples.append(sample)
    return texts, samples


def test_default_rewards_equal_task_plus_weighted_format(setup) -> None:
    texts, samples = _scored_completions(setup[2])
    g = GrpoConfig()
    total, task = score(texts, samples, g.reward_weights())
    expected_task = torch.tensor(
        task_reward(
            texts,
            [sample_task(s) for s in samples],
            [s.target for s in samples],
            labels=[s.labels for s in samples],
            options=[s.options for s in samples],
        )
    )
    # The formula GRPO used before rewards were chosen by name, bit for bit.
    expected = expected_task + g.format_weight * torch.tensor(format_reward(texts))
    assert torch.equal(task, expected_task) and torch.equal(total, expected)
    assert set(expected_task.tolist()) >= {0.0, 1.0} and set(format_reward(texts)) == {0.0, 1.0}


def test_rewards_by_name(setup) -> None:
    texts, samples = _scored_completions(setup[2])
    task_only, task = score(texts, samples, GrpoConfig(rewards=["task"]).reward_weights())
    assert torch.equal(task_only, task)  # no format term
    assert not torch.equal(task_only, score(texts, samples, GrpoConfig().reward_weights())[0])
    format_only, still_task = score(texts, samples, {"format": 1.0})
    assert format_only.tolist() == format_reward(texts) and torch.equal(still_task, task)
    with pytest.raises(ValueError, match=r"unknown reward\(s\) 'exact'; known rewards: "):
        score(texts, samples, {"task": 1.0, "exact": 1.0})


def test_completion_logprobs_equal_the_full_sequence_ones(setup) -> None:
    model, collator, prompts = setup
    rolls = rollout(model, collator, prompts, group_size=2, max_new_tokens=6, temperature=1.0,
                    seed=3)  # fmt: skip
    batch, labels = policy_batch(collator, rolls)
    with torch.no_grad():
        full = model(batch, labels=labels)
        for temperature in (1.0, 0.7):
            logprobs, mask, aux = completion_logprobs(model, batch, labels, temperature)
            expected = sequence_logprobs(full.logits / temperature, batch.input_ids, mask)
            assert torch.allclose(logprobs, expected, atol=1e-5)
            assert torch.equal(aux, full.aux_loss)


def _stepper(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """``grpo_update``'s ``step``: an optimizer step, then the gradients cleared."""

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def test_grpo_update_against_the_trainable_parameter_reference(setup) -> None:
    model, collator, prompts = setup
    policy = copy.deepcopy(model)
    params = trainable_parameters(policy, train_base=False)
    reference = ReferencePolicy(policy)
    assert reference.numel == sum(p.numel() for p in params)
    step = _stepper(torch.optim.AdamW(params, lr=5e-2))
    g = GrpoConfig(group_size=3, max_new_tokens=8, kl_beta=0.1)
    kls = []
    for i in range(3):
        rolls = rollout(policy, collator, prompts, group_size=3, max_new_tokens=8,
                        temperature=1.5, seed=10 + i)  # fmt: skip
        _, stats = grpo_update(
            policy, policy, reference, collator, rolls, g, backward=lambda x: x.backward(),
            step=step,
        )  # fmt: skip
        kls.append(float(stats["kl"]))
    # The policy starts as its reference (KL exactly 0), then moves away from it.
    assert kls[0] == 0.0 and kls[-1] > 0.0


def test_constrained_rollouts_are_well_formed(setup) -> None:
    """An untrained model's sampled rollouts, decoded within each sample's grammar, all get
    the full format reward; unconstrained, none does."""
    model, collator, prompts = setup
    kw = dict(group_size=2, max_new_tokens=96, temperature=1.0, seed=2)
    constrained = rollout(model, collator, prompts, **kw)
    assert format_reward(constrained.texts) == [1.0] * len(constrained.texts), constrained.texts
    free = rollout(model, collator, prompts, constrained=False, **kw)
    assert not any(r == 1.0 for r in format_reward(free.texts))


def test_grpo_climbs_towards_what_the_reward_prefers(setup) -> None:
    """GRPO moves probability to the answer its reward prefers, not just to the model's mode:
    a classification prompt whose target is the untrained model's second most likely label
    (sampled less than half the time) is answered with it most of the time after 20 updates.
    A sign error, or advantages misaligned with their rows, would leave it flat or lower it."""
    model, collator, prompts = setup
    sample, visual = prompts[0]
    assert sample.task == "classification"

    def answers(policy: SmartPathModel, item: tuple) -> Counter[str]:
        rolls = rollout(policy, collator, [item], group_size=32, max_new_tokens=24, seed=99)
        parsed = [parse_answer(Task.CLASSIFICATION, t, sample.labels) for t in rolls.texts]
        return Counter(answer.label for answer in parsed)

    [_, (runner_up, _)] = answers(model, prompts[0]).most_common(2)
    item = (sample.model_copy(update={"target": runner_up}), visual)
    policy = copy.deepcopy(model)
    step = _stepper(torch.optim.Adam(trainable_parameters(policy, train_base=False), lr=1e-2))
    g = GrpoConfig(group_size=8, max_new_tokens=24, kl_beta=0.0)
    reference = ReferencePolicy(policy)
    before = answers(policy, item)[runner_up] / 32
    for i in range(20):
        rolls = rollout(policy, collator, [item], group_size=8, max_new_tokens=24, seed=i)
        grpo_update(
            policy, policy, reference, collator, rolls, g, backward=lambda x: x.backward(),
            step=step,
        )  # fmt: skip
    after = answers(policy, item)[runner_up] / 32
    assert before < 0.5 and after > 0.8, (runner_up, before, after)
