"""Peak training memory and step time of the reversible MBConv 3D U-Net against its non-reversible twin.

Every configuration (reversible or twin, cube side, channels, blocks per level) runs in its own process:
build the model, AdamW and a random input, note the baseline, then one training step (forward, backward,
optimizer step) for the peak and further steps for the time. Memory is the peak RSS minus the RSS after
setup on CPU (glibc's mmap threshold is pinned at 128 KiB in the workers so freed tensors go back to the
system and RSS follows live memory), or `torch.cuda.max_memory_allocated` minus the allocation after setup
on CUDA. `saved_mb` is the allocator-independent size of the tensors autograd kept for backward.

The fixed budget is the twin's step memory at `--budget-size`; the script reports the largest cube each
network trains within it, and the largest channel multiplier of the reversible network at that size.
Prints a table and writes bench_out/segment_memory.json. Example (CPU, ~20-30 min on 2 busy cores):

    .venv/bin/python scripts/bench_segment_memory.py --sizes 32,48,64 --budget-size 48 --search-max 96
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
MMAP_THRESHOLD = "131072"


def worker(spec: dict) -> dict:
    """Run one configuration in this process and return its measurements."""
    import resource

    import torch

    from segmentation.reversible import SavedTensorMeter
    from segmentation.unet import UNet3D

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    model = UNet3D(
        channels=spec["channels"],
        blocks_per_level=spec["blocks"],
        norm=spec["norm"],
        reversible=spec["reversible"],
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    side = spec["size"]
    x = torch.randn(1, 4, side, side, side, device=device)
    target = torch.rand(1, 3, side, side, side, device=device).round()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    cuda = device.type == "cuda"

    def train_step(meter: SavedTensorMeter | None = None) -> None:
        if meter is None:
            loss = loss_fn(model(x), target)
        else:
            with meter:
                loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _current_rss()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    meter = SavedTensorMeter(exclude=list(model.parameters()))
    start = time.perf_counter()
    train_step(meter)
    first = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        resolved = True
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        resolved = peak > peak_before  # else an import-time peak hides the step's
    times = []
    for _ in range(spec["timing_steps"]):
        start = time.perf_counter()
        train_step()
        times.append(time.perf_counter() - start)
    return {
        **spec,
        "params": sum(p.numel() for p in model.parameters()),
        "step_mb": (peak - base) / 2**20,
        "baseline_mb": base / 2**20,
        "saved_mb": meter.bytes / 2**20,
        "resolved": resolved,
        "first_step_s": first,
        "step_s": min(times) if times else None,
    }


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Runner:
    """Runs configurations in subprocesses, caching results by configuration."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.common = {"norm": args.norm, "device": args.device, "threads": args.threads}
        self.timing_steps = args.timing_steps
        self.results: dict[str, dict] = {}
        self.bar = tqdm(desc="configurations", unit="cfg", file=sys.stderr)

    def __call__(
        self, reversible: bool, size: int, channels: list[int], blocks: int, timed: bool = True
    ) -> dict:
        spec = {**self.common, "reversible": reversible, "size": size, "channels": channels, "blocks": blocks}
        key = json.dumps(spec, sort_keys=True)
        if key not in self.results:
            spec["timing_steps"] = self.timing_steps if timed else 0
            env = {
                **os.environ,
                "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD,
                "OMP_NUM_THREADS": str(spec["threads"]),
            }
            self.bar.set_postfix_str(f"{'rev' if reversible else 'twin'} {size}^3 c={channels[0]} b={blocks}")
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(spec)],
                capture_output=True,
                text=True,
                env=env,
                cwd=REPO,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"worker failed for {key}:\n{proc.stderr[-2000:]}")
            self.results[key] = json.loads(proc.stdout.strip().splitlines()[-1])
            self.bar.update()
        return self.results[key]


