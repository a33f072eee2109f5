"""GGUF export, checked against the GGUF reader of transformers and against files written the way llama.cpp does."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_checkpoint, make_lineage, save_checkpoint
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.gguf_export import export_gguf
from lmforge.gguf_import import _open, read_gguf
from lmforge.model import Transformer
from tests.test_gguf_import import TEMPLATE, TEXTS, write_gguf
from tests.tiny import make_tiny_model, make_tiny_tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def save_tiny(directory: Path, preset: str, **overrides: object) -> Path:
    model = make_tiny_model(preset)
    if overrides:
        torch.manual_seed(0)
        model = Transformer(ModelConfig(**{**model.cfg.to_dict(), **overrides}))
        model.init_weights(std=0.2)
    tok = make_tiny_tokenizer()
    tok.chat_template = TEMPLATE
    save_checkpoint(directory, model.cfg, model.state_dict(), tok, make_lineage("test"))
    return directory


@pytest.fixture(scope="module", params=["llama-tiny", "qwen2-tiny"])
def tiny_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp(request.param) / "ckpt", request.param)


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def test_round_trip_through_our_reader(tiny_dir: Path, tmp_path: Path) -> None:
    model, tok = load_checkpoint(tiny_dir)
    cfg, state, tok2 = read_gguf(export_gguf(tiny_dir, tmp_path / "m.gguf", "f32", progress=False), progress=False)
    assert {**cfg.to_dict(), "eos_token_ids": []} == model.cfg.to_dict()  # the tiny config names no eos ids
    assert cfg.eos_token_ids == tok.eos_token_ids
    for name, tensor in model.state_dict().items():
        if name in state:
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    assert set(state) | {"lm_head.weight"} == set(model.state_dict())
    for text in TEXTS:
        assert tok2.encode(text) == tok.encode(text)
    assert tok2.chat_template == tok.chat_template and tok2.eos_tokens == tok.eos_tokens
    ours = Transformer(cfg).eval()
    ours.load_state_dict(state, strict=False)
    torch.testing.assert_close(logits(ours), logits(model), rtol=0, atol=0)


def test_transformers_loads_the_f32_export(tiny_dir: Path, tmp_path: Path) -> None:
    model, tok = load_checkpoint(tiny_dir)
    path = export_gguf(tiny_dir, tmp_path / "m.gguf", "f32", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    want = logits(model)
    assert want.std() > 1.0  # large enough that a wrong q/k row order would show
    torch.testing.assert_close(logits(hf), want, rtol=0, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert [hf_tok.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]


def rounded_like(model: Transformer, qtype: gguf.GGMLQuantizationType) -> Transformer:
    """The model with every matrix rounded through `qtype` by the gguf package's own kernels."""
    out = Transformer(model.cfg).eval()
    state = {}
    for name, w in model.state_dict().items():
        if w.dim() == 2:
            w = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype).reshape(w.shape)
        state[name] = torch.as_tensor(w)
    out.load_state_dict(state)
    return out


