"""Faults: kill -9 during a fit, interrupted writes, exceptions inside ``attach_noise``, devices.

A killed fit resumes to exactly the noise of an uninterrupted run with the same seed (CPU is
deterministic), with one history record per step: every file is written atomically, so a kill
leaves either the old or the new checkpoint, and stray temporaries of a killed write (``.tmp_*``
checkpoint folders, ``.name.XXXX.tmp`` files, a half history line) do not break the resume.
The fits run in ``tests/helpers/kill_fit.py``, as a subprocess to be killed or in-process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import bits, count_hooks, logits_of

import tl_noise as tn
from tl_noise.fitting import fit
from tl_noise.hooks import collect_activation_stats, resolve_hook_names
from tl_noise.io import read_tensors
from tl_noise.runs import latest_checkpoint, read_history

pytestmark = pytest.mark.tl3

HELPER = Path(__file__).parent / "helpers" / "kill_fit.py"
_spec = importlib.util.spec_from_file_location("kill_fit", HELPER)
kill_fit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kill_fit)

STEPS = 10  # checkpoints every 2 steps (kill_fit.FIT)
STATE = "noise_state.safetensors"


def history_lines(run: Path) -> list[dict]:
    """Every line of history.jsonl, parsed (fails on a partial or damaged line)."""
    return [json.loads(line) for line in (run / "history.jsonl").read_bytes().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    kill_fit.run(str(run), STEPS)
    return run


def assert_equals_reference(run: Path, reference: Path) -> None:
    final, expected = read_tensors(run / "final" / STATE), read_tensors(reference / "final" / STATE)
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(bits(final[key]), bits(expected[key])), key
    lines = history_lines(run)
    assert [r["step"] for r in lines] == list(range(STEPS))
    assert lines == history_lines(reference)  # the same losses, stds and gradients at every step
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert not list((run / "checkpoints").glob(".tmp_*"))


# -------------------------------------------------------------------------- kill -9 (slow)
WORKERS = {
    # name -> extra arguments of kill_fit.py
    "sigkill": ["--delay", "0.1"],  # killed by the test once the first checkpoint exists
    "in-checkpoint": ["--die-in-write", f"step_0000004/{STATE}", "0"],  # mid checkpoint file
    "in-history": ["--die-in-write", "history.jsonl", "1"],  # mid history append
}


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """The three fits to be killed, started together (imports dominate their run time)."""
    root = tmp_path_factory.mktemp("killed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs = {}
    for name, extra in WORKERS.items():
        log = root / f"{name}.log"
        with open(log, "wb") as out:
            cmd = [sys.executable, str(HELPER), str(root / name), str(STEPS), *extra]
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        procs[name] = (proc, root / name, log)
    yield procs
    for proc, _, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_killed(proc, log: Path, timeout: float = 180) -> None:
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the fit did not die in {timeout} s:\n{log.read_text()}")
    assert code == -signal.SIGKILL, log.read_text()


@pytest.mark.slow
def test_sigkill_during_fit_then_resume_equals_uninterrupted(workers, reference):
    proc, run, log = workers["sigkill"]
    deadline = time.monotonic() + 180
    while not (run / "checkpoints" / "latest.json").exists():
        assert proc.poll() is None, f"the fit ended before its first checkpoint:\n{log.read_text()}"
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    wait_killed(proc, log)
    step, folder = latest_checkpoint(run)
    assert 2 <= step < STEPS, "the kill came too late to interrupt the fit"
    assert json.loads((run / "status.json").read_text())["state"] == "running"
    tn.NoiseHooks.load(folder, kill_fit.make_model(), attach=False)  # a complete checkpoint
    history_lines(run)  # appended only whole, at checkpoints

    kill_fit.run(str(run), STEPS, resume=True)
    assert_equals_reference(run, reference)


@pytest.mark.slow
def test_kill_in_the_middle_of_a_checkpoint_write(workers, reference):
    proc, run, log = workers["in-checkpoint"]
    wait_killed(proc, log)
    assert latest_checkpoint(run)[0] == 2
    stray = run / "checkpoints" / ".tmp_step_0000004"
    assert [p.name.startswith(f".{STATE}.") for p in stray.iterdir()] == [True]  # half-written
    assert not (run / "checkpoints" / "step_0000004").exists()
    assert [r["step"] for r in history_lines(run)] == [0, 1, 2, 3]

    kill_fit.run(str(run), STEPS, resume=True)
    assert_equals_reference(run, reference)


@pytest.mark.slow
def test_kill_in_the_middle_of_a_history_append(workers, reference):
    proc, run, log = workers["in-history"]
    wait_killed(proc, log)
    assert latest_checkpoint(run)[0] == 2
    raw = (run / "history.jsonl").read_bytes()
    assert not raw.endswith(b"\n")  # the half line the kill left (of steps 2 and 3)
    steps = [r["step"] for r in read_history(run)]  # readers skip it
    assert steps in ([0, 1], [0, 1, 2])  # step 2 may be whole: beyond the checkpoint, it goes

    kill_fit.run(str(run), STEPS, resume=True)
    assert_equals_reference(run, reference)


# -------------------------------------------------------------- stray temporaries (in-process)
def test_stray_temporaries_of_killed_writes_do_not_break_resume(tmp_path, reference):
    run = tmp_path / "run"
    kill_fit.run(str(run), 4)
    checkpoints = run / "checkpoints"
    good = read_tensors(checkpoints / "step_0000004" / STATE)
    # what kills at different moments leave behind
    (checkpoints / ".tmp_step_0000006").mkdir()
    (checkpoints / ".tmp_step_0000006" / STATE).write_bytes(b"\x00" * 7)
    (checkpoints / ".tmp_step_0000006" / "noise_config.json").write_text('{"format": "tl-')
    (checkpoints / ".tmp_step_0000008").mkdir()
    (checkpoints / ".latest.json.k1ll3d.tmp").write_text('{"step": 6, "pa')
    (checkpoints / "step_0000004" / f".{STATE}.k1ll3d.tmp").write_bytes(b"\x01\x02")
    (run / ".tmp_final").mkdir()
    (run / ".tmp_final" / STATE).write_bytes(b"")
    (run / ".config.json.k1ll3d.tmp").write_text("{")
    with open(run / "history.jsonl", "ab") as handle:
        handle.write(b'{"step":4,"loss":{"task":0.1')

    assert latest_checkpoint(run)[0] == 4
    loaded = tn.NoiseHooks.load(checkpoints / "step_0000004", kill_fit.make_model(), attach=False)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in good.items())

    kill_fit.run(str(run), STEPS, resume=True)
    assert_equals_reference(run, reference)


def test_interrupted_fit_leaves_the_model_exact_and_resumes(tmp_path, reference):
    model = kill_fit.make_model()
    tokens, _ = kill_fit.data()
    clean = logits_of(model, tokens)
    calls = []

    def interrupt(module, args, output):  # Ctrl-C some forward passes into the fit
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt

    handle = model.register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            kill_fit.run(str(tmp_path / "run"), STEPS, model=model)
    finally:
        handle.remove()
    assert count_hooks(model) == 0
    assert torch.equal(bits(logits_of(model, tokens)), bits(clean))
    assert 2 <= latest_checkpoint(tmp_path / "run")[0] < STEPS
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "interrupted" and "KeyboardInterrupt" in status["message"]
    kill_fit.run(str(tmp_path / "run"), STEPS, resume=True, model=model)
    assert_equals_reference(tmp_path / "run", reference)


# ------------------------------------------------------- exceptions inside attach_noise(...)
class Boom(Exception):
    pass


@pytest.mark.parametrize(
    "exc", [RuntimeError, ValueError, FloatingPointError, Boom, KeyboardInterrupt, SystemExit]
)
@pytest.mark.parametrize("where", ["body", "forward", "backward"])
def test_exception_inside_attach_noise_leaves_the_model_exact(exc, where, tiny_model, tokens):
    clean = logits_of(tiny_model, tokens)
    hooks = ["blocks.*.attn.hook_z", "blocks.0.hook_resid_pre", "blocks.1.mlp.hook_post"]
    handle = None
    with pytest.raises(exc):
        with tn.attach_noise(tiny_model, hooks, init_std=0.5, learn_mean=True) as noise:
            assert noise.attached and count_hooks(tiny_model) > 0
            if where == "forward":  # raised by a block, in the middle of a noised forward pass

                def fail(module, args):
                    raise exc("inside the forward pass")

                handle = tiny_model.blocks[1].register_forward_pre_hook(fail)
                tiny_model(tokens)
            out = tiny_model(tokens)
            if where == "backward":  # raised during backpropagation through the noise

                def fail_backward(grad):
                    raise exc("in backward")

                out.register_hook(fail_backward)
                out.sum().backward()
            raise exc("in the body")
    if handle is not None:
        handle.remove()
    assert not noise.attached
    assert count_hooks(tiny_model) == 0
    assert torch.equal(bits(logits_of(tiny_model, tokens)), bits(clean))


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_exception_during_the_probe_pass_of_attach_noise(exc, tiny_model, tokens):
    clean = logits_of(tiny_model, tokens)

    def fail(module, args):
        raise exc("during calibration")

    handle = tiny_model.blocks[1].register_forward_pre_hook(fail)
    try:
        with pytest.raises(exc, match="during calibration"):
            tn.attach_noise(tiny_model, "blocks.*.attn.hook_z", calibration_tokens=tokens)
        assert count_hooks(tiny_model) == 0  # the probe hooks of block 0 went too
    finally:
        handle.remove()
    assert torch.equal(bits(logits_of(tiny_model, tokens)), bits(clean))


# -------------------------------------------------------------------------------- devices
def test_noise_layers_live_on_their_hooks_device(tiny_model, tokens):
    """Each noise layer sits on the device of the activation at its hook.

    ``attach_noise`` reads every hook's device from its probe pass
    (:func:`tl_noise.hooks.collect_activation_stats` records ``stats[name]["device"]``) and moves
    that hook's layer there, and noise is drawn with a generator of that device. On a model split
    across GPUs (``TransformerBridge.boot_transformers(name, device_map=...)`` on TransformerLens
    4.x, ``n_devices`` on 3.x) each layer therefore follows its block. With one device this checks
    the mechanism; ``test_split_model_across_devices`` checks a real split where one exists.
    """
    hooks = ["blocks.*.attn.hook_z", "blocks.*.hook_resid_pre", "blocks.1.mlp.hook_post"]
    names = resolve_hook_names(tiny_model, hooks)
    stats = collect_activation_stats(tiny_model, names, tokens)
    seen = {}

    def recorder(name):
        def record(act, hook):
            seen[name] = act.device

        return record

    tiny_model.run_with_hooks(tokens, fwd_hooks=[(n, recorder(n)) for n in names])
    with tn.attach_noise(tiny_model, hooks, calibration_tokens=tokens, learn_mean=True) as noise:
        assert noise.hook_names == names
        for name, layer in noise.items():
            assert stats[name]["device"] == seen[name]
            assert layer.natural_scale.device == stats[name]["device"]
            for tensor in [*layer.parameters(), *layer.buffers()]:
                assert tensor.device == stats[name]["device"], name
        tiny_model(tokens)
        assert set(noise.generator_states()) == {str(d) for d in seen.values()}


def _move(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _split(model, devices: list[str]) -> None:
    """Block ``i`` on ``devices[i]``, activations moved in and back out as accelerate does."""
    model.to(devices[0])
    for block, device in zip(model.blocks, devices, strict=False):
        block.to(device)
        block.register_forward_pre_hook(
            lambda m, args, kwargs, d=device: (_move(args, d), _move(kwargs, d)), with_kwargs=True
        )
        block.register_forward_hook(lambda m, args, out, d=devices[0]: _move(out, d))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_split_model_across_devices(make_model, tokens):
    model = make_model()
    _split(model, ["cuda:0", "cuda:1"])
    for p in model.parameters():
        p.requires_grad_(False)
    clean = logits_of(model, tokens.to("cuda:0"))
    with tn.attach_noise(model, "blocks.*.attn.hook_z", calibration_tokens=tokens) as noise:
        for i, (_, layer) in enumerate(noise.items()):
            assert layer.natural_scale.device == torch.device(f"cuda:{i}")
            assert all(p.device == torch.device(f"cuda:{i}") for p in layer.parameters())
        result = fit(model, noise, tokens, steps=2, batch_size=4, quiet=True)
        assert all(torch.isfinite(s).all() for s in result.stds.values())
    assert count_hooks(model) == 0
    assert torch.equal(logits_of(model, tokens.to("cuda:0")), clean)
