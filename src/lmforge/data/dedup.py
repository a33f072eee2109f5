"""`lmforge data dedup`: exact and near-duplicate removal, deterministic, one document kept per cluster.

- Exact: a 64-bit BLAKE2 hash of the text lower-cased with everything but letters and digits removed, so copies
  that differ in spacing, punctuation or case are one document.
- Near: MinHash over character n-grams of that same normalized text (characters, not words, so Chinese works),
  indexed with `datasketch.MinHashLSH`. Shingle hashing and the permutations run vectorized in numpy inside worker
  processes (the part that costs); the LSH index is queried in input order in the main process, so the first
  document of a cluster is the one kept, whatever the worker count.
Memory grows with the number of documents (their LSH band keys and an 8-byte exact hash each), never with
their text: records stream from input to output. The report adds cluster sizes (how many clusters had k members).
It does not compare against evaluation sets (`decontaminate.py`) or judge quality (`clean.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
from lmforge.fileio import atomic_dir

MERSENNE = np.uint64((1 << 61) - 1)
MAX_HASH = np.uint64((1 << 32) - 1)
_NOT_ALNUM = re.compile(r"[\W_]+")


@dataclass
class DedupConfig:
    inputs: list[str]
    out: str
    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # estimated Jaccard of character 5-gram sets: one changed character per ~50
    ngram: int = 5
    num_perm: int = 128
    seed: int = 1
    bad_utf8: str = "replace"
    workers: int = 0
    chunk_docs: int = 512
    shard_docs: int = 100_000
    overwrite: bool = False


def normalized(text: str) -> str:
    return _NOT_ALNUM.sub("", text.lower())


def exact_key(norm: str) -> int:
    return int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "little")


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of the universal hashes (a*x + b) mod p, as datasketch draws them."""
    gen = np.random.RandomState(seed)
    a = gen.randint(1, int(MERSENNE), size=num_perm, dtype=np.uint64)
    b = gen.randint(0, int(MERSENNE), size=num_perm, dtype=np.uint64)
    return a, b


def shingle_hashes(norm: str, n: int) -> np.ndarray:
    """32-bit hashes of every distinct character n-gram, computed as a rolling polynomial over code points."""
    cps = np.frombuffer(norm.encode("utf-32-le"), dtype="<u4").astype(np.uint64)
    if cps.size == 0:
        return np.zeros(1, dtype=np.uint64)
    n = min(n, cps.size)
    h = np.zeros(cps.size - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
        for j in range(n):
            h = h * np.uint64(1_000_003) + cps[j : j + h.size]
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(29)
    return np.unique(h & MAX_HASH)


def signature(norm: str, n: int, a: np.ndarray, b: np.ndarray, block: int = 4096) -> np.ndarray:
    """MinHash values (uint64, < 2^32), in blocks of shingles so a long document never needs a huge matrix."""
    hv = shingle_hashes(norm, n)
    sig = np.full(a.size, MAX_HASH, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(0, hv.size, block):
            phv = ((hv[i : i + block, None] * a + b) % MERSENNE) & MAX_HASH  # (shingles, num_perm)
            np.minimum(sig, phv.min(axis=0), out=sig)
    return sig


@dataclass
class _Job:
    records: list[dict]
    near: bool
    ngram: int
    num_perm: int
    seed: int


def _hash_chunk(job: _Job) -> list[tuple[dict, int, np.ndarray | None]]:
    a, b = permutations(job.num_perm, job.seed)
    out = []
    for record in job.records:
        norm = normalized(record["text"])
        sig = signature(norm, job.ngram, a, b) if job.near else None
        out.append((record, exact_key(norm), sig))
    return out


class NearIndex:
    """MinHash LSH over every document seen: `find_or_add` returns the earliest similar one, or None.

    Removed documents stay in the index too, so two edited copies of one text join the same cluster through the
    original even when they are less similar to each other than to it (clusters are connected components)."""

    def __init__(self, threshold: float, num_perm: int, seed: int) -> None:
        from datasketch import MinHashLSH

        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.seed = seed

    def find_or_add(self, key: int, sig: np.ndarray) -> int | None:
        from datasketch import LeanMinHash

        mh = LeanMinHash(seed=self.seed, hashvalues=sig, scheme="legacy")  # our values use its formula
        found = self.lsh.query(mh)
        self.lsh.insert(key, mh, check_duplication=False)
        return min(found) if found else None  # the earliest: deterministic whatever the set's order


def main(cfg: DedupConfig) -> dict:
    out = Path(cfg.out)
    check_out_dir(out, "dedup", cfg.overwrite)
    files = input_files(cfg.inputs)
    issues, stats = InputIssues(), StageStats("dedup")
    exact_seen: dict[int, int] = {}
    near = NearIndex(cfg.threshold, cfg.num_perm, cfg.seed) if cfg.near else None
    clusters: Counter = Counter()  # index of the kept document -> members, itself included
    kept_of: dict[int, int] = {}  # removed document -> the kept document of its cluster
    jobs = (
        _Job(chunk, cfg.near, cfg.ngram, cfg.num_perm, cfg.seed)
        for chunk in chunked(read_records(files, issues, cfg.bad_utf8), cfg.chunk_docs)
    )
    with atomic_dir(out) as tmp:
        writer = JsonlShardWriter(tmp, cfg.shard_docs)
        index = 0
        for results in ordered_map(_hash_chunk, jobs, cfg.workers or default_workers()):
            for record, key, sig in results:
                stats.seen(record["text"])
                rep = exact_seen.get(key) if cfg.exact else None
                reason = "exact_duplicate" if rep is not None else None
                if rep is None and near is not None:
                    rep = near.find_or_add(index, sig)
                    rep = kept_of.get(rep, rep)  # a removed document's match stands for its kept one
                    reason = "near_duplicate" if rep is not None else None
                if rep is None:
                    if cfg.exact:
                        exact_seen[key] = index
                    clusters[index] = 1
                    writer.write(record)
                    stats.kept(record["text"], record.get("lang"))
                else:
                    kept_of[index] = rep
                    clusters[rep] += 1
                    stats.removed(reason)
                index += 1
        outputs = writer.close()
        sizes = Counter(clusters.values())
        stats.extra["cluster_sizes"] = {str(k): sizes[k] for k in sorted(sizes) if k > 1}
        write_manifest(tmp, "dedup", dataclasses.asdict(cfg), files, outputs)
        report = write_report(tmp, stats, issues)
    return report
