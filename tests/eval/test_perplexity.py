"""Perplexity: our sliding-window scores against transformers' loss on the same checkpoint, computed by hand."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_checkpoint, make_lineage, save_checkpoint
from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import Score, evaluate, read_text, resolve_texts, sum_nll, text_ids, windows
from lmforge.model import Transformer
from tests.test_cli import assert_one_line_error, lmforge
from tests.tiny import CORPUS, make_tiny_model, make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")
TEXT = " ".join(CORPUS * 3)  # ~150 tokens, both languages


def save_tiny(directory: Path, preset: str) -> Path:
    model = make_tiny_model(preset)
    save_checkpoint(directory, model.cfg, model.state_dict(), make_tiny_tokenizer(), make_lineage("test"))
    return directory


@pytest.fixture(scope="module", params=["llama-tiny", "qwen2-tiny"])
def tiny_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp(request.param) / "ckpt", request.param)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("qwen") / "ckpt", "qwen2-tiny")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def hf_window_nll(hf: torch.nn.Module, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """The sliding-window recipe of transformers' perplexity guide, summing instead of averaging."""
    x = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        labels = x[:, begin:end].clone()
        labels[:, : -(end - prev_end)] = -100  # context only: already scored by an earlier window
        with torch.no_grad():
            logits = hf(x[:, begin:end]).logits[0, :-1]
        targets = labels[0, 1:]
        keep = targets != -100
        nll += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
        count += int(keep.sum())
        prev_end = end
        if end == len(ids):
            break
    return nll, count


