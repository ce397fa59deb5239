"""Edge noise on the architectures users load (issue 13): rotary (Llama, Qwen2, Gemma, Pythia),
q/k norms (Qwen3), mixture-of-experts MLPs (Mixtral), Falcon, multi-query attention (GPT-BigCode),
ALiBi and an embedding norm (BLOOM), grouped key/value heads, bias-free projections, Gemma's
``1 + weight`` RMS norm, local attention (GPT-Neo), OPT, and parallel attention/MLP blocks
(Pythia, and GPT-J and Phi, whose MLP reads the attention's norm), each booted from a Hugging
Face checkpoint written with ``save_pretrained`` exactly as a hub name loads, and natively. On
each the rebuilt readers equal the model's own, and ablating every edge out of a writer is
mean-ablating that node: the rebuilt q/k/v and MLP inputs are the ones the model goes on to use.
What cannot be rebuilt is refused at attach.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as hf
from conftest import TINY, TL_MAJOR, freeze, save_tiny_checkpoint

import tl_noise as tn
from tl_noise.cli.main import main as cli
from tl_noise.edges import EdgeGraph
from tl_noise.edges.check import RebuildCheck
from tl_noise.edges.weights import Norm, as_applied
from tl_noise.hooks.ablation import ablation_hooks, node_means
from tl_noise.models import build_native_model, load_model
from tl_noise.runs.circuits import graph_edges, mib_cfg

pytestmark = pytest.mark.tl3

ROTARY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=64)  # fmt: skip
ARCHITECTURES = {
    "llama": (hf.LlamaConfig, hf.LlamaForCausalLM, dict(ROTARY, num_key_value_heads=2)),
    "qwen2": (hf.Qwen2Config, hf.Qwen2ForCausalLM, dict(ROTARY, num_key_value_heads=2)),
    "pythia": (hf.GPTNeoXConfig, hf.GPTNeoXForCausalLM, ROTARY),
    "gpt-neo": (hf.GPTNeoConfig, hf.GPTNeoForCausalLM, dict(
        hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        max_position_embeddings=64, window_size=4)),
    "qwen3": (hf.Qwen3Config, hf.Qwen3ForCausalLM, dict(  # q/k norms after hook_q/hook_k
        ROTARY, num_key_value_heads=2, head_dim=8)),
    "mixtral": (hf.MixtralConfig, hf.MixtralForCausalLM, dict(  # mixture-of-experts MLPs
        ROTARY, num_key_value_heads=2, num_local_experts=2)),
    "falcon": (hf.FalconConfig, hf.FalconForCausalLM, dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
    "gpt-bigcode": (hf.GPTBigCodeConfig, hf.GPTBigCodeForCausalLM, dict(  # one key/value head
        n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gemma": (hf.GemmaConfig, hf.GemmaForCausalLM, dict(  # RMS norm scaling by 1 + weight
        ROTARY, num_key_value_heads=1, head_dim=8)),
    "bloom": (hf.BloomConfig, hf.BloomForCausalLM, dict(hidden_size=32, n_layer=2, n_head=4)),
    "opt": (hf.OPTConfig, hf.OPTForCausalLM, dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
        max_position_embeddings=64, word_embed_proj_dim=32)),
}  # fmt: skip
PARALLEL_SHARED_NORM = {  # parallel blocks whose MLP reads the attention's layer norm
    "gpt-j": (hf.GPTJConfig, hf.GPTJForCausalLM, dict(n_embd=32, n_layer=2, n_head=4,
                                                      n_positions=64, rotary_dim=4)),
    "phi": (hf.PhiConfig, hf.PhiForCausalLM, ROTARY),
}  # fmt: skip
ARCHITECTURES.update(PARALLEL_SHARED_NORM)
NOT_ON_TL3 = {  # what TransformerLens 3.x's own loader fails on
    "gemma": "TransformerLens 3.x converts no Gemma checkpoint it has no official name for",
    "falcon": "TransformerLens 3.x does not support FalconForCausalLM",
    "gpt-bigcode": "TransformerLens 3.x does not support GPTBigCodeForCausalLM",
    "phi": "TransformerLens 3.x reads PhiConfig.partial_rotary_factor, which transformers dropped",
}
NATIVE = {
    "native rotary": dict(positional_embedding_type="rotary", rotary_dim=4),
    "native q/k norm": dict(positional_embedding_type="rotary", rotary_dim=4, use_qk_norm=True,
                            normalization_type="RMS"),
}  # fmt: skip
if TL_MAJOR < 4:  # a natively booted 4.x bridge runs its blocks in sequence whatever cfg says
    NATIVE["native parallel"] = dict(parallel_attn_mlp=True)
TOKENS = torch.randint(1, 40, (6, 10), generator=torch.Generator().manual_seed(0))


def checkpoint(tmp_path_factory, name: str, table=ARCHITECTURES) -> str:
    config_class, model_class, config = table[name]
    # a neutral directory name: TransformerLens 3.x picks config branches by substrings of it
    path = tmp_path_factory.mktemp("checkpoint")
    return save_tiny_checkpoint(path, config_class, model_class, **config)


@pytest.fixture(scope="module", params=list(ARCHITECTURES) + list(NATIVE))
def model(request, tmp_path_factory):
    if TL_MAJOR < 4 and request.param in NOT_ON_TL3:
        pytest.skip(NOT_ON_TL3[request.param])
    if request.param in NATIVE:
        return freeze(build_native_model({**TINY, **NATIVE[request.param]}))
    return freeze(load_model(checkpoint(tmp_path_factory, request.param)))


def zeros(graph: EdgeGraph) -> dict[str, torch.Tensor]:
    return {b: torch.zeros(s) for b, s in graph.block_shapes().items()}


def test_rebuilt_readers_equal_the_models_own(model):
    clean = model(TOKENS)
    with tn.attach_edge_noise(model, calibration_tokens=TOKENS) as noise:
        assert noise.check_rebuild(TOKENS) <= 1e-5  # q/k/v, MLP inputs and the logits' input
        with noise.fixed(zeros(noise.graph)):
            torch.testing.assert_close(model(TOKENS), clean, rtol=1e-5, atol=1e-5)
        mib = {n for n, _ in graph_edges(mib_cfg(model))}
        if noise.graph.kv_heads is None:
            assert set(noise.graph.locate()) == mib
        else:  # a group's k/v edges carry its first query head's name
            assert set(noise.graph.locate()) < mib
    assert torch.equal(model(TOKENS), clean)


def test_ablating_a_writers_edges_is_mean_ablating_the_node(model):
    means = node_means(model, TOKENS)
    noise = tn.attach_edge_noise(model, calibration_tokens=TOKENS)
    try:
        for node in ("a0.h1", "m0", "a1.h3"):
            out = [e for e in noise.graph.locate() if e.startswith(f"{node}->")]
            sigmas = zeros(noise.graph)
            for edge in out:
                block, row, column = noise.graph.locate()[edge]
                sigmas[block][row, column] = 1.0
            with noise.fixed(sigmas):
                edges = model(TOKENS)
            noise.remove()
            reference = model.run_with_hooks(TOKENS, fwd_hooks=ablation_hooks(means, [node]))
            noise.attach()
            torch.testing.assert_close(edges, reference, rtol=1e-4, atol=1e-4)
    finally:
        noise.remove()


def test_parallel_blocks_mlps_read_no_head_of_their_own_layer():
    graph = EdgeGraph(2, 2, parallel=True)
    assert graph.block_shapes()["blocks.1.mlp.edges"] == (1, 4)  # input, a0.h0, a0.h1, m0
    assert EdgeGraph.from_config(graph.config()) == graph
    old = {k: v for k, v in graph.config().items() if k != "parallel"}  # runs saved before
    assert EdgeGraph.from_config(old) == EdgeGraph(2, 2)
    with pytest.raises(ValueError, match="parallel='yes' is not a bool"):
        EdgeGraph.from_config({**graph.config(), "parallel": "yes"})


@pytest.mark.skipif(TL_MAJOR < 4, reason="a natively booted 4.x bridge")
def test_a_model_that_is_not_what_its_cfg_says_is_refused_at_attach():
    """Natively booted, a 4.x bridge runs its blocks in sequence although cfg says parallel: the
    graph would rebuild its MLPs' inputs from the wrong writers."""
    model = freeze(build_native_model({**TINY, "parallel_attn_mlp": True}))
    clean = model(TOKENS)
    with pytest.raises(ValueError, match=r"parallel_attn_mlp=True\), but its MLP at blocks\.0\."):
        tn.attach_edge_noise(model, calibration_tokens=TOKENS)
    assert not model.hook_dict["blocks.0.attn.hook_q"].fwd_hooks  # nothing left attached
    assert torch.equal(model(TOKENS), clean)


