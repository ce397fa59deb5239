"""The run directory: what a fit writes and what the dashboard and notebooks read.

* :mod:`~tl_noise.runs.format`: file names, the history record, config checks;
* :mod:`~tl_noise.runs.writer`: :class:`RunWriter` (atomic files, checkpoints);
* :mod:`~tl_noise.runs.history`: reading ``history.jsonl``;
* :mod:`~tl_noise.runs.circuits`: MIB's circuit JSON (:func:`save_circuit`, :func:`load_circuit`);
* :mod:`~tl_noise.runs.reader`: :class:`Run`, :func:`load_run`, :func:`list_runs` (the notebooks'
  and the dashboard's API), with the pandas frames of :mod:`~tl_noise.runs.frames`.
"""

from tl_noise.names import hook_kind
from tl_noise.runs.circuits import Circuit, load_circuit, save_circuit
from tl_noise.runs.format import (
    CHECKPOINTS,
    CONFIG,
    FINAL,
    GRAD_KEYS,
    HISTORY,
    RUN_FORMAT,
    STATUS,
    SUMMARY,
)
from tl_noise.runs.history import read_history, stds_from_record
from tl_noise.runs.reader import Run, list_runs, load_run
from tl_noise.runs.writer import (
    RunWriter,
    config_differences,
    latest_checkpoint,
    read_trainer_state,
)

__all__ = [
    "CHECKPOINTS",
    "Circuit",
    "CONFIG",
    "FINAL",
    "GRAD_KEYS",
    "HISTORY",
    "RUN_FORMAT",
    "STATUS",
    "SUMMARY",
    "Run",
    "RunWriter",
    "config_differences",
    "hook_kind",
    "latest_checkpoint",
    "list_runs",
    "load_circuit",
    "load_run",
    "read_history",
    "read_trainer_state",
    "save_circuit",
    "stds_from_record",
]
