"""Reversible coupling: exact inverse, gradients equal to the plain twin's, running stats, RNG replay, memory."""

from __future__ import annotations

import copy
import datetime

import pytest
import torch
from torch import nn

import histo.norms
from segmentation.mbconv import MBConv
from segmentation.reversible import ReversibleBlock, ReversibleSequence, SavedTensorMeter

NORMS = histo.norms.names()
C = 8  # channels of the stream; F and G see C // 2


def make_sequence(depth: int, norm: str = "group", dropout: float = 0.0, seed: int = 0) -> ReversibleSequence:
    torch.manual_seed(seed)
    blocks = [
        ReversibleBlock(
            MBConv(C // 2, expansion=2, norm=norm, dropout=dropout),
            MBConv(C // 2, expansion=2, norm=norm, dropout=dropout),
        )
        for _ in range(depth)
    ]
    return ReversibleSequence(blocks)


def twins(depth: int, norm: str, dropout: float = 0.0, dtype=torch.float64):
    """A reversible sequence and its plain twin holding equal copies of the same parameters."""
    rev = make_sequence(depth, norm, dropout).to(dtype)
    plain = make_sequence(depth, norm, dropout, seed=1).to(dtype)
    plain.load_state_dict(rev.state_dict())
    plain.reversible = False
    return rev, plain


def with_mask(model: nn.Module, x: torch.Tensor, norm: str) -> None:
    """RN-B needs a region mask from the caller: a ball in the middle of the volume."""
    if norm == "rn_b":
        grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in x.shape[2:]], indexing="ij"))
        mask = (grid.pow(2).sum(0) < 0.5)[None, None].expand(x.shape[0], 1, *x.shape[2:])
        histo.norms.set_region_mask(model, mask)


