"""One short check of every GPU path, printed as one table (and written as JSON).

  python scripts/gpu_check.py --out gpu_check.json          # on a CUDA node: a few minutes
  python scripts/gpu_check.py --allow-cpu --quick           # smoke test of the script itself on a CPU

Checks: bf16 AMP training steps of KimiaNet (DenseNet-121) and of the reversible U-Net and its twin
(time and peak memory), KimiaNet feature-extraction throughput, and FAISS GPU flat search against the
CPU index (same neighbours).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Mean seconds per call after `warmup` calls, synchronising CUDA around the timed loop."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def precision(device: torch.device) -> str:
    """What `histo.devices.autocast` gives on this device."""
    return "bf16" if device.type == "cuda" else "fp32"


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train_step_fn(
    model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn: Callable
) -> Callable:
    """One bf16-autocast forward + backward + AdamW step of `model` on a fixed batch."""
    from histo.devices import autocast

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(x.device):
            loss = loss_fn(model(x).float(), target)
        loss.backward()
        opt.step()

    return step


def check_kimianet_training(device: torch.device, px: int, batch: int, repeats: int) -> dict:
    from pathology.kimianet import build_model

    model = build_model("kimianet", "batch", num_classes=30, variant="IV").to(device).train()
    x = torch.randn(batch, 3, px, px, device=device)
    if device.type == "cuda":
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    y = torch.randint(0, 30, (batch,), device=device)
    reset_peak(device)
    sec = timed(train_step_fn(model, x, y, torch.nn.functional.cross_entropy), device, repeats)
    return {
        "check": f"KimiaNet train step {batch}x{px}px {precision(device)}",
        "seconds": sec,
        "tiles_per_s": batch / sec,
        "peak_gb": peak_gb(device),
    }


def check_unet_training(device: torch.device, size: int, reversible: bool, repeats: int) -> dict:
    from segmentation.unet import UNet3D

    torch.manual_seed(0)
    model = UNet3D(channels=(16, 32, 64, 128), reversible=reversible).to(device).train()
    x = torch.randn(1, 4, size, size, size, device=device)
    y = (torch.rand(1, 3, size, size, size, device=device) > 0.5).float()
    reset_peak(device)
    sec = timed(
        train_step_fn(model, x, y, torch.nn.functional.binary_cross_entropy_with_logits), device, repeats
    )
    name = "reversible" if reversible else "twin"
    return {
        "check": f"U-Net ({name}) train step 1x4x{size}^3 {precision(device)}",
        "seconds": sec,
        "peak_gb": peak_gb(device),
    }


def check_extraction(device: torch.device, px: int, n: int, tmp: Path) -> dict:
    from pathology.kimianet import FeatureExtractor, random_init_checkpoint

    ckpt = random_init_checkpoint(tmp / f"random_{px}.pt", input_px=px)
    extractor = FeatureExtractor.from_checkpoint(ckpt, device=device)
    tiles = np.random.default_rng(0).integers(0, 256, (n, px, px, 3), dtype=np.uint8)
    sec = timed(lambda: extractor.extract(tiles, batch_size=64), device, repeats=2, warmup=1)
    return {"check": f"feature extraction {px}px (uint8 -> 1024-d)", "seconds": sec, "tiles_per_s": n / sec}


def check_faiss(n: int, queries: int, allow_cpu: bool) -> dict:
    import faiss

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((n, 1024), dtype=np.float32)
    xq = xb[rng.choice(n, queries, replace=False)] + 0.05 * rng.standard_normal(
        (queries, 1024), dtype=np.float32
    )
    cpu = faiss.IndexFlatL2(1024)
    cpu.add(xb)
    t0 = time.perf_counter()
    d_cpu, i_cpu = cpu.search(xq, 10)
    t_cpu = time.perf_counter() - t0
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpus == 0:
        if not allow_cpu:
            raise SystemExit("FAISS sees no GPU: install the [gpu] extra (faiss-gpu) on this node")
        return {"check": f"FAISS flat {n}x1024, {queries} queries", "cpu_seconds": t_cpu, "gpus": 0}
    gpu = faiss.index_cpu_to_all_gpus(cpu)
    gpu.search(xq[:8], 10)
    t0 = time.perf_counter()
    d_gpu, i_gpu = gpu.search(xq, 10)
    t_gpu = time.perf_counter() - t0
    return {
        "check": f"FAISS flat {n}x1024, {queries} queries",
        "cpu_seconds": t_cpu,
        "seconds": t_gpu,
        "speedup": t_cpu / t_gpu,
        "gpus": gpus,
        "same_neighbours": float(np.mean(i_cpu == i_gpu)),
        "max_distance_diff": float(np.max(np.abs(d_cpu - d_gpu))),
    }


MAIN_COLUMNS = ("check", "seconds", "tiles_per_s", "peak_gb")


def cell(value: float | None, width: int, digits: int) -> str:
    """A right-aligned table cell; '-' where a check has no such figure."""
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--allow-cpu", action="store_true", help="run on CPU when no CUDA device is present")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test of the script)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("no CUDA device: this check has not run on a GPU (use --allow-cpu for a smoke test)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    q = args.quick
    tmp = args.out.parent / "gpu_check_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = [
        check_kimianet_training(device, 64 if q else 224, 2 if q else 64, 1 if q else 10),
        check_kimianet_training(device, 64 if q else 1000, 2 if q else 16, 1 if q else 5),
        check_unet_training(device, 16 if q else 128, True, 1 if q else 5),
        check_unet_training(device, 16 if q else 128, False, 1 if q else 5),
        check_extraction(device, 64 if q else 224, 4 if q else 1024, tmp),
        check_extraction(device, 64 if q else 1000, 4 if q else 128, tmp),
        check_faiss(2000 if q else 500_000, 10 if q else 1000, args.allow_cpu),
    ]
    env = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
    }
    print(f"histo GPU check on {env['device']} (torch {env['torch']})")
    print(f"{'check':<48} {'s/step':>9} {'items/s':>9} {'peak GB':>8}  other")
    for r in rows:
        other = {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items() if k not in MAIN_COLUMNS}
        print(f"{r['check']:<48} {cell(r.get('seconds'), 9, 4)} {cell(r.get('tiles_per_s'), 9, 1)} "
              f"{cell(r.get('peak_gb'), 8, 2)}  {other}")  # fmt: skip
    args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
