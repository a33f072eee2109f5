"""Decontamination removes documents that quote an evaluation set (English words, Chinese characters)."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.data import decontaminate
from tests.data.conftest import read_jsonl, write_jsonl
from tests.data.test_filters import EN_GOOD, ZH_GOOD

QUESTION = "Which planet in our solar system has the largest number of known moons orbiting around it today"
ZH_QUESTION = "下列哪一个选项最准确地描述了光合作用过程中能量转换的主要方式"


def test_documents_quoting_eval_items_are_removed(tmp_path: Path) -> None:
    evals = tmp_path / "mmlu.jsonl"
    evals.write_text(json.dumps({"question": QUESTION, "choices": ["Saturn", "Mars"], "answer": 0}) + "\n"
                     + json.dumps({"question": ZH_QUESTION, "choices": ["甲", "乙"], "answer": 1}, ensure_ascii=False)
                     + "\n", encoding="utf-8")
    docs = [
        {"text": EN_GOOD},
        {"text": f"Quiz time! {QUESTION.upper()}? The answer is Saturn."},  # case and punctuation do not hide it
        {"text": ZH_GOOD},
        {"text": f"今天的练习题：{ZH_QUESTION}？答案是乙。"},
        {"text": "Which planet in our solar system has the largest moon? Ganymede, around Jupiter."},  # too short
    ]
    write_jsonl(tmp_path / "in" / "a.jsonl", docs)
    report = decontaminate.main(decontaminate.DecontaminateConfig(
        inputs=[str(tmp_path / "in")], evals=[str(evals)], out=str(tmp_path / "out")))
    assert [r["text"] for r in read_jsonl(tmp_path / "out")] == [docs[0]["text"], docs[2]["text"], docs[4]["text"]]
    assert report["removed"] == {"contaminated": 2} and report["removed_per_eval_file"] == {"mmlu.jsonl": 2}
