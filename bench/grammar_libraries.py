"""Benchmark: grammar-constrained decoding libraries on SmartPath's answer regexes.

Compares llguidance, xgrammar and outlines-core, each turning
:func:`smartpath.model.answer_regex.completion_regex` (``<think>…</think><answer>…</answer>``,
then the stop token ``<|im_end|>``) into per-step token masks over an HF tokenizer, on two
tokenizers: the demo model's own (byte-level BPE, the grammar tags as single added tokens,
logits width = the demo model's vocab_size) and a Qwen2.5-VL-shaped one
(``tests/qwen_shaped.py``, 151,643 BPE tokens + Qwen's added tokens + ``<|slide_pad|>`` from
``prepare_tokenizer``; tags are plain text; logits width 151,936 as Qwen2.5-VL-3B's lm_head).
Each library is its own baseline: all of them run the same requests, tokens and batches.

Libraries (any that does not import is skipped: a note on stderr and ``null`` in the JSON):

- ``llguidance``: ``llguidance.hf.from_tokenizer`` (its documented HF path) + ``LLMatcher``
  on ``LLMatcher.grammar_from_regex``; masks with ``fill_next_token_bitmask_par`` (an
  ``LLExecutor`` of ``--threads`` threads), ``llguidance.torch.apply_token_bitmask_inplace``.
  That path turns every *added* token into a special one (it cannot spell text), so the demo
  tokenizer's ``<think>`` token cannot match the regex's ``<think>``.
- ``llguidance_bytes``: the same matcher over an ``LLTokenizer`` built from a
  ``TokenizerWrapper`` that gives each token its bytes (added non-special tokens as their
  text, control tokens special), the vocabulary outlines-core is given too.
- ``xgrammar``: ``TokenizerInfo.from_huggingface`` + ``GrammarCompiler(max_threads=--threads)``
  (cache off for fresh compiles, a second one with the cache on for cache hits),
  ``GrammarMatcher``; masks with ``BatchGrammarMatcher(--threads).batch_fill_next_token_bitmask``
  and ``xgrammar.apply_token_bitmask_inplace`` (its C++ CPU kernel).
- ``outlines_core``: ``Vocabulary(eos, {token bytes: ids})`` + ``Index`` + ``Guide``; masks
  with ``outlines_core.kernels.torch.fill_next_token_bitmask`` per row (it has no batch fill)
  and its ``apply_token_bitmask_inplace``. ``Guide.advance`` refuses the EOS token by
  design (the caller stops), so advancing by the stop token means checking ``is_finished``.

Measured per library x tokenizer:

(a) prep_s: one-time tokenizer preparation (median of ``--prep-repeats``), the HF tokenizer
    already loaded.
(b) compile_ms per request kind (classification with 8 labels, closed VQA with 4 options,
    detection and segmentation with 5 labels, open VQA), ``--compiles`` requests each, every
    one with fresh label/option strings: regex string -> a matcher ready for its first mask
    (mean and p95); first_mask_ms: that matcher's first mask (llguidance builds its lexer
    lazily, so part of its compile cost lands in the masks); request_ms: compile plus the
    whole canonical completion walked on one row (every mask and advance, no apply): a
    request's total grammar cost; reuse_ms: the same regex again when the library can reuse
    work (xgrammar: cache hit of its compiler; outlines-core: a new ``Guide`` on the kept
    ``Index``; llguidance: ``deep_copy`` of a kept matcher).
(c) step_us: teacher-forced decoding of a batch of 8 rows (classification, closed VQA,
    detection, segmentation, open VQA, classification, detection, segmentation), each row
    following its request's canonical completion tokens
    (``tokenizer.encode(format_completion("", format_answer(answer)))``) and then the stop
    token; a row that finishes takes the next fresh request of its kind (compiled before the
    loop, never timed there). Per step: fill the 8 rows' masks + apply them to an (8, V)
    float32 logits tensor (fill_us + apply_us), and advance each row's matcher by its token
    (advance_us); ``--steps`` steps after ``--warmup``, mean and p95 of the sum, and of
    fill + advance alone (grammar_us: apply is a kernel over the same bitmask layout in all
    three, swappable; ``apply_eager_torch_us`` is a plain eager-torch apply for reference).
(d) correctness, asserted (the run exits 1 if any fails, after printing the JSON): for every
    request walked in (b) and (c) and ``--check`` more per kind, each token is in the mask
    and accepted, the stop token is allowed after ``</answer>`` and nowhere earlier, and the
    matcher is finished after it; a classification answer with a label not in the list and a
    detection box coordinate 1001 are rejected at the token where the text stops being a
    prefix of the regex's language (Python ``regex`` partial matching is the oracle), all
    earlier tokens accepted; word_sweep: classification requests whose labels are the
    tokenizer's own plain-word tokens (8 per request, every such token that is its word's
    canonical first token after ``<answer>``) must allow each label's token there. (c) is
    skipped where canonical completions are rejected (it would time error states). Not
    asserted, reported: ``non_ascii``, an open-VQA answer with "µm" and "×" whose bytes the
    tokenizers split across tokens.

Threads: torch, the llguidance executor and the xgrammar compiler/batch matcher run at
``--threads`` (1), RAYON_NUM_THREADS/OMP_NUM_THREADS likewise. Prints progress to stderr and
one JSON line last on stdout.

Only llguidance is a project dependency; put the others beside it without touching the venv:

    pip install --no-deps --target /tmp/gramlibs xgrammar apache-tvm-ffi outlines-core
    PYTHONPATH=/tmp/gramlibs python bench/grammar_libraries.py [--steps 200] [--compiles 20]
        [--check 3] [--threads 1] [--tokenizers demo qwen] [--libraries ...]
        [--qwen-dir /tmp/qwen_tok] [--prep-repeats 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex
import torch

from smartpath.model.answer_regex import completion_regex
from smartpath.model.constrained import byte_decoder
from smartpath.model.grammar import (
    Detection,
    DetectionAnswer,
    LabelAnswer,
    Polygon,
    SegmentationAnswer,
    Task,
    TextAnswer,
    format_answer,
    format_completion,
)

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("classification", "vqa_closed", "detection", "segmentation", "vqa_open")
ROW_KINDS = (
    "classification",
    "vqa_closed",
    "detection",
    "segmentation",
    "vqa_open",
    "classification",
    "detection",
    "segmentation",
)
LABEL_COUNT = {"classification": 8, "vqa_closed": 4, "detection": 5, "segmentation": 5}
QWEN_LOGITS = 151936  # Qwen2.5-VL-3B's lm_head rows
ALL_LIBRARIES = ("llguidance", "llguidance_bytes", "xgrammar", "outlines_core")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ms(seconds: Sequence[float]) -> dict[str, float]:
    """Mean and p95 in milliseconds."""
    return {"mean": round(1e3 * statistics.fmean(seconds), 3), "p95": round(1e3 * p95(seconds), 3)}


def p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


# ---------------------------------------------------------------------------------------------
# Tokenizers


@dataclass
class Tok:
    name: str
    hf: Any
    vocab: int  # logits width V (the model's lm_head rows)
    stop: int
    token_bytes: list[bytes | None]  # per tokenizer id; None: control (special) token
    special_text: dict[int, bytes]  # control tokens' text

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def text(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes[i] or b"" for i in ids).decode("utf-8", "replace")


def make_tok(name: str, hf: Any, vocab: int) -> Tok:
    decoder = byte_decoder()
    added = hf.added_tokens_decoder
    token_bytes: list[bytes | None] = []
    special_text: dict[int, bytes] = {}
    for i, piece in enumerate(hf.convert_ids_to_tokens(list(range(len(hf))))):
        if i in added:
            if added[i].special:
                token_bytes.append(None)
                special_text[i] = added[i].content.encode()
            else:
                token_bytes.append(added[i].content.encode())
        else:
            token_bytes.append(bytes(decoder[c] for c in piece))
    stop = hf.convert_tokens_to_ids("<|im_end|>")
    assert stop == hf.eos_token_id, (stop, hf.eos_token_id)
    assert vocab >= len(hf), (vocab, len(hf))
    return Tok(name, hf, vocab, stop, token_bytes, special_text)


def load_tokenizers(names: Sequence[str], qwen_dir: Path) -> dict[str, Tok]:
    from smartpath.model.checkpoint import DEMO_MODEL_DIR, TOKENIZER_DIR
    from smartpath.model.tokenizer import IM_END, load_tokenizer, prepare_tokenizer

    out: dict[str, Tok] = {}
    if "demo" in names:
        hf = load_tokenizer(DEMO_MODEL_DIR / TOKENIZER_DIR)
        manifest = json.loads((DEMO_MODEL_DIR / "manifest.json").read_text())
        out["demo"] = make_tok("demo", hf, int(manifest["model"]["text"]["vocab_size"]))
    if "qwen" in names:
        if not (qwen_dir / "tokenizer.json").is_file():
            log(f"building the Qwen2.5-VL-shaped tokenizer into {qwen_dir} (once)")
            sys.path.insert(0, str(ROOT))
            from tests.qwen_shaped import qwen_tokenizer

            qwen_tokenizer().save_pretrained(str(qwen_dir))
        hf = load_tokenizer(qwen_dir)
        prepare_tokenizer(hf)  # + <|slide_pad|>, as a served Qwen checkpoint has
        out["qwen"] = make_tok("qwen", hf, QWEN_LOGITS)
    for tok in out.values():
        assert tok.hf.convert_ids_to_tokens(tok.stop) == IM_END
        log(
            f"tokenizer {tok.name}: {len(tok.hf)} tokens, logits width {tok.vocab}, "
            f"stop {IM_END} = {tok.stop}"
        )
    return out


# ---------------------------------------------------------------------------------------------
# Requests


ADJ = [
    "invasive",
    "in-situ",
    "benign",
    "malignant",
    "reactive",
    "atypical",
    "metastatic",
    "necrotic",
    "mucinous",
    "papillary",
    "lobular",
    "ductal",
    "squamous",
    "clear cell",
    "high grade",
    "low grade",
    "well differentiated",
    "poorly differentiated",
]
NOUN = [
    "carcinoma",
    "adenocarcinoma",
    "stroma",
    "necrosis",
    "lymphocytes",
    "mucosa",
    "adipose tissue",
    "muscle",
    "debris",
    "gland",
    "nuclei",
    "mitotic figure",
    "epithelium",
    "fibrosis",
    "hyperplasia",
    "dysplasia",
    "melanoma",
    "lymphoma",
    "sarcoma",
    "tumor cells",
]
TISSUE = ["breast", "lung", "colon", "prostate", "skin", "liver", "kidney", "lymph node"]


@dataclass
class Request:
    kind: str
    regex: str
    text: str  # canonical completion (without the stop token)
    ids: list[int]  # its tokens, then the stop token


class RequestMaker:
    """Requests with fresh label/option strings (no label list repeats within a run)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seen: set[tuple[str, ...]] = set()

    def labels(self, k: int) -> list[str]:
        while True:
            combos = {f"{self.rng.choice(ADJ)} {self.rng.choice(NOUN)}" for _ in range(4 * k)}
            labels = self.rng.sample(sorted(combos), k)
            if tuple(labels) not in self.seen:
                self.seen.add(tuple(labels))
                return labels

    def options(self) -> list[str]:
        while True:
            r = self.rng
            options = [
                f"{r.choice(ADJ)} {r.choice(NOUN)}",
                f"{r.choice(NOUN)} (grade {r.randint(1, 3)})",
                f"Yes: Ki-67 > {r.randint(1, 99)}% in {r.choice(NOUN)}.",
                f"No {r.choice(NOUN)} seen",
            ]
            r.shuffle(options)
            if tuple(options) not in self.seen:
                self.seen.add(tuple(options))
                return options

    def box(self) -> tuple[int, int, int, int]:
        x1, y1 = self.rng.randint(0, 900), self.rng.randint(0, 900)
        return x1, y1, self.rng.randint(x1 + 1, 1000), self.rng.randint(y1 + 1, 1000)

    def make(self, kind: str, tok: Tok) -> Request:
        """A fresh request of ``kind`` (the same sequence of requests for every tokenizer when
        called in the same order with the same seed)."""
        r = self.rng
        labels = options = None
        if kind == "classification":
            labels = self.labels(LABEL_COUNT[kind])
            task, answer = Task.CLASSIFICATION, LabelAnswer(r.choice(labels))
        elif kind == "vqa_closed":
            options = self.options()
            task, answer = Task.VQA, TextAnswer(r.choice(options))
        elif kind == "detection":
            labels = self.labels(LABEL_COUNT[kind])
            dets = tuple(Detection(r.choice(labels), self.box()) for _ in range(r.randint(1, 3)))
            task, answer = Task.DETECTION, DetectionAnswer(dets)
        elif kind == "segmentation":
            labels = self.labels(LABEL_COUNT[kind])
            polys = tuple(
                Polygon(
                    r.choice(labels),
                    tuple((r.randint(0, 1000), r.randint(0, 1000)) for _ in range(r.randint(4, 8))),
                )
                for _ in range(r.randint(1, 2))
            )
            task, answer = Task.SEGMENTATION, SegmentationAnswer(polys)
        else:
            text = (
                f"The {r.choice(TISSUE)} tissue shows {r.choice(ADJ)} {r.choice(NOUN)} with "
                f"{r.randint(0, 40)} mitoses per 10 HPF; margins > {r.randint(1, 9)} mm."
            )
            task, answer = Task.VQA, TextAnswer(text)
        return build_request(kind, tok, completion_regex(task, labels, options), answer)