def test_whole_text_equals_transformers_loss(tiny_dir: Path, text_file: Path) -> None:
    model, tok = load_checkpoint(tiny_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids, _ = text_ids(tok, TEXT)
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()  # mean NLL of ids[1:]
    result = evaluate(model, tok, [text_file], window=len(ids), stride=1, progress=False)
    assert result["texts"][0]["tokens"] == len(ids) - 1
    assert result["total"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)


@pytest.mark.parametrize(("window", "stride", "batch_size"), [(32, 16, 1), (40, 7, 4), (64, 63, 2)])
def test_sliding_window_equals_transformers(tiny_dir: Path, window: int, stride: int, batch_size: int) -> None:
    model, tok = load_checkpoint(tiny_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids, _ = text_ids(tok, TEXT)
    want, count = hf_window_nll(hf, ids, window, stride)
    assert count == len(ids) - 1
    ours = sum_nll(model, ids, window, stride, batch_size, progress=False)
    assert ours == pytest.approx(want, rel=1e-5)


def test_windows_score_each_token_once_with_enough_context() -> None:
    for n, window, stride in [(10, 4, 2), (100, 32, 8), (5, 8, 4), (33, 16, 15)]:
        spans = windows(n, window, stride)
        scored = [t for w in spans for t in range(w.first, w.end)]
        assert scored == list(range(1, n))
        for w in spans:
            assert w.end - w.begin <= window and w.begin < w.first
            assert w.first - w.begin >= min(window - stride, w.first)  # context before the first scored token
    assert [(w.begin, w.end, w.first) for w in windows(10, 4, 2)] == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    with pytest.raises(LmforgeError):
        windows(10, 4, 4)  # the window's first token would have no context


def test_bits_per_byte_and_counts(qwen_dir: Path, text_file: Path) -> None:
    s = Score("x", tokens=10, bytes=40, nll=20.0)
    assert s.bits_per_byte == pytest.approx(20.0 / math.log(2) / 40)
    assert s.perplexity == pytest.approx(math.exp(2.0))
    model, tok = load_checkpoint(qwen_dir)
    row = evaluate(model, tok, [text_file], window=64, progress=False)["texts"][0]
    assert row["bytes"] == len(TEXT.encode("utf-8"))
    assert row["tokens"] == len(tok.encode(TEXT))  # the boundary token is context, every text token is scored
    assert row["bits_per_byte"] == pytest.approx(row["nll"] / math.log(2) / row["bytes"], rel=1e-4)


def test_shipped_texts_are_bilingual_prose() -> None:
    en, zh = (read_text(p) for p in resolve_texts("heldout"))
    assert len(en.encode()) > 3000 and len(zh.encode()) > 3000
    assert sum("\u4e00" <= c <= "\u9fff" for c in zh) > 1000


def test_bad_input_is_one_clear_error(tmp_path: Path, qwen_dir: Path) -> None:
    def error(path: Path) -> str:
        with pytest.raises(LmforgeError) as e:
            read_text(path)
        return str(e.value)

    assert "no such file" in error(tmp_path / "absent.txt")
    (tmp_path / "gbk.txt").write_bytes(b"abc" + "中文".encode("gbk"))
    assert "byte offset 3" in error(tmp_path / "gbk.txt")
    (tmp_path / "empty.txt").write_text(" \n")
    assert "empty" in error(tmp_path / "empty.txt")
    (tmp_path / "one.txt").write_text("a")
    model, tok = load_checkpoint(qwen_dir)
    with pytest.raises(LmforgeError, match="shorter than 2 tokens"):
        evaluate(model, tok, [tmp_path / "one.txt"], progress=False)


def test_cli(qwen_dir: Path, tmp_path: Path) -> None:
    proc = lmforge(
        "perplexity", "--model", str(qwen_dir), "--text", "heldout", "--window", "128", "--json", OMP_NUM_THREADS="1"
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [t["name"] for t in out["texts"]] == ["heldout_en.txt", "heldout_zh.txt"]
    assert (out["window"], out["stride"]) == (128, 64) and out["total"]["perplexity"] > 1
    (tmp_path / "bad.txt").write_bytes(b"ok \xff")
    assert_one_line_error(
        lmforge("perplexity", "--model", str(qwen_dir), "--text", str(tmp_path / "bad.txt")), "bad.txt", "byte offset 3"
    )


def test_reference_adds_kl_divergence_and_top1_agreement(qwen_dir: Path, text_file: Path) -> None:
    model, tok = load_checkpoint(qwen_dir)
    itself = evaluate(model, tok, [text_file], window=64, progress=False, reference=model)["total"]
    assert itself["kl"] == pytest.approx(0, abs=1e-6) and itself["same_top1"] == 1
    other = make_tiny_model("qwen2-tiny", seed=1)
    got = evaluate(model, tok, [text_file], window=256, progress=False, reference=other)["total"]
    ids = torch.tensor([text_ids(tok, TEXT)[0]])  # one window holds the whole text: compare with one forward
    with torch.no_grad():
        mine, ref = (torch.log_softmax(m(ids)[0, :-1], -1) for m in (model, other))
    assert got["kl"] == pytest.approx(float((ref.exp() * (ref - mine)).sum(-1).mean()), rel=1e-4)
    assert got["same_top1"] == pytest.approx(float((ref.argmax(-1) == mine.argmax(-1)).double().mean()))
    assert got["kl"] > 0.01 and got["same_top1"] < 1


def test_cli_reference(qwen_dir: Path, tmp_path: Path) -> None:
    proc = lmforge("perplexity", "--model", str(qwen_dir), "--reference", str(qwen_dir), "--window", "128")
    assert proc.returncode == 0, proc.stderr
    assert "same top-1" in proc.stdout and "100.0%" in proc.stdout.splitlines()[-1]
    model = make_tiny_model("qwen2-tiny")
    wider = Transformer(dataclasses.replace(model.cfg, vocab_size=model.cfg.vocab_size + 8))
    save_checkpoint(tmp_path / "wider", wider.cfg, wider.state_dict(), make_tiny_tokenizer(), make_lineage("test"))
    assert_one_line_error(
        lmforge("perplexity", "--model", str(qwen_dir), "--reference", str(tmp_path / "wider")),
        "needs the same tokenizer",
    )
