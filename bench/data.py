"""Corpus pipeline throughput (MB/s of input text) for clean, dedup and tokenize, lmforge beside datatrove.

    python bench/data.py [--docs 20000] [--workers 2]

Corpus: lmforge's synthetic English and Chinese stories, with planted duplicates (5% exact copies with changed
spacing and case, 5% near copies with one character in 100 replaced) and 5% spam (repeated phrases), shuffled with a
fixed seed, written as JSONL. Both tools read the same file with the same number of worker processes.
- clean: ours (`lmforge data clean`: normalization, language id, Gopher/C4-style filters, PII) beside datatrove's
  GopherRepetitionFilter + GopherQualityFilter + C4QualityFilter (no language filter: datatrove's needs a fastText
  model download);
- dedup: ours (exact + MinHash LSH, character 5-grams, 128 permutations) beside datatrove's four MinHash stages
  (signatures, buckets, clusters, filter; its defaults, word 5-grams and 14 buckets x 8 hashes, but its sha1 hash:
  its default xxhash raises on str input with the installed xxhash 4.x);
- tokenize: ours (`lmforge data tokenize`) beside datatrove's DocumentTokenizer, the same tokenizer.json (trained
  here with `lmforge tokenizer train`).
Dedup also reports, per planted cluster (an original and its copies), copies left over and clusters lost whole,
and distinct documents removed (false positives; synthetic stories do share phrases).
Ratios are ours / datatrove's in the same run; absolute numbers vary with machine load.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path


def make_corpus(path: Path, docs: int, seed: int = 0) -> dict:
    from lmforge.data.synth import story

    rng = random.Random(seed)
    records = [{"text": story(rng, lang), "id": f"orig-{i}"} for i, lang in enumerate(["en", "zh"] * (docs // 2))]
    n = docs // 20
    for i in rng.sample(range(len(records)), n):
        records.append({"text": "  " + records[i]["text"].upper() + " ", "id": f"exact-{i}"})
    for i in rng.sample(range(docs), n):
        chars = list(records[i]["text"])
        for _ in range(max(1, len(chars) // 100)):
            chars[rng.randrange(len(chars))] = rng.choice("xyz的了")
        records.append({"text": "".join(chars), "id": f"near-{i}"})
    spam = ["buy cheap pills now and save big today! ", "点击这里领取免费大奖！"]
    records += [{"text": rng.choice(spam) * 40, "id": f"spam-{k}"} for k in range(n)]
    rng.shuffle(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"documents": len(records), "planted_duplicates": 2 * n, "spam": n}


def _timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _ids(folder: Path) -> list[str]:
    import gzip

    ids = []
    for f in sorted(folder.rglob("*.jsonl*")):
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt", encoding="utf-8") as fh:
            ids += [json.loads(line).get("id") or json.loads(line).get("metadata", {}).get("id") for line in fh]
    return ids


def _removal(kept_ids: list[str], all_ids: list[str]) -> dict:
    """Per cluster (an original and its planted copies): how many survive. One is right; the first kept may be a
    copy, since the copies are shuffled among the originals."""
    kept = set(kept_ids)
    clusters: dict[str, list[str]] = {}
    for i in all_ids:
        if not i.startswith("spam-"):
            clusters.setdefault(i.split("-", 1)[1], []).append(i)
    planted = [members for members in clusters.values() if len(members) > 1]
    alone = [members[0] for members in clusters.values() if len(members) == 1]
    return {
        "clusters": len(planted),
        "extra_copies_left": sum(max(0, sum(m in kept for m in members) - 1) for members in planted),
        "clusters_lost": sum(all(m not in kept for m in members) for members in planted),
        "distinct_removed": sum(i not in kept for i in alone),
    }


def ours(work: Path, src: Path, workers: int) -> dict:
    from lmforge.data import clean, dedup, tokenize
    from lmforge.tokenizer_train import TokenizerTrainConfig
    from lmforge.tokenizer_train import main as train_tokenizer

    train_tokenizer(TokenizerTrainConfig(data=[str(src)], out=str(work / "tok"), vocab_size=4096, max_chars=2_000_000))
    t = {
        "clean": _timed(lambda: clean.main(clean.CleanConfig([str(src)], str(work / "clean"), workers=workers))),
        "dedup": _timed(lambda: dedup.main(dedup.DedupConfig([str(src)], str(work / "dedup"), workers=workers))),
        "tokenize": _timed(lambda: tokenize.main(
            tokenize.TokenizeConfig([str(src)], str(work / "tok"), str(work / "tokens")))),
    }
    return {"seconds": t, "dedup": _ids(work / "dedup"), "clean_kept": len(_ids(work / "clean"))}


def datatrove(work: Path, src: Path, workers: int, tokenizer_json: Path) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    # one input shard per worker, as datatrove parallelises over files
    shards = work / "in"
    shards.mkdir(parents=True)
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    for k in range(workers):
        (shards / f"{k:03d}.jsonl").write_text("".join(lines[k::workers]), encoding="utf-8")

    def reader() -> JsonlReader:
        return JsonlReader(str(shards), id_key="id")

    def run(pipeline: list, tasks: int = workers, name: str = "x") -> None:
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers,
                              logging_dir=str(work / "logs" / name)).run()

    # xxhash (its default) fails here on str input with xxhash 4.x, so sha1 as datatrove also offers
    cfg = MinhashConfig(hash_config=HashConfig(precision=64, hash_fc="sha1"))
    sig, buckets, clusters = work / "sig", work / "buckets", work / "clusters"
    t = {
        "clean": _timed(lambda: run([reader(), GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(),
                                     JsonlWriter(str(work / "clean"), compression=None)], name="clean")),
        "dedup": _timed(lambda: (
            run([reader(), MinhashDedupSignature(str(sig), config=cfg)], name="sig"),
            run([MinhashDedupBuckets(str(sig), str(buckets), config=cfg)], tasks=cfg.num_buckets, name="buckets"),
            run([MinhashDedupCluster(str(buckets), str(clusters), config=cfg)], tasks=1, name="cluster"),
            run([reader(), MinhashDedupFilter(str(clusters)), JsonlWriter(str(work / "dedup"), compression=None)],
                name="filter"),
        )),
        "tokenize": _timed(lambda: run([reader(), DocumentTokenizer(
            str(work / "tokens"), str(tokenizer_json), eos_token="<|endoftext|>", shuffle_documents=False,
        )], name="tok")),
    }
    return {"seconds": t, "dedup": _ids(work / "dedup"), "clean_kept": len(_ids(work / "clean"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from loguru import logger

    logger.remove()
    root = Path(tempfile.mkdtemp(prefix="lmforge-bench-data-"))
    try:
        src = root / "raw" / "corpus.jsonl"
        corpus = make_corpus(src, args.docs)
        mb = src.stat().st_size / 1e6
        all_ids = [json.loads(line)["id"] for line in src.read_text(encoding="utf-8").splitlines()]
        a = ours(root / "ours", src, args.workers)
        b = datatrove(root / "datatrove", src, args.workers, root / "ours" / "tok" / "tokenizer.json")
        print(f"corpus: {corpus['documents']:,} documents, {mb:.1f} MB, {corpus['planted_duplicates']:,} planted "
              f"duplicates, {corpus['spam']:,} spam; {args.workers} workers")
        print(f"{'stage':10} {'lmforge MB/s':>13} {'datatrove MB/s':>15} {'ratio':>7}")
        for stage in ("clean", "dedup", "tokenize"):
            ra, rb = mb / a["seconds"][stage], mb / b["seconds"][stage]
            print(f"{stage:10} {ra:13.2f} {rb:15.2f} {ra / rb:7.2f}x")
        print(f"clean kept: lmforge {a['clean_kept']:,}, datatrove {b['clean_kept']:,} (of {corpus['documents']:,})")
        for name, r in (("lmforge", a), ("datatrove", b)):
            rem = _removal(r["dedup"], all_ids)
            print(f"dedup {name}: {rem['extra_copies_left']:,} planted copies left in {rem['clusters']:,} clusters, "
                  f"{rem['clusters_lost']:,} clusters lost whole, {rem['distinct_removed']:,} distinct documents "
                  f"removed")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