def build_request(kind: str, tok: Tok, pattern: str, answer: Any) -> Request:
    text = format_completion("", format_answer(answer))
    ids = [*tok.encode(text), tok.stop]
    assert tok.text(ids[:-1]) == text, (tok.name, text)
    return Request(kind, pattern, text, ids)


def probes(tok: Tok, seed: int) -> dict[str, tuple[Request, bool]]:
    """Correctness probes: (request, whether its whole text is in the regex's language)."""
    maker = RequestMaker(seed + 7919)
    labels = maker.labels(8)
    first = labels[0].split(" ")[0]
    bad = next(
        f"{first} {n}"
        for n in NOUN
        if f"{first} {n}" not in labels and not any(x.startswith(f"{first} {n}") for x in labels)
    )
    out = {
        "label_not_in_list": (
            build_request(
                "classification",
                tok,
                completion_regex(Task.CLASSIFICATION, labels),
                LabelAnswer(bad),
            ),
            False,
        )
    }
    det_labels = maker.labels(5)
    dets = (Detection(det_labels[1], (120, 45, 1001, 700)),)
    out["box_coordinate_1001"] = (
        build_request(
            "detection", tok, completion_regex(Task.DETECTION, det_labels), DetectionAnswer(dets)
        ),
        False,
    )
    text = "Nuclei measure 5 µm; mitoses × 3 per 10 HPF."
    out["non_ascii"] = (
        build_request("vqa_open", tok, completion_regex(Task.VQA), TextAnswer(text)),
        True,
    )
    return out


