"""``--resume``: a run killed mid-epoch (SIGKILL of a real ``python -m robustft`` process) and
resumed ends with the weights, averages and metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_recipes_cli import Tiny, argv, make_tiny, metrics_lines, overrides, read_json, run

from robustft.recipes import _loop
from robustft.recipes._cli import main

# 60 images / batch 8: 7 steps per epoch, so a 12-step run crosses an epoch boundary; the killed
# process has logged steps 1..5 and checkpointed step 4 when it is killed
STEPS, SAVE_EVERY, HANG_AT = 12, 2, 5

# Installed through PYTHONPATH in the child only: loading the batch of optimiser step HANG_AT
# blocks, so the test kills the process at a known point (after the step-4 checkpoint and the
# step-5 metrics line, in the middle of the first epoch).
SITECUSTOMIZE = """
import os, time
_at = os.environ.get("ROBUSTFT_TEST_HANG_AT")
if _at is not None:
    from robustft.recipes import _loop
    _get = _loop.Seeded.__getitem__
    def _hang(self, key):
        if key[2] >= int(_at):
            time.sleep(600)
        return _get(self, key)
    _loop.Seeded.__getitem__ = _hang
"""

CASES: dict[str, dict[str, Any]] = {
    # Adam state + BMA average; the margin softmax over frozen class texts
    "clipood": {"lr": 1e-3},
    # Adam state + the frozen teacher and the random texts of each step
    "lipsum": {"lr": 1e-3},
    # SGD with momentum (a buffer to restore) on the prompt context and norm affines
    "ueo": {"lr": 0.05, "momentum": 0.9},
}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.getbasetemp())


def _values(tiny: Tiny, out: Path, method: str, **extra: Any) -> dict[str, Any]:
    fields = {"steps": STEPS, "save_every": SAVE_EVERY, **CASES.get(method, {}), **extra}
    return overrides(tiny, out, method, **fields)


def _steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def hang_env(base: Path) -> dict[str, str]:
    """The environment of a ``python -m robustft`` that hangs at step ``HANG_AT`` (the hook is
    a ``sitecustomize.py`` written under ``base/hooks``), to be SIGKILLed at a known point."""
    hooks = base / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ROBUSTFT_TEST_HANG_AT": str(HANG_AT),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
    }


@pytest.fixture(scope="module")
def killed(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """One real ``python -m robustft`` process per method, started together, each SIGKILLed once
    it has checkpointed step 4 and logged step 5; their run folders."""
    base = tmp_path_factory.mktemp("killed")
    env = hang_env(base)
    procs: dict[str, tuple[subprocess.Popen[str], Path]] = {}
    try:
        for method in CASES:
            out = base / method
            cmd = [sys.executable, "-m", "robustft", *argv(_values(tiny, out, method))]
            procs[method] = (
                subprocess.Popen(
                    cmd,
                    cwd=base,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
                out,
            )
        deadline = time.monotonic() + 240
        waiting = set(procs)
        while waiting:
            for method in sorted(waiting):
                proc, out = procs[method]
                if proc.poll() is not None:
                    raise AssertionError(
                        f"{method} exited with {proc.returncode}: {proc.communicate()[1]}"
                    )
                logged = max(_steps_logged(out), default=0)
                if (out / "checkpoint.pt").exists() and logged >= HANG_AT:
                    proc.send_signal(signal.SIGKILL)
                    assert proc.wait(timeout=60) == -signal.SIGKILL
                    waiting.discard(method)
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {sorted(waiting)} to reach step {HANG_AT}"
                )
            time.sleep(0.05)
        yield {method: out for method, (_, out) in procs.items()}
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
            if proc.stderr is not None:
                proc.stderr.close()


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Same final weights (and average), same per-step losses and learning rates."""
    names = ["last"] + (["average"] if (reference / "average.safetensors").exists() else [])
    assert (resumed / "average.safetensors").exists() == ("average" in names)
    for name in names:
        a, b = (
            load_file(str(resumed / f"{name}.safetensors")),
            load_file(str(reference / f"{name}.safetensors")),
        )
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k, name=name: f"{name} {k}: {m}")
    got, want = metrics_lines(resumed), metrics_lines(reference)
    assert [line["step"] for line in got] == [line["step"] for line in want]
    for g, w in zip(got, want, strict=True):
        for key in set(w) - {"seconds"}:
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (g["step"], key)
    results = read_json(resumed / "results.json")
    assert results["steps"] == read_json(reference / "results.json")["steps"]


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("method", list(CASES))
def test_resume_after_sigkill_equals_an_uninterrupted_run(
    tiny: Tiny, killed: dict[str, Path], tmp_path: Path, method: str
) -> None:
    out = killed[method]
    # the process died mid-run: a checkpoint, metrics past it, no final files
    assert _steps_logged(out) == list(range(1, HANG_AT + 1))
    assert not (out / "results.json").exists() and not (out / "last.safetensors").exists()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert int(saved["loop"]["step"]) == HANG_AT - 1

    assert main(["ueo" if method == "ueo" else "finetune", "--resume", str(out)]) == 0
    reference = run(_values(tiny, tmp_path / "uninterrupted", method))
    assert_same_run(out, reference)
    # the step logged after the checkpoint is not repeated
    assert _steps_logged(out) == list(range(1, STEPS + 1))
    assert read_json(out / "config.json") == {
        **read_json(reference / "config.json"),
        "output": str(out),
    }

    # the comparison can fail: the trained tensors moved well past the tolerance after the checkpoint
    final = torch.load(out / "checkpoint.pt", weights_only=True)
    assert int(final["loop"]["step"]) == STEPS
    assert _distance(final["module"], saved["module"]) > 1e-3


