"""Evaluation tools: ROC AUC, head ablation/patching, faithfulness, and the baselines."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tl_noise.evaluation import (
    compare_methods,
    faithfulness_curve,
    ground_truth_mask,
    head_ranking,
    roc_auc,
    top_k_mask,
)
from tl_noise.evaluation.ablation import (
    HeadPatch,
    ablate_heads,
    ablation_values,
    head_activations,
    resampled_index,
    task_loss,
    z_hook_name,
)
from tl_noise.evaluation.baselines import (
    activation_patching_scores,
    attribution_patching_scores,
    corrupted_input,
    mean_ablation_scores,
)
from tl_noise.tasks.base import Task

pytestmark = pytest.mark.tl3
EMBEDDED = Path(__file__).parents[1] / "tl_noise" / "data" / "induction-2l.safetensors"


def random_task(d_vocab: int = 50, n: int = 8, pos: int = 12, seed: int = 3) -> Task:
    """Random tokens scored by next-token cross-entropy (no metric: the CE fallback)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, d_vocab, (n, pos), generator=gen)
    mask = torch.ones(n, pos, dtype=torch.bool)
    mask[:, :2] = False
    return Task("random", tokens, mask)


def brute_force_auc(scores: list[float], labels: list[bool]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(float(p > q) + 0.5 * float(p == q) for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


# ---------------------------------------------------------------------------------- ROC AUC
@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # the scikit-learn docstring example
        ([1.0, 2.0, 3.0, 4.0], [0, 0, 1, 1], 1.0),
        ([4.0, 3.0, 2.0, 1.0], [0, 0, 1, 1], 0.0),
        ([1.0, 1.0, 1.0], [0, 1, 1], 0.5),
        ([1.0, 1.0, 2.0, 3.0], [0, 1, 0, 1], 0.625),  # pairs: tie, loss, win, win
    ],
)
def test_roc_auc_known_values(scores, labels, expected):
    assert roc_auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_equals_pairwise_count_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (4, 6), generator=gen).float()  # many ties
    labels = torch.rand(4, 6, generator=gen) < 0.3
    labels[0, 0], labels[0, 1] = True, False
    expected = brute_force_auc(scores.flatten().tolist(), labels.flatten().tolist())
    assert roc_auc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_rejects_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([True, True]))
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(torch.tensor([1.0, math.nan]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="3 entries, labels 2"):
        roc_auc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="bool or 0/1"):
        roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([0, 2]))


def test_ground_truth_mask_and_errors():
    mask = ground_truth_mask({"previous_token": [[0, 1]], "induction": [[1, 2], [1, 3]]}, 2, 4)
    assert mask.nonzero().tolist() == [[0, 1], [1, 2], [1, 3]]
    assert torch.equal(ground_truth_mask([[1, 0]], 2, 4).nonzero(), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match=r"'induction' entry \[2, 0\]"):
        ground_truth_mask({"induction": [[2, 0]]}, 2, 4)


def test_ranking_puts_nan_last_and_keeps_tie_order():
    scores = torch.tensor([[1.0, math.nan], [3.0, 1.0]])
    assert head_ranking(scores).tolist() == [2, 0, 3, 1]
    assert top_k_mask(scores, 2).tolist() == [[True, False], [True, False]]
    with pytest.raises(ValueError, match=r"k=5; expected an int in \[0, 4\]"):
        top_k_mask(scores, 5)


# ------------------------------------------------------------------------ ablation mechanism
def test_task_loss_is_masked_cross_entropy_for_any_batch_size(tiny_model):
    task = random_task()
    with torch.no_grad():
        logits = tiny_model(task.tokens)
    logp = F.log_softmax(logits[:, :-1].double(), -1)
    nll = -logp.gather(-1, task.tokens[:, 1:, None]).squeeze(-1)
    expected = nll[task.loss_mask[:, :-1]].mean().item()  # 10 masked positions in every row
    for batch_size in (1, 3, 8):
        assert task_loss(tiny_model, task, batch_size) == pytest.approx(expected, rel=1e-5)


