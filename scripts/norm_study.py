"""Normalization study: the same small network trained with each norm, evaluated under the corruption suites.

Pathology: a 3-stage CNN classifies synthetic H&E tiles of the four `pathology.synthetic` tissue classes,
rendered at 1 µm/px (train and test tiles drawn from different seeds, i.e. different "patients"; the spatial
corruptions are scaled to that resolution). Segmentation: a small UNet3D segments synthetic BraTS-like cases
(`segmentation.synthetic`, 32^3; other seeds for the test cases), trained as `segment train` trains (its task
`segmentation.train.SegmentTask`) and scored as `histo robustness` scores it (`segmentation.robustness`: the
acquisition is corrupted, then z-scored; Dice through the label map). Both networks are tasks of the one
training loop (`histo.training`); their checkpoints and training curves are kept under OUT/<domain>/models,
so a re-run with the same settings reuses them (`--overwrite` retrains).

Each model is run through `histo.robustness.grid.run_grid`, and the norms with BN statistics once more with
α-BN; CE / mCE are against the `batch` model. A model whose clean score has not covered half the way from
chance to the `batch` model's clean score is reported as not trained, without CE (`--epochs-for` trains
chosen norms longer). `report.md` says which norm is most robust to which corruption and checks the
literature's expectation: GN/IN-type norms help under corruptions with the same content,
BN with statistics calibration (α-BN) under distribution shift (here proxied by global intensity/colour
shifts). CPU-sized defaults (measured on one thread of a shared 2-core machine: pathology 10-22 min,
segmentation 16-44 min by load, a third of it the rn_l U-Net; the README's "Normalization study" has the run
and its tables):
  .venv/bin/python scripts/norm_study.py --out norm_study
"""

# No `from __future__ import annotations`: tests load this script by path, without a sys.modules entry, and
# dataclasses cannot resolve string annotations there.
import argparse
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from histo import checkpoint
from histo.errors import HistoError
from histo.io import atomic_write_text
from histo.norms import conv_for, make_norm_act, norm_traits, resolve_norm, set_region_mask
from histo.norms.placement import FIRST, Site, place
from histo.robustness.grid import CLEAN, run_grid
from histo.robustness.metrics import corruption_errors, error_table
from histo.robustness.report import report
from histo.training import Run
from histo.training_config import LoopOptions
from pathology.cbr import FAMILY as CBR_FAMILY
from pathology.cbr import IBN_LAYOUT as CBR_LAYOUT

NORMS = ["batch", "ibn_a", "ibn_b", "group", "instance", "rn_b", "rn_l", "bcn", "evonorm_s0"]
GROUPED = {"group", "bcn", "evonorm_s0"}
# Corruptions that keep the content (noise, blur, artefacts) vs. global appearance shifts (a proxy for
# the scanner/site or protocol shift where BN statistics calibration is expected to help).
SHIFT = {"he": {"brightness", "contrast", "saturation", "hue", "stain"}, "mri": {"bias_field", "gamma"}}
INSTANCE_LIKE = {"group", "instance", "evonorm_s0", "ibn_a", "ibn_b"}
TILE_MPP = 1.0  # µm/px of the synthetic tiles (the resolution the pipeline reads tiles at)
FEW_ERRORS = 0.02  # a corruption costing the reference less than this over clean is left out of mCE*
TRAINED_SHARE = 0.5  # of the way from chance to the reference's clean score a trained model must cover
# The study's own checkpoint kinds (files under OUT/pathology/models, written by `histo.training`).
CNN_KIND, CNN_STATE = "norm-study-cnn", "norm-study-cnn-train-state"
checkpoint.KINDS.setdefault(
    CNN_KIND, checkpoint.Kind(CNN_KIND, "a normalization-study tile CNN", "scripts/norm_study.py", 1)
)
checkpoint.KINDS.setdefault(
    CNN_STATE,
    checkpoint.Kind(CNN_STATE, "a normalization-study CNN training state", "scripts/norm_study.py", 1),
)


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
    """`per_class` synthetic tiles of each tissue class at TILE_MPP, in a seeded shuffled order (so that
    every batch, and every batch α-BN calibrates on, mixes the classes), with their labels."""
    from pathology.synthetic import render_tissue, style_of

    rng = np.random.default_rng(seed)
    tiles = [render_tissue(rng, style_of(c), size, TILE_MPP) for c in range(4) for _ in range(per_class)]
    order = rng.permutation(len(tiles))
    return np.stack(tiles)[order], np.repeat(np.arange(4), per_class)[order]


