"""The layer-by-layer forward behind :func:`tl_noise.evaluation.exact.exhaustive_faithfulness`.

It reads the model's weights (TransformerLens 3.x ``HookedTransformer`` or the 4.x native
bridge's layout) and computes, for many circuits at once, the residual stream after each layer
with the circuit's nodes kept and the others mean-ablated: attention is computed once per circuit
of the earlier layers, every head subset of a layer is a small sum of per-head outputs, and the
last layer runs at the target positions only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tl_noise.errors import TLNoiseValueError
from tl_noise.hooks.targets import target_positions
from tl_noise.names import parse_node

ACTIVATION_FLOATS = 2**22
"""Floats in a batch's widest activation when ``batch_size`` is None (16 MiB: big fresh
allocations page-fault, at a cost that would rival the arithmetic)."""
_ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
    "silu": F.silu, "swish": F.silu,
}  # fmt: skip
_LN = ("LN", "LNPRE")


# ----------------------------------------------------------------------------- the weights
@dataclass
class _Norm:
    kind: str | None  # "LN", "LNPRE", "RMS", "RMSPRE" or None (identity)
    w: Tensor | None
    b: Tensor | None
    eps: float

    def __call__(self, x: Tensor) -> Tensor:
        if self.kind in _LN:
            return F.layer_norm(x, x.shape[-1:], self.w, self.b, self.eps)
        return x if self.kind is None else F.rms_norm(x, x.shape[-1:], self.w, self.eps)

    def center(self, x: Tensor) -> Tensor:
        return x - x.mean(-1, keepdim=True) if self.kind in _LN else x

    def rstd(self, x: Tensor) -> Tensor:
        """``1 / sigma(x)`` ``[..., 1]`` (fused kernels: big temporaries are slow to allocate)."""
        if self.kind in _LN:
            return torch.native_layer_norm(x, x.shape[-1:], None, None, self.eps)[2]
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).pow_(2).div_(x.shape[-1])
        return ms.add_(self.eps).rsqrt_()

    def fold(self, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """``(W~, beta)`` with ``norm(x) @ w + b = P(x) @ W~ / sigma(x) + beta``."""
        return (w if self.w is None else self.w[:, None] * w), (
            b if self.b is None else b + self.b @ w
        )


@dataclass
class _Layer:
    ln1: _Norm
    qkv: list[Tensor]  # W_Q, W_K, W_V [n_heads, d_model, d_head], then b_Q, b_K, b_V
    W_O: Tensor  # [n_heads, d_head, d_model]
    b_O: Tensor
    scale: float
    mlp: tuple[_Norm, Tensor, Tensor, Tensor, Tensor, Callable] | None  # ln2, W_in, b_in, ...
    causal: bool = True  # False: every position attends to every position (compiled programs)


def _check_config(cfg: Any) -> None:
    """The settings the forward here leaves out (others show up in the check against the model)."""
    get = lambda k, default=None: getattr(cfg, k, default)  # noqa: E731
    bad = [k for k in ("gated_mlp", "parallel_attn_mlp", "final_rms", "use_local_attn",
                       "use_qk_norm", "post_embedding_ln", "use_normalization_before_and_after")
           if get(k)]  # fmt: skip
    bad += [k for k, ok in [
        ("n_key_value_heads", get("n_key_value_heads") in (None, cfg.n_heads)),
        ("positional_embedding_type", get("positional_embedding_type") in (None, "standard")),
        ("act_fn", cfg.attn_only or (cfg.act_fn or "gelu").lower() in _ACTS),
        ("attention_dir", get("attention_dir", "causal") in ("causal", "bidirectional"))]
        if not ok]  # fmt: skip
    if bad:
        raise TLNoiseValueError(f"exhaustive_faithfulness does not reproduce models with {bad} "
                                f"set as here ({[get(k) for k in bad]})")  # fmt: skip


def _canonical(sd: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """A 4.x native bridge's state dict in 3.x's names and layouts (a 3.x one as it is)."""
    if "embed.W_E" in sd:
        return sd
    h = int(cfg.n_heads)
    out = {
        "embed.W_E": sd["embed.weight"],
        "pos_embed.W_pos": sd["pos_embed.weight"],
        "unembed.W_U": sd["unembed.weight"].T,
        "unembed.b_U": sd.get("unembed.bias"),
    }
    for key, value in sd.items():  # ln1, ln2, ln_final: .weight, .bias -> .w, .b
        parts = key.split(".")
        if parts[-2].startswith("ln"):
            out[".".join([*parts[:-1], parts[-1][0]])] = value
    for layer in range(int(cfg.n_layers)):
        a, m = f"blocks.{layer}.attn", f"blocks.{layer}.mlp"
        for x in "qkv":  # [(h e), d_model] -> [h, d_model, e]
            w = sd[f"{a}.{x}.weight"]
            out[f"{a}.W_{x.upper()}"] = w.reshape(h, -1, w.shape[1]).transpose(1, 2)
            out[f"{a}.b_{x.upper()}"] = sd[f"{a}.{x}.bias"].reshape(h, -1)
        w = sd[f"{a}.o.weight"]  # [d_model, (h e)] -> [h, e, d_model]
        out |= {f"{a}.W_O": w.T.reshape(h, -1, w.shape[0]), f"{a}.b_O": sd[f"{a}.o.bias"]}
        if f"{m}.in.weight" in sd:
            out |= {
                f"{m}.W_in": sd[f"{m}.in.weight"].T,
                f"{m}.b_in": sd[f"{m}.in.bias"],
                f"{m}.W_out": sd[f"{m}.out.weight"].T,
                f"{m}.b_out": sd[f"{m}.out.bias"],
            }
    return {k: v for k, v in out.items() if v is not None}


def _weights(model: Any, dtype: torch.dtype) -> tuple[Tensor, Tensor, list[_Layer], tuple]:
    """``(W_E, W_pos, layers, (ln_final, W_U [d_model, d_vocab], b_U))`` in 3.x's canonical
    layout, from a 3.x ``HookedTransformer`` or a 4.x native bridge."""
    cfg = model.cfg
    _check_config(cfg)
    raw = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    tl3 = "embed.W_E" in raw
    if not tl3 and "blocks.0.attn.q.weight" not in raw:
        raise TLNoiseValueError("exhaustive_faithfulness needs a 3.x HookedTransformer or a 4.x "
                                "native bridge (tl_noise.models.build_native_model)")  # fmt: skip
    sd, kind = _canonical(raw, cfg), str(cfg.normalization_type).upper()
    norm = lambda p: _Norm(None if kind == "NONE" else kind, sd.get(f"{p}.w"),  # noqa: E731
                           sd.get(f"{p}.b"), float(cfg.eps))  # fmt: skip
    layers = []
    for layer in range(int(cfg.n_layers)):
        p = f"blocks.{layer}"
        if tl3:  # the 3.x attention's rule, then the native module's
            scale = (float(cfg.attn_scale) if cfg.use_attn_scale else 1.0) * (
                layer + 1 if cfg.scale_attn_by_inverse_layer_idx else 1)  # fmt: skip
        else:
            positive = cfg.use_attn_scale and float(cfg.attn_scale) > 0
            scale = float(cfg.attn_scale) if positive else math.sqrt(int(cfg.d_head))
        q = f"{p}.mlp"
        mlp = None if cfg.attn_only else (
            norm(f"{p}.ln2"), sd[f"{q}.W_in"], sd[f"{q}.b_in"], sd[f"{q}.W_out"], sd[f"{q}.b_out"],
            _ACTS[(cfg.act_fn or "gelu").lower()])  # fmt: skip
        qkv = [sd[f"{p}.attn.{w}_{x}"] for w in "Wb" for x in "QKV"]
        causal = getattr(cfg, "attention_dir", "causal") == "causal"
        layers.append(_Layer(norm(f"{p}.ln1"), qkv, sd[f"{p}.attn.W_O"], sd[f"{p}.attn.b_O"],
                             scale, mlp, causal))  # fmt: skip
    w_u = sd["unembed.W_U"]
    b_u = sd.get("unembed.b_U", torch.zeros_like(w_u[0]))
    return sd["embed.W_E"], sd["pos_embed.W_pos"], layers, (norm("ln_final"), w_u, b_u)


# --------------------------------------------------------------- the prefix-sharing forward
@dataclass
class _Plan:
    """Per layer: ``keep`` ``[2^h, n_heads + 1]``, the coefficient of each component in each head
    subset (heads outside the node list always 1, the base last), each subset's bitmask, the
    MLP's bit (None: not varied), and the ablation means."""

    keep: list[Tensor]
    head_bits: list[Tensor]
    mlp_bit: list[int | None]
    means_z: list[Tensor]  # [n_heads, d_head]
    means_mlp: list[Tensor | None]  # [d_model]


