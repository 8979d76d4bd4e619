"""Weight files of any origin, loaded into an encoder's network with every tensor checked.

Read without running code: PyTorch files (`.pth`, `pytorch_model.bin`) with `weights_only=True`
(histo.checkpoint.read), `.safetensors` with the safetensors library. A state dict nested under
`state_dict` / `model` / `model_state_dict` is unwrapped and DataParallel `module.` prefixes are stripped.
Each encoder lists the `Layout`s it reads (e.g. timm's key names, the transformers names mapped to timm's,
the official KimiaNet file); the first whose marker key is present converts the keys. Keys a layout
declares as `ignored` (a classification head, a text tower) are not loaded and are reported; any other
missing, unexpected or mis-shaped tensor is a one-line InputFileError naming the file and the first keys
(MONAI's private DenseNet loader silently loads 24 of 606 tensors with current key names, ENVIRONMENT.md).
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from histo.errors import HistoError, InputFileError
from histo.io import file_sha256

if TYPE_CHECKING:
    from pathology.encoders.registry import Encoder

State = dict[str, torch.Tensor]
_WRAPPERS = ("state_dict", "model", "model_state_dict")


def _identity(state: State) -> State:
    return state


@dataclass(frozen=True)
class Layout:
    """A published key layout: recognised by a marker key prefix, converted to the network's names."""

    name: str
    marker: str  # a key prefix only this layout has (checked after `module.` is stripped)
    convert: Callable[[State], State] = _identity
    ignored: tuple[str, ...] = ()  # regexes (matched at the key's start) of tensors not part of the feature

    def is_ignored(self, key: str) -> bool:
        return any(re.match(p, key) for p in self.ignored)

    def matches(self, state: Mapping[str, torch.Tensor]) -> bool:
        return any(k.startswith(self.marker) for k in state)


def _is_safetensors(path: Path) -> bool:
    """safetensors: 8-byte little-endian header length, then a JSON header starting with '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= os.path.getsize(path) - 8


def _read_safetensors(path: Path) -> State:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise HistoError(f"{path}: reading .safetensors needs the safetensors package") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # the Rust reader raises SafetensorError, json errors, OSError, ...
        raise InputFileError(path, f"damaged safetensors file ({type(e).__name__}: {str(e)[:100]})") from None


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def _unwrap(obj: Any, path: Path) -> State:
    """The tensors of a foreign file: a state dict, possibly under a wrapper key."""
    if not isinstance(obj, dict):
        raise InputFileError(path, f"not a weight file (it holds a {type(obj).__name__})")
    for key in _WRAPPERS:
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    state = {_strip_module(str(k)): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        keys = ", ".join(map(str, list(obj)[:5]))
        raise InputFileError(path, f"holds no tensors (keys: {keys or 'none'})")
    return state


def read_weights(path: str | os.PathLike) -> tuple[State, dict[str, Any] | None]:
    """(tensors by name, histo checkpoint config or None) of any weight file; one-line errors."""
    from histo import checkpoint

    path = Path(path)
    if path.is_file() and _is_safetensors(path):
        return {_strip_module(k): v for k, v in _read_safetensors(path).items()}, None
    obj = checkpoint.read(path)
    if checkpoint.is_checkpoint(obj):
        ckpt = checkpoint.parse(obj, path, "kimianet")
        return dict(ckpt.weights), dict(ckpt.config)
    return _unwrap(obj, path), None


def _abbrev(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}, ... (+{len(keys) - n})" if len(keys) > n else shown


def check_keys(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> str | None:
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


def choose_layout(layouts: tuple[Layout, ...], state: State, path: Path, name: str) -> Layout:
    """The first layout whose marker is present; InputFileError listing the file's first keys otherwise."""
    for layout in layouts:
        if layout.matches(state):
            return layout
    known = "; ".join(f"{lay.name} ({lay.marker}*)" for lay in layouts)
    raise InputFileError(
        path,
        f"not a weight file of encoder {name!r}: its keys ({_abbrev(sorted(state))}) match no layout of {known}",
    )


def _check_histo_config(config: Mapping[str, Any], path: Path, encoder: Encoder) -> None:
    """A histo checkpoint loads into a registry entry only when it holds that entry's network: the same
    architecture (a `histo train` checkpoint of the registry), or (older ones) its histo arch and norm."""
    arch, norm = config.get("arch"), config.get("norm")
    same_net = arch == (encoder.histo_arch or encoder.name)
    if "architecture" in config:
        same_net = same_net and config["architecture"] == json.loads(json.dumps(dict(encoder.arch)))
    else:
        same_net = same_net and encoder.histo_arch is not None and norm == encoder.arch.get("norm", "batch")
    if not same_net:
        raise InputFileError(
            path,
            f"a histo checkpoint ({arch}, norm {norm!r}), not weights of encoder {encoder.name!r} "
            "(to index with it, give it as --model: it carries its own architecture)",
        )


# A histo checkpoint: `features.*` is the encoder's network, `classifier.*` the head of its training task.
HISTO_LAYOUT = Layout("histo", "features.", lambda s: {k.removeprefix("features."): v for k, v in s.items()},
                      ignored=(r"classifier\.",))  # fmt: skip


def load_weights(network: nn.Module, path: str | os.PathLike, encoder: Encoder) -> dict:
    """Load `path` into `network`, the encoder's network, with every tensor checked; returns the weights
    record for the manifest (path, sha256, bytes, layout, tensors loaded and not loaded)."""
    path, name = Path(path), encoder.name
    state, config = read_weights(path)
    if config is not None:
        _check_histo_config(config, path, encoder)
    layouts = (HISTO_LAYOUT,) if config is not None and "architecture" in config else encoder.layouts
    layout = choose_layout(layouts, state, path, name)
    ignored = sorted(k for k in state if layout.is_ignored(k))
    converted = layout.convert({k: v for k, v in state.items() if not layout.is_ignored(k)})
    expected = network.state_dict()
    problem = check_keys(expected, converted)
    if problem:
        raise InputFileError(path, f"{layout.name} layout does not match encoder {name!r}: {problem}")
    network.load_state_dict({**expected, **converted}, strict=True)  # only num_batches_tracked may be filled
    return {
        "path": str(path.resolve()),
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "layout": layout.name,
        "tensors_loaded": len(converted),
        "ignored": {
            "tensors": len(ignored),
            "patterns": [p for p in layout.ignored if any(re.match(p, k) for k in ignored)],
        },
    }
