"""The `lmforge quantize` stage: a float checkpoint in, a quantized checkpoint out.

The output is a normal checkpoint directory whose config.json carries `quantization_config` (the scheme,
never inferred from a file name) and whose safetensors hold each quantized linear as `qweight`, `scales`
(and `mins` for INT4); `lmforge chat/generate/serve --model OUT` load it straight into the quantized layers.
Calibrated rounding (GPTQ) reads a small text; round-to-nearest needs none. Nothing is written on any error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.quant.scheme import QuantScheme


@dataclass
class QuantizeConfig:
    out: str
    model: str | None = None  # catalog name, .gguf or checkpoint directory (None: the catalog default)
    bits: int = 4
    group_size: int = 32
    head_bits: int | None = 8
    embed_bits: int | None = 8  # an untied embedding table; a tied one shares the quantized head
    method: str = "rtn"
    int8_layers: tuple[str, ...] = ()  # block linears kept at INT8 in an INT4 scheme (scheme.RECIPES names sets)
    calib: str | None = None  # UTF-8 text for GPTQ (default: the bilingual calibration text shipped with lmforge)
    calib_samples: int = 32  # windows of calib_seq_len tokens spread over the text
    calib_seq_len: int = 256
    progress: bool = True


def weight_bytes(model) -> int:  # noqa: ANN001 - any nn.Module
    """Bytes of every parameter and persistent buffer, counting a tied tensor once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total - model.rope_cos.nbytes - model.rope_sin.nbytes  # the RoPE tables are recomputed, not weights


def main(cfg: QuantizeConfig) -> dict:
    from lmforge.catalog import resolve_model
    from lmforge.checkpoint import (
        generation_defaults,
        load_checkpoint,
        make_lineage,
        read_lineage,
        read_quantization,
        save_checkpoint,
    )
    from lmforge.quant.layers import quantize_

    scheme = QuantScheme(
        bits=cfg.bits,
        group_size=cfg.group_size,
        head_bits=cfg.head_bits,
        embed_bits=cfg.embed_bits,
        method=cfg.method,
        int8_layers=cfg.int8_layers,
    )
    out = Path(cfg.out).expanduser()
    if cfg.calib and scheme.method != "gptq":
        raise LmforgeError("--calib is the calibration text of --method gptq; round-to-nearest reads none")
    if scheme.method == "gptq":
        from lmforge.quant.gptq import default_calibration_path, read_calibration_text

        read_calibration_text(Path(cfg.calib).expanduser() if cfg.calib else default_calibration_path())
    elif scheme.method != "rtn":
        raise LmforgeError(f"lmforge quantize rounds with rtn or gptq, not {scheme.method!r}")
    source = resolve_model(cfg.model, progress=cfg.progress)
    if (existing := read_quantization(source)) is not None:
        raise LmforgeError(
            f"{source} is already quantized ({existing.label}); quantize its float checkpoint instead, "
            "re-quantizing compounds the rounding error"
        )
    if out.resolve() == source.resolve():
        raise LmforgeError(f"--out {out} is the source checkpoint; choose another directory")
    model, tokenizer = load_checkpoint(source)
    float_bytes = weight_bytes(model)
    start = time.perf_counter()
    packed = _calibrated(model, tokenizer, scheme, cfg) if scheme.method == "gptq" else None
    quantize_(model, scheme, packed, progress=cfg.progress)
    seconds = time.perf_counter() - start
    lineage = make_lineage(
        str(source.resolve()),
        parent=read_lineage(source),
        kind="quantize",
        scheme=scheme.to_config(),
        calib=cfg.calib if scheme.method == "gptq" else None,
    )
    save_checkpoint(
        out,
        model.cfg,
        model.state_dict(),
        tokenizer,
        lineage,
        generation_defaults(source),
        quantization=scheme.to_config(),
    )
    return {
        "out": str(out),
        "scheme": scheme.to_config(),
        "float_bytes": float_bytes,
        "quantized_bytes": weight_bytes(model),
        "seconds": round(seconds, 1),
    }


def _calibrated(model, tokenizer, scheme: QuantScheme, cfg: QuantizeConfig) -> dict:  # noqa: ANN001
    from lmforge.quant.gptq import calibration_ids, gptq_pack

    ids = calibration_ids(tokenizer, cfg.calib, cfg.calib_samples, cfg.calib_seq_len)
    return gptq_pack(model, scheme, ids, progress=cfg.progress)
