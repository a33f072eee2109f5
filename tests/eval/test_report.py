"""`lmforge eval` end to end on a tiny model, task names, and the report card comparing runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.checkpoint import make_lineage, save_checkpoint
from lmforge.errors import LmforgeError
from lmforge.eval.report import write_report, write_run
from lmforge.eval.tasks import parse_tasks
from lmforge.quant.quantize import QuantizeConfig
from lmforge.quant.quantize import main as quantize
from tests.test_cli import assert_one_line_error, lmforge
from tests.tiny import make_tiny_model, make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_task_names() -> None:
    assert [(t.name, t.kind) for t in parse_tasks("heldout, knowledge,arith")] == [
        ("heldout", "perplexity"),
        ("knowledge", "mc"),
        ("arith", "gsm8k"),
    ]
    assert parse_tasks("perplexity:heldout-zh")[0].kind == "perplexity"
    for bad, message in [("mmlu", "unknown task"), ("gsm8k:/no/such.jsonl", "no such file"), ("arith,arith", "twice")]:
        with pytest.raises(LmforgeError, match=message):
            parse_tasks(bad)


def test_report_compares_runs(tmp_path: Path) -> None:
    for label, acc in [("m-fp32", 0.75), ("m-int4", 0.5)]:
        results = {
            "label": label,
            "model": "/m",
            "command": "lmforge eval",
            "settings": {"shots": 0},
            "created_utc": "2026-01-01T00:00:00+00:00",
            "lineage": {"source": "catalog:m", "source_sha256": "ab"},
            "tasks": {
                "knowledge": {"kind": "mc", "metrics": {"acc": acc, "acc_norm": 0.5, "n": 4}},
                "heldout": {"kind": "perplexity", "metrics": {"bits_per_byte": 1.5, "perplexity": 20.0}},
            },
        }
        write_run(tmp_path, label, results, {"knowledge": [{"id": 1, "pred": "A"}]})
    report = write_report(tmp_path).read_text()
    assert "| task | metric | m-fp32 | m-int4 |" in report
    assert "| knowledge | acc | 0.75 | 0.5 |" in report and "| heldout | bits_per_byte | 1.5 | 1.5 |" in report
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "m-int4/predictions/knowledge.jsonl").read_text()) == {"id": 1, "pred": "A"}


def test_cli_end_to_end(tmp_path: Path) -> None:
    directory = tmp_path / "tiny"
    model = make_tiny_model("qwen2-tiny")
    save_checkpoint(directory, model.cfg, model.state_dict(), make_tiny_tokenizer(), make_lineage("test"))
    args = ["eval", "--model", str(directory), "--limit", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "out")]
    proc = lmforge(*args, "--tasks", "knowledge,arith", "--shots", "1", "--cot", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "out/tiny-fp32/results.json").read_text())
    assert set(results["tasks"]) == {"knowledge", "arith"} and results["tasks"]["knowledge"]["metrics"]["n"] == 2
    assert results["settings"] == {"shots": 1, "cot": True, "samples": 1, "limit": 2}
    assert len((tmp_path / "out/tiny-fp32/predictions/arith.jsonl").read_text().splitlines()) == 2
    assert "tiny-fp32" in (tmp_path / "out/report.md").read_text()
    quantize(QuantizeConfig(out=str(tmp_path / "q8"), model=str(directory), bits=8, progress=False))
    q8 = ["eval", "--model", str(tmp_path / "q8"), "--tasks", "knowledge", "--limit", "2", "--out"]
    assert lmforge(*q8, str(tmp_path / "out"), OMP_NUM_THREADS="1").returncode == 0
    assert json.loads((tmp_path / "out/q8-int8/results.json").read_text())["quant"] == "int8"  # its own scheme
    assert_one_line_error(lmforge(*args, "--tasks", "mmlu:/no/such/dir"), "/no/such/dir")
