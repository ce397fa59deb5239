"""MIB circuit files: the format's fields, edge set, round trip, and what is refused."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, freeze, tiny_data

import tl_noise as tn
from tl_noise.models import build_native_model
from tl_noise.runs.circuits import graph_edges, graph_nodes

pytestmark = pytest.mark.tl3

CFG = {"n_layers": 2, "n_heads": 2, "d_model": 8, "parallel_attn_mlp": False}


def test_edge_set_is_mibs():
    edges = [name for name, _ in graph_edges(CFG)]
    # layer 0: input -> 2 heads x qkv (6), input and both heads -> m0 (3); layer 1: 4 writers
    # x 6 head inputs (24), 6 writers -> m1; logits: 7 writers
    assert len(edges) == 6 + 3 + 24 + 6 + 7 == len(set(edges))
    assert "input->a0.h1<k>" in edges and "a0.h0->m0" in edges and "m1->logits" in edges
    assert "a1.h0->m0" not in edges and "m0->a0.h0<q>" not in edges
    parallel = [n for n, _ in graph_edges({**CFG, "parallel_attn_mlp": True})]
    assert "a0.h0->m0" not in parallel  # a parallel block's MLP reads what its heads read
    assert graph_nodes({**CFG, "attn_only": True}) == [
        "input", "a0.h0", "a0.h1", "a1.h0", "a1.h1", "logits"
    ]  # fmt: skip


def test_round_trip_from_a_fit(tmp_path):
    model = freeze(build_native_model(TINY))
    tokens, mask = tiny_data()
    with tn.attach_noise(model, ["blocks.*.attn.hook_z", "blocks.*.hook_mlp_out"],
                         calibration_tokens=tokens) as noise:  # fmt: skip
        tn.fit(model, noise, tokens, loss_mask=mask, steps=5, batch_size=8, quiet=True)
        scores = tn.node_importance(noise)
    path = tn.save_circuit(scores, tmp_path / "circuit.json", model, size=3)
    raw = json.loads(path.read_text())
    assert raw["cfg"] == {"n_layers": 2, "n_heads": 4, "d_model": 32, "parallel_attn_mlp": False}
    assert set(raw["nodes"]) == {"input", "logits", *scores}
    assert all(set(v) == {"score", "in_graph"} for v in raw["nodes"].values())
    circuit = tn.load_circuit(path)
    top3 = sorted(scores, key=scores.get, reverse=True)[:3]
    assert circuit.nodes_in_graph == {"input", "logits", *top3}
    assert circuit.ranking() == sorted(scores, key=lambda n: -scores[n])
    assert {k: pytest.approx(v) for k, v in scores.items()} == {
        k: v for k, v in circuit.node_scores.items() if k not in ("input", "logits")
    }
    inside = set(circuit.edges_in_graph)
    assert all(
        e.split("->")[0] in circuit.nodes_in_graph
        and e.split("->")[1].split("<")[0] in circuit.nodes_in_graph
        for e in inside
    )


def test_unnoised_nodes_are_written_out_of_graph_and_attention_only_has_no_mlps(tmp_path):
    model = freeze(build_native_model({**TINY, "attn_only": True, "d_mlp": None}))
    path = tn.save_circuit({"a0.h1": 2.0, "a1.h0": 1.0}, tmp_path / "c.json", model)
    raw = json.loads(path.read_text())
    assert not any(n.startswith("m") for n in raw["nodes"])
    assert raw["nodes"]["a0.h0"] == {"score": 0.0, "in_graph": False}
    assert raw["nodes"]["a0.h1"] == {"score": 2.0, "in_graph": True}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scores": {"a9.h0": 1.0}}, r"\['a9.h0'\], which are not nodes"),
        ({"scores": {"a0.h0": float("nan")}}, "finite numbers"),
        ({"scores": {"a0.h0": 1.0}, "size": 99}, r"size=99; expected an int in \[0, 10\]"),
        ({"scores": {"a0.h0": 1.0}, "circuit": ["zz"]}, r"circuit nodes \['zz'\]"),
    ],
)
def test_bad_circuits_are_refused(tmp_path, kwargs, match):
    model = freeze(build_native_model(TINY))
    with pytest.raises(ValueError, match=match):
        tn.save_circuit(path=tmp_path / "c.json", model=model, **kwargs)
    assert not (tmp_path / "c.json").exists()


def test_load_refuses_non_circuit_files(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"nodes": []}))
    with pytest.raises(ValueError, match="not a MIB circuit file"):
        tn.load_circuit(tmp_path / "x.json")


def test_the_dashboard_offers_the_runs_circuit_as_mib_json(tmp_path):
    pytest.importorskip("streamlit")
    from tl_noise.dashboard.views import mib_circuit_json
    from tl_noise.runs import Run

    model = freeze(build_native_model(TINY))
    tokens, mask = tiny_data()
    with tn.attach_noise(model, ["blocks.*.attn.hook_z", "blocks.*.hook_mlp_out"],
                         calibration_tokens=tokens) as noise:  # fmt: skip
        tn.fit(model, noise, tokens, loss_mask=mask, steps=3, batch_size=8, quiet=True,
               run_dir=tmp_path / "run")  # fmt: skip
        scores = tn.node_importance(noise)
    raw = json.loads(mib_circuit_json(Run(tmp_path / "run")))
    assert raw["cfg"]["n_layers"] == 2 and raw["cfg"]["parallel_attn_mlp"] is False
    assert {n: v["score"] for n, v in raw["nodes"].items() if n in scores} == pytest.approx(scores)
    (tmp_path / "c.json").write_text(json.dumps(raw))
    assert (
        tn.load_circuit(tmp_path / "c.json").ranking()
        == tn.load_circuit(tn.save_circuit(scores, tmp_path / "d.json", model)).ranking()
    )
