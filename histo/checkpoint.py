"""One checkpoint layout for every model kind: a plain dict of tensors and JSON-able values.

A file is `torch.save` of::

    {"format": "histo-checkpoint", "format_version": 1, "kind": KIND, "version": N, "histo_version": "0.1.0",
     "weights": {name: tensor}, "config": {JSON-able}, "extra": {tensors, numbers, strings, lists, dicts}}

and is always read with `torch.load(weights_only=True, map_location="cpu")`, so a file can hold no code
that loading would run. Every way a file can be unusable (missing, truncated, not a checkpoint, a pickle
that needs Python objects, another kind, a newer version) is one `InputFileError` line naming the file.
Files in the layouts of histo 0.1 (three per-trainer formats) still load, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from histo import __version__
from histo.errors import InputFileError
from histo.io import atomic_torch_save

log = logging.getLogger(__name__)

FORMAT = "histo-checkpoint"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Kind:
    """A model kind: what its checkpoints hold, the command that writes them, the newest layout version."""

    name: str
    description: str
    written_by: str
    version: int


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("kimianet", "a KimiaNet feature extractor", "histo train", 1),
        Kind("kimianet-train-state", "a KimiaNet training state", "histo train, OUT.last.pt for --resume", 1),
        Kind("unet3d", "a 3D U-Net segmentation model", "histo segment train", 1),
        Kind(
            "unet3d-train-state",
            "a 3D U-Net training state",
            "histo segment train, OUT.last.pt for --resume",
            1,
        ),
    )
}


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its kind and version, weights (a state dict), config and extras."""

    kind: str
    version: int
    weights: dict[str, torch.Tensor]
    config: dict[str, Any]
    extra: dict[str, Any]
    path: Path
    histo_version: str | None  # None for a file in a histo 0.1 layout


def save(
    path: str | os.PathLike,
    kind: str,
    version: int,
    weights: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    /,
    **extra: Any,
) -> None:
    """Atomically write a checkpoint of `kind`; refuses (ValueError) anything `load` could not read back."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; known: {', '.join(KINDS)}")
    if not 1 <= version <= KINDS[kind].version:
        raise ValueError(f"{kind} checkpoints have versions 1..{KINDS[kind].version}, not {version}")
    bad = [k for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"weights must map names to tensors: {bad[:3]}")
    try:
        config = json.loads(json.dumps(dict(config)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint config is not JSON-able: {e}") from None
    _check_plain(extra, "extra")
    atomic_torch_save(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "version": int(version),
            "histo_version": __version__,
            "weights": {k: v.detach().cpu() for k, v in weights.items()},
            "config": config,
            "extra": dict(extra),
        },
        path,
    )


def _check_plain(obj: Any, where: str) -> None:
    """Raise ValueError at the first value `weights_only` loading would refuse."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif type(obj) is dict:
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f"checkpoint {where} has a key of type {type(k).__name__}")
            _check_plain(v, f"{where}.{k}")
    else:
        raise ValueError(f"checkpoint {where} is a {type(obj).__name__}, which weights_only loading refuses")


def load(path: str | os.PathLike, expected_kind: str) -> Checkpoint:
    """Read a checkpoint of `expected_kind`; any other file is an InputFileError naming it and why."""
    return parse(read(path), path, expected_kind)


def read(path: str | os.PathLike) -> Any:
    """The object in a PyTorch file, loaded with `weights_only=True` (also for foreign weight files)."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "checkpoint not found")
    if path.is_dir():
        raise InputFileError(path, "is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise InputFileError(path, f"cannot read ({e.strerror})") from None
    problem = _content_problem(path, head)
    if problem:
        raise InputFileError(path, problem)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputFileError(path, _unpickling_reason(str(e))) from None
    except Exception as e:  # a damaged file fails anywhere in torch's parser, with many exception types
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else "unexpected end of file"
        raise InputFileError(
            path, f"damaged or truncated PyTorch file ({type(e).__name__}: {first})"
        ) from None


_TORCH_LEGACY = b"\x80\x02\x8a\x0a"  # the pickled magic number that starts a pre-1.6 torch.save file


def _content_problem(path: Path, head: bytes) -> str | None:
    """Why the first bytes show `path` is no PyTorch file (None when it may be one)."""
    if not head:
        return "empty file, not a checkpoint"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return "truncated or damaged (its zip directory is missing: an interrupted save or copy?)"
        if not any(n.endswith("data.pkl") for n in names):
            return "a zip archive, but not a PyTorch file (no data.pkl inside)"
        return None
    if head.startswith(_TORCH_LEGACY):
        return None
    if head.startswith(b"\x80"):
        return "a plain Python pickle, not a PyTorch checkpoint (it is not unpickled: that could run code)"
    text = _as_text(head)
    if text is None:
        return f"not a PyTorch checkpoint (unrecognised content starting {head[:8].hex(' ')})"
    if text.startswith("version https://git-lfs"):
        return "a Git LFS pointer, not the checkpoint itself (run `git lfs pull`)"
    if text.lstrip().lower().startswith(("<!doctype html", "<html")):
        return "an HTML page, not a checkpoint (a failed download?)"
    return "a text file, not a PyTorch checkpoint"


def _as_text(head: bytes) -> str | None:
    """`head` as text when it is printable UTF-8 (a multi-byte character cut at the end is allowed)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:
            return None
        text = head[: e.start].decode("utf-8")
    return text if all(c.isprintable() or c in "\t\r\n" for c in text) else None


