"""The readers' Gaussian draws, made chunk by chunk and again in the backward instead of being kept.

A reader group (a layer's q, k and v heads, an MLP, the logits) adds ``std_r * eps_r`` to what
each of its ``R`` readers reads, ``eps`` ``[tokens, R, d_model]``: the largest tensors of an
edge-noise forward (57 MB a layer at GPT-2 small, batch 4 x 128). The std's gradient needs them
(``d loss / d std_r = sum_tokens g_r * eps_r``), so plain autograd would keep every layer's draws
until the backward. :class:`TokenDraw` keeps the generator's state instead and hands out the
same numbers again, chunk by chunk, when the gradient is needed: the same values bit for bit,
the same random stream afterwards, at the cost of drawing twice.

The draws follow a grid of whole-token chunks over the *global* batch (``chunk`` tokens each,
the same on every data-parallel rank): a rank draws every chunk of the global batch in order and
keeps the tokens of its own examples, so its noise is the single-process noise of those rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from jaxtyping import Float
from torch import Tensor


def global_generator(device: torch.device) -> torch.Generator:
    """torch's global generator of ``device`` (what ``torch.randn`` draws from without one)."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return torch.cuda.default_generators[index]
    return torch.default_generator


class TokenDraw:
    """``eps`` ``[tokens, readers, width]`` (float32) of one reader group from ``generator`` as
    it is now, ``tokens = batch * pos``, drawn ``[n, readers, width]`` per grid chunk of
    ``chunk`` global tokens; ``shard = (offset, total)``: this process's examples start at
    ``offset`` of a global batch of ``total`` (None: the batch is the whole batch)."""

    def __init__(self, generator: torch.Generator | None, device: torch.device, batch: int,
                 pos: int, readers: int, width: int, chunk: int,
                 shard: tuple[int, int] | None = None) -> None:  # fmt: skip
        self.generator = generator if generator is not None else global_generator(device)
        self.state = self.generator.get_state()
        self.device, self.readers, self.width, self.chunk = device, readers, width, max(1, chunk)
        offset, total = shard or (0, batch)
        self.first, self.last, self.total = offset * pos, (offset + batch) * pos, total * pos

    def ranges(self) -> list[tuple[int, int]]:
        """The local token ranges ``(start, stop)`` the draw hands out, in order: the grid
        chunks cut to this process's tokens."""
        out = []
        for start in range(0, self.total, self.chunk):
            lo, hi = max(start, self.first), min(start + self.chunk, self.total, self.last)
            if lo < hi:
                out.append((lo - self.first, hi - self.first))
        return out

    def chunks(self, again: bool = False) -> Iterator[Float[Tensor, "n readers width"]]:
        """The local ``eps`` of each of :meth:`ranges`: the first time from the generator itself
        (which advances past the whole global draw), ``again`` from a copy of the saved state."""
        generator = self.generator
        if again:
            generator = torch.Generator(self.device)
            generator.set_state(self.state)
        scratch: Tensor | None = None
        for start in range(0, self.total, self.chunk):
            n = min(self.chunk, self.total - start)
            if scratch is None or scratch.shape[0] < n:
                scratch = torch.empty(n, self.readers, self.width, device=self.device)
            eps = scratch[:n].normal_(generator=generator)
            lo, hi = max(start, self.first), min(start + n, self.last)
            if lo < hi:
                yield eps[lo - start : hi - start]
