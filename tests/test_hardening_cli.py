"""Hardening of the command line (issue 12): a damaged run, a device this torch lacks and a model
that is not there give one-line errors (exit status 2), never a traceback; ``--force`` replaces
a run.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tl_noise.cli.main import main
from tl_noise.io import read_json

pytestmark = pytest.mark.tl3


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _edit(file, edit):
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


DAMAGE = {
    "config-without-model": lambda r: _edit(r / "config.json", lambda c: c.pop("model")),
    "config-not-an-object": lambda r: (r / "config.json").write_text("[1]"),
    "summary-not-an-object": lambda r: (r / "summary.json").write_text('"x"'),
    "ranking-of-numbers": lambda r: _edit(r / "summary.json", lambda s: s.update(ranking=[1, 2])),
    "ranking-rows-without-std": lambda r: _edit(
        r / "summary.json", lambda s: [row.pop("std") for row in s["ranking"]]
    ),
    "fit-section-a-list": lambda r: _edit(r / "config.json", lambda c: c.update(fit=[1])),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_show_on_a_damaged_run(case, base_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    assert main(["show", str(run)]) == 0  # intact: fine
    capsys.readouterr()
    DAMAGE[case](run)
    err = one_line_error(capsys, ["show", str(run)])
    assert str(run) in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_fit_on_a_device_this_torch_lacks(tmp_path, capsys):
    err = one_line_error(
        capsys, ["fit", "induction-2l", "--device", "cuda", "--run-dir", str(tmp_path / "r")]
    )
    assert "--device 'cuda': cuda is not available" in err
    assert not (tmp_path / "r").exists()


def test_fit_on_a_missing_model(tmp_path, capsys):
    err = one_line_error(capsys, ["fit", str(tmp_path / "nope"), "--run-dir", str(tmp_path)])
    assert f"model path {str(tmp_path / 'nope')!r} does not exist" in err
    err = one_line_error(capsys, ["fit", "no-such-model-anywhere", "--run-dir", str(tmp_path)])
    assert err.startswith("tl-noise fit: error:")


def test_force_replaces_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["fit", "induction-2l", "--steps", "2", "--n-examples", "8", "--batch-size", "4",
            "--refine-window", "0", "--quiet", "--run-dir", str(run)]  # fmt: skip
    assert main(argv) == 0
    err = one_line_error(capsys, argv)
    assert "already holds a run" in err and "--force" in err
    with pytest.warns(UserWarning, match="overwrite=True"):
        assert main([*argv, "--force", "--steps", "3"]) == 0
    assert read_json(run / "config.json")["fit"]["steps"] == 3
