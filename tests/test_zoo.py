"""The zoo's benchmark models (``tl_noise/zoo/data``) load cheaply, have their labelled structure.

Everything is measured here on fresh data (task seed ``TASK_SEED``, not the training script's
evaluation seed) in the installed TransformerLens major (``tl3`` marker: 3.x too); nothing is
trained. Ablation is mean ablation as in the labels: a head's ``hook_z`` (an MLP's
``hook_mlp_out``) replaced by its mean over the task's examples and positions; the metric is the
task's, the mean ``-log p`` of the true next token at the target positions.

The thresholds are set well inside the values measured on the shipped files (noted beside each,
``n = N_TASK`` sequences); a retrained model that keeps its design passes, one that loses it
(no backup, a useful "distractor", an MLP-free solution) fails.
"""

from __future__ import annotations

import itertools
import shutil
import time

import pytest
import torch

from tl_noise.tasks import Task
from tl_noise.zoo import DATA_DIR, Benchmark, list_benchmarks, load_benchmark

pytestmark = pytest.mark.tl3

N_TASK = 256
TASK_SEED = 1234
SHIPPED = ("backup", "distractor", "mlp")
MAX_FILE_BYTES = 1_000_000  # each NAME.safetensors (measured: 0.43 - 0.65 MB)
MAX_LOAD_SECONDS = 5.0  # load_benchmark after the first import (measured: 0.03 - 0.05 s idle)
LABEL_TOLERANCE = 0.15  # nats: single-node effects on fresh data vs the stored labels

# Measured on the shipped files with N_TASK = 256, TASK_SEED = 1234 (TransformerLens 4.3):
# clean task loss: induction 0.21, backup 0.22, distractor 0.08, mlp 0.52 (its floor is ~0.5:
# 10 % of the c tokens are uniform); the counterfactual inputs raise it to 4.4 - 13 nats.
CLEAN_LOSS = {"induction": 0.4, "backup": 0.6, "distractor": 0.5, "mlp": 0.8}
# backup: primary a2.h2 alone 0.13, its backups a2.h0 / a2.h1 / a2.h3 alone 0.05 - 0.11, the
# primary with one of them 0.66 - 1.24, all four copying heads 4.96.
BACKUP_SINGLE = 0.3
BACKUP_JOINT_GAIN = 0.3  # joint minus the larger single effect (measured 0.53 - 1.11)
BACKUP_GROUP = 1.5
# distractor: circuit heads a0.h0 0.30, a0.h2 4.73, a2.h0 0.28 (writes 1.3, 2.7, 6.2); the
# distractors a2.h1 / a2.h2 / a2.h3 0.07 / 0.01 / 0.07 (all three together 0.18) with writes
# 3.7 - 4.2 (1.4x the median circuit head's) and text-loss effects 0.13 / 0.38 / 0.35.
DISTRACTOR_CIRCUIT_EFFECT = 0.2
DISTRACTOR_EFFECT = 0.1
DISTRACTOR_JOINT_EFFECT = 0.3
DISTRACTOR_WRITE = 1.0  # times the median circuit head's write RMS at the target positions
DISTRACTOR_TEXT_EFFECT = 0.05
# mlp: m0 2.89, m1 4.83, m2 1.26, all three 4.26; the movers a0.h0 / a0.h3 1.26 / 1.17 with a
# write RMS of 0.17 / 0.20 against 2.67 for the busiest head; with the MLPs ablated, ablating a
# mover adds 0.01 - 0.02.
MLP_EFFECT = 0.5
MLP_ALL_EFFECT = 2.5
MLP_MOVER_EFFECT = 0.5
MLP_MOVER_WRITE = 0.25  # times the largest head write RMS
MLP_MEDIATED = 0.1


@pytest.fixture(scope="module")
def benches() -> dict[str, Benchmark]:
    return {name: load_benchmark(name) for name in list_benchmarks()}


