"""Networks built by timm from a JSON-able `arch` (lane-2 extra), with the token rules the authors use.

`arch` is `{"timm": model name, **kwargs}` as the model cards give them; class arguments are named by
string ("mlp_layer": "swiglu_packed", "act_layer": "silu"), and "norm_eps" sets the LayerNorm epsilon.
Networks are always built with `pretrained=False`: nothing is downloaded, weights come from local files.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from pathology.encoders.weights import Layout, State

RULES = ("pooled", "cls+mean")


def create(arch: Mapping[str, Any], **more: Any) -> nn.Module:
    """timm.create_model(arch["timm"], pretrained=False, **kwargs) with the named classes resolved."""
    import timm

    classes = {"swiglu_packed": timm.layers.SwiGLUPacked, "silu": nn.SiLU, "gelu": nn.GELU}
    kwargs = {k: v for k, v in arch.items() if k not in ("timm", "norm_eps")}
    for key in ("mlp_layer", "act_layer"):
        if key in kwargs:
            kwargs[key] = classes[kwargs[key]]
    if "norm_eps" in arch:
        kwargs["norm_layer"] = functools.partial(nn.LayerNorm, eps=float(arch["norm_eps"]))
    return timm.create_model(arch["timm"], pretrained=False, **kwargs, **more)


class TokenPooled(nn.Module):
    """A timm trunk and its token rule: `pooled` is timm's own pooled output (class token, or the token
    average for Swin); `cls+mean` concatenates the class token and the mean of the patch tokens (register
    tokens excluded), both after the final norm (Virchow)."""

    def __init__(self, trunk: nn.Module, rule: str) -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown token rule {rule!r}; known: {', '.join(RULES)}")
        self.trunk = trunk
        self.rule = rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rule == "pooled":
            return self.trunk(x)
        tokens = self.trunk.forward_features(x)
        patches = tokens[:, self.trunk.num_prefix_tokens :]
        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)


def builder(rule: str) -> Callable[[Mapping[str, Any]], nn.Module]:
    """arch -> TokenPooled(timm model, rule)."""
    return lambda arch: TokenPooled(create(arch), rule)


def prefixed(prefix: str) -> Callable[[State], State]:
    """A layout conversion that puts `prefix` before every key."""
    return lambda state: {prefix + k: v for k, v in state.items()}


# timm's own key names (the layout of the released pytorch_model.bin / model.safetensors of timm models).
TIMM_LAYOUT = Layout("timm", marker="blocks.0.", convert=prefixed("trunk."))


def renamed(
    rules: list[tuple[str, str]], fuse_qkv: str | None, prefix: str = "trunk."
) -> Callable[[State], State]:
    """A conversion by regex renames; with `fuse_qkv` (a regex with the layer index as group 1 and
    query|key|value as group 2), separate q, k, v projections are concatenated into timm's `qkv`.

    Keys no rule covers pass through unchanged, so the key check reports them as unexpected.
    """
    compiled = [(re.compile(a), b) for a, b in rules]

    def convert(state: State) -> State:
        out: State = {}
        parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            m = re.match(fuse_qkv, key) if fuse_qkv else None
            if m:
                parts.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
                continue
            for pattern, repl in compiled:
                if pattern.match(key):
                    key = prefix + pattern.sub(repl, key)
                    break
            out[key] = value
        for (layer, kind), qkv in parts.items():
            if set(qkv) == {"query", "key", "value"}:
                out[f"{prefix}blocks.{layer}.attn.qkv.{kind}"] = torch.cat(
                    [qkv["query"], qkv["key"], qkv["value"]]
                )
            else:  # incomplete: leave the pieces to be reported
                out.update(
                    {f"encoder.layer.{layer}.attention.attention.{p}.{kind}": t for p, t in qkv.items()}
                )
        return out

    return convert
