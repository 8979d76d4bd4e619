"""Device selection, mixed precision and torchrun/DDP setup shared by every trainer."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from histo.errors import HistoError

logger = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> CUDA when present else CPU; `cuda` without a GPU is a user error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HistoError(f"--device {name} requested but no CUDA device is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise HistoError(f"unknown device {name!r} (use auto, cpu or cuda)")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op on CPU (CPU bf16 is slower than fp32 on most nodes)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) distributed job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the torchrun job described by RANK/WORLD_SIZE/LOCAL_RANK (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    logger.debug("process %d of %d (local rank %d) on %s", rank, world_size, local_rank, device)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup_distributed() -> None:
    """Leave the process group (safe to call when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes in place (identity in a single process).

    NCCL reduces CUDA tensors only, so a CPU tensor travels through the current GPU and back.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        tensor.copy_(on_gpu.cpu())
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_buffers(model: torch.nn.Module) -> int:
    """Average the floating-point buffers (BN running statistics) over all processes; returns how many.

    Each DDP rank updates its running mean/var from its own batches only, so validating or saving after an
    epoch would use rank-dependent statistics; averaging them makes every rank hold one model (as timm's
    distribute_bn). Integer buffers (batch counters) already agree. No-op in a single process.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    with torch.no_grad():
        for b in buffers:
            all_reduce_sum(b).div_(dist.get_world_size())
    return len(buffers)


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