def test_head_patch_replaces_exactly_the_marked_heads(tiny_model):
    task = random_task()
    clean = head_activations(tiny_model, task.tokens)
    heads = torch.zeros(2, 4, dtype=torch.bool)
    heads[0, 1] = heads[1, 3] = True
    values = {0: torch.full((4, 8), 7.0), 1: torch.full((4, 8), -2.0)}
    seen = {}

    def capture(layer):
        def hook(z, hook):
            seen[layer] = z.detach().clone()

        return hook

    patch = HeadPatch(tiny_model, heads, values)
    hooks = patch.fwd_hooks() + [(z_hook_name(layer), capture(layer)) for layer in range(2)]
    tiny_model.run_with_hooks(task.tokens, fwd_hooks=hooks)
    assert torch.all(seen[0][:, :, 1] == 7.0) and torch.all(seen[1][:, :, 3] == -2.0)
    torch.testing.assert_close(seen[0][:, :, [0, 2, 3]], clean[0][:, :, [0, 2, 3]])
    # layer 1 sees a changed residual stream, so only layer 0's other heads are bit-equal
    assert not torch.allclose(seen[1][:, :, :3], clean[1][:, :, :3])


def test_ablation_leaves_the_model_unchanged(tiny_model, tokens):
    with torch.no_grad():
        before = tiny_model(tokens)
    heads = torch.ones(2, 4, dtype=torch.bool)
    with ablate_heads(tiny_model, heads, "mean", tokens):
        with torch.no_grad():
            assert not torch.allclose(tiny_model(tokens), before)
    with pytest.raises(RuntimeError, match="inside"):
        with ablate_heads(tiny_model, heads, "resample", tokens):
            raise RuntimeError("inside")
    task = random_task()
    task_loss(tiny_model, task, 3, patch=ablate_heads(tiny_model, heads, "resample", task))
    attribution_patching_scores(tiny_model, task, batch_size=4)
    activation_patching_scores(tiny_model, task, batch_size=4)
    assert all(not tiny_model.hook_dict[z_hook_name(layer)].fwd_hooks for layer in range(2))
    with torch.no_grad():
        assert torch.equal(tiny_model(tokens), before)
    assert all(p.grad is None for p in tiny_model.parameters())


def test_resample_ablation_pairs_each_example_with_another(tiny_model):
    task = random_task(n=7)
    perm = resampled_index(7, seed=5)
    assert sorted(perm.tolist()) == list(range(7)) and all(perm != torch.arange(7))
    values = ablation_values(tiny_model, task.tokens, "resample", seed=5)
    other = head_activations(tiny_model, task.tokens)
    torch.testing.assert_close(values[1], other[1][perm])
    # batched evaluation selects the rows of each batch: equal to one full-batch run
    heads = torch.zeros(2, 4, dtype=torch.bool)
    heads[:, :2] = True
    patch = HeadPatch(tiny_model, heads, values)
    with patch, torch.no_grad():
        logits = tiny_model(task.tokens)
    expected = F.cross_entropy(logits[:, :-1][task.loss_mask[:, :-1]],
                               task.tokens[:, 1:][task.loss_mask[:, :-1]]).item()  # fmt: skip
    assert task_loss(tiny_model, task, 3, patch=patch) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(
        ValueError, match=r"\[batch, pos\] = \[7, 12\] but the model runs \[2, 12\]"
    ):
        with patch, torch.no_grad():
            tiny_model(task.tokens[:2])


def test_ablation_argument_errors(tiny_model, tokens):
    with pytest.raises(
        ValueError, match=r"heads must be a tensor \[n_layers, n_heads\] = \[2, 4\]"
    ):
        HeadPatch(tiny_model, torch.zeros(4, 2, dtype=torch.bool), {})
    with pytest.raises(ValueError, match="no replacement values for layer 1"):
        HeadPatch(tiny_model, torch.ones(2, 4, dtype=torch.bool), {0: torch.zeros(4, 8)})
    with pytest.raises(ValueError, match="accepted: mean, resample"):
        ablate_heads(tiny_model, torch.ones(2, 4, dtype=torch.bool), "zero", tokens)
    with pytest.raises(ValueError, match="needs reference_tokens"):
        ablate_heads(tiny_model, torch.ones(2, 4, dtype=torch.bool))


