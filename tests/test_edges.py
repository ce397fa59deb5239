"""Edge noise (issue 13): the graph is MIB's, rebuilt readers equal the model's own, writers sum to
the residual stream, edge ablations agree with independent TransformerLens patching, and edge
noise fits, saves, loads and resumes like node noise.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY, TL_MAJOR, freeze

import tl_noise as tn
from tl_noise.edges import EdgeCircuitEvaluator, EdgeGraph, EdgeNoise
from tl_noise.edges.graph import LOGITS_BLOCK, attn_block, mlp_block
from tl_noise.fitting import fit
from tl_noise.hooks.ablation import ablation_hooks, node_means
from tl_noise.models import build_native_model, load_model
from tl_noise.runs import load_run
from tl_noise.runs.circuits import graph_edges, mib_cfg

pytestmark = pytest.mark.tl3

TOKENS = torch.randint(0, TINY["d_vocab"], (6, 10), generator=torch.Generator().manual_seed(3))


def native(**overrides):
    return freeze(build_native_model({**TINY, **overrides}))


@pytest.fixture(scope="module")
def hf_model(gpt2_checkpoint):
    """A Hugging Face GPT-2 checkpoint loaded as users load one (4.x: a booted bridge; 3.x: a
    HookedTransformer with its layer norms folded)."""
    return freeze(load_model(gpt2_checkpoint))


def hf_tokens(model):
    return torch.randint(
        1, int(model.cfg.d_vocab), (4, 10), generator=torch.Generator().manual_seed(0)
    )


MODELS = {
    "native LN": lambda: native(),
    "native RMS": lambda: native(normalization_type="RMS"),
    "native no norm": lambda: native(normalization_type=None),
    "attention only": lambda: native(attn_only=True),
    "grouped key/value heads": lambda: native(n_key_value_heads=2),
}


def zeros(graph: EdgeGraph) -> dict[str, torch.Tensor]:
    return {b: torch.zeros(s) for b, s in graph.block_shapes().items()}


def with_ablated(graph: EdgeGraph, edges) -> dict[str, torch.Tensor]:
    sigmas = zeros(graph)
    where = graph.locate()
    for edge in edges:
        block, row, column = where[edge]
        sigmas[block][row, column] = 1.0
    return sigmas


# ------------------------------------------------------------------------------- the graph
def test_grouped_key_value_heads_read_once_per_group():
    graph = EdgeGraph(2, 4, kv_heads=2)
    assert graph.block_shapes()[attn_block(1)] == (8, 6)
    assert graph.readers(attn_block(0))[4:] == ["a0.h0<k>", "a0.h2<k>", "a0.h0<v>", "a0.h2<v>"]
    mib = {name for name, _ in graph_edges(mib_cfg({"n_layers": 2, "n_heads": 4, "d_model": 8}))}
    assert set(graph.locate()) < mib  # a group's k/v edges carry its first head's name
    model = native(n_key_value_heads=2)
    means = node_means(model, TOKENS)
    with tn.attach_edge_noise(model, calibration_tokens=TOKENS) as noise:
        assert noise.graph == graph
        out = [e for e in graph.locate() if e.startswith("a0.h3->")]
        with noise.fixed(with_ablated(graph, out)):
            edges = model(TOKENS)
    reference = model.run_with_hooks(TOKENS, fwd_hooks=ablation_hooks(means, ["a0.h3"]))
    torch.testing.assert_close(edges, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mlps", [True, False])
def test_the_graph_is_mibs_edge_set(mlps):
    cfg = {"n_layers": 3, "n_heads": 2, "d_model": 8, "attn_only": not mlps}
    graph = EdgeGraph(3, 2, mlps=mlps)
    names = list(graph.locate())
    assert len(names) == len(set(names)) == graph.n_edges
    assert set(names) == {name for name, _ in graph_edges(mib_cfg(cfg))}
    # every reader's writers are a prefix of the writer list, in forward order
    for block, (_, columns) in graph.block_shapes().items():
        assert [n.split("->")[0] for n in graph.edge_names(block)[0]] == graph.writers[:columns]


# -------------------------------------------------------------- rebuilt readers, writers
@pytest.mark.parametrize("kind", list(MODELS))
def test_rebuilt_readers_equal_the_models_own(kind):
    model = MODELS[kind]()
    clean = model(TOKENS)
    noise = tn.attach_edge_noise(model, calibration_tokens=TOKENS)
    try:
        assert noise.check_rebuild(TOKENS) <= 1e-5  # every head's q, k, v against the model's
        with noise.fixed(zeros(noise.graph)):  # every edge kept: the rebuilt model is the model
            torch.testing.assert_close(model(TOKENS), clean, rtol=1e-5, atol=1e-5)
        with noise.switched_off():
            assert torch.equal(model(TOKENS), clean)
        assert not torch.equal(model(TOKENS), clean)  # sampling
    finally:
        noise.remove()
    assert torch.equal(model(TOKENS), clean)


def test_rebuilt_readers_on_a_hugging_face_checkpoint(hf_model):
    tokens = hf_tokens(hf_model)
    clean = hf_model(tokens)
    with tn.attach_edge_noise(hf_model, calibration_tokens=tokens) as noise:
        assert noise.check_rebuild(tokens) <= 1e-5
        with noise.fixed(zeros(noise.graph)):
            torch.testing.assert_close(hf_model(tokens), clean, rtol=1e-5, atol=1e-5)
    assert torch.equal(hf_model(tokens), clean)


def _residuals(model, tokens):
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.n_layers)]
    names.append(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    out = {}

    def keep(name):
        def hook(x, hook):
            out[name] = x.detach().clone()

        return hook

    model.run_with_hooks(tokens, fwd_hooks=[(n, keep(n)) for n in names])
    return [out[n] for n in names]


@pytest.mark.parametrize("which", ["native", "hf"])
def test_writers_sum_to_the_residual_stream(which, request):
    """resid_pre of layer l = input + every earlier head's z W_O + b_O + every earlier MLP."""
    model = native() if which == "native" else request.getfixturevalue("hf_model")
    tokens = TOKENS if which == "native" else hf_tokens(model)
    with tn.attach_edge_noise(model, calibration_tokens=tokens) as noise:
        parts = noise.contributions_of(tokens).double()  # [writers, b, p, d]
        graph = noise.graph
    residuals = _residuals(model, tokens)
    b_o = model.b_O.detach().double()
    for layer, resid in enumerate(residuals):
        upstream = graph.upstream_of_layer(layer)
        rebuilt = parts[:upstream].sum(0) + b_o[:layer].sum(0)
        scale = resid.abs().max()
        assert float((rebuilt - resid.double()).abs().max() / scale) < 1e-5, layer


