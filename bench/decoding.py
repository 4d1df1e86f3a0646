"""Benchmark: batched mixed-expert decoding against PEFT's batched multi-adapter generation.

Builds, in the same run, a ~30M-parameter model of transformers' Qwen2.5-VL classes (text path;
hidden 512, 8 layers, 8 heads / 2 KV heads, vocab 8192, a 2-block vision tower that is not
used), attaches E=4 LoRA experts (r=8, alpha=16) on q_proj/v_proj with random non-zero B,
exports every expert as a PEFT adapter and loads them all into one ``peft.PeftModel``.

For each concurrency C (16 and 64): C prompts of 32 random tokens, each with a random top-2
routing (two distinct experts, softmax weights), 32 new tokens each, greedy, no early stop.

- ours: ``smartpath.model.generation.generate`` — all C requests in one batch, every request
  with its own expert mix, KV cache, one forward per step.
- PEFT batched (the strongest baseline): all C requests in one ``PeftModel.generate`` call
  with ``adapter_names=`` giving each request its top-1 expert (PEFT's mixed-adapter batch
  inference; greedy, KV cache, same 32 new tokens). PEFT cannot mix two adapters per request
  without building a weighted adapter per request, so it gets the cheaper top-1 single
  adapter: the comparison favours the baseline. ``ratio_vs_peft_batched`` (target >= 1.0).
- naive (for reference): one request at a time: ``PeftModel.set_adapter(<the request's top-1
  expert>)`` then transformers' ``generate``; PEFT's batch is checked to decode the same tokens
  as this path, request by request.

Tokens/s counts new tokens over wall time including prefill. Each path is timed at every
thread count in ``--threads`` (default 1 and torch's default) and reports its best, so no
path is judged at a thread count that suits it badly (batch-1 decoding is often faster on one
thread; OpenMP threads also stall when other processes share the cores). The naive path is
sequential, so its rate does not depend on C: it is timed on the first ``--naive-max`` (32)
requests and reported as measured tokens / measured seconds; the JSON says how many.

Before timing, a sanity check: our path routed 100% to expert e gives the same tokens as PEFT
with adapter e.

Grammar-constrained decoding (``"grammar"`` in the JSON): the same model widths with a
151,936-row LM head and a Qwen2.5-VL-shaped tokenizer (151,665 ids, built by
``tests/qwen_shaped.py``), C requests cycling through the five answer grammars (classification,
closed and open VQA, detection, segmentation), each stopping at its stop token: our path with
and without the grammars, tokens/s of each (the constrained requests end when their answers
close, so they make fewer tokens), and the time spent in the grammar (masks and matcher
advances) per decoding step and as a share of the run.

Prints progress, then one JSON line last.

    python bench/decoding.py [--concurrency 16 64] [--new-tokens 32] [--naive-max 32]
                             [--threads 1 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from smartpath.model.constrained import Constraint, GrammarBatch, GrammarTokenizer
from smartpath.model.experts import ExpertRouting, attach_experts, expert_modules, export_expert
from smartpath.model.generation import generate
from smartpath.model.grammar import Task

VOCAB, PROMPT_LEN, NUM_EXPERTS, RANK, ALPHA, TOP_K = 8192, 32, 4, 8, 16, 2
TARGET_VS_PEFT_BATCHED = 1.0
QWEN_VOCAB = 151936  # Qwen2.5-VL-3B's LM head rows
TARGETS = ("q_proj", "v_proj")
LABELS = ("tumour", "stroma", "necrosis", "lymphocyte", "normal mucosa")
GRAMMARS = (
    Constraint(Task.CLASSIFICATION, LABELS),
    Constraint(Task.VQA, options=("yes", "no", "cannot tell")),
    Constraint(Task.VQA),
    Constraint(Task.DETECTION, LABELS),
    Constraint(Task.SEGMENTATION, LABELS),
)


def build_model(vocab: int = VOCAB) -> Qwen2_5_VLForConditionalGeneration:
    """The benchmark's Qwen2.5-VL-classes model (random weights, eval mode)."""
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": 512,
            "intermediate_size": 1408,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [16, 8, 8],
                "rope_theta": 10000.0,
            },
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "out_hidden_size": 512,
        },
    )
    config._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None  # no early stop: same token count both ways
    model.generation_config.pad_token_id = 0
    return model


def random_routing(batch: int, gen: torch.Generator) -> ExpertRouting:
    """Top-2 of random logits per request: distinct experts, softmax weights."""
    logits = torch.randn(batch, NUM_EXPERTS, generator=gen)
    top = torch.topk(logits, TOP_K, dim=-1)
    return ExpertRouting(top.indices, torch.softmax(top.values, dim=-1))


