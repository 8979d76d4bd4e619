"""Load foreign DenseNet-121 weights into a histo model (`import_pretrained`): official KimiaNet, torchvision
(old and new keys), histo. `histo train --init` reads weights through the encoder registry instead
(`pathology.encoders.load_weights`, whose DenseNet layouts use `split_backbone` and `check_keys` from here).

Layouts recognised after stripping DataParallel `module.` prefixes:
  KimiaNet (official PyTorch): backbone `model.0.*` (= densenet121.features), head `fc_4.*` (30 x 1024)
  torchvision: backbone `features.*`, head `classifier.*`; old-style keys `denselayer1.norm.1.weight`
  histo: our own `kimianet` checkpoint (histo.checkpoint); the architecture must match.
Only the backbone is loaded (the head belongs to the old task). Every backbone tensor must be present
with the right shape, else a one-line error lists the missing/unexpected keys. MONAI's private loader
silently loads 24 of 606 tensors with current key names (ENVIRONMENT.md); this one checks every key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from histo.errors import InputFileError
from pathology.densenet import FeatureClassifier
from pathology.kimianet import KIND

_OLD_STYLE = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")
_WRAPPERS = ("state_dict", "model_state_dict", "model")


def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The tensors of a weight file (a histo `kimianet` checkpoint, or a foreign state dict possibly
    nested under a common key) and the histo config if any; every file is read with weights_only."""
    from histo import checkpoint

    obj = checkpoint.read(path)
    if not isinstance(obj, dict):
        raise InputFileError(path, f"not a weight file (it holds a {type(obj).__name__})")
    if checkpoint.is_checkpoint(obj):
        ckpt = checkpoint.parse(obj, path, KIND)
        return ckpt.weights, ckpt.config
    for key in _WRAPPERS:
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner, None
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, None


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def split_backbone(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """(layout name, backbone tensors keyed relative to `features`) of a foreign state dict."""
    state = {_strip_module(k): v for k, v in state.items()}
    if any(k.startswith("model.0.") for k in state):
        layout, prefix = "KimiaNet", "model.0."
    elif any(k.startswith("features.") for k in state):
        layout, prefix = "torchvision", "features."
    else:
        return "unknown", state
    backbone = {
        _OLD_STYLE.sub(r"\1\2.", k[len(prefix) :]): v for k, v in state.items() if k.startswith(prefix)
    }
    return layout, backbone


def _abbrev(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}, ... (+{len(keys) - n})" if len(keys) > n else shown


def check_keys(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str | None:
    """A one-line description of missing/unexpected/mis-shaped keys, or None when `got` fits exactly.

    `num_batches_tracked` may be absent (checkpoints from before PyTorch 0.4.1 have none).
    """
    missing = sorted(k for k in expected if k not in got and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in got if k not in expected)
    shapes = sorted(k for k in got if k in expected and got[k].shape != expected[k].shape)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_abbrev(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_abbrev(unexpected)})")
    if shapes:
        parts.append(
            f"{len(shapes)} shape mismatches ({_abbrev([f'{k} {tuple(got[k].shape)}' for k in shapes])})"
        )
    return "; ".join(parts) or None


def load_pretrained(model: FeatureClassifier, path: str | Path, arch: str = "densenet121") -> dict[str, Any]:
    """Load the backbone of checkpoint `path` into `model.features`; returns what was loaded."""
    state, config = _read(path)
    if config is not None and config.get("arch") != arch:
        raise InputFileError(path, f"checkpoint of arch {config.get('arch')!r}, cannot initialise {arch!r}")
    layout, backbone = split_backbone(state)
    expected = model.features.state_dict()
    problem = check_keys(expected, backbone)
    if layout == "unknown":
        raise InputFileError(path, f"unknown checkpoint layout for {arch}: {problem}")
    if config is not None:
        layout = f"histo (norm {config.get('norm')!r})"
    if problem:
        raise InputFileError(path, f"{layout} layout does not match {arch}: {problem}")
    model.features.load_state_dict({**expected, **backbone}, strict=True)
    layout = "histo" if config is not None else layout
    return {"init": str(path), "layout": layout, "tensors_loaded": len(backbone), "head": "not loaded"}


def import_pretrained(
    source: str | Path, out: str | Path, norm: str = "batch", input_px: int = 224, arch: str = "densenet121"
) -> Path:
    """Write the backbone of foreign weights (official KimiaNet, torchvision) as a `kimianet` checkpoint,
    so `histo index` can use them as they are (no head: features only)."""
    from pathology.kimianet import build_model, model_config, save_model

    model = build_model(arch, norm, num_classes=0, variant="IV")
    report = load_pretrained(model, source, arch)
    save_model(out, model, model_config(arch, norm, "IV", [], input_px, init=report))
    return Path(out)
