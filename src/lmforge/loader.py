"""Open a model for inference the way every front end does: resolve, load, quantize, attach an adapter.

`chat`, `generate`, `serve`, `perplexity` and `eval` all take `--model`, `--quant` and `--adapter`; this is the
one place those three flags turn into a model. It does not build engines or servers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    directory: Path  # the checkpoint directory the weights came from


def open_model(spec: str | None, quant: str | None = None, adapter: str | Path | None = None) -> Loaded:
    """`spec` is a catalog name, a .gguf file or a checkpoint directory (None: the catalog default).

    `quant` ("int8", "int4", "int4:g64", ...) loads the model quantized (see `quantized`); an adapter trained on a
    quantized base (QLoRA) expects the same `quant`, so quantization happens first and the adapter wraps it.
    """
    from lmforge.catalog import resolve_model
    from lmforge.checkpoint import load_checkpoint

    directory = resolve_model(spec)
    model, tokenizer = load_checkpoint(quantized(directory, quant) if quant else directory)
    if adapter:
        from lmforge.train.adapters import load_adapter

        load_adapter(model, Path(adapter))
    return Loaded(model, tokenizer, directory)


def quantized(directory: Path, quant: str) -> Path:
    """A quantized checkpoint of `directory`: itself when it already is one of that scheme, else one made by
    `lmforge quantize` once and kept in the cache (keyed on the source's files and the rounding code's version),
    since quantizing takes a while."""
    import hashlib

    from lmforge.catalog import cache_dir
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