@pytest.fixture(scope="module")
def tasks(benches) -> dict[str, Task]:
    return {name: bench.task(n=N_TASK, seed=TASK_SEED) for name, bench in benches.items()}


def node_names(model) -> list[str]:
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = [f"a{lay}.h{h}" for lay in range(n_layers) for h in range(n_heads)]
    mlps = [] if model.cfg.attn_only else [f"m{lay}" for lay in range(n_layers)]
    return heads + mlps


class Ablator:
    """The task metric with sets of nodes mean-ablated (means over the task's tokens)."""

    def __init__(self, bench: Benchmark, task: Task) -> None:
        self.model, self.task = bench.model, task
        self.batch = task.batch(torch.arange(len(task)))
        with torch.no_grad():
            logits, cache = self.model.run_with_cache(task.tokens)
        self.clean = task.metric(logits, self.batch).item()
        self.cache = cache
        self.means = {k: v.mean((0, 1)) for k, v in cache.items()
                      if k.endswith(("attn.hook_z", "hook_mlp_out"))}  # fmt: skip

    def hooks(self, nodes) -> list:
        heads: dict[int, list[int]] = {}
        hooks = []
        for node in nodes:
            if node.startswith("m"):
                name = f"blocks.{node[1:]}.hook_mlp_out"
                hooks.append((name, lambda x, hook, m=self.means[name]: m.expand_as(x).clone()))
            else:
                layer, head = node[1:].split(".h")
                heads.setdefault(int(layer), []).append(int(head))
        for layer, hs in heads.items():
            name = f"blocks.{layer}.attn.hook_z"

            def hook(z, hook, hs=hs, m=self.means[name]):
                z = z.clone()
                z[:, :, hs] = m[hs]
                return z

            hooks.append((name, hook))
        return hooks

    def effect(self, *nodes: str) -> float:
        """Metric increase (nats) with ``nodes`` mean-ablated together."""
        with torch.no_grad():
            logits = self.model.run_with_hooks(self.task.tokens, fwd_hooks=self.hooks(nodes))
        return self.task.metric(logits, self.batch).item() - self.clean

    def write_rms(self, node: str) -> float:
        """RMS over the target positions of a head's centred output ``(z - mean z) W_O``."""
        layer, head = (int(x) for x in node[1:].split(".h"))
        z = self.cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
        w_o = self.model.blocks[layer].attn.W_O[head]
        write = ((z - z.mean((0, 1))) @ w_o).norm(dim=-1)
        return write[self.task.loss_mask].pow(2).mean().sqrt().item()


@pytest.fixture(scope="module")
def ablators(benches, tasks) -> dict[str, Ablator]:
    return {name: Ablator(benches[name], tasks[name]) for name in benches}


def structure(bench: Benchmark, role: str) -> list[str]:
    return list(bench.labels["structure"][role])


# ------------------------------------------------------------------------- loading and tasks
def test_list_benchmarks_names_every_shipped_model():
    names = list_benchmarks()
    assert names[0] == "induction" and set(SHIPPED) <= set(names)
    for name in SHIPPED:
        size = (DATA_DIR / f"{name}.safetensors").stat().st_size
        assert size < MAX_FILE_BYTES, (name, size)
        assert (DATA_DIR / f"{name}.json").is_file()


def test_loading_is_cheap(benches):
    for name in list_benchmarks():
        start = time.perf_counter()
        bench = load_benchmark(name)
        seconds = time.perf_counter() - start
        assert seconds < MAX_LOAD_SECONDS, (name, seconds)
        assert not any(p.requires_grad for p in bench.model.parameters())


def test_unknown_benchmark_and_bad_n_are_rejected(benches):
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("nope")
    with pytest.raises(ValueError, match="n="):
        benches["mlp"].task(n=0)


