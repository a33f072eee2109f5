"""What a quantization is: bits, group size, which layers, which method. Saved in config.json, never guessed.

`QuantScheme.parse("int4:g64")` is how the `--quant` flag spells one; `to_config`/`from_config` are the
`quantization_config` entry of a quantized checkpoint's config.json. Validation against a model's shapes
happens where the shapes are known (`layers.quantize_`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lmforge.errors import LmforgeError

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "gptq", "gguf")  # gguf: the blocks a GGUF file stored, kept as they are
QUANT_METHOD = "lmforge"  # the quant_method name in config.json


@dataclass(frozen=True)
class QuantScheme:
    bits: int = 4  # the transformer blocks' linear layers
    group_size: int = 32  # weights per scale along the input dimension
    head_bits: int | None = 8  # the output head (None: keep it float); INT8 keeps the big vocabulary product exact
    embed_bits: int | None = 8  # an untied embedding table (a tied one reads the quantized head's rows)
    method: str = "rtn"  # how the block weights were rounded: round-to-nearest, GPTQ (calibrated) or by llama.cpp

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise LmforgeError(f"unsupported bit width {self.bits}; choose one of {', '.join(map(str, BITS))}")
        for what, bits in (("head", self.head_bits), ("embedding", self.embed_bits)):
            if bits not in (None, *BITS):
                raise LmforgeError(f"unsupported {what} bit width {bits}; choose 4, 8 or none")
        if self.group_size not in GROUP_SIZES:
            raise LmforgeError(
                f"unsupported group size {self.group_size}; choose one of {', '.join(map(str, GROUP_SIZES))}"
            )
        if self.method not in METHODS:
            raise LmforgeError(f"unknown quantization method {self.method!r}; choose one of {', '.join(METHODS)}")

    @classmethod
    def parse(cls, text: str) -> QuantScheme:
        """ "int8", "int4", "int4:g64" (the `--quant` flag)."""
        name, _, rest = text.strip().lower().partition(":")
        if name not in ("int4", "int8"):
            raise LmforgeError(f"--quant {text!r}: expected int8 or int4, optionally with a group size (int4:g64)")
        group = 32
        if rest:
            if not (rest.startswith("g") and rest[1:].isdigit()):
                raise LmforgeError(f"--quant {text!r}: the part after ':' is a group size such as g32, g64 or g128")
            group = int(rest[1:])
        return cls(bits=int(name[3:]), group_size=group)

    @property
    def label(self) -> str:
        return f"int{self.bits}" + (f":g{self.group_size}" if self.group_size != 32 else "")

    def to_config(self) -> dict:
        return {"quant_method": QUANT_METHOD, **asdict(self)}

    @classmethod
    def from_config(cls, d: dict, source: str) -> QuantScheme:
        if d.get("quant_method") != QUANT_METHOD:
            raise LmforgeError(
                f"{source}: quantization_config has quant_method {d.get('quant_method')!r}; lmforge reads only its "
                f"own ({QUANT_METHOD!r}). Load the float model and quantize it with lmforge quantize"
            )
        fields = {k: d[k] for k in ("bits", "group_size", "head_bits", "embed_bits", "method") if k in d}
        return cls(**fields)
