"""Pairwise judging: stub judges served over real HTTP on loopback, asked through the real `openai` client."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI

from lmforge.cli import main
from lmforge.eval import judge
from tests.serve_server import free_port, write_tiny_checkpoint


def _answers(prompt: str) -> tuple[str, str]:
    a = re.search(r"Assistant A's Answer\]\n(.*?)\n\[The End of Assistant A", prompt, re.S).group(1)
    b = re.search(r"Assistant B's Answer\]\n(.*?)\n\[The End of Assistant B", prompt, re.S).group(1)
    return a, b


def _stub_reply(model: str, prompt: str) -> str:
    """The stub judges, chosen by the model name a request sends."""
    a, b = _answers(prompt)
    if model == "first":  # position-biased: always prefers what it sees first
        return "A reads better.\n[[A]]"
    if model == "longer":  # consistent: prefers the longer answer wherever it stands
        return "[[C]]" if len(a) == len(b) else f"The longer one is better.\n[[{'A' if len(a) > len(b) else 'B'}]]"
    return "Both answers have merit; I cannot decide."  # no verdict at all


def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict) -> dict:
        text = _stub_reply(body["model"], body["messages"][-1]["content"])
        return {"id": "j", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    return app


@pytest.fixture(scope="module")
def judge_url() -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


QUESTIONS = ["Why is the sky blue?", "天空为什么是蓝色的？", "2 + 2 = ?"]
SHORT = ["Light.", "散射。", "4"]
LONG = ["Sunlight scatters off air molecules, blue most.", "阳光被空气分子散射，蓝光散射最强。", "2 + 2 = 4"]


def test_position_swapping_cancels_a_biased_judge(judge_url: str) -> None:
    result = judge.compare(QUESTIONS, LONG, SHORT, judge.openai_judge(judge_url, "first"))
    m = result.metrics()
    assert (m["win"], m["tie"], m["loss"], m["invalid"]) == (0, 3, 0, 0)
    assert m["position_inconsistent"] == 3 and m["win_rate"] == 0.5
    assert all(r["verdicts"] == ["A", "A"] for r in result.records)


def test_a_consistent_judge_gives_consistent_wins(judge_url: str) -> None:
    ask = judge.openai_judge(judge_url, "longer")
    m = judge.compare(QUESTIONS, LONG, SHORT, ask).metrics()
    assert (m["win"], m["tie"], m["loss"], m["position_inconsistent"]) == (3, 0, 0, 0) and m["win_rate"] == 1.0
    m = judge.compare(QUESTIONS, SHORT, LONG, ask).metrics()
    assert (m["win"], m["loss"]) == (0, 3) and m["win_rate"] == 0.0


def test_unparsable_verdicts_are_counted_invalid(judge_url: str) -> None:
    m = judge.compare(QUESTIONS, LONG, SHORT, judge.openai_judge(judge_url, "undecided")).metrics()
    assert m["invalid"] == 3 and m["win_rate"] is None


def test_verdict_parsing_takes_the_last_verdict() -> None:
    assert judge.parse_verdict("Not [[A]] at first glance... final: [[B]]") == "B"
    assert judge.parse_verdict("平局 [[C]]") == "C"
    assert judge.parse_verdict("A is better") is None
    assert judge.combine("A", "B") == "win" and judge.combine("B", "A") == "loss"
    assert judge.combine("A", "A") == "tie" and judge.combine("C", None) == "invalid"


def test_judge_command_end_to_end(judge_url: str, tmp_path: Path, one_thread: None) -> None:
    model = write_tiny_checkpoint(tmp_path / "tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}, ensure_ascii=False) + "\n" for q in QUESTIONS))
    out = tmp_path / "out"
    argv = ["judge", "--model", str(model), "--against", str(model), "--prompts", str(prompts),
            "--max-new-tokens", "6", "--judge-url", judge_url, "--judge-model", "longer", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "judge_results.json").read_text())
    # The same model twice gives equal answers: the consistent judge calls every pair a tie.
    assert (results["tie"], results["prompts"]) == (3, 3) and results["win_rate"] == 0.5
    assert len((out / "judgments.jsonl").read_text().splitlines()) == 3
    assert "| 0 | 3 | 0 | 0 | 50.0% |" in (out / "judge_report.md").read_text()


def test_bad_prompts_file_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "no prompt field"}\n')
    with pytest.raises(judge.LmforgeError, match=r"p\.jsonl:2"):
        judge.read_prompts(bad)
    assert len(judge.read_prompts(None)) == 20
