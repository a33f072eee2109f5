"""Adapters on disk: a LoRA or P-Tuning v2 adapter saved apart from its base model, and loaded back onto it.

An adapter directory holds
  adapter.safetensors     only the trainable tensors (LoRA A/B matrices or the prefix keys/values), named as in
                          the model (`layers.0.self_attn.q_proj.lora_a`, `prefix.k`)
  adapter_config.json     method and its settings, the quantization the base had during training (QLoRA), and the
                          base: its ModelConfig, a fingerprint of its weights, where it came from
plus the run's lineage.json and logs when `lmforge sft` wrote it.
The fingerprint hashes the architecture and the RMSNorm weights, which neither quantization nor LoRA touch, so a
quantized base still matches its unquantized original while a different model or a full fine-tune does not.
It deliberately cannot tell a base from that base with another LoRA merged in.
Loading onto a plain base folds LoRA into the weights, so inference runs at base speed on the fast path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_path, write_json
from lmforge.model import Transformer
from lmforge.train.lora import LoraConfig, apply_lora, lora_layers, merge_lora
from lmforge.train.ptuning import PtuningConfig, apply_ptuning

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"
FORMAT_VERSION = 1


# Config fields that say how a model is read, not what its trunk is: the head kind and the padding id came after
# adapters did, so leaving them out also keeps older adapters' fingerprints valid.
NOT_ARCHITECTURE = ("num_labels", "pad_token_id")


def _architecture(model: Transformer) -> dict[str, Any]:
    """The model's config without quantization settings, which a QLoRA base adds and its original lacks."""
    return {k: v for k, v in model.cfg.to_dict().items() if "quant" not in k and k not in NOT_ARCHITECTURE}


def base_fingerprint(model: Transformer) -> str:
    """SHA-256 over the architecture and the RMSNorm weights (names, shapes, bytes)."""
    h = hashlib.sha256(json.dumps(_architecture(model), sort_keys=True).encode())
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's trainable tensors by model name."""
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n or n.startswith("prefix.")}


def save_adapter(
    model: Transformer,
    directory: Path,
    method: str,
    settings: LoraConfig | PtuningConfig,
    base: dict[str, Any],
    quant: str | None = None,
) -> None:
    """Write adapter.safetensors, then adapter_config.json (written last: its presence marks a whole adapter)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {n: t.to("cpu").contiguous() for n, t in adapter_tensors(model).items()}
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    config = {
        "format_version": FORMAT_VERSION,
        "method": method,
        method: settings.to_dict(),
        "quant": quant,
        "base": {**base, "fingerprint": base_fingerprint(model), "config": _architecture(model)},
    }
    write_json(directory / CONFIG, config)


def read_adapter_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise LmforgeError(f"{directory}: no {CONFIG}; pass a directory written by `lmforge sft --method lora|ptuning`")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path}: not valid JSON ({e}); re-create the adapter") from None
    if config.get("method") not in ("lora", "qlora", "ptuning"):
        raise LmforgeError(f"{path}: unknown adapter method {config.get('method')!r}; expected lora, qlora or ptuning")
    return config


def _check_base(model: Transformer, config: dict[str, Any], directory: Path) -> None:
    base = config["base"]
    if base.get("fingerprint") == base_fingerprint(model):
        return
    trained_on = base.get("name") or base.get("source") or "another model"
    if base.get("config") != _architecture(model):
        why = "its model config differs (a different architecture or size)"
    else:
        why = "the same architecture but different weights (its norm weights differ)"
    raise LmforgeError(
        f"{directory}: this adapter was trained on {trained_on}, and the model it is being loaded onto has {why}; "
        f"load it with --model {trained_on}"
    )


def _check_quant(model: Transformer, config: dict[str, Any], directory: Path) -> None:
    """A QLoRA adapter learned its update against quantized weights: refuse a base quantized otherwise."""
    from lmforge.quant import QuantScheme, scheme_of

    wanted = config.get("quant")
    have = scheme_of(model)
    if wanted and (have is None or have.label != QuantScheme.parse(wanted).label):
        now = "not quantized" if have is None else f"quantized as {have.label}"
        raise LmforgeError(
            f"{directory}: this QLoRA adapter was trained on a base quantized as {wanted}, and the model is {now}; "
            f"load it with --quant {wanted}"
        )


def load_adapter(model: Transformer, directory: Path, merge: bool = True) -> Transformer:
    """Apply the adapter in `directory` to `model` in place, refusing one trained on a different base.

    merge: fold LoRA into plain linear weights (inference at base speed); kept as wrappers over a quantized base.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_adapter_config(directory)
    _check_base(model, config, directory)
    _check_quant(model, config, directory)
    method = config["method"]
    if method in ("lora", "qlora"):
        apply_lora(model, LoraConfig(**config[method]))
    else:
        apply_ptuning(model, PtuningConfig(**config[method]))
    if not (directory / WEIGHTS).is_file():
        raise LmforgeError(f"{directory}: {WEIGHTS} is missing; the adapter was not saved completely")
    tensors = load_file(str(directory / WEIGHTS))
    expected = adapter_tensors(model)
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors)) or sorted(set(tensors) - set(expected))
        raise LmforgeError(f"{directory / WEIGHTS}: tensor {missing[0]} does not match {CONFIG}; re-create the adapter")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name])
    if merge and all(isinstance(layer.base, nn.Linear) for layer in lora_layers(model)):
        merge_lora(model)
    return model


def merge_into_checkpoint(model_spec: str | None, adapter: Path, out: Path) -> Path:
    """`lmforge merge`: base + LoRA adapter -> an ordinary checkpoint at `out`, with lineage naming both."""
    from lmforge.catalog import resolve_model
    from lmforge.checkpoint import load_checkpoint, make_lineage, read_lineage, save_checkpoint

    adapter = Path(adapter)
    config = read_adapter_config(adapter)
    if config["method"] == "ptuning":
        raise LmforgeError(f"{adapter}: a P-Tuning prefix cannot be folded into weights; use it with --adapter")
    if config.get("quant"):
        raise LmforgeError(
            f"{adapter}: a QLoRA adapter was trained on a {config['quant']} base; merging would bake "
            "the update into weights it never saw quantized. Use it with --quant "
            f"{config['quant']} --adapter {adapter}"
        )
    base_dir = resolve_model(model_spec)
    model, tokenizer = load_checkpoint(base_dir)
    load_adapter(model, adapter, merge=True)
    lineage = make_lineage(
        str(adapter.resolve()),
        kind="merge",
        base=str(base_dir),
        parent=read_lineage(adapter),
        base_lineage=read_lineage(base_dir),
    )
    save_checkpoint(Path(out), model.cfg, model.state_dict(), tokenizer, lineage)
    return Path(out)
