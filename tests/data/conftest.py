"""Small corpora written in the real input formats, made in each test."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(directory: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(directory.glob("part-*.jsonl")) for line in f.read_text().splitlines()]
