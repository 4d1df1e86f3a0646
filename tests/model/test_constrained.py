"""Grammar-constrained decoding: the answer patterns, llguidance's masks over our tokenizers
(the demo model's and a Qwen2.5-VL-shaped one), and generation that always parses."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from smartpath.core.config.model import ModelConfig
from smartpath.model.answer_regex import completion_regex
from smartpath.model.base import base_from_config
from smartpath.model.checkpoint import DEMO_MODEL_DIR, TOKENIZER_DIR
from smartpath.model.constrained import Constraint, GrammarTokenizer
from smartpath.model.generation import generate
from smartpath.model.grammar import (
    Detection,
    DetectionAnswer,
    LabelAnswer,
    Polygon,
    SegmentationAnswer,
    Task,
    TextAnswer,
    Unparseable,
    format_answer,
    format_completion,
    parse_answer,
)
from smartpath.model.tokenizer import IM_END, load_tokenizer

LABELS = ("tumour", "stroma (dense)", "necrosis", "Ki-67+ cell", "µm-scale")
OPTIONS = ("yes", "no", "cannot tell")
SEGMENTATION = Constraint(Task.SEGMENTATION, LABELS)

# One canonical completion per kind of request: (constraint, answer text).
CASES = {
    "classification": (
        Constraint(Task.CLASSIFICATION, LABELS), format_answer(LabelAnswer("stroma (dense)"))
    ),
    "closed-vqa": (Constraint(Task.VQA, options=OPTIONS), "cannot tell"),
    "open-vqa": (Constraint(Task.VQA), "Glands with crowded nuclei, 2 mitoses."),
    "detection": (
        Constraint(Task.DETECTION, LABELS),
        format_answer(DetectionAnswer([
            Detection("Ki-67+ cell", (0, 17, 999, 1000)), Detection("tumour", (5, 5, 60, 70))
        ])),
    ),
    "segmentation": (
        Constraint(Task.SEGMENTATION, LABELS),
        format_answer(SegmentationAnswer([Polygon("µm-scale", ((0, 0), (1000, 0), (500, 866)))])),
    ),
    "no-objects": (Constraint(Task.DETECTION, LABELS), "[]"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(CASES))
def test_canonical_completions_match_their_pattern_and_parse(kind: str) -> None:
    constraint, answer = CASES[kind]
    text = format_completion("Looking at the nuclei.", answer)
    assert re.fullmatch(constraint.pattern, text), text
    parsed = parse_answer(constraint.task, text, constraint.labels, options=constraint.options)
    assert not isinstance(parsed, Unparseable), parsed


@pytest.mark.parametrize(
    ("constraint", "answer"),
    [
        (Constraint(Task.CLASSIFICATION, LABELS), "stroma"),  # not a label
        (Constraint(Task.CLASSIFICATION, LABELS), "stroma (dense"),  # a metacharacter escaped
        (Constraint(Task.VQA, options=OPTIONS), "maybe"),
        (Constraint(Task.VQA), ""),  # open VQA needs text
        (Constraint(Task.DETECTION, LABELS), '[{"label": "tumour", "box": [1, 2, 3, 1001]}]'),
        (Constraint(Task.DETECTION, LABELS), '[{"label": "tumour", "box": [1, 2, 3]}]'),
        (Constraint(Task.DETECTION, LABELS), '[{"label": "gland", "box": [1, 2, 3, 4]}]'),
        (Constraint(Task.DETECTION, LABELS), '[{"label": "tumour", "box": [1, 2, 3, 4.5]}]'),
        (SEGMENTATION, '[{"label": "tumour", "polygon": [[1, 2], [3, 4]]}]'),  # 2 points
    ],
)  # fmt: skip
def test_patterns_refuse_what_the_parsers_would(constraint: Constraint, answer: str) -> None:
    assert not re.fullmatch(constraint.pattern, format_completion("", answer))


def test_free_text_is_bounded() -> None:
    pattern = completion_regex(Task.VQA, max_text_chars=5)
    assert re.fullmatch(pattern, "<think>abcde</think><answer>x</answer>")
    assert re.fullmatch(pattern, "<think></think><answer>vwxyz</answer>")
    assert not re.fullmatch(pattern, "<think>abcdef</think><answer>x</answer>")
    assert not re.fullmatch(pattern, "<think></think><answer>uvwxyz</answer>")
    assert not re.fullmatch(pattern, "<think>a<b</think><answer>x</answer>")


@pytest.fixture(scope="module")
def tokenizers(qwen_tokenizer_dir) -> dict[str, tuple[object, GrammarTokenizer]]:
    """The demo model's tokenizer (grammar tags are added tokens) and a Qwen-shaped one
    (151,665 ids; tags are plain text), each with its model's LM-head width."""
    demo = load_tokenizer(DEMO_MODEL_DIR / TOKENIZER_DIR)
    demo_vocab = json.loads((DEMO_MODEL_DIR / "manifest.json").read_text())
    qwen = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir))
    out = {}
    for name, tok, vocab in (
        ("demo", demo, demo_vocab["model"]["text"]["vocab_size"]),
        ("qwen", qwen, 151_936),
    ):
        out[name] = (tok, GrammarTokenizer(tok, vocab, tok.convert_tokens_to_ids(IM_END)))
    return out


