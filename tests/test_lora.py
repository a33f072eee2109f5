"""LoRA and QLoRA: start at the base, merged equals unmerged (and transformers agrees), gradients equal a LoRA
written by hand, dropout shares one mask per input, only adapters train, adapters round-trip through disk and
refuse a different base."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train.adapters import load_adapter, save_adapter
from lmforge.train.loop import TrainConfig, train
from lmforge.train.lora import LoraConfig, LoraLinear, apply_lora, drop_mask, lora_layers, merge_lora
from tests.tiny import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


IDS = torch.tensor([[5, 9, 100, 42, 7, 300, 12, 3], [1, 2, 3, 4, 5, 6, 7, 8]])


def randomize(model: Transformer, seed: int = 1) -> None:
    """Give every LoRA B a nonzero value, as training would (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.05)


def logits(model: Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def test_lora_starts_at_the_base_and_matches_its_formula(tiny_model: Transformer) -> None:
    base = logits(tiny_model)
    model = apply_lora(copy.deepcopy(tiny_model), LoraConfig(rank=4, alpha=8))
    assert torch.equal(logits(model), base)
    randomize(model)
    layer = model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features)
    w, b = layer.base.weight, layer.base.bias
    by_hand = x @ w.T + (0 if b is None else b) + 2.0 * (x @ layer.lora_a.T) @ layer.lora_b.T  # alpha/rank = 2
    torch.testing.assert_close(layer(x), by_hand)


def test_only_lora_matrices_are_trainable(tiny_model: Transformer) -> None:
    model = apply_lora(tiny_model, LoraConfig(rank=4, targets=("q_proj", "v_proj")))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".q_proj.lora_" in n or ".v_proj.lora_" in n for n in names)
    assert len(names) == 2 * 2 * len(model.layers)


def test_merged_equals_unmerged(tiny_model: Transformer) -> None:
    model = apply_lora(copy.deepcopy(tiny_model), LoraConfig(rank=4, alpha=8))
    randomize(model)
    unmerged = logits(model)
    assert not torch.allclose(unmerged, logits(tiny_model))
    merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert set(model.state_dict()) == set(tiny_model.state_dict())
    torch.testing.assert_close(logits(model), unmerged, atol=1e-4, rtol=1e-4)


def test_gradients_equal_a_lora_written_by_hand(tiny_model: Transformer) -> None:
    """The shared, stacked and in-place products must give the gradients of y = W x + s B A x, layer by layer."""
    model = apply_lora(copy.deepcopy(tiny_model), LoraConfig(rank=4, alpha=8))
    randomize(model)
    reference = copy.deepcopy(tiny_model)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLinear):
            a, b = layer.lora_a.detach().clone().requires_grad_(), layer.lora_b.detach().clone().requires_grad_()
            factors[name] = (a, b)
            plain = reference.get_submodule(name)
            plain.register_forward_hook(lambda _m, args, y, a=a, b=b: y + 2.0 * (args[0] @ a.T) @ b.T)
    weights = torch.randn(*IDS.shape, tiny_model.cfg.vocab_size, generator=torch.Generator().manual_seed(2))
    (model(IDS) * weights).sum().backward()
    (reference(IDS) * weights).sum().backward()
    for name, (a, b) in factors.items():
        layer = model.get_submodule(name)
        torch.testing.assert_close(layer.lora_a.grad, a.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.lora_b.grad, b.grad, atol=1e-4, rtol=1e-4)


def test_dropout_mask_rate_and_one_mask_per_shared_input(tiny_model: Transformer) -> None:
    drop, p = drop_mask(torch.empty(1000, 1000), 0.05)
    assert p == round(0.05 * 65536) / 65536
    by_chunk = drop.view(-1, 4).float().mean(0)  # every 16-bit chunk of each 64-bit draw decides alike
    assert torch.allclose(by_chunk, torch.full((4,), p), atol=0.003), by_chunk

    model = apply_lora(tiny_model, LoraConfig(rank=4, dropout=0.5)).train()
    attn = model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.lora_a.copy_(attn.q_proj.lora_a)
    x = torch.randn(2, 8, attn.q_proj.in_features)
    hq, scale = attn.q_proj.shared.down(x, attn.q_proj)
    hk, _ = attn.k_proj.shared.down(x, attn.k_proj)
    assert scale == 2.0 and torch.equal(hq, hk)  # the same features dropped for q and k
    attn.v_proj.shared.down(x, attn.v_proj)  # the last member: the pass is complete
    again, _ = attn.q_proj.shared.down(x, attn.q_proj)  # the next pass draws a new mask
    assert not torch.equal(again, hq)
    assert not torch.equal(hq, (x @ attn.q_proj.lora_a.T).flatten(0, 1))


