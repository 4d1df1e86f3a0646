"""Grammar-constrained decoding: every completion is one its task's parser accepts.

Each request gets a matcher for :func:`~smartpath.model.answer_regex.completion_regex` of its
task, labels and options; at every decoding step the matcher says which tokens may come next,
the others' logits become -inf, and the sampled token advances it. When the answer block is
closed the only token left is the stop token (``<|im_end|>``).

Design decisions:
- llguidance, chosen by ``bench/grammar_libraries.py`` on our tokenizers and batch shapes:
  a grammar compiles in ~1 ms whatever the vocabulary (labels differ per request, so compile
  cost is paid per request; outlines-core took 0.2–1.3 s on a 151k vocabulary), masks for a
  batch of 8 take ~0.5 ms, and it is one wheel with no dependencies. xgrammar steps faster
  but version 0.2.9 left valid tokens out of some masks on our demo tokenizer.
- The vocabulary is given to llguidance as each token id's bytes (:class:`TokenTable`), not
  through its Hugging Face loader, which marks every added token special: a tokenizer with
  its grammar tags as added tokens (the demo model's) would then never match ``<think>``.
- llguidance's "slices" get our free-text class (``FREE_TEXT_SLICES``) beside its defaults.
- Masks are bit-packed on the CPU (llguidance fills them in parallel, off the GIL) and applied
  with numpy's ``unpackbits`` and one ``masked_fill``, so no compiled kernel is needed; rows
  without a grammar are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import llguidance
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from smartpath.model.answer_regex import MAX_TEXT_CHARS, completion_regex

logger = logging.getLogger(__name__)

# Token sets llguidance precomputes, so a mask inside the think block or an open answer (any
# text without "<": most of the vocabulary) is one set union, not a walk of every token:
# 0.54 ms instead of 11.5 ms a step for 16 such rows over Qwen's 151k vocabulary.
FREE_TEXT_SLICES = ["[^<]{1,16}", "[^<]+"]


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (used by Qwen's and our own BPE): character -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class TokenTable:
    """What ``llguidance.TokenizerWrapper`` reads: every id's bytes (``vocab_size`` of them,
    padding rows of the LM head included), which ids are control tokens, the stop token, and
    a tokenizer call."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_id: int
    ) -> None:
        if vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {vocab_size} < the tokenizer's {len(tokenizer)} ids")
        decoder = byte_decoder()
        added = tokenizer.added_tokens_decoder
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i in added:
                self.tokens.append(added[i].content.encode())
                if added[i].special:
                    self.special_token_ids.append(i)
            elif all(c in decoder for c in piece):
                self.tokens.append(bytes(decoder[c] for c in piece))
            else:
                raise ValueError(f"token {i} ({piece!r}) is not byte-level BPE")
        for i in range(len(pieces), vocab_size):  # rows the LM head has beyond the tokenizer
            self.tokens.append(f"<|unused_{i}|>".encode())
            self.special_token_ids.append(i)
        self.eos_token_id = stop_token_id
        self.bos_token_id = None
        self._tokenizer = tokenizer

    def __call__(self, data: bytes) -> list[int]:
        text = data.decode("utf-8", "replace")
        return self._tokenizer.encode(text, add_special_tokens=False)


def text_chars_for(max_new_tokens: int) -> int:
    """Free-text bound for a completion of at most ``max_new_tokens`` tokens: a third each
    for the think block and an open answer (a token is at least one character), so the
    grammar's tags and answer still fit, up to ``MAX_TEXT_CHARS``."""
    return max(1, min(MAX_TEXT_CHARS, max_new_tokens // 3))


@dataclass(frozen=True)
class Constraint:
    """What one request's completion must match; ``None`` fields as for
    :func:`~smartpath.model.answer_regex.completion_regex`."""

    task: int
    labels: tuple[str, ...] | None = None
    options: tuple[str, ...] | None = None
    max_text_chars: int = MAX_TEXT_CHARS

    @property
    def pattern(self) -> str:
        return completion_regex(self.task, self.labels, self.options, self.max_text_chars)


class GrammarTokenizer:
    """A tokenizer (with its model's vocabulary size and stop token) prepared for matchers:
    build once per model (~0.2 s for a 151k vocabulary), then :meth:`matcher` per request."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_id: int
    ) -> None:
        self.vocab_size = vocab_size
        self.stop_token_id = stop_token_id
        self._source = tokenizer
        table = TokenTable(tokenizer, vocab_size, stop_token_id)
        self._tokenizer = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(table),
            slices=llguidance.LLTokenizer.general_slices() + FREE_TEXT_SLICES,
        )
        self.executor = llguidance.LLExecutor()  # the mask threads, shared by every batch

    def __getstate__(self) -> dict:
        # llguidance's tokenizer does not pickle: copies (a model's deepcopy, Ray) rebuild it.
        return {"tokenizer": self._source, "vocab": self.vocab_size, "stop": self.stop_token_id}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tokenizer"], state["vocab"], state["stop"])

    def matcher(self, constraint: Constraint) -> llguidance.LLMatcher:
        """A fresh matcher at the start of a completion for ``constraint``."""
        grammar = llguidance.LLMatcher.grammar_from_regex(constraint.pattern)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"cannot constrain {constraint}: {matcher.get_error()}")
        return matcher

    def batch(self, constraints: Sequence[Constraint | None]) -> GrammarBatch:
        """Fresh matchers for a batch's constraints (None: that request is unconstrained)."""
        matchers = [None if c is None else self.matcher(c) for c in constraints]
        return GrammarBatch(matchers, self.vocab_size, self.executor)


class GrammarBatch:
    """The matchers of a decoding batch (None: that request is unconstrained): masks logits
    before sampling and follows the sampled tokens."""

    def __init__(
        self,
        matchers: Sequence[llguidance.LLMatcher | None],
        vocab_size: int,
        executor: llguidance.LLExecutor,
    ) -> None:
        self.matchers = list(matchers)
        self.vocab_size = vocab_size
        self._executor = executor

    def __bool__(self) -> bool:
        return any(m is not None for m in self.matchers)

    def mask_(self, logits: torch.Tensor) -> torch.Tensor:
        """Set to -inf, in place, the logits (B, V) of tokens each row's grammar forbids now."""
        rows = [(m, i) for i, m in enumerate(self.matchers) if m is not None]
        if not rows:
            return logits
        words = (self.vocab_size + 31) // 32
        bits = np.full((len(self.matchers), words), -1, dtype=np.int32)
        self._executor.unsafe_compute_mask_ptr(rows, bits.ctypes.data, words * 4, len(bits))
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")
        allowed = allowed[:, : logits.shape[-1]].astype(bool)
        for i in np.flatnonzero(~allowed.any(axis=1)):  # a matcher in error allows nothing
            logger.warning("grammar allows no token: %s", self.matchers[i].get_error())
            self.matchers[i] = None
            allowed[i] = True
        allowed = torch.from_numpy(allowed)
        return logits.masked_fill_(~allowed.to(logits.device, non_blocking=True), float("-inf"))

    def advance(self, tokens: Sequence[int]) -> None:
        """Consume each row's sampled token. A token the grammar refuses (only possible for a
        row whose mask was not applied) leaves that row unconstrained from here on."""
        for i, (matcher, token) in enumerate(zip(self.matchers, tokens, strict=True)):
            if matcher is not None and not matcher.consume_token(token):
                logger.warning("grammar refused token %d: %s", token, matcher.get_error())
                self.matchers[i] = None

    def select(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order), as the batch drops finished requests."""
        self.matchers = [self.matchers[i] for i in rows]
