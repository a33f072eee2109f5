"""`--quant auto`, what chat and serve run without --quant: int8 on a CPU, unless the model or adapter needs other
weights; adapters of every kind still load under it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_checkpoint, make_lineage, save_checkpoint
from lmforge.config import ModelConfig
from lmforge.loader import default_quant, open_model
from lmforge.model import Transformer
from lmforge.quant import QuantScheme, scheme_of
from lmforge.quant.layers import quantize_
from lmforge.train.adapters import save_adapter
from lmforge.train.lora import LoraConfig, apply_lora, lora_layers
from lmforge.train.ptuning import PtuningConfig, apply_ptuning
from tests.tiny import make_tiny_model, make_tiny_tokenizer

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _save(directory: Path, model: Transformer, quantization: dict | None = None) -> Path:
    save_checkpoint(directory, model.cfg, model.state_dict(), make_tiny_tokenizer(), make_lineage("test"),
                    quantization=quantization)
    return directory


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return _save(tmp_path / "tiny" / "checkpoint", make_tiny_model("qwen2-tiny"))


def _logits(model: Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).float()


def _adapter(tiny_dir: Path, out: Path, method: str) -> Path:
    """An adapter as `lmforge sft` saves one, with random (not zero) updates so that it changes the output."""
    model, _ = load_checkpoint(tiny_dir)
    g = torch.Generator().manual_seed(1)
    if method == "ptuning":
        settings = PtuningConfig(prefix_len=4)
        apply_ptuning(model, settings)
        for p in model.prefix.parameters():
            p.data.copy_(torch.randn(p.shape, generator=g))
        save_adapter(model, out, method, settings, {"name": "tiny"})
        return out
    quant = "int4" if method == "qlora" else None
    if quant:
        quantize_(model, QuantScheme.parse(quant), progress=False)
    settings = LoraConfig(rank=4)
    apply_lora(model, settings)
    for layer in lora_layers(model):
        layer.lora_b.data.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.05)
    save_adapter(model, out, method, settings, {"name": "tiny"}, quant=quant)
    return out


def test_auto_is_int8_on_a_cpu_and_float_elsewhere(tiny_dir: Path) -> None:
    quant, line = default_quant(tiny_dir)
    assert quant == "int8" and "--quant none" in line
    assert default_quant(tiny_dir, device="cuda")[0] is None


def test_auto_int8_stays_close_to_float_and_none_is_float(tiny_dir: Path, capsys: pytest.CaptureFixture) -> None:
    auto = open_model(str(tiny_dir), "auto")
    assert "int8 weights" in capsys.readouterr().err
    float_ = open_model(str(tiny_dir), "none")
    assert scheme_of(auto.model).label == "int8" and scheme_of(float_.model) is None
    exact = _logits(float_.model)
    assert (_logits(auto.model) - exact).norm() < 0.05 * exact.norm()


def test_a_lora_adapter_loads_over_the_int8_base(tiny_dir: Path, tmp_path: Path) -> None:
    adapter = _adapter(tiny_dir, tmp_path / "lora", "lora")
    auto = open_model(str(tiny_dir), "auto", adapter).model
    assert scheme_of(auto).label == "int8" and lora_layers(auto)
    # What the adapter changes over the int8 base, against what it changes over the float one (LoRA merged).
    update = _logits(auto) - _logits(open_model(str(tiny_dir), "auto").model)
    peer = _logits(open_model(str(tiny_dir), "none", adapter).model) - _logits(open_model(str(tiny_dir), "none").model)
    assert (update - peer).norm() < 0.1 * peer.norm()


def test_a_qlora_adapter_gets_the_quantization_it_was_trained_on(tiny_dir: Path, tmp_path: Path) -> None:
    adapter = _adapter(tiny_dir, tmp_path / "qlora", "qlora")
    assert default_quant(tiny_dir, adapter)[0] == "int4"
    assert scheme_of(open_model(str(tiny_dir), "auto", adapter).model).label == "int4"


def test_a_ptuning_adapter_keeps_a_float_base(tiny_dir: Path, tmp_path: Path) -> None:
    adapter = _adapter(tiny_dir, tmp_path / "ptuning", "ptuning")
    quant, line = default_quant(tiny_dir, adapter)
    assert quant is None and "P-Tuning" in line
    loaded = open_model(str(tiny_dir), "auto", adapter)
    assert scheme_of(loaded.model) is None and loaded.model.prefix_len == 4


def test_a_quantized_checkpoint_runs_as_stored(tiny_dir: Path, tmp_path: Path) -> None:
    model, _ = load_checkpoint(tiny_dir)
    scheme = QuantScheme.parse("int4:mixed")
    quantize_(model, scheme, progress=False)
    stored = _save(tmp_path / "q4", model, scheme.to_config())
    quant, line = default_quant(stored)
    assert quant is None and "int4:mixed" in line
    assert scheme_of(open_model(str(stored), "auto").model).label == "int4:mixed"


def test_widths_the_int8_groups_do_not_divide_keep_float(tmp_path: Path) -> None:
    cfg = ModelConfig(vocab_size=512, hidden_size=48, intermediate_size=96, num_layers=1, num_heads=4,
                      num_kv_heads=2, max_seq_len=64)
    torch.manual_seed(0)
    directory = _save(tmp_path / "odd", Transformer(cfg))
    quant, line = default_quant(directory)
    assert quant is None and "48" in line
    assert scheme_of(open_model(str(directory), "auto").model) is None