@pytest.mark.parametrize("which", ["native", "hf"])
def test_ablating_a_writers_edges_is_mean_ablating_the_node(which, request):
    model = native() if which == "native" else request.getfixturevalue("hf_model")
    tokens = TOKENS if which == "native" else hf_tokens(model)
    means = node_means(model, tokens)
    with tn.attach_edge_noise(model, calibration_tokens=tokens) as noise:
        for node in ("a0.h1", "m0", "a1.h2"):
            out = [e for e in noise.graph.locate() if e.startswith(f"{node}->")]
            with noise.fixed(with_ablated(noise.graph, out)):
                edges = model(tokens)
            noise.remove()
            reference = model.run_with_hooks(tokens, fwd_hooks=ablation_hooks(means, [node]))
            noise.attach()
            torch.testing.assert_close(edges, reference, rtol=1e-4, atol=1e-4)


def test_ablating_a_readers_edges_is_its_mean_input():
    """Every edge into ``m1`` (or ``logits``) ablated = the MLP's (the unembedding's) input
    replaced by its mean: the reader input is linear in its writers."""
    model = native()
    model.set_use_hook_mlp_in(True)
    name = {"m1": "blocks.1.hook_mlp_in", "logits": "blocks.1.hook_resid_post"}
    with tn.attach_edge_noise(model, calibration_tokens=TOKENS) as noise:
        for reader, hook_name in name.items():
            into = [e for e in noise.graph.locate() if e.split("->")[1] == reader]
            with noise.fixed(with_ablated(noise.graph, into)):
                edges = model(TOKENS)
            with noise.switched_off():
                _, cache = model.run_with_cache(TOKENS, names_filter=[hook_name])
                mean = cache[hook_name].double().mean((0, 1)).float()
                reference = model.run_with_hooks(
                    TOKENS, fwd_hooks=[(hook_name, lambda x, hook, m=mean: m.expand_as(x).clone())]
                )
            torch.testing.assert_close(edges, reference, rtol=1e-4, atol=1e-4)
    model.set_use_hook_mlp_in(False)