def _plan(model: Any, nodes: list[str], means: dict[str, Tensor], dtype: torch.dtype,
          device: torch.device) -> _Plan:  # fmt: skip
    plan, parsed = _Plan([], [], [], [], []), [parse_node(n) or (-1, None) for n in nodes]
    for layer in range(int(model.cfg.n_layers)):
        heads = [(i, p[1]) for i, p in enumerate(parsed) if p[0] == layer and p[1] is not None]
        on = (torch.arange(1 << len(heads))[:, None] >> torch.arange(len(heads))) & 1  # [2^h, h]
        keep = torch.ones(len(on), int(model.cfg.n_heads) + 1, dtype=dtype)
        bits = torch.zeros(len(on), dtype=torch.long)
        for j, (bit, head) in enumerate(heads):
            keep[:, head] = on[:, j].to(dtype)
            bits |= on[:, j] << bit
        plan.keep.append(keep.to(device))
        plan.head_bits.append(bits.to(device))
        plan.mlp_bit.append(next((i for i, p in enumerate(parsed) if p == (layer, None)), None))
        plan.means_z.append(means[f"blocks.{layer}.attn.hook_z"].to(device, dtype))
        mean_mlp = means.get(f"blocks.{layer}.hook_mlp_out")
        plan.means_mlp.append(None if mean_mlp is None else mean_mlp.to(device, dtype))
    return plan


