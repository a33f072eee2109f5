"""Evaluation output: one directory per run, and a report card that compares every run in the output directory.

  <out>/<run>/results.json           metrics per task, settings, command line, the model's lineage
  <out>/<run>/predictions/<task>.jsonl   one line per example: the answer, the prediction, the scores
  <out>/report.md, <out>/report.png  a table and a bar chart over all runs found in <out>

Evaluating fp32, int8 and int4 (or base and LoRA) into the same `--out` therefore gives one card comparing them.
The chart is drawn with matplotlib; where it is missing, the card is written without the chart and says so.
This module scores nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lmforge.fileio import atomic_path, write_json, write_text

# The number each task kind is judged by on the card, and whether higher is better.
HEADLINE = {"perplexity": ("bits_per_byte", False), "gsm8k": ("acc", True)}
MC_HEADLINE = ("acc", True)


def _safe(name: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", name)


def run_label(model: str, quant: str | None, adapter: str | None) -> str:
    parts = [Path(model).name if "/" in model else model, quant or "fp32"]
    if adapter:
        parts.append(Path(adapter).name)
    return _safe("-".join(parts))


def write_run(out: Path, label: str, results: dict[str, Any], predictions: dict[str, list[dict[str, Any]]]) -> Path:
    run_dir = Path(out) / label
    for task, rows in predictions.items():
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        write_text(run_dir / "predictions" / f"{_safe(task)}.jsonl", lines)
    write_json(run_dir / "results.json", results)
    return run_dir


def headline(kind: str, metrics: dict[str, Any]) -> tuple[str, float, bool]:
    name, higher = HEADLINE.get(kind, MC_HEADLINE)
    return name, float(metrics[name]), higher


def load_runs(out: Path) -> list[dict[str, Any]]:
    runs = []
    for path in sorted(Path(out).glob("*/results.json")):
        try:
            runs.append(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a foreign or damaged file is not a run of ours
    return runs


def write_report(out: Path) -> Path:
    """report.md (and report.png when matplotlib is there) comparing every run under `out`."""
    out = Path(out)
    runs = load_runs(out)
    tasks = list(dict.fromkeys(t for r in runs for t in r["tasks"]))
    chart = _chart(out / "report.png", runs, tasks)
    lines = ["# lmforge evaluation report", ""]
    lines += ["| task | metric | " + " | ".join(r["label"] for r in runs) + " |"]
    lines += ["|---|---|" + "---|" * len(runs)]
    for task in tasks:
        for metric, cells in _rows(task, runs):
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    lines += ["", "acc: letter after the options; acc_norm: option text per byte; bits_per_byte: lower is better.", ""]
    lines += ["![scores](report.png)" if chart else "_(no chart: matplotlib is not installed)_", ""]
    lines += ["## Runs", ""]
    for r in runs:
        lineage = r.get("lineage") or {}
        lines += [
            f"- **{r['label']}**: `{r['command']}`",
            f"  model {r['model']}; source {lineage.get('source', '?')} (sha256 {lineage.get('source_sha256') or '-'});"
            f" settings {json.dumps(r['settings'])}; {r['created_utc']}",
        ]
    path = out / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def _rows(task: str, runs: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    kinds = [r["tasks"][task]["kind"] for r in runs if task in r["tasks"]]
    names = ["bits_per_byte", "perplexity"] if kinds[0] == "perplexity" else ["acc", "acc_norm", "n"]
    rows = []
    for name in names:
        cells = []
        for r in runs:
            value = r["tasks"].get(task, {}).get("metrics", {}).get(name)
            cells.append("" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value))
        if any(cells):
            rows.append((name, cells))
    return rows


def _chart(path: Path, runs: list[dict[str, Any]], tasks: list[str]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a server
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) * max(1, len(runs)) ** 0.5), 4))
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        values, labels = [], []
        for t in tasks:
            entry = r["tasks"].get(t)
            name, value, _ = headline(entry["kind"], entry["metrics"]) if entry else ("", float("nan"), True)
            values.append(value)
            labels.append(f"{t}\n({name})" if name else t)
        ax.bar([x + i * width for x in range(len(tasks))], values, width, label=r["label"])
    ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(tasks))], labels)
    ax.set_ylabel("score (accuracy: higher is better; bits/byte: lower)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True
