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


NODE_HOOKS = ["blocks.*.attn.hook_z", "blocks.*.hook_mlp_out"]
"""The hook points of a node-level fit: every head's output and every MLP's output."""

MLP_HOOKS = ("hook_mlp_out", "mlp.hook_post")
"""Hook-name endings inside a block that belong to the block's MLP node ``m{l}``."""


def head_node(layer: int, head: int) -> str:
    """MIB's name of attention head ``head`` of layer ``layer``: ``"a{layer}.h{head}"``."""
    return f"a{layer}.h{head}"


def mlp_node(layer: int) -> str:
    """MIB's name of the MLP of layer ``layer``: ``"m{layer}"``."""
    return f"m{layer}"


_NODE = re.compile(r"^(?:a(\d+)\.h(\d+)|m(\d+))$")


def parse_node(node: str) -> tuple[int, int | None] | None:
    """``(layer, head)`` of a head node, ``(layer, None)`` of an MLP node, None otherwise.

    >>> parse_node("a2.h3"), parse_node("m1"), parse_node("blocks.0.hook_resid_pre")
    ((2, 3), (1, None), None)
    """
    match = _NODE.match(node)
    if match is None:
        return None
    if match.group(3) is not None:
        return int(match.group(3)), None
    return int(match.group(1)), int(match.group(2))


def model_nodes(n_layers: int, n_heads: int, mlps: bool = True) -> list[str]:
    """Every head and MLP node in node order: by layer, heads first, then the MLP.

    >>> model_nodes(2, 2)
    ['a0.h0', 'a0.h1', 'm0', 'a1.h0', 'a1.h1', 'm1']
    """
    out = []
    for layer in range(n_layers):
        out += [head_node(layer, h) for h in range(n_heads)]
        if mlps:
            out.append(mlp_node(layer))
    return out


def hook_nodes(name: str, n_heads: int) -> list[str]:
    """The nodes a hook's noise belongs to: one per head for per-head hooks, ``m{l}`` for MLP
    hooks, and the hook name itself for anything else (residual stream, embeddings...).

    >>> hook_nodes("blocks.1.attn.hook_z", 2), hook_nodes("blocks.0.hook_mlp_out", 2)
    (['a1.h0', 'a1.h1'], ['m0'])
    """
    layer = hook_layer(name)
    if layer is not None and name.endswith(HEAD_HOOKS):
        return [head_node(layer, h) for h in range(n_heads)]
    if layer is not None and name.endswith(MLP_HOOKS):
        return [mlp_node(layer)]
    return [name]


def node_sort_key(node: str) -> tuple[int, int, int, str]:
    """Node order: layer, then head, then the MLP; other names after all blocks, by name."""
    parsed = parse_node(node)
    if parsed is None:
        return (1 << 30, 0, 0, node)
    layer, head = parsed
    return (layer, 0 if head is not None else 1, head or 0, "")
