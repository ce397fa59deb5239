"""Fitting noise: the settings, the objective, the trainer and its callbacks.

* :mod:`~tl_noise.fitting.config`: :class:`FitConfig`, every setting of a fit, validated;
* :mod:`~tl_noise.fitting.objectives`: noise losses and the task-loss functions (KL, CE);
* :mod:`~tl_noise.fitting.task_losses`: one task loss per objective, with the clean KL targets;
* :mod:`~tl_noise.fitting.projection`: gradient projection between the noise and the task loss;
* :mod:`~tl_noise.fitting.combiners`: one combiner per mode (alphaless, composite, budget);
* :mod:`~tl_noise.fitting.records`: the history record and per-head gradient statistics;
* :mod:`~tl_noise.fitting.trainer`: :class:`Trainer`, whose ``step()`` does one step;
* :mod:`~tl_noise.fitting.callbacks`: progress bar and run directory;
  :mod:`~tl_noise.fitting.distributed`: data-parallel reduction;
* :mod:`~tl_noise.fitting.fit`: :func:`fit`, the public wrapper.
"""

from tl_noise.fitting.callbacks import Callback
from tl_noise.fitting.config import FitConfig
from tl_noise.fitting.fit import fit
from tl_noise.fitting.trainer import FitResult, Trainer

__all__ = ["Callback", "FitConfig", "FitResult", "Trainer", "fit"]