@pytest.mark.skipif(TL_MAJOR >= 4, reason="split q/k/v input hooks: HookedTransformer (3.x)")
def test_single_edges_match_transformer_lens_split_qkv_patching():
    """The independent reference: TransformerLens 3.x's own per-head q/k/v input hooks
    (``use_split_qkv_input``) and per-head results (``use_attn_result``), patched by hand."""
    model = native()
    edges = ["a0.h1->a1.h2<q>", "input->a1.h0<k>", "m0->a1.h3<v>", "a0.h2->m1", "a1.h1->logits"]
    with tn.attach_edge_noise(model, calibration_tokens=TOKENS) as noise:
        with noise.fixed(with_ablated(noise.graph, edges)):
            ours = model(TOKENS)
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    try:
        reference = _split_qkv_reference(model, TOKENS, edges)
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_attn_result(False)
        model.set_use_hook_mlp_in(False)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def _writer_value(store, writer):
    """A writer's contribution from TransformerLens' own hooks (per-head results)."""
    if writer == "input":
        return store["hook_embed"] + store["hook_pos_embed"]
    if writer.startswith("m"):
        return store[f"blocks.{writer[1:]}.hook_mlp_out"]
    layer, head = (int(x[1:]) for x in writer.split("."))
    return store[f"blocks.{layer}.attn.hook_result"][:, :, head]


def _reader_hook(model, reader):
    """``(hook name, head or None)`` of a reader's input under split q/k/v inputs."""
    if reader == "logits":
        return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", None
    if reader.startswith("m"):
        return f"blocks.{reader[1:]}.hook_mlp_in", None
    layer, head = (int(v[1:]) for v in reader[:-3].split("."))
    return f"blocks.{layer}.hook_{reader[-2]}_input", head


def _split_qkv_reference(model, tokens, edges):
    _, cache = model.run_with_cache(tokens)
    means = {e.split("->")[0]: _writer_value(cache, e.split("->")[0]).mean((0, 1)) for e in edges}
    live = {}

    def keep(x, hook):
        live[hook.name] = x

    def patch(writer, head):
        def hook(x, hook):
            delta = means[writer] - _writer_value(live, writer)
            x = x.clone()
            if head is None:
                return x + delta
            x[:, :, head] = x[:, :, head] + delta
            return x

        return hook

    names = ["hook_embed", "hook_pos_embed"]
    names += [n for n in cache if n.endswith(("attn.hook_result", "hook_mlp_out"))]
    hooks = [(n, keep) for n in names]
    for edge in edges:
        writer, reader = edge.split("->")
        name, head = _reader_hook(model, reader)
        hooks.append((name, patch(writer, head)))
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


# ------------------------------------------------------------------------- noise itself
def test_a_writer_that_never_varies_gets_no_noise():
    model = native()
    with torch.no_grad():  # head a0.h1 writes nothing
        if TL_MAJOR < 4:
            model.blocks[0].attn.W_O[1].zero_()
        else:  # the 4.x native module: o.weight [d_model, (n_heads d_head)]
            model.blocks[0].attn.o.weight[:, TINY["d_head"] : 2 * TINY["d_head"]].zero_()
    with tn.attach_edge_noise(model, calibration_tokens=TOKENS) as noise:
        index = noise.graph.writers.index("a0.h1")
        assert float(noise.writer_scale[index].abs().max()) == 0.0
        out = [e for e in noise.graph.locate() if e.startswith("a0.h1->")]
        with noise.fixed(zeros(noise.graph)):
            kept = model(TOKENS)
        with noise.fixed(with_ablated(noise.graph, out)):
            ablated = model(TOKENS)
        torch.testing.assert_close(ablated, kept, rtol=1e-6, atol=1e-6)


