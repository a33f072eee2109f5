"""The corpus pipeline end to end through the CLI: bad input counted, determinism, flat memory, atomic output."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.cli import main as cli
from lmforge.data import clean, stats, synth, tokenize
from lmforge.data.shards import TokenShards
from lmforge.data.synth import story
from lmforge.errors import LmforgeError
from tests.data.conftest import read_jsonl, write_jsonl
from tests.data.test_filters import BAD, EN_GOOD, ZH_GOOD, ZH_TRADITIONAL


def mixed_corpus(root: Path) -> Path:
    """A folder in every input format, with duplicates, spam, PII, traditional Chinese and broken lines."""
    rng = random.Random(0)
    stories = [story(rng, lang) for lang in ["en", "zh"] * 40]
    src = root / "raw"
    write_jsonl(src / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(stories)])
    with open(src / "a.jsonl", "ab") as f:
        f.write(b'{"text": "broken json\n{"no_text": 1}\n{"text": "bad \xff\xfe utf-8 ' + EN_GOOD.encode() + b'"}\n')
    (src / "b.txt").write_text(f"{EN_GOOD} Write to me@example.org.\n\n{ZH_TRADITIONAL}\n\n{stories[3]}\n", "utf-8")
    pq.write_table(pa.table({"text": [ZH_GOOD, BAD["zh spam"][0], BAD["en boilerplate"][0]], "n": [1, 2, 3]}),
                   src / "c.parquet")
    (src / "empty.jsonl").write_text("")
    return src


def run_pipeline(root: Path, src: Path, tokenizer_dir: Path, workers: str) -> None:
    assert cli(["data", "clean", "--input", str(src), "--out", str(root / "clean"), "--workers", workers]) == 0
    dedup = ["data", "dedup", "--input", str(root / "clean"), "--out", str(root / "dedup"), "--workers", workers]
    assert cli(dedup) == 0
    assert cli(["data", "tokenize", "--input", str(root / "dedup"), "--tokenizer", str(tokenizer_dir),
                "--out", str(root / "tokens")]) == 0


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:  # noqa: ANN001
    path = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer.save(path)
    return path


def test_pipeline_is_deterministic_and_reports_what_it_removed(tmp_path: Path, tokenizer_dir: Path) -> None:
    src = mixed_corpus(tmp_path)
    run_pipeline(tmp_path / "one", src, tokenizer_dir, "1")
    run_pipeline(tmp_path / "two", src, tokenizer_dir, "2")  # another worker count, same bytes
    for stage in ("clean", "dedup", "tokens"):
        one, two = sorted((tmp_path / "one" / stage).iterdir()), sorted((tmp_path / "two" / stage).iterdir())
        for a, b in zip(one, two, strict=True):
            if a.suffix in (".jsonl", ".bin", ".idx"):
                assert a.read_bytes() == b.read_bytes(), a.name
    report = json.loads((tmp_path / "one" / "clean" / "stats.json").read_text())
    assert report["input_problems"] == {"malformed_json": 1, "missing_text": 1, "invalid_utf8": 1, "empty_file": 1}
    assert report["input_problem_locations"]["malformed_json"] == [f"{src / 'a.jsonl'}:81"]
    assert report["removed"] == {"boilerplate": 2}
    assert report["pii_replaced"] == {"<EMAIL>": 1}
    texts = [r["text"] for r in read_jsonl(tmp_path / "one" / "clean")]
    simplified = "这是一个关于学习与记忆的故事，我们每天都在图书馆里读书，写下自己的想法。"
    assert simplified in texts  # converted from traditional
    assert any("<EMAIL>" in t for t in texts) and any("bad \ufffd\ufffd utf-8" in t for t in texts)
    dedup_report = json.loads((tmp_path / "one" / "dedup" / "stats.json").read_text())
    # stories[3] came twice; EN_GOOD once with an e-mail after it, once after broken UTF-8
    assert dedup_report["removed"] == {"exact_duplicate": 1, "near_duplicate": 1}
    shards = TokenShards.open(tmp_path / "one" / "tokens", verify=True)
    assert shards.manifest["documents"] == dedup_report["documents_out"]
    assert (tmp_path / "one" / "tokens" / "lengths.png").stat().st_size > 1000
    assert stats.main(stats.StatsConfig([str(tmp_path / "one" / "tokens")]))["tokens"] == shards.num_tokens


def test_output_of_another_run_is_refused_and_a_failed_stage_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "in"
    write_jsonl(src / "a.jsonl", [{"text": EN_GOOD}])
    pq.write_table(pa.table({"body": ["no text column"]}), src / "z.parquet")  # read last: fails mid-stage
    out = tmp_path / "out"
    with pytest.raises(LmforgeError, match="no `text` column"):
        clean.main(clean.CleanConfig(inputs=[str(src)], out=str(out), workers=1))
    assert not out.exists() and list(tmp_path.iterdir()) == [src]  # no half-written output, no temporary left
    (src / "z.parquet").unlink()
    clean.main(clean.CleanConfig(inputs=[str(src)], out=str(out), workers=1))
    clean.main(clean.CleanConfig(inputs=[str(src)], out=str(out), workers=1))  # a re-run of the same stage is fine
    with pytest.raises(LmforgeError, match="holds a `clean` run"):
        tokenize.main(tokenize.TokenizeConfig(inputs=[str(src)], tokenizer="unused", out=str(out)))
    assert cli(["data", "dedup", "--input", str(src), "--out", str(src)]) == 1  # a folder of raw files: refused
    with pytest.raises(LmforgeError, match="is an input"):
        stats.main(stats.StatsConfig([str(out)], out=str(out)))  # would replace the shards it describes


def test_bad_utf8_skip_drops_the_line(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"ok line one\n\xff bad line\nok line two\n")
    from lmforge.data.io import InputIssues, read_records

    issues = InputIssues()
    records = list(read_records([tmp_path / "a.txt"], issues, bad_utf8="skip"))
    assert [r["text"] for r in records] == ["ok line one\nok line two"]
    assert issues.counts == {"invalid_utf8": 1} and issues.locations["invalid_utf8"] == [f"{tmp_path / 'a.txt'}:2"]


def _tokenize_peak(tmp_path: Path, tokenizer_dir: Path, docs: int) -> int:
    src = tmp_path / f"synth-{docs}"  # a stage's output: tokenize hashes its manifest, not the whole text again
    synth.main(synth.SynthConfig(out=str(src), docs=docs, seed=docs))
    cfg = tokenize.TokenizeConfig(inputs=[str(src)], tokenizer=str(tokenizer_dir), out=str(tmp_path / f"t{docs}"),
                                  shard_tokens=1 << 14, chunk_docs=64)
    tracemalloc.start()
    tokenize.main(cfg)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_memory_stays_flat_as_the_corpus_grows(tmp_path: Path, tokenizer_dir: Path) -> None:
    _tokenize_peak(tmp_path, tokenizer_dir, 100)  # imports and the report's plotting allocate once, here
    small = _tokenize_peak(tmp_path, tokenizer_dir, 500)
    large = _tokenize_peak(tmp_path, tokenizer_dir, 4000)  # ~1 MB of text, 63 chunks of 64 documents
    sizes = [(tmp_path / f"synth-{n}" / "part-00000.jsonl").stat().st_size for n in (500, 4000)]
    growth = sizes[1] - sizes[0]
    assert large < 1.25 * small + (1 << 19), (small, large)  # the corpus grew 8x (~0.9 MB more), the peak did not
    assert large - small < growth / 4, (small, large, growth)
