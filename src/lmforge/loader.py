"""Open a model for inference the way every front end does: resolve, load, quantize, attach an adapter.

`chat`, `generate`, `serve`, `perplexity` and `eval` all take `--model`, `--quant` and `--adapter`; this is the
one place those three flags turn into a model, and where `chat` and `serve` choose a quantization when none is
given (`--quant auto`, see `default_quant`). It does not build engines or servers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge.model import Transformer
from lmforge.paths import cache_dir
from lmforge.tokenizer import Tokenizer

# What `--quant auto` (chat and serve without --quant) picks, by the device the weights run on; open_model loads on
# the CPU. A CPU decodes as fast as it reads weights, so fewer bytes win: on Qwen2.5-Coder-0.5B int8 decodes 3.8x
# faster than fp32 (36.6 against 9.7 tok/s) at a KL to fp32 of 0.0002 (98.5% same top-1); int4:mixed is 1.2x faster
# again (44.0) at 100x the KL (0.0239), solves 4 fewer of 30 arithmetic problems than int8 and takes 3x longer to
# make on first use (README, bench/quant.py). A device missing here (a GPU) keeps float.
DEFAULT_QUANT = {"cpu": "int8"}
AUTO, FLOAT = "auto", "none"  # the --quant values that are not schemes


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    directory: Path  # the checkpoint directory the weights came from


def open_model(spec: str | None, quant: str | None = None, adapter: str | Path | None = None) -> Loaded:
    """`spec` is a catalog name, a .gguf file or a checkpoint directory (None: the catalog default).

    `quant` ("int8", "int4", "int4:g64", ...) loads the model quantized (see `quantized`); an adapter trained on a
    quantized base (QLoRA) expects the same `quant`, so quantization happens first and the adapter wraps it.
    "none" (or None) keeps the checkpoint's weights as they are; "auto" takes `default_quant` and says which on stderr.
    """
    from lmforge.catalog import resolve_model
    from lmforge.checkpoint import load_checkpoint

    directory = resolve_model(spec)
    if quant == AUTO:
        quant, why = default_quant(directory, adapter)
        print(f"lmforge: {why}", file=sys.stderr)
    elif quant == FLOAT:
        quant = None
    model, tokenizer = load_checkpoint(quantized(directory, quant) if quant else directory)
    if adapter:
        from lmforge.train.adapters import load_adapter

        load_adapter(model, Path(adapter))
    return Loaded(model, tokenizer, directory)


def default_quant(directory: Path, adapter: str | Path | None = None, device: str = "cpu") -> tuple[str | None, str]:
    """The --quant that "auto" means for this checkpoint and adapter, and the start-up line that says what runs."""
    from lmforge.checkpoint import read_config, read_quantization
    from lmforge.quant import QuantScheme

    if (stored := read_quantization(directory)) is not None:
        return None, f"{stored.label} weights, as the checkpoint stores them"
    if adapter:
        from lmforge.train.adapters import read_adapter_config

        config = read_adapter_config(Path(adapter))
        if config.get("quant"):  # QLoRA: the adapter learned its update against exactly these weights
            return config["quant"], f"{config['quant']} weights, the base the QLoRA adapter was trained on"
        if config["method"] == "ptuning":  # its prefix is built from the float embedding table
            return None, "float32 weights: a P-Tuning adapter loads on a float base"
        # LoRA stays beside the INT8 layers, unmerged: still 2.8x fp32 with LoRA merged (Qwen2.5-Coder-0.5B, 1 thread)
    wanted = DEFAULT_QUANT.get(device)
    if wanted is None:
        return None, f"float32 weights (on {device})"
    cfg, group = read_config(directory), QuantScheme.parse(wanted).group_size
    widths = sorted({cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size})
    if any(w % group for w in widths):
        return None, f"float32 weights: {wanted} needs layer widths divisible by {group}, this model has {widths}"
    return wanted, f"{wanted} weights, the {device.upper()} default (--quant none for float32)"


def quantized(directory: Path, quant: str) -> Path:
    """A quantized checkpoint of `directory`: itself when it already is one of that scheme, else one made by
    `lmforge quantize` once and kept in the cache (keyed on the source's files and the rounding code's version),
    since quantizing takes a while."""
    import hashlib

    from lmforge.checkpoint import is_checkpoint, read_quantization, weight_files
    from lmforge.errors import LmforgeError
    from lmforge.quant import QuantScheme
    from lmforge.quant.pack import ROUNDING_VERSION
    from lmforge.quant.quantize import QuantizeConfig, main

    scheme = QuantScheme.parse(quant)
    existing = read_quantization(directory)
    if existing is not None:
        # A flag without a method accepts any rounding of its format; int4:gptq asks for GPTQ's.
        method = scheme.method if scheme.method == "gptq" else existing.method
        wanted = (scheme.bits, scheme.group_size, scheme.int8_layers, method)
        if (existing.bits, existing.group_size, existing.int8_layers, existing.method) != wanted:
            raise LmforgeError(
                f"{directory} is already quantized ({existing.label}); drop --quant or give its float checkpoint"
            )
        return directory
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weight_files(directory)]
    key = hashlib.sha256(repr((str(directory.resolve()), scheme, files, ROUNDING_VERSION)).encode()).hexdigest()[:12]
    out = cache_dir() / "quantized" / f"{directory.parent.name}-{scheme.label.replace(':', '-')}-{key}"
    if not is_checkpoint(out):
        slow = " (GPTQ: about 9 min for a 0.5B model on 2 cores)" if scheme.method == "gptq" else ""
        print(f"lmforge: quantizing {directory} to {scheme.label} once{slow}; kept at {out}", file=sys.stderr)
        main(
            QuantizeConfig(
                out=str(out),
                model=str(directory),
                bits=scheme.bits,
                group_size=scheme.group_size,
                int8_layers=scheme.int8_layers,
                method=scheme.method,
            )
        )
    return out
