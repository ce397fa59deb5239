"""Compiled RASP programs (tl_noise.zoo.compiled): the shipped weights reproduce tracr's own
outputs and residual stream on TransformerLens 4.x and 3.x, the node and edge labels follow from
the weights, and tl-noise's contract runs on them."""

from __future__ import annotations

import pytest
import torch

import tl_noise as tn
from tl_noise.edges import EdgeGraph
from tl_noise.evaluation import exact
from tl_noise.evaluation.metrics import roc_auc
from tl_noise.evaluation.nodes import CircuitEvaluator
from tl_noise.hooks.targets import NO_TARGET, TARGETS_KEY
from tl_noise.io import read_tensors
from tl_noise.zoo import list_compiled, load_benchmark, load_compiled
from tl_noise.zoo.compiled import COMPILED_DIR

pytestmark = pytest.mark.tl3

PROGRAMS = list_compiled()
THRESHOLD = 1e-6


def test_the_programs_are_shipped():
    assert {"reverse", "sort_unique", "hist", "sort_freq", "shuffle_dyck"} <= set(PROGRAMS)


@pytest.fixture(scope="module", params=PROGRAMS)
def program(request):
    return load_compiled(request.param)


def test_the_model_reproduces_tracr(program):
    check = program.check
    _, cache = program.model.run_with_cache(check["tokens"])
    last = int(program.model.cfg.n_layers) - 1
    resid = cache[f"blocks.{last}.hook_resid_post"]
    assert (resid - check["resid"]).abs().max() < 1e-4
    outputs = program.run(check["tokens"])
    assert torch.equal(outputs[:, 1:], check["outputs"][:, 1:])


def test_the_task_targets_are_the_program_outputs(program):
    task = program.task(n=32, seed=3)
    targets = task.extras[TARGETS_KEY]
    assert bool((targets[:, 0] == NO_TARGET).all()) and not bool(task.loss_mask[:, 0].any())
    assert torch.equal(targets[:, 1:], program.run(task.tokens)[:, 1:])
    assert bool((task.tokens[:, 0] == program.info["data"]["bos"]).all())
    if program.info["data"].get("unique_tokens"):
        body = task.tokens[:, 1:]
        assert all(len(set(row.tolist())) == len(row) for row in body)
    assert task.metric(program.model(task.tokens), task.batch(torch.arange(32))) < 1e-3


def _weights(program) -> dict[str, torch.Tensor]:
    state = read_tensors(COMPILED_DIR / f"{program.name}.safetensors", program.name)
    return {k: v.double() for k, v in state.items() if not k.startswith("check.")}


def _rows(matrix: torch.Tensor) -> set[int]:  # residual directions a [d_model, *] matrix touches
    return set(
        (matrix.abs() > THRESHOLD).reshape(matrix.shape[0], -1).any(1).nonzero()[:, 0].tolist()
    )


def test_labels_follow_from_the_weights(program):
    """Recomputed here from the weights: live nodes have weights, and an edge is positive
    exactly when the directions its writer writes meet the directions its reader reads."""
    w, cfg = _weights(program), program.model.cfg
    writes, reads = {"input": _rows(w["embed.W_E"].T) | _rows(w["pos_embed.W_pos"].T)}, {}
    for layer in range(cfg.n_layers):
        a = f"blocks.{layer}.attn"
        for h in range(cfg.n_heads):
            name = f"a{layer}.h{h}"
            writes[name] = _rows(w[f"{a}.W_O"][h].T)
            for x in "QKV":
                reads[f"{name}<{x.lower()}>"] = _rows(w[f"{a}.W_{x}"][h])
            live = any(bool(w[f"{a}.W_{x}"][h].abs().max() > 0) for x in "QKVO")
            assert program.labels["nodes"][name]["live"] == live, name
        writes[f"m{layer}"] = _rows(w[f"blocks.{layer}.mlp.W_out"].T)
        reads[f"m{layer}"] = _rows(w[f"blocks.{layer}.mlp.W_in"])
        live = bool(w[f"blocks.{layer}.mlp.W_in"].abs().max() > 0)
        assert program.labels["nodes"][f"m{layer}"]["live"] == live
    reads["logits"] = _rows(w["unembed.W_U"])
    graph = EdgeGraph.of(program.model)
    expected = {e for e in graph.locate() if writes[e.split("->")[0]] & reads[e.split("->")[1]]}
    assert set(program.edges) == expected and expected


def test_exact_table_with_targets_matches_hooked_forwards():
    program = load_compiled("reverse")
    task = program.task(n=16, seed=0)
    table = exact.exhaustive_faithfulness(program.model, task.tokens, task.loss_mask,
                                          progress=False)  # fmt: skip
    ev = CircuitEvaluator(program.model, task.tokens, task.loss_mask)
    assert torch.equal(ev.targets[:, 1:], task.extras[TARGETS_KEY][:, 1:])
    for subset in (["a0.h0", "m0"], ["a3.h0", "m1", "m2"], program.live_nodes):
        assert abs(table.f_of(subset) - ev.faithfulness(subset)) < 1e-5
    assert table.f_of(program.live_nodes) > 0.99  # the live nodes are the whole program


def test_the_node_contract_finds_the_live_nodes():
    program = load_benchmark("tracr-reverse")
    task = program.task(n=64, seed=1)
    hooks = ["blocks.*.attn.hook_z", "blocks.*.hook_mlp_out"]
    with tn.attach_noise(program.model, hooks) as noise:
        tn.fit(program.model, noise, task.tokens, loss_mask=task.loss_mask, quiet=True)
        scores = tn.node_importance(noise)
    nodes = list(program.labels["nodes"])
    labels = torch.tensor([n in program.live_nodes for n in nodes])
    assert roc_auc(torch.tensor([scores[n] for n in nodes]), labels) == 1.0