def _to_tensor(tiles: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0


def loop_options(epochs: int, batch_size: int, lr: float, monitor: str) -> dict[str, Any]:
    """The study's `histo.training` schedule: AdamW, one warm-up epoch, cosine decay, no clipping."""
    return {
        "epochs": epochs, "batch_size": batch_size, "accumulate": 1, "lr": lr, "weight_decay": 0.0,
        "warmup_epochs": 1.0, "min_lr_ratio": 0.0, "grad_clip": 0.0, "label_smoothing": 0.0, "amp": False,
        "channels_last": False, "val_every": 1, "patience": 0, "monitor": monitor,
    }  # fmt: skip


class TileTask:
    """The study CNN as a `histo.training.Task`: cross-entropy on shuffled, randomly h-flipped batches of the
    in-memory training tiles. No validation split: the model after the last epoch is the study's model, and
    the test tiles are scored by the corruption grid only."""

    monitors: ClassVar[dict[str, str]] = {"val_acc": "max"}
    has_validation = False
    memory_format = None
    model_kind, state_kind = CNN_KIND, CNN_STATE
    resume_ignore = ()
    n_stats = 3  # loss x tiles, correct tiles, tiles

    def __init__(self, norm: str, tiles: np.ndarray, labels: np.ndarray, epochs: int, args) -> None:
        self.norm, self.seed, self.batch = norm, args.seed, 32
        self.options = LoopOptions(**loop_options(epochs, self.batch, 2e-3, "val_acc"))
        self.x, self.y = _to_tensor(tiles), torch.from_numpy(labels)
        self.run_config = {
            "norm": norm, "tile_px": args.he_size, "tiles_per_class": args.he_train, "tile_mpp": TILE_MPP,
            "seed": args.seed, "loop": self.options.model_dump(mode="json"),
        }  # fmt: skip
        self.default_config = self.run_config

    def build_model(self) -> SmallCNN:
        return SmallCNN(self.norm, 4)

    def batches_per_epoch(self) -> int:
        return len(self.x) // self.batch

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Full batches of a permutation drawn from the generators `fit` seeds per epoch; half flipped."""
        order = torch.randperm(len(self.x))
        for i in range(self.batches_per_epoch()):
            idx = order[i * self.batch : (i + 1) * self.batch]
            xb = self.x[idx]
            yield (xb.flip(3) if torch.rand(()) < 0.5 else xb), self.y[idx]

    def inputs(self, batch: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return batch[0].to(device), batch[1].to(device)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = nn.functional.cross_entropy(logits, y)
        n = float(len(y))
        correct = (logits.argmax(1) == y).sum().double()
        return loss, torch.stack(
            [loss.detach().double() * n, correct, loss.new_tensor(n, dtype=torch.float64)]
        )

    def train_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        return {"train_loss": float(sums[0] / sums[2]), "train_acc": float(sums[1] / sums[2])}

    def validate(self, model: nn.Module, forward: Callable) -> dict[str, float]:
        """No validation data (`has_validation` is False, so the loop never asks): nothing to report."""
        return {}

    def model_record(self, model: nn.Module, epoch: int, row: Mapping[str, Any]) -> tuple[dict, dict]:
        return dict(self.run_config), {"epoch": epoch, "train_acc": row["train_acc"]}

    def summary(self) -> dict[str, Any]:
        return {"n_train": len(self.x)}


def cpu_process():
    """The study's single CPU process, as `histo.training` and its tasks see it."""
    from histo.devices import init_distributed

    return init_distributed("cpu")


def train(task: Any, out: Path, args) -> tuple[nn.Module, dict]:
    """Train `task` into `out` with `histo.training.Run` (a finished run with the same config is reused)."""
    run = Run(task, out, cpu_process())
    run.start(overwrite=args.overwrite)
    summary = run.train()
    return run.model.eval(), summary


# ---------------------------------------------------------------- one domain


@dataclass
class Model:
    """One trained network of a domain: its training, clean score and training verdict."""

    norm: str
    epochs: int
    train_loss: float
    clean: float
    trained: bool


@dataclass
class Domain:
    """What the study measured in one domain."""

    key: str  # "he" or "mri" (SHIFT)
    title: str
    metric: str
    chance: float
    chance_rule: str
    record: dict[str, Any]
    models: list[Model] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # norm -> why the network cannot use it
    rows: list[dict] = field(default_factory=list)  # grid rows of the trained models
    seconds: float = 0.0

    @property
    def reference_floor(self) -> float:
        """The clean score the reference must reach: TRAINED_SHARE of the way from chance to 1."""
        return self.chance + TRAINED_SHARE * (1.0 - self.chance)

    @property
    def threshold(self) -> float:
        """The clean score a trained model reaches: TRAINED_SHARE of the way from chance to `batch`'s."""
        ref = next(m.clean for m in self.models if m.norm == "batch")
        return self.chance + TRAINED_SHARE * (ref - self.chance)


def ordered(norms: list[str]) -> list[str]:
    """`batch` first: its clean score sets the training threshold of the others."""
    return ["batch", *[n for n in norms if n != "batch"]]


def study(
    domain: Domain,
    norms: list[str],
    fit_norm: Callable[[str], tuple[nn.Module, dict]],
    make_evaluate: Callable[[nn.Module], Callable],
    table: Mapping[str, Callable],
    args,
) -> Domain:
    """Train each norm, score it clean, and run the corruption grid (and with α-BN) for the trained ones."""
    started = time.perf_counter()
    for norm in ordered(norms):
        if norm in domain.refused:
            continue
        model, summary = fit_norm(norm)
        evaluate = make_evaluate(model)
        clean_rows = run_grid(evaluate, {}, args.severities, model=norm, seed=args.seed, progress=False)
        clean = next(r["value"] for r in clean_rows if r["metric"] == domain.metric)
        if norm == "batch" and clean < domain.reference_floor:
            raise HistoError(
                f"{domain.title}: the reference `batch` model scored {clean:.3f}, below "
                f"{domain.reference_floor:.3f} ({TRAINED_SHARE:.0%} of the way from chance to 1); train it "
                "longer (--epochs-for batch=N)"
            )
        loss = summary["best"].get("train_loss", math.nan)
        entry = Model(norm, summary["epochs"], loss, clean, trained=True)
        domain.models.append(entry)  # first `batch`, which sets the threshold
        entry.trained = norm == "batch" or clean >= domain.threshold
        print(
            f"{domain.key} {norm}: clean {domain.metric} {clean:.3f} ({summary['epochs']} epochs)", flush=True
        )
        if not entry.trained:
            continue
        grid = partial(run_grid, evaluate, table, args.severities, seed=args.seed, progress=False)
        domain.rows += grid(model=norm, done=clean_rows)
        if norm_traits(norm).calibratable:
            domain.rows += grid(model=f"{norm}+aBN", alpha_bn=args.alpha, module=model)
    domain.seconds = time.perf_counter() - started
    return domain


def epochs_of(norm: str, default: int, args) -> int:
    return args.epochs_for.get(norm, default)


def pathology(norms: list[str], out: Path, args) -> Domain:
    """The tile-classification domain (chance: the accuracy of any constant prediction, 1/4)."""
    from pathology.corruptions import CORRUPTIONS, seeded, study_record

    train_x, train_y = he_tiles(args.he_train, args.he_size, seed=args.seed)
    test_x, test_y = he_tiles(args.he_test, args.he_size, seed=args.seed + 1000)
    domain = Domain(
        "he", "Pathology (tile classification)", "accuracy", 0.25,
        "any constant class on the balanced test tiles", study_record(list(CORRUPTIONS), TILE_MPP),
    )  # fmt: skip
    for norm in norms:
        reason = norm_traits(norm).refusal(CBR_FAMILY)
        if reason is not None:
            domain.refused[norm] = reason

    def fit_norm(norm: str):
        task = TileTask(norm, train_x, train_y, epochs_of(norm, args.he_epochs, args), args)
        return train(task, out / "models" / f"{norm}.pt", args)

    def make_evaluate(model: nn.Module):
        def evaluate(corrupt):
            pred = []
            with torch.no_grad():
                for start in range(0, len(test_x), 32):
                    batch = corrupt(test_x[start : start + 32], start)
                    pred.append(model(_to_tensor(batch)).argmax(1).numpy())
            return {"accuracy": float(np.mean(np.concatenate(pred) == test_y))}

        return evaluate

    table = {n: seeded(n, mpp=TILE_MPP) for n in CORRUPTIONS}
    return study(domain, norms, fit_norm, make_evaluate, table, args)


def unet_task(norm: str, cases: Path, epochs: int, args):
    """`segment train`'s task on the study's U-Net (8-16-32 channels, 1 twin block per level, 32^3 crops);
    the grouped norms get 4 groups (2-8 channels each: 32 groups would make GN an IN at these widths)."""
    from segmentation.config import SegmentConfig
    from segmentation.train import SegmentTask, build_model
    from segmentation.unet import UNet3D

    config = SegmentConfig.coerce(
        {
            "seed": args.seed,
            "model": {"channels": [8, 16, 32], "blocks_per_level": 1, "norm": norm, "reversible": False},
            "data": {"roi": [32, 32, 32], "val_fraction": 0.0},
            "train": {
                **loop_options(epochs, 1, 3e-3, "val_dice_mean"),
                "samples_per_epoch": args.mri_samples, "val_hd95": False,
            },
            "run": {"device": "cpu", "cache": True, "overwrite": args.overwrite},
        }
    )  # fmt: skip

    class StudyUNetTask(SegmentTask):
        def build_model(self) -> nn.Module:
            network = build_model(self.config, self.scheme).config
            kwargs = {"num_groups": 4} if norm in GROUPED else None
            self.model = UNet3D(**{**network, "norm_kwargs": kwargs})
            return self.model

    return StudyUNetTask(cases, config, cpu_process())


def segmentation(norms: list[str], out: Path, args) -> Domain:
    """The segmentation domain (chance: the mean Dice of predicting no tumour)."""
    from histo.robustness_config import SegmentRobustness
    from segmentation.corruptions import CORRUPTIONS, study_record
    from segmentation.metrics import dice
    from segmentation.robustness import Cases
    from segmentation.robustness import make_evaluate as segment_evaluate
    from segmentation.synthetic import make_cases

    data = out / "cases"
    if not (data / "test").is_dir():
        make_cases(data / "train", args.mri_train, shape=(32, 32, 32), seed=args.seed)
        make_cases(data / "test", args.mri_test, shape=(32, 32, 32), seed=args.seed + 1000)
    test = Cases(data / "test")
    empty = [np.mean([dice(np.zeros_like(r), r) for r in test[i][1]]) for i in range(len(test))]
    domain = Domain(
        "mri", "Segmentation (mean Dice of TC, WT, ET)", "dice_mean", float(np.mean(empty)),
        "an empty prediction (no tumour)", study_record(list(CORRUPTIONS)),
    )  # fmt: skip
    settings = SegmentRobustness(roi=(32, 32, 32), overlap=0.5, threshold=0.5, max_cases=0)

    def fit_norm(norm: str):
        task = unet_task(norm, data / "train", epochs_of(norm, args.mri_epochs, args), args)
        return train(task, out / "models" / f"{norm}.pt", args)

    def make_evaluate(model: nn.Module):
        return segment_evaluate(model, test, settings, "cpu", test.cases[0].scheme)

    return study(domain, norms, fit_norm, make_evaluate, CORRUPTIONS, args)


# ---------------------------------------------------------------- report


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"


def domain_section(domain: Domain) -> str:
    """Markdown: per-model clean score / mCE, the most robust norm per corruption, the literature check.

    mCE and rel. mCE are ImageNet-C's over every corruption; the starred and split columns and the literature
    check leave out the corruptions that barely hurt `batch` (a CE there compares clean errors, a relative CE
    divides by noise)."""
    metric, shift = domain.metric, SHIFT[domain.key]
    ce = corruption_errors(domain.rows, reference="batch", metric=metric)
    clean = {
        r["model"]: r["value"] for r in domain.rows if r["corruption"] == CLEAN and r["metric"] == metric
    }
    names = list(next(iter(ce.ce.values())))
    errors = error_table(domain.rows, metric)
    ref_error = {
        c: float(np.mean([e for (m, cc, _), e in errors.items() if (m, cc) == ("batch", c)])) for c in names
    }
    ref_drop = {c: ref_error[c] - errors[("batch", CLEAN, 0)] for c in names}
    weak = [c for c in names if ref_drop[c] < FEW_ERRORS]
    strong = [c for c in names if c not in weak]
    content, shifted = [c for c in strong if c not in shift], [c for c in strong if c in shift]

    def mean_of(table: dict, model: str, corruptions: list[str]) -> float:
        values = [table[model][c] for c in corruptions if math.isfinite(table[model][c])]
        return float(np.mean(values)) if values else math.nan

    lines = [
        f"## {domain.title}",
        "",
        f"Metric: {metric}; CE relative to `batch` (lower is better; 1 = as BN). Not trained: a clean score "
        f"below {_fmt(domain.threshold)}, i.e. less than {TRAINED_SHARE:.0%} of the way from chance "
        f"({_fmt(domain.chance)}: {domain.chance_rule}) to `batch`'s clean score; no CE is computed for it. "
        f"+aBN: α-BN (α = {domain_alpha(domain)}) on the same weights, for the norms with BN statistics. "
        f"mCE*, rel. mCE* and the split columns: over the corruptions that cost `batch` at least "
        f"{FEW_ERRORS:.0%} over its clean error (left out: {', '.join(weak) or 'none'}). "
        f"Wall time {domain.seconds / 60:.1f} min.",
        "",
        "| model | epochs | train loss | clean | mCE | rel. mCE | mCE* | rel. mCE* | mCE* same-content "
        "| mCE* appearance shift |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in domain.models:
        for label in (m.norm, f"{m.norm}+aBN"):
            if label not in ce.ce and not (label == m.norm and not m.trained):
                continue
            head = f"| {label} | {m.epochs} | {_fmt(m.train_loss)} | {_fmt(clean.get(label, m.clean))} |"
            if not m.trained:
                lines.append(f"{head} not trained | | | | | |")
                continue
            means = [ce.mce[label], ce.rmce[label], mean_of(ce.ce, label, strong)]
            means += [mean_of(ce.rce, label, strong), mean_of(ce.ce, label, content)]
            means += [mean_of(ce.ce, label, shifted)]
            lines.append(f"{head} {' | '.join(_fmt(v) for v in means)} |")
    lines += [f"| {n} | refused: {why} | | | | | | | | |" for n, why in domain.refused.items()]
    lines += [
        "",
        "Most robust model per corruption (lowest CE; `batch`'s error averaged over severities, and its "
        "increase over clean):",
        "",
    ]
    for c in names:
        finite = {m: ce.ce[m][c] for m in ce.ce if math.isfinite(ce.ce[m][c])}
        best = min(finite, key=finite.get) if finite else "n/a (the reference never erred)"
        ce_text = f"CE {finite[best]:.3f}; " if finite else ""
        lines.append(
            f"- {c}: {best} ({ce_text}BN error {ref_error[c]:.3f}, {ref_drop[c]:+.3f} over clean"
            f"{'; left out of the starred means' if c in weak else ''})"
        )

    def verdict(value: float) -> str:
        if not math.isfinite(value):
            return "cannot be judged (no defined CE)"
        if abs(value - 1) <= 0.02:
            return "inconclusive here (within 2 % of BN)"
        return "holds here" if value < 1 else "does not hold here"

    inst = [m for m in ce.ce if m in INSTANCE_LIKE]
    inst_ce = float(np.nanmean([mean_of(ce.ce, m, content) for m in inst])) if inst else math.nan
    abn = mean_of(ce.ce, "batch+aBN", shifted) if "batch+aBN" in ce.ce else math.nan
    corruption_setup = {k: v for k, v in domain.record.items() if k != "severity_table"}
    lines += [
        "",
        "Literature check (trained models only):",
        "",
        f"- GN/IN-type norms ({', '.join(inst)}) under same-content corruptions: mean CE {_fmt(inst_ce)} "
        f"-> {verdict(inst_ce)}.",
        f"- BN + α-BN under appearance shifts ({', '.join(shifted)}): mean CE {_fmt(abn)} -> {verdict(abn)}.",
        "",
        f"Corruptions: {json.dumps(corruption_setup, ensure_ascii=False)}",
        "",
    ]
    return "\n".join(lines)


def domain_alpha(domain: Domain) -> str:
    alphas = {r["alpha_bn"] for r in domain.rows if r["alpha_bn"] is not None}
    return ", ".join(f"{a:g}" for a in sorted(alphas)) or "n/a"


def parse_epochs_for(text: str) -> dict[str, int]:
    """`rn_b=40,rn_l=40` -> {"rn_b": 40, "rn_l": 40}."""
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"--epochs-for: {item!r} is not NORM=EPOCHS with EPOCHS >= 1")
        out[name] = int(value)
    return out


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
    parser.add_argument("--he-epochs", type=int, default=20, help="Epochs of 8 batches of 32 tiles.")
    parser.add_argument("--mri-train", type=int, default=8)
    parser.add_argument("--mri-test", type=int, default=4)
    parser.add_argument("--mri-samples", type=int, default=8, help="Training crops (steps) per epoch.")
    parser.add_argument("--mri-epochs", type=int, default=30)
    parser.add_argument(
        "--epochs-for", type=parse_epochs_for, default={}, help="Per-norm epochs, e.g. rn_b=60,rn_l=60."
    )
    parser.add_argument("--overwrite", action="store_true", help="Retrain models kept from an earlier run.")
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
    metrics = {"pathology": {"accuracy": True}, "segmentation": {"dice_mean": True}}
    for name, run_domain in (("pathology", pathology), ("segmentation", segmentation)):
        if name not in args.domains.split(","):
            continue
        try:
            domain = run_domain(norms, out / name, args)
        except HistoError as e:
            parser.exit(2, f"error: {e}\n")
        report(domain.rows, out / name, metrics[name], reference="batch")
        sections.append(domain_section(domain))
        metric = domain.metric
        sections.append(f"Plots: {name}/curves_{metric}.png, {name}/heatmap_{metric}.png\n")
    atomic_write_text(out / "report.md", "\n".join(sections))
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
