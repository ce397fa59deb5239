"""Mean-ablating nodes (heads ``a{l}.h{h}`` and MLPs ``m{l}``) through forward hooks.

A head's slice of ``blocks.{l}.attn.hook_z`` or an MLP's ``blocks.{l}.hook_mlp_out`` is replaced by
its mean over every example and position of a reference set. Used to judge circuits
(:class:`tl_noise.evaluation.nodes.CircuitEvaluator`) and to refine a fitted ranking in context
(:mod:`tl_noise.fitting.refine`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from tl_noise.devices import model_device
from tl_noise.errors import TLNoiseValueError
from tl_noise.names import model_nodes, parse_node


def eval_batches(n: int, batch_size: int) -> list[Tensor]:
    """Consecutive row indices ``[0, b), [b, 2b), ...`` covering ``range(n)``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TLNoiseValueError(f"batch_size={batch_size!r}; expected an int >= 1")
    return [torch.arange(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]


FwdHooks = list[tuple[str, Callable[..., Any]]]


def has_mlps(model: Any) -> bool:
    """False for attention-only models (no ``hook_mlp_out``)."""
    return not bool(getattr(model.cfg, "attn_only", False)) and (
        "blocks.0.hook_mlp_out" in model.hook_dict
    )


def circuit_nodes(model: Any) -> list[str]:
    """Every head and MLP node of ``model`` in node order (layer, then head, then the MLP)."""
    cfg = model.cfg
    return model_nodes(int(cfg.n_layers), int(cfg.n_heads), mlps=has_mlps(model))


@torch.no_grad()
def node_means(model: Any, tokens: Int[Tensor, "n pos"], batch_size: int = 32) -> dict[str, Tensor]:
    """Hook name -> mean activation over every example and position: ``hook_z``
    ``[n_heads, d_head]`` per layer and ``hook_mlp_out`` ``[d_model]`` per layer (float64 sums)."""
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(int(model.cfg.n_layers))]
    if has_mlps(model):
        names += [f"blocks.{layer}.hook_mlp_out" for layer in range(int(model.cfg.n_layers))]
    sums: dict[str, Tensor] = {}

    def capture(name: str) -> Callable[..., None]:
        # by our name: the bridge's HookPoint may carry another alias as hook.name
        def add(act: Tensor, hook: Any) -> None:
            total = act.detach().double().sum((0, 1))
            sums[name] = sums[name] + total if name in sums else total

        return add

    device = model_device(model)
    fwd_hooks = [(n, capture(n)) for n in names]
    for index in eval_batches(tokens.shape[0], batch_size):
        model.run_with_hooks(tokens[index].to(device), fwd_hooks=fwd_hooks)
    count = tokens.shape[0] * tokens.shape[1]
    return {name: (sums[name] / count).float() for name in names}


def ablation_hooks(means: dict[str, Tensor], ablated: Iterable[str]) -> FwdHooks:
    """Forward hooks that mean-ablate the nodes ``ablated`` (node names; see module doc)."""
    heads: dict[int, list[int]] = {}
    mlps: list[int] = []
    for node in ablated:
        parsed = parse_node(node)
        if parsed is None:
            raise TLNoiseValueError(f"node {node!r} is neither a head 'a{{l}}.h{{h}}' nor 'm{{l}}'")
        layer, head = parsed
        if head is None:
            mlps.append(layer)
        else:
            heads.setdefault(layer, []).append(head)
    hooks: FwdHooks = []
    for layer, idx in sorted(heads.items()):
        name = f"blocks.{layer}.attn.hook_z"
        mask = torch.zeros(means[name].shape[0], dtype=torch.bool)
        mask[idx] = True

        def patch_heads(z: Tensor, hook: Any, mask: Tensor = mask, name: str = name) -> Tensor:
            m = mask.to(z.device)[:, None]
            return torch.where(m, means[name].to(z.device, z.dtype), z)

        hooks.append((name, patch_heads))
    for layer in sorted(mlps):
        name = f"blocks.{layer}.hook_mlp_out"

        def patch_mlp(x: Tensor, hook: Any, name: str = name) -> Tensor:
            return means[name].to(x.device, x.dtype).expand_as(x).clone()

        hooks.append((name, patch_mlp))
    return hooks
