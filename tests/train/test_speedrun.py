"""`lmforge speedrun --preset ci-micro`: every stage from synthetic text to an SFT'd model, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.cli import main
from lmforge.train.loop import read_log


def test_ci_micro_end_to_end(tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "run"
    assert main(["speedrun", "--preset", "ci-micro", "--out", str(out), "--no-progress"]) == 0

    evals = [r["eval_loss"] for r in read_log(out / "pretrain") if "eval_loss" in r]
    assert evals[-1] < evals[0] - 1.0  # it learned
    lineage = json.loads((out / "sft" / "model" / "lineage.json").read_text())
    assert lineage["parent"]["kind"] == "pretrain"  # the chat model's lineage reaches back to pretraining
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert lineage["parent"]["data"]["manifest_sha256"] and manifest["vocab_size"] == 800
    report = (out / "REPORT.md").read_text()
    for needed in ("lmforge data synth", "lmforge pretrain", "lmforge sft", "Once upon a time", "从前",
                   "loss.png", "lmforge reproduce"):
        assert needed in report
    assert (out / "pretrain" / "loss.png").stat().st_size > 1000

    assert main(["speedrun", "--preset", "ci-micro", "--out", str(out)]) == 1  # never over a finished run
