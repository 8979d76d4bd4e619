"""Normalization study: the same small network trained with each norm, evaluated under the corruption suites.

Pathology: a 3-stage CNN classifies synthetic H&E tiles of the four `pathology.synthetic` tissue classes
(train and test tiles drawn from different seeds, i.e. different "patients"). Segmentation: a small
UNet3D segments synthetic BraTS-like cases (`segmentation.synthetic`, 32^3). Each trained model is run
through `histo.robustness.grid.run_grid` with and without α-BN; CE / mCE are computed against the `batch`
model; `report.md` says which norm is most robust to which corruption and checks the literature's
expectation (REFERENCE.md §6): GN/IN-type norms help under corruptions with the same content, BN with
statistics calibration (α-BN) helps under distribution shift (here proxied by global intensity/colour
shifts). CPU-sized defaults (a few minutes per domain on 2 cores):
  .venv/bin/python scripts/norm_study.py --out norm_study
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from histo.io import atomic_write_text
from histo.norms import conv_for, make_norm_act, resolve_norm, set_region_mask
from histo.norms.placement import FIRST, Site, place
from histo.robustness.grid import CLEAN, run_grid
from histo.robustness.metrics import corruption_errors
from histo.robustness.report import report
from pathology.cbr import IBN_LAYOUT as CBR_LAYOUT

NORMS = ["batch", "ibn_a", "group", "instance", "rn_b", "rn_l", "bcn", "evonorm_s0"]
GROUPED = {"group", "bcn", "evonorm_s0"}
# Corruptions that keep the content (noise, blur, artefacts) vs. global appearance shifts (a proxy for
# the scanner/site or protocol shift where BN statistics calibration is expected to help).
SHIFT = {"he": {"brightness", "contrast", "saturation", "hue", "stain"}, "mri": {"bias_field", "gamma"}}
INSTANCE_LIKE = {"group", "instance", "evonorm_s0", "ibn_a"}


class SmallCNN(nn.Module):
    """conv-norm-ReLU x 3 stages (32, 64, 128 channels), global average pool, linear head.

    The norm's traits pick the convolution (bcn: weight-standardised) and drop the ReLU after a norm with its
    own nonlinearity (evonorm_s0), as in the DenseNet and U-Net of the pipeline; a placed norm goes where
    the CBR nets put it (ibn_a: IBN in the first two stages, BN in the last; ibn_b refused).
    """

    def __init__(self, norm: str, classes: int) -> None:
        super().__init__()
        choice = resolve_norm(norm, {"num_groups": 8} if norm in GROUPED else None)
        conv = conv_for(choice, 2)
        layers, cin = [], 3
        widths = (32, 64, 128)
        for i, cout in enumerate(widths):
            site_norm = place(choice, FIRST, CBR_LAYOUT, Site(i, len(widths)))
            layers += [conv(cin, cout, 3, padding=1, bias=False), *make_norm_act(site_norm, cout, 2)]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            cin = cout
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)
        self.needs_mask = choice.traits.region_mask

    def forward(self, rgb01: torch.Tensor) -> torch.Tensor:
        if self.needs_mask:  # region = tissue (not white background or lumen)
            set_region_mask(self, rgb01.mean(1, keepdim=True) < 0.85)
        return self.head(self.body((rgb01 - 0.5) / 0.25).mean((2, 3)))


def he_tiles(per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from pathology.synthetic import render_tissue, style_of

    rng = np.random.default_rng(seed)
    tiles = [render_tissue(rng, style_of(c), size, 1.0) for c in range(4) for _ in range(per_class)]
    return np.stack(tiles), np.repeat(np.arange(4), per_class)


def _to_tensor(tiles: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0


def train_cnn(norm: str, tiles: np.ndarray, labels: np.ndarray, steps: int, seed: int) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(norm, 4)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(seed)
    x, y = _to_tensor(tiles), torch.from_numpy(labels)
    model.train()
    for _ in range(steps):
        idx = torch.from_numpy(rng.choice(len(x), 32, replace=False))
        xb = x[idx]
        if rng.random() < 0.5:
            xb = xb.flip(3)
        loss = nn.functional.cross_entropy(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def grid_with_and_without_alpha(evaluate, table: dict, norm: str, model, args) -> list[dict]:
    """The corruption grid for one trained model as is (`norm`) and with α-BN (`norm+aBN`)."""
    rows = []
    for alpha in (None, args.alpha):
        label = norm if alpha is None else f"{norm}+aBN"
        module = model if alpha is not None else None
        rows += run_grid(
            evaluate, table, args.severities, model=label, seed=args.seed, alpha_bn=alpha, module=module
        )
    return rows


def pathology_rows(norms, args) -> list[dict]:
    from pathology.corruptions import CORRUPTIONS, corrupt_tiles

    train_x, train_y = he_tiles(args.he_train, args.he_size, seed=args.seed)
    test_x, test_y = he_tiles(args.he_test, args.he_size, seed=args.seed + 1000)
    rows = []
    for norm in norms:
        model = train_cnn(norm, train_x, train_y, args.he_steps, args.seed)

        def evaluate(corrupt, model=model):
            pred = []
            with torch.no_grad():
                for start in range(0, len(test_x), 32):
                    batch = corrupt(test_x[start : start + 32], start)
                    pred.append(model(_to_tensor(batch)).argmax(1).numpy())
            return {"accuracy": float(np.mean(np.concatenate(pred) == test_y))}

        table = {
            n: (lambda x, s, rng, n=n: corrupt_tiles(x, n, s, int(rng.integers(2**63)))) for n in CORRUPTIONS
        }
        rows += grid_with_and_without_alpha(evaluate, table, norm, model, args)
    return rows


def train_unet(norm: str, cases: list, steps: int, seed: int):
    from segmentation.unet import UNet3D

    torch.manual_seed(seed)
    kwargs = {"num_groups": 4} if norm in GROUPED else None
    model = UNet3D(channels=(8, 16, 32), blocks_per_level=1, norm=norm, norm_kwargs=kwargs, reversible=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        image, brain, regions = cases[rng.integers(len(cases))]
        x = torch.from_numpy(image)[None]
        y = torch.from_numpy(regions.astype(np.float32))[None]
        set_region_mask(model, torch.from_numpy(brain)[None, None])
        prob = torch.sigmoid(model(x))
        dice = 1 - (2 * (prob * y).sum((2, 3, 4)) + 1) / (prob.sum((2, 3, 4)) + y.sum((2, 3, 4)) + 1)
        loss = dice.mean() + nn.functional.binary_cross_entropy(prob, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def segmentation_rows(norms, args) -> list[dict]:
    from segmentation.corruptions import CORRUPTIONS
    from segmentation.data import find_cases, load_raw, preprocess
    from segmentation.infer import predict_volume
    from segmentation.metrics import dice
    from segmentation.synthetic import make_cases

    with tempfile.TemporaryDirectory() as tmp:
        make_cases(tmp, args.mri_train + args.mri_test, shape=(32, 32, 32), seed=args.seed)
        raws = [load_raw(c)[:2] for c in find_cases(tmp)]  # (acquisition, regions)
    train = [(*preprocess(raw), regions) for raw, regions in raws[: args.mri_train]]
    test = raws[args.mri_train :]
    rows = []
    for norm in norms:
        model = train_unet(norm, train, args.mri_steps, args.seed)

        def evaluate(corrupt, model=model):
            scores = []
            for i, (raw, regions) in enumerate(test):
                image, brain = preprocess(corrupt(raw, i))  # corrupt the acquisition, then preprocess
                prob = predict_volume(model, image, roi=(32, 32, 32), overlap=0.5, brain_mask=brain)
                scores.append(np.mean([dice(prob[r] >= 0.5, regions[r]) for r in range(3)]))
            return {"dice_mean": float(np.mean(scores))}

        rows += grid_with_and_without_alpha(evaluate, CORRUPTIONS, norm, model, args)
    return rows


def _fmt(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"


def domain_section(title: str, rows: list[dict], metric: str, shift: set[str]) -> str:
    """Markdown: per-model clean score / mCE, the most robust norm per corruption, the literature check."""
    ce = corruption_errors(rows, reference="batch", metric=metric)
    models = sorted(ce.ce)
    clean = {r["model"]: r["value"] for r in rows if r["corruption"] == CLEAN and r["metric"] == metric}
    content = [c for c in next(iter(ce.ce.values())) if c not in shift]
    shifted = [c for c in next(iter(ce.ce.values())) if c in shift]

    def mean_ce(model: str, names: list[str]) -> float:
        values = [ce.ce[model][c] for c in names if math.isfinite(ce.ce[model][c])]
        return float(np.mean(values)) if values else math.nan

    lines = [
        f"## {title}",
        "",
        f"Metric: {metric}; CE relative to `batch` (lower is better; 1 = as BN).",
        "",
        "| model | clean | mCE | rel. mCE | mCE same-content | mCE appearance shift |",
        "|---|---|---|---|---|---|",
    ]
    for m in models:
        lines.append(
            f"| {m} | {_fmt(clean.get(m))} | {_fmt(ce.mce[m])} | {_fmt(ce.rmce[m])} | "
            f"{_fmt(mean_ce(m, content))} | {_fmt(mean_ce(m, shifted))} |"
        )
    lines += ["", "Most robust model per corruption (lowest CE):", ""]
    for c in sorted(ce.ce[models[0]]):
        finite = {m: ce.ce[m][c] for m in models if math.isfinite(ce.ce[m][c])}
        best = min(finite, key=finite.get) if finite else "n/a (the reference never erred)"
        lines.append(f"- {c}: {best}" + (f" (CE {finite[best]:.3f})" if finite else ""))

    def verdict(value: float) -> str:
        if not math.isfinite(value):
            return "cannot be judged (no defined CE)"
        if abs(value - 1) <= 0.02:
            return "inconclusive here (within 2 % of BN)"
        return "holds here" if value < 1 else "does not hold here"

    inst = [m for m in models if m in INSTANCE_LIKE]
    inst_ce = float(np.nanmean([mean_ce(m, content) for m in inst])) if inst else math.nan
    abn = mean_ce("batch+aBN", shifted) if "batch+aBN" in models else math.nan
    lines += [
        "",
        "Literature check:",
        "",
        f"- GN/IN-type norms ({', '.join(inst)}) under same-content corruptions: mean CE {_fmt(inst_ce)} "
        f"-> {verdict(inst_ce)}.",
        f"- BN + α-BN under appearance shifts ({', '.join(shifted)}): mean CE {_fmt(abn)} -> {verdict(abn)}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="norm_study")
    parser.add_argument("--norms", default=",".join(NORMS))
    parser.add_argument("--domains", default="pathology,segmentation")
    parser.add_argument("--severities", default="1,3,5")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--he-size", type=int, default=64)
    parser.add_argument("--he-train", type=int, default=64, help="Training tiles per class.")
    parser.add_argument("--he-test", type=int, default=32, help="Test tiles per class.")
    parser.add_argument("--he-steps", type=int, default=150)
    parser.add_argument("--mri-train", type=int, default=4)
    parser.add_argument("--mri-test", type=int, default=2)
    parser.add_argument("--mri-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.severities = [int(s) for s in args.severities.split(",")]
    torch.set_num_threads(args.threads)
    norms = args.norms.split(",")
    if "batch" not in norms:
        parser.error("the study needs the `batch` model as the CE reference")
    out = Path(args.out)
    sections = [
        "# Normalization study",
        "",
        f"Norms: {', '.join(norms)}; severities {args.severities}; α-BN α = {args.alpha}; seed {args.seed}.",
        "",
    ]
    domains = args.domains.split(",")
    if "pathology" in domains:
        rows = pathology_rows(norms, args)
        report(rows, out / "pathology", {"accuracy": True}, reference="batch")
        sections.append(domain_section("Pathology (tile classification)", rows, "accuracy", SHIFT["he"]))
        sections.append("Plots: pathology/curves_accuracy.png, pathology/heatmap_accuracy.png\n")
    if "segmentation" in domains:
        rows = segmentation_rows(norms, args)
        report(rows, out / "segmentation", {"dice_mean": True}, reference="batch")
        sections.append(
            domain_section("Segmentation (mean Dice of TC, WT, ET)", rows, "dice_mean", SHIFT["mri"])
        )
        sections.append("Plots: segmentation/curves_dice_mean.png, segmentation/heatmap_dice_mean.png\n")
    atomic_write_text(out / "report.md", "\n".join(sections))
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
