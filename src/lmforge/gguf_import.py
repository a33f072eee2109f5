"""Read a llama.cpp GGUF file into lmforge objects: a ModelConfig, float32 weights and a Tokenizer.

What it does:
- parses the GGUF header itself (a struct walk over an mmap; see the note above `_open` for why not
  `gguf.GGUFReader`) and leaves the dequantization kernels and type tables to the `gguf` package;
- maps `llama` and `qwen2` metadata onto `ModelConfig` (family differences are the table `ARCHITECTURES`);
- dequantizes every tensor to float32 with the `gguf` package (any type `gguf.quants` can dequantize), renames
  it to lmforge's (HF Llama) parameter name and shape (out_features, in_features);
- undoes llama.cpp's q/k row permutation: its converter reorders the rows of q and k for the `llama`
  architecture so that ggml can apply the interleaved ("normal") RoPE; lmforge, like HF, rotates halves.
  `qwen2` files are written for rotate-half ("neox") RoPE and are not permuted;
- turns Llama 3.1-style per-frequency RoPE factors (`rope_freqs.weight`) back into HF's `llama3` rope scaling;
- rebuilds the byte-level BPE tokenizer (tokenizer.ggml.model == "gpt2") from the metadata, with the
  pre-tokenizer chosen from `PRE_TOKENIZERS` by `tokenizer.ggml.pre`.

What it does not do: keep weights quantized (that is lmforge.quant's job), write GGUF, or read sentencepiece
("llama"-model) tokenizers.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers import decoders as tok_decoders

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.progress import track
from lmforge.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lmforge.quant import QuantScheme

# Per-architecture data. `rope_permuted`: llama.cpp stored q/k rows permuted for interleaved RoPE.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {"rope_permuted": True},
    "qwen2": {"rope_permuted": False},
}

# GGUF tensor names -> lmforge's (HF Llama) names; gguf_export reads the same tables backwards.
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_TENSORS = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# Pre-tokenizer splits, keyed on `tokenizer.ggml.pre` (llama.cpp's names), each as its HF tokenizer.json has it.
_GPT2_SPLIT = None  # ByteLevel's built-in GPT-2 regex
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# (split regex, split digits one by one first, NFC-normalize). Qwen2's own tokenizer.json normalizes to NFC;
# SmolLM2's splits digits before the GPT-2 regex.
PRE_TOKENIZERS: dict[str, tuple[str | None, bool, bool]] = {
    "default": (_GPT2_SPLIT, False, False),
    "gpt2": (_GPT2_SPLIT, False, False),
    "gpt-2": (_GPT2_SPLIT, False, False),  # llama.cpp's name, which gguf_export writes
    "smollm": (_GPT2_SPLIT, True, False),
    "llama-bpe": (_LLAMA3_SPLIT, False, False),
    "llama3": (_LLAMA3_SPLIT, False, False),
    "llama-v3": (_LLAMA3_SPLIT, False, False),
    "qwen2": (_QWEN2_SPLIT, False, True),
    "deepseek-r1-qwen": (_QWEN2_SPLIT, False, True),
}
# End-of-turn tokens llama.cpp also stops on; added to the eos list when the chat template writes them.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>")
_CONTROL, _USER = 3, 4  # tokenizer.ggml.token_type values


def read_gguf(path: Path, progress: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Config, float32 state dict and tokenizer of a GGUF file (every tensor dequantized)."""
    cfg, state, tokenizer, _ = _read(Path(path), progress, keep_blocks=False)
    return cfg, state, tokenizer


def read_gguf_blocks(
    path: Path, progress: bool = True
) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, QuantScheme]:
    """Like read_gguf, but Q4_0 / Q4_1 / Q8_0 linears keep their stored blocks as lmforge's packed tensors (the
    same bytes: see quant/pack.py), with the scheme they form; no float round trip, no added rounding."""
    cfg, state, tokenizer, scheme = _read(Path(path), progress, keep_blocks=True)
    assert scheme is not None
    return cfg, state, tokenizer, scheme


