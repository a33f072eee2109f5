"""The trained tokenizer: round-trips any Unicode, compresses Chinese, and loads in transformers identically."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge import tokenizer_train
from lmforge.data.synth import story
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from tests.data.conftest import write_jsonl


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    write_jsonl(root / "corpus.jsonl", [{"text": story(rng, lang)} for lang in ["en", "zh"] * 300])
    tokenizer_train.main(tokenizer_train.TokenizerTrainConfig(data=[str(root / "corpus.jsonl")], out=str(root / "t"),
                                                              vocab_size=1024))
    return root / "t"


@pytest.fixture(scope="module")
def tok(trained: Path) -> Tokenizer:
    return Tokenizer.load(trained)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_round_trips_arbitrary_unicode(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_compresses_chinese_better_than_bytes(tok: Tokenizer) -> None:
    report = tokenizer_train.compression_report(tok)["lmforge (this)"]
    assert report["zh"] > 1.3 and report["en"] > 1.3  # bytes per token on held-out text, not the training text


def test_special_tokens_and_chat_template(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>user\n你好<|im_end|>")
    assert ids[0] == tok.backend.token_to_id("<|im_start|>") and tok.backend.token_to_id("<|im_end|>") in ids
    rendered = tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")


def test_transformers_loads_it_with_the_same_ids(trained: Path, tok: Tokenizer) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(trained))
    text = "Hello 世界! GPT模型 is 123 tokens, 还有繁體字 and émoji 😀.\n<|im_start|>user"
    assert hf(text)["input_ids"] == tok.encode(text)
    assert hf.eos_token == "<|endoftext|>"


def test_pretokenizer_separates_han_from_latin_and_digits() -> None:
    pieces = [p for p, _ in tokenizer_train.build_backend().pre_tokenizer.pre_tokenize_str("GPT模型有123个")]
    assert len(pieces) == 6  # 'GPT', '模型有', '1', '2', '3', '个': digits one by one, Han apart from Latin
    assert pieces[0] == "GPT" and pieces[2:5] == ["1", "2", "3"]


def test_vocab_too_small_is_refused(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    with pytest.raises(LmforgeError, match="vocab-size"):
        tokenizer_train.train(tokenizer_train.TokenizerTrainConfig(data=[str(tmp_path)], out="x", vocab_size=100))
