"""Fitting noise: the objective, the trainer and its callbacks.

* :mod:`~tl_noise.fitting.objectives`: noise losses and task losses (KL, CE, metric);
* :mod:`~tl_noise.fitting.projection`: gradient projection between the noise and the task loss;
* :mod:`~tl_noise.fitting.distributed`: data-parallel reduction over ``torch.distributed``;
* :mod:`~tl_noise.fitting.trainer`: :func:`fit`.
"""

from tl_noise.fitting.trainer import FitResult, fit

__all__ = ["FitResult", "fit"]
