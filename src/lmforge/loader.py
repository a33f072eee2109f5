"""Open a model for inference the way every front end does: resolve, load, quantize, attach an adapter.

`chat`, `generate`, `serve`, `perplexity` and `eval` all take `--model`, `--quant` and `--adapter`; this is the
one place those three flags turn into a model. It does not build engines or servers.
"""

from __future__ import annotations

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

    `quant` ("int8", "int4", "int4:g64", ...) quantizes the linear layers on load; an adapter trained on a
    quantized base (QLoRA) expects the same `quant`, so quantization happens first and the adapter wraps it.
    """
    from lmforge.catalog import resolve_model
    from lmforge.checkpoint import load_checkpoint

    directory = resolve_model(spec)
    model, tokenizer = load_checkpoint(directory)
    if quant:
        from lmforge.quant import QuantScheme, quantize_

        quantize_(model, QuantScheme.parse(quant))
    if adapter:
        from lmforge.train.adapters import load_adapter

        load_adapter(model, Path(adapter))
    return Loaded(model, tokenizer, directory)
