"""TransformerLens 4.3's own edge attribution patching, as MIB-named edge scores.

``transformer_lens.tools.analysis.attribution_patching.attribution_patch(model, clean, corrupt,
metric_fn, EdgeAttributionConfig(granularity="edge"))`` scores every ``(writer, reader)`` pair
*per position*: per clean/corrupt pair (row) one clean forward (activations only) and one
corrupted forward + backward (backward hooks on the readers' ``attn.hook_{q,k,v}_input``,
``hook_mlp_in`` and the last ``hook_resid_post``), the score of an edge at position ``t`` being

    (c_w(x)[t] - c_w(x~)[t]) . dm/dx_r[t] |_{x~}

(denoising: the gradient at the corrupted run ``x~``; writers: ``hook_embed``,
``attn.hook_result`` per head, ``hook_mlp_out``). :func:`tl_edge_attribution` calls it once per
row with ``metric_fn`` = that row's share of the evaluator's metric (its target log-probs summed,
over ``|T|``), sums the scores over rows and positions per edge and names the edges as MIB does
(``input->a0.h0<q>``, ``a0.h1->m2``, ``m2->logits``): one position-agnostic score per edge of
:class:`tl_noise.edges.EdgeGraph`, like tl-noise's own edge attribution patching
(:meth:`tl_noise.edges.EdgeCircuitEvaluator.attribution`). Token embeddings are TL's ``embed``
writer; the positional embeddings are the same on both runs and cancel in the difference.

It needs per-head attention results (``cfg.use_attn_result``), which TransformerLens 4.3 offers
only on bridges booted from Hugging Face checkpoints (``JointQKVAttentionBridge``,
``PositionEmbeddingsAttentionBridge``); natively booted bridges raise ``NotImplementedError``
(``use_attn_result: none of this model's attention bridges support ...``). TL 3.x ships no edge
granularity.

Cost: per row a clean forward, a corrupted forward and a backward (2): 4 forwards over the set.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

import torch
from torch import Tensor

from tl_noise.devices import model_device
from tl_noise.evaluation.node_baselines.common import n_targets, target_log_probs, target_mask
from tl_noise.hooks.targets import next_token_targets
from tl_noise.names import head_node, mlp_node

TL_TOOL = "transformer_lens.tools.analysis.attribution_patching"
FORWARDS = 4.0  # clean forward + corrupted forward + backward (2), per row


def writer_name(node: Any) -> str:
    """MIB's name of a TL writer ``Node``."""
    if node.kind == "embed":
        return "input"
    if node.kind == "attn_head_out":
        return head_node(int(node.layer), int(node.head))
    if node.kind == "mlp_out":
        return mlp_node(int(node.layer))
    raise ValueError(f"{node.kind} is not a writer")


def reader_name(node: Any) -> str:
    """MIB's name of a TL reader ``Node``."""
    if node.kind in ("q_input", "k_input", "v_input"):
        return f"{head_node(int(node.layer), int(node.head))}<{node.kind[0]}>"
    if node.kind == "mlp_in":
        return mlp_node(int(node.layer))
    if node.kind == "logits":
        return "logits"
    raise ValueError(f"{node.kind} is not a reader")


def tl_edge_attribution(
    model: Any, tokens: Tensor, loss_mask: Tensor, corrupted_tokens: Tensor, absolute: bool = True
) -> tuple[dict[str, float], float, float]:
    """``({edge: score}, seconds, forwards)`` from TL's edge ``attribution_patch`` (see the
    module doc); ``absolute``: ``|score|`` (MIB ranks by magnitude). NotImplementedError where
    TL refuses the model (natively booted bridges), ImportError where it has no such tool."""
    began = time.perf_counter()
    tool = importlib.import_module(TL_TOOL)
    config = tool.EdgeAttributionConfig(granularity="edge")
    labels = next_token_targets(tokens)
    device, count = model_device(model), n_targets(loss_mask, labels)
    targets = target_mask(loss_mask, labels)
    rows = [i for i in range(tokens.shape[0]) if bool(targets[i, :-1].any())]
    signed: dict[str, float] = {}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:  # TL's tool differentiates through torch.autograd.grad: no .grad kept
            p.requires_grad_(True)
        with torch.enable_grad():
            for i in rows:
                x, mask = tokens[i : i + 1].to(device), loss_mask[i : i + 1].to(device)

                def metric_fn(logits: Tensor, x: Tensor = x, mask: Tensor = mask) -> Tensor:
                    return target_log_probs(logits, next_token_targets(x), mask).sum() / count

                bad = corrupted_tokens[i : i + 1].to(device)
                result = tool.attribution_patch(model, x, bad, metric_fn, config)
                for (writer, reader), score in result.edge_scores.items():
                    name = f"{writer_name(writer)}->{reader_name(reader)}"
                    signed[name] = signed.get(name, 0.0) + float(score)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    scores = {k: abs(v) for k, v in signed.items()} if absolute else signed
    return scores, time.perf_counter() - began, FORWARDS * len(rows) / tokens.shape[0]