def test_another_seed_gives_other_weights(tiny: Tiny, tmp_path: Path) -> None:
    # the data order and augmentations matter at the resume tolerance: a resume that lost them fails
    first = run(_values(tiny, tmp_path / "seed0", "clipood"))
    other = run(_values(tiny, tmp_path / "seed1", "clipood", seed=1))
    a, b = load_file(str(first / "last.safetensors")), load_file(str(other / "last.safetensors"))
    assert _distance(a, b) > 1e-3


class _StopError(Exception):
    """Raised inside the loop to stop a run in this process."""


def _stop_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    get = _loop.Seeded.__getitem__

    def stop(self: Any, key: tuple[int, int, int]) -> Any:
        if key[2] >= step:
            raise _StopError(f"stopped at step {step}")
        return get(self, key)

    monkeypatch.setattr(_loop.Seeded, "__getitem__", stop)


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("ft", {"average": "ema", "ema_decay": 0.5, "eval_every": 3, "select": "best", "lr": 1e-3}),
        ("flyp", {"lr": 1e-3, "accumulation": 2}),
        ("kd", {"average": "uniform", "lr": 1e-3, "log_every": 2}),
        ("entropy", {"lr": 0.05}),
    ],
)
def test_stop_and_resume_in_process(
    tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, extra: dict[str, Any]
) -> None:
    values = _values(tiny, tmp_path / "stopped", method, **extra)
    with monkeypatch.context() as patch:
        _stop_at(patch, 7)  # after the step-6 checkpoint: resume from 6
        with pytest.raises(_StopError):
            main(argv(values))
    assert (
        int(torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["loop"]["step"])
        == 6
    )
    command = "ueo" if method == "entropy" else "finetune"
    assert main([command, "--resume", str(tmp_path / "stopped")]) == 0
    reference = run(_values(tiny, tmp_path / "uninterrupted", method, **extra))
    assert_same_run(tmp_path / "stopped", reference)
    if extra.get("select") == "best":
        assert "best" in read_json(reference / "results.json")["results"]
        for k, v in load_file(str(reference / "best.safetensors")).items():
            torch.testing.assert_close(
                load_file(str(tmp_path / "stopped" / "best.safetensors"))[k], v
            )


def test_resuming_a_finished_run_changes_nothing(tiny: Tiny, tmp_path: Path) -> None:
    out = run(_values(tiny, tmp_path / "done", "clipood", steps=4))
    before = load_file(str(out / "last.safetensors"))
    lines = metrics_lines(out)
    assert main(["finetune", "--resume", str(out)]) == 0
    after = load_file(str(out / "last.safetensors"))
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    assert metrics_lines(out) == lines


def test_resume_without_a_checkpoint(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        _stop_at(patch, 1)  # dies before the first checkpoint
        with pytest.raises(_StopError):
            main(argv(_values(tiny, out, "ft")))
    assert (out / "config.json").exists() and not (out / "checkpoint.pt").exists()
    assert main(["finetune", "--resume", str(out)]) == 2
    assert (
        f"robustft: error: resume: run folder '{out}' has no checkpoint.pt to resume from"
        in capsys.readouterr().err
    )


def test_resume_refuses_a_changed_computation(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--resume continues the run as configured: a new lr or length is refused, a new
    progress or logging setting is allowed."""
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        _stop_at(patch, 1)
        with pytest.raises(_StopError):
            main(argv(_values(tiny, out, "ft")))
    assert main(["finetune", "--resume", str(out), "--lr", "0.5", "--steps", "99"]) == 2
    err = capsys.readouterr().err
    assert "robustft: error: --resume continues the run as it was configured" in err
    assert "got new values for --steps, --lr" in err
    # allowed changes get past the check (and then stop at the missing checkpoint)
    assert main(["finetune", "--resume", str(out), "--no-progress", "--log-every", "3"]) == 2
    assert "has no checkpoint.pt to resume from" in capsys.readouterr().err
