"""Node-level baselines: scores for every attention head ``a{l}.h{h}`` and MLP ``m{l}``.

Every method is a function ``(model, tokens, loss_mask, corrupted_tokens=None, **settings) ->
NodeScores`` (higher score = more important node), registered in :data:`BASELINES` by name:

=============================== =============================================== ==============
name                            score of node ``v``                             forwards
=============================== =============================================== ==============
``"mean ablation"``             ``m(N) - m(N \\ {v})``, single-node ablation     ``3 + N``
``"activation patching"``       ``|m(x~, a_v <- a_v(x)) - m(x~)|`` (denoising)    ``2 + N``
``"attribution patching (TL)"`` ``|(a_v(x) - a_v(x~)) . dm/da_v at x~|``; TL      ``4``
                                4.3's tool, the private copy on TL 3.x
``"subnetwork probing"``        learned hard-concrete mask logit ``log alpha_v`` ``2 + 3 S b/n``
``"ibcircuit"``                 learned bottleneck logit ``logit(lam_v)``        ``2 + 3 S b/n``
``"acdc greedy"``               greedy backward-elimination step                ``2 + N(N+1)/2``
=============================== =============================================== ==============

``m`` is :class:`~tl_noise.evaluation.nodes.CircuitEvaluator`'s metric (mean log-prob of the true
next token at the ``loss_mask`` positions), ablation is the evaluator's mean ablation, ``x~`` the
counterfactual tokens (row ``i`` resampled from another row when ``corrupted_tokens`` is None),
``S`` optimisation steps on ``b`` of ``n`` rows. A forward is one pass over the evaluation set and
a backward counts as 2 (:mod:`.common`).

Example (``model`` a TransformerLens model, ``tokens``/``loss_mask`` ``[n, pos]``)::

    from tl_noise.evaluation.node_baselines import BASELINES

    result = BASELINES.get("activation patching")(model, tokens, loss_mask, corrupted_tokens)
    result.ranking()[:3], result.seconds, result.forwards
"""

from collections.abc import Callable

from tl_noise.evaluation.node_baselines.acdc import acdc_greedy_scores
from tl_noise.evaluation.node_baselines.activation_patching import activation_patching_scores
from tl_noise.evaluation.node_baselines.attribution_patching import (
    attribution_patching_scores,
    private_attribution_patching,
    tl_attribution_patching,
    tl_tool_available,
)
from tl_noise.evaluation.node_baselines.common import NodeBaseline, NodeScores
from tl_noise.evaluation.node_baselines.ibcircuit import ibcircuit_scores
from tl_noise.evaluation.node_baselines.mean_ablation import mean_ablation_scores
from tl_noise.evaluation.node_baselines.subnetwork_probing import subnetwork_probing_scores
from tl_noise.registry import Registry

BASELINES: Registry[Callable[..., NodeScores]] = Registry("baseline")
"""Node-level baselines by name, in the order of the table above."""
BASELINES.add("mean ablation", mean_ablation_scores)
BASELINES.add("activation patching", activation_patching_scores)
BASELINES.add("attribution patching (TL)", attribution_patching_scores)
BASELINES.add("subnetwork probing", subnetwork_probing_scores)
BASELINES.add("ibcircuit", ibcircuit_scores)
BASELINES.add("acdc greedy", acdc_greedy_scores)

__all__ = [
    "BASELINES",
    "NodeBaseline",
    "NodeScores",
    "acdc_greedy_scores",
    "activation_patching_scores",
    "attribution_patching_scores",
    "ibcircuit_scores",
    "mean_ablation_scores",
    "private_attribution_patching",
    "subnetwork_probing_scores",
    "tl_attribution_patching",
    "tl_tool_available",
]
