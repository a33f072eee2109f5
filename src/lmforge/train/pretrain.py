"""`lmforge pretrain`: next-token training from scratch (a named preset) or continued from a checkpoint.

main(cfg) opens the token shards (lmforge.data.shards), checks them against the tokenizer, checks the memory the
run needs against what the device has (lmforge.plan), builds the model (on the meta device and sharded under
FSDP2, see distributed.py), and runs the shared loop (loop.train) over a deterministic, resumable loader
(shard_loader) with self-healing (healing.py). The output directory holds
  model/          the final checkpoint (safetensors + config.json + tokenizer + lineage.json): `lmforge chat --model`
  run.json        the settings and data hashes that define the run (a resume must match them)
  lineage.json    shard manifest hashes, tokenizer hash, every setting, command line, hardware, counters, the log
  log.jsonl, loss.png, checkpoints/step-N/
`lmforge reproduce OUT/model` re-runs a run from its lineage. Launch under torchrun for many processes.
It does not tokenize (lmforge data tokenize) or fine-tune on chats (lmforge sft).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
from pathlib import Path

import torch

from lmforge.config import PRESETS, ModelConfig
from lmforge.data.shards import MANIFEST, TokenShards
from lmforge.errors import LmforgeError
from lmforge.fileio import sha256_file, write_json
from lmforge.train import distributed
from lmforge.train.healing import Healer, HealingConfig
from lmforge.train.loop import TrainConfig, read_log, train
from lmforge.train.pretrain_config import NOT_IDENTITY, PretrainConfig
from lmforge.train.rundir import identity, prepare_out
from lmforge.train.shard_loader import ShardBatches

# --- model, tokenizer, memory -------------------------------------------------------------------------------------


def _model_config(cfg: PretrainConfig, shards: TokenShards, weights: bool = True) -> tuple[ModelConfig, dict | None]:
    """(architecture, initial weights or None) for a fresh preset or a continued checkpoint.

    weights=False reads only a checkpoint's config.json and gives an empty dict: an FSDP rank > 0, to which rank 0
    broadcasts the tensors (distributed.build_model). Empty, not None, which would draw fresh weights instead."""
    if cfg.init:
        from lmforge.catalog import resolve_model
        from lmforge.checkpoint import load_model, read_config

        directory = resolve_model(cfg.init, progress=cfg.progress)
        if not weights:
            return read_config(directory), {}
        model = load_model(directory)
        return model.cfg, model.state_dict()
    preset = dataclasses.replace(PRESETS[cfg.preset], vocab_size=shards.vocab_size, eos_token_ids=[shards.eos_id])
    return dataclasses.replace(preset, max_seq_len=max(preset.max_seq_len, cfg.seq_len)), None


def _tokenizer_dir(cfg: PretrainConfig) -> Path:
    if cfg.tokenizer:
        return Path(cfg.tokenizer)
    if cfg.init:
        from lmforge.catalog import resolve_model

        return resolve_model(cfg.init, progress=False)
    raise LmforgeError("--tokenizer DIR is needed (the directory with tokenizer.json the shards were made with)")


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def check_memory(cfg: PretrainConfig, mcfg: ModelConfig, device: torch.device, world: int, strategy: str) -> None:
    """Refuse, before anything is allocated, a run the device cannot hold, with the plan's numbers."""
    from lmforge.plan import activation_bytes, memory_per_device, n_params

    need = memory_per_device(mcfg, cfg.batch_size, cfg.seq_len, world, strategy, cfg.checkpointing,
                             half=device.type == "cuda")
    have = _available_bytes(device)
    if need > have:
        acts = activation_bytes(mcfg, cfg.batch_size, cfg.seq_len, cfg.checkpointing, device.type == "cuda")
        raise LmforgeError(
            f"this run needs about {need / 2**30:.1f} GiB per {device.type} device ({n_params(mcfg) / 1e6:,.0f}M "
            f"parameters x 16 bytes of AdamW state{' / ' + str(world) + ' ranks' if strategy == 'fsdp' else ''}"
            f" + {acts / 2**30:.1f} GiB of activations at batch {cfg.batch_size} x {cfg.seq_len}), but only "
            f"{have / 2**30:.1f} GiB is free; lower --batch-size (raise --grad-accum), pick a smaller --preset, or "
            "shard with --distributed fsdp over more ranks (see `lmforge plan`)"
        )


def _bytes_per_token(batches: ShardBatches, tokenizer: object) -> float:
    """UTF-8 bytes per token of the held-out text, to turn its loss into bits per byte."""
    ids = [int(t) for b in batches.held_out() for t in b["targets"].flatten()]
    if not ids:
        return 0.0
    return len(tokenizer.decode(ids).encode("utf-8")) / len(ids)


# --- the stage ----------------------------------------------------------------------------------------------------


def _loop_config(cfg: PretrainConfig, mcfg: ModelConfig, device: torch.device, bpt: float) -> TrainConfig:
    from lmforge.plan import PEAK_FLOPS, n_params

    gpu = torch.cuda.get_device_name(device).lower() if device.type == "cuda" else ""
    peak = next((flops for name, flops in PEAK_FLOPS.items() if name != "cpu" and name in gpu), 0.0)
    return TrainConfig(
        max_steps=cfg.max_steps, lr=cfg.lr, min_lr_ratio=cfg.min_lr_ratio, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, betas=(0.9, cfg.beta2), grad_clip=cfg.grad_clip, eval_every=cfg.eval_every,
        save_every=cfg.save_every, keep_last=cfg.keep_last, progress=cfg.progress, schedule=cfg.schedule,
        decay_ratio=cfg.decay_ratio, flops_per_token=6 * n_params(mcfg), peak_flops=peak, bytes_per_token=bpt,
        warm_allocator=True,  # one model, fixed shapes: step 1's pages serve every later step
    )


