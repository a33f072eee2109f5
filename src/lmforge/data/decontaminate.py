"""`lmforge data decontaminate`: drop training documents that share a long n-gram with an evaluation set.

As GPT-3 did (13-grams), made to work for Chinese: text is lower-cased and split into units that are words for
alphabetic scripts and single characters for Han, punctuation dropped, so an English 13-gram is 13 words and a
Chinese one 13 characters. Every n-gram of every string in the evaluation files (`.jsonl`/`.json` records, all
their string fields, choices included; `.txt` lines; `.parquet` `text`) goes into a set of hashes; a document
holding any of them is removed, and the report counts removals per evaluation file.
It does not fuzzy-match or paraphrase-detect: a changed word inside every 13-gram escapes it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.io import (
    InputIssues,
    JsonlShardWriter,
    check_out_dir,
    input_files,
    read_records,
    write_manifest,
)
from lmforge.data.report import StageStats, write_report
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir

_UNITS = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_\u3400-\u9fff\uf900-\ufaff]+")


@dataclass
class DecontaminateConfig:
    inputs: list[str]
    evals: list[str]
    out: str
    ngram: int = 13
    bad_utf8: str = "replace"
    overwrite: bool = False


def units(text: str) -> list[str]:
    return _UNITS.findall(text.lower())


def ngram_hashes(text: str, n: int) -> Iterator[int]:
    u = units(text)
    for i in range(len(u) - n + 1):
        yield hash(tuple(u[i : i + n]))  # one process, so the salted hash is consistent within the run


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _eval_texts(path: Path) -> Iterator[str]:
    if path.suffix == ".parquet":
        yield from (r["text"] for r in read_records([path], InputIssues()))
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if path.suffix == ".txt":
                yield line
                continue
            if not line.strip():
                continue
            try:
                yield from _strings(json.loads(line))
            except json.JSONDecodeError as e:
                raise LmforgeError(f"{path}:{n}: not a JSON record ({e.msg}); evaluation files are JSON lines") from e


def eval_index(paths: list[str], n: int) -> tuple[dict[int, str], Counter]:
    """n-gram hash -> the evaluation file it came from; and n-grams per file."""
    index: dict[int, str] = {}
    sizes: Counter = Counter()
    for path in input_files(paths):
        for text in _eval_texts(path):
            for h in ngram_hashes(text, n):
                index.setdefault(h, path.name)
                sizes[path.name] += 1
    if not index:
        raise LmforgeError(f"no {n}-grams in the evaluation files {', '.join(paths)}; give longer texts or a smaller n")
    return index, sizes


def main(cfg: DecontaminateConfig) -> dict:
    out = Path(cfg.out)
    check_out_dir(out, "decontaminate", cfg.overwrite)
    index, sizes = eval_index(cfg.evals, cfg.ngram)
    files = input_files(cfg.inputs)
    issues, stats, by_eval = InputIssues(), StageStats("decontaminate"), Counter()
    with atomic_dir(out) as tmp:
        writer = JsonlShardWriter(tmp)
        for record in read_records(files, issues, cfg.bad_utf8):
            stats.seen(record["text"])
            hit = next((index[h] for h in ngram_hashes(record["text"], cfg.ngram) if h in index), None)
            if hit is None:
                writer.write(record)
                stats.kept(record["text"], record.get("lang"))
            else:
                stats.removed("contaminated")
                by_eval[hit] += 1
        outputs = writer.close()
        stats.extra["removed_per_eval_file"] = dict(by_eval)
        stats.extra["eval_ngrams"] = dict(sizes)
        write_manifest(tmp, "decontaminate", dataclasses.asdict(cfg), files + input_files(cfg.evals), outputs)
        report = write_report(tmp, stats, issues)
    return report