ANSWER_PREFIX = format_completion("", "x").split("x")[0]  # "<think></think><answer>"


def word_tokens(tok: Tok) -> list[tuple[str, int]]:
    """(word, id) of every plain-word token (ASCII letters, no leading space) that is the
    canonical first token of that word as a classification answer."""
    prefix = tok.encode(ANSWER_PREFIX)
    out = []
    for i, b in enumerate(tok.token_bytes):
        word = b.decode("utf-8", "ignore") if b else ""
        if len(word) >= 2 and word.isascii() and word.isalpha():
            ids = tok.encode(f"{ANSWER_PREFIX}{word}")
            if ids[: len(prefix)] == prefix and ids[len(prefix)] == i:
                out.append((word, i))
    return out


def sweep(lib: Library, words: list[tuple[str, int]], group: int = 8) -> dict[str, Any]:
    """Classification requests whose labels are the tokenizer's own word tokens, ``group``
    at a time: after ``<answer>`` each label's single token must be in the mask."""
    tok = lib.tok
    prefix = tok.encode(ANSWER_PREFIX)
    mask = lib.bitmask(1)
    masked_out: list[str] = []
    errors: list[str] = []
    for start in range(0, len(words), group):
        chunk = words[start : start + group]
        m = lib.compile(completion_regex(Task.CLASSIFICATION, [w for w, _ in chunk]))
        if not all(lib.advance(m, t) for t in prefix):
            errors.append(f"prefix {ANSWER_PREFIX!r} rejected ({first_line(lib.error(m))})")
            break
        lib.fill([m], mask)
        masked_out += [w for w, i in chunk if not bit(mask, 0, i)]
    return {"labels": len(words), "masked_out": masked_out, "errors": errors}


