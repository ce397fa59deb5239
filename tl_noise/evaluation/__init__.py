"""Judging rankings and circuits: ablation, baselines, metrics and method comparison.

* :mod:`~tl_noise.evaluation.ablation`: replacing heads' outputs (mean, resample, patching);
* :mod:`~tl_noise.evaluation.baselines`: other ways to score heads (mean ablation, activation
  patching, attribution patching);
* :mod:`~tl_noise.evaluation.metrics`: ROC AUC against known heads, faithfulness curves;
* :mod:`~tl_noise.evaluation.compare`: tl-noise beside the baselines in one table.
"""

from tl_noise.evaluation.ablation import HeadPatch, ablate_heads, task_loss
from tl_noise.evaluation.baselines import (
    HeadScores,
    activation_patching_scores,
    attribution_patching_scores,
    mean_ablation_scores,
)
from tl_noise.evaluation.compare import BASELINES, compare_methods
from tl_noise.evaluation.metrics import faithfulness_curve, ground_truth_mask, roc_auc, top_k_mask
from tl_noise.hooks import head_importance
from tl_noise.names import hook_layer
from tl_noise.ranking import head_ranking, head_stds

__all__ = [
    "BASELINES",
    "HeadPatch",
    "HeadScores",
    "ablate_heads",
    "activation_patching_scores",
    "attribution_patching_scores",
    "compare_methods",
    "faithfulness_curve",
    "ground_truth_mask",
    "head_importance",
    "head_ranking",
    "head_stds",
    "hook_layer",
    "mean_ablation_scores",
    "roc_auc",
    "task_loss",
    "top_k_mask",
]
