"""Forward and forward+backward time of every registered norm at 2D and 3D, side by side with BatchNorm.

Prints a table (ms per call, ratio to `batch`) and writes JSON. Modest default sizes for a shared CPU:
  .venv/bin/python scripts/bench_norms.py --out bench_norms.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from histo.io import atomic_write_json
from histo.norms import make_norm, names, set_region_mask

SHAPES = {2: (8, 64, 64, 64), 3: (2, 32, 32, 32, 32)}


def _time(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of fn() in milliseconds after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench(name: str, spatial_dims: int, repeats: int, device: torch.device) -> dict:
    """Forward (no grad) and forward+backward times of one block on one input shape."""
    shape = SHAPES[spatial_dims]
    block = make_norm(name, shape[1], spatial_dims).to(device).train()
    x = torch.randn(shape, device=device, requires_grad=True)
    set_region_mask(block, torch.rand(shape[0], 1, *shape[2:], device=device) > 0.5)

    def forward():
        with torch.no_grad():
            block(x)

    def forward_backward():
        block(x).sum().backward()

    return {"name": name, "spatial_dims": spatial_dims, "shape": list(shape),
            "forward_ms": _time(forward, repeats, device),
            "forward_backward_ms": _time(forward_backward, repeats, device)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_norms.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    rows = [bench(n, d, args.repeats, device) for d in SHAPES for n in names()]
    base = {(r["spatial_dims"]): r for r in rows if r["name"] == "batch"}
    print(f"{'norm':<12}{'dims':>5}{'fwd ms':>10}{'fwd+bwd ms':>12}{'fwd/BN':>8}{'f+b/BN':>8}")
    for r in rows:
        b = base[r["spatial_dims"]]
        r["forward_ratio_to_batch"] = r["forward_ms"] / b["forward_ms"]
        r["forward_backward_ratio_to_batch"] = r["forward_backward_ms"] / b["forward_backward_ms"]
        print(f"{r['name']:<12}{r['spatial_dims']:>5}{r['forward_ms']:>10.2f}{r['forward_backward_ms']:>12.2f}"
              f"{r['forward_ratio_to_batch']:>8.2f}{r['forward_backward_ratio_to_batch']:>8.2f}")  # fmt: skip
    meta = {
        "device": str(device),
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
    atomic_write_json(args.out, {"meta": meta, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