@pytest.mark.parametrize(
    "qtype", [gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0], ids=lambda q: q.name.lower()
)
def test_f16_and_q8_0_exports_load_in_transformers(tiny_dir: Path, tmp_path: Path, qtype: gguf.GGMLQuantizationType):
    model, _ = load_checkpoint(tiny_dir)
    path = export_gguf(tiny_dir, tmp_path / "m.gguf", qtype.name.lower(), progress=False)
    _, tensors = _open(path)
    assert tensors["blk.0.ffn_down.weight"].qtype == qtype
    assert tensors["blk.0.attn_norm.weight"].qtype == gguf.GGMLQuantizationType.F32
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    got, want = logits(hf), logits(model)
    torch.testing.assert_close(got, logits(rounded_like(model, qtype)), rtol=0, atol=1e-4)  # the same rounding
    assert ((got - want).pow(2).mean().sqrt() / want.std()).item() < 0.1  # and only a small error for it


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reproduces_a_llama_cpp_file(arch: str, tmp_path: Path) -> None:
    """GGUF (llama.cpp's layout) -> checkpoint -> GGUF gives back the same metadata and tensors."""
    original = write_gguf(tmp_path / "original.gguf", arch)
    cfg, state, tok = read_gguf(original, progress=False)
    save_checkpoint(tmp_path / "ckpt", cfg, state, tok, make_lineage("test"))
    exported = export_gguf(tmp_path / "ckpt", tmp_path / "exported.gguf", "f32", progress=False)
    (meta_a, tensors_a), (meta_b, tensors_b) = _open(original), _open(exported)
    keys = ["tokens", "token_type", "merges", "pre", "bos_token_id", "eos_token_id", "add_bos_token"]
    for key in keys:
        assert meta_b[f"tokenizer.ggml.{key}"] == meta_a[f"tokenizer.ggml.{key}"], key
    assert meta_b["tokenizer.chat_template"] == meta_a["tokenizer.chat_template"]
    for key in ("block_count", "attention.head_count", "attention.head_count_kv", "rope.freq_base"):
        assert meta_b[f"{arch}.{key}"] == meta_a[f"{arch}.{key}"], key
    assert set(tensors_b) == set(tensors_a)
    for name, t in tensors_a.items():  # q/k permuted back exactly as llama.cpp stored them
        want = gguf.quants.dequantize(t.data, t.qtype).reshape(t.shape)
        got = gguf.quants.dequantize(tensors_b[name].data, tensors_b[name].qtype).reshape(t.shape)
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_llama3_rope_scaling_as_llama_cpp_writes_it(tmp_path: Path) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    # One 64-wide head: enough frequencies in the interpolated band for the reader to recover the settings.
    theta, head_dim = 500000.0, 64
    directory = save_tiny(
        tmp_path / "ckpt",
        "llama-tiny",
        rope_scaling=scaling,
        rope_theta=theta,
        num_heads=1,
        num_kv_heads=1,
        head_dim=head_dim,
    )
    path = export_gguf(directory, tmp_path / "m.gguf", "f32", progress=False)
    # The divisors as llama.cpp's convert_hf_to_gguf.py computes them (LlamaModel.generate_extra_tensors).
    want = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
        want.append(1.0 if wavelen < 8192 / 4 else 8.0 if wavelen > 8192 else 1 / ((1 - smooth) / 8.0 + smooth))
    t = _open(path)[1]["rope_freqs.weight"]
    np.testing.assert_allclose(gguf.quants.dequantize(t.data, t.qtype), want, rtol=1e-5)
    cfg, _, _ = read_gguf(path, progress=False)
    got = dict(cfg.rope_scaling or {})
    assert got.pop("rope_type") == scaling.pop("rope_type") and got == pytest.approx(scaling, rel=1e-4)


def test_bad_requests_are_one_clear_error_and_write_nothing(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="q4_k"):
        export_gguf(tiny_dir, tmp_path / "m.gguf", "q4_k")
    with pytest.raises(LmforgeError, match="is a directory"):
        export_gguf(tiny_dir, tmp_path, "f32")
    model, tok = load_checkpoint(tiny_dir)
    from tokenizers import pre_tokenizers

    tok.backend.pre_tokenizer = pre_tokenizers.Whitespace()  # a split llama.cpp does not know
    save_checkpoint(tmp_path / "ws", model.cfg, model.state_dict(), tok, make_lineage("test"))
    with pytest.raises(LmforgeError, match="pre-tokenizer"):
        export_gguf(tmp_path / "ws", tmp_path / "ws.gguf", "f32")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_cli(tmp_path: Path) -> None:
    directory = save_tiny(tmp_path / "ckpt", "qwen2-tiny")
    out = tmp_path / "tiny.gguf"
    cmd = [sys.executable, "-m", "lmforge.cli", "export", str(directory), "--to", "gguf", "--type", "q8_0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # a tiny model: one thread is fastest
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and _open(out)[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
