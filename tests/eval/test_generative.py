"""Generative tasks: answer extraction on real-looking outputs, voting, prompts, and the GSM8K layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.engine import Engine
from lmforge.errors import LmforgeError
from lmforge.eval import generative as gen
from lmforge.eval.tasks import Task, parse_tasks
from tests.tiny import make_tiny_model, make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
OUTPUTS = [
    ("Natalia sold 48 / 2 = 24 clips in May.\nAltogether she sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("She earns 12 * 50 / 60 = $10.\nThe answer is $10.", "10"),
    ("The answer is 1,250 dollars.", "1250"),
    ("First, 3 × 4 = 12. Then 12 + 2 = 14. So Maria spends 14 dollars in total.", "14"),
    ("Step 1: 5 * 3.5 = 17.5\nThe answer is: 17.5", "17.5"),
    ("The temperature drops to -3 degrees, so the answer is -3.", "-3"),
    ("铅笔一共 4 × 2 = 8 元，加上文具盒一共 8 + 8 = 16 元。\n答案是16。", "16"),
    ("每个班分到 240 ÷ 6 = 40 本。所以答案是：40本。", "40"),
    ("一共有 5 × 24 = 120 瓶，卖出 67 瓶，还剩 53 瓶。", "53"),
    ("答案：20千克", "20"),
    ("Answer: 42.0", "42"),
    ("I am not sure how to solve this.", None),
]


@pytest.mark.parametrize(("text", "want"), OUTPUTS)
def test_extract_answer(text: str, want: str | None) -> None:
    assert gen.extract_answer(text) == want


def test_majority_vote() -> None:
    assert gen.majority(["3", "5", "3", None, None, None]) == "3"  # unparsed chains do not vote
    assert gen.majority(["7", "8"]) == "7"  # a tie goes to the first seen
    assert gen.majority([None, None]) is None


def test_prompts_carry_the_chain_of_thought_cue_in_each_language() -> None:
    engine = Engine(make_tiny_model("qwen2-tiny"), make_tiny_tokenizer())
    problems, dev = gen.load(parse_tasks("arith")[0])
    en, zh = problems[0], next(p for p in problems if p.lang == "zh")
    shots = [d for d in dev if d.lang == "en"][:2]
    text = engine.tokenizer.decode(gen.build_prompt(engine, en, shots, cot=True))
    assert text.count("Let's think step by step.") == 3  # both examples and the question
    assert "7 + 5 = 12" in text and "The answer is 10." in text and en.question in text
    text = engine.tokenizer.decode(gen.build_prompt(engine, zh, [], cot=True))
    assert text.endswith("让我们一步一步地思考。<|im_end|>\n<|im_start|>assistant\n")
    plain = engine.tokenizer.decode(gen.build_prompt(engine, en, shots, cot=False))
    assert "step by step" not in plain and "7 + 5" not in plain and "The answer is 10." in plain


def test_gsm8k_layout_and_its_errors(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"question": "2+3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    problems, shots = gen.load(Task("g", "gsm8k", path))
    assert (problems[0].answer, problems[0].lang, shots[0].answer) == ("5", "en", "2")
    path.write_text(json.dumps({"question": "2+3?", "answer": "five"}) + "\n")
    with pytest.raises(LmforgeError, match=r"test.jsonl: line 1: the answer has no '#### <number>'"):
        gen.read_jsonl(path)


def test_self_consistency_runs_a_batch_of_samples() -> None:
    engine = Engine(make_tiny_model("qwen2-tiny"), make_tiny_tokenizer())
    task = parse_tasks("arith")[0]
    result = gen.evaluate(engine, task, cot=True, samples=3, limit=2, max_new_tokens=6, progress=False)
    assert result.n == 2 and all(len(p["outputs"]) == 3 and len(p["votes"]) == 3 for p in result.predictions)
    assert result.metrics()["acc"] == result.correct / 2
