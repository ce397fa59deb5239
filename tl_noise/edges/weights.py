"""The weights edge noise needs to rebuild a head's q/k/v from its own rebuilt input.

A head reads ``LN1(x)`` through ``W_Q[h]``, ``W_K[h]``, ``W_V[h]``; with edge noise each head's
``x`` differs, so its q/k/v are recomputed as ``LN1(x_h) W[h] + b[h]``, the norm's weight and
bias folded into ``W`` and ``b`` (:func:`fold`). The projections come from
the model's ``W_Q``/``b_Q``... (``[n_layers, n_heads, d_model, d_head]``, the same on
TransformerLens 4.x bridges and 3.x ``HookedTransformer``), ``W_O`` turns a head's ``z`` into its
contribution to the residual stream, and the layer norm is read off the block's ``ln1`` module
(LN, LNPre, RMS, RMSPre or none, as ``cfg.normalization_type`` says). What the model does is
checked when the noise is attached (:meth:`tl_noise.edges.EdgeNoise.check_rebuild`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_noise.edges.graph import EdgeGraph
from tl_noise.edges.readers import Projection
from tl_noise.errors import TLNoiseValueError


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return getattr(cfg, key, default)


def check_edge_model(model: Any) -> None:
    """ValueError naming the setting when edge noise cannot rebuild this model's readers.

    Rotary and ALiBi positions and q/k norms act on q/k after the projections edge noise
    recomputes (at ``hook_q``/``hook_k``), so the model applies them to the rebuilt q/k as to its
    own; in parallel attention/MLP blocks an MLP reads the block's input (:class:`EdgeGraph`).
    Norms after the attention or MLP are refused: a head's ``z W_O`` is then not what it adds to
    the residual stream. What a model really computes is checked when the noise is attached
    (:meth:`~tl_noise.edges.EdgeNoise.check_rebuild`, which also finds such norms where cfg
    does not say so)."""
    cfg = model.cfg
    problems = []
    kv = _get(cfg, "n_key_value_heads")
    if kv is not None and (kv <= 0 or cfg.n_heads % kv):
        problems.append(f"n_key_value_heads={kv} does not divide n_heads={cfg.n_heads}")
    if _get(cfg, "use_normalization_before_and_after"):
        problems.append("use_normalization_before_and_after=True (norms after the attention and "
                        "MLP act between a writer and the residual stream)")  # fmt: skip
    if problems:
        raise TLNoiseValueError(
            "edge noise cannot rebuild the readers of this model: " + "; ".join(problems)
        )


@dataclass
class Norm:
    """A block's layer norm: ``kind`` ``"LN"``, ``"LNPRE"``, ``"RMS"``, ``"RMSPRE"`` or None,
    its weight and bias (None where it has none) and ``eps``."""

    kind: str | None
    w: Tensor | None
    b: Tensor | None
    eps: float


def _norm_parameters(module: Any) -> tuple[Tensor | None, Tensor | None]:
    """``(weight, bias)`` of a TransformerLens 3.x norm (``w``/``b``), a 4.x bridge's wrapped
    Hugging Face norm (``weight``/``bias``) or a plain ``nn.LayerNorm``; None where absent."""
    for owner in (module, getattr(module, "_original_component", None)):
        if owner is None:
            continue
        for w_name, b_name in (("w", "b"), ("weight", "bias")):
            w = getattr(owner, w_name, None)
            if isinstance(w, Tensor):
                b = getattr(owner, b_name, None)
                return w.detach(), b.detach() if isinstance(b, Tensor) else None
    return None, None


def block_norm(model: Any, module: Any) -> Norm:
    kind = str(_get(model.cfg, "normalization_type")).upper()
    kind_or_none = None if kind == "NONE" else kind
    w, b = _norm_parameters(module) if kind_or_none in ("LN", "RMS") else (None, None)
    return as_applied(module, Norm(kind_or_none, w, b, float(_get(model.cfg, "eps", 1e-5))))


def as_applied(module: Any, norm: Norm) -> Norm:
    """``norm`` with the weight and bias ``module`` really applies after normalising: where its
    parameters do not reproduce its output on probe inputs (Gemma's RMS norm scales by
    ``1 + weight``), both are measured from that output, per dimension by least squares
    (``out_j = xhat_j w_j + b_j`` over 64 random rows, in float64)."""
    if norm.kind not in ("LN", "RMS") or norm.w is None:
        return norm
    w0 = norm.w
    x = torch.randn(64, w0.shape[-1], generator=torch.Generator().manual_seed(0))
    xhat = x.double() - x.double().mean(-1, keepdim=True) if norm.kind == "LN" else x.double()
    xhat = xhat * (xhat.square().mean(-1, keepdim=True) + norm.eps).rsqrt()
    with torch.no_grad():
        out = getattr(module, "_original_component", module)(x.to(w0.device, w0.dtype))
    out = out.double().cpu()
    ours = xhat * w0.double().cpu() + (0.0 if norm.b is None else norm.b.double().cpu())
    tolerance = max(1e-5, 16 * torch.finfo(w0.dtype).eps)  # half-precision modules round
    if float((ours - out).abs().max()) <= tolerance * float(out.abs().max()):
        return norm
    centred = xhat - xhat.mean(0)
    w = (centred * (out - out.mean(0))).sum(0) / centred.square().sum(0)
    b = out.mean(0) - xhat.mean(0) * w
    return Norm(norm.kind, w.to(w0.device, w0.dtype), b.to(w0.device, w0.dtype), norm.eps)


def _kv_groups(weight: Tensor, kv: int) -> Tensor:
    """``[n_layers, kv, ...]`` of a key/value weight given per key/value head or (TransformerLens
    3.x's ``W_K`` property) repeated for every query head of its group."""
    heads = weight.shape[1]
    return weight if heads == kv else weight[:, :: heads // kv]


def mlp_input(model: Any, layer: int, parallel: bool) -> tuple[str, bool]:
    """``(hook point, normed)`` of MLP ``layer``'s input: its ``ln2``'s input on a 4.x bridge
    (``blocks.{l}.ln2.hook_in``), else ``hook_mlp_in`` (3.x), except in a 4.x parallel block
    whose MLP reads the attention's ``ln1`` (GPT-J, Phi: no ``ln2``, no hook before the norm):
    there the MLP's own normed input ``blocks.{l}.mlp.hook_in`` (``normed``)."""
    hooks, prefix = model.hook_dict, f"blocks.{layer}"
    if f"{prefix}.ln2.hook_in" in hooks:
        return f"{prefix}.ln2.hook_in", False
    shared = parallel and f"{prefix}.ln1.hook_in" in hooks and f"{prefix}.mlp.hook_in" in hooks
    if shared and getattr(model.blocks[layer], "ln2", None) is None:
        return f"{prefix}.mlp.hook_in", True
    return f"{prefix}.hook_mlp_in", False


def _ln1(model: Any, layer: int) -> Any:
    """Block ``layer``'s ``ln1``; ValueError where a normed model's block has none (OLMo 2 norms
    only the attention's and MLP's outputs: a head's ``z W_O`` is not what it adds)."""
    if str(_get(model.cfg, "normalization_type")).upper() == "NONE":
        return None
    try:
        return model.blocks[layer].ln1
    except AttributeError as err:
        raise TLNoiseValueError(
            f"edge noise cannot rebuild the readers of this model: block {layer} has no ln1 "
            f"although normalization_type={_get(model.cfg, 'normalization_type')!r} (norms "
            "after the attention or MLP, not before)"
        ) from err


def _normed_mlps(model: Any, graph: EdgeGraph | None) -> list[int]:
    if graph is None or not graph.mlps:
        return []
    return [i for i in range(graph.n_layers) if mlp_input(model, i, graph.parallel)[1]]


def _bias(model: Any, name: str, weight: Tensor) -> Tensor:
    """The model's stacked ``b_Q``/``b_K``/``b_V`` ``[n_layers, heads, d_head]``, or zeros where
    the checkpoint's projection has no bias (a 4.x bridge then raises AttributeError)."""
    try:
        bias = getattr(model, name)
    except AttributeError:
        bias = None
    if bias is None:
        return weight.new_zeros(weight.shape[0], weight.shape[1], weight.shape[-1])
    return bias.detach()


def fold(norm: Norm, w: Float[Tensor, "R d_model d_head"],
         b: Float[Tensor, "R d_head"]) -> Projection:  # fmt: skip
    """``norm`` then ``x W_r + b_r`` as ``xhat(x) (diag(w_ln) W_r) + (b_ln W_r + b_r)``
    (:class:`~tl_noise.edges.readers.Projection`; folded in float64)."""
    weight, bias = w.double(), b.double()
    if norm.b is not None:
        bias = bias + torch.einsum("d,rde->re", norm.b.double(), weight)
    if norm.w is not None:
        weight = weight * norm.w.double()[None, :, None]
    return Projection(norm.kind, norm.eps, weight.to(w.dtype), bias.to(w.dtype))


@dataclass
class ReaderWeights:
    """Per layer: ``projections``, the layer's q, k and v heads (in the rows of its attention
    edge block: query heads, then key/value heads for K and for V) as one
    :class:`~tl_noise.edges.readers.Projection` of ``ln1`` and ``W_Q, W_K, W_V`` (``[heads,
    d_model, d_head]``) with ``b_Q, b_K, b_V``; ``w_o`` ``[n_heads, d_head, d_model]``, which
    turns a head's ``z`` into its contribution to the residual stream."""

    projections: list[Projection]
    w_o: list[Tensor]
    mlp_norms: dict[int, Projection]  # layer -> ln1 alone, for an MLP reading it (mlp_input)

    @classmethod
    def of(cls, model: Any, graph: EdgeGraph | None = None) -> ReaderWeights:
        """The weights of ``model``, with ``mlp_norms`` for the MLPs of ``graph`` that read
        their attention's norm (:func:`mlp_input`)."""
        kv = int(_get(model.cfg, "n_key_value_heads") or model.cfg.n_heads)
        with torch.no_grad():
            w = [model.W_Q.detach()] + [_kv_groups(x.detach(), kv) for x in (model.W_K, model.W_V)]
            b = [_bias(model, "b_Q", w[0])]
            b += [_kv_groups(_bias(model, f"b_{x}", w[i + 1]), kv) for i, x in enumerate("KV")]
            w_o = model.W_O.detach()
            projections = [
                fold(block_norm(model, _ln1(model, layer)),
                     torch.cat([x[layer] for x in w]), torch.cat([x[layer] for x in b]))
                for layer in range(int(model.cfg.n_layers))
            ]  # fmt: skip
            eye = torch.eye(int(model.cfg.d_model), dtype=w_o.dtype, device=w_o.device)[None]
            norms = {layer: fold(block_norm(model, _ln1(model, layer)), eye, eye[:, 0] * 0)
                     for layer in _normed_mlps(model, graph)}  # fmt: skip
        return cls(projections, [w_o[layer] for layer in range(int(model.cfg.n_layers))], norms)

    def head_outputs(
        self, layer: int, z: Float[Tensor, "batch pos n_heads d_head"]
    ) -> Float[Tensor, "n_heads batch pos d_model"]:
        """Each head's contribution ``z_h W_O[h]`` to the residual stream (no ``b_O``)."""
        w_o = self.w_o[layer]
        return torch.einsum("bphe,hed->hbpd", z.to(w_o.dtype), w_o)
