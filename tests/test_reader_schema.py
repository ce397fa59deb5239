"""Issue 12, hardening round 2: the run reader checks every file against one schema.

Damaged, oversized or linked run files raise one error type, :class:`RunFileError` (a
``ValueError``) naming the file and the field, instead of RecursionError, MemoryError or a
silent read through a link; history is read incrementally (only the appended bytes).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from tl_noise import io
from tl_noise.errors import RunFileError, TLNoiseValueError
from tl_noise.hooks import NoiseHooks
from tl_noise.runs import Run, latest_checkpoint
from tl_noise.runs import history as history_module
from tl_noise.runs.format import checkpoint_folder

STEPS = 6
HOOK = "blocks.0.attn.hook_z"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, embedded_fit) -> Path:
    path = tmp_path_factory.mktemp("schema") / "run"
    embedded_fit(path, steps=STEPS, checkpoint_every=3, seed=0)
    return path


@pytest.fixture
def run_dir(fitted, tmp_path) -> Path:
    path = tmp_path / "run"
    shutil.copytree(fitted, path)
    return path


def edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


def history_lines(run_dir: Path) -> list[bytes]:
    return (run_dir / "history.jsonl").read_bytes().splitlines(keepends=True)


def insert_line(run_dir: Path, line: bytes, at: int = 2) -> None:
    lines = history_lines(run_dir)
    (run_dir / "history.jsonl").write_bytes(b"".join([*lines[:at], line + b"\n", *lines[at:]]))


def sparse(path: Path, size: int, head: bytes = b"") -> None:
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(size)  # no disk space, no memory


def safetensors_head(n_floats: int) -> bytes:
    """The first bytes of a safetensors file of one float32 tensor of ``n_floats`` values."""
    header = json.dumps(
        {"x": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header


def no_reading(monkeypatch) -> None:
    """Fail the test if any file is read whole (what an unbounded read does)."""

    def refuse(self):
        raise AssertionError(f"{self} was read whole")

    monkeypatch.setattr(Path, "read_bytes", refuse)


# ------------------------------------------------------------------ A: malformed history


@pytest.mark.parametrize(
    "line",
    [b"[" * 200_000, b'{"step": 3, "loss": {"task": ' + b"7" * 5000 + b"}}", b'"just a string"'],
    ids=["200000-brackets", "5000-digit-integer", "not-an-object"],
)
def test_a_malformed_history_line_is_skipped_and_counted(run_dir, line):
    insert_line(run_dir, line)
    run = Run(run_dir)
    assert run.steps() == list(range(STEPS))
    skipped, problems = run.history_problems()
    assert (skipped, problems) == (1, {})
    assert len(run.loss_frame()) == STEPS


def test_a_std_of_the_wrong_shape_is_named_and_left_out(run_dir):
    lines = history_lines(run_dir)
    record = json.loads(lines[3])
    record["std"][HOOK] = record["std"][HOOK][:3]  # 3 heads; the model has 4
    lines[3] = (json.dumps(record) + "\n").encode()
    (run_dir / "history.jsonl").write_bytes(b"".join(lines))
    run = Run(run_dir)
    assert run.steps() == list(range(STEPS))
    assert "has shape [3]; expected [4]" in run.record_problems(3)["std"]
    with pytest.raises(RunFileError, match=r"malformed std in history step 3.*expected \[4\]"):
        run.head_std_matrix(3)
    assert run.head_std_matrix(2).shape == (2, 4)
    assert run.grad_matrix(3, "cosine").shape == (2, 4)  # the record's other fields stay


def test_a_gradient_record_of_the_wrong_type_is_named(run_dir):
    lines = history_lines(run_dir)
    record = json.loads(lines[4])
    record["grad"][HOOK]["cosine"] = "x"
    lines[4] = (json.dumps(record) + "\n").encode()
    (run_dir / "history.jsonl").write_bytes(b"".join(lines))
    run = Run(run_dir)
    assert "grad" in run.record_problems(4)
    with pytest.raises(RunFileError, match="not a list of numbers"):
        run.grad_matrix(4, "cosine")
    assert run.history_problems()[1] == {4: run.record_problems(4)}


# --------------------------------------------------------------------- A: malformed files


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda c: c.update(fit=[1, 2]), "fit"),
        (lambda c: c.update(task="x"), "task"),
        (lambda c: c.update(noise=[]), "noise"),
        (lambda c: c["fit"].update(steps="many"), "fit.steps"),
        (lambda c: c["model"].update(name={"a": 1}), "model.name"),
        (lambda c: c["model"].update(ground_truth={"induction": [["a", 1]]}), "model.ground_truth"),
        (lambda c: c["noise"]["hooks"][HOOK].update(unit_shape="4x16"), "noise.hooks"),
    ],
    ids=["fit-list", "task-string", "noise-list", "steps", "model-name", "truth", "unit-shape"],
)
def test_a_config_field_of_the_wrong_type_is_refused_by_name(run_dir, edit, field):
    edit_json(run_dir / "config.json", edit)
    with pytest.raises(RunFileError, match="config.json") as err:
        Run(run_dir)
    assert err.value.field.startswith(field) and field in str(err.value)
    assert isinstance(err.value, TLNoiseValueError)


@pytest.mark.parametrize("depth", [200_000, 100])
def test_a_deeply_nested_config_is_refused(run_dir, depth):
    config = json.loads((run_dir / "config.json").read_text())
    text = json.dumps(config)[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
    (run_dir / "config.json").write_text(text)
    with pytest.raises(RunFileError, match="nest"):
        Run(run_dir)


def test_a_run_declaring_too_many_heads_is_refused_before_allocating(run_dir):
    edit_json(
        run_dir / "config.json",
        lambda c: c["model"]["fingerprint"].update(n_layers=100_000, n_heads=100_000),
    )
    with pytest.raises(RunFileError, match="10000000000 heads"):
        Run(run_dir)


@pytest.mark.parametrize(
    ("summary", "match"),
    [
        ({"ground_truth": [["a", 1]]}, r"ground_truth\[0\]"),
        ({"ground_truth": {"x": [[0, 99]]}}, "inside the model"),
        ({"ground_truth": "heads"}, "ground_truth"),
        ({"faithfulness": {"k": [{"x": 1}], "faithfulness": [1.0]}}, "faithfulness.k"),
        ({"faithfulness": {"k": [1, 2], "faithfulness": [1.0]}}, "has 2 k but 1 values"),
        ({"faithfulness": [1, 2]}, "faithfulness is a list"),
    ],
)
def test_a_malformed_summary_field_is_named(run_dir, summary, match):
    edit_json(run_dir / "config.json", lambda c: c["model"].pop("ground_truth"))
    (run_dir / "summary.json").write_text(json.dumps(summary))
    run = Run(run_dir)
    accessor = run.ground_truth if "ground_truth" in summary else run.faithfulness
    with pytest.raises(RunFileError, match=match) as err:
        accessor()
    assert err.value.file == str(run_dir / "summary.json")


def test_a_status_of_the_wrong_types_is_unknown_naming_the_field(run_dir):
    (run_dir / "status.json").write_text(json.dumps({"state": ["x"], "step": "3"}))
    status = Run(run_dir).status()
    assert status["state"] == "unknown" and "state is a list" in status["message"]


# --------------------------------------------------------------------- B: unbounded reads


def test_b_read_tensors_checks_the_header_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.safetensors"
    sparse(path, 2**31, safetensors_head(2**29 - 64))  # a 2 GiB file, its header says so
    no_reading(monkeypatch)
    with pytest.raises(ValueError, match=r"big\.safetensors.*limit of 1\.0 MiB"):
        io.read_tensors(path, "tensors", limit=2**20)
    sparse(path, 1000, struct.pack("<Q", 2**40))  # a header longer than the file
    with pytest.raises(ValueError, match="truncated or corrupt"):
        io.read_tensors(path, "tensors")


def test_b_a_sparse_30_gib_final_state_is_refused_without_reading(run_dir, monkeypatch):
    sparse(run_dir / "final" / "noise_state.safetensors", 30 * 2**30)
    no_reading(monkeypatch)
    run = Run(run_dir)
    with pytest.raises(RunFileError, match=r"noise_state\.safetensors' is 30720\.0 MiB.*limit"):
        run.final_stds()


def test_b_a_huge_unit_shape_in_the_final_noise_config_is_refused(run_dir, monkeypatch):
    edit_json(
        run_dir / "final" / "noise_config.json",
        lambda c: c["hooks"][HOOK].update(unit_shape=[100_000, 100_000]),
    )
    monkeypatch.setattr(torch, "ones", lambda *a, **k: pytest.fail("allocated"))
    with pytest.raises(RunFileError, match="describes noise of more than"):
        Run(run_dir).final_stds()


def test_b_noise_hooks_load_reads_the_state_once(run_dir, monkeypatch):
    model = pytest.importorskip("tl_noise.models").load_embedded_model()
    state = run_dir / "final" / "noise_state.safetensors"
    reads: list[Path] = []
    original = Path.read_bytes

    def counting(self):
        reads.append(self)
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    noise = NoiseHooks.load(run_dir / "final", model, attach=False)
    assert [p for p in reads if p.name == state.name] == [state]
    assert noise.hook_names


def test_b_noise_hooks_load_refuses_a_state_larger_than_its_config(run_dir, monkeypatch):
    model = pytest.importorskip("tl_noise.models").load_embedded_model()
    state = run_dir / "final" / "noise_state.safetensors"
    sparse(state, 3 * 2**30 + 8 + 200, safetensors_head(3 * 2**28))  # 3 GiB
    no_reading(monkeypatch)
    with pytest.raises(ValueError, match=r"noise_state\.safetensors.*limit.*its config"):
        NoiseHooks.load(run_dir / "final", model, attach=False)


def test_b_noise_hooks_load_refuses_a_huge_unit_shape_before_allocating(run_dir, monkeypatch):
    model = pytest.importorskip("tl_noise.models").load_embedded_model()
    edit_json(
        run_dir / "final" / "noise_config.json",
        lambda c: c["hooks"][HOOK].update(unit_shape=[100_000, 100_000]),
    )
    monkeypatch.setattr(torch, "ones", lambda *a, **k: pytest.fail("allocated"))
    with pytest.raises(ValueError, match=r"noise_config\.json.*more than"):
        NoiseHooks.load(run_dir / "final", model, attach=False)


# ------------------------------------------------------------------------- C: no links


@pytest.mark.parametrize("name", ["config.json", "history.jsonl", "status.json", "summary.json"])
def test_c_a_symlinked_run_file_is_refused(run_dir, tmp_path, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(run_dir / name, outside / name)
    (run_dir / name).symlink_to(outside / name)
    if name == "config.json":
        with pytest.raises(RunFileError, match="symbolic link"):
            Run(run_dir)
        return
    run = Run(run_dir)
    if name == "status.json":
        status = run.status()
        assert status["state"] == "unknown" and "symbolic link" in status["message"]
        return
    read = run.history if name == "history.jsonl" else run.summary
    with pytest.raises(RunFileError, match="symbolic link"):
        read()


def test_c_a_symlinked_final_folder_or_file_is_refused(run_dir, tmp_path):
    shutil.move(run_dir / "final", tmp_path / "final")
    (run_dir / "final").symlink_to(tmp_path / "final", target_is_directory=True)
    with pytest.raises(RunFileError, match="symbolic link"):
        Run(run_dir).final_stds()
    (run_dir / "final").unlink()
    (run_dir / "final").mkdir()
    for name in ("noise_config.json", "noise_state.safetensors"):
        (run_dir / "final" / name).symlink_to(tmp_path / "final" / name)
    with pytest.raises(RunFileError, match="symbolic link"):
        Run(run_dir).final_stds()


@pytest.mark.parametrize("pointer", ["../../other/checkpoints/step_0000003", "ABS", "..", ""])
def test_c_latest_checkpoint_stays_inside_the_run(run_dir, tmp_path, pointer):
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    foreign = other / "checkpoints" / "step_0000003"
    path = str(foreign) if pointer == "ABS" else pointer
    (run_dir / "checkpoints" / "latest.json").write_text(json.dumps({"step": 3, "path": path}))
    found = latest_checkpoint(run_dir)
    assert found is not None
    step, folder = found
    assert folder.parent == run_dir / "checkpoints" and folder.name.startswith("step_")
    assert not folder.resolve().is_relative_to(other.resolve())


def test_c_checkpoint_folder_takes_plain_child_names_only(tmp_path):
    assert checkpoint_folder(tmp_path, "step_0000050") == tmp_path / "step_0000050"
    for bad in ("../x", "/abs", "a/b", "..", ".", "", ".hidden", 5, None, "a\\b"):
        with pytest.raises(RunFileError, match="latest.json"):
            checkpoint_folder(tmp_path, bad)
    (tmp_path / "link").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(RunFileError, match="symbolic link"):
        checkpoint_folder(tmp_path, "link")


# ------------------------------------------------------------------- E: incremental history


def test_e_history_reads_only_the_appended_bytes(run_dir, monkeypatch):
    lines = history_lines(run_dir)
    (run_dir / "history.jsonl").write_bytes(b"".join(lines[:3]) + lines[3][:30])
    run = Run(run_dir)
    assert run.steps() == [0, 1, 2]
    parsed: list[bytes] = []
    loads = json.loads

    def counting(text, *args, **kwargs):
        parsed.append(text)
        return loads(text, *args, **kwargs)

    monkeypatch.setattr(history_module.json, "loads", counting)
    with open(run_dir / "history.jsonl", "ab") as handle:  # the partial line completed, one more
        handle.write(lines[3][30:] + lines[4])
    assert run.steps() == [0, 1, 2, 3, 4]
    assert len(parsed) == 2  # the two new records only, not the whole file again
    assert run.steps() == [0, 1, 2, 3, 4] and len(parsed) == 2  # nothing new: nothing read


def test_e_a_history_cut_back_on_resume_is_read_again(run_dir):
    lines = history_lines(run_dir)
    file = run_dir / "history.jsonl"
    run = Run(run_dir)
    assert run.steps() == list(range(STEPS))
    record = json.loads(lines[2])
    record["loss"]["task"] = 123.0
    replaced = b"".join(lines[:2]) + (json.dumps(record) + "\n").encode()
    tmp = run_dir / "history.tmp"
    tmp.write_bytes(replaced)
    os.replace(tmp, file)  # what RunWriter.truncate_history does: a new file
    assert run.steps() == [0, 1, 2] and run.record(2)["loss"]["task"] == 123.0
    with open(file, "r+b") as handle:  # cut back in place, then grown past the old length
        handle.truncate(len(lines[0]))
        handle.seek(0, os.SEEK_END)
        handle.write(b"".join(lines[1:]))
    assert run.steps() == list(range(STEPS)) and run.record(2)["loss"]["task"] != 123.0