def _read(
    path: Path, progress: bool, keep_blocks: bool
) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer, QuantScheme | None]:
    meta, tensors = _open(path)
    arch = _get(meta, "general.architecture", path)
    if arch not in ARCHITECTURES:
        raise LmforgeError(
            f"{path}: architecture {arch!r} is not supported; lmforge reads GGUF files of: {', '.join(ARCHITECTURES)}"
        )
    if "token_embd.weight" not in tensors:
        raise LmforgeError(f"{path}: no token_embd.weight tensor; the file is not a complete {arch} model")
    tokenizer = _tokenizer(meta, path)
    cfg = _config(meta, arch, tensors, tokenizer, path)
    names = _plan(tensors, path)  # check names and types before the slow part
    scheme = _block_scheme(names, cfg, path) if keep_blocks else None
    state = {}
    for t, ours in track(names, f"reading {path.name}", enabled=progress):
        permute = ARCHITECTURES[arch]["rope_permuted"] and re.search(r"\.attn_[qk]\.", t.name)
        heads = cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads
        target = _packed_name(ours, cfg, scheme) if scheme is not None else None
        if target is not None:
            for suffix, part in _blocks(t).items():
                state[target + suffix] = torch.from_numpy(_unpermute(part, heads) if permute else part)
        else:
            w = _dequantize(t)
            state[ours] = torch.from_numpy(_unpermute(w, heads) if permute else w)
    _check_shapes(cfg, state, path, scheme)
    return cfg, state, tokenizer, scheme


# --- stored quantized blocks ------------------------------------------------------------------------------------

_Q = gguf.GGMLQuantizationType
_NATIVE_BITS = {_Q.Q4_0: 4, _Q.Q4_1: 4, _Q.Q8_0: 8}  # GGUF block types that are lmforge's own layout at group 32


