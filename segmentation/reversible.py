"""Reversible residual sequences (additive coupling) that keep only their output for backward.

A block maps x = [x1, x2] (channel halves) to y1 = x1 + F(x2), y2 = x2 + G(y1); its inverse is
x2 = y2 - G(y1), x1 = y1 - F(x2). `ReversibleSequence` runs its blocks inside one autograd Function that
saves the final output only and, in backward, recomputes each block's input from its output block by block,
so activation memory does not grow with depth. Recomputation runs under `frozen_running_stats` (running
statistics move once per step), replays the CPU/CUDA RNG state of the forward pass (dropout masks match),
re-enters the forward's autocast state, gives every `RecomputeState` module (rn_b: its region mask) the
state the forward found, so the caller may clear or replace it before backward as with the plain twin, and
keeps the coupling sums in fp32 or wider. The input tensor is never freed or modified in place, so a skip
connection may read it (or the output) safely.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from histo.norms import RecomputeState, frozen_running_stats


@dataclass(frozen=True)
class RngState:
    """Generator states taken just before a branch ran: the CPU one, and the CUDA one of its device."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    cuda_index: int | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            return cls(torch.get_rng_state(), torch.cuda.get_rng_state(index), index)
        return cls(torch.get_rng_state(), None, None)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block with the captured generator states; the global states are restored afterwards."""
        devices = [] if self.cuda_index is None else [self.cuda_index]
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_index)
            yield


class ReversibleBlock(nn.Module):
    """Additive coupling y1 = x1 + F(x2), y2 = x2 + G(y1) on the channel halves of x; exactly invertible."""

    def __init__(self, f: nn.Module, g: nn.Module) -> None:
        super().__init__()
        self.f = f
        self.g = g

    def forward(self, x: torch.Tensor, rng_log: list[RngState] | None = None) -> torch.Tensor:
        """Coupled forward; with `rng_log`, the RNG state before F and before G is appended to it."""
        x1, x2 = x.chunk(2, dim=1)
        y1 = x1 + _branch(self.f, x2, rng_log)
        y2 = x2 + _branch(self.g, y1, rng_log)
        return torch.cat([y1, y2], dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Recover the input from the output (call under `frozen_running_stats` in training mode)."""
        y1, y2 = y.chunk(2, dim=1)
        x2 = y2 - _branch(self.g, y1, None)
        x1 = y1 - _branch(self.f, x2, None)
        return torch.cat([x1, x2], dim=1)


def _branch(fn: nn.Module, x: torch.Tensor, rng_log: list[RngState] | None) -> torch.Tensor:
    """F or G of the coupling, cast back to the stream dtype so the sum is not done in low precision."""
    if rng_log is not None:
        rng_log.append(RngState.capture(x.device))
    return fn(x).to(x.dtype)


def _saved_states(blocks: nn.Module) -> list[tuple[RecomputeState, object]]:
    """Each `RecomputeState` module of `blocks` with the state it has now (taken as the forward starts)."""
    return [(m, m.save_state()) for m in blocks.modules() if isinstance(m, RecomputeState)]


@contextlib.contextmanager
def _forward_states(saved: list[tuple[RecomputeState, object]]) -> Iterator[None]:
    """Give each module the state it had in the forward pass; their current states are restored afterwards."""
    current = [(module, module.save_state()) for module, _ in saved]
    try:
        for module, state in saved:
            module.restore_state(state)
        yield
    finally:
        for module, state in current:
            module.restore_state(state)


def _autocast_state(device_type: str) -> dict:
    return {
        "device_type": device_type,
        "dtype": torch.get_autocast_dtype(device_type),
        "enabled": torch.is_autocast_enabled(device_type),
    }