def naive_generate(peft_model, prompts: list[list[int]], top1: list[int], new: int) -> list:
    """Sequential: switch to the request's adapter, then transformers' generate on it alone."""
    outs = []
    for prompt, expert in zip(prompts, top1, strict=True):
        peft_model.set_adapter(f"expert{expert}")
        ids = torch.tensor([prompt])
        out = peft_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
        )
        outs.append(out[0, len(prompt) :].tolist())
    return outs


def peft_batched_generate(peft_model, prompts: list[list[int]], top1: list[int], new: int) -> list:
    """PEFT's mixed-adapter batch: every request in one ``generate`` call, each on its own
    (top-1) adapter through ``adapter_names=``."""
    ids = torch.tensor(prompts)  # equal lengths: no padding
    out = peft_model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        adapter_names=[f"expert{e}" for e in top1],
        max_new_tokens=new,
        do_sample=False,
    )
    return out[:, ids.shape[1] :].tolist()


class TimedGrammar(GrammarBatch):
    """A GrammarBatch that adds up the seconds its masks and advances take."""

    seconds = 0.0
    steps = 0

    def mask_(self, logits: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = super().mask_(logits)
        self.seconds += time.perf_counter() - start
        self.steps += 1
        return out

    def advance(self, tokens: list[int]) -> None:
        start = time.perf_counter()
        super().advance(tokens)
        self.seconds += time.perf_counter() - start


def with_experts(base: Qwen2_5_VLForConditionalGeneration, gen: torch.Generator):
    """A copy of ``base`` with the benchmark's LoRA experts (random non-zero B)."""
    model = copy.deepcopy(base)
    attach_experts(model, TARGETS, NUM_EXPERTS, RANK, ALPHA)
    with torch.no_grad():
        for m in expert_modules(model).values():
            m.lora_B.normal_(0.0, 0.02, generator=gen)
    return model


def grammar_cost(args: argparse.Namespace, gen: torch.Generator) -> dict[str, object]:
    """Our path with and without the answer grammars over a Qwen-sized vocabulary."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for tests/
    from tests.qwen_shaped import qwen_tokenizer

    t0 = time.perf_counter()
    tokenizer = qwen_tokenizer()
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    grammar = GrammarTokenizer(tokenizer, QWEN_VOCAB, stop)
    model = with_experts(build_model(QWEN_VOCAB), gen)
    print(f"grammar: tokenizer + model in {time.perf_counter() - t0:.1f}s", flush=True)
    out: dict[str, object] = {"vocab": QWEN_VOCAB, "grammars": len(GRAMMARS)}
    for c in args.concurrency:
        prompts = [torch.randint(0, len(tokenizer) - 30, (PROMPT_LEN,), generator=gen).tolist()
                   for _ in range(c)]  # fmt: skip
        routing = random_routing(c, gen)
        kw = dict(max_new_tokens=args.new_tokens, eos_token_id=stop)
        best: dict[str, dict[str, float]] = {}
        for threads in args.threads:
            free_s, free = timed(threads, generate, model, prompts, routing, **kw)
            matchers = [grammar.matcher(GRAMMARS[i % len(GRAMMARS)]) for i in range(c)]
            batch = TimedGrammar(matchers, QWEN_VOCAB, grammar.executor)
            constrained_s, outs = timed(
                threads, generate, model, prompts, routing, grammar=batch, **kw
            )
            run = {
                "tokens_per_s": round(sum(map(len, free)) / free_s, 1),
                "constrained_tokens_per_s": round(sum(map(len, outs)) / constrained_s, 1),
                "grammar_ms_per_step": round(1e3 * batch.seconds / max(1, batch.steps), 3),
                "grammar_share": round(batch.seconds / constrained_s, 3),
                "constrained_stopped": sum(o[-1] == stop for o in outs),
            }
            print(f"grammar C={c} threads={threads}: {run}", flush=True)
            if (
                not best
                or run["constrained_tokens_per_s"] > best["run"]["constrained_tokens_per_s"]
            ):
                best = {"run": run}
        run = best["run"]
        run["slowdown"] = round(1 - run["constrained_tokens_per_s"] / run["tokens_per_s"], 3)
        out[f"c{c}"] = run
    return out


def timed(threads: int, fn, *args, **kwargs) -> tuple[float, list[list[int]]]:
    """(seconds, outputs) of ``fn(*args, **kwargs)`` run with ``threads`` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        outs = fn(*args, **kwargs)
        return time.perf_counter() - start, outs
    finally:
        torch.set_num_threads(before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--naive-max", type=int, default=32, help="naive requests timed per C")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=sorted({1, torch.get_num_threads()}),
        help="torch thread counts to try; each path reports its best",
    )
    args = parser.parse_args()
    new = args.new_tokens
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    t0 = time.perf_counter()
    base = build_model()
    model = with_experts(base, gen)
    params = sum(p.numel() for p in base.parameters())
    text_params = sum(p.numel() for p in base.model.language_model.parameters())
    print(
        f"model: {params / 1e6:.1f}M params ({text_params / 1e6:.1f}M language model)", flush=True
    )

    from peft import PeftModel

    with tempfile.TemporaryDirectory() as tmp:
        for e in range(NUM_EXPERTS):
            export_expert(model, e, f"{tmp}/expert{e}", base_model_name_or_path="bench")
        peft_model = PeftModel.from_pretrained(base, f"{tmp}/expert0", adapter_name="expert0")
        for e in range(1, NUM_EXPERTS):
            peft_model.load_adapter(f"{tmp}/expert{e}", adapter_name=f"expert{e}")
    peft_model.eval()
    print(f"built model + PEFT adapters in {time.perf_counter() - t0:.1f}s", flush=True)

    # Sanity + warm-up: 100% expert e through our path == PEFT adapter e.
    prompt = torch.randint(3, VOCAB, (PROMPT_LEN,), generator=gen).tolist()
    for e in (1, 3):
        ours = generate(model, [prompt], ExpertRouting.single([e], [1.0]), max_new_tokens=8)[0]
        theirs = naive_generate(peft_model, [prompt], [e], 8)[0]
        if ours != theirs:
            raise SystemExit(f"sanity check failed for expert {e}: {ours} != {theirs}")
    print("sanity: batched path routed 100% to expert e == PEFT adapter e", flush=True)

    result: dict[str, object] = {
        "benchmark": "decoding",
        "params_m": round(params / 1e6, 1),
        "prompt_tokens": PROMPT_LEN,
        "new_tokens": new,
        "experts": NUM_EXPERTS,
        "rank": RANK,
        "top_k": TOP_K,
        "threads_tried": args.threads,
        "target_ratio_vs_peft_batched_min": TARGET_VS_PEFT_BATCHED,
        "ours": "one batch, per-request top-2 expert mix, KV cache (smartpath generate)",
        "peft_batched": "one PeftModel.generate over all C requests, adapter_names= each "
        "request's top-1 expert (PEFT's mixed-adapter batch)",
        "naive": "sequential PeftModel.set_adapter(top-1 expert) + transformers generate",
        "note": "tokens/s = new tokens / wall time incl. prefill; each path at its best thread "
        "count; naive timed on the first naive_requests_timed requests (sequential, so its rate "
        "does not depend on C)",
    }
    for c in args.concurrency:
        prompts = [torch.randint(3, VOCAB, (PROMPT_LEN,), generator=gen).tolist() for _ in range(c)]
        routing = random_routing(c, gen)
        n_naive = min(c, args.naive_max)
        all_top1 = routing.indices[:, 0].tolist()
        top1 = all_top1[:n_naive]
        by_threads: dict[str, dict[str, float]] = {}
        for threads in args.threads:
            timed(threads, generate, model, prompts[:2], routing.select([0, 1]), max_new_tokens=2)
            ours_s, outs = timed(threads, generate, model, prompts, routing, max_new_tokens=new)
            assert sum(len(o) for o in outs) == c * new
            naive_s, naive_outs = timed(
                threads, naive_generate, peft_model, prompts[:n_naive], top1, new
            )
            assert sum(len(o) for o in naive_outs) == n_naive * new
            peft_s, peft_outs = timed(
                threads, peft_batched_generate, peft_model, prompts, all_top1, new
            )
            assert sum(len(o) for o in peft_outs) == c * new
            # PEFT's batch must decode what its sequential path does, request by request.
            agree = sum(a == b for a, b in zip(peft_outs, naive_outs, strict=False))
            by_threads[str(threads)] = {
                "tokens_per_s": round(c * new / ours_s, 1),
                "peft_batched_tokens_per_s": round(c * new / peft_s, 1),
                "naive_tokens_per_s": round(n_naive * new / naive_s, 1),
                "peft_batched_equal_to_sequential": f"{agree}/{n_naive}",
            }
            print(
                f"C={c} threads={threads}: ours {c * new} tokens in {ours_s:.2f}s, "
                f"PEFT batched in {peft_s:.2f}s, "
                f"naive {n_naive * new} tokens ({n_naive} requests) in {naive_s:.2f}s",
                flush=True,
            )
        tps = max(v["tokens_per_s"] for v in by_threads.values())
        peft_tps = max(v["peft_batched_tokens_per_s"] for v in by_threads.values())
        naive_tps = max(v["naive_tokens_per_s"] for v in by_threads.values())
        result[f"c{c}"] = {
            "tokens_per_s": tps,
            "peft_batched_tokens_per_s": peft_tps,
            "naive_tokens_per_s": naive_tps,
            "ratio_vs_peft_batched": round(tps / peft_tps, 2),
            "meets_ratio_vs_peft_batched": tps / peft_tps >= TARGET_VS_PEFT_BATCHED,
            "ratio": round(tps / naive_tps, 2),
            "naive_requests_timed": n_naive,
            "by_threads": by_threads,
        }
    result["grammar"] = grammar_cost(args, gen)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