def test_attribution_is_the_derivative_of_the_ablation():
    """Edge attribution patching = dm/dsigma at sigma = 0 (central differences, float32)."""
    model = native()
    with EdgeCircuitEvaluator(model, TOKENS) as evaluator:
        scores = evaluator.attribution()
        noise = evaluator.noise

        def m(edge: str, sigma: float) -> float:
            sigmas = zeros(noise.graph)
            block, row, column = evaluator.locate[edge]
            sigmas[block][row, column] = sigma
            with torch.no_grad(), noise.fixed(sigmas):
                value, terms = evaluator._batch_metric(model(TOKENS), torch.arange(len(TOKENS)))
            return float(value) / terms

        for edge in ["a0.h1->a1.h2<q>", "input->m0", "m1->logits", "a1.h3->logits"]:
            slope = (m(edge, 0.02) - m(edge, -0.02)) / 0.04
            assert math.isclose(abs(slope), scores[edge], rel_tol=0.03, abs_tol=2e-5), edge


def test_the_rebuild_check_catches_readers_it_does_not_reproduce():
    """The check at attach can fail: readers computed with other weights are refused."""
    model = native()
    with tn.attach_edge_noise(model, calibration_tokens=TOKENS) as noise:
        assert noise._weights is not None
        projection = noise._weights.projections[1]  # layer 1's folded W_Q, W_K, W_V
        projection.weight = projection.weight * 1.01
        with pytest.raises(ValueError, match=r"relative error of 0\.01 \(accepted: 0\.0001\)"):
            noise.check_rebuild(TOKENS)


def test_edge_noise_refuses_what_it_cannot_rebuild():
    with pytest.raises(ValueError, match="use_normalization_before_and_after=True"):
        tn.attach_edge_noise(
            native(use_normalization_before_and_after=True, normalization_type="RMS")
        )
    model = native()
    with tn.attach_noise(model, "blocks.*.attn.hook_z"):
        with pytest.raises(ValueError, match="already carry tl-noise noise"):
            tn.attach_edge_noise(model)
    assert not model.hook_dict["blocks.0.attn.hook_q"].fwd_hooks
    with tn.attach_noise(model, "blocks.*.attn.hook_z") as nodes:
        with pytest.raises(TypeError, match="edge_importance needs edge noise"):
            tn.edge_importance(nodes)


def test_edge_noise_saves_and_loads(tmp_path):
    model = native()
    noise = tn.attach_edge_noise(model, calibration_tokens=TOKENS)
    with torch.no_grad():
        noise.layer(attn_block(1)).rhos.normal_()
    noise.save(tmp_path / "edges")
    stds, means = noise.stds(), noise.writer_mean.clone()
    noise.remove()
    loaded = tn.NoiseHooks.load(tmp_path / "edges", model)
    try:
        assert isinstance(loaded, EdgeNoise) and loaded.attached
        assert all(torch.equal(loaded.stds()[k], v) for k, v in stds.items())
        assert torch.equal(loaded.writer_mean, means)
        assert list(loaded.stds()) == [*loaded.graph.blocks()]
        assert loaded.graph.blocks()[-1] == LOGITS_BLOCK and mlp_block(0) in loaded.stds()
    finally:
        loaded.remove()
    with pytest.raises(ValueError, match="saved edge noise is for 2 layers"):
        tn.NoiseHooks.load(tmp_path / "edges", native(n_layers=3))


def test_fit_resumes_edge_noise_exactly(tmp_path):
    model = native()
    settings = dict(batch_size=4, lr=0.1, quiet=True, checkpoint_every=3, stable_window=0)
    with tn.attach_edge_noise(model, calibration_tokens=TOKENS) as noise:
        fit(model, noise, TOKENS, steps=6, run_dir=tmp_path / "whole", **settings)
        whole = noise.stds()
    with tn.attach_edge_noise(model, calibration_tokens=TOKENS) as noise:
        fit(model, noise, TOKENS, steps=3, run_dir=tmp_path / "part", **settings)
    with tn.attach_edge_noise(model, calibration_tokens=TOKENS) as noise:
        fit(model, noise, TOKENS, steps=6, run_dir=tmp_path / "part", resume=True, **settings)
        resumed = noise.stds()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    run = load_run(tmp_path / "whole")
    assert run.is_edge_run() and len(run.edge_scores()) == EdgeGraph(2, 4).n_edges
    curve = run.edge_curve()
    assert curve is not None and curve["k"][-1] == EdgeGraph(2, 4).n_edges
    assert math.isclose(curve["faithfulness"][-1], 1.0, abs_tol=1e-6)
