"""Data-parallel fitting under torchrun (2 CPU processes, gloo) equals one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
HELPER = Path(__file__).parent / "helpers" / "dist_fit.py"


@pytest.mark.parametrize("kind", ["nodes", "edges"])
def test_two_ranks_match_each_other_and_one_process(tmp_path, kind):
    sys.path.insert(0, str(HELPER.parent))
    try:
        import dist_fit
    finally:
        sys.path.pop(0)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TL_NOISE_DIST_KIND": kind}
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            str(HELPER),
            str(tmp_path),
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert r0.keys() == r1.keys()
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key  # identical parameters on every rank
    single = dist_fit.run(kind=kind)
    for key in r0:
        torch.testing.assert_close(r0[key], single[key], rtol=1e-5, atol=1e-6)
    # rank 0 alone wrote the run directory, and it is complete
    assert (tmp_path / "run" / "final" / "noise_state.safetensors").exists()
    lines = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    assert len(lines) == 4