def test_merged_checkpoint_loads_in_transformers(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    """The trusted peer: transformers, reading the merged checkpoint, computes what our adapter model computes."""
    transformers = pytest.importorskip("transformers")
    from lmforge.checkpoint import make_lineage, save_checkpoint

    model = apply_lora(make_tiny_model("qwen2-tiny"), LoraConfig(rank=4, alpha=8))
    randomize(model)
    expected = logits(model)
    merge_lora(model)
    save_checkpoint(tmp_path, model.cfg, model.state_dict(), tiny_tokenizer, make_lineage("test"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, expected, atol=1e-4, rtol=1e-4)


def tiny_batches(step: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 512, (2, 12), generator=g)
    return [{"input_ids": ids[:, :-1], "targets": ids[:, 1:]}]


def train_briefly(model: Transformer, run_dir: Path, steps: int = 4) -> None:
    cfg = TrainConfig(max_steps=steps, lr=1e-2, progress=False)
    train(model, tiny_batches, [], cfg, run_dir)


def test_training_changes_only_the_adapter(tiny_model: Transformer, tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    model = apply_lora(tiny_model, LoraConfig(rank=4))
    train_briefly(model, tmp_path)
    after = model.state_dict()
    for name, value in before.items():
        wrapped = name.replace("_proj.", "_proj.base.") if name.replace("_proj.", "_proj.base.") in after else name
        assert torch.equal(after[wrapped], value), name
    assert all(layer.lora_b.abs().sum() > 0 for layer in lora_layers(model))


def test_adapter_round_trip_and_refusal(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = apply_lora(make_tiny_model("llama-tiny"), LoraConfig(rank=4))
    train_briefly(model, tmp_path / "run")
    expected = logits(model)
    save_adapter(model, tmp_path / "adapter", "lora", LoraConfig(rank=4), {"name": "tiny-llama"})
    assert (tmp_path / "adapter" / "adapter.safetensors").stat().st_size < 64 * 1024

    loaded = load_adapter(make_tiny_model("llama-tiny"), tmp_path / "adapter")
    assert not lora_layers(loaded)  # folded into the weights for inference
    torch.testing.assert_close(logits(loaded), expected, atol=1e-4, rtol=1e-4)

    other = make_tiny_model("llama-tiny")
    with torch.no_grad():
        other.norm.weight.mul_(1.01)  # as after a full fine-tune (tiny models start with all-one norms)
    with pytest.raises(LmforgeError, match="trained on tiny-llama.*different weights"):
        load_adapter(other, tmp_path / "adapter")
    with pytest.raises(LmforgeError, match="trained on tiny-llama.*model config differs"):
        load_adapter(make_tiny_model("qwen2-tiny"), tmp_path / "adapter")


def test_qlora_trains_over_a_frozen_quantized_base(tmp_path: Path) -> None:
    from lmforge.quant import QuantLinear, QuantScheme, quantize_

    def quantized() -> Transformer:
        return quantize_(make_tiny_model("qwen2-tiny"), QuantScheme.parse("int8"), progress=False)

    model = apply_lora(quantized(), LoraConfig(rank=4))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    assert isinstance(model.layers[0].mlp.down_proj.base, QuantLinear)
    train_briefly(model, tmp_path / "run")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    assert all(layer.lora_b.abs().sum() > 0 for layer in lora_layers(model))
    expected = logits(model)

    save_adapter(model, tmp_path / "adapter", "qlora", LoraConfig(rank=4), {"name": "tiny-qwen"}, quant="int8")
    loaded = load_adapter(quantized(), tmp_path / "adapter")
    assert lora_layers(loaded)  # a quantized base keeps the wrappers
    torch.testing.assert_close(logits(loaded), expected)
    with pytest.raises(LmforgeError, match="quantized base"):
        merge_lora(loaded)
