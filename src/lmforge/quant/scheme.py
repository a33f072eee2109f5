"""What a quantization is: bits, group size, which layers, which method. Saved in config.json, never guessed.

`QuantScheme.parse("int4:g64")` is how the `--quant` flag spells one; `to_config`/`from_config` are the
`quantization_config` entry of a quantized checkpoint's config.json. Validation against a model's shapes
happens where the shapes are known (`layers.quantize_`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase

from lmforge.errors import LmforgeError

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "gptq", "gguf")  # gguf: the blocks a GGUF file stored, kept as they are
# Named sets of block linears an INT4 scheme keeps at INT8 (`--quant int4:mixed`). "mixed" holds attention's input
# projections (all three: q|k|v stack into one native call, which needs one bit width) and the MLP down projections,
# as llama.cpp's Q4_K_M gives attn_v and ffn_down more bits; on Qwen2.5-0.5B it lowers INT4's perplexity cost from
# +2.6% to +1.8% for about 11% more weight bytes (bench/quant.py).
RECIPES = {"mixed": ("layers.*.self_attn.[qkv]_proj", "layers.*.mlp.down_proj")}
QUANT_METHOD = "lmforge"  # the quant_method name in config.json


@dataclass(frozen=True)
class QuantScheme:
    bits: int = 4  # the transformer blocks' linear layers
    group_size: int = 32  # weights per scale along the input dimension
    head_bits: int | None = 8  # the output head (None: keep it float); INT8 keeps the big vocabulary product exact
    embed_bits: int | None = 8  # an untied embedding table (a tied one reads the quantized head's rows)
    method: str = "rtn"  # how the block weights were rounded: round-to-nearest, GPTQ (calibrated) or by llama.cpp
    int8_layers: tuple[str, ...] = ()  # block linears kept at INT8 when bits is 4: patterns on module names

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
        if self.int8_layers and self.bits != 4:
            raise LmforgeError("int8_layers keeps some linears of an INT4 scheme at INT8; it needs bits 4")
        object.__setattr__(self, "int8_layers", tuple(self.int8_layers))  # a list from JSON compares as a tuple

    def bits_for(self, name: str) -> int:
        """The bit width of the block linear `name` ("layers.3.mlp.down_proj")."""
        return 8 if any(fnmatchcase(name, pattern) for pattern in self.int8_layers) else self.bits

    @classmethod
    def parse(cls, text: str) -> QuantScheme:
        """ "int8", "int4", "int4:g64", "int4:mixed", "int4:g64:mixed", "int4:gptq" (the `--quant` flag)."""
        name, *rest = text.strip().lower().split(":")
        if name not in ("int4", "int8"):
            raise LmforgeError(
                f"--quant {text!r}: expected int8 or int4, optionally with a group size and a recipe (int4:g64:mixed)"
            )
        group, keep, method = 32, (), "rtn"
        for part in rest:
            if part in RECIPES:
                keep = RECIPES[part]
            elif part == "gptq":
                method = part
            elif part.startswith("g") and part[1:].isdigit():
                group = int(part[1:])
            else:
                raise LmforgeError(
                    f"--quant {text!r}: {part!r} is neither a group size (g32, g64, g128), a recipe "
                    f"({', '.join(RECIPES)}) nor a method (gptq)"
                )
        return cls(bits=int(name[3:]), group_size=group, int8_layers=keep, method=method)

    @property
    def label(self) -> str:
        recipe = next((n for n, keep in RECIPES.items() if keep == self.int8_layers), "custom")
        return (
            f"int{self.bits}"
            + (f":g{self.group_size}" if self.group_size != 32 else "")
            + (f":{recipe}" if self.int8_layers else "")
            + (":gptq" if self.method == "gptq" else "")
        )

    def to_config(self) -> dict:
        return {"quant_method": QUANT_METHOD, **asdict(self)}

    @classmethod
    def from_config(cls, d: dict, source: str) -> QuantScheme:
        if d.get("quant_method") != QUANT_METHOD:
            raise LmforgeError(
                f"{source}: quantization_config has quant_method {d.get('quant_method')!r}; lmforge reads only its "
                f"own ({QUANT_METHOD!r}). Load the float model and quantize it with lmforge quantize"
            )
        fields = {k: d[k] for k in ("bits", "group_size", "head_bits", "embed_bits", "method", "int8_layers") if k in d}
        return cls(**fields)