def _unpickling_reason(message: str) -> str:
    """One line from torch's multi-paragraph weights_only refusal."""
    if "Weights only load failed" not in message:
        return f"damaged or truncated PyTorch file ({message.strip()[:120]})"
    found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if found:
        return (
            f"refused: loading it would create the Python object {found.group(1)} (code could run); "
            "histo checkpoints hold only tensors and plain values"
        )
    return "not a PyTorch checkpoint (its pickle content is refused by weights_only loading)"


def is_checkpoint(obj: Any) -> bool:
    """Whether what `read` returned is a histo checkpoint (current or histo 0.1 layout), not foreign weights."""
    return isinstance(obj, dict) and (obj.get("format") == FORMAT or obj.get("format") in _LEGACY)


def parse(obj: Any, path: str | os.PathLike, expected_kind: str) -> Checkpoint:
    """A Checkpoint of `expected_kind` from what `read` returned (current or histo 0.1 layout)."""
    if expected_kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {expected_kind!r}; known: {', '.join(KINDS)}")
    path = Path(path)
    if not isinstance(obj, dict):
        raise InputFileError(path, f"not a histo checkpoint (it holds a {type(obj).__name__})")
    if obj.get("format") in _LEGACY:
        obj = _from_legacy(obj, path)
    elif obj.get("format") != FORMAT:
        raise InputFileError(path, _foreign_reason(obj, expected_kind))
    _check_envelope(obj, path)
    kind, version = obj["kind"], obj["version"]
    if kind not in KINDS:
        raise InputFileError(
            path, f"unknown checkpoint kind {kind!r} (this histo {__version__} knows {', '.join(KINDS)})"
        )
    if kind != expected_kind:
        found, want = KINDS[kind], KINDS[expected_kind]
        raise InputFileError(
            path,
            f"is {found.description} ({found.written_by}), expected {want.description} ({want.written_by})",
        )
    if version > KINDS[kind].version:
        raise InputFileError(
            path,
            f"{kind} version {version} was written by histo {obj.get('histo_version')}; "
            f"this histo {__version__} reads up to version {KINDS[kind].version}: upgrade histo",
        )
    return Checkpoint(
        kind, version, obj["weights"], obj["config"], obj["extra"], path, obj.get("histo_version")
    )


def _foreign_reason(obj: dict, expected_kind: str) -> str:
    """Why a dict without the histo format marker is refused."""
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        hint = (
            "; pretrained DenseNet weights go to `histo train --init`" if expected_kind == "kimianet" else ""
        )
        n = f"{len(obj)} tensor" + ("s" if len(obj) > 1 else "")
        return f"a bare state dict of {n}, not a histo checkpoint (no kind or config){hint}"
    keys = ", ".join(map(str, list(obj)[:5])) + (", ..." if len(obj) > 5 else "")
    return f"not a histo checkpoint (a dict with keys {keys or 'none'})"


def _check_envelope(obj: dict, path: Path) -> None:
    """Refuse a newer format or fields of the wrong type."""
    fv = obj.get("format_version")
    if not isinstance(fv, int):
        raise InputFileError(path, "damaged histo checkpoint: no format_version")
    if fv > FORMAT_VERSION:
        raise InputFileError(
            path,
            f"checkpoint format {fv} was written by histo {obj.get('histo_version')}; "
            f"this histo {__version__} reads format {FORMAT_VERSION}: upgrade histo",
        )
    expected = {"kind": str, "version": int, "weights": dict, "config": dict, "extra": dict}
    wrong = [k for k, t in expected.items() if not isinstance(obj.get(k), t)]
    if wrong:
        raise InputFileError(
            path, f"damaged histo checkpoint: {', '.join(wrong)} missing or of the wrong type"
        )
    if not all(isinstance(v, torch.Tensor) for v in obj["weights"].values()):
        raise InputFileError(path, "damaged histo checkpoint: weights are not all tensors")


# ---- histo 0.1 layouts ---------------------------------------------------------------------------------
def _legacy_kimianet(o: dict) -> tuple[str, dict, dict, dict]:
    return "kimianet", o["state_dict"], o["config"], {}


def _legacy_kimianet_state(o: dict) -> tuple[str, dict, dict, dict]:
    keys = ("optimizer", "scheduler", "rng", "epoch", "early_stopping", "best_epoch", "finished")
    return "kimianet-train-state", o["model"], o["config"], {k: o[k] for k in keys}


def _legacy_segment(o: dict) -> tuple[str, dict, dict, dict]:
    if "optimizer" in o:  # OUT.last.pt
        keys = ("optimizer", "scheduler", "early_stopping", "epoch")
        return "unet3d-train-state", o["model"], o["config"], {k: o[k] for k in keys}
    config = {"network": dict(o["model_config"]), "train_config": o["config"]}
    return "unet3d", o["model"], config, {"epoch": o["epoch"], "val": o.get("val", {})}


_LEGACY = {
    "histo-kimianet": _legacy_kimianet,
    "histo-kimianet-train-state": _legacy_kimianet_state,
    "histo-segment-checkpoint": _legacy_segment,
}


def _from_legacy(obj: dict, path: Path) -> dict:
    """The current layout of a histo 0.1 checkpoint (same content, so version 1 of its kind)."""
    try:
        kind, weights, config, extra = _LEGACY[obj["format"]](obj)
    except KeyError as e:
        raise InputFileError(path, f"damaged histo 0.1 checkpoint ({obj['format']}): no {e} entry") from None
    log.warning(
        "%s: %s checkpoint in the histo 0.1 layout (%s); loaded as is, later releases may drop this layout",
        path,
        kind,
        obj["format"],
    )
    return {
        "format": FORMAT,
        "format_version": 1,
        "kind": kind,
        "version": 1,
        "histo_version": None,
        "weights": weights,
        "config": config,
        "extra": extra,
    }
