"""The project-trained byte-level BPE: control tokens stay single ids, text round-trips, training
is deterministic, the chat template has Qwen2.5-VL's structure, and save/load keeps it all."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from smartpath.model.tokenizer import (
    ANSWER_END,
    ANSWER_START,
    CHAT_TEMPLATE,
    GRAMMAR_TOKENS,
    IMAGE_PAD,
    SLIDE_PAD,
    SPECIAL_TOKENS,
    THINK_END,
    THINK_START,
    builtin_corpus,
    load_tokenizer,
    prepare_tokenizer,
    render_chat,
    token_ids,
    train_builtin_tokenizer,
    train_tokenizer,
)

ALL_CONTROL = SPECIAL_TOKENS + GRAMMAR_TOKENS
SAMPLES = [
    "Detect all mitotic figures in the image and give their boxes.",
    '<think>dense nuclei</think><answer>[{"label": "tumor", "box": [12, 40, 300, 1000]}]</answer>',
    "naïve café — 日本語 ✓ emoji 🙂 tabs\tand\nnewlines\r\n  double  spaces ",
    "unseen words: xylophone zebra quokka 123456789",
    "",
]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return train_builtin_tokenizer(1024)


@pytest.mark.parametrize("token", ALL_CONTROL)
def test_control_tokens_are_single_ids_alone_and_inside_text(
    tok: PreTrainedTokenizerFast, token: str
) -> None:
    (tid,) = tok.encode(token, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(tid) == token
    ids = tok.encode(f"abc{token}def 12", add_special_tokens=False)
    assert ids.count(tid) == 1
    assert tok.convert_ids_to_tokens(ids).count(token) == 1


def test_control_tokens_have_distinct_ids(tok: PreTrainedTokenizerFast) -> None:
    ids = token_ids(tok, ALL_CONTROL)
    assert len(set(ids.values())) == len(ALL_CONTROL)
    assert all(0 <= i < len(tok) for i in ids.values())


@pytest.mark.parametrize("text", SAMPLES)
def test_text_round_trips(tok: PreTrainedTokenizerFast, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_digits_are_split_one_by_one(tok: PreTrainedTokenizerFast) -> None:
    assert tok.tokenize("1000") == ["1", "0", "0", "0"]


def test_skip_special_drops_control_but_keeps_grammar(tok: PreTrainedTokenizerFast) -> None:
    text = f"<|im_start|>assistant\n{THINK_START}x{THINK_END}{ANSWER_START}y{ANSWER_END}<|im_end|>"
    decoded = tok.decode(tok.encode(text), skip_special_tokens=True)
    assert decoded == f"assistant\n{THINK_START}x{THINK_END}{ANSWER_START}y{ANSWER_END}"


def test_eos_pad_and_specials(tok: PreTrainedTokenizerFast) -> None:
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    assert not set(GRAMMAR_TOKENS) & set(tok.all_special_tokens)


def test_training_is_deterministic_and_bounded() -> None:
    a = train_builtin_tokenizer(1024)
    b = train_builtin_tokenizer(1024)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert 300 < len(a) <= 1024
    small = train_tokenizer(builtin_corpus(200), 400)
    assert len(small) == 400


def test_vocab_size_below_the_floor_is_refused() -> None:
    with pytest.raises(ValueError, match="vocab_size must exceed"):
        train_tokenizer(["abc"], 200)


def test_builtin_corpus_is_deterministic_and_covers_numbers() -> None:
    corpus = builtin_corpus(50)
    assert corpus == builtin_corpus(50)
    assert corpus != builtin_corpus(50, seed=1)
    assert {"0", "500", "1000"} <= set(corpus)
    assert any(ANSWER_START in line for line in corpus)


def test_chat_template_matches_qwen25vl_structure(tok: PreTrainedTokenizerFast) -> None:
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}],
        },
        {"role": "assistant", "content": f"{ANSWER_START}tumor{ANSWER_END}"},
        {"role": "user", "content": [{"type": "slide"}, {"type": "text", "text": "Grade?"}]},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n"
        f"<|im_start|>assistant\n{ANSWER_START}tumor{ANSWER_END}<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|slide_pad|><|vision_end|>Grade?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_chat(tok, messages) == expected
    with_system = [{"role": "system", "content": "Be brief."}, messages[0]]
    rendered = render_chat(tok, with_system, add_generation_prompt=False)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert not rendered.endswith("<|im_start|>assistant\n")
    ids = tok.encode(render_chat(tok, messages), add_special_tokens=False)
    assert ids.count(tok.convert_tokens_to_ids(IMAGE_PAD)) == 1
    assert ids.count(tok.convert_tokens_to_ids(SLIDE_PAD)) == 1


def test_save_and_load_keeps_everything(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tok.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(tmp_path)
    for text in [*SAMPLES, *ALL_CONTROL]:
        assert loaded.encode(text, add_special_tokens=False) == tok.encode(
            text, add_special_tokens=False
        )
    assert loaded.chat_template == CHAT_TEMPLATE
    assert len(loaded) == len(tok)
    assert loaded.eos_token_id == tok.eos_token_id
    assert loaded.pad_token_id == tok.pad_token_id


def test_load_tokenizer_needs_tokenizer_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_prepare_tokenizer_adds_only_the_slide_pad_once() -> None:
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_tokens(list(pre_tokenizers.ByteLevel.alphabet()))
    foreign = PreTrainedTokenizerFast(tokenizer_object=raw)
    with pytest.raises(ValueError, match=r"not a Qwen2\.5-VL tokenizer prepared for SmartPath"):
        token_ids(foreign, [SLIDE_PAD])
    before = len(foreign)
    assert prepare_tokenizer(foreign) is True
    assert len(foreign) == before + 1
    assert token_ids(foreign, [SLIDE_PAD])[SLIDE_PAD] == before
    assert prepare_tokenizer(foreign) is False and len(foreign) == before + 1
    assert SLIDE_PAD in foreign.all_special_tokens
    # The grammar tags stay plain text: several ids, kept by decode(skip_special_tokens=True).
    ids = foreign.encode(f"{THINK_START}x{ANSWER_END}", add_special_tokens=False)
    assert len(ids) > 2
    assert foreign.decode(ids, skip_special_tokens=True) == f"{THINK_START}x{ANSWER_END}"
