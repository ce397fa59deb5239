"""The edges of a transformer's computational graph, as MIB names them, and how they are stored.

*Writers* add to the residual stream: ``input`` (token and position embeddings: the residual
stream before block 0), every head ``a{l}.h{h}`` (its ``z W_O``, without ``b_O``) and every MLP
``m{l}`` (its output). *Readers* read it: each head's ``<q>``, ``<k>`` and ``<v>`` input, each MLP's
input, and ``logits``. An edge ``writer->reader`` exists when the writer is upstream of the reader
(a head reads every writer of earlier layers; an MLP also reads the heads of its own layer,
except in parallel attention/MLP blocks, where both read the block's input, as MIB's graph has
it).

Writers are numbered in forward order (``input``, then per layer its heads and its MLP), so the
writers of any reader are a prefix of that list. The learned stds live in one block per group of
readers that share their writers: ``blocks.{l}.attn.edges`` ``[3 n_heads, W_l]`` (rows: the
``q`` readers of heads ``0..H-1``, then the ``k`` readers, then the ``v`` readers),
``blocks.{l}.mlp.edges`` ``[1, W_l + n_heads]`` (``[1, W_l]`` when parallel) and
``logits.edges`` ``[1, W]``, where ``W_l`` is the number of writers upstream of layer ``l``.

>>> graph = EdgeGraph(n_layers=2, n_heads=2, mlps=True)
>>> graph.writers
['input', 'a0.h0', 'a0.h1', 'm0', 'a1.h0', 'a1.h1', 'm1']
>>> graph.block_shapes()["blocks.1.attn.edges"], graph.n_edges
((6, 4), 46)
>>> graph.edge_name("blocks.1.attn.edges", 3, 2)
'a0.h1->a1.h1<k>'
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from tl_noise.errors import TLNoiseValueError
from tl_noise.hooks.ablation import has_mlps
from tl_noise.names import head_node, mlp_node

QKV = "qkv"
LOGITS_BLOCK = "logits.edges"


def attn_block(layer: int) -> str:
    return f"blocks.{layer}.attn.edges"


def mlp_block(layer: int) -> str:
    return f"blocks.{layer}.mlp.edges"


@dataclass(frozen=True)
class EdgeGraph:
    """The writers, readers and edges of a model with ``n_layers`` blocks of ``n_heads`` heads
    (and an MLP per block when ``mlps``; ``parallel``: attention and MLP read the same block
    input, so an MLP reads no head of its own layer).

    With grouped-query attention (``kv_heads < n_heads``), the heads of a key/value group share
    their k and v inputs: the ``<k>``/``<v>`` reader of group ``g`` is named by the group's first
    query head, ``a{l}.h{g * n_heads // kv_heads}<k>``.
    """

    n_layers: int
    n_heads: int
    mlps: bool = True
    kv_heads: int | None = None  # None: one key/value head per query head
    parallel: bool = False

    @classmethod
    def of(cls, model: Any) -> EdgeGraph:
        """The graph of a TransformerLens model (its layers, heads, MLPs, key/value heads)."""
        cfg = model.cfg
        kv = getattr(cfg, "n_key_value_heads", None)
        kv_heads = None if kv in (None, cfg.n_heads) else int(kv)
        mlps = has_mlps(model)
        parallel = mlps and bool(getattr(cfg, "parallel_attn_mlp", False))
        return cls(int(cfg.n_layers), int(cfg.n_heads), mlps, kv_heads, parallel)

    def config(self) -> dict[str, Any]:
        """The graph as saved with edge noise (:meth:`from_config` reads it back)."""
        return {"n_layers": self.n_layers, "n_heads": self.n_heads, "mlps": self.mlps,
                "kv_heads": self.kv_heads, "parallel": self.parallel}  # fmt: skip

    @classmethod
    def from_config(cls, config: Any) -> EdgeGraph:
        """The graph of a saved :meth:`config` (runs saved before ``parallel`` existed are
        sequential); ValueError naming what is malformed."""
        if not isinstance(config, dict):
            raise TLNoiseValueError("malformed tl-noise edge noise config: no graph")
        try:
            kv, parallel = config.get("kv_heads"), config.get("parallel", False)
            if not isinstance(parallel, bool):
                raise TypeError(f"parallel={parallel!r} is not a bool")
            return cls(int(config["n_layers"]), int(config["n_heads"]), bool(config["mlps"]),
                       None if kv is None else int(kv), parallel)  # fmt: skip
        except (KeyError, TypeError, ValueError) as err:
            raise TLNoiseValueError(f"malformed tl-noise edge noise config: graph {err!r}") from err

    def describe(self) -> str:
        """``"2 layers x 4 heads"``, then what else sets the edges (key/value heads, MLPs)."""
        out = f"{self.n_layers} layers x {self.n_heads} heads"
        if self.kv_heads is not None:
            out += f" ({self.kv_heads} key/value heads)"
        return out + (", no MLPs" if not self.mlps else ", parallel MLPs" if self.parallel
                      else ", MLPs")  # fmt: skip

    @property
    def kv(self) -> int:
        """Key/value readers per kind and layer."""
        return self.n_heads if self.kv_heads is None else self.kv_heads

    def qkv_rows(self, which: int) -> slice:
        """The rows of a layer's attention block read by ``q`` (0), ``k`` (1) or ``v`` (2)."""
        if which == 0:
            return slice(0, self.n_heads)
        start = self.n_heads + (which - 1) * self.kv
        return slice(start, start + self.kv)

    @property
    def per_layer(self) -> int:
        """Writers each block adds: its heads, and its MLP."""
        return self.n_heads + int(self.mlps)

    @cached_property
    def writers(self) -> list[str]:
        out = ["input"]
        for layer in range(self.n_layers):
            out += [head_node(layer, h) for h in range(self.n_heads)]
            if self.mlps:
                out.append(mlp_node(layer))
        return out

    def upstream_of_layer(self, layer: int) -> int:
        """How many writers a head of ``layer`` reads (``input`` and every earlier block)."""
        return 1 + layer * self.per_layer

    def blocks(self) -> list[str]:
        """The std blocks in forward order."""
        out = []
        for layer in range(self.n_layers):
            out.append(attn_block(layer))
            if self.mlps:
                out.append(mlp_block(layer))
        return out + [LOGITS_BLOCK]

    def block_shapes(self) -> dict[str, tuple[int, int]]:
        """``{block: (readers, writers)}``."""
        shapes = {}
        for layer in range(self.n_layers):
            upstream = self.upstream_of_layer(layer)
            shapes[attn_block(layer)] = (self.n_heads + 2 * self.kv, upstream)
            if self.mlps:
                shapes[mlp_block(layer)] = (1, upstream + (0 if self.parallel else self.n_heads))
        shapes[LOGITS_BLOCK] = (1, len(self.writers))
        return shapes

    @property
    def n_edges(self) -> int:
        return sum(r * w for r, w in self.block_shapes().values())

    def readers(self, block: str) -> list[str]:
        """MIB names of a block's readers, in row order."""
        if block == LOGITS_BLOCK:
            return ["logits"]
        layer = int(block.split(".")[1])
        if block.endswith(".mlp.edges"):
            return [mlp_node(layer)]
        group = self.n_heads // self.kv
        heads = {"q": range(self.n_heads), "k": range(0, self.n_heads, group)}
        heads["v"] = heads["k"]
        return [f"{head_node(layer, h)}<{x}>" for x in QKV for h in heads[x]]

    def edge_name(self, block: str, row: int, column: int) -> str:
        return f"{self.writers[column]}->{self.readers(block)[row]}"

    def edge_names(self, block: str) -> list[list[str]]:
        """``[readers][writers]`` MIB edge names of a block (built once per graph: a fit asks
        for them at every step)."""
        return self._names[block]

    @cached_property
    def _names(self) -> dict[str, list[list[str]]]:
        out = {}
        for block, (rows, columns) in self.block_shapes().items():
            readers = self.readers(block)
            out[block] = [[f"{self.writers[c]}->{readers[r]}" for c in range(columns)]
                          for r in range(rows)]  # fmt: skip
        return out

    def locate(self) -> dict[str, tuple[str, int, int]]:
        """``{edge name: (block, row, column)}`` of every edge."""
        out = {}
        for block in self.blocks():
            for r, row in enumerate(self.edge_names(block)):
                for c, name in enumerate(row):
                    out[name] = (block, r, c)
        return out