def _walk(tok, grammar: GrammarTokenizer, constraint: Constraint, text: str) -> list[int]:
    """Teacher-force ``text`` and the stop token; the allowed-token count at every step."""
    ids = [*tok.encode(text, add_special_tokens=False), grammar.stop_token_id]
    batch = grammar.batch([constraint])
    counts = []
    for i, token in enumerate(ids):
        logits = torch.zeros(1, grammar.vocab_size)
        batch.mask_(logits)
        allowed = torch.isfinite(logits[0])
        assert allowed[token], (i, tok.decode([token]), text)
        stop_allowed = bool(allowed[grammar.stop_token_id])
        assert stop_allowed == (i == len(ids) - 1), (i, tok.decode([token]))
        counts.append(int(allowed.sum()))
        batch.advance([token])
        assert batch.matchers[0] is not None  # never refused
    assert batch.matchers[0].is_stopped()
    return counts


@pytest.mark.parametrize("name", ["demo", "qwen"])
@pytest.mark.parametrize("kind", sorted(CASES))
def test_masks_allow_every_canonical_token_and_stop_only_at_the_end(tokenizers, name, kind) -> None:
    tok, grammar = tokenizers[name]
    constraint, answer = CASES[kind]
    counts = _walk(tok, grammar, constraint, format_completion("", answer))
    assert counts[-1] == 1  # after </answer>: only the stop token


@pytest.mark.parametrize("name", ["demo", "qwen"])
def test_masks_refuse_a_label_outside_the_list(tokenizers, name) -> None:
    tok, grammar = tokenizers[name]
    constraint = Constraint(Task.CLASSIFICATION, ("tumour", "stroma"))
    batch = grammar.batch([constraint])
    for token in tok.encode("<think></think><answer>", add_special_tokens=False):
        batch.advance([token])
    logits = torch.zeros(1, grammar.vocab_size)
    batch.mask_(logits)
    allowed = {tok.decode([int(i)]) for i in torch.isfinite(logits[0]).nonzero().flatten()}
    # Only tokens that begin one of the two labels: none that begins "necrosis".
    assert allowed and all("tumour".startswith(a) or "stroma".startswith(a) for a in allowed)


def test_unconstrained_rows_and_row_selection() -> None:
    tok = load_tokenizer(DEMO_MODEL_DIR / TOKENIZER_DIR)
    grammar = GrammarTokenizer(tok, 1024, tok.convert_tokens_to_ids(IM_END))
    constraint = Constraint(Task.CLASSIFICATION, ("tumour", "stroma"))
    batch = grammar.batch([None, constraint])
    logits = torch.randn(2, 1024)
    before = logits.clone()
    batch.mask_(logits)
    assert torch.equal(logits[0], before[0])  # the free row is untouched
    assert int(torch.isfinite(logits[1]).sum()) < 10
    batch.select([1])
    logits = torch.randn(1, 1024)
    batch.mask_(logits)
    assert int(torch.isfinite(logits[0]).sum()) < 10  # the constrained row kept its matcher


def test_a_random_model_answers_every_task_within_its_grammar() -> None:
    """An untrained model's free text never parses; decoded within each grammar it always
    does, greedy or sampled, in one batch with mixed grammars."""
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny")
    base, tok = base_from_config(cfg)
    base.eval()
    stop = tok.convert_tokens_to_ids(IM_END)
    grammar = GrammarTokenizer(tok, base.get_output_embeddings().weight.shape[0], stop)
    constraints = [
        Constraint(c.task, c.labels, c.options, max_text_chars=12) for c, _ in CASES.values()
    ]
    prompts = [
        tok.encode(f"Question {i}:", add_special_tokens=False) for i in range(len(constraints))
    ]
    for temperature in (0.0, 1.0):
        batch = grammar.batch(constraints)
        outputs = generate(
            base, prompts, max_new_tokens=160, temperature=temperature, seed=3,
            eos_token_id=stop, grammar=batch,
        )  # fmt: skip
        for constraint, ids in zip(constraints, outputs, strict=True):
            assert ids[-1] == stop, tok.decode(ids)
            text = tok.decode(ids[:-1], skip_special_tokens=False)
            answer = parse_answer(
                constraint.task, text, constraint.labels, options=constraint.options
            )
            assert not isinstance(answer, Unparseable), (text, answer)
            if constraint.task == Task.VQA and constraint.options is None:
                assert isinstance(answer, TextAnswer)
    free = generate(base, prompts, max_new_tokens=60, eos_token_id=stop)
    texts = [tok.decode(ids, skip_special_tokens=False) for ids in free]
    assert not any("<answer>" in t and "</answer>" in t for t in texts), (
        texts
    )  # unconstrained, the random model never even closes an answer block


def test_grammar_tokenizer_survives_copies() -> None:
    """Models are deep-copied (GRPO's reference) and pickled (Ray): the grammar comes along."""
    import copy
    import pickle

    tok = load_tokenizer(DEMO_MODEL_DIR / TOKENIZER_DIR)
    grammar = GrammarTokenizer(tok, 1024, tok.convert_tokens_to_ids(IM_END))
    constraint = Constraint(Task.CLASSIFICATION, ("tumour", "stroma"))
    for clone in (copy.deepcopy(grammar), pickle.loads(pickle.dumps(grammar))):
        assert (clone.vocab_size, clone.stop_token_id) == (1024, grammar.stop_token_id)
        counts = _walk(tok, clone, constraint, format_completion("", "stroma"))
        assert counts == _walk(tok, grammar, constraint, format_completion("", "stroma"))


def test_free_text_bound_follows_the_token_budget() -> None:
    from smartpath.model.constrained import text_chars_for

    assert [text_chars_for(n) for n in (1, 96, 256, 100_000)] == [1, 32, 85, 1024]
