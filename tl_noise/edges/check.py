"""Whether edge noise rebuilds a model's readers as the model itself computes them.

With every edge kept (``sigma = 0``) each rebuilt reader (a head's q, k or v, an MLP's input, the
logits' input) must equal what the model computes there, and every reader's hook must run (a
model that reads an input elsewhere would otherwise go unnoised). Two things a rebuild at
``sigma = 0`` cannot show are checked too, as they would give wrong edges at any other ``sigma``:
each MLP must read what the graph says it reads (the block's input in parallel attention/MLP
blocks, the residual stream after the attention otherwise), and the residual stream before every
block and at the end must be the sum of the writers' contributions plus constant biases (a norm
after the attention or MLP, as Gemma 2 has, makes a head's ``z W_O`` differ from what it adds).
:meth:`tl_noise.edges.EdgeNoise.check_rebuild` runs the forward; this module records and judges
it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tl_noise.errors import TLNoiseValueError

REBUILD_RTOL = 1e-4
"""The largest relative difference between a rebuilt reader and the model's own (float32) that
:meth:`~tl_noise.edges.EdgeNoise.check_rebuild` accepts."""
READER_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_mlp_in", "ln2.hook_in", "mlp.hook_in",
                "hook_resid_post")  # fmt: skip
"""How the hook points edge noise replaces a reader at end (the others only record writers)."""


@dataclass
class RebuildCheck:
    """One checking forward: ``readers``, the reader hooks that must run; ``parallel``, whether
    the graph's MLPs read their block's input."""

    readers: list[str]
    parallel: bool
    errors: dict[str, float] = field(default_factory=dict)  # hook -> relative difference
    block_input: dict[str, bool] = field(default_factory=dict)  # MLP hook -> reads resid_pre
    residuals: dict[str, float] = field(default_factory=dict)  # hook -> spread of the rest

    def record(self, name: str, rebuilt: Tensor, own: Tensor) -> None:
        """The relative difference of a rebuilt reader from the model's own input there."""
        scale = own.abs().max().clamp_min(1e-12)
        self.errors[name] = float((rebuilt - own).abs().max() / scale)

    def record_mlp_input(self, name: str, own: Tensor, block_input: Tensor) -> None:
        """Whether the MLP at hook ``name`` reads exactly its block's input ``block_input``."""
        self.block_input[name] = torch.equal(own, block_input)

    def record_residual(self, name: str, own: Tensor, contributions: Tensor) -> None:
        """How far the residual stream ``own`` ``[batch, pos, d]`` at hook ``name`` is from the
        sum of the ``contributions`` ``[writers, batch, pos, d]`` written so far plus one
        constant (the biases): the largest deviation of ``own - sum_w c_w`` from its mean over
        tokens, relative to the largest ``|own|``."""
        rest = own.double() - contributions.double().sum(0)
        spread = (rest - rest.mean((0, 1))).abs().max()
        self.residuals[name] = float(spread / own.abs().max().clamp_min(1e-12))

    def verify(self) -> float:
        """The largest relative difference; ValueError naming the first reader that is not
        rebuilt as the model computes it."""
        if missing := [n for n in self.readers if n not in self.errors]:
            raise TLNoiseValueError(
                f"edge noise cannot rebuild this model's readers: its forward never ran "
                f"{missing[:3]} (the model reads them elsewhere, e.g. an MLP that reads the "
                "attention's layer norm in a parallel block has no hook before its norm)"
            )
        wrong = [n for n, reads_input in self.block_input.items() if reads_input != self.parallel]
        if wrong:
            says = "parallel" if self.parallel else "sequential"
            reads = "the attention's output too" if self.parallel else "only its block's input"
            raise TLNoiseValueError(
                f"the model's cfg says its attention/MLP blocks are {says} "
                f"(parallel_attn_mlp={self.parallel}), but its MLP at {wrong[0]} reads {reads}: "
                "edge noise would rebuild that MLP's input from the wrong writers"
            )
        name, spread = max(self.residuals.items(), key=lambda item: item[1], default=("", 0.0))
        if not spread <= REBUILD_RTOL:
            raise TLNoiseValueError(
                f"the residual stream at {name} is not the sum of its writers' contributions "
                f"(each head's z W_O, each MLP's output) plus constant biases: relative "
                f"deviation {spread:.3g} (accepted: {REBUILD_RTOL}); something acts between a "
                "writer and the residual stream (e.g. a norm after the attention or MLP)"
            )
        name, worst = max(self.errors.items(), key=lambda item: item[1], default=("", 0.0))
        if not worst <= REBUILD_RTOL:
            raise TLNoiseValueError(
                f"edge noise rebuilds this model's {name} with a relative error of {worst:.3g} "
                f"(accepted: {REBUILD_RTOL}); its attention or layer norm computes its readers "
                "in a way tl-noise does not reproduce"
            )
        return worst
