"""`lmforge data clean`: normalize, identify the language, filter for quality, scrub PII, apply a block-list.

Records stream from the inputs in chunks; chunks are cleaned in worker processes (`parallel.ordered_map`) and
written in input order, so the output does not depend on the number of workers. Each kept record gets `text`
(cleaned) and `lang`, and keeps its other fields. Every removal is counted under the rule that caused it.
It does not deduplicate (`dedup.py`) or tokenize (`tokenize.py`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data import filters
from lmforge.data.io import (
    InputIssues,
    JsonlShardWriter,
    check_out_dir,
    chunked,
    input_files,
    read_records,
    write_manifest,
)
from lmforge.data.parallel import default_workers, ordered_map
from lmforge.data.report import StageStats, write_report
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir


@dataclass
class CleanConfig:
    inputs: list[str]
    out: str
    langs: list[str] = field(default_factory=lambda: ["en", "zh"])  # empty: keep every language
    to_simplified: bool = True
    scrub_pii: bool = True
    blocklist: str | None = None  # a file of phrases, one per line
    quality: bool = True
    min_words: int = 20
    min_chars_zh: int = 20
    bad_utf8: str = "replace"  # or "skip"
    workers: int = 0  # 0: all cores
    chunk_docs: int = 512
    shard_docs: int = 100_000
    overwrite: bool = False


@dataclass
class _Job:
    """What a worker needs: plain data, so it pickles cheaply to another process."""

    records: list[dict]
    langs: list[str]
    to_simplified: bool
    scrub_pii: bool
    blocklist: list[str]
    quality: filters.QualityConfig | None


def clean_record(record: dict, job: _Job, block: object) -> tuple[dict | None, str | None, Counter]:
    """The cleaned record (or None) and the reason it was removed, plus PII placeholders inserted."""
    text = filters.normalize(record["text"])
    if not text:
        return None, "empty", Counter()
    lang = filters.identify_language(text)
    if job.langs and lang not in job.langs:
        return None, "language", Counter()
    if lang == "zh" and job.to_simplified:
        text = filters.to_simplified(text)
    if block is not None and block.search(text):
        return None, "blocklist", Counter()
    if job.quality is not None and (rule := filters.quality(text, lang, job.quality)):
        return None, rule, Counter()
    pii = Counter()
    if job.scrub_pii:
        text, pii = filters.scrub_pii(text)
    return {**record, "text": text, "lang": lang}, None, pii


def _clean_chunk(job: _Job) -> list[tuple[int, dict | None, str | None, Counter]]:
    block = filters.blocklist_pattern(job.blocklist)
    out = []
    for record in job.records:
        cleaned, reason, pii = clean_record(record, job, block)
        out.append((len(record["text"]), cleaned, reason, pii))
    return out


def _blocklist(path: str | None) -> list[str]:
    if path is None:
        return []
    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"{p}: block-list file not found (one phrase per line)")
    return p.read_text(encoding="utf-8").splitlines()


def main(cfg: CleanConfig) -> dict:
    out = Path(cfg.out)
    check_out_dir(out, "clean", cfg.overwrite)
    files = input_files(cfg.inputs)
    quality = filters.QualityConfig(min_words=cfg.min_words, min_chars_zh=cfg.min_chars_zh) if cfg.quality else None
    blocklist = _blocklist(cfg.blocklist)
    issues, stats, pii_total = InputIssues(), StageStats("clean"), Counter()
    jobs = (
        _Job(chunk, cfg.langs, cfg.to_simplified, cfg.scrub_pii, blocklist, quality)
        for chunk in chunked(read_records(files, issues, cfg.bad_utf8), cfg.chunk_docs)
    )
    with atomic_dir(out) as tmp:
        writer = JsonlShardWriter(tmp, cfg.shard_docs)
        for results in ordered_map(_clean_chunk, jobs, cfg.workers or default_workers()):
            for n_chars, cleaned, reason, pii in results:
                stats.docs_in += 1
                stats.chars_in += n_chars
                pii_total.update(pii)
                if cleaned is None:
                    stats.removed(reason)
                else:
                    writer.write(cleaned)
                    stats.kept(cleaned["text"], cleaned["lang"])
        outputs = writer.close()
        stats.extra["pii_replaced"] = dict(pii_total)
        write_manifest(tmp, "clean", dataclasses.asdict(cfg), files, outputs)
        report = write_report(tmp, stats, issues)
    return report
