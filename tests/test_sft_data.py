"""SFT data: the three formats, loss masks under different chat templates, bad and over-long records, batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.train import sft_data
from lmforge.train.loop import IGNORE

# SmolLM2-Instruct's template (a default system prompt when none is given) and a Llama-2-style one (no
# generation prompt, BOS/EOS as text): the mask must follow whatever layout the template chooses.
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
INST_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|endoftext|>[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + ' <|im_end|>' }}"
    "{% else %}{{ '<<SYS>>' + m['content'] + '<</SYS>>' }}{% endif %}{% endfor %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "你好，今天怎么样？"},
    {"role": "assistant", "content": "我很好，谢谢。"},
]
RECORDS = {
    "openai": {"messages": CONVERSATION},
    "sharegpt": {
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "Hello, how are you?"},
            {"from": "gpt", "value": "I am fine, thank you."},
            {"from": "human", "value": "你好，今天怎么样？"},
            {"from": "gpt", "value": "我很好，谢谢。"},
        ],
    },
    "alpaca": {
        "system": "Be brief.",
        "history": [["Hello, how are you?", "I am fine, thank you."]],
        "instruction": "你好，今天怎么样？",
        "output": "我很好，谢谢。",
    },
}


def with_template(tok: Tokenizer, template: str | None) -> Tokenizer:
    return Tokenizer(tok.backend, template, tok.bos_token, tok.eos_tokens, tok.add_bos)


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_formats_give_the_same_conversation(fmt: str) -> None:
    assert sft_data.to_messages(RECORDS[fmt]) == CONVERSATION


@pytest.mark.parametrize("template", [None, SMOL_TEMPLATE, INST_TEMPLATE], ids=["chatml", "smollm2", "inst"])
def test_loss_mask_covers_exactly_the_assistant_turns(tiny_tokenizer: Tokenizer, template: str | None) -> None:
    tok = with_template(tiny_tokenizer, template)
    example = sft_data.encode_chat(tok, CONVERSATION)
    text = tok.render_chat(CONVERSATION, add_generation_prompt=False)
    assert tok.decode(example.ids) == text  # the ids are the whole rendered conversation
    learned = tok.decode([i for i, keep in zip(example.ids, example.labels, strict=True) if keep])
    if template == INST_TEMPLATE:  # the reply's leading space belongs to the assistant's turn in this layout
        assert learned == " I am fine, thank you. <|im_end|> 我很好，谢谢。 <|im_end|>"
    else:
        assert learned == "I am fine, thank you.<|im_end|>我很好，谢谢。<|im_end|>"
    # Every labelled token lies inside an assistant turn: nothing of the user, system or template leaks in.
    for prompt in ("Hello", "你好", "Be brief", "system", "user"):
        assert prompt not in learned


def test_collate_shifts_targets_and_pads_with_ignore(tiny_tokenizer: Tokenizer) -> None:
    a = sft_data.encode_chat(tiny_tokenizer, CONVERSATION[1:3])
    b = sft_data.encode_chat(tiny_tokenizer, CONVERSATION)
    batch = sft_data.collate([a, b], pad_id=0)
    assert batch["input_ids"].shape == batch["targets"].shape == (2, len(b.ids) - 1)
    row = batch["targets"][0].tolist()
    expected = [t if keep else IGNORE for t, keep in zip(a.ids[1:], a.labels[1:], strict=True)]
    assert row == expected + [IGNORE] * (len(b.ids) - len(a.ids))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))
    return path


def load(tok: Tokenizer, paths: list[Path], **kw: object) -> tuple[list[sft_data.Example], sft_data.DataStats]:
    stats = sft_data.DataStats()
    args = {"max_len": 512, "overlong": "truncate", "bad_records": "stop", "identity": {}} | kw
    return sft_data.load_examples(paths, tok, stats=stats, **args), stats


def test_bad_records_are_reported_by_file_and_line(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS["alpaca"], {"instruction": "no output"}, "{oops", {"x": 1}])
    with pytest.raises(LmforgeError, match=r"d\.jsonl:2: Alpaca record without output.*--bad-records skip"):
        load(tiny_tokenizer, [path])
    examples, stats = load(tiny_tokenizer, [path], bad_records="skip")
    assert len(examples) == 1
    assert [s.split(": ", 1)[0].rsplit(":", 1)[1] for s in stats.skipped] == ["2", "3", "4"]
    assert "unknown record format (keys: x)" in stats.skipped[2]


def test_json_array_records_know_their_lines(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "hi", "output": "hello"},\n\n  {"messages": []}\n]\n')
    with pytest.raises(LmforgeError, match=r"d\.json:4: no assistant reply"):
        load(tiny_tokenizer, [path])
    with pytest.raises(LmforgeError, match="unknown data format '.csv'"):
        load(tiny_tokenizer, [write_jsonl(tmp_path / "d.csv", [])])


def test_overlong_examples_are_truncated_or_dropped_and_counted(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    long = {"instruction": "hi", "output": "word " * 200}
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "hi", "output": "hello"}, long])
    examples, stats = load(tiny_tokenizer, [path], max_len=64)
    assert (stats.truncated, stats.dropped, max(len(e.ids) for e in examples)) == (1, 0, 64)
    examples, stats = load(tiny_tokenizer, [path], max_len=64, overlong="drop")
    assert (stats.truncated, stats.dropped, len(examples)) == (0, 1, 1)


def test_builtin_sets_fill_the_identity(tiny_tokenizer: Tokenizer) -> None:
    paths = [sft_data.resolve_data("builtin:self-cognition"), sft_data.resolve_data("builtin:instructions")]
    examples, stats = load(tiny_tokenizer, paths, identity={"NAME": "Zed", "AUTHOR": "Acme"})
    assert stats.records == len(examples) >= 60 and not stats.skipped
    texts = [tiny_tokenizer.decode(e.ids) for e in examples]
    assert not any("{{" in t for t in texts)
    assert any("我是Zed" in t for t in texts) and any("I am Zed" in t and "Acme" in t for t in texts)


def test_step_batches_depend_only_on_the_step(tiny_tokenizer: Tokenizer) -> None:
    examples = [sft_data.Example([1, 2, 3 + i], [False, True, True]) for i in range(10)]
    forward = sft_data.StepBatches(examples, 3, 2, 5, lambda ex: sft_data.collate(ex, 0))
    backward = sft_data.StepBatches(examples, 3, 2, 5, lambda ex: sft_data.collate(ex, 0))
    seen = {s: forward(s) for s in range(6)}
    for s in reversed(range(6)):
        assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(seen[s], backward(s), strict=True))
    first_epoch = [int(x) for s in (0, 1) for mb in seen[s] for x in mb["targets"][:, 1]][:10]
    assert sorted(first_epoch) == [3 + i for i in range(10)]  # each example once per epoch


def test_packing_and_mixing_keep_the_labels() -> None:
    a = sft_data.Example([1, 2, 3], [False, True, True])
    b = sft_data.Example([4, 5], [False, True])
    [row] = sft_data.pack([a, b], max_len=8)
    assert (row.ids, row.labels) == ([1, 2, 3, 4, 5], [False, True, True, False, True])
    assert len(sft_data.pack([a, b], max_len=4)) == 2
    general = [sft_data.Example([7, 8], [True, True])]
    assert len(sft_data.mix([a] * 6, general, ratio=0.25, seed=0)) == 8  # 2 of 8 are general text
