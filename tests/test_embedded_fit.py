"""Fits on the embedded induction model: the learned noise finds the known circuit."""

from __future__ import annotations

import pytest
import torch

import tl_noise as tn
from tl_noise.evaluation import ground_truth_mask, roc_auc
from tl_noise.fitting.objectives import kl_divergence

pytestmark = [pytest.mark.tl3, pytest.mark.slow]


@pytest.fixture(scope="module")
def embedded(embedded):  # the conftest factory, called once for this module
    return embedded(n=128, seed=11)


def eval_kl(model, noise, task, seed=123):
    with torch.no_grad():
        noise.set_mode("off")
        clean = torch.log_softmax(model(task.tokens), -1)[task.loss_mask]
        noise.set_mode("sample")
        noise.manual_seed(seed)
        return kl_divergence(clean, model(task.tokens)[task.loss_mask]).item()


@pytest.mark.parametrize("mode", ["alphaless", "composite"])
def test_learned_noise_ranks_the_circuit_first(embedded, mode):
    model, task = embedded
    with tn.attach_noise(model, "blocks.*.attn.hook_z", granularity="head") as noise:
        result = tn.fit(model, noise, task, mode=mode, alpha=0.5, steps=150, quiet=True)
    truth = ground_truth_mask(model.ground_truth, model.cfg.n_layers, model.cfg.n_heads)
    assert roc_auc(result.importance.flatten(), truth.flatten()) == 1.0
    stds = torch.stack([result.stds[f"blocks.{i}.attn.hook_z"] for i in range(2)])
    # replacement noise (the default): sigma <= 1, and a node the task does not need goes to ~1
    assert stds[truth].max() < 0.2 and stds[~truth].min() > 0.8


@pytest.mark.parametrize("budget", [0.05, 0.2])
def test_budget_mode_meets_its_budget(embedded, budget):
    model, task = embedded
    with tn.attach_noise(model, "blocks.*.attn.hook_z", granularity="head") as noise:
        result = tn.fit(model, noise, task, mode="budget", budget=budget, steps=300, quiet=True)
        tail = [h["loss"]["task"] for h in result.history[-100:]]
        kl = eval_kl(model, noise, task)
    # the task loss settles at the budget: not far above it, and the noise used the slack
    assert 0.5 * budget < sum(tail) / len(tail) < 1.3 * budget
    assert kl < 1.5 * budget
