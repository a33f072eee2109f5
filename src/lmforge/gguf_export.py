"""Write an lmforge checkpoint as a GGUF file that llama.cpp (and Ollama, LM Studio, ...) loads.

It follows the conventions of llama.cpp's own converter (`convert_hf_to_gguf.py`), so that the file is one
llama.cpp could have made from the same Hugging Face directory:
- architecture `llama` or `qwen2`, chosen by `config.hf_model_type` (Qwen2 is a Llama with q/k/v bias);
- llama's q/k rows permuted for ggml's interleaved RoPE (`_permute`, the inverse of gguf_import's `_unpermute`);
  qwen2 files keep rotate-half order, as llama.cpp expects for that architecture;
- `--type f32` writes every tensor in float32; `f16` writes 2-D weights in float16 and `q8_0` in Q8_0 blocks
  (rows not a multiple of the block fall back to f16), while norms and biases stay float32 as ggml wants;
- linear RoPE scaling as `rope.scaling.*` keys; Llama 3.1 (`llama3`) scaling as the per-frequency divisors
  tensor `rope_freqs.weight`;
- the byte-level BPE tokenizer as `tokenizer.ggml.*` metadata (model `gpt2`, tokens, token types, merges, the
  pre-tokenizer by llama.cpp's name, bos/eos/end-of-turn ids, add_bos) and the chat template. The token list is
  padded to the embedding's row count with `[PAD<i>]` tokens, as llama.cpp's converter does.
The file is streamed one tensor at a time into a temporary sibling and renamed into place when complete.

It does not write quantized checkpoints' packed weights (export the float checkpoint, then quantize the GGUF
with llama.cpp's `llama-quantize`), merge adapters, or write sentencepiece tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lmforge.config import ModelConfig, hf_model_type
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_path
from lmforge.gguf_import import LAYER_TENSORS, PRE_TOKENIZERS, TOP_TENSORS
from lmforge.model import Transformer, rope_frequencies
from lmforge.progress import track
from lmforge.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
FILE_TYPES: dict[str, tuple[gguf.LlamaFileType, Q]] = {  # --type: (general.file_type, type of 2-D weights)
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}
# llama.cpp's pre-tokenizer names, first match wins; gguf_import.PRE_TOKENIZERS says how each splits text.
PRE_TOKENIZER_NAMES = ("gpt-2", "smollm", "llama-bpe", "qwen2")
_NORMAL, _CONTROL, _USER, _UNUSED = 1, 3, 4, 5  # tokenizer.ggml.token_type values
_GGUF_NAMES = {ours: theirs for theirs, ours in TOP_TENSORS.items()}


def export_gguf(checkpoint_dir: str | Path, out_path: str | Path, ftype: str = "f32", progress: bool = True) -> Path:
    """Write the checkpoint at `checkpoint_dir` (or a catalog name) as a GGUF file at `out_path`."""
    from lmforge.catalog import resolve_model
    from lmforge.checkpoint import load_checkpoint

    if ftype not in FILE_TYPES:
        raise LmforgeError(f"--type {ftype!r} is not supported; choose one of: {', '.join(FILE_TYPES)}")
    out_path = Path(out_path).expanduser()
    if out_path.is_dir():
        raise LmforgeError(f"{out_path} is a directory; give the path of the .gguf file to write")
    directory = resolve_model(str(checkpoint_dir))
    model, tokenizer = load_checkpoint(directory)
    cfg, arch = model.cfg, hf_model_type(model.cfg)
    tensors = _tensors(model, arch)  # names checked (and a quantized checkpoint refused) before writing
    writer = gguf.GGUFWriter(None, arch)
    _add_model_metadata(writer, cfg, arch, _model_name(directory), ftype)
    _add_tokenizer(writer, tokenizer, cfg)
    weight_type = FILE_TYPES[ftype][1]
    for name, t in tensors:
        qtype = _tensor_type(name, t, weight_type)
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(t.shape, qtype)))
        writer.add_tensor_info(name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    with atomic_path(out_path) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for name, t in track(tensors, f"writing {out_path.name}", enabled=progress):
                writer.write_tensor_data(_encode(t, _tensor_type(name, t, weight_type)))  # one tensor at a time
        finally:
            writer.close()
    return out_path


# --- tensors ---------------------------------------------------------------------------------------------------


def _tensors(model: Transformer, arch: str) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in torch order) for every tensor the file holds, in file order.

    The arrays are views of the loaded (memory-mapped) weights where no permutation or cast is needed."""
    cfg = model.cfg
    state = model.state_dict()
    layer_names = {ours: theirs for theirs, ours in LAYER_TENSORS.items()}
    named = []
    for key in state:
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue  # llama.cpp reuses token_embd when there is no output.weight
        name = _GGUF_NAMES.get(key)
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{i}.{layer_names[module]}.{kind}" if module in layer_names else None
        if name is None:
            raise LmforgeError(
                f"checkpoint tensor {key!r} has no GGUF counterpart; export a float checkpoint (a quantized or "
                "adapter-wrapped one cannot be exported: quantize the exported f32 GGUF with llama.cpp instead)"
            )
        named.append((name, key))
    out = []
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) == "llama3":
        plain = rope_frequencies(ModelConfig(**{**cfg.to_dict(), "rope_scaling": None}))
        out.append(("rope_freqs.weight", (plain / rope_frequencies(cfg)).numpy()))  # divisors (head_dim/2,)
    for name, key in named:
        w = state[key].detach().float().numpy()
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            w = _permute(w, cfg.num_heads if "q_proj" in key else cfg.num_kv_heads)
        out.append((name, w))
    return out


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `permute`: each head's rows go from rotate-half order (2, d/2) to interleaved pairs (d/2, 2)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(name: str, t: np.ndarray, weight_type: Q) -> Q:
    if t.ndim < 2 or name.endswith("_norm.weight"):
        return Q.F32  # ggml's norm and bias kernels take float32
    block = gguf.GGML_QUANT_SIZES[weight_type][0]
    if t.shape[-1] % block:
        return Q.F16  # what llama.cpp's converter falls back to
    return weight_type