def _block_scheme(names: list[tuple[_Tensor, str]], cfg: ModelConfig, path: Path) -> QuantScheme:
    """The lmforge scheme the file's stored types form, or a clear refusal."""
    from lmforge.quant import QuantScheme

    types = {ours: t.qtype for t, ours in names}
    blocks = {q for ours, q in types.items() if _is_block_linear(ours)}
    bits = {_NATIVE_BITS.get(q) for q in blocks}
    if None in bits or len(bits) != 1:
        found = ", ".join(sorted(q.name for q in blocks))
        raise LmforgeError(
            f"{path}: its linear layers are stored as {found}; lmforge's kernels read Q4_0, Q4_1 or Q8_0 blocks "
            "(one width for all layers). Convert it to float without --keep-quant, then run lmforge quantize"
        )
    head = types["embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]
    embed = None if cfg.tie_embeddings else _NATIVE_BITS.get(types["embed_tokens.weight"])
    return QuantScheme(
        bits=bits.pop(), group_size=32, head_bits=_NATIVE_BITS.get(head), embed_bits=embed, method="gguf"
    )


def _is_block_linear(ours: str) -> bool:
    from lmforge.quant.layers import BLOCK_LINEARS

    return ours.startswith("layers.") and ours.endswith(tuple(f"{name}.weight" for name in BLOCK_LINEARS))


def _packed_name(ours: str, cfg: ModelConfig, scheme: QuantScheme) -> str | None:
    """Where a tensor's packed parts go (their prefix), or None when it is read as float."""
    if _is_block_linear(ours):
        return ours.removesuffix("weight")
    if ours == "lm_head.weight" and scheme.head_bits is not None:
        return "lm_head."
    if ours == "embed_tokens.weight":
        if cfg.tie_embeddings and scheme.head_bits is not None:
            return "lm_head."  # the tied table is the quantized head
        if not cfg.tie_embeddings and scheme.embed_bits is not None:
            return "embed_tokens.table."
    return None


def _blocks(t: _Tensor) -> dict[str, np.ndarray]:
    """A Q4_0 / Q4_1 / Q8_0 tensor's bytes as qweight, scales (and mins): the block bytes regrouped, not recomputed."""
    rows, k = t.shape
    size = gguf.GGML_QUANT_SIZES[t.qtype][1]
    b = t.data.reshape(rows, k // 32, size)
    scales = b[:, :, 0:2].copy().view(np.float16).reshape(rows, -1)
    if t.qtype == _Q.Q8_0:
        return {"qweight": b[:, :, 2:].copy().view(np.int8).reshape(rows, k), "scales": scales}
    if t.qtype == _Q.Q4_0:  # w = d (q - 8): an offset of -8 d, exact in fp16
        return {"qweight": b[:, :, 2:].reshape(rows, -1).copy(), "scales": scales, "mins": -8 * scales}
    mins = b[:, :, 2:4].copy().view(np.float16).reshape(rows, -1)
    return {"qweight": b[:, :, 4:].reshape(rows, -1).copy(), "scales": scales, "mins": mins}


# --- file and metadata ---------------------------------------------------------------------------------------
# Why not gguf.GGUFReader: it builds numpy views for every string of the vocabulary and merge table (6 s for SmolLM2's
# header, 26 s for Qwen2.5's on a 2-core machine); a plain struct walk over an mmap reads the same in well under
# a second. The `gguf` package still supplies the type tables and the dequantization kernels.

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]  # torch order (out, in): ggml lists dimensions innermost first, so reversed
    qtype: gguf.GGMLQuantizationType
    data: np.ndarray  # raw bytes (uint8), a view into the mapped file


def _open(path: Path) -> tuple[dict[str, Any], dict[str, _Tensor]]:
    if not path.is_file():
        raise LmforgeError(f"{path}: no such file; give the path of a .gguf model file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LmforgeError(f"{path}: not a GGUF file (it does not start with 'GGUF'); give a .gguf model file")
        try:
            blob = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:
            raise LmforgeError(f"{path}: the GGUF file is truncated ({e}); download it again") from e
    try:
        return _parse(blob, path)
    except (struct.error, UnicodeDecodeError, ValueError, KeyError, OverflowError, MemoryError) as e:
        why = " ".join(f"{type(e).__name__}: {e}".split())
        raise LmforgeError(f"{path}: the GGUF file is truncated or damaged ({why}); download it again") from e


def _parse(blob: mmap.mmap, path: Path) -> tuple[dict[str, Any], dict[str, _Tensor]]:
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", blob, 4)
    if version not in (2, 3):
        raise LmforgeError(
            f"{path}: GGUF version {version} is not supported (lmforge reads versions 2 and 3, little-endian); "
            "the file may be damaged: download it again"
        )
    pos, meta = 24, {}
    for _ in range(n_kv):
        key, pos = _string(blob, pos)
        (vtype,) = struct.unpack_from("<I", blob, pos)
        meta[key], pos = _value(blob, pos + 4, vtype)
    infos = []
    for _ in range(n_tensors):
        name, pos = _string(blob, pos)
        (n_dims,) = struct.unpack_from("<I", blob, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", blob, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, tuple(reversed(dims)), qtype, offset))
    align = int(meta.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    data_start = -(-pos // align) * align
    tensors = {}
    for name, shape, qtype_id, offset in infos:
        try:
            qtype = gguf.GGMLQuantizationType(qtype_id)
        except ValueError:
            raise LmforgeError(f"{path}: tensor {name} has unknown ggml type {qtype_id}; is the file newer?") from None
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = math.prod(shape) // block * block_bytes
        start = data_start + offset
        if start + nbytes > len(blob):
            raise LmforgeError(f"{path}: the GGUF file is truncated (tensor {name} runs past the end); download again")
        tensors[name] = _Tensor(name, shape, qtype, np.frombuffer(blob, np.uint8, nbytes, start))
    return meta, tensors


def _string(blob: mmap.mmap, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", blob, pos)
    if pos + 8 + n > len(blob):
        raise ValueError("a string runs past the end of the file")
    return blob[pos + 8 : pos + 8 + n].decode("utf-8"), pos + 8 + n


def _value(blob: mmap.mmap, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
    if vtype == 8:
        return _string(blob, pos)
    if vtype == 9:
        etype, count = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if etype in _SCALARS:
            fmt = _SCALARS[etype]
            return list(struct.unpack_from(f"<{count}{fmt[1]}", blob, pos)), pos + count * struct.calcsize(fmt)
        values = []
        for _ in range(count):
            v, pos = _value(blob, pos, etype)
            values.append(v)
        return values, pos
    raise ValueError(f"unknown metadata value type {vtype}")


def _get(meta: dict[str, Any], key: str, path: Path, default: Any = ...) -> Any:
    if key not in meta:
        if default is ...:
            raise LmforgeError(f"{path}: metadata key {key!r} is missing; the file is not a complete GGUF model")
        return default
    return meta[key]


def _f32(x: float) -> float:
    # GGUF stores these as float32 (1e-5 reads back as 9.99999974e-06); 7 significant digits is what was meant.
    return float(f"{x:.7g}")


def _config(meta: dict[str, Any], arch: str, tensors: dict[str, _Tensor], tok: Tokenizer, path: Path) -> ModelConfig:
    def get(key: str, default: Any = ...) -> Any:
        return _get(meta, f"{arch}.{key}", path, default)

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise LmforgeError(f"{path}: RoPE on {rope_dim} of {head_dim} head dimensions (partial rotary) is unsupported")
    theta = _f32(get("rope.freq_base", 10000.0))
    cfg = ModelConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[0]),  # (vocab, hidden)
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_seq_len=int(get("context_length", 2048)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(meta, arch, tensors, path, theta, head_dim),
        norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        qkv_bias="blk.0.attn_q.bias" in tensors,
        tie_embeddings="output.weight" not in tensors,
        bos_token_id=tok.bos_token_id,
        eos_token_ids=list(tok.eos_token_ids),
    )
    return cfg


def _rope_scaling(
    meta: dict[str, Any], arch: str, tensors: dict[str, _Tensor], path: Path, theta: float, head_dim: int
) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor") or meta.get(f"{arch}.rope.scale_linear")
    if "rope_freqs.weight" in tensors:
        return _llama3_scaling(_dequantize(tensors["rope_freqs.weight"]), theta, head_dim, path)
    if kind in (None, "none") and factor is None:
        return None
    if kind in (None, "linear") and factor:
        return {"rope_type": "linear", "factor": _f32(factor)}
    raise LmforgeError(f"{path}: RoPE scaling {kind!r} is not supported; lmforge supports linear and llama3 scaling")


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int, path: Path) -> dict[str, Any] | None:
    """Recover HF's llama3 rope_scaling from llama.cpp's per-frequency divisors.

    In the band between the two cut-offs, 1/f = (1-s)/factor + s with s = a/wavelength + b, a line in
    1/wavelength; its two coefficients fix low/high_freq_factor once original_max_position_embeddings is chosen
    (any choice gives the same frequencies; 8192 is Llama 3's). The result is checked against the file.
    """
    factors = factors.astype(np.float64).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise LmforgeError(f"{path}: rope_freqs.weight has {factors.size} values, expected {head_dim // 2}")
    top = float(factors.max())
    if top <= 1.0 + 1e-6:
        return None
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    mid = (factors > 1 + 1e-4) & (factors < top - 1e-4)
    scaling = None
    if mid.sum() >= 2:
        s = (1 / factors[mid] - 1 / top) / (1 - 1 / top)
        a, b = np.polyfit(1 / wavelen[mid], s, 1)
        old = 8192
        lo = -b * old / a
        scaling = {
            "rope_type": "llama3",
            "factor": _f32(top),
            "low_freq_factor": _f32(lo),
            "high_freq_factor": _f32(lo + old / a),
            "original_max_position_embeddings": old,
        }
        from lmforge.model import rope_frequencies

        one_head = ModelConfig(
            hidden_size=head_dim, num_heads=1, num_kv_heads=1, rope_theta=theta, rope_scaling=scaling
        )
        ours = rope_frequencies(one_head)
        if not np.allclose(ours.double().numpy(), inv / factors, rtol=1e-3):
            scaling = None
    if scaling is None:
        raise LmforgeError(f"{path}: rope_freqs.weight does not match Llama 3 rope scaling; this RoPE is not supported")
    return scaling


# --- tensors -------------------------------------------------------------------------------------------------


def _plan(tensors: dict[str, _Tensor], path: Path) -> list[tuple[_Tensor, str]]:
    plan = []
    for name, t in tensors.items():
        if name == "rope_freqs.weight":
            continue  # folded into the config
        m = _LAYER_RE.fullmatch(name)
        ours = TOP_TENSORS.get(name)
        if m and m.group(2) in LAYER_TENSORS:
            ours = f"layers.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
        if ours is None:
            raise LmforgeError(f"{path}: tensor {name!r} is not part of a llama/qwen2 model lmforge can run")
        try:
            gguf.quants.dequantize(t.data[: gguf.GGML_QUANT_SIZES[t.qtype][1]], t.qtype)  # one block: fail fast
        except NotImplementedError:
            raise LmforgeError(
                f"{path}: tensor {name} has type {t.qtype.name}, which lmforge cannot dequantize; "
                "use a file quantized with F32/F16/BF16, Q4_0..Q8_0, K-quants or IQ types"
            ) from None
        plan.append((t, ours))
    return plan


def _dequantize(t: _Tensor) -> np.ndarray:
    w = gguf.quants.dequantize(t.data, t.qtype)  # (numel,) float32; a fresh array except for F32
    return np.array(w, dtype=np.float32, copy=t.qtype == gguf.GGMLQuantizationType.F32).reshape(t.shape)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Invert llama.cpp's `permute`: rows (heads, 2, d/2) -> (heads, d/2, 2) becomes rotate-half order again."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_shapes(cfg: ModelConfig, state: dict[str, torch.Tensor], path: Path, scheme: QuantScheme | None) -> None:
    from lmforge.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
        if scheme is not None:
            from lmforge.quant import make_quantized

            make_quantized(model, scheme)
        expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if cfg.tie_embeddings and "lm_head.weight" in expected:
        expected.pop("lm_head.weight")  # the embedding itself
    missing = sorted(set(expected) - set(state))
    if missing:
        raise LmforgeError(f"{path}: the model is missing tensors for {', '.join(missing[:3])}; the file is incomplete")
    for name, tensor in state.items():
        if name not in expected:
            raise LmforgeError(f"{path}: tensor for {name} does not fit a {cfg.num_layers}-layer model")
        if tuple(tensor.shape) != expected[name]:
            raise LmforgeError(
                f"{path}: tensor for {name} has shape {tuple(tensor.shape)}, the metadata implies {expected[name]}"
            )


# --- tokenizer -----------------------------------------------------------------------------------------------


def _tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    kind = _get(meta, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise LmforgeError(
            f"{path}: tokenizer model {kind!r} is not supported; lmforge reads byte-level BPE GGUF tokenizers ('gpt2')"
        )
    raw: list[str] = list(_get(meta, "tokenizer.ggml.tokens", path))
    types = list(_get(meta, "tokenizer.ggml.token_type", path, [1] * len(raw)))
    merges = [tuple(m.split(" ", 1)) for m in _get(meta, "tokenizer.ggml.merges", path)]
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    byte_char = _bytes_to_unicode()
    # Tokens are stored in the byte-level alphabet; respell any that are not (as transformers does).
    tokens = [t if set(t) <= alphabet else "".join(byte_char[b] for b in t.encode("utf-8")) for t in raw]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = _get(meta, "tokenizer.ggml.pre", path, "default")
    if pre not in PRE_TOKENIZERS:
        warnings.warn(f"{path}: unknown pre-tokenizer {pre!r}; using GPT-2's split", stacklevel=2)
    split, digits, nfc = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["default"])
    if split is None:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    else:
        steps = [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    if digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.normalizer = normalizers.NFC() if nfc else None
    backend.decoder = tok_decoders.ByteLevel()
    # Control tokens are matched whole in text and are special; user-defined ones (<tool_call>) are matched whole
    # but are ordinary text. A control token that needed respelling is a converter mislabel: skipped, as HF does.
    control = {t for t, r, ty in zip(tokens, raw, types, strict=False) if ty == _CONTROL and t == r}
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens if t in control])
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types, strict=False) if ty == _USER]
    )
    template = _get(meta, "tokenizer.chat_template", path, None)

    def token(key: str) -> str | None:
        i = _get(meta, f"tokenizer.ggml.{key}", path, None)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    eos = [t for t in (token("eos_token_id"), token("eot_token_id"), token("eom_token_id")) if t is not None]
    eos += [t for t in _END_OF_TURN if t in control and template and t in template]
    add_bos = bool(_get(meta, "tokenizer.ggml.add_bos_token", path, False))
    return Tokenizer(backend, template, token("bos_token_id"), list(dict.fromkeys(eos)), add_bos=add_bos)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
