"""Dedup finds planted exact and near-duplicates (Chinese and English, small edits) and keeps exactly one."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from datasketch import MinHash

from lmforge.data import dedup
from lmforge.data.synth import story
from tests.data.conftest import read_jsonl, write_jsonl


def _edit(text: str, rng: random.Random) -> str:
    """One character changed per 100: a small edit (5-gram Jaccard ~0.9 to the original)."""
    chars = list(text)
    for _ in range(max(1, len(chars) // 100)):
        i = rng.randrange(len(chars))
        chars[i] = rng.choice("abcdefg的了是")
    return "".join(chars)


def test_planted_near_duplicates_keep_exactly_one(tmp_path: Path) -> None:
    rng = random.Random(0)
    originals = [story(rng, lang) for lang in ["en", "zh"] * 20]
    records = [{"text": t, "id": f"orig-{i}"} for i, t in enumerate(originals)]
    planted = {0: 3, 1: 2, 6: 4, 7: 1}  # original index -> copies with a few characters changed
    for i, copies in planted.items():
        records += [{"text": _edit(originals[i], rng), "id": f"near-{i}-{c}"} for c in range(copies)]
    records.append({"text": "  " + originals[5].upper() + "!!", "id": "exact-5"})  # same text after normalization
    rng.shuffle(records)
    write_jsonl(tmp_path / "in" / "a.jsonl", records)
    report = dedup.main(dedup.DedupConfig(inputs=[str(tmp_path / "in")], out=str(tmp_path / "out"), workers=1))
    kept = read_jsonl(tmp_path / "out")
    assert len(kept) == len(originals)
    texts = [r["text"] for r in kept]
    for i in planted:  # exactly one member of each planted cluster survives
        assert sum(t == originals[i] or r["id"].startswith(f"near-{i}-") for t, r in zip(texts, kept, strict=True)) == 1
    assert report["removed"] == {"near_duplicate": sum(planted.values()), "exact_duplicate": 1}
    assert report["cluster_sizes"] == {"2": 2, "3": 1, "4": 1, "5": 1}  # pairs: 7 and 5; 1 triple; 0 four; 6 five


def test_signature_estimates_jaccard_like_datasketch() -> None:
    """Our vectorized signature and datasketch's own MinHash estimate the same similarity."""
    a_text = "the quick brown fox jumps over the lazy dog " * 3
    b_text = "the quick brown cat jumps over a lazy dog " * 3
    a, b = dedup.permutations(256, 1)
    ours = np.mean(dedup.signature(a_text, 5, a, b) == dedup.signature(b_text, 5, a, b))
    theirs = []
    for text in (a_text, b_text):
        m = MinHash(num_perm=256)
        m.update_batch([text[i : i + 5].encode() for i in range(len(text) - 4)])
        theirs.append(m)
    shingles = [{t[i : i + 5] for i in range(len(t) - 4)} for t in (a_text, b_text)]
    exact = len(shingles[0] & shingles[1]) / len(shingles[0] | shingles[1])
    assert abs(ours - exact) < 0.1 and abs(theirs[0].jaccard(theirs[1]) - exact) < 0.1


def test_distinct_stories_are_all_kept(tmp_path: Path) -> None:
    rng = random.Random(1)
    write_jsonl(tmp_path / "in.jsonl", [{"text": story(rng, lang)} for lang in ["en", "zh"] * 100])
    report = dedup.main(dedup.DedupConfig(inputs=[str(tmp_path / "in.jsonl")], out=str(tmp_path / "out"), workers=1))
    assert report["documents_out"] == 200 and report["removed"] == {}