@pytest.mark.parametrize("name", ["induction", *SHIPPED])
def test_task_contract(benches, name):
    bench = benches[name]
    task = bench.task(n=32, seed=5)
    n_ctx = bench.model.cfg.n_ctx
    assert task.tokens.shape == (32, n_ctx) and task.loss_mask.shape == (32, n_ctx)
    assert (task.tokens[:, 0] == 0).all() and task.loss_mask.any(1).all()
    assert not task.loss_mask[:, -1].any()  # nothing follows the last position
    assert 0 <= task.tokens.min() and task.tokens.max() < bench.model.cfg.d_vocab
    corrupted = bench.corrupted_tokens(task)
    assert corrupted.shape == task.tokens.shape and (corrupted[:, 0] == 0).all()
    assert (corrupted != task.tokens).float().mean() > 0.5
    again = bench.task(n=32, seed=5)
    assert torch.equal(again.tokens, task.tokens) and torch.equal(again.loss_mask, task.loss_mask)
    assert not torch.equal(bench.task(n=32, seed=6).tokens, task.tokens)


@pytest.mark.parametrize("name", SHIPPED)
def test_copy_layout_is_shared_by_the_counterfactual(benches, name):
    bench = benches[name]
    task = bench.task(n=64, seed=3)
    corrupted = bench.corrupted_tokens(task)
    if "layout" not in task.extras:  # lookup: the layout is fixed
        return
    for tokens in (task.tokens, corrupted):
        for row, (r, s, length) in zip(tokens, task.extras["layout"].tolist(), strict=True):
            assert torch.equal(row[s : s + length], row[r : r + length])


@pytest.mark.parametrize("name", ["induction", *SHIPPED])
def test_model_does_the_task_and_the_counterfactual_breaks_it(benches, tasks, ablators, name):
    task, model = tasks[name], benches[name].model
    with torch.no_grad():
        corrupt = task.metric(model(benches[name].corrupted_tokens(task)), ablators[name].batch)
    clean = ablators[name].clean
    assert clean < CLEAN_LOSS[name], clean
    assert corrupt.item() > clean + 2.0, (clean, corrupt.item())


@pytest.mark.parametrize("name", SHIPPED)
def test_labels_name_every_node_and_match_fresh_ablations(benches, ablators, name):
    bench = benches[name]
    nodes = node_names(bench.model)
    assert list(bench.labels["nodes"]) == nodes and len(nodes) == 15
    for node in nodes:
        stored = bench.labels["nodes"][node]["mean_ablation"]
        fresh = ablators[name].effect(node)
        assert abs(fresh - stored) < LABEL_TOLERANCE + 0.1 * abs(stored), (node, stored, fresh)
    roles = bench.labels["structure"]
    assert all(set(v) <= set(nodes) for v in roles.values()), roles


# ------------------------------------------------------------------------- designed structure
def off_mask_loss(ablator: Ablator, *nodes: str) -> float:
    """Next-token loss at the text positions (not the target ones) with ``nodes`` ablated."""
    task = ablator.task
    text = ~task.loss_mask
    text[:, -1] = False
    if "layout" in task.extras:  # leave out the unpredictable source span and first copy
        t = torch.arange(task.tokens.shape[1])[None, :]
        r, s, length = (task.extras["layout"][:, i : i + 1] for i in range(3))
        text &= ~((t + 1 >= r) & (t + 1 < r + length)) & (t + 1 != s)
    with torch.no_grad():
        logits = ablator.model.run_with_hooks(task.tokens, fwd_hooks=ablator.hooks(nodes))
    batch = {"tokens": task.tokens, "loss_mask": text}
    return task.metric(logits, batch).item()


def test_backup_heads_take_over_from_the_primary(benches, ablators):
    bench, ab = benches["backup"], ablators["backup"]
    (primary,) = structure(bench, "primary")
    backups = structure(bench, "backup")
    assert backups
    single_p = ab.effect(primary)
    assert single_p < BACKUP_SINGLE, single_p
    for head in backups:
        single_b, joint = ab.effect(head), ab.effect(primary, head)
        assert single_b < BACKUP_SINGLE, (head, single_b)
        gain = joint - max(single_p, single_b)
        assert gain > BACKUP_JOINT_GAIN, (head, single_p, single_b, joint)
    # the whole copying group carries the task: single-node scores under-rank every member
    group = ab.effect(*structure(bench, "copying"))
    assert group > BACKUP_GROUP, group