@pytest.mark.skipif(TL_MAJOR < 4, reason="a Hugging Face-booted 4.x bridge")
def test_norms_after_the_attention_are_found_where_cfg_does_not_say_so(tmp_path_factory):
    """Gemma 2 normalises each attention and MLP output before adding it: a head's ``z W_O`` is
    not what it writes. Its bridge's cfg does not say so; the residual-sum check finds it. OLMo 2
    has only those norms (no ln1)."""
    gemma2 = (hf.Gemma2Config, hf.Gemma2ForCausalLM, dict(ROTARY, num_key_value_heads=2,
                                                          head_dim=8))  # fmt: skip
    model = freeze(load_model(checkpoint(tmp_path_factory, "gemma2", {"gemma2": gemma2})))
    assert not getattr(model.cfg, "use_normalization_before_and_after", False)
    with pytest.raises(ValueError, match=r"residual stream at blocks\.1\.hook_resid_pre is not"):
        tn.attach_edge_noise(model, calibration_tokens=TOKENS)
    assert not model.hook_dict["blocks.0.attn.hook_q"].fwd_hooks
    olmo2 = (hf.Olmo2Config, hf.Olmo2ForCausalLM, dict(ROTARY, num_key_value_heads=2))
    model = freeze(load_model(checkpoint(tmp_path_factory, "olmo2", {"olmo2": olmo2})))
    with pytest.raises(ValueError, match="block 0 has no ln1 although normalization_type='RMS'"):
        tn.attach_edge_noise(model, calibration_tokens=TOKENS)
    assert not model.hook_dict["blocks.0.attn.hook_q"].fwd_hooks


