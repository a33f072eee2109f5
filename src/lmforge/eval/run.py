"""`lmforge eval`: run the named tasks on one model and write its results and the report card.

It opens the model once (loader.open_model: catalog name / file / directory, `--quant`, `--adapter`), runs each
task with its kind's module, and hands the numbers to report.py. It holds no scoring logic of its own.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.eval.tasks import Task, parse_tasks


@dataclass
class EvalConfig:
    tasks: str = "heldout,knowledge,arith"
    model: str | None = None
    quant: str | None = None
    adapter: str | None = None
    out: Path = field(default_factory=lambda: Path("eval-results"))
    shots: int = 0
    cot: bool = False
    samples: int = 1  # > 1: self-consistency over this many sampled chains (generative tasks)
    limit: int | None = None  # examples per task
    max_new_tokens: int = 256
    progress: bool = True


def run_task(loaded: Any, engine: Any, task: Task, cfg: EvalConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, predictions) of one task."""
    if task.kind == "perplexity":
        from lmforge.eval import perplexity

        files = perplexity.resolve_texts(str(task.path))
        result = perplexity.evaluate(loaded.model, loaded.tokenizer, files, progress=cfg.progress)
        return {**result["total"], "texts": result["texts"]}, result["texts"]
    if task.kind == "gsm8k":
        from lmforge.eval import generative

        r = generative.evaluate(
            engine, task, cfg.shots, cfg.cot, cfg.samples, cfg.limit, cfg.max_new_tokens, cfg.progress
        )
        return r.metrics(), r.predictions
    from lmforge.eval import multiple_choice

    r = multiple_choice.evaluate(loaded.model, loaded.tokenizer, task, cfg.shots, cfg.limit, cfg.progress)
    return r.metrics(), r.predictions


def main(cfg: EvalConfig) -> dict[str, Any]:
    from lmforge.checkpoint import read_lineage
    from lmforge.engine import Engine
    from lmforge.eval.report import run_label, write_report, write_run
    from lmforge.loader import open_model
    from lmforge.quant import scheme_of

    if cfg.shots < 0 or cfg.samples < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise LmforgeError("--shots must be >= 0, --samples >= 1 and --limit >= 1")
    tasks = parse_tasks(cfg.tasks)  # bad names and paths fail before the model loads
    loaded = open_model(cfg.model, cfg.quant, cfg.adapter)
    scheme = scheme_of(loaded.model)  # from --quant or from a quantized checkpoint's own config
    quant = None if scheme is None else scheme.label
    label = run_label(cfg.model or loaded.directory.parent.name, quant, cfg.adapter)
    results: dict[str, Any] = {
        "label": label,
        "model": str(loaded.directory),
        "quant": quant,
        "adapter": cfg.adapter,
        "command": shlex.join(sys.argv),
        "settings": {"shots": cfg.shots, "cot": cfg.cot, "samples": cfg.samples, "limit": cfg.limit},
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lineage": read_lineage(loaded.directory),
        "tasks": {},
    }
    predictions = {}
    engine = None
    for task in tasks:
        if task.kind == "gsm8k" and engine is None:
            # Only now: the engine swaps decode-step blocks into the model, which scoring forwards do not need.
            engine = Engine(loaded.model, loaded.tokenizer)
        t0 = time.perf_counter()
        metrics, predictions[task.name] = run_task(loaded, engine, task, cfg)
        seconds = round(time.perf_counter() - t0, 1)
        entry = {"kind": task.kind, "path": str(task.path), "metrics": metrics, "seconds": seconds}
        results["tasks"][task.name] = entry
    run_dir = write_run(Path(cfg.out), label, results, predictions)
    results["run_dir"] = str(run_dir)
    results["report"] = str(write_report(Path(cfg.out)))
    return results
