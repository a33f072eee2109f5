"""Checkpoint directories: save, load, convert, and the lineage that says where a checkpoint came from.

An lmforge checkpoint IS a Hugging Face model directory, so `transformers` can load it as is:
  model.safetensors        HF names (`model.` prefix); `lm_head.weight` left out when tied to the embedding
  config.json              HF config, plus an "lmforge" sub-dict holding the full ModelConfig so nothing is lost
  tokenizer.json, tokenizer_config.json    written by lmforge.tokenizer.Tokenizer.save
  generation_config.json   bos/eos ids and sampling defaults
  lineage.json             source and its SHA-256, command line, lmforge version/commit, time, parent lineage
A directory is written whole into a temporary sibling and renamed, so a crash leaves the old one or the new one.

Loading builds the model without initialising it and assigns the tensors that safetensors memory-maps from the
file: no random init, no copy when the dtype already matches. It also reads directories made by transformers
(single or sharded safetensors). It deliberately never unpickles: `.bin`/`.pt` weights are refused.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lmforge.config import ModelConfig, from_hf_config, to_hf_config
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_dir, sha256_file, write_json
from lmforge.model import Transformer
from lmforge.progress import byte_progress

if TYPE_CHECKING:
    from lmforge.quant import QuantScheme
    from lmforge.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Buffers older transformers versions saved; they are recomputed, never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# --- lineage ----------------------------------------------------------------------------------------------------


def _git_commit() -> str | None:
    """The commit of the lmforge source tree when it is a git checkout (an installed wheel has none)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def make_lineage(source: str, source_sha256: str | None = None, parent: dict | None = None, **extra: Any) -> dict:
    from lmforge import __version__

    return {
        "source": source,
        "source_sha256": source_sha256,
        "command": shlex.join(sys.argv),
        "lmforge_version": __version__,
        "git_commit": _git_commit(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
        "parent": parent,
    }


def read_lineage(directory: Path) -> dict | None:
    path = Path(directory) / "lineage.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# --- progress ---------------------------------------------------------------------------------------------------


def sha256_with_progress(path: Path, label: str = "hashing", progress: bool = True) -> str:
    with byte_progress(f"{label} {Path(path).name}", Path(path).stat().st_size, progress) as advance:
        return sha256_file(path, on_bytes=advance)


# --- save -------------------------------------------------------------------------------------------------------


def _hf_key(name: str) -> str:
    return name if name.startswith(("lm_head.", "score.")) else f"model.{name}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_checkpoint(
    directory: Path,
    cfg: ModelConfig,
    state_dict: dict[str, Tensor],
    tokenizer: Tokenizer | None,
    lineage: dict,
    generation: dict | None = None,
    quantization: dict | None = None,
) -> None:
    """`quantization`: a quantized model's scheme (lmforge.quant.QuantScheme.to_config), kept in config.json."""
    from safetensors.torch import save_file

    directory = Path(directory)
    # atomic_dir replaces the target whole: refuse to wipe a directory that is not a checkpoint (`--out ~`).
    if directory.exists() and any(directory.iterdir()) and not (directory / "config.json").is_file():
        raise LmforgeError(f"{directory} exists and is not a checkpoint; choose an empty or new output directory")
    tensors = {
        _hf_key(k): v.detach().to("cpu").contiguous()
        for k, v in state_dict.items()
        if not (cfg.tie_embeddings and k == "lm_head.weight")
    }
    hf = to_hf_config(cfg)
    embed = state_dict.get("embed_tokens.weight")
    if embed is not None:
        hf["torch_dtype"] = _dtype_name(embed.dtype)
    hf["lmforge"] = cfg.to_dict()
    if quantization:
        hf["quantization_config"] = quantization
    eos = cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else (cfg.eos_token_ids or None)
    gen: dict[str, Any] = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, **(generation or {})}
    # transformers warns about sampling settings that are ignored unless do_sample is on.
    if gen.get("temperature") and "do_sample" not in gen:
        gen["do_sample"] = True
    with atomic_dir(directory) as tmp:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})  # "pt": transformers refuses other formats
        write_json(tmp / "config.json", hf)
        write_json(tmp / "generation_config.json", gen)
        write_json(tmp / "lineage.json", lineage)
        if tokenizer is not None:
            tokenizer.save(tmp)


