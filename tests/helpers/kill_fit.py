"""Worker for tests/test_faults.py: fit noise on a tiny native model with a run directory.

    python kill_fit.py RUN_DIR STEPS [--resume] [--delay SECONDS] [--die-in-write TEXT [AFTER]]

``--delay`` sleeps that long after every forward pass (a plain forward hook that changes no
number), so that a test can kill the process between checkpoints. ``--die-in-write TEXT AFTER``
kills the process with SIGKILL half-way through the write of the first file whose path contains
``TEXT`` after ``AFTER`` such writes: a kill -9 in the middle of a write, at a known place.

``run`` is also imported by the tests, to run the same fit in-process (resume, reference).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch

import tl_noise as tn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import HOOKS, TINY, freeze, tiny_data  # noqa: E402

import tl_noise.io as tio
from tl_noise.fitting import fit

CONFIG = TINY  # the test suite's tiny native model (tests/conftest.py)
FIT = dict(batch_size=8, lr=0.05, seed=5, checkpoint_every=2, quiet=True)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    return tiny_data(mask_from=4)


def make_model(delay: float = 0.0):
    torch.set_num_threads(1)
    model = freeze(tn.build_native_model(CONFIG))
    if delay:
        model.register_forward_hook(lambda module, args, output: time.sleep(delay))
    return model


def run(run_dir: str, steps: int, resume: bool = False, delay: float = 0.0, model=None):
    model = make_model(delay) if model is None else model
    tokens, mask = data()
    with tn.attach_noise(model, HOOKS, calibration_tokens=tokens) as noise:
        return fit(
            model, noise, tokens, loss_mask=mask, steps=steps, run_dir=run_dir, resume=resume, **FIT
        )


def die_in_write(text: str, after: int) -> None:
    real = tio._write_all
    seen = [0]

    def write(fd: int, data: bytes, path) -> None:
        if text in str(path):
            seen[0] += 1
            if seen[0] > after:
                cut = len(data) // 2
                cut -= data[cut - 1 : cut] == b"\n"  # inside a line, never at a line's end
                os.write(fd, data[:cut])
                os.fsync(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        real(fd, data, path)

    tio._write_all = write


if __name__ == "__main__":
    args = sys.argv[1:]
    run_dir, steps = args[0], int(args[1])
    delay = float(args[args.index("--delay") + 1]) if "--delay" in args else 0.0
    if "--die-in-write" in args:
        at = args.index("--die-in-write")
        die_in_write(args[at + 1], int(args[at + 2]))
    run(run_dir, steps, resume="--resume" in args, delay=delay)