def test_distractor_heads_are_busy_but_irrelevant_to_the_task(benches, ablators):
    bench, ab = benches["distractor"], ablators["distractor"]
    distractors = structure(bench, "distractor")
    circuit_heads = [n for n in structure(bench, "circuit") if n.startswith("a")]
    assert distractors and circuit_heads
    smallest_circuit_effect = min(ab.effect(h) for h in circuit_heads)
    assert smallest_circuit_effect > DISTRACTOR_CIRCUIT_EFFECT, smallest_circuit_effect
    median_circuit_write = sorted(ab.write_rms(h) for h in circuit_heads)[len(circuit_heads) // 2]
    base_text = off_mask_loss(ab)
    for head in distractors:
        assert abs(ab.effect(head)) < DISTRACTOR_EFFECT, (head, ab.effect(head))
        assert ab.write_rms(head) > DISTRACTOR_WRITE * median_circuit_write, head
        # busy: they carry the n-gram statistics of the text around the copied span
        assert off_mask_loss(ab, head) - base_text > DISTRACTOR_TEXT_EFFECT, head
    assert abs(ab.effect(*distractors)) < DISTRACTOR_JOINT_EFFECT


def test_mlp_model_needs_its_mlps(benches, ablators):
    bench, ab = benches["mlp"], ablators["mlp"]
    needed = structure(bench, "mlp_needed")
    assert needed
    for mlp in needed:
        assert ab.effect(mlp) > MLP_EFFECT, (mlp, ab.effect(mlp))
    assert ab.effect(*[f"m{lay}" for lay in range(bench.model.cfg.n_layers)]) > MLP_ALL_EFFECT
    # The heads that bring ``a`` forward matter as much as the MLP reading them, yet write little:
    # an activation-size ranking puts them last.
    writes = {h: ab.write_rms(h) for h in node_names(bench.model) if h.startswith("a")}
    movers = structure(bench, "movers")
    assert movers and set(movers) <= set(structure(bench, "heads_needed"))
    mlps = [f"m{lay}" for lay in range(bench.model.cfg.n_layers)]
    without_mlps = ab.effect(*mlps)
    for head in movers:
        assert ab.effect(head) > MLP_MOVER_EFFECT, head
        assert writes[head] < MLP_MOVER_WRITE * max(writes.values()), (head, writes)
        # no direct effect: once the MLPs are gone, the mover no longer matters
        assert ab.effect(*mlps, head) - without_mlps < MLP_MEDIATED, head


def test_single_node_ablation_ranks_differ_from_joint_importance(benches):
    """On ``backup`` the top single-node scores miss the copying heads, which jointly matter."""
    bench = benches["backup"]
    nodes = node_names(bench.model)
    single = {n: bench.labels["nodes"][n]["mean_ablation"] for n in nodes}
    copying = set(structure(bench, "copying"))
    top = sorted(nodes, key=lambda n: -single[n])[: len(copying)]
    assert len(copying & set(top)) < len(copying), (top, copying)
    assert all(k in bench.labels["pairs"] for k in map("+".join, itertools.combinations(nodes, 2)))


def test_a_benchmark_loads_from_another_folder(tmp_path):
    for suffix in (".json", ".safetensors"):
        shutil.copy(DATA_DIR / f"mlp{suffix}", tmp_path / f"mlp-heldout{suffix}")
    held = load_benchmark("mlp-heldout", folder=tmp_path)
    shipped = load_benchmark("mlp")
    tokens = shipped.task(n=4, seed=0).tokens
    assert torch.equal(held.model(tokens), shipped.model(tokens))
    with pytest.raises(ValueError, match="no benchmark 'nope'"):
        load_benchmark("nope", folder=tmp_path)