def largest_fitting(run, budget: float, candidates: list, make) -> tuple:
    """Walk candidates in increasing order; return the last that fits `budget` (None if none) and the rows."""
    best, rows = None, []
    for value in candidates:
        row = run(**make(value), timed=False)
        rows.append(row)
        if row["step_mb"] > budget:
            break
        best = value
    return best, rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="32,48,64", help="cube sides for the side-by-side table")
    parser.add_argument("--channels", default="16,32,64,128")
    parser.add_argument("--blocks", type=int, default=2, help="blocks per level")
    parser.add_argument("--depths", default="1,2,4", help="blocks per level compared at --budget-size")
    parser.add_argument("--budget-size", type=int, default=48, help="twin's cube side defining the budget")
    parser.add_argument("--search-max", type=int, default=96, help="largest cube side tried in the search")
    parser.add_argument("--channel-mults", default="1.5,2,2.5,3", help="reversible channel multipliers tried")
    parser.add_argument("--norm", default="instance")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timing-steps", type=int, default=1, help="timed steps after the measured one")
    parser.add_argument("--out", default="bench_out/segment_memory.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    channels = [int(c) for c in args.channels.split(",")]
    divisor = 2 ** (len(channels) - 1)
    run = Runner(args)

    sizes = [int(s) for s in args.sizes.split(",")]
    table = [(run(False, s, channels, args.blocks), run(True, s, channels, args.blocks)) for s in sizes]
    depths = [int(d) for d in args.depths.split(",")]
    depth_table = [
        (run(False, args.budget_size, channels, d), run(True, args.budget_size, channels, d)) for d in depths
    ]

    budget = run(False, args.budget_size, channels, args.blocks)["step_mb"]
    sides = list(range(args.budget_size, args.search_max + 1, divisor))
    fit = {}
    for reversible in (False, True):
        fit[reversible], _ = largest_fitting(
            run,
            budget,
            sides,
            lambda s, r=reversible: {"reversible": r, "size": s, "channels": channels, "blocks": args.blocks},
        )
    mults = [1.0] + [float(m) for m in args.channel_mults.split(",")]
    best_mult, _ = largest_fitting(
        run,
        budget,
        mults,
        lambda m: {
            "reversible": True,
            "size": args.budget_size,
            "channels": scaled(channels, m),
            "blocks": args.blocks,
        },
    )
    summary = {
        "device": args.device,
        "budget_mb": budget,
        "budget_definition": f"twin step memory at {args.budget_size}^3, channels {channels}, {args.blocks} blocks/level",
        "largest_cube_twin": fit[False],
        "largest_cube_reversible": fit[True],
        "volume_ratio": None if not (fit[False] and fit[True]) else (fit[True] / fit[False]) ** 3,
        "largest_channel_multiplier_reversible": best_mult,
        "search_max": args.search_max,
        "reversible_still_fits_at_search_max": fit[True] == sides[-1],
        "reversible_still_fits_at_largest_multiplier": best_mult == mults[-1],
        "step_time_ratio": {r[0]["size"]: r[1]["step_s"] / r[0]["step_s"] for r in table},
        "memory_ratio": {r[0]["size"]: r[0]["step_mb"] / r[1]["step_mb"] for r in table},
        "malloc_mmap_threshold": None if args.device == "cuda" else int(MMAP_THRESHOLD),
    }
    print_report(table, depth_table, summary)
    from histo.io import atomic_write_json

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, {"summary": summary, "runs": list(run.results.values())})
    print(f"\nwrote {args.out}")


def scaled(channels: list[int], mult: float) -> list[int]:
    """Channels times `mult`, rounded to even numbers (the coupling splits them in halves)."""
    return [max(2, 2 * round(c * mult / 2)) for c in channels]


def print_report(table: list, depth_table: list, summary: dict) -> None:
    head = f"{'cube':>6} {'blocks':>6} {'params':>8} | {'twin MB':>8} {'rev MB':>8} {'ratio':>6} | "
    head += f"{'twin saved':>10} {'rev saved':>9} | {'twin s':>7} {'rev s':>7} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for twin, rev in table + depth_table:
        print(
            f"{twin['size']:>5}^3 {twin['blocks']:>6} {twin['params']:>8} | {twin['step_mb']:>8.0f} {rev['step_mb']:>8.0f} "
            f"{twin['step_mb'] / rev['step_mb']:>6.2f} | {twin['saved_mb']:>10.0f} {rev['saved_mb']:>9.0f} | "
            f"{twin['step_s']:>7.2f} {rev['step_s']:>7.2f} {rev['step_s'] / twin['step_s']:>6.2f}"
        )
    print(f"\nbudget: {summary['budget_mb']:.0f} MB = {summary['budget_definition']}")
    rev_cube = summary["largest_cube_reversible"]
    more = (
        " or more (still fits at the search limit)" if summary["reversible_still_fits_at_search_max"] else ""
    )
    print(
        f"largest cube in budget: twin {summary['largest_cube_twin']}^3, reversible {rev_cube}^3{more}; "
        f"volume ratio {summary['volume_ratio']}"
    )
    more = " or more" if summary["reversible_still_fits_at_largest_multiplier"] else ""
    print(
        f"largest reversible channel multiplier in budget: {summary['largest_channel_multiplier_reversible']}{more}"
    )


if __name__ == "__main__":
    main()
