"""Reading corpus files as a stream of records and writing sharded JSONL, the exchange format between text stages.

Inputs: a folder (searched recursively, files in sorted order) or files ending in `.txt`, `.jsonl`, `.json` (one
record per line) or `.parquet`. A record is a dict with a `text` field plus any metadata, which stages carry along.
A `.txt` file holds documents separated by blank lines. Bad input is counted, never fatal: invalid UTF-8 lines are
replaced or skipped (by flag), malformed JSON lines and records without a string `text` are skipped, and the first
few `file:line` locations of each kind go into the stage report. Everything streams: one line or one Parquet batch
in memory at a time.

Outputs: `part-NNNNN.jsonl` files written inside a temporary directory that replaces the output directory only when
the stage completes (`fileio.atomic_dir`), so a killed stage leaves nothing half-written and a re-run starts
clean. `manifest.json` records the stage, its config and the SHA-256 of every input and output file. An output
directory that holds another stage's run (or something that is not a run at all) is refused unless `overwrite`.

It does not filter, deduplicate or tokenize; the stage modules do.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.fileio import sha256_file, write_json

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
MANIFEST = "manifest.json"
MAX_LOCATIONS = 20  # per kind of problem: enough to find the pattern, few enough to read


@dataclass
class InputIssues:
    """Counted problems in the input, with the first few locations of each kind."""

    counts: Counter = field(default_factory=Counter)
    locations: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, where: str) -> None:
        self.counts[kind] += 1
        found = self.locations.setdefault(kind, [])
        if len(found) < MAX_LOCATIONS:
            found.append(where)


def input_files(paths: Iterable[Path | str]) -> list[Path]:
    """Expand folders into their corpus files (sorted, so every run reads the same order)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(_stage_outputs(p) or _folder_files(p))
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise LmforgeError(f"{p}: unsupported file type; give .txt, .jsonl, .json, .parquet files or folders")
            files.append(p)
        else:
            raise LmforgeError(f"{p}: no such file or folder")
    if not files:
        raise LmforgeError(f"no .txt/.jsonl/.json/.parquet files in {', '.join(map(str, paths))}")
    return files


def _stage_outputs(folder: Path) -> list[Path]:
    """The shards a data stage wrote (its manifest lists them), so its report files are never read as text."""
    try:
        outputs = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("outputs")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return []
    return sorted(folder / name for name in outputs) if isinstance(outputs, dict) else []


def _folder_files(folder: Path) -> list[Path]:
    found = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
    return [f for f in found if not any(part.startswith(".") for part in f.relative_to(folder).parts)]


def _decode(raw: bytes, where: str, bad_utf8: str, issues: InputIssues) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        issues.add("invalid_utf8", where)
        return raw.decode("utf-8", errors="replace") if bad_utf8 == "replace" else None


def _read_txt(path: Path, bad_utf8: str, issues: InputIssues) -> Iterator[dict]:
    lines: list[str] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = _decode(raw, f"{path}:{n}", bad_utf8, issues)
            if line is None:
                continue
            if line.strip():
                lines.append(line)
            elif lines:
                yield {"text": "".join(lines).strip("\n"), "source": path.name}
                lines = []
    if lines:
        yield {"text": "".join(lines).strip("\n"), "source": path.name}


def _read_jsonl(path: Path, bad_utf8: str, issues: InputIssues) -> Iterator[dict]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            line = _decode(raw, where, bad_utf8, issues)
            if line is None or not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                issues.add("malformed_json", where)
                continue
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                issues.add("missing_text", where)
                continue
            yield record


def _read_parquet(path: Path, issues: InputIssues) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise LmforgeError(f"{path}: not a readable Parquet file ({e})") from e
    if "text" not in pf.schema_arrow.names:
        raise LmforgeError(f"{path}: no `text` column (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            if not isinstance(record.get("text"), str):
                issues.add("missing_text", f"{path}:row {row}")
                continue
            yield record


def read_records(files: Iterable[Path], issues: InputIssues, bad_utf8: str = "replace") -> Iterator[dict]:
    """Every record of every file, in order; problems are counted in `issues`."""
    for path in files:
        if path.stat().st_size == 0:
            issues.add("empty_file", str(path))
            continue
        if path.suffix == ".txt":
            yield from _read_txt(path, bad_utf8, issues)
        elif path.suffix == ".parquet":
            yield from _read_parquet(path, issues)
        else:
            yield from _read_jsonl(path, bad_utf8, issues)


def chunked(records: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for record in records:
        chunk.append(record)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class JsonlShardWriter:
    """Writes records to `part-NNNNN.jsonl`, rolling to a new shard every `shard_docs` records."""

    def __init__(self, directory: Path, shard_docs: int = 100_000) -> None:
        self.directory, self.shard_docs = Path(directory), shard_docs
        self.files: list[Path] = []
        self._f = None
        self._in_shard = 0

    def write(self, record: dict) -> None:
        if self._f is None or self._in_shard >= self.shard_docs:
            self._roll()
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._in_shard += 1

    def _roll(self) -> None:
        if self._f is not None:
            self._f.close()
        path = self.directory / f"part-{len(self.files):05d}.jsonl"
        self.files.append(path)
        self._f = open(path, "w", encoding="utf-8")  # noqa: SIM115 - kept open across writes, closed in _roll/close
        self._in_shard = 0

    def close(self) -> list[Path]:
        if self._f is not None:
            self._f.close()
            self._f = None
        return self.files


def check_out_dir(out: Path, stage: str, overwrite: bool) -> None:
    """Refuse to replace a directory that holds something other than an earlier run of this stage."""
    if not out.exists() or overwrite:
        return
    if not out.is_dir():
        raise LmforgeError(f"{out}: exists and is not a directory; choose another --out")
    if not any(out.iterdir()):
        return
    manifest = out / MANIFEST
    recorded = None
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text(encoding="utf-8")).get("stage")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            recorded = None
    if recorded != stage:
        what = f"a `{recorded}` run" if recorded else "files that are not an lmforge data run"
        raise LmforgeError(f"{out}: holds {what}; choose another --out or pass --overwrite to replace it")


def file_hashes(files: Iterable[Path], root: Path | None = None) -> dict[str, str]:
    return {str(f.relative_to(root) if root else f): sha256_file(f) for f in files}


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def write_manifest(tmp_out: Path, stage: str, config: dict, inputs: list[Path], outputs: list[Path]) -> dict:
    manifest = {
        "stage": stage,
        "config": config,
        "config_sha256": config_hash(config),
        "inputs": file_hashes(inputs),
        "outputs": file_hashes(outputs, tmp_out),
    }
    write_json(tmp_out / MANIFEST, manifest)
    return manifest
