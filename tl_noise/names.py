"""Names of hook points and of the nodes they belong to: one parser for the whole package.

Hook names are TransformerLens' (``"blocks.3.attn.hook_z"``); nodes are named as in MIB's
circuit files: ``a{l}.h{h}`` for attention head ``h`` of layer ``l`` and ``m{l}`` for the MLP of
layer ``l``.

>>> hook_layer("blocks.3.attn.hook_z"), hook_kind("blocks.3.attn.hook_z")
(3, 'attn.hook_z')
>>> hook_layer("hook_embed") is None
True
"""

from __future__ import annotations

import re

HEAD_HOOKS = ("hook_z", "hook_q", "hook_k", "hook_v", "hook_result")
"""Hook-name endings whose activations have a head axis (``[batch, pos, n_heads, d]``)."""

_LAYER = re.compile(r"blocks\.(\d+)\.")


def hook_layer(name: str) -> int | None:
    """Layer index of a hook name (``"blocks.3.attn.hook_z"`` -> 3), None outside the blocks."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def hook_kind(name: str) -> str:
    """A hook name without its block (``"blocks.3.attn.hook_z"`` -> ``"attn.hook_z"``)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        return ".".join(parts[2:])
    return name


def is_head_hook(name: str) -> bool:
    """True for per-head hooks inside a block (``hook_z``, ``hook_q``, ... ``hook_result``)."""
    return hook_layer(name) is not None and name.endswith(HEAD_HOOKS)


def z_hook_name(layer: int) -> str:
    """``"blocks.{layer}.attn.hook_z"``: the per-head output of a layer's attention."""
    return f"blocks.{layer}.attn.hook_z"


def module_key(name: str) -> str:
    """A hook name usable as an ``nn.ModuleDict`` key (dots are not allowed there)."""
    return name.replace(".", "__")
