"""Incremental detokenization: streamed pieces add up to the full decode, for both tokenizer styles."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.detokenizer import IncrementalDetokenizer
from models.synthetic import build_tokenizer

TEXTS = [
    "Grüße aus München, naïve café 🙂🚀 and 日本語のテキスト",
    "  leading spaces and\nnew lines\tand tabs ",
    "def add(a, b):\n    return a + b\n",
]


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    d: Path = tmp_path_factory.mktemp(request.param)
    build_tokenizer(d, vocab_size=400, style=request.param)
    return AutoTokenizer.from_pretrained(str(d))


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_equal_full_decode(tokenizer, text: str) -> None:
    prompt = tokenizer.encode("Prompt:")
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt, stop=(), include_stop=False)
    pieces = []
    for i in ids:
        detok.add(i)
        pieces.append(detok.take(final=False))
        assert "\ufffd" not in pieces[-1]  # never emit half a UTF-8 character
    detok.finish()
    pieces.append(detok.take(final=True))
    expected = tokenizer.decode(prompt + ids, skip_special_tokens=True)[len(tokenizer.decode(prompt, skip_special_tokens=True)):]
    assert "".join(pieces) == expected


def test_multibyte_characters_are_split_across_tokens(tokenizer) -> None:
    # the emoji is not in the tiny vocab: byte tokens carry it, so some tokens end mid-character
    ids = tokenizer.encode("🦀", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("x"), stop=(), include_stop=False)
    emitted = []
    for i in ids:
        detok.add(i)
        emitted.append(detok.take(final=False))
    assert all("\ufffd" not in piece for piece in emitted)
    assert "".join(emitted).strip() == "🦀" and emitted[-1].endswith("🦀")
    assert "" in emitted[:-1]  # the incomplete bytes were held back, not emitted as U+FFFD


def test_stop_string_held_back_then_cut(tokenizer) -> None:
    ids = tokenizer.encode("alpha beta STOP gamma", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("x"), stop=("STOP",), include_stop=False)
    streamed = ""
    for i in ids:
        detok.add(i)
        streamed += detok.take(final=False)
        if detok.stopped_by:
            break
    detok.finish()
    streamed += detok.take(final=True)
    assert detok.stopped_by == "STOP"
    assert streamed == detok.text
    assert streamed.rstrip() == "alpha beta".strip() or streamed.strip() == "alpha beta"
    assert "ST" not in streamed
