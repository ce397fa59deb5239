"""Edge circuits (issue 13): the smallest verified circuit at a target, MIB circuit JSON of edges
(written as MIB's ``Graph.from_json`` reads it, and read back), and ``tl-noise export``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY, freeze

import tl_noise as tn
from tl_noise.cli.main import main as cli
from tl_noise.edges import EdgeCircuitEvaluator, EdgeGraph
from tl_noise.edges.circuit import smallest_prefix
from tl_noise.fitting import fit
from tl_noise.models import build_native_model
from tl_noise.runs.circuits import graph_edges, graph_nodes, mib_cfg

pytestmark = pytest.mark.tl3

TOKENS = torch.randint(0, TINY["d_vocab"], (8, 10), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def model():
    return freeze(build_native_model(TINY))


@pytest.fixture(scope="module")
def attribution(model):
    with EdgeCircuitEvaluator(model, TOKENS) as evaluator:
        return evaluator.attribution()


def test_smallest_prefix_finds_the_first_size_reaching_the_target():
    values = [0.0, 0.1, 0.3, 0.5, 0.7, 0.85, 0.91, 0.95, 0.99, 1.0, 1.0]
    seen = []

    def f(k):
        seen.append(k)
        return values[k]

    assert smallest_prefix(f, 10, 0.9) == 6
    assert len(seen) < 10  # a scan and a bisection, not every size
    assert smallest_prefix(lambda k: 1.0, 10, 0.9) == 1


def test_extract_circuit_is_verified_and_no_larger_than_its_prefix(model, attribution):
    circuit = tn.extract_circuit(attribution, model, TOKENS, target=0.8, prune_budget=40)
    assert circuit.faithfulness >= 0.8 and len(circuit.edges) <= circuit.prefix
    assert circuit.forwards > 2 and circuit.curve[circuit.prefix] >= 0.8
    # measured again, independently: the circuit reaches the target
    with EdgeCircuitEvaluator(model, TOKENS) as evaluator:
        again = evaluator.faithfulness(circuit.edges)
        assert math.isclose(again, circuit.faithfulness, rel_tol=1e-5, abs_tol=1e-6)
        if circuit.prefix > 1:  # the prefix one edge shorter does not (the search is minimal)
            ranked = sorted(attribution, key=lambda e: -attribution[e])
            assert circuit.curve.get(circuit.prefix - 1, -1.0) < 0.8 or circuit.prefix == 1
            assert evaluator.faithfulness(ranked[: circuit.prefix - 1]) < 0.8
    assert set(circuit.nodes) <= set(EdgeGraph(2, 4).writers) | {"m0", "m1"}


def test_extract_circuit_with_resample_ablation(model, attribution):
    corrupted = torch.roll(TOKENS, 1, dims=0)
    circuit = tn.extract_circuit(
        attribution, model, TOKENS, target=0.7, ablation="resample", corrupted_tokens=corrupted,
        prune_budget=10,
    )  # fmt: skip
    assert circuit.faithfulness >= 0.7
    with pytest.raises(ValueError, match="needs corrupted_tokens"):
        tn.extract_circuit(attribution, model, TOKENS, ablation="resample")


EXTRACT_CASES = {
    "target-above-one": (dict(target=1.5), ValueError, r"target=1\.5"),
    "unknown-edge": (dict(scores={"a9.h0->logits": 1.0}), ValueError, "not edges of this model"),
    "nan-score": (dict(scores={"input->m0": math.nan}), ValueError, "finite numbers"),
    "scores-a-list": (dict(scores=["input->m0"]), TypeError, "mapping, got list"),
    "ablation-unknown": (dict(ablation="zero"), ValueError, "ablation='zero'"),
    "resample-without-corrupted": (dict(ablation="resample"), ValueError, "needs corrupted"),
    "corrupted-with-mean": (
        dict(corrupted_tokens=TOKENS), ValueError, "used by ablation='resample' only"
    ),
    "corrupted-out-of-range": (
        dict(ablation="resample", corrupted_tokens=TOKENS + 100), ValueError,
        r"corrupted_tokens must lie in \[0, 49\]",
    ),
    "tokens-float": (dict(tokens=TOKENS.float()), TypeError, "tokens must be an int tensor"),
    "mask-shape": (dict(loss_mask=torch.ones(2, 2, dtype=torch.bool)), ValueError, "loss_mask"),
    "prune-budget-negative": (dict(prune_budget=-1), ValueError, "prune_budget=-1"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(EXTRACT_CASES))
def test_extract_circuit_checks_its_input(case, model, attribution):
    overrides, exc, match = EXTRACT_CASES[case]
    kwargs = {"scores": attribution, "model": model, "tokens": TOKENS, **overrides}
    with pytest.raises(exc, match=match):
        tn.extract_circuit(**kwargs)
    assert not any(point.fwd_hooks for point in model.hook_dict.values())  # nothing left on


def test_extract_circuit_leaves_fitted_noise_in_place(model):
    noise = tn.attach_edge_noise(model, calibration_tokens=TOKENS)
    try:
        scores = tn.edge_importance(noise)
        tn.extract_circuit(scores, model, TOKENS, target=0.5, prune_budget=0)
        assert noise.attached  # taken off for the evaluation, put back afterwards
    finally:
        noise.remove()


def test_edge_circuit_json_is_what_mibs_loader_reads(model, attribution, tmp_path):
    cfg = mib_cfg(model)
    top = sorted(attribution, key=lambda e: -attribution[e])[:12]
    path = tn.save_circuit(attribution, tmp_path / "c.json", model, circuit=top)
    data = json.loads(path.read_text())
    # MIB's Graph.from_json: cfg with n_layers, n_heads, d_model, parallel_attn_mlp; every node
    # {in_graph[, score]}; every edge of the standard set {score, in_graph}
    assert {"n_layers", "n_heads", "d_model", "parallel_attn_mlp"} <= set(data["cfg"])
    assert set(data["nodes"]) == set(graph_nodes(cfg))
    assert set(data["edges"]) == {name for name, _ in graph_edges(cfg)}
    assert all(set(v) == {"score", "in_graph"} for v in data["edges"].values())
    assert {e for e, v in data["edges"].items() if v["in_graph"]} == set(top)
    touched = {"input", "logits"} | {p for e in top for p in (e.split("->")[0],
               e.split("->")[1].split("<")[0])}  # fmt: skip
    assert {n for n, v in data["nodes"].items() if v["in_graph"]} == touched
    circuit = tn.load_circuit(path)
    assert circuit.edges_in_graph == set(top)
    assert all(math.isclose(circuit.edge_scores[e], attribution[e], rel_tol=1e-6) for e in top)
    sized_path = tn.save_circuit(attribution, tmp_path / "k.json", model, size=12)
    sized = json.loads(sized_path.read_text())
    assert {e for e, v in sized["edges"].items() if v["in_graph"]} == set(top)


def test_edge_circuit_json_refuses_bad_edges(model, tmp_path):
    with pytest.raises(ValueError, match="not edges of this model"):
        tn.save_circuit({"m1->a0.h0<q>": 1.0}, tmp_path / "c.json", model)
    with pytest.raises(ValueError, match="finite numbers"):
        tn.save_circuit({"input->m0": math.nan}, tmp_path / "c.json", model)
    with pytest.raises(ValueError, match="size=99"):
        tn.save_circuit({"input->m0": 1.0}, tmp_path / "c.json", model, size=99)
    assert not (tmp_path / "c.json").exists()


@pytest.mark.slow
def test_export_command_writes_the_runs_circuit(model, tmp_path, capsys):
    with tn.attach_edge_noise(model, calibration_tokens=TOKENS) as noise:
        fit(model, noise, TOKENS, steps=4, batch_size=4, run_dir=tmp_path / "edges", quiet=True)
        scores = tn.edge_importance(noise)
    assert cli(["export", str(tmp_path / "edges"), "--format", "mib", "--size", "5"]) == 0
    data = json.loads((tmp_path / "edges" / "circuit.json").read_text())
    top = sorted(scores, key=lambda e: -scores[e])[:5]
    assert {e for e, v in data["edges"].items() if v["in_graph"]} == set(top)
    # without --size: the smallest measured size reaching --target
    assert cli(["export", str(tmp_path / "edges"), "-o", str(tmp_path / "t.json")]) == 0
    assert "measured faithfulness" in capsys.readouterr().out
    with tn.attach_noise(model, tn.names.NODE_HOOKS, calibration_tokens=TOKENS) as noise:
        fit(model, noise, TOKENS, steps=4, batch_size=4, run_dir=tmp_path / "nodes", quiet=True,
            refine_window=0)  # fmt: skip
    assert cli(["export", str(tmp_path / "nodes"), "--size", "3"]) == 0
    nodes = json.loads((tmp_path / "nodes" / "circuit.json").read_text())["nodes"]
    assert sum(v["in_graph"] for v in nodes.values()) == 3 + 2  # plus input and logits
    assert cli(["export", str(tmp_path / "missing")]) == 2
    assert cli(["export", str(tmp_path / "edges"), "--target", "0"]) == 2
