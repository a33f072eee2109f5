"""Training on many processes with PyTorch's own engine: torchrun, DDP or FSDP2, and torch.distributed.checkpoint.

- `setup()` joins the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR...):
  NCCL on GPUs, gloo on CPU. Multi-node is torchrun's standard rendezvous, e.g. on each of 2 nodes
  `torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m lmforge.cli pretrain ...`.
- `build_model()` makes the model on the meta device, shards it with FSDP2 `fully_shard` (one unit per block, then
  the root) under a bf16-compute / fp32-reduce mixed-precision policy on GPU, and only then allocates and
  initialises each rank's shard, so no rank ever holds the full model (continuing a checkpoint, rank 0 reads it
  and broadcasts each tensor to the ranks that own its shards). DDP replicates a normally built model.
- Checkpoints are torch.distributed.checkpoint (DCP) directories: every rank writes its own shard in parallel into
  a temporary directory that rank 0 renames when all are done; DCP re-shards on load, so a run saved on 2 ranks
  resumes on 1 or 8. The loop's one-process format (loop.save_state) loads too.
- `runtime()` hands the loop (loop.Runtime) the all-reduce, barrier, save and load it needs.
It does not launch processes (torchrun does) and does not choose hyperparameters.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lmforge.config import ModelConfig
from lmforge.fileio import write_json
from lmforge.model import Transformer, rope_table
from lmforge.train.loop import Runtime, load_state, save_state

OPTIMIZER_SAVED = "optimizer_saved"


def setup(device: torch.device) -> tuple[int, int]:
    """(rank, world size): joins torchrun's process group when launched by it, else (0, 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def local_device(device: torch.device) -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if device.type == "cuda" else device


def _shard(model: Transformer, device: torch.device) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    for layer in model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def _checkpoint_blocks(model: Transformer) -> None:
    """Activation checkpointing: keep only each block's input and recompute the rest during backward."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from lmforge.model import Block

    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))


def build_model(cfg: ModelConfig, strategy: str, device: torch.device, init_std: float = 0.02,
                state: dict[str, torch.Tensor] | None = None, checkpointing: bool = False) -> nn.Module:
    """A freshly initialised (or `state`-loaded) model, wrapped for `strategy`; FSDP builds on the meta device.

    Under FSDP only rank 0's `state` is read; the other ranks pass {} (not None) and receive its tensors."""
    if strategy != "fsdp":
        model = Transformer(cfg).to(device)
        if state is None:
            model.init_weights(init_std)
        else:
            model.load_state_dict(state, strict=False)
        if checkpointing:
            _checkpoint_blocks(model)
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return model
    with torch.device("meta"):
        model = Transformer(cfg)
    if checkpointing:
        _checkpoint_blocks(model)
    _shard(model, device)
    model.to_empty(device=device)  # each rank allocates its shard only
    cos, sin = rope_table(cfg, cfg.max_seq_len)
    model.rope_cos.copy_(cos)  # buffers are not sharded; to_empty left them uninitialised
    model.rope_sin.copy_(sin)
    if state is None:
        model.init_weights(init_std)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                    strict=False))
    return model


def unwrap(model: nn.Module) -> Transformer:
    """The Transformer inside torch.compile's and DDP's wrappers (their state dicts carry prefixes)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors on CPU (gathered from all ranks; collective, call it on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# --- sharded checkpoints ------------------------------------------------------------------------------------------


def save_sharded(directory: Path, model: nn.Module, opt: torch.optim.Optimizer, counters: dict) -> None:
    """Every rank writes its shard of the model and optimizer into a temporary directory; rank 0 publishes it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tmp = directory.with_name(f".{directory.name}.partial")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    state = {"model": get_model_state_dict(model)}
    # Asking for an optimizer's state before its first step would take a step to create it (Adam's step count
    # would then be off by one), so the step-0 checkpoint holds no optimizer state.
    if opt.state:
        state["optim"] = get_optimizer_state_dict(model, opt)
    dcp.save(state, checkpoint_id=str(tmp))
    barrier()
    if rank0:
        write_json(tmp / "state.json", {**counters, OPTIMIZER_SAVED: bool(opt.state)})
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)


def save_local(directory: Path, model: nn.Module, opt: torch.optim.Optimizer, counters: dict) -> None:
    """loop.save_state under the Transformer's own names, which load_any expects (torch.compile adds `_orig_mod.`)."""
    save_state(directory, unwrap(model), opt, counters)


def load_any(directory: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Restore a checkpoint in either format (DCP from any number of ranks, or loop.save_state); the counters."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    if (directory / "trainable.safetensors").is_file():
        return load_state(directory, unwrap(model), opt)
    counters = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    state = {"model": sd.get_model_state_dict(model)}
    if counters.pop(OPTIMIZER_SAVED):
        state["optim"] = sd.get_optimizer_state_dict(model, opt)
    dcp.load(state, checkpoint_id=str(directory))
    sd.set_model_state_dict(model, state["model"])
    if "optim" in state:
        sd.set_optimizer_state_dict(model, opt, state["optim"])
    else:
        opt.state.clear()  # back to before the first step
    return counters


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _mean(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def runtime(rank: int, world: int) -> Runtime:
    """The loop's view of this process group (one process: local saves, but any checkpoint format loads)."""
    if world == 1:
        return Runtime(save=save_local, load=load_any)
    return Runtime(world=world, is_main=rank == 0, mean=_mean, save=save_sharded, load=load_any, barrier=barrier)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