def run(model: nn.Module, x: torch.Tensor, weight: torch.Tensor, seed: int = 7, skip: bool = False):
    """One forward + backward of a fixed random linear loss; returns output, input grad, param grads."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = model(x)
    out = y + 2.0 * x if skip else y  # a skip reading the sequence's input after it ran
    (out * weight).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max deviation relative to the reference's scale (floor 1e-6: an exactly-zero gradient, e.g. of a
    BN bias that a following GN cancels, must still agree to 1e-11 absolute)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
def test_inverse_reconstructs_every_block_fp32(norm: str) -> None:
    seq = make_sequence(4, norm)
    x = torch.randn(2, C, 8, 8, 8)
    with_mask(seq, x, norm)
    for train in (True, False):
        seq.train(train)
        states = [x]
        with torch.no_grad(), histo.norms.frozen_running_stats(seq):
            for block in seq.blocks:
                states.append(block(states[-1]))
            y = states[-1]
            for i in reversed(range(len(seq.blocks))):
                y = seq.blocks[i].inverse(y)
                assert (y - states[i]).abs().max().item() <= 1e-5, f"block {i} train={train}"
                assert not torch.equal(states[i], states[i + 1])  # the block is not the identity


@pytest.mark.parametrize("norm", NORMS)
def test_gradients_equal_plain_twin_float64_with_dropout(norm: str) -> None:
    rev, plain = twins(3, norm, dropout=0.2)
    x = torch.randn(2, C, 8, 8, 8, dtype=torch.float64)
    weight = torch.randn_like(x)
    for model in (rev, plain):
        with_mask(model, x, norm)
    y_rev, gx_rev, gp_rev = run(rev, x, weight, skip=True)
    y_plain, gx_plain, gp_plain = run(plain, x, weight, skip=True)
    # dropout really is on: another seed gives another output, so equality below needs RNG replay
    assert not torch.allclose(run(copy.deepcopy(plain), x, weight, seed=8)[0], y_plain)
    assert torch.allclose(y_rev, y_plain, rtol=0, atol=1e-12)
    assert rel_err(gx_rev, gx_plain) <= 1e-5
    assert gp_rev.keys() == gp_plain.keys() and len(gp_rev) > 0
    for name in gp_plain:
        assert rel_err(gp_rev[name], gp_plain[name]) <= 1e-5, name
    for (name, b_rev), (_, b_plain) in zip(rev.named_buffers(), plain.named_buffers(), strict=True):
        assert torch.equal(b_rev, b_plain), name


def test_gradcheck_against_finite_differences() -> None:
    seq = make_sequence(2, "group").double()
    x = torch.randn(1, C, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(seq, (x,), eps=1e-6, atol=1e-6)


def test_batchnorm_running_stats_updated_once_per_step() -> None:
    rev, plain = twins(3, "batch")
    x = torch.randn(2, C, 8, 8, 8, dtype=torch.float64)
    weight = torch.randn_like(x)
    run(rev, x, weight)
    run(plain, x, weight)
    bns = [m for m in rev.modules() if isinstance(m, nn.BatchNorm3d)]
    assert len(bns) == 3 * 2 * 3
    assert all(m.num_batches_tracked.item() == 1 for m in bns)
    moved = [m for m in bns if not torch.allclose(m.running_mean, torch.zeros_like(m.running_mean))]
    assert len(moved) == len(bns)
    for (name, b_rev), (_, b_plain) in zip(rev.named_buffers(), plain.named_buffers(), strict=True):
        assert torch.allclose(b_rev, b_plain, rtol=0, atol=1e-14), name


def test_input_and_output_stay_intact_for_skips() -> None:
    rev, _ = twins(2, "group")
    x = torch.randn(1, C, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    x_copy = x.detach().clone()
    y = rev(x)
    y_copy = y.detach().clone()
    (y * y).sum().backward()
    assert torch.equal(x.detach(), x_copy) and torch.equal(y.detach(), y_copy)


def test_saved_activations_constant_in_depth() -> None:
    x = torch.randn(1, C, 8, 8, 8, requires_grad=True)
    saved = {}
    for reversible in (True, False):
        for depth in (1, 2, 4):
            seq = make_sequence(depth)
            seq.reversible = reversible
            with SavedTensorMeter(exclude=list(seq.parameters())) as meter:
                y = seq(x)
            saved[reversible, depth] = meter.bytes
            y.sum().backward()
    out_bytes = x.numel() * x.element_size()
    assert saved[True, 1] == saved[True, 2] == saved[True, 4] == out_bytes  # only the output is kept
    assert saved[False, 4] >= 3.5 * saved[False, 1] and saved[False, 1] > 5 * out_bytes


def test_autocast_bf16_keeps_fp32_stream_and_replays_autocast() -> None:
    rev, plain = twins(3, "group", dtype=torch.float32)
    x = torch.randn(2, C, 8, 8, 8)
    weight = torch.randn_like(x)
    grads = []
    for model in (rev, plain):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(xi.to(torch.bfloat16))
        assert y.dtype == torch.float32
        (y * weight).sum().backward()
        grads.append(xi.grad)
    # recomputation outside bf16 autocast would miss the forward's rounding by ~1e-2 relative
    assert rel_err(grads[0], grads[1]) <= 2e-3


def test_empty_sequence_rejected() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        ReversibleSequence([])


def test_rn_b_backward_uses_the_forward_mask_after_the_context_is_left() -> None:
    """`with region_mask(...): loss = ...` then `loss.backward()` outside works as for the plain twin."""
    rev, plain = twins(2, "rn_b")
    x = torch.randn(2, C, 8, 8, 8, dtype=torch.float64)
    weight = torch.randn_like(x)
    mask = torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(3)) > 0.5
    grads = []
    for model in (rev, plain):
        xi = x.clone().requires_grad_(True)
        with histo.norms.region_mask(model, mask):
            loss = (model(xi) * weight).sum()
        histo.norms.set_region_mask(model, ~mask)  # even a different mask set before backward is not used
        loss.backward()
        grads.append((xi.grad, {n: p.grad for n, p in model.named_parameters()}))
        assert all(
            m.mask is not None and torch.equal(m.mask, ~mask)
            for m in model.modules()
            if isinstance(m, histo.norms.RegionNormB)
        )
    assert rel_err(grads[0][0], grads[1][0]) <= 1e-5
    for name, g in grads[1][1].items():
        assert rel_err(grads[0][1][name], g) <= 1e-5, name


def _ddp_worker(rank: int, port: int, find_unused: bool, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # a collective that waits longer than this raises in the worker instead of hanging the test
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        seq = nn.parallel.DistributedDataParallel(
            make_sequence(2).double(), find_unused_parameters=find_unused
        )
        x = torch.randn(2, C, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        for _ in range(2):  # a second step: DDP's reducer is reset and reused
            seq.zero_grad()
            (seq(x[rank : rank + 1]) ** 2).sum().backward()
        queue.put((rank, {n: p.grad.numpy().copy() for n, p in seq.module.named_parameters()}))
    except Exception as e:  # report instead of leaving the test waiting on the queue
        queue.put((rank, repr(e)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("find_unused", [False, True])
def test_ddp_two_gloo_processes_average_the_reversible_gradients(find_unused: bool) -> None:
    """The custom autograd Function under DistributedDataParallel: grads = the full-batch mean's."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawned, not forked: a child forked from this many-threaded pytest process can deadlock on a lock
    # another thread held at the fork (CI once hung here for the whole run); daemons never outlive the test
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_ddp_worker, args=(r, port, find_unused, queue), daemon=True) for r in range(2)
    ]
    try:
        for p in procs:
            p.start()
        # a generous wait: the two gloo processes share two cores with whatever else runs (once over 120 s)
        results = dict(queue.get(timeout=300) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    assert all(isinstance(r, dict) for r in results.values()), results
    seq = make_sequence(2).double()
    x = torch.randn(2, C, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (seq(x) ** 2).sum().div(2).backward()  # DDP averages the per-rank gradients
    for name, p in seq.named_parameters():
        for rank in (0, 1):
            got = torch.from_numpy(results[rank][name])
            assert rel_err(got, p.grad) <= 1e-10, (rank, name)