def test_a_reader_whose_hook_never_runs_is_refused():
    """An MLP input hook the model never runs: refused, naming it (not left unnoised)."""
    check = RebuildCheck(["blocks.0.attn.hook_q", "blocks.0.hook_mlp_in"], parallel=False)
    check.record("blocks.0.attn.hook_q", torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match=r"never ran \['blocks\.0\.hook_mlp_in'\]"):
        check.verify()


def test_a_norm_is_read_as_it_is_applied():
    """Parameters that reproduce the module are kept as they are; otherwise (a norm scaling by
    ``1 + weight``) the applied weight and bias are measured from its output."""

    class OnePlus(torch.nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.linspace(-0.5, 0.5, d))
            self.bias = torch.nn.Parameter(torch.linspace(0.1, 0.2, d))

        def forward(self, x):
            return torch.nn.functional.layer_norm(x, x.shape[-1:], 1 + self.weight, self.bias)

    module, plain = OnePlus(16), torch.nn.LayerNorm(16)
    norm = as_applied(module, Norm("LN", module.weight.detach(), module.bias.detach(), 1e-5))
    torch.testing.assert_close(norm.w, 1 + module.weight.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.b, module.bias.detach(), rtol=1e-5, atol=1e-5)
    kept = Norm("LN", plain.weight.detach(), plain.bias.detach(), 1e-5)
    assert as_applied(plain, kept) is kept


@pytest.mark.slow
def test_a_parallel_models_fit_exports_mibs_parallel_graph(tmp_path, tmp_path_factory):
    """The contract end to end on Pythia: fit, save the run, export MIB's JSON, whose cfg and
    edges are those of a parallel model, and read it back."""
    model = freeze(load_model(checkpoint(tmp_path_factory, "pythia")))
    mask = torch.zeros_like(TOKENS, dtype=torch.bool)
    mask[:, -3:] = True
    with tn.attach_edge_noise(model, calibration_tokens=TOKENS) as noise:
        tn.fit(model, noise, TOKENS, loss_mask=mask, steps=6, batch_size=3,
               run_dir=tmp_path / "run", quiet=True)  # fmt: skip
        scores = tn.edge_importance(noise)
    assert cli(["export", str(tmp_path / "run"), "--format", "mib", "--size", "7"]) == 0
    data = json.loads((tmp_path / "run" / "circuit.json").read_text())
    assert data["cfg"]["parallel_attn_mlp"] is True
    assert set(data["edges"]) == set(scores) == {n for n, _ in graph_edges(mib_cfg(model))}
    assert "a1.h0->m1" not in data["edges"] and "a0.h0->m1" in data["edges"]
    circuit = tn.load_circuit(tmp_path / "run" / "circuit.json")
    assert len(circuit.edges_in_graph) == 7
