"""Preference records in every accepted shape become one prompt and two replies with identical prompt tokens and
BOS/EOS once; every bad record stops with file:line and its reason, or is skipped and counted."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.align.prefs import PrefStats, encode_pair, hh_messages, load_pairs, to_conversation
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from tests.align.conftest import write_jsonl
from tests.tiny import CHATML

SHAPES = [
    {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
    {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
     "rejected": [{"role": "assistant", "content": "Go away."}]},
    {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
     "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}]},
    {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."},
]


@pytest.mark.parametrize("record", SHAPES, ids=["strings", "messages", "implicit-prompt", "anthropic-hh"])
def test_every_shape_is_the_same_conversation(record: dict) -> None:
    assert to_conversation(record) == ([{"role": "user", "content": "Hi?"}], "Hello.", "Go away.")


def test_hh_multi_turn_shares_its_history() -> None:
    history = "\n\nHuman: 你好\n\nAssistant: 你好！\n\nHuman: 北京在哪里？"
    record = {"chosen": history + "\n\nAssistant: 在中国北方。", "rejected": history + "\n\nAssistant: 不知道。"}
    messages, chosen, rejected = to_conversation(record)
    assert messages == hh_messages(history, "x") and len(messages) == 3
    assert (chosen, rejected) == ("在中国北方。", "不知道。")


def test_prompt_tokens_once_and_replies_end_with_the_turn_marker(tiny_tokenizer: Tokenizer) -> None:
    # A template that writes BOS itself, on a tokenizer that also adds BOS: it must still appear once.
    tok = Tokenizer(tiny_tokenizer.backend, "{{ bos_token }}" + CHATML, "<|endoftext|>",
                    ["<|im_end|>", "<|endoftext|>"], add_bos=True)
    record = {"prompt": "你好吗？", "chosen": "很好，谢谢。", "rejected": "不好。"}
    pair = encode_pair(tok, record, 512, None, PrefStats())
    bos, end = tok.bos_token_id, tok.eos_token_ids[0]
    assert pair.prompt.count(bos) == 1 and pair.prompt[0] == bos
    assert pair.chosen[-1] == end and pair.rejected[-1] == end and end not in pair.chosen[:-1]
    assert tok.decode(pair.prompt) == tok.render_chat([{"role": "user", "content": "你好吗？"}])
    assert tok.decode(pair.prompt + pair.chosen) == tok.render_chat(
        [{"role": "user", "content": "你好吗？"}, {"role": "assistant", "content": "很好，谢谢。"}],
        add_generation_prompt=False,
    ).rstrip()


BAD = [
    ({"prompt": "Hi?", "chosen": "Hello."}, "no 'rejected' field"),
    ({"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}, "chosen and rejected are identical"),
    ({"prompt": "Hi?", "chosen": "  ", "rejected": "No."}, "the chosen reply is empty"),
    ({"prompt": "long " * 200, "chosen": "Yes.", "rejected": "No."}, "leaves no room for a reply in --max-len 64"),
    ({"prompt": "Hi?", "chosen": ["a", "b"], "rejected": "No."}, "chosen must be a string or a list"),
    ({"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: C\n\nAssistant: D"},
     "must differ only in their last assistant turn"),
    ({"chosen": "no transcript", "rejected": "here"}, "is not a Human:/Assistant: transcript"),
]


@pytest.mark.parametrize(("record", "reason"), BAD, ids=[r for _, r in BAD])
def test_bad_records_stop_with_file_line_and_reason(tiny_tokenizer: Tokenizer, tmp_path: Path, record: dict,
                                                    reason: str) -> None:
    good = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
    path = write_jsonl(tmp_path / "prefs.jsonl", [good, record, good])
    with pytest.raises(LmforgeError, match=f"{path}:2: .*{reason}.*--bad-records skip"):
        load_pairs([path], tiny_tokenizer, 64)
    stats = PrefStats()
    pairs = load_pairs([path], tiny_tokenizer, 64, bad_records="skip", stats=stats)
    assert len(pairs) == 2 and stats.summary() == {"records": 3, "skipped": 1, "truncated": 0}
    assert stats.skipped[0].startswith(f"{path}:2: ")


def test_long_replies_are_cut_to_the_context_and_counted(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi?", "chosen": "word " * 100, "rejected": "No."}])
    stats = PrefStats()
    (pair,) = load_pairs([path], tiny_tokenizer, 64, stats=stats)
    assert len(pair.prompt) + len(pair.chosen) == 64 and stats.truncated == 1


def test_margin_column_must_be_a_number(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    rows = [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "No.", "gap": 1.5},
            {"prompt": "Hi?", "chosen": "Hello.", "rejected": "No.", "gap": "big"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(LmforgeError, match=r":2: the margin column 'gap' must hold a number"):
        load_pairs([path], tiny_tokenizer, 64, margin_column="gap")
    assert load_pairs([path], tiny_tokenizer, 64, "skip", "gap")[0].margin == 1.5
