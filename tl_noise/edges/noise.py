"""Edge noise: one learned std per writer -> reader edge, each reader's input rebuilt from its
writers.

A reader ``r`` (a head's q, k or v input, an MLP's input, the logits' input) normally reads the
residual stream ``x = b + sum_w c_w``, the sum of its upstream writers' contributions ``c_w``
(:mod:`tl_noise.edges.graph`) and constant biases ``b``. With edge noise it reads instead

.. math::  \\tilde x_r = x + \\sum_w \\sigma_{w r}\\,(\\mu_w - c_w)
            + \\sqrt{\\textstyle\\sum_w \\sigma_{w r}^2 s_w^2}\\;\\odot\\epsilon_r

(the *replacement* form: each edge carries ``(1 - sigma) c_w + sigma (mu_w + s_w eps)``, so
``sigma = 1`` resamples the writer from a Gaussian with its mean ``mu_w`` and per-dimension std
``s_w``), or ``x + sqrt(sum_w sigma^2 s_w^2) eps_r`` (the *additive* form). The independent
per-edge draws of one reader sum to the one Gaussian above, so a reader draws ``d_model`` numbers,
not one per edge. ``mu_w`` and ``s_w`` are calibrated on data with the noise off; a writer that
never varies has ``s_w = 0`` and ``mu_w = c_w``, so its edges carry no noise. Constant biases
(``b_O``, the layer norms' biases) carry no information and are never noised; an MLP's output
bias is part of its (constant) mean.

The rebuild is layer by layer: writers' ``mu_w - c_w`` are stored as they are produced, in one
``[tokens, writers, d_model]`` tensor per forward (:mod:`tl_noise.edges.store`), and each reader
group (a layer's q, k and v readers together, at the first of the three hooks; an MLP; the
logits) is rebuilt from its prefix chunk by chunk of tokens, in one autograd function that keeps
nothing of size ``tokens x readers x d_model`` (:mod:`tl_noise.edges.readers`). A head's rebuilt
input goes through ``ln1`` and its own ``W_Q``/``W_K``/``W_V`` (:mod:`tl_noise.edges.weights`),
replacing the model's ``hook_q``/``hook_k``/``hook_v``; an MLP's replaces its input before its
norm (:func:`~tl_noise.edges.weights.mlp_input`; ``use_hook_mlp_in`` is on while attached) and
the logits' the last block's ``hook_resid_post``. Nothing else in the residual stream changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_noise.devices import model_device
from tl_noise.edges.check import READER_HOOKS, RebuildCheck
from tl_noise.edges.draws import TokenDraw
from tl_noise.edges.graph import LOGITS_BLOCK, QKV, EdgeGraph, attn_block, mlp_block
from tl_noise.edges.readers import Group, Projection, chunk_tokens, read
from tl_noise.edges.store import BufferPool, WriterStore
from tl_noise.edges.weights import ReaderWeights, check_edge_model, mlp_input
from tl_noise.errors import TLNoiseValueError
from tl_noise.hooks.calibration import add_permanent_hook, default_probe_tokens, remove_hook
from tl_noise.hooks.noise_hooks import CORRUPTED_KEY, NOISE_KINDS, NoiseHooks
from tl_noise.hooks.owners import mark, owners
from tl_noise.noise.granularity import DEAD_UNIT_RTOL
from tl_noise.noise.layer import NoiseLayer


class EdgeNoise(NoiseHooks):
    """Edge noise attached to a model (see the module doc); built by
    :func:`~tl_noise.edges.attach_edge_noise`.

    Its layers are :class:`~tl_noise.noise.NoiseLayer` objects holding one std per edge of a
    reader group (``noise.layer("blocks.3.attn.edges").std()``: ``[3 n_heads, writers]``, or
    ``[n_heads + 2 kv_heads, writers]`` with grouped key/value heads), so
    the parameterizations, the optimiser groups, saving and :func:`tl_noise.fit` work as for
    node noise. ``writer_mean``/``writer_scale`` ``[n_writers, d_model]``: each writer's
    calibrated mean contribution and per-dimension std.
    """

    kind = "edges"
    writer_mean: Tensor
    writer_scale: Tensor

    def __init__(
        self,
        model: Any,
        layers: dict[str, NoiseLayer],
        graph: EdgeGraph,
        form: str = "replacement",
        seed: int | None = 0,
    ) -> None:
        super().__init__(model, layers, seed)
        check_edge_model(model)
        self.graph, self.form = graph, form
        d_model = int(model.cfg.d_model)
        self.register_buffer("writer_mean", torch.zeros(len(graph.writers), d_model))
        self.register_buffer("writer_scale", torch.zeros(len(graph.writers), d_model))
        self._weights: ReaderWeights | None = None
        self._resid: dict[int, Tensor] = {}
        self._store: WriterStore | None = None  # the writers' mu_w - c_w of this forward
        self._qkv: dict[int, Tensor] = {}  # layer -> its rebuilt q, k, v [b, p, rows, d_head]
        self._pool = BufferPool()  # the stores' large buffers, reused across forwards
        self._fixed: dict[str, Tensor] | None = None  # block -> sigma, no draws (ablations)
        self._check: RebuildCheck | None = None  # while checking the rebuild
        self._keep = False  # keep the writers' contributions after the forward (calibration)
        self._patch: Tensor | None = None  # [writers, batch, pos, d]: used instead of the means
        self._mlp_in_flag: bool | None = None

    # ------------------------------------------------------------ attachment
    def hook_points(self) -> list[tuple[str, Callable]]:
        """``(hook name, function)`` of every hook edge noise puts on the model."""
        n_layers = self.graph.n_layers
        points: list[tuple[str, Callable]] = []
        for layer in range(n_layers):
            points.append((f"blocks.{layer}.hook_resid_pre", self._resid_hook(layer)))
            for which, x in enumerate("qkv"):
                points.append((f"blocks.{layer}.attn.hook_{x}", self._qkv_hook(layer, which)))
            points.append((f"blocks.{layer}.attn.hook_z", self._z_hook(layer)))
            if self.graph.mlps:
                name, normed = mlp_input(self._model, layer, self.graph.parallel)
                points.append((name, self._mlp_in_hook(layer, name, normed)))
                points.append((f"blocks.{layer}.hook_mlp_out", self._mlp_out_hook(layer)))
        points.append((f"blocks.{n_layers - 1}.hook_resid_post", self._logits_hook()))
        return points

    def attach(self) -> EdgeNoise:
        """Put the noise on the model; ValueError if other tl-noise noise sits on its hooks."""
        if self.attached:
            return self
        self.remove()
        points = self.hook_points()
        taken = sorted(
            {n for n, _ in points if any(o is not self for o in owners(self._model.hook_dict[n]))}
        )
        if taken:
            raise TLNoiseValueError(
                f"hook point(s) {taken} already carry tl-noise noise; remove it first "
                "(noise.remove()): edge noise reads and rebuilds the whole residual stream"
            )
        self._weights = ReaderWeights.of(self._model, self.graph)
        if self.graph.mlps:
            self._mlp_in_flag = bool(getattr(self._model.cfg, "use_hook_mlp_in", False))
            self._model.set_use_hook_mlp_in(True)
        try:
            for name, fn in points:
                point = self._model.hook_dict[name]
                handle = add_permanent_hook(point, fn)
                self._handles.append((point, handle))
                mark(point, handle, self)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        while self._handles:
            remove_hook(*self._handles.pop())
        if self._mlp_in_flag is not None:
            self._model.set_use_hook_mlp_in(self._mlp_in_flag)
            self._mlp_in_flag = None
        self._clear()

    def free_buffers(self) -> None:
        """Give back the large buffers kept for the next forward (the writers' store and its
        gradient, :class:`~tl_noise.edges.store.BufferPool`); the next forward allocates them
        again."""
        self._pool.clear()

    def _clear(self) -> None:
        if self._store is not None:
            self._store.release()
        self._resid, self._store, self._qkv = {}, None, {}

    # --------------------------------------------------------------- rebuild
    def _active(self, block: str) -> bool:
        return self._fixed is not None or self.layer(block).mode != "off"

    def _sigma(self, block: str) -> Tensor:
        if self._fixed is not None:
            return self._fixed[block]
        return self.layer(block).std()

    def _read(self, block: str, x: Tensor, projection: Projection | None) -> Tensor:
        """The readers of ``block`` reading ``x`` (:func:`tl_noise.edges.readers.read`):
        ``[batch, pos, readers, d_head]`` with a ``projection``, else ``[..., d_model]``."""
        sigma = self._sigma(block)
        readers, n_writers = sigma.shape
        batch, pos, width = x.shape
        chunk = chunk_tokens(x.device, readers, width)
        std = draw = None
        if self._fixed is None and self.layer(block).mode == "sample":
            scale = self.writer_scale[:n_writers]
            std = (sigma.square() @ scale.square()).clamp_min(1e-30).sqrt()  # [readers, d_model]
            # a data-parallel rank draws the whole global batch's noise and keeps its rows;
            # the draws are made again in the backward, not kept (tl_noise.edges.draws)
            draw = TokenDraw(self.generator(x.device), x.device, batch, pos, readers, width,
                             chunk, self.layer(block).batch_shard)  # fmt: skip
        contract = self.form == "replacement" or self._fixed is not None
        return read(x, sigma, std, Group(self._store if contract else None, draw, projection,
                                         chunk))  # fmt: skip

    def _reference(self, first: int, n: int, like: Tensor) -> Tensor:
        """What writers ``first .. first + n`` are replaced by: their means ``[n, 1, 1, d]``, or
        the contributions of another input (:meth:`patched`) ``[n, batch, pos, d]``."""
        if self._patch is not None:
            return self._patch[first : first + n].to(like.dtype)
        return self.writer_mean[first : first + n, None, None, :].to(like.dtype)

    def _resid_hook(self, layer: int) -> Callable:
        def hook(x: Tensor, hook: Any, name: str = f"blocks.{layer}.hook_resid_pre") -> None:
            if layer == 0:
                self._clear()
                self._store = WriterStore(len(self.graph.writers), x, self._pool)
                self._store.write(self._reference(0, 1, x), x.unsqueeze(0))
            elif self._check is not None:
                self._check.record_residual(name, x, self._contributions())
            self._resid[layer] = x

        return hook

    def _qkv_hook(self, layer: int, which: int) -> Callable:
        block, name = attn_block(layer), f"blocks.{layer}.attn.hook_{QKV[which]}"
        rows = self.graph.qkv_rows(which)

        def hook(x: Tensor, hook: Any) -> Tensor | None:
            if not self._active(block):
                return None
            assert self._weights is not None
            if layer not in self._qkv:  # the layer's first of q, k, v: rebuild all three
                projection = self._weights.projections[layer]
                self._qkv[layer] = self._read(block, self._resid[layer], projection)
            out = self._qkv[layer][:, :, rows].to(x.dtype)
            if self._check is not None:
                self._check.record(name, out, x)
            return out

        return hook

    def _z_hook(self, layer: int) -> Callable:
        first = self.graph.upstream_of_layer(layer)

        def hook(z: Tensor, hook: Any) -> None:
            assert self._weights is not None and self._store is not None
            heads = self._weights.head_outputs(layer, z)  # [heads, b, p, d]
            self._store.write(self._reference(first, heads.shape[0], heads), heads)

        return hook

    def _reader_hook(self, block: str, name: str, normed: int | None = None) -> Callable:
        """A reader replacing the hook's input ``x``; ``normed``: an MLP reading the ``ln1`` of
        that layer, rebuilt from the layer's input and normed (:func:`mlp_input`)."""

        def read(x: Tensor, hook: Any) -> Tensor | None:
            if not self._active(block):
                return None
            base, norm = x, None
            if normed is not None and self._weights is not None:
                base, norm = self._resid[normed], self._weights.mlp_norms[normed]
            out = self._read(block, base, norm)[:, :, 0]
            if self._check is not None:
                self._check.record(name, out, x)
            return out

        return read

    def _mlp_in_hook(self, layer: int, name: str, normed: bool) -> Callable:
        read = self._reader_hook(mlp_block(layer), name, layer if normed else None)

        def hook(x: Tensor, hook: Any) -> Tensor | None:
            if self._check is not None and not normed:
                self._check.record_mlp_input(name, x, self._resid[layer])
            return read(x, hook)

        return hook

    def _mlp_out_hook(self, layer: int) -> Callable:
        index = self.graph.upstream_of_layer(layer) + self.graph.n_heads

        def hook(x: Tensor, hook: Any) -> None:
            assert self._store is not None
            self._store.write(self._reference(index, 1, x), x.unsqueeze(0))

        return hook

    def _logits_hook(self) -> Callable:
        name = f"blocks.{self.graph.n_layers - 1}.hook_resid_post"
        read = self._reader_hook(LOGITS_BLOCK, name)

        def hook(x: Tensor, hook: Any) -> Tensor | None:
            if self._check is not None:
                self._check.record_residual(name, x, self._contributions())
            out = read(x, hook)
            if not self._keep:
                self._clear()  # the forward's last reader: free the writers' contributions
            return out

        return hook

    # ------------------------------------------------------------- ablations
    @contextmanager
    def fixed(self, sigmas: dict[str, Tensor]) -> Iterator[EdgeNoise]:
        """Within the block every reader uses ``sigmas`` (``{block: [readers, writers]}``)
        without draws: ``sigma = 1`` mean-ablates an edge, ``0`` keeps it (any form)."""
        shapes = self.graph.block_shapes()
        for block, shape in shapes.items():
            if block not in sigmas or tuple(sigmas[block].shape) != shape:
                raise TLNoiseValueError(f"fixed sigmas need {block!r} shaped {list(shape)}")
        saved, self._fixed = self._fixed, dict(sigmas)
        try:
            yield self
        finally:
            self._fixed = saved

    @contextmanager
    def patched(self, contributions: Tensor) -> Iterator[EdgeNoise]:
        """Within the block an ablated edge carries ``contributions`` (``[writers, batch, pos,
        d_model]``, e.g. :meth:`contributions_of` a corrupted input) instead of the writer's
        mean: resample ablation, as in activation patching."""
        saved, self._patch = self._patch, contributions
        try:
            yield self
        finally:
            self._patch = saved

    @contextmanager
    def batch_context(self, batch: dict[str, Tensor]) -> Iterator[EdgeNoise]:
        """A fit's noised forward of ``batch``: with its :data:`CORRUPTED_KEY` tokens every
        edge is noised towards the writer's contribution on the example's counterfactual
        (:meth:`patched`, resample noise) instead of its mean."""
        corrupted = batch.get(CORRUPTED_KEY)
        if corrupted is None:
            yield self
            return
        with self.patched(self.contributions_of(corrupted)):
            yield self

    @torch.no_grad()
    def contributions_of(self, tokens: Int[Tensor, "b pos"]) -> Tensor:
        """Every writer's contribution ``c_w`` ``[writers, b, pos, d_model]`` on ``tokens``, with
        the noise off."""
        saved, self._fixed, self._keep, patch = self._fixed, None, True, self._patch
        self._patch = None
        try:
            with self.switched_off():
                self._model(tokens.to(self.writer_mean.device))
            # in the noise's own dtype: a resample fit computes this every step
            return self._contributions(self.writer_mean.dtype)
        finally:
            self._fixed, self._keep, self._patch = saved, False, patch
            self._clear()

    # ----------------------------------------------------------- calibration
    @torch.no_grad()
    def calibrate(self, tokens: Int[Tensor, "n pos"], batch_size: int = 16) -> None:
        """Each writer's mean contribution and per-dimension std on ``tokens`` (noise off);
        writers that never vary (std <= 1e-6 of the largest) get a std of 0."""
        sums = torch.zeros_like(self.writer_mean, dtype=torch.float64)
        squares = torch.zeros_like(sums)
        count = 0
        saved, self._fixed, self._keep = self._fixed, None, True
        try:
            with self.switched_off():
                for start in range(0, tokens.shape[0], batch_size):
                    batch = tokens[start : start + batch_size].to(self.writer_mean.device)
                    self._model(batch)
                    contributions = self._contributions()
                    sums += contributions.sum((1, 2))
                    squares += contributions.square().sum((1, 2))
                    count += batch.shape[0] * batch.shape[1]
        finally:
            self._fixed, self._keep = saved, False
            self._clear()
        mean = sums / count
        std = (squares / count - mean.square()).clamp_min(0).sqrt()
        dead = std.norm(dim=-1) <= DEAD_UNIT_RTOL * std.norm(dim=-1).max().clamp_min(1e-30)
        std[dead] = 0.0
        self.writer_mean.copy_(mean.to(self.writer_mean.dtype))
        self.writer_scale.copy_(std.to(self.writer_scale.dtype))
        self.calibration_source = "data"

    def _contributions(
        self, dtype: torch.dtype = torch.float64
    ) -> Float[Tensor, "writers batch pos d_model"]:
        """The last forward's writer contributions ``c_w`` (from the stored ``mu_w - c_w``)."""
        assert self._store is not None
        return self._store.contributions(self.writer_mean[:, None, None, :], dtype)

    @torch.no_grad()
    def check_rebuild(self, tokens: Int[Tensor, "n pos"] | None = None) -> float:
        """The largest relative difference between every rebuilt reader and the model's own
        with every edge kept; ValueError when the model computes a reader in a way tl-noise does
        not reproduce (:mod:`tl_noise.edges.check`)."""
        tokens = default_probe_tokens(self._model, n=2, pos=8) if tokens is None else tokens
        zeros = {b: torch.zeros(s, device=self.writer_mean.device)
                 for b, s in self.graph.block_shapes().items()}  # fmt: skip
        readers = [n for n, _ in self.hook_points() if n.endswith(READER_HOOKS)]
        self._check = check = RebuildCheck(readers, self.graph.parallel)
        try:
            with self.fixed(zeros):
                self._model(tokens.to(self.writer_mean.device))
        finally:
            self._check = None
        return check.verify()

    # ----------------------------------------------------------- importance
    def edge_scores(self) -> dict[str, float]:
        """``-log std`` of every edge, by MIB name, in forward order (blocks, readers, writers)."""
        out: dict[str, float] = {}
        for block, std in self.stds().items():
            logs = -std.double().clamp_min(1e-30).log()
            for row, names in enumerate(self.graph.edge_names(block)):
                out.update(zip(names, logs[row].tolist(), strict=True))
        return out

    def ranking_scores(self) -> dict[str, float]:
        return self.edge_scores()

    def std_node_scores(self) -> dict[str, float]:
        """A head's or MLP's score: the highest score of the edges it writes (a node matters as
        much as its most needed output), in node order."""
        best: dict[str, float] = {w: -float("inf") for w in self.graph.writers[1:]}
        for name, score in self.edge_scores().items():
            writer = name.split("->", 1)[0]
            if writer in best:
                best[writer] = max(best[writer], score)
        return best

    # ------------------------------------------------------------ save/load
    def config(self) -> dict[str, Any]:
        out = super().config()
        out.update(kind=self.kind, form=self.form, graph=self.graph.config())
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any], model: Any) -> EdgeNoise:
        """Rebuild (unattached, freshly initialised) edge noise for ``model`` from a config."""
        if not isinstance(config, dict) or not isinstance(config.get("hooks"), dict):
            raise TLNoiseValueError("malformed tl-noise edge noise config: no hooks")
        graph, own = EdgeGraph.from_config(config.get("graph")), EdgeGraph.of(model)
        if graph != own:
            raise TLNoiseValueError(f"the saved edge noise is for {graph.describe()}; the model "
                                    f"has {own.describe()}")  # fmt: skip
        shapes = graph.block_shapes()
        if list(config["hooks"]) != list(shapes) or config.get("order") != list(shapes):
            raise TLNoiseValueError("malformed tl-noise edge noise config: its blocks are not "
                                    f"the graph's ({list(shapes)[:3]}...)")  # fmt: skip
        layers = {}
        for block, shape in shapes.items():
            layer = NoiseLayer.from_config(config["hooks"][block], name=block)
            if layer.unit_shape != shape:
                raise TLNoiseValueError(f"edge block {block!r} is {list(layer.unit_shape)}; "
                                        f"the graph has {list(shape)}")  # fmt: skip
            layers[block] = layer
        noise = cls(model, layers, graph, config.get("form", "replacement"), config.get("seed", 0))
        noise.calibration_source = config.get("calibration_source", "none")
        scores, info = config.get("node_scores"), config.get("ranking_info")
        noise.node_scores = scores if isinstance(scores, dict) else None
        noise.ranking_info = info if isinstance(info, dict) else None
        return noise.to(model_device(model))


NOISE_KINDS["edges"] = EdgeNoise