def _components(w: _Layer, x: Tensor, qpos: Tensor | None, mean_z: Tensor) -> Tensor:
    """``[n_heads + 1, S, n, q, d_model]``: each head's ``(z_h - mean z_h) W_O[h]`` and the base
    (residual + ``b_O`` + every head ablated) at the query positions ``qpos`` ``[n, q]`` (every
    position if None) of the prefix states ``x`` ``[S, n, pos, d_model]``."""
    wq, wk, wv, bq, bk, bv = w.qkv
    h = hq = w.ln1(x)
    if qpos is not None:
        index = qpos[None, :, :, None].expand(x.shape[0], -1, -1, x.shape[-1])
        hq, x = h.gather(2, index), x.gather(2, index)
    q = torch.einsum("snqd,hde->snhqe", hq, wq) + bq[:, None]
    k = torch.einsum("snpd,hde->snhpe", h, wk) + bk[:, None]
    v = torch.einsum("snpd,hde->snhpe", h, wv) + bv[:, None]
    pos = torch.arange(h.shape[2], device=x.device)
    qp = pos.expand(x.shape[1], -1) if qpos is None else qpos
    scores = q @ k.transpose(-1, -2) / w.scale
    if w.causal:
        future = pos[None, None, :] > qp[:, :, None]  # [n, q, pos]
        scores = scores.masked_fill(future[None, :, None], -math.inf)
    delta = torch.einsum("snhqe,hed->hsnqd", scores.softmax(-1) @ v - mean_z[:, None], w.W_O)
    return torch.cat([delta, (x + w.b_O + torch.einsum("he,hed->d", mean_z, w.W_O))[None]])


def _after_norm(norm: _Norm, comps: Tensor, keep: Tensor, x: Tensor, w: Tensor,
                b: Tensor) -> Tensor:  # fmt: skip
    """``norm(x_c) @ w + b`` for every ``x_c = keep[c] @ comps`` (``x``: those, ``[C S, ..., d]``),
    linear in the components but for ``sigma(x_c)``; a direct matmul if that is no cheaper."""
    if len(keep) <= keep.shape[1]:
        return torch.addmm(b, norm(x).flatten(0, -2), w).view(*x.shape[:-1], -1)
    folded, beta = norm.fold(w, b)
    out = (keep @ (norm.center(comps) @ folded).flatten(1)).view(*x.shape[:-1], -1)
    return (out if norm.kind is None else out.mul_(norm.rstd(x))).add_(beta)


