"""The notebooks run top to bottom (nbclient, on this virtual environment's Python), with their
parameters cell replaced by small settings and a temporary working directory for the runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "tl-noise-test-venv"
PLOTLY = "application/vnd.plotly.v1+json"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A kernelspec that starts this interpreter (the venv's), found through JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "tl-noise tests", "language": "python"})
    )
    return root


def execute(name: str, parameters: str, workdir: Path, kernel_dir: Path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch: one thread, shared machine
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and nb.cells.index(tagged[0]) == 0, "one parameters cell, first"
    tagged[0].source = parameters
    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()
    return nb


def outputs(nb, kind: str) -> list:
    return [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})
    ]


def run_dirs(workdir: Path) -> list[Path]:
    return sorted(p.parent for p in (workdir / "runs").glob("*/config.json"))


@pytest.mark.parametrize(
    "name", ["01_quickstart.ipynb", "02_pretrained_gpt2_ioi.ipynb", "03_edge_circuits.ipynb"]
)
def test_notebooks_are_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_quickstart_notebook_runs(tmp_path, kernel_dir, monkeypatch):
    params = 'STEPS = 12\nN_EXAMPLES = 32\nRUNS_DIR = "runs"'
    nb = execute("01_quickstart.ipynb", params, tmp_path, kernel_dir, monkeypatch)
    assert len(outputs(nb, PLOTLY)) == 2  # std heatmap, comparison scatter
    html = " ".join(o["data"]["text/html"] for o in outputs(nb, "text/html"))
    assert "mean ablation" in html and "noise_norm" in html  # method table, history_frame
    (run,) = run_dirs(tmp_path)
    status = json.loads((run / "status.json").read_text())
    assert status == {"state": "completed", "step": 12, "message": ""}
    printed = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "tl-noise app runs" in printed


def test_gpt2_ioi_notebook_runs_on_a_local_checkpoint(
    tmp_path, kernel_dir, monkeypatch, gpt2_checkpoint
):
    params = (
        f"MODEL_NAME = {gpt2_checkpoint!r}\nSTEPS = 6\nN_PROMPTS = 16\nBATCH_SIZE = 8\n"
        'RUNS_DIR = "runs"'
    )
    nb = execute("02_pretrained_gpt2_ioi.ipynb", params, tmp_path, kernel_dir, monkeypatch)
    assert len(outputs(nb, PLOTLY)) == 2
    (run,) = run_dirs(tmp_path)
    config = json.loads((run / "config.json").read_text())
    assert config["task"]["name"] == "ioi" and config["fit"]["steps"] == 6
    assert json.loads((run / "status.json").read_text())["state"] == "completed"


def test_edge_circuits_notebook_runs(tmp_path, kernel_dir, monkeypatch):
    params = 'STEPS = 8\nN_EXAMPLES = 32\nTARGET = 0.9\nRUNS_DIR = "runs"'
    nb = execute("03_edge_circuits.ipynb", params, tmp_path, kernel_dir, monkeypatch)
    assert len(outputs(nb, PLOTLY)) == 1  # the faithfulness curves
    html = " ".join(o["data"]["text/html"] for o in outputs(nb, "text/html"))
    assert "edge attribution patching" in html
    assert "input-&gt;" in html or "input->" in html  # the top edges table
    (run,) = run_dirs(tmp_path)
    circuit = json.loads((run / "circuit.json").read_text())
    assert any(e["in_graph"] for e in circuit["edges"].values())
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
