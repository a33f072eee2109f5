"""Token shards: the hand-off between `lmforge data tokenize` and `lmforge pretrain`.

A shard set is a directory holding
- `tokens-NNNNN.bin`: token ids, little-endian uint16 (vocabulary <= 65,536) or uint32, documents back to back,
  each followed by the tokenizer's end-of-text id, so a reader that ignores boundaries still sees them;
- `tokens-NNNNN.idx`: little-endian uint64 offsets of each document's first token in that shard (one per document);
- `manifest.json`: format, dtype, vocabulary size, end-of-text id, the tokenizer file's SHA-256, and per shard its
  file names, token and document counts and SHA-256s, plus whatever the writer records about its inputs.
Files are read with `np.memmap`, so opening a terabyte of shards costs nothing and nothing is ever unpickled.
Each shard file is written under a temporary name and renamed when complete; the manifest is written last, so a
killed writer leaves either no manifest or one that names only complete shards.
It does not tokenize or sample; `data/tokenize.py` writes shards and `train/` decides the order of reading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_path, sha256_file, write_json

FORMAT = "lmforge-tokens/1"
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Appends documents (lists of ids) and rolls to a new shard every `shard_tokens` tokens."""

    def __init__(
        self, out: Path, vocab_size: int, eos_id: int, tokenizer_sha256: str, shard_tokens: int = 1 << 26
    ) -> None:
        self.out, self.vocab_size, self.eos_id = Path(out), vocab_size, eos_id
        self.tokenizer_sha256, self.shard_tokens = tokenizer_sha256, shard_tokens
        self.dtype = token_dtype(vocab_size)
        self.shards: list[dict] = []
        self._tokens: list[np.ndarray] = []
        self._starts: list[int] = []
        self._count = 0
        self.out.mkdir(parents=True, exist_ok=True)

    def add(self, ids: list[int] | np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise LmforgeError(f"token id out of range for vocabulary size {self.vocab_size}")
        self._starts.append(self._count)
        self._tokens.append(np.append(ids, self.eos_id).astype(self.dtype))
        self._count += ids.size + 1
        if self._count >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._tokens:
            return
        stem = f"tokens-{len(self.shards):05d}"
        bin_path, idx_path = self.out / f"{stem}.bin", self.out / f"{stem}.idx"
        with atomic_path(bin_path) as tmp:
            np.concatenate(self._tokens).tofile(tmp)
        with atomic_path(idx_path) as tmp:
            np.asarray(self._starts, dtype="<u8").tofile(tmp)
        self.shards.append(
            {
                "bin": bin_path.name,
                "idx": idx_path.name,
                "tokens": self._count,
                "documents": len(self._starts),
                "sha256": sha256_file(bin_path),
                "idx_sha256": sha256_file(idx_path),
            }
        )
        self._tokens, self._starts, self._count = [], [], 0

    def close(self, **extra: object) -> dict:
        """Write the last shard and the manifest; `extra` (e.g. the input manifest's hash) goes into it."""
        self._flush()
        manifest = {
            "format": FORMAT,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "tokenizer_sha256": self.tokenizer_sha256,
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "shards": self.shards,
            **extra,
        }
        write_json(self.out / MANIFEST, manifest)
        return manifest


@dataclass
class TokenShards:
    """A shard set opened for reading: `tokens[i]` is shard i as a memory map."""

    directory: Path
    manifest: dict
    tokens: list[np.ndarray] = field(default_factory=list)
    starts: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def open(cls, directory: Path, verify: bool = False) -> TokenShards:
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise LmforgeError(f"{directory}: no {MANIFEST}; make token shards with `lmforge data tokenize`")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise LmforgeError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        shards = cls(directory, manifest)
        dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        for s in manifest["shards"]:
            bin_path, idx_path = directory / s["bin"], directory / s["idx"]
            for p in (bin_path, idx_path):
                if not p.is_file():
                    raise LmforgeError(f"{p}: shard file missing (the manifest lists it); re-run lmforge data tokenize")
            if verify and sha256_file(bin_path) != s["sha256"]:
                raise LmforgeError(f"{bin_path}: content does not match the manifest's SHA-256")
            shards.tokens.append(np.memmap(bin_path, dtype=dtype, mode="r"))
            shards.starts.append(np.memmap(idx_path, dtype="<u8", mode="r") if s["documents"] else np.zeros(0, "<u8"))
        return shards

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["tokens"])

    def check_tokenizer(self, tokenizer_sha256: str | None, vocab_size: int) -> None:
        """Refuse shards made by another tokenizer, or with ids the model cannot embed."""
        if self.vocab_size > vocab_size:
            raise LmforgeError(
                f"{self.directory}: shards use a vocabulary of {self.vocab_size}, the model embeds only {vocab_size}"
            )
        recorded = self.manifest.get("tokenizer_sha256")
        if tokenizer_sha256 and recorded and recorded != tokenizer_sha256:
            raise LmforgeError(
                f"{self.directory}: shards were tokenized with tokenizer {recorded[:12]}, the model's is "
                f"{tokenizer_sha256[:12]}; re-tokenize with the model's tokenizer.json"
            )
