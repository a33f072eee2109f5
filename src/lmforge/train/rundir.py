"""A training run's output directory: claimed once, refused when it holds another run, reopened by --resume.

Every training stage (pretrain, sft, rm, dpo) writes `run.json` into its --out directory: the settings and data
hashes that define the run. A later command with the same --out must say what it means: `--resume` continues that
run (and is refused if the settings or data differ), `--overwrite` starts over; anything else is refused, so two
runs never mix their checkpoints and logs. This module also prints a stage's outcome, one fact per line.
It does not train, save checkpoints or read logs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Protocol

from lmforge.errors import LmforgeError
from lmforge.fileio import write_json

# Settings that may change between a run and its resume without making it a different run.
NOT_IDENTITY = ("resume", "overwrite", "progress", "device")


class RunSettings(Protocol):
    out: str
    resume: bool
    overwrite: bool


def identity(cfg: Any, data_sha256: dict[str, str], ignore: tuple[str, ...] = NOT_IDENTITY) -> dict:
    """What makes a run this run: its settings (a dataclass) but for `ignore`, and its data files' hashes."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignore}
    return {"settings": settings, "data_sha256": data_sha256}


def prepare_out(cfg: RunSettings, run_identity: dict) -> Path:
    """Create, reuse (--resume) or clear (--overwrite) the output directory; refuse to mix two runs."""
    out = Path(cfg.out).expanduser()
    run_file = out / "run.json"
    occupied = out.exists() and any(out.iterdir())
    if occupied and not run_file.is_file():
        raise LmforgeError(f"{out} is not empty and holds no lmforge run; choose a new or empty --out directory")
    if occupied and cfg.overwrite:
        shutil.rmtree(out)
    elif occupied and not cfg.resume:
        raise LmforgeError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
    elif occupied:
        recorded = json.loads(run_file.read_text(encoding="utf-8"))
        diffs = _differences(recorded, run_identity)
        if diffs:
            raise LmforgeError(
                f"{out} holds a different run ({'; '.join(diffs[:3])}); resume with the same settings "
                "and data, or pass --overwrite to start over"
            )
    elif cfg.resume:
        raise LmforgeError(f"{out} holds no run to resume; drop --resume to start one")
    out.mkdir(parents=True, exist_ok=True)
    write_json(run_file, run_identity)
    return out


def _differences(recorded: dict, current: dict) -> list[str]:
    diffs = []
    for key in sorted(set(recorded["settings"]) | set(current["settings"])):
        was, now = recorded["settings"].get(key), current["settings"].get(key)
        if was != now:
            diffs.append(f"{key}: {was!r} then, {now!r} now")
    if recorded["data_sha256"] != current["data_sha256"]:
        diffs.append("the data files' contents differ")
    return diffs


def report(result: dict) -> None:
    """Print a stage's outcome on stdout, one fact per line."""
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
