"""Which tl-noise noise sits on a model's hook points.

Every hook function :class:`~tl_noise.hooks.NoiseHooks` registers carries a marker attribute (a
weak reference to its owner), so a second ``NoiseHooks`` on the same hook point is refused
instead of silently noising the first one's activations, and a registry (weak: it keeps neither
model nor noise alive) lists the noise attached to each model, so that clean targets can switch
off every tl-noise layer on the model, not only their own.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

MARKER = "_tl_noise_owner"

_ATTACHED: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()


def _registered_function(point: Any, handle: Any) -> Any:
    """The function torch calls for ``handle`` (TransformerLens wraps ours), or None."""
    removable = getattr(handle, "hook", handle)
    return point._forward_hooks.get(getattr(removable, "id", None))


def handle_registered(point: Any, handle: Any) -> bool:
    """Whether ``handle`` is still registered on ``point`` (``reset_hooks(including_permanent=
    True)`` removes tl-noise's hooks behind its back)."""
    return _registered_function(point, handle) is not None


def mark(point: Any, handle: Any, owner: Any) -> None:
    """Mark the function registered for ``handle`` as belonging to ``owner``; list ``owner``
    as attached to its model."""
    fn = _registered_function(point, handle)
    if fn is not None:
        setattr(fn, MARKER, weakref.ref(owner))
    _ATTACHED.setdefault(owner.model, weakref.WeakSet()).add(owner)


def owners(point: Any) -> list[Any]:
    """The tl-noise owners of the hook functions registered on ``point``."""
    found: list[Any] = []
    for fn in list(point._forward_hooks.values()):
        ref = getattr(fn, MARKER, None)
        owner = ref() if callable(ref) else None
        if owner is not None and all(owner is not o for o in found):
            found.append(owner)
    return found


def attached_noise(model: Any) -> list[Any]:
    """Every ``NoiseHooks`` attached to ``model`` now."""
    return [n for n in list(_ATTACHED.get(model, ())) if n.attached]


@contextmanager
def all_noise_switched_off(model: Any, *also: Any) -> Iterator[None]:
    """Within the block no tl-noise layer on ``model`` (nor on ``also``) changes an activation;
    each layer's mode is restored afterwards."""
    with ExitStack() as stack:
        for noise in dict.fromkeys([*also, *attached_noise(model)]):
            stack.enter_context(noise.switched_off())
        yield
