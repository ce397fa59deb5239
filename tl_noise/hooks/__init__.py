"""Hook-point wrappers: choosing hook points, calibrating them, and the noise attached there.

* :mod:`~tl_noise.hooks.selection`: hook specs (names, globs, predicates) -> hook names;
* :mod:`~tl_noise.hooks.calibration`: registering hooks, measuring activation shapes and scales;
* :mod:`~tl_noise.hooks.noise_hooks`: :class:`NoiseHooks`, the attached layers, save and load;
* :mod:`~tl_noise.hooks.attach`: :func:`attach_noise`;
* :mod:`~tl_noise.hooks.importance`: :func:`node_importance`, :func:`head_importance`.
"""

from tl_noise.hooks.attach import attach_noise, describe
from tl_noise.hooks.calibration import collect_activation_stats, default_probe_tokens
from tl_noise.hooks.importance import head_importance, node_importance, std_node_scores
from tl_noise.hooks.noise_hooks import CONFIG_FILE, STATE_FILE, NoiseHooks, model_fingerprint
from tl_noise.hooks.selection import check_model, check_tokens, resolve_hook_names

__all__ = [
    "CONFIG_FILE",
    "STATE_FILE",
    "NoiseHooks",
    "attach_noise",
    "check_model",
    "check_tokens",
    "collect_activation_stats",
    "default_probe_tokens",
    "describe",
    "head_importance",
    "model_fingerprint",
    "node_importance",
    "std_node_scores",
    "resolve_hook_names",
]