def _vjp(
    fn: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, rng: RngState
) -> tuple[torch.Tensor, torch.Tensor, dict[nn.Parameter, torch.Tensor]]:
    """Recompute fn(x) with the forward's RNG; return fn(x), d/dx and d/dparams of <fn(x), grad_out>."""
    x = x.detach().requires_grad_(True)
    params = [p for p in fn.parameters() if p.requires_grad]
    with torch.enable_grad(), rng.replay():
        out = fn(x).to(x.dtype)
    grads = torch.autograd.grad(out, [x, *params], grad_out, allow_unused=True)
    dx = torch.zeros_like(x) if grads[0] is None else grads[0]
    return out.detach(), dx, {p: g for p, g in zip(params, grads[1:], strict=True) if g is not None}


def _block_backward(
    block: ReversibleBlock, y: torch.Tensor, dy: torch.Tensor, rng: list[RngState]
) -> tuple[torch.Tensor, torch.Tensor, dict[nn.Parameter, torch.Tensor]]:
    """From the block output and its gradient, recover the input, its gradient and the parameter grads."""
    rng_f, rng_g = rng
    y1, y2 = y.chunk(2, dim=1)
    dy1, dy2 = dy.chunk(2, dim=1)
    with frozen_running_stats(block):
        g_y1, g_dy1, grads = _vjp(block.g, y1, dy2, rng_g)
        x2 = y2 - g_y1
        dx1 = dy1 + g_dy1
        f_x2, f_dx2, grads_f = _vjp(block.f, x2, dx1, rng_f)
    x1 = y1 - f_x2
    dx2 = dy2 + f_dx2
    _accumulate(grads, grads_f)
    return torch.cat([x1, x2], dim=1), torch.cat([dx1, dx2], dim=1), grads


def _accumulate(total: dict[nn.Parameter, torch.Tensor], new: dict[nn.Parameter, torch.Tensor]) -> None:
    """Add parameter gradients into `total` (a parameter shared by several branches gets their sum)."""
    for p, g in new.items():
        total[p] = total[p] + g if p in total else g


class _ReversibleFunction(torch.autograd.Function):
    """Forward through all blocks without a graph; backward inverts them one at a time from the output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, blocks: nn.ModuleList, *params: torch.Tensor) -> torch.Tensor:
        ctx.blocks = blocks
        ctx.autocast = _autocast_state(x.device.type)
        ctx.states = _saved_states(blocks)
        ctx.rng = []
        for block in blocks:
            log: list[RngState] = []
            x = block(x, log)
            ctx.rng.append(log)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (y,) = ctx.saved_tensors
        grads: dict[nn.Parameter, torch.Tensor] = {}
        with torch.autocast(**ctx.autocast), _forward_states(ctx.states):
            for block, rng in zip(reversed(ctx.blocks), reversed(ctx.rng), strict=True):
                y, dy, block_grads = _block_backward(block, y, dy, rng)
                _accumulate(grads, block_grads)
        params = list(ctx.blocks.parameters())
        return (dy, None, *(grads.get(p) for p in params))


class ReversibleSequence(nn.Module):
    """Blocks run in order; with `reversible=True` (and autograd recording) activations are recomputed.

    With `reversible=False` the same blocks run under ordinary autograd (the plain residual twin): same
    parameters and names, same function, activation memory growing with depth. Half-precision inputs are
    promoted to fp32 so the coupling sums stay exact under autocast.
    """

    def __init__(self, blocks: list[ReversibleBlock], reversible: bool = True) -> None:
        super().__init__()
        if not blocks:
            raise ValueError("a reversible sequence needs at least one block")
        self.blocks = nn.ModuleList(blocks)
        self.reversible = reversible

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        params = list(self.blocks.parameters())
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        if self.reversible and needs_grad:
            return _ReversibleFunction.apply(x, self.blocks, *params)
        for block in self.blocks:
            x = block(x)
        return x


class SavedTensorMeter:
    """Counts the bytes of distinct storages autograd saves for backward while active (forward pass).

    An allocator-independent measure of activation memory: storages in `exclude` (e.g. the parameters)
    are not counted, and a storage saved by several operations counts once.
    """

    def __init__(self, exclude: list[torch.Tensor] | tuple[torch.Tensor, ...] = ()) -> None:
        self._skip = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: set[int] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self._skip and key not in self._seen:
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
