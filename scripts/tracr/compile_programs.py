"""Compile RASP programs with tracr and export them as benchmark models with exact labels.

tracr (and jax) are never a dependency of tl-noise. This script runs in its own environment,
``.venv-tracr`` (made by ``scripts/tracr/setup.sh``), compiles a few programs of
``tracr.compiler.lib`` and writes, per program, plain weights and labels that the package loads
with torch alone:

* ``OUT/NAME.safetensors``: float32 weights in the TransformerLens ``HookedTransformer`` layout
  (``embed.W_E``, ``pos_embed.W_pos``, ``blocks.{l}.attn.W_Q/b_Q/W_K/b_K/W_V/b_V/W_O/b_O``,
  ``blocks.{l}.mlp.W_in/b_in/W_out/b_out``, ``unembed.W_U/b_U``) and the check tensors
  ``check.tokens`` / ``check.outputs`` (int64 ``[n_check, n_ctx]``) and ``check.resid``
  (float32 ``[n_check, n_ctx, d_model]``, tracr's final residual stream);
* ``OUT/NAME.json``: the TransformerLens config, the vocabulary, and the ground-truth labels
  (live nodes with the RASP SOp they compute, and the edges through which information can flow,
  with the residual directions of each; see ``NOTES`` below).

The models are tracr's: no layer norm, ReLU MLPs, bidirectional attention scaled by
``1/sqrt(d_head)``, an input of ``BOS`` followed by exactly ``max_seq_len`` tokens (no padding).
``unembed.W_U`` is tracr's projection of the residual stream onto the output SOp times
``LOGIT_SCALE``: tracr decodes by argmax, the scale only sharpens the softmax of a differentiable
metric. Only programs with a categorical output are exported. The script checks that its own
reading of the weights reproduces tracr's outputs, and that tracr agrees with RASP's evaluator on
every check input, and fails loudly otherwise.

Rerun (deterministic; the SOp labels carry tracr's global expression ids, assigned in the order of
``PROGRAMS``)::

    scripts/tracr/setup.sh
    .venv-tracr/bin/python scripts/tracr/compile_programs.py [--out tl_noise/zoo/data/tracr]

Not exported: ``shuffle_dyck2`` (two bracket pairs) compiles to 8 layers of 4 heads with
``d_mlp`` 212-292 at ``max_seq_len`` 5-6, 1.0-1.4 MB of weights; ``shuffle_dyck`` (one pair)
stands in for it.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file
from tracr.compiler import (
    assemble,
    basis_inference,
    compiling,
    craft_graph_to_model,
    craft_model_to_transformer,
    expr_to_craft_graph,
    lib,
    nodes,
    rasp_to_graph,
)
from tracr.craft import bases, transformers
from tracr.rasp import rasp

LOGIT_SCALE = 10.0  # W_U = LOGIT_SCALE * tracr's residual -> output projection
N_CHECK = 64  # check inputs per program
SEED = 0  # numpy seed of the check inputs
THRESHOLD = 1e-6  # a residual direction is read / written when some |weight| along it exceeds this
MLP_EXACTNESS = 100
BOS, PAD = "BOS", "PAD"
CONSTANT_DIRECTIONS = frozenset({"one", f"{rasp.tokens.label}:{BOS}"})
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "tl_noise" / "zoo" / "data" / "tracr"
HEAD_PARAMS = ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O")  # per head (b_O is shared)
MLP_PARAMS = ("W_in", "b_in", "W_out", "b_out")
DIST_NAMES = ("tracr-pypi", "jax", "jaxlib", "dm-haiku", "chex", "numpy", "safetensors")

NOTES = (
    "Edges follow the residual directions of tracr's compiled model, in which every residual "
    "dimension is a named basis direction (residual_labels). A writer writes the directions "
    f"along which its output matrix has a weight above {THRESHOLD:g} in absolute value (input: the "
    "columns of W_E and W_pos; a head: the d_model columns of its W_O; an MLP: the columns of "
    "W_out); a reader reads the directions along which its input matrix has such a weight (the "
    "d_model rows of the head's W_Q, W_K or W_V, of the MLP's W_in, and of W_U for logits). An "
    "edge writer->reader of the graph (the writer upstream of the reader) is positive, i.e. in "
    "labels.edges, when the two sets of directions intersect; its value is the sorted list of "
    "the shared directions. All other edges of the graph carry nothing by construction. Reads "
    "of tracr's 'one' direction (MLP biases, default attention) and of 'tokens:BOS' (attention to "
    "BOS, which every tracr head uses as its default) count as edges; labels.constant_edges lists "
    "the positive edges whose only shared directions are these two, which carry no information "
    "about the input. Edges into a head whose selector uses Comparison.TRUE (see tracr.rasp) "
    "are positive too, although its scores do not depend on which token or index it reads. "
    "A node is live when some of its weights are nonzero: tracr pads every "
    "attention layer to the widest one with all-zero heads and leaves MLPs it does not need all "
    "zero. 'sop' names the RASP SOp a live node computes (from tracr's craft graph; several are "
    "joined by ', ' when tracr puts them in the same MLP; 'sops' lists them); a SelectorWidth "
    "takes a head and the MLP after it."
)


@dataclass(frozen=True)
class Program:
    make: Callable[[int], rasp.SOp]  # max_seq_len -> program
    vocab: tuple[Any, ...]
    max_seq_len: int
    unique_tokens: bool = False  # check inputs without repeated tokens (the program assumes it)


PROGRAMS: dict[str, Program] = {
    "reverse": Program(lambda n: lib.make_reverse(rasp.tokens), tuple("abcd"), 5),
    "sort_unique": Program(
        lambda n: lib.make_sort_unique(rasp.tokens, rasp.tokens),
        tuple(range(1, 9)),
        5,
        unique_tokens=True,
    ),
    "hist": Program(lambda n: lib.make_hist(), tuple("abc"), 5),
    "sort_freq": Program(lib.make_sort_freq, tuple("abc"), 5),
    "shuffle_dyck": Program(
        lambda n: lib.make_shuffle_dyck(["()"]).named("shuffle_dyck"), ("(", ")"), 6
    ),
}


# ---------------------------------------------------------------------------------------------
# Compilation and the SOp of every node


@dataclass
class Compiled:
    program: rasp.SOp
    model: assemble.AssembledTransformerModel
    sops: dict[str, list[str]]  # node name -> labels of the SOps it computes
    rasp: str


def _craft_pipeline(program: rasp.SOp, spec: Program) -> tuple[Any, Any, Any, Any]:
    """The steps of ``compile_rasp_to_model`` up to the craft model, keeping the graph."""
    extracted = rasp_to_graph.extract_rasp_graph(program)
    graph, sources, sink = extracted.graph, extracted.sources, extracted.sink
    basis_inference.infer_bases(graph, sink, set(spec.vocab), spec.max_seq_len)
    expr_to_craft_graph.add_craft_components_to_rasp_graph(
        graph,
        bos_dir=bases.BasisDirection(rasp.tokens.label, BOS),
        mlp_exactness=MLP_EXACTNESS,
    )
    allocation = dict(craft_graph_to_model._allocate_modules_to_layers(graph, sources))
    craft_model = craft_graph_to_model.craft_graph_to_model(graph, sources)
    return graph, sink, allocation, craft_model


def _node_sops(graph: Any, allocation: dict[str, int], craft_model: Any) -> dict[str, list[str]]:
    """Map every head and MLP of the assembled model to the SOps of the craft graph it computes.

    Mirrors ``craft_graph_to_model`` (blocks grouped by allocated half-layer, heads in node order)
    and ``assemble._get_model_config_and_module_names`` (half-layers placed in model layers).
    """
    by_half_layer: dict[int, list[tuple[str, Any]]] = collections.defaultdict(list)
    for node_id, half_layer in allocation.items():
        block = graph.nodes[node_id].get(nodes.MODEL_BLOCK)
        label = graph.nodes[node_id][nodes.EXPR].label
        if isinstance(block, transformers.SeriesWithResiduals):  # SelectorWidth: attn + MLP
            by_half_layer[half_layer].append((label, block.blocks[0]))
            by_half_layer[half_layer + 1].append((label, block.blocks[1]))
        elif block is not None:
            by_half_layer[half_layer].append((label, block))
    _, module_names = assemble._get_model_config_and_module_names(craft_model)
    groups = [by_half_layer[k] for k in sorted(by_half_layer)]
    if not len(groups) == len(module_names) == len(craft_model.blocks):
        raise RuntimeError("craft blocks and allocated half-layers do not line up")
    sops: dict[str, list[str]] = {}
    for group, module_name, block in zip(groups, module_names, craft_model.blocks, strict=True):
        layer = int(module_name.split("/")[1].removeprefix("layer_"))
        if module_name.endswith("/mlp"):
            sops[f"m{layer}"] = sorted({label for label, _ in group})
            continue
        heads = list(block.as_multi().heads())
        named = [(label, head) for label, sub in group for head in sub.as_multi().heads()]
        if len(named) != len(heads) or any(
            a is not b for (_, a), b in zip(named, heads, strict=True)
        ):
            raise RuntimeError(f"heads of {module_name} do not match the craft graph")
        for h, (label, _) in enumerate(named):
            sops[f"a{layer}.h{h}"] = [label]
    return sops


def _describe(graph: Any, sink: Any) -> str:
    """The RASP program, one expression per line, inputs first."""
    lines = []
    order = [graph.nodes[n][nodes.EXPR] for n in _topological(graph)]
    for expr in order:
        if expr.label in (rasp.tokens.label, rasp.indices.label):
            continue
        args = [c.label for c in expr.children]
        if isinstance(expr, rasp.Select):
            args = [f"keys={args[0]}", f"queries={args[1]}", str(expr.predicate)]
        kind = "" if isinstance(expr, rasp.Selector) else f" [{rasp.get_encoding(expr).value}]"
        lines.append(f"{expr.label} = {type(expr).__name__}({', '.join(args)}){kind}")
    lines.append(f"output: {sink[nodes.EXPR].label}")
    return "\n".join(lines)


def _topological(graph: Any) -> list[str]:
    import networkx as nx  # a tracr dependency

    return list(nx.lexicographical_topological_sort(graph))


def compile_program(name: str, spec: Program) -> Compiled | None:
    program = spec.make(spec.max_seq_len)
    if not rasp.is_categorical(program):
        print(f"[tracr] {name}: numerical output, skipped")
        return None
    model = compiling.compile_rasp_to_model(
        program,
        vocab=set(spec.vocab),
        max_seq_len=spec.max_seq_len,
        compiler_bos=BOS,
        compiler_pad=PAD,
        mlp_exactness=MLP_EXACTNESS,
    )
    graph, sink, allocation, craft_model = _craft_pipeline(program, spec)
    again = craft_model_to_transformer.craft_model_to_transformer(
        craft_model=craft_model,
        graph=graph,
        sink=sink,
        max_seq_len=spec.max_seq_len,
        compiler_bos=BOS,
        compiler_pad=PAD,
    )
    same = again.residual_labels == model.residual_labels and all(
        np.array_equal(np.asarray(again.params[m][p]), np.asarray(model.params[m][p]))
        for m in model.params
        for p in model.params[m]
    )
    if not same:
        raise RuntimeError(f"{name}: the annotated craft model is not the compiled one")
    sops = _node_sops(graph, allocation, craft_model)
    return Compiled(program, model, sops, _describe(graph, sink))


# ---------------------------------------------------------------------------------------------
# Weights in the TransformerLens layout


def tl_weights(c: Compiled) -> dict[str, np.ndarray]:
    model, cfg = c.model, c.model.model_config
    p = {
        m: {k: np.asarray(v, dtype=np.float32) for k, v in d.items()}
        for m, d in model.params.items()
    }
    d_model = len(model.residual_labels)
    n_heads, d_head = cfg.num_heads, cfg.key_size
    w: dict[str, np.ndarray] = {
        "embed.W_E": p["token_embed"]["embeddings"],
        "pos_embed.W_pos": p["pos_embed"]["embeddings"],
    }
    for layer in range(cfg.num_layers):
        attn, mlp = f"transformer/layer_{layer}/attn", f"transformer/layer_{layer}/mlp"
        for tl, tr in (("Q", "query"), ("K", "key"), ("V", "value")):
            mat = p[f"{attn}/{tr}"]["w"].reshape(d_model, n_heads, d_head)
            w[f"blocks.{layer}.attn.W_{tl}"] = mat.transpose(1, 0, 2)
            w[f"blocks.{layer}.attn.b_{tl}"] = p[f"{attn}/{tr}"]["b"].reshape(n_heads, d_head)
        w[f"blocks.{layer}.attn.W_O"] = p[f"{attn}/linear"]["w"].reshape(n_heads, d_head, d_model)
        w[f"blocks.{layer}.attn.b_O"] = p[f"{attn}/linear"]["b"]
        w[f"blocks.{layer}.mlp.W_in"] = p[f"{mlp}/linear_1"]["w"]
        w[f"blocks.{layer}.mlp.b_in"] = p[f"{mlp}/linear_1"]["b"]
        w[f"blocks.{layer}.mlp.W_out"] = p[f"{mlp}/linear_2"]["w"]
        w[f"blocks.{layer}.mlp.b_out"] = p[f"{mlp}/linear_2"]["b"]
    out_map = model.output_encoder.encoding_map
    w_u = np.zeros((d_model, len(out_map)), dtype=np.float32)
    for i, label in enumerate(model.residual_labels):
        for value, j in out_map.items():
            if label == f"{c.program.label}:{value}":
                w_u[i, j] = LOGIT_SCALE
    if np.count_nonzero(w_u) != len(out_map):
        raise RuntimeError("some output value has no residual direction")
    w["unembed.W_U"] = w_u
    w["unembed.b_U"] = np.zeros(len(out_map), dtype=np.float32)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items()}


# ---------------------------------------------------------------------------------------------
# Check inputs, run through tracr


def check_tensors(name: str, c: Compiled, spec: Program, w_u: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    enc = c.model.input_encoder.encoding_map
    rows = []
    for _ in range(N_CHECK):
        if spec.unique_tokens:
            pick = rng.permutation(len(spec.vocab))[: spec.max_seq_len]
        else:
            pick = rng.integers(len(spec.vocab), size=spec.max_seq_len)
        rows.append([spec.vocab[i] for i in pick])
    tokens = np.array([[enc[BOS]] + [enc[v] for v in row] for row in rows], dtype=np.int64)
    out = c.model.forward(c.model.params, jnp.asarray(tokens))
    resid = np.asarray(out.transformer_output.output, dtype=np.float32)
    outputs = np.asarray(out.unembedded_output, dtype=np.int64)
    decode = c.model.output_encoder.decode
    for row, got, x in zip(rows, outputs, tokens, strict=True):
        want = rasp.evaluate(c.program, row)
        if decode(got[1:].tolist()) != list(want):
            raise AssertionError(
                f"{name}: tracr {decode(got[1:].tolist())} != RASP {want} on {row}"
            )
        if c.model.apply([BOS, *row]).decoded[1:] != list(want):
            raise AssertionError(f"{name}: batched and single forward disagree on {x.tolist()}")
    mine = (resid @ w_u).argmax(-1)
    if not np.array_equal(mine[:, 1:], outputs[:, 1:]):
        raise AssertionError(f"{name}: argmax(resid @ W_U) is not tracr's decoded output")
    return {"check.tokens": tokens, "check.outputs": outputs, "check.resid": resid}


# ---------------------------------------------------------------------------------------------
# Labels


def _dirs(labels: Sequence[str], mask: np.ndarray) -> list[str]:
    return sorted(labels[i] for i in np.flatnonzero(mask))


def _big(a: np.ndarray, axis: int) -> np.ndarray:
    return np.asarray((np.abs(a) > THRESHOLD).any(axis=axis))


def _any(a: np.ndarray) -> bool:
    return bool((np.abs(a) > THRESHOLD).any())


def graph_labels(c: Compiled, w: dict[str, np.ndarray]) -> dict[str, Any]:
    cfg, res = c.model.model_config, c.model.residual_labels
    writes: dict[str, list[str]] = {
        "input": _dirs(res, _big(w["embed.W_E"], 0) | _big(w["pos_embed.W_pos"], 0))
    }
    reads: dict[str, list[str]] = {}
    node_info: dict[str, dict[str, Any]] = {}
    upstream: dict[str, list[str]] = {}  # reader -> writers upstream of it, in forward order
    writers = ["input"]
    for layer in range(cfg.num_layers):
        b = f"blocks.{layer}"
        heads = []
        for h in range(cfg.num_heads):
            head = f"a{layer}.h{h}"
            mats = {s: w[f"{b}.attn.W_{s.upper()}"][h] for s in "qkv"}
            for s, mat in mats.items():
                reads[f"{head}<{s}>"] = _dirs(res, _big(mat, 1))
                upstream[f"{head}<{s}>"] = list(writers)
            writes[head] = _dirs(res, _big(w[f"{b}.attn.W_O"][h], 0))
            live = any(_any(w[f"{b}.attn.{k}"][h]) for k in HEAD_PARAMS)
            node_info[head] = _node(live, c.sops.get(head))
            heads.append(head)
        mlp = f"m{layer}"
        reads[mlp] = _dirs(res, _big(w[f"{b}.mlp.W_in"], 1))
        upstream[mlp] = writers + heads
        writes[mlp] = _dirs(res, _big(w[f"{b}.mlp.W_out"], 0))
        live = any(_any(w[f"{b}.mlp.{k}"]) for k in MLP_PARAMS)
        node_info[mlp] = _node(live, c.sops.get(mlp))
        writers = [*writers, *heads, mlp]
    reads["logits"] = _dirs(res, _big(w["unembed.W_U"], 1))
    upstream["logits"] = list(writers)
    for node, info in node_info.items():  # a node tracr fills is live, and only those
        if info["live"] != (node in c.sops):
            raise RuntimeError(f"{node}: live={info['live']} but craft SOps {c.sops.get(node)}")

    edges: dict[str, list[str]] = {}
    n_graph_edges = 0
    for reader, ups in upstream.items():
        for writer in ups:
            n_graph_edges += 1
            shared = sorted(set(writes[writer]) & set(reads[reader]))
            if shared:
                edges[f"{writer}->{reader}"] = shared
    constant = sorted(e for e, d in edges.items() if set(d) <= CONSTANT_DIRECTIONS)
    return {
        "nodes": node_info,
        "edges": edges,
        "constant_edges": constant,
        "n_graph_edges": n_graph_edges,
        "residual_labels": list(res),
        "writes": writes,
        "reads": reads,
        "threshold": THRESHOLD,
        "notes": NOTES,
    }


def _node(live: bool, sops: list[str] | None) -> dict[str, Any]:
    sops = sops or []
    return {"live": bool(live), "sop": ", ".join(sops) if sops else None, "sops": sops}


# ---------------------------------------------------------------------------------------------
# Export


def export(name: str, spec: Program, out: Path) -> dict[str, Any] | None:
    c = compile_program(name, spec)
    if c is None:
        return None
    w = tl_weights(c)
    w.update(check_tensors(name, c, spec, w["unembed.W_U"]))
    cfg = c.model.model_config
    in_map, out_map = c.model.input_encoder.encoding_map, c.model.output_encoder.encoding_map
    config = {
        "n_layers": cfg.num_layers,
        "d_model": len(c.model.residual_labels),
        "n_heads": cfg.num_heads,
        "d_head": cfg.key_size,
        "d_mlp": cfg.mlp_hidden_size,
        "d_vocab": len(in_map),
        "d_vocab_out": len(out_map),
        "n_ctx": spec.max_seq_len + 1,
        "act_fn": "relu",
        "normalization_type": None,
        "attention_dir": "bidirectional",
        "positional_embedding_type": "standard",
    }
    if w["embed.W_E"].shape != (config["d_vocab"], config["d_model"]) or w[
        "pos_embed.W_pos"
    ].shape != (config["n_ctx"], config["d_model"]):
        raise RuntimeError(f"{name}: embedding shapes do not match the config")
    data = {
        "kind": "tracr",
        "program": name,
        "vocab": [str(v) for v in spec.vocab],
        "input_ids": {str(v): i for v, i in in_map.items()},
        "output_ids": {str(v): i for v, i in out_map.items()},
        "bos": in_map[BOS],
        "pad": in_map[PAD],
        "max_seq_len": spec.max_seq_len,
        "logit_scale": LOGIT_SCALE,
        "unique_tokens": spec.unique_tokens,
        "output_sop": c.program.label,
        "check": {"n": N_CHECK, "seed": SEED},
    }
    record = {
        "name": name,
        "script": "scripts/tracr/compile_programs.py",
        "config": config,
        "data": data,
        "labels": graph_labels(c, w),
        "tracr": {
            "versions": {d: importlib.metadata.version(d) for d in DIST_NAMES}
            | {"python": platform.python_version()},
            "compile": {
                "causal": False,
                "compiler_bos": BOS,
                "compiler_pad": PAD,
                "mlp_exactness": MLP_EXACTNESS,
            },
            "rasp": c.rasp,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(w, str(out / f"{name}.safetensors"), metadata={"format": "pt"})
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)
    for name, spec in PROGRAMS.items():
        record = export(name, spec, args.out)
        if record is None:
            continue
        cfg, labels = record["config"], record["labels"]
        live = sum(n["live"] for n in labels["nodes"].values())
        print(
            f"[tracr] {name}: layers {cfg['n_layers']} heads {cfg['n_heads']} "
            f"d_model {cfg['d_model']} d_mlp {cfg['d_mlp']} d_vocab {cfg['d_vocab']} "
            f"d_vocab_out {cfg['d_vocab_out']} n_ctx {cfg['n_ctx']}; live nodes {live}/"
            f"{len(labels['nodes'])}; edges {len(labels['edges'])}/{labels['n_graph_edges']} "
            f"({len(labels['constant_edges'])} constant-only)"
        )


if __name__ == "__main__":
    main()