# --- load -------------------------------------------------------------------------------------------------------


def read_config(directory: Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise LmforgeError(f"{directory}: no config.json; is this a model directory? (lmforge convert makes one)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path}: not valid JSON ({e}); restore or re-create the checkpoint") from None
    # Our own sub-dict is the full truth; a directory from transformers has only the HF fields.
    return ModelConfig.from_dict(d["lmforge"]) if "lmforge" in d else from_hf_config(d, source=str(path))


def read_quantization(directory: Path) -> QuantScheme | None:
    """The scheme of a quantized checkpoint (config.json's quantization_config), None for a float one."""
    from lmforge.quant import QuantScheme

    path = Path(directory) / "config.json"
    d = json.loads(path.read_text(encoding="utf-8")).get("quantization_config")
    return None if d is None else QuantScheme.from_config(d, source=str(path))


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory, single or sharded; refuses pickled weights."""
    directory = Path(directory)
    if (directory / WEIGHTS).is_file():
        return [directory / WEIGHTS]
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise LmforgeError(f"{index}: unreadable shard index ({e!r}); re-download the model") from None
        return [directory / name for name in dict.fromkeys(weight_map.values())]
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise LmforgeError(
            f"{directory}: weights are only in {', '.join(pickles)} (pickle files, which can run code when loaded; "
            "lmforge never unpickles). Re-save them as safetensors, e.g. with transformers: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT)"
        )
    raise LmforgeError(f"{directory}: no {WEIGHTS} or {INDEX}; is this a model directory?")


def _read_tensors(files: list[Path]) -> tuple[dict[str, Tensor], dict[str, Path]]:
    """All tensors, named without the `model.` prefix, memory-mapped (safetensors maps the file copy-on-write)."""
    from safetensors import safe_open

    tensors: dict[str, Tensor] = {}
    origin: dict[str, Path] = {}
    for path in files:
        if not path.is_file():
            raise LmforgeError(f"{path}: shard listed in {INDEX} is missing; re-download or re-convert the model")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    if key.endswith(IGNORED_SUFFIXES):
                        continue
                    name = key.removeprefix("model.")
                    tensors[name] = f.get_tensor(key)
                    origin[name] = path
        except LmforgeError:
            raise
        except Exception as e:  # safetensors raises its own error types for a bad header or a short file
            raise LmforgeError(
                f"{path}: not a readable safetensors file ({e}); it may be truncated or corrupt: "
                "re-download or re-convert it"
            ) from None
    return tensors, origin


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Build a model without initialising its weights, which are about to be replaced anyway.

    Parameters are then uninitialised `torch.empty` tensors: the allocator reserves the memory but no page is
    touched, so nothing is resident until load_state_dict(assign=True) swaps them for the memory-mapped ones.
    (The `meta` device would say the same more directly, but building there costs ~2.5 s on first use because
    meta `arange`/`normal_` import sympy through torch's decompositions.) Patches torch.nn.init for the duration,
    as transformers' no_init_weights does.
    """
    names = ("normal_", "uniform_", "kaiming_uniform_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def load_model(directory: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Transformer:
    """The model alone (no tokenizer needed)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LmforgeError(f"{directory}: not a directory; pass a checkpoint directory (lmforge convert makes one)")
    cfg = read_config(directory)
    scheme = read_quantization(directory)
    files = weight_files(directory)
    tensors, origin = _read_tensors(files)

    with _no_init():
        model = Transformer(cfg)
    if scheme is not None:
        from lmforge.quant import make_quantized

        make_quantized(model, scheme)
    skeleton = model.state_dict()
    expected = {k: v.shape for k, v in skeleton.items()}
    tied = cfg.tie_embeddings and "lm_head.weight" in skeleton  # a quantized head is its own tensor
    if tied:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)  # some exporters store the tied copy too; it is the embedding
    where = files[0] if len(files) == 1 else directory
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise LmforgeError(
            f"{where}: tensor {_hf_key(missing[0])} is missing ({len(missing)} missing in all) for the model "
            f"described by config.json; the weights and config do not belong together"
        )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        name = unexpected[0]
        raise LmforgeError(
            f"{origin[name]}: unexpected tensor {_hf_key(name)} ({len(unexpected)} unexpected in all); "
            "this model layout is not supported or config.json does not match the weights"
        )
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise LmforgeError(
                f"{origin[name]}: tensor {_hf_key(name)} has shape {tuple(tensors[name].shape)}, config.json "
                f"implies {tuple(shape)}; the weights and config do not belong together"
            )
    # .to() returns the mmapped tensor itself when dtype and device already match: no copy. Float weights take the
    # requested dtype; packed weights and their fp16 scales keep the dtype the quantized layers are built with.
    state = {
        k: v.to(device=device, dtype=dtype if skeleton[k].dtype == torch.float32 else skeleton[k].dtype)
        for k, v in tensors.items()
    }
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    # Non-persistent buffers are not in the file: the ones built above follow the weights' device and dtype.
    model.rope_cos = model.rope_cos.to(device=device, dtype=dtype)
    model.rope_sin = model.rope_sin.to(device=device, dtype=dtype)
    return model.eval()


def load_checkpoint(
    directory: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[Transformer, Tokenizer]:
    from lmforge.tokenizer import Tokenizer

    model = load_model(directory, dtype, device)
    return model, Tokenizer.load(Path(directory))  # says itself what is missing


# --- convert ----------------------------------------------------------------------------------------------------


def generation_defaults(directory: Path) -> dict | None:
    """Sampling defaults of a source directory, without transformers' bookkeeping keys and the ids we rewrite."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return None
    d = json.loads(path.read_text(encoding="utf-8"))
    drop = {"transformers_version", "_from_model_config", "bos_token_id", "eos_token_id"}
    return {k: v for k, v in d.items() if k not in drop}


def convert(src: str | Path, out: Path, progress: bool = True, keep_quant: bool = False) -> Path:
    """A .gguf file, or an lmforge / Hugging Face directory, into an lmforge checkpoint at `out`.

    keep_quant: a GGUF's Q4_0/Q4_1/Q8_0 blocks become a quantized checkpoint as they are (no float round trip)."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    is_gguf = src.is_file() and src.suffix.lower() == ".gguf"
    if keep_quant and not is_gguf:
        raise LmforgeError(f"{src}: --keep-quant reads a .gguf file's stored blocks; give a .gguf file")
    if is_gguf:
        from lmforge.gguf_import import read_gguf, read_gguf_blocks

        digest = sha256_with_progress(src, "hashing", progress)
        lineage = make_lineage(str(src.resolve()), digest, kind="gguf", keep_quant=keep_quant)
        if keep_quant:
            cfg, state, tokenizer, scheme = read_gguf_blocks(src, progress=progress)
            save_checkpoint(out, cfg, state, tokenizer, lineage, quantization=scheme.to_config())
        else:
            cfg, state, tokenizer = read_gguf(src, progress=progress)
            save_checkpoint(out, cfg, state, tokenizer, lineage)
    elif src.is_dir():
        model, tokenizer = load_checkpoint(src)
        hashes = {p.name: sha256_with_progress(p, "hashing", progress) for p in weight_files(src)}
        lineage = make_lineage(str(src.resolve()), parent=read_lineage(src), kind="checkpoint", source_files=hashes)
        scheme = read_quantization(src)
        quantization = None if scheme is None else scheme.to_config()
        save_checkpoint(out, model.cfg, model.state_dict(), tokenizer, lineage, generation_defaults(src), quantization)
    elif src.exists():
        raise LmforgeError(f"{src}: cannot convert this file; give a .gguf file or a model directory")
    else:
        raise LmforgeError(f"{src}: no such file or directory")
    return out


def is_checkpoint(directory: Path) -> bool:
    directory = Path(directory)
    return (directory / "config.json").is_file() and ((directory / WEIGHTS).is_file() or (directory / INDEX).is_file())


def disk_size(path: Path) -> int:
    """Bytes used by a file or a directory tree (what `du` would call the apparent size)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