# ------------------------------------------------------------------------------ faithfulness
@pytest.mark.parametrize("method", ["mean", "resample"])
def test_faithfulness_curve_endpoints(tiny_model, method):
    task = random_task()
    scores = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    curve = faithfulness_curve(tiny_model, task, scores, method=method, batch_size=3)
    assert curve["ks"] == list(range(9)) and len(curve["faithfulness"]) == 9
    assert curve["faithfulness"][0] == pytest.approx(0.0, abs=1e-6)
    assert curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-6)
    assert curve["clean"] == pytest.approx(task_loss(tiny_model, task), rel=1e-6)
    assert abs(curve["clean"] - curve["ablated"]) > 1e-4
    best = int(head_ranking(scores)[0])
    assert curve["ranking"][0] == [best // 4, best % 4]


# ------------------------------------------------------------------------------- baselines
def double_ce(logits, batch):
    mask = batch["loss_mask"][:, :-1]
    logp = F.log_softmax(logits[:, :-1].double(), -1)
    return -logp.gather(-1, batch["tokens"][:, 1:, None]).squeeze(-1)[mask].mean()


def test_attribution_patching_is_the_linearization_of_patching(make_model):
    """``|dL/dz . (z - z~)|`` equals the central difference of ``L(z + t (z~ - z))`` at ``t = 0``
    for every head, including layer 0 whose effect also flows through layer 1."""
    # TransformerLens 3.x casts attention patterns to cfg.dtype, so set it as well as .double()
    model = make_model(dtype=torch.float64).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    plain = random_task()
    task = Task("random", plain.tokens, plain.loss_mask, metric=double_ce)
    corrupted = corrupted_input(task, seed=1)
    scores, seconds = attribution_patching_scores(model, task, corrupted, batch_size=3)
    assert seconds > 0 and scores.shape == (2, 4) and bool((scores > 1e-3).all())
    clean, corrupt = head_activations(model, task.tokens), head_activations(model, corrupted)
    eps = 1e-4

    def loss_at(t: float, mask: torch.Tensor) -> float:
        moved = {layer: clean[layer] + t * (corrupt[layer] - clean[layer]) for layer in clean}
        return task_loss(model, task, 3, patch=HeadPatch(model, mask, moved))

    finite = torch.zeros(2, 4)
    for layer, head in itertools.product(range(2), range(4)):
        mask = torch.zeros(2, 4, dtype=torch.bool)
        mask[layer, head] = True
        finite[layer, head] = abs(loss_at(eps, mask) - loss_at(-eps, mask)) / (2 * eps)
    torch.testing.assert_close(scores, finite, rtol=1e-5, atol=1e-8)


def test_mean_ablation_and_activation_patching_scores(tiny_model):
    task = random_task()
    scores, seconds = mean_ablation_scores(tiny_model, task, batch_size=3)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 2] = True
    one = task_loss(tiny_model, task, patch=ablate_heads(tiny_model, mask, "mean", task))
    clean = task_loss(tiny_model, task)
    # a difference of two float32 losses of size ~4: its error is ~1e-6 of the losses, not of it
    assert scores[1, 2].item() == pytest.approx(one - clean, abs=2e-6 * abs(clean))
    assert seconds > 0
    corrupted = corrupted_input(task, seed=2)
    patching, _ = activation_patching_scores(tiny_model, task, corrupted, batch_size=3)
    clean_z = head_activations(tiny_model, task.tokens)
    restored = task_loss(tiny_model, task, tokens=corrupted, patch=HeadPatch(tiny_model, mask,
                                                                              clean_z))  # fmt: skip
    clean, corrupt = task_loss(tiny_model, task), task_loss(tiny_model, task, tokens=corrupted)
    assert patching[1, 2].item() == pytest.approx(
        (corrupt - restored) / (corrupt - clean),
        abs=1e-4,  # float32 batches of 3 vs all 8
    )
    with pytest.raises(ValueError, match="does not change the task loss"):
        activation_patching_scores(tiny_model, task, task.tokens.clone())
    with pytest.raises(ValueError, match=r"shaped like the task's tokens \[8, 12\]"):
        activation_patching_scores(tiny_model, task, task.tokens[:3])


