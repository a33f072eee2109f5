"""`lmforge data stats`: the stage report (documents, characters, languages, length histogram) for any shard set.

Text shards (any folder or files the text stages read) are counted record by record; records without a `lang`
field get one from `filters.identify_language`. Token shards (`data/shards.py`) are counted from their offsets
files, so a large set costs a read of its `.idx` files only. Written to `--out` when given, else only returned.
It does not change the shards it describes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.data.filters import identify_language
from lmforge.data.io import MANIFEST, InputIssues, input_files, read_records
from lmforge.data.report import StageStats, length_bin, write_report
from lmforge.data.shards import FORMAT, TokenShards
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir


@dataclass
class StatsConfig:
    inputs: list[str]
    out: str | None = None
    bad_utf8: str = "replace"


def _is_token_shards(path: Path) -> bool:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def token_stats(directory: Path) -> StageStats:
    shards, stats = TokenShards.open(directory), StageStats("stats")
    for tokens, starts in zip(shards.tokens, shards.starts, strict=True):
        lengths = np.diff(np.append(starts.astype(np.int64), tokens.size))  # each includes its end-of-text id
        for n in lengths.tolist():
            stats.docs_in += 1
            stats.docs_out += 1
            stats.lengths[length_bin(n)] += 1
    stats.extra["tokens"] = shards.num_tokens
    stats.extra["vocab_size"] = shards.vocab_size
    return stats


def text_stats(paths: list[str], issues: InputIssues, bad_utf8: str) -> StageStats:
    stats = StageStats("stats")
    for record in read_records(input_files(paths), issues, bad_utf8):
        text = record["text"]
        stats.seen(text)
        stats.kept(text, record.get("lang") or identify_language(text))
    return stats


def main(cfg: StatsConfig) -> dict:
    if cfg.out is not None and any(Path(cfg.out).resolve() == Path(p).resolve() for p in cfg.inputs):
        raise LmforgeError(f"--out {cfg.out}: is an input; the report replaces --out whole, so choose another folder")
    issues = InputIssues()
    tokens = len(cfg.inputs) == 1 and _is_token_shards(Path(cfg.inputs[0]))
    stats = token_stats(Path(cfg.inputs[0])) if tokens else text_stats(cfg.inputs, issues, cfg.bad_utf8)
    if cfg.out is None:
        return stats.to_dict(issues)
    with atomic_dir(Path(cfg.out)) as tmp:
        return write_report(tmp, stats, issues, unit="tokens" if tokens else "characters")
