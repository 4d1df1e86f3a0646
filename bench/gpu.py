"""GPU benchmark: SmartPath at Qwen2.5-VL-7B shapes (random init, bfloat16) on one CUDA device.

Measures, in one process on one GPU:

1. **Correctness first:** SmartPath's greedy generation (inputs embedded by SmartPath, batched
   mixed-LoRA decoding with fresh, no-op experts) against transformers' own ``generate`` on the
   same weights, for an ROI prompt (a 448 px image) and a text prompt: token for token.
2. **Decode tokens/s** at batch 1, 8 and 32 (64-token prompts, 64 new tokens, EOS never
   stops a row): SmartPath's ``generate`` with a different expert mix per row, and the
   baseline a user would otherwise run, transformers' ``generate`` on the base (no experts),
   same prompts, same batch, same repeats.
3. **Vision tower ms** for one 1 MP ROI (1024×1024 px → 1296 visual tokens).
4. **One SFT step's peak memory** (forward, completion-only loss, backward, AdamW step on the
   trainable parts; base frozen) at micro-batch 1, 2 and 4 of ROI samples of ~1.8k tokens,
   with and without activation checkpointing.

Without CUDA it says so, prints ``{"cuda": false}`` and exits 0. ``--device cpu --shapes tiny``
runs every step at tiny shapes (a smoke test of this script). Prints one JSON line last.

    python bench/gpu.py [--shapes 7b|tiny] [--device cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

from smartpath.core.config.model import PRESETS, ModelConfig
from smartpath.model.base import build_base_model
from smartpath.model.experts import ExpertRouting
from smartpath.model.grammar import Scale, Task
from smartpath.model.mllm import IGNORE_INDEX, PLACEHOLDER_TOKENS, MultimodalBatch, SmartPathModel
from smartpath.model.tokenizer import IM_END, train_builtin_tokenizer
from smartpath.model.vision import make_image_processor, prepare_roi, question_ids
from smartpath.training.engine import enable_gradient_checkpointing
from smartpath.training.objectives import sft_loss

QWEN_ROWS = 152064  # Qwen2.5-VL-7B's embedding rows
SFT_TOKENS = 1800  # tokens per SFT row: a 1 MP ROI (1296 tokens), instructions and an answer


def model_config(shapes: str) -> ModelConfig:
    """Random-init config: the 7B preset's sizes (or tiny's), built without a checkpoint."""
    if shapes == "tiny":
        return ModelConfig(preset="tiny", seed=0)
    p = PRESETS["qwen2.5-vl-7b"]
    return ModelConfig(
        preset="tiny", text=p.text.model_dump(), vision=p.vision.model_dump(), seed=0
    )


def build(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> SmartPathModel:
    tokenizer = train_builtin_tokenizer(8192)
    base = build_base_model(cfg, tokenizer, device=device, dtype=dtype)
    if cfg.text.hidden_size > 1024:  # the real vocabulary's rows (the LM head's real cost)
        base.resize_token_embeddings(QWEN_ROWS, mean_resizing=False)
        base.config.text_config.vocab_size = QWEN_ROWS
    return SmartPathModel(cfg, base, tokenizer).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        tic = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def roi_input(model: SmartPathModel, side: int, max_pixels: int):
    image = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return prepare_roi(image, make_image_processor(model.cfg.vision, max_pixels=max_pixels))


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), pad)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = torch.tensor(r)
        mask[i, length - len(r) :] = 1
    return ids, mask


def check_generation(model: SmartPathModel, device: torch.device) -> dict[str, Any]:
    """SmartPath's greedy tokens vs transformers' ``generate`` on the same base weights."""
    tok, base = model.tokenizer, model.base
    roi = roi_input(model, 448, 448 * 448)
    prompts = [
        question_ids(tok, "Describe the tissue.", slide=False, visual_tokens=roi.num_image_tokens),
        tok(f"<|im_start|>user\nIs this tumour?{IM_END}\n<|im_start|>assistant\n")["input_ids"],
    ]
    vocab = tok.get_vocab()
    suppress = [vocab[t] for t in PLACEHOLDER_TOKENS]
    eos = vocab[IM_END]
    want = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device=device)
        extra = {}
        if i == 0:
            extra = {
                "pixel_values": roi.pixel_values.to(device),
                "image_grid_thw": roi.image_grid_thw.to(device),
                "mm_token_type_ids": (ids == base.config.image_token_id).int(),
            }
        out = base.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
            suppress_tokens=suppress,
            **extra,
        )
        want.append(out[0, len(prompt) :].tolist())
    ids, mask = left_padded(prompts, tok.pad_token_id)
    batch = MultimodalBatch(
        input_ids=ids,
        attention_mask=mask,
        task_ids=torch.tensor([int(Task.VQA)] * 2),
        scale_ids=torch.tensor([int(Scale.ROI)] * 2),
        pixel_values=roi.pixel_values,
        image_grid_thw=roi.image_grid_thw,
    )
    got = model.generate(batch, max_new_tokens=16, eos_token_id=eos)
    return {"generation_matches_transformers": got == want, "tokens_compared": sum(map(len, want))}


def decode_throughput(model: SmartPathModel, device: torch.device, repeats: int) -> dict:
    """Tokens/s of SmartPath (per-row expert mixes) and transformers (base) at B = 1, 8, 32."""
    tok = model.tokenizer
    new, out = 64, {}
    experts = model.cfg.experts
    for b in (1, 8, 32):
        rng = np.random.default_rng(b)
        rows = [rng.integers(300, len(tok) - 30, 64).tolist() for _ in range(b)]
        ids, mask = left_padded(rows, tok.pad_token_id)
        batch = MultimodalBatch(
            input_ids=ids,
            attention_mask=mask,
            task_ids=torch.tensor([int(Task.VQA)] * b),
            scale_ids=torch.tensor([int(Scale.ROI)] * b),
        )
        routing = [
            ExpertRouting(
                torch.tensor([[i % experts.num_experts, (i + 1) % experts.num_experts]]),
                torch.tensor([[0.5, 0.5]]),
            )
            for i in range(b)
        ]

        def ours(batch=batch, routing=routing) -> None:
            model.generate(batch, max_new_tokens=new, routing=routing, eos_token_id=None)

        ids_d, mask_d = ids.to(device), mask.to(device)

        def transformers_generate(ids_d=ids_d, mask_d=mask_d) -> None:
            model.base.generate(
                input_ids=ids_d,
                attention_mask=mask_d,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )

        t_ours = timed(ours, device, repeats)
        t_base = timed(transformers_generate, device, repeats)
        out[f"b{b}"] = {
            "smartpath_tok_s": round(b * new / t_ours, 1),
            "transformers_tok_s": round(b * new / t_base, 1),
        }
    return out


def vision_ms(model: SmartPathModel, device: torch.device, repeats: int) -> dict:
    roi = roi_input(model, 1024, 1024 * 1024 + 28 * 28 * 16)
    pixels, grid = roi.pixel_values.to(device), roi.image_grid_thw.to(device)

    def encode() -> None:
        with torch.no_grad():
            model.encode_images(pixels, grid)

    return {
        "roi_1mp_tokens": roi.num_image_tokens,
        "vision_1mp_ms": round(1000 * timed(encode, device, repeats), 1),
    }


def sft_peak_memory(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """Peak GiB of one SFT step at micro-batch 1/2/4, with and without checkpointing."""
    out: dict[str, Any] = {}
    for checkpointing in (False, True):
        model = build(cfg, device, dtype)
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        roi = roi_input(model, 1024, 1024 * 1024 + 28 * 28 * 16)
        text = "Describe the tissue in detail. " * 8
        prompt = question_ids(
            model.tokenizer, text, slide=False, visual_tokens=roi.num_image_tokens
        )
        unit = model.tokenizer("tumour cells ")["input_ids"]
        answer = unit * max(1, (SFT_TOKENS - len(prompt)) // len(unit))
        row = prompt + answer  # ~SFT_TOKENS tokens
        for b in (1, 2, 4):
            ids = torch.tensor([row] * b)
            labels = ids.clone()
            labels[:, : len(prompt)] = IGNORE_INDEX
            batch = MultimodalBatch(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                task_ids=torch.tensor([int(Task.VQA)] * b),
                scale_ids=torch.tensor([int(Scale.ROI)] * b),
                pixel_values=roi.pixel_values.repeat(b, 1),
                image_grid_thw=roi.image_grid_thw.repeat(b, 1),
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                logits = model(batch).logits
                loss = sft_loss(logits, labels.to(device))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                peak = (
                    round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                    if device.type == "cuda"
                    else None
                )
            except torch.OutOfMemoryError:
                peak = "oom"
            del batch
            out[f"mb{b}_{'ckpt' if checkpointing else 'nockpt'}_gib"] = peak
        out["sft_tokens_per_row"] = len(row)
        del model, optimizer, params
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=["7b", "tiny"], default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device; none is visible here, so nothing was measured.")
        print(json.dumps({"cuda": False}))
        return 0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = model_config(args.shapes)
    result: dict[str, Any] = {
        "cuda": device.type == "cuda",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shapes": args.shapes,
        "dtype": str(dtype).removeprefix("torch."),
    }
    model = build(cfg, device, dtype)
    result["parameters_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    with torch.no_grad():
        result.update(check_generation(model, device))
        result["decode"] = decode_throughput(model, device, args.repeats)
        result.update(vision_ms(model, device, args.repeats))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["sft_peak"] = sft_peak_memory(cfg, device, dtype)
    print(json.dumps(result))
    return 0 if result["generation_matches_transformers"] else 1


if __name__ == "__main__":
    sys.exit(main())