def oracle_reject_index(req: Request, tok: Tok) -> int | None:
    """Index of the first token whose text leaves the prefixes of the regex's language (None
    if the whole completion matches)."""
    pattern = regex.compile(req.regex)
    for i in range(len(req.ids) - 1):
        if pattern.fullmatch(tok.text(req.ids[: i + 1]), partial=True) is None:
            return i
    assert pattern.fullmatch(req.text), req.text
    return None


# ---------------------------------------------------------------------------------------------
# Libraries


class Library:
    """One library's adapter: prepare a tokenizer, compile a regex into a matcher, fill and
    apply masks for a batch, advance a matcher by one token."""

    name = ""
    module = ""
    reuse_note = ""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.lib = importlib.import_module(self.module)

    def version(self) -> str:
        from importlib.metadata import version

        return version(self.module.replace("_", "-"))

    def prepare(self, tok: Tok) -> None:
        raise NotImplementedError

    def compile(self, pattern: str) -> Any:
        raise NotImplementedError

    def reuse_setup(self, pattern: str) -> Any:
        raise NotImplementedError

    def reuse(self, kept: Any) -> Any:
        raise NotImplementedError

    def bitmask(self, batch: int) -> torch.Tensor:
        return torch.full((batch, (self.tok.vocab + 31) // 32), -1, dtype=torch.int32)

    def fill(self, matchers: Sequence[Any], mask: torch.Tensor) -> None:
        raise NotImplementedError

    def apply(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        raise NotImplementedError

    def advance(self, matcher: Any, token: int) -> bool:
        raise NotImplementedError

    def finished(self, matcher: Any) -> bool:
        raise NotImplementedError

    def error(self, matcher: Any) -> str:
        return ""


class LLGuidance(Library):
    name = module = "llguidance"
    reuse_note = "deep_copy() of a kept matcher (llguidance has no compile cache)"

    def __init__(self, threads: int) -> None:
        super().__init__(threads)
        import llguidance.torch

        self.lt = llguidance.torch
        self.executor = self.lib.LLExecutor(num_threads=threads)

    def prepare(self, tok: Tok) -> None:
        import llguidance.hf

        self.tok = tok
        self.lltok = llguidance.hf.from_tokenizer(tok.hf, n_vocab=tok.vocab)

    def compile(self, pattern: str) -> Any:
        grammar = self.lib.LLMatcher.grammar_from_regex(pattern)
        return self.lib.LLMatcher(self.lltok, grammar, log_level=0)

    def reuse_setup(self, pattern: str) -> Any:
        return self.compile(pattern)

    def reuse(self, kept: Any) -> Any:
        return kept.deep_copy()

    def fill(self, matchers: Sequence[Any], mask: torch.Tensor) -> None:
        self.lt.fill_next_token_bitmask_par(
            self.executor, [(m, i) for i, m in enumerate(matchers)], mask
        )

    def apply(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        self.lt.apply_token_bitmask_inplace(logits, mask)

    def advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token)) and not matcher.is_error()

    def finished(self, matcher: Any) -> bool:
        return bool(matcher.is_stopped())

    def error(self, matcher: Any) -> str:
        return matcher.get_error() if matcher.is_error() else ""


class _BytesTokenizer:
    """What ``llguidance.TokenizerWrapper`` needs: every id's bytes, control ids special."""

    def __init__(self, tok: Tok) -> None:
        self.tok = tok
        self.backend = tok.hf.backend_tokenizer
        self.eos_token_id = tok.stop
        self.bos_token_id = None
        n = len(tok.token_bytes)
        self.tokens = [
            b if b is not None else tok.special_text[i] for i, b in enumerate(tok.token_bytes)
        ]
        self.tokens += [f"<|unused_{i}|>".encode() for i in range(n, tok.vocab)]  # lm_head padding
        self.special_token_ids = [i for i, b in enumerate(tok.token_bytes) if b is None]
        self.special_token_ids += list(range(n, tok.vocab))

    def __call__(self, data: bytes) -> list[int]:
        # llguidance calls this about once per token (forced-bytes tokenization): the Rust
        # tokenizer directly, without transformers' wrapper around it
        text = data.decode("utf-8", "replace")
        return self.backend.encode(text, add_special_tokens=False).ids


class LLGuidanceBytes(LLGuidance):
    name = "llguidance_bytes"

    def prepare(self, tok: Tok) -> None:
        self.tok = tok
        self.lltok = self.lib.LLTokenizer(self.lib.TokenizerWrapper(_BytesTokenizer(tok)))
        assert self.lltok.vocab_size == tok.vocab, (self.lltok.vocab_size, tok.vocab)


class XGrammar(Library):
    name = module = "xgrammar"
    reuse_note = "compile_regex of a seen regex on a GrammarCompiler with its cache on (hit)"

    def __init__(self, threads: int) -> None:
        super().__init__(threads)
        self.batch = self.lib.BatchGrammarMatcher(max_threads=threads)

    def prepare(self, tok: Tok) -> None:
        self.tok = tok
        info = self.lib.TokenizerInfo.from_huggingface(
            tok.hf, vocab_size=tok.vocab, stop_token_ids=[tok.stop]
        )
        self.fresh = self.lib.GrammarCompiler(info, max_threads=self.threads, cache_enabled=False)
        self.cached = self.lib.GrammarCompiler(info, max_threads=self.threads, cache_enabled=True)

    def compile(self, pattern: str) -> Any:
        return self.lib.GrammarMatcher(self.fresh.compile_regex(pattern))

    def reuse_setup(self, pattern: str) -> Any:
        self.cached.compile_regex(pattern)
        return pattern

    def reuse(self, kept: Any) -> Any:
        return self.lib.GrammarMatcher(self.cached.compile_regex(kept))

    def fill(self, matchers: Sequence[Any], mask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(list(matchers), mask)

    def apply(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        self.lib.apply_token_bitmask_inplace(logits, mask)

    def advance(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    def finished(self, matcher: Any) -> bool:
        return bool(matcher.is_terminated())


class OutlinesCore(Library):
    name = module = "outlines_core"
    reuse_note = "a new Guide on a kept Index (outlines-core has no compile cache)"

    def __init__(self, threads: int) -> None:
        super().__init__(threads)
        from outlines_core.kernels import torch as kernels

        self.kernels = kernels

    def prepare(self, tok: Tok) -> None:
        self.tok = tok
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(tok.token_bytes):
            if b is not None and i != tok.stop:
                by_bytes.setdefault(b, []).append(i)
        self.vocabulary = self.lib.Vocabulary(tok.stop, by_bytes)

    def compile(self, pattern: str) -> Any:
        return _Guided(self.lib.Guide(self.lib.Index(pattern, self.vocabulary)))

    def reuse_setup(self, pattern: str) -> Any:
        return self.lib.Index(pattern, self.vocabulary)

    def reuse(self, kept: Any) -> Any:
        return _Guided(self.lib.Guide(kept))

    def fill(self, matchers: Sequence[Any], mask: torch.Tensor) -> None:
        for i, m in enumerate(matchers):
            self.kernels.fill_next_token_bitmask(m.guide, mask[i : i + 1])

    def apply(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        self.kernels.apply_token_bitmask_inplace(logits, mask)

    def advance(self, matcher: Any, token: int) -> bool:
        if token == self.tok.stop:  # Guide.advance refuses EOS: stopping is the caller's
            matcher.stopped = bool(matcher.guide.is_finished())
            return matcher.stopped
        try:
            matcher.guide.advance(token, return_tokens=False)
        except ValueError as e:
            matcher.err = str(e)
            return False
        return True

    def finished(self, matcher: Any) -> bool:
        return matcher.stopped

    def error(self, matcher: Any) -> str:
        return matcher.err


@dataclass
class _Guided:
    guide: Any
    stopped: bool = False
    err: str = ""


LIBRARIES: dict[str, type[Library]] = {
    "llguidance": LLGuidance,
    "llguidance_bytes": LLGuidanceBytes,
    "xgrammar": XGrammar,
    "outlines_core": OutlinesCore,
}


# ---------------------------------------------------------------------------------------------
# Measurements


def bit(mask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(mask[row, token >> 5]) >> (token & 31)) & 1)


def walk(lib: Library, req: Request, reject_at: int | None) -> list[str]:
    """Teacher-force one request row by row; return failures ([] if it behaves)."""
    tok = lib.tok
    m = lib.compile(req.regex)
    mask = lib.bitmask(1)
    last = len(req.ids) - 1
    for i, t in enumerate(req.ids):
        lib.fill([m], mask)
        allowed = bit(mask, 0, t)
        if reject_at is not None and i == reject_at:
            accepted = lib.advance(m, t)
            if allowed or accepted:
                return [
                    f"{req.kind}: token {i} {tok.text([t])!r} should be rejected but mask "
                    f"allows it: {allowed}, advance accepts it: {accepted}"
                ]
            return []
        stop_ok = bit(mask, 0, tok.stop)
        if stop_ok != (i == last):
            where = "at the end" if i == last else f"at token {i} (text {tok.text(req.ids[:i])!r})"
            return [f"{req.kind}: stop token {'not ' if not stop_ok else ''}allowed {where}"]
        if not allowed:
            return [
                f"{req.kind}: token {i} {tok.text([t])!r} after {tok.text(req.ids[:i])!r} "
                f"not in the mask"
            ]
        if not lib.advance(m, t):
            return [
                f"{req.kind}: token {i} {tok.text([t])!r} in the mask but not accepted "
                f"({first_line(lib.error(m))})"
            ]
    if reject_at is not None:
        return [f"{req.kind}: completion accepted whole, expected a rejection at {reject_at}"]
    if not lib.finished(m):
        return [f"{req.kind}: matcher not finished after the stop token"]
    return []


def measure_compile(
    lib: Library, tok: Tok, maker: RequestMaker, n: int
) -> tuple[dict[str, Any], list[str]]:
    """Fresh compiles per kind; each compiled matcher then walks its whole completion on one
    row (masks + advances, no apply), which gives the request's total grammar cost."""
    compile_s: dict[str, list[float]] = {k: [] for k in KINDS}
    first_s: dict[str, list[float]] = {k: [] for k in KINDS}
    request_s: dict[str, list[float]] = {k: [] for k in KINDS}
    tokens: dict[str, list[int]] = {k: [] for k in KINDS}
    reuse_s: dict[str, list[float]] = {k: [] for k in KINDS}
    failures: list[str] = []
    mask = lib.bitmask(1)
    for kind in KINDS:
        for _ in range(n):
            req = maker.make(kind, tok)
            t0 = time.perf_counter()
            m = lib.compile(req.regex)
            t1 = time.perf_counter()
            lib.fill([m], mask)
            t2 = time.perf_counter()
            ok = lib.advance(m, req.ids[0])
            for t in req.ids[1:]:
                lib.fill([m], mask)
                ok &= lib.advance(m, t)
            t3 = time.perf_counter()
            compile_s[kind].append(t1 - t0)
            first_s[kind].append(t2 - t1)
            request_s[kind].append(t3 - t0)
            tokens[kind].append(len(req.ids))
            if not ok or not lib.finished(m):
                failures.append(
                    f"{kind}: canonical completion not accepted in the compile walk "
                    f"({first_line(lib.error(m))})"
                )
        for _ in range(max(3, n // 4)):  # reuse of a seen regex
            req = maker.make(kind, tok)
            kept = lib.reuse_setup(req.regex)
            t0 = time.perf_counter()
            lib.reuse(kept)
            reuse_s[kind].append(time.perf_counter() - t0)
    out = {
        "compile_ms": {k: ms(v) for k, v in compile_s.items()},
        "first_mask_ms": {k: ms(v)["mean"] for k, v in first_s.items()},
        "request_ms": {k: ms(v) for k, v in request_s.items()},
        "request_tokens": {k: round(statistics.fmean(v), 1) for k, v in tokens.items()},
        "reuse_ms": {k: ms(v)["mean"] for k, v in reuse_s.items()},
    }
    return out, failures


def first_line(text: str) -> str:
    return text.strip().splitlines()[0][:200] if text.strip() else ""


def measure_steps(
    lib: Library, tok: Tok, maker: RequestMaker, steps: int, warmup: int
) -> tuple[dict[str, Any], list[str]]:
    """Teacher-forced batch-8 decoding; fresh requests compiled before the loop."""
    total = steps + warmup
    pools: dict[str, list[tuple[Request, Any]]] = {k: [] for k in KINDS}
    for kind in KINDS:  # enough requests that no row runs dry
        rows, length = ROW_KINDS.count(kind), 0
        while not pools[kind] or length < rows * total + rows * max(
            len(r.ids) for r, _ in pools[kind]
        ):
            req = maker.make(kind, tok)
            pools[kind].append((req, lib.compile(req.regex)))
            length += len(req.ids)
    for kind in KINDS:
        pools[kind].reverse()
    failures: list[str] = []
    rows: list[list[Any]] = []  # [request, matcher, position]

    def next_row(kind: str) -> list[Any]:
        req, m = pools[kind].pop()
        return [req, m, 0]

    rows = [next_row(k) for k in ROW_KINDS]
    batch = len(rows)
    mask = lib.bitmask(batch)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(batch, tok.vocab, generator=gen)
    logits = base.clone()
    fill_s, apply_s, advance_s = [], [], []
    requests_done = 0
    idx = torch.arange(batch)
    for step in range(total):
        logits.copy_(base)
        tokens = [r[0].ids[r[2]] for r in rows]
        t0 = time.perf_counter()
        lib.fill([r[1] for r in rows], mask)
        t1 = time.perf_counter()
        lib.apply(logits, mask)
        t2 = time.perf_counter()
        # checks (not timed): each next token allowed, stop allowed only at the end
        ends = [r[2] == len(r[0].ids) - 1 for r in rows]
        tok_t = torch.tensor(tokens)
        stop_t = torch.full((batch,), tok.stop)
        kept = logits[idx, tok_t] == base[idx, tok_t]
        stop_on = torch.isfinite(logits[idx, stop_t])
        for i, r in enumerate(rows):
            if not bit(mask, i, tokens[i]) or not bool(kept[i]):
                failures.append(f"{r[0].kind}: token {r[2]} masked out in batch step {step}")
            if bool(stop_on[i]) != ends[i] or bit(mask, i, tok.stop) != ends[i]:
                failures.append(f"{r[0].kind}: stop token wrong at position {r[2]} (step {step})")
        t3 = time.perf_counter()
        oks = [lib.advance(r[1], t) for r, t in zip(rows, tokens, strict=True)]
        t4 = time.perf_counter()
        if step >= warmup:
            fill_s.append(t1 - t0)
            apply_s.append(t2 - t1)
            advance_s.append(t4 - t3)
        for i, r in enumerate(rows):
            if not oks[i]:
                failures.append(f"{r[0].kind}: token {r[2]} rejected in batch step {step}")
            r[2] += 1
            if ends[i] or not oks[i]:
                if oks[i] and not lib.finished(r[1]):
                    failures.append(f"{r[0].kind}: not finished after the stop token")
                requests_done += 1
                rows[i] = next_row(r[0].kind)
        if len(failures) > 20:
            break
    step_s = [a + b + c for a, b, c in zip(fill_s, apply_s, advance_s, strict=True)]
    grammar_s = [a + c for a, c in zip(fill_s, advance_s, strict=True)]
    us = lambda v: round(1e6 * statistics.fmean(v), 1)  # noqa: E731
    return {
        "mean": us(step_s),
        "p95": round(1e6 * p95(step_s), 1),
        "grammar_mean": us(grammar_s),
        "grammar_p95": round(1e6 * p95(grammar_s), 1),
        "fill_mean": us(fill_s),
        "fill_p95": round(1e6 * p95(fill_s), 1),
        "apply_mean": us(apply_s),
        "advance_mean": us(advance_s),
        "steps": len(step_s),
        "requests_finished": requests_done,
    }, failures[:20]


_BYTE_ADD = torch.where(
    ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).bool(), 0.0, float("-inf")
)  # per mask byte: 0 for an allowed token, -inf for a banned one


def apply_eager(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """A plain eager-torch bitmask apply (the layout all three libraries share: bit j of
    int32 word w is token 32w + j): look each mask byte up, add 0 or -inf."""
    add = _BYTE_ADD[mask.view(torch.uint8).long()].view(mask.shape[0], -1)
    logits.add_(add[:, : logits.shape[1]])


def time_apply_eager(tok: Tok, reps: int) -> float:
    """Mean µs of :func:`apply_eager` on an (8, V) float32 batch: the library-independent
    reference for the apply part of a step."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.randint(
        -(2**31),
        2**31 - 1,
        (len(ROW_KINDS), (tok.vocab + 31) // 32),
        dtype=torch.int32,
        generator=gen,
    )
    base = torch.randn(len(ROW_KINDS), tok.vocab, generator=gen)
    logits = base.clone()
    times = []
    for i in range(reps + 5):
        logits.copy_(base)
        t0 = time.perf_counter()
        apply_eager(logits, mask)
        if i >= 5:
            times.append(time.perf_counter() - t0)
    token = 12345 % tok.vocab
    assert torch.isfinite(logits[0, token]) == bit(mask, 0, token)
    return round(1e6 * statistics.fmean(times), 1)


def run_library(lib: Library, tok: Tok, args: argparse.Namespace) -> dict[str, Any]:
    prep = []
    for _ in range(args.prep_repeats):
        t0 = time.perf_counter()
        lib.prepare(tok)
        prep.append(time.perf_counter() - t0)
    log(f"  {lib.name}/{tok.name}: prep {statistics.median(prep):.3f}s")
    out: dict[str, Any] = {
        "prep_s": round(statistics.median(prep), 4),
        "prep_s_all": [round(p, 4) for p in prep],
    }
    # (d) correctness first: canonical completions, rejection probes
    maker = RequestMaker(args.seed)
    failures: list[str] = []
    for kind in KINDS:
        for _ in range(args.check):
            failures += walk(lib, maker.make(kind, tok), None)
    walk_failed = bool(failures)
    probe_result: dict[str, Any] = {}
    for name, (req, valid) in probes(tok, args.seed).items():
        expected = oracle_reject_index(req, tok)
        assert (expected is None) == valid, (name, expected)
        got = walk(lib, req, expected)
        probe_result[name] = {"ok": not got, "reject_token": expected, "detail": got[:1]}
        if name != "non_ascii":
            failures += got
    out["probes"] = probe_result
    swept = sweep(lib, word_tokens(tok))
    out["word_sweep"] = swept
    failures += swept["errors"]
    failures += [
        f"classification: single-token label {w!r} masked out" for w in swept["masked_out"]
    ]
    log(
        f"  {lib.name}/{tok.name}: word sweep: {len(swept['masked_out'])} of {swept['labels']} "
        f"single-token labels masked out {swept['masked_out'][:10]} {swept['errors'][:1]}"
    )
    log(
        f"  {lib.name}/{tok.name}: correctness {'ok' if not failures else failures[:3]}; "
        f"probes {json.dumps({k: v['ok'] for k, v in probe_result.items()})}"
    )
    # warm-up of the apply kernel (llguidance and outlines-core torch.compile theirs)
    t0 = time.perf_counter()
    mask = lib.bitmask(len(ROW_KINDS))
    for _ in range(3):
        lib.apply(torch.zeros(len(ROW_KINDS), tok.vocab), mask)
    out["apply_warmup_s"] = round(time.perf_counter() - t0, 2)
    # (b) compile
    compile_out, compile_failures = measure_compile(
        lib, tok, RequestMaker(args.seed + 1), args.compiles
    )
    out.update(compile_out)
    failures += compile_failures
    log(
        f"  {lib.name}/{tok.name}: compile ms "
        + ", ".join(f"{k} {v['mean']:.2f}" for k, v in out["compile_ms"].items())
    )
    # (c) steps
    if walk_failed:  # canonical completions rejected: the step loop would time error states
        out["step_us"] = None
        log(f"  {lib.name}/{tok.name}: steps skipped (canonical completions rejected)")
    else:
        step_out, step_failures = measure_steps(
            lib, tok, RequestMaker(args.seed + 2), args.steps, args.warmup
        )
        out["step_us"] = step_out
        failures += step_failures
        log(
            f"  {lib.name}/{tok.name}: step us mean {step_out['mean']} p95 {step_out['p95']} "
            f"(fill {step_out['fill_mean']}, apply {step_out['apply_mean']}, advance "
            f"{step_out['advance_mean']})"
        )
    out["correct"] = not failures
    out["failures"] = failures[:10]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--libraries", nargs="+", default=list(ALL_LIBRARIES), choices=ALL_LIBRARIES
    )
    parser.add_argument(
        "--tokenizers", nargs="+", default=["demo", "qwen"], choices=["demo", "qwen"]
    )
    parser.add_argument("--qwen-dir", type=Path, default=Path("/tmp/qwen_tok"))
    parser.add_argument("--steps", type=int, default=200, help="timed batch steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batch steps first")
    parser.add_argument("--compiles", type=int, default=20, help="fresh compiles per kind")
    parser.add_argument("--check", type=int, default=3, help="extra requests walked per kind")
    parser.add_argument("--prep-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for var in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    toks = load_tokenizers(args.tokenizers, args.qwen_dir)
    result: dict[str, Any] = {
        "benchmark": "grammar_libraries",
        "threads": args.threads,
        "batch": len(ROW_KINDS),
        "row_kinds": list(ROW_KINDS),
        "steps": args.steps,
        "compiles_per_kind": args.compiles,
        "tokenizers": {
            t.name: {"tokens": len(t.hf), "logits_width": t.vocab, "stop_id": t.stop}
            for t in toks.values()
        },
        "apply_eager_torch_us": {
            t.name: time_apply_eager(t, max(args.steps, 50)) for t in toks.values()
        },
        "versions": {},
        "reuse": {},
        "results": {},
    }
    ok = True
    for name in args.libraries:
        try:
            lib = LIBRARIES[name](args.threads)
        except Exception as e:  # any import failure: not available
            log(f"SKIP {name}: not importable ({type(e).__name__}: {e})")
            result["versions"][name] = None
            result["results"][name] = None
            continue
        result["versions"][name] = lib.version()
        result["reuse"][name] = lib.reuse_note
        log(f"{name} {lib.version()}")
        per_tok: dict[str, Any] = {}
        for tok in toks.values():
            per_tok[tok.name] = run_library(lib, tok, args)
            ok &= per_tok[tok.name]["correct"]
        result["results"][name] = per_tok
    result["correctness_ok"] = ok
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