def test_compare_methods_rows(tiny_model):
    task = random_task()
    truth = {"some": [[0, 1], [1, 3]]}
    oracle = ground_truth_mask(truth, 2, 4).float()
    rows = compare_methods(tiny_model, task, oracle, truth, noise_seconds=1.5, batch_size=4)
    assert [r["method"] for r in rows] == ["tl-noise", "mean ablation", "activation patching",
                                           "attribution patching"]  # fmt: skip
    assert rows[0]["auc"] == 1.0 and rows[0]["seconds"] == 1.5
    for row in rows:
        assert set(row) == {"method", "auc", "faithfulness_at_k", "circuit_size", "seconds",
                            "scores"}  # fmt: skip
        assert 0.0 <= row["auc"] <= 1.0 and row["circuit_size"] == 2
        assert math.isfinite(row["faithfulness_at_k"])
    with pytest.raises(ValueError, match="accepted baselines"):
        compare_methods(tiny_model, task, oracle, truth, baselines=["acdc"])


def test_compare_methods_switches_attached_noise_off(tiny_model):
    import tl_noise as tn

    task = random_task()
    reference = mean_ablation_scores(tiny_model, task).scores
    noise = tn.attach_noise(tiny_model, "blocks.*.attn.hook_z", granularity="head", init_std=1.0)
    try:
        rows = compare_methods(tiny_model, task, noise, [[0, 0]], baselines=["mean ablation"])
        assert noise.mode == "sample"
    finally:
        noise.remove()
    torch.testing.assert_close(torch.tensor(rows[1]["scores"]), reference)
    torch.testing.assert_close(
        torch.tensor(rows[0]["scores"]), torch.zeros(2, 4), atol=1e-6, rtol=0
    )
    assert rows[0]["auc"] == 0.5  # init_std 1 everywhere: all heads tie


# --------------------------------------------------------------------------- embedded model
@pytest.mark.skipif(not EMBEDDED.exists(), reason="the embedded model is not trained yet")
def test_baselines_find_the_embedded_induction_circuit():
    from tl_noise.models import load_embedded_model

    model = load_embedded_model()
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    n, half = 64, (cfg.n_ctx - 1) // 2
    first = torch.randint(1, cfg.d_vocab, (n, half), generator=gen)
    tokens = torch.cat([torch.zeros(n, 1, dtype=torch.long), first, first], dim=1)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, half + 1 : -1] = True  # predictions of the repeated half
    task = Task("induction", tokens, mask)
    truth = ground_truth_mask(model.ground_truth, cfg.n_layers, cfg.n_heads)
    assert roc_auc(mean_ablation_scores(model, task).scores, truth) >= 0.9
    assert roc_auc(activation_patching_scores(model, task).scores, truth) >= 0.9


def test_attribution_quality_benchmark_runs(tmp_path):
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "attribution_quality.py"
    spec = importlib.util.spec_from_file_location("attribution_quality", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "aq.json"
    methods = ["tl-noise, one fit (no refine)", "mean ablation", "attribution patching (TL)"]
    report = bench.main(["--models", "induction", "--n", "16", "--methods", *methods,
                         "--json", str(out)])  # fmt: skip
    assert out.exists() and (tmp_path / "exact-induction-n16").is_dir()
    rows = report["induction"]["methods"]
    assert list(rows) == methods
    for row in rows.values():
        assert 0 < row["area_ratio"] <= 1 + 1e-9 and row["forwards"] > 0
        assert len(row["curve"]) == 9  # k = 0..8 heads