def _hardware(device: torch.device, world: int) -> dict:
    hw = {"device": device.type, "world_size": world, "torch": torch.__version__, "python": platform.python_version(),
          "machine": platform.machine(), "processor": platform.processor(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
    return hw


def main(cfg: PretrainConfig) -> dict:
    from lmforge.checkpoint import make_lineage, save_checkpoint
    from lmforge.tokenizer import Tokenizer

    cfg.validate()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = distributed.setup(device)
    # Under torchrun "none" means DDP; alone, any strategy runs as one plain process (e.g. `lmforge reproduce`).
    strategy = ("ddp" if cfg.distributed == "none" else cfg.distributed) if world > 1 else "none"
    device = distributed.local_device(device)
    shards = TokenShards.open(Path(cfg.shards))
    tok_dir = _tokenizer_dir(cfg)
    tokenizer = Tokenizer.load(tok_dir)
    tok_sha = sha256_file(tok_dir / "tokenizer.json") if (tok_dir / "tokenizer.json").is_file() else None
    mcfg, state = _model_config(cfg, shards, weights=strategy != "fsdp" or rank == 0)
    shards.check_tokenizer(tok_sha, mcfg.vocab_size)
    check_memory(cfg, mcfg, device, world, strategy)
    manifest_sha = sha256_file(shards.directory / MANIFEST)
    run = identity(cfg, {"manifest.json": manifest_sha}, NOT_IDENTITY)
    out = prepare_out(cfg, run) if rank == 0 else Path(cfg.out)
    distributed.barrier()  # the other ranks touch the directory only once rank 0 has checked and claimed it

    batches = ShardBatches(shards, cfg.seq_len, cfg.batch_size, cfg.grad_accum, cfg.seed, cfg.val_windows, rank, world)
    torch.manual_seed(cfg.seed)
    model = distributed.build_model(mcfg, strategy, device, cfg.init_std, state, cfg.checkpointing)
    if cfg.compile:
        model = torch.compile(model)
    healer = Healer(HealingConfig(cfg.spike_factor, skip_batches=cfg.skip_batches, max_rollbacks=cfg.max_rollbacks,
                                  cooldown_steps=cfg.cooldown_steps)) if cfg.healing else None
    loop_cfg = _loop_config(cfg, mcfg, device, _bytes_per_token(batches, tokenizer))
    counters = train(model, batches, batches.held_out(), loop_cfg, out, label=f"pretrain {cfg.preset}",
                     healer=healer, runtime=distributed.runtime(rank, world))
    weights = distributed.full_state_dict(model) if world > 1 else distributed.unwrap(model).state_dict()
    result = {}
    if rank == 0:
        data = {"shards": str(shards.directory), "manifest_sha256": manifest_sha, "tokens": shards.num_tokens,
                "shard_sha256": [s["sha256"] for s in shards.manifest["shards"]],
                "inputs": shards.manifest.get("inputs")}  # the corpus pipeline's manifest hashes
        lineage = make_lineage(
            cfg.init or f"preset:{cfg.preset}", kind="pretrain", settings=dataclasses.asdict(cfg),
            command_argv=sys.argv, data=data, tokenizer_sha256=tok_sha, hardware=_hardware(device, world),
            train=counters, log=read_log(out),
        )
        write_json(out / "lineage.json", lineage)
        save_checkpoint(out / "model", mcfg, weights, tokenizer, lineage)
        result = {"out": str(out), "model": str(out / "model"), **_final_metrics(out),
                  "chat": f"lmforge chat --model {out / 'model'}"}
    distributed.teardown()
    return result


def _final_metrics(out: Path) -> dict:
    log = read_log(out)
    losses = [r["loss"] for r in log if "loss" in r]
    evals = [r for r in log if "eval_loss" in r]
    metrics: dict = {"steps": log[-1]["step"] if log else 0, "first_loss": losses[0] if losses else None,
                     "last_loss": losses[-1] if losses else None,
                     "healing_events": sum(1 for r in log if "event" in r)}
    if evals:
        metrics |= {"eval_loss_before": evals[0]["eval_loss"], "eval_loss_after": evals[-1]["eval_loss"]}
        if "eval_bpb" in evals[-1]:
            metrics["eval_bpb"] = evals[-1]["eval_bpb"]
    tok_s = sorted(r["tok_s"] for r in log if "tok_s" in r)
    if tok_s:
        metrics["median_tok_s"] = tok_s[len(tok_s) // 2]
    return metrics


def reproduce(checkpoint: Path, out: str, progress: bool = True) -> dict:
    """Re-run the pretraining recorded in a checkpoint's lineage.json into `out`."""
    path = Path(checkpoint) / "lineage.json"
    if not path.is_file():
        raise LmforgeError(f"{checkpoint}: no lineage.json; only checkpoints written by lmforge can be reproduced")
    lineage = json.loads(path.read_text(encoding="utf-8"))
    if lineage.get("kind") != "pretrain":
        raise LmforgeError(f"{path}: kind {lineage.get('kind')!r}; `lmforge reproduce` re-runs pretraining runs")
    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    settings = {k: v for k, v in lineage["settings"].items() if k in names}
    cfg = PretrainConfig(**settings | {"out": out, "resume": False, "overwrite": False, "progress": progress})
    manifest = Path(cfg.shards) / MANIFEST
    if manifest.is_file() and sha256_file(manifest) != lineage["data"]["manifest_sha256"]:
        raise LmforgeError(f"{manifest}: the shards changed since the run (manifest hash differs); restore them")
    return main(cfg)