def _encode(t: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return np.ascontiguousarray(t, dtype=np.float32)
    if qtype == Q.F16:
        return t.astype(np.float16)
    return gguf.quants.quantize(t, qtype)


# --- metadata --------------------------------------------------------------------------------------------------


def _model_name(directory: Path) -> str:
    # A catalog checkpoint sits in <cache>/<name>/checkpoint; a user's directory is named for its model.
    return directory.parent.name if directory.name == "checkpoint" else directory.name


def _add_model_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, arch: str, name: str, ftype: str) -> None:
    w.add_name(name)
    w.add_file_type(FILE_TYPES[ftype][0])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_layers)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    elif kind == "llama3" and arch != "llama":
        raise LmforgeError(f"llama3 RoPE scaling is only expressible for the llama architecture, not {arch}")
    elif kind not in (None, "llama3"):
        raise LmforgeError(f"RoPE scaling {kind!r} cannot be written to GGUF; lmforge exports linear and llama3")


def _add_tokenizer(w: gguf.GGUFWriter, tok: Tokenizer, cfg: ModelConfig) -> None:
    spec = json.loads(tok.backend.to_str())
    if spec["model"]["type"] != "BPE" or spec["model"].get("byte_fallback"):
        raise LmforgeError("only byte-level BPE tokenizers can be exported to GGUF (tokenizer.ggml.model = gpt2)")
    vocab = tok.backend.get_vocab(with_added_tokens=True)  # token -> id
    if max(vocab.values()) >= cfg.vocab_size:
        raise LmforgeError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {cfg.vocab_size}")
    added = {t["id"]: t["special"] for t in spec.get("added_tokens", [])}
    tokens, types = [f"[PAD{i}]" for i in range(cfg.vocab_size)], [_UNUSED] * cfg.vocab_size
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = _NORMAL if i not in added else _CONTROL if added[i] else _USER
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(spec))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    # gguf_import reads the stop list back from eos, eot and eom, in that order.
    stops = (w.add_eos_token_id, w.add_eot_token_id, w.add_eom_token_id)
    for add, token_id in zip(stops, tok.eos_token_ids, strict=False):
        add(token_id)
    w.add_add_bos_token(tok.add_bos)
    w.add_add_eos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE (it ships those splits built in)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    split = next((s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"), None)
    digits = any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps)
    nfc = (spec.get("normalizer") or {}).get("type") == "NFC"
    gpt2_split = split is None and any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps)
    if set(kinds) <= {"ByteLevel", "Split", "Digits"} and (split is not None or gpt2_split):
        for name in PRE_TOKENIZER_NAMES:
            if PRE_TOKENIZERS[name] == (split, digits, nfc):
                return name
    raise LmforgeError(
        f"the tokenizer's pre-tokenizer ({', '.join(map(str, kinds))}) matches none llama.cpp knows "
        f"({', '.join(PRE_TOKENIZER_NAMES)}); llama.cpp would split text differently, so it is not exported"
    )