@dataclass
class _Run:
    layers: list[_Layer]
    plan: _Plan
    final: tuple[_Norm, Tensor, Tensor]  # ln_final, W_U, b_U
    rows: int  # token positions (over all circuits) per batch
    batch: int | None  # or circuits per batch
    bar: Any
    sums: Tensor  # [2^N] float64: the sum of each circuit's target log-probs
    target: tuple[Tensor, Tensor, Tensor]  # qpos [n, q], valid [n, q], next tokens [T]

    def layer(self, layer: int, x: Tensor, masks: Tensor) -> None:
        """Run the prefix states ``x`` ``[S, n, pos, d_model]`` (circuit bitmasks ``masks``)
        through ``layer`` and the layers after it."""
        last, keep = layer == len(self.layers) - 1, self.plan.keep[layer]
        grow = len(keep) * (1 if self.plan.mlp_bit[layer] is None else 2)
        per_state = len(self.target[2]) if last else x.shape[1] * x.shape[2]
        step = max(1, (self.batch or self.rows // per_state) // grow)
        for start in range(0, x.shape[0], step):
            comps = _components(
                self.layers[layer],
                x[start : start + step],
                self.target[0] if last else None,
                self.plan.means_z[layer],
            )
            comps = comps[:, :, self.target[1]] if last else comps  # real targets: [.., T, d]
            out = (keep @ comps.flatten(1)).view(-1, *comps.shape[2:])
            ms = (self.plan.head_bits[layer][:, None] | masks[start : start + step][None]).flatten()
            for branch, branch_ms, branch_comps in self._mlp(layer, comps, out, ms):
                if last:
                    self._score(branch, branch_ms, branch_comps, keep)
                else:
                    self.layer(layer + 1, branch, branch_ms)

    def _mlp(self, layer: int, comps: Tensor, x: Tensor, ms: Tensor) -> Iterator[tuple]:
        """``(states, masks, components or None)`` after the MLP: kept and, if it is a node,
        mean-ablated (components still valid for the ablated branch)."""
        w, bit, mean = self.layers[layer], self.plan.mlp_bit[layer], self.plan.means_mlp[layer]
        if w.mlp is None:
            yield x, ms, comps
            return
        ln2, w_in, b_in, w_out, b_out, act = w.mlp
        hidden = act(_after_norm(ln2, comps, self.plan.keep[layer], x, w_in, b_in))
        kept = (x + b_out).flatten(0, -2).addmm_(hidden.flatten(0, -2), w_out).view_as(x)
        del hidden
        yield kept, ms if bit is None else ms | (1 << bit), None
        if bit is not None and mean is not None:
            comps[-1] += mean
            yield x.add_(mean), ms, comps

    def _score(self, x: Tensor, ms: Tensor, comps: Tensor | None, keep: Tensor) -> None:
        ln, w_u, b_u = self.final
        if comps is None:
            logits = torch.addmm(b_u, ln(x).flatten(0, -2), w_u).view(*x.shape[:-1], -1)
        else:
            logits = _after_norm(ln, comps, keep, x, w_u, b_u)
        logp = logits.log_softmax(-1)  # [S', T, vocab]
        picked = logp.gather(-1, self.target[2][None, :, None].expand(len(ms), -1, 1))
        self.sums.index_add_(0, ms.cpu(), picked.squeeze(-1).double().sum(-1).cpu())
        self.bar.update(len(ms) * len(self.target[2]))


def _targets(targets: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(qpos [n, q], valid [n, q], target ids [T])``: each row's counted positions first."""
    keep = target_positions(mask, targets)
    q = max(1, int(keep.sum(1).max()))
    order = torch.sort((~keep).long(), dim=1, stable=True).indices[:, :q]
    valid = keep.gather(1, order)
    return order, valid, targets.gather(1, order)[valid]


def _example_chunks(model: Any, tokens: Tensor, nodes: list[str], rows: int) -> list[Tensor]:
    """Examples per chunk: one prefix state, expanded by a non-last layer, fits ``rows``."""
    parsed = [parse_node(n) or (-1, None) for n in nodes]
    grow = max([2 ** sum(p[0] == layer for p in parsed)
                for layer in range(int(model.cfg.n_layers) - 1)] + [1])  # fmt: skip
    size = max(1, rows // (grow * tokens.shape[1]))
    return [torch.arange(s, min(s + size, len(tokens))) for s in range(0, len(tokens), size)]
