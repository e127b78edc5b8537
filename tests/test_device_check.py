"""benchmarks/device_check.py: the CPU mode end to end, and the rules of its one-shot GPU run.

The CPU run (``--cpu``, tiny sizes) goes through every code path of the GPU run, so a change that
breaks the device check fails here, not on the GPU machine. The other tests pin what makes the
one shot robust: a failing device test is the only thing that makes the exit status 1, a section
that raises is recorded and the run goes on, and sections are skipped once the budget is spent.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.py"

EXPECTED: dict[str, Any] = {
    "device_tests": {
        "status": str,
        "seconds": float,
        "returncode": int,
        "tests": int,
        "passed": int,
        "failed": int,
        "errors": int,
        "skipped": int,
        "failures": list,
    },
    "averaging": {
        "status": str,
        "seconds": float,
        "tensors": int,
        "elements": int,
        "fp32_bytes": int,
        "copy": ("ms", "gb_per_s"),
        "foreach_lerp": ("ms", "gb_per_s", "fraction_of_copy", "pairs"),
        **{
            name: ("ms", "gb_per_s", "fraction_of_copy", "ratio_to_foreach_lerp", "pairs")
            for name in ("ema_update_", "bma_update_", "bma_update_bf16_params")
        },
    },
    "steps": {
        "status": str,
        "seconds": float,
        "batch": int,
        "classes": int,
        "pretrained_model_gib": float,
        "ft": ("ms", "peak_gib"),
        **{m: ("ms", "ratio_to_ft", "peak_gib", "pairs") for m in ("clipood", "lipsum", "ueo")},
    },
    "evaluation": {
        "status": str,
        "seconds": float,
        "images": int,
        "batch": int,
        "ratio_to_bare": float,
        "peak_gib": float,
        "evaluate": ("ms", "images_per_s"),
        "bare_forward": ("ms", "images_per_s"),
        "forward_on_device": ("ms", "images_per_s"),
    },
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def device_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def in_tmp(tmp_path: Path) -> Iterator[Path]:
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)  # main() sets the thread count for its run


def test_cpu_mode_writes_every_expected_key_with_finite_numbers(tmp_path: Path) -> None:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("ROBUSTFT_DEVICE_TESTS", None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "device_check.json").read_text(encoding="utf-8"))
    assert report["schema"] == "robustft-device-check/1" and report["mode"] == "cpu"
    assert report["exit_code"] == 0 and _number(report["seconds"])
    env_keys = {"device", "torch", "cuda", "python", "robustft", "open_clip", "git_commit"}
    assert env_keys <= report["environment"].keys()
    assert report["environment"]["torch"] == torch.__version__
    sections = report["sections"]
    assert set(sections) == set(EXPECTED)
    for name, keys in EXPECTED.items():
        entry = sections[name]
        assert entry["status"] == "ok", (name, entry)
        for key, kind in keys.items():
            assert key in entry, (name, key)
            if isinstance(kind, tuple):
                for sub in kind:
                    assert _number(entry[key][sub]), (name, key, sub, entry[key])
            elif kind is float:
                assert _number(entry[key]), (name, key, entry[key])
            else:
                assert isinstance(entry[key], kind), (name, key, entry[key])
    tests = sections["device_tests"]
    assert tests["failed"] == tests["errors"] == 0 and tests["skipped"] >= 1
    if not torch.cuda.is_available():
        assert tests["passed"] == 0  # the device tests skip themselves without CUDA
    assert sections["steps"]["ft"]["peak_gib"] > 0 and sections["averaging"]["elements"] > 0
    table = (tmp_path / "device_check.md").read_text(encoding="utf-8")
    assert table.startswith("Device check, cpu mode: cpu, torch ")
    for row in ("EMA update_", "BMA update_", "CLIPood step", "Lipsum-FT step", "UEO step"):
        assert f"| {row}" in table, row
    assert "| Evaluator.evaluate" in table
    assert table in done.stdout  # printed, as well as written
    assert (tmp_path / "device_tests.xml").exists() and (tmp_path / "device_tests.log").exists()


def _failing_device_test(folder: Path) -> Path:
    path = folder / "test_failing_device.py"
    path.write_text(
        "import pytest\n\n\n"
        "@pytest.mark.device\n"
        "def test_fails() -> None:\n"
        "    assert 1 == 2\n\n\n"
        "@pytest.mark.device\n"
        "def test_passes() -> None:\n"
        "    pass\n",
        encoding="utf-8",
    )
    return path


def test_a_failing_device_test_makes_the_exit_status_1(
    device_check: ModuleType, in_tmp: Path
) -> None:
    failing = _failing_device_test(in_tmp)
    skip = ["--skip", "averaging", "--skip", "steps", "--skip", "evaluation"]
    out = in_tmp / "out"
    code = device_check.main(["--cpu", "--out", str(out), "--tests", str(failing), *skip])
    assert code == 1
    report = json.loads((out / "device_check.json").read_text(encoding="utf-8"))
    tests = report["sections"]["device_tests"]
    assert tests["status"] == "failed" and report["exit_code"] == 1
    assert (tests["passed"], tests["failed"], tests["errors"]) == (1, 1, 0)
    assert [name.split("::")[-1] for name in tests["failures"]] == ["test_fails"]
    assert report["sections"]["steps"] == {"status": "skipped", "reason": "--skip"}
    table = (out / "device_check.md").read_text(encoding="utf-8")
    assert "Device tests: failed — 1 passed, 1 failed" in table and "test_fails" in table


def test_a_raising_section_is_recorded_and_the_run_goes_on(
    device_check: ModuleType, in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(setup: Any, budget: Any) -> dict:
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    monkeypatch.setattr(device_check, "section_averaging", broken)
    out = in_tmp / "out"
    code = device_check.main(
        ["--cpu", "--out", str(out), "--skip", "device_tests", "--skip", "steps"]
    )
    assert code == 0  # only a failing device test fails the run
    sections = json.loads((out / "device_check.json").read_text(encoding="utf-8"))["sections"]
    assert sections["averaging"]["status"] == "error"
    assert sections["averaging"]["error"] == (
        "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"  # one line
    )
    assert sections["evaluation"]["status"] == "ok"  # the next section still ran
    table = (out / "device_check.md").read_text(encoding="utf-8")
    assert "| averaging | error: RuntimeError: CUDA out of memory." in table


def test_sections_are_skipped_once_the_budget_is_spent(
    device_check: ModuleType, in_tmp: Path
) -> None:
    out = in_tmp / "out"
    assert device_check.main(["--cpu", "--out", str(out), "--budget", "1e-6"]) == 0
    sections = json.loads((out / "device_check.json").read_text(encoding="utf-8"))["sections"]
    for name in ("device_tests", "averaging", "steps", "evaluation"):
        assert sections[name]["status"] == "skipped", name
        assert sections[name]["reason"].startswith("time budget spent"), name


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cpu", "--budget", "0"], "--budget must be a positive number of seconds, got 0.0"),
        (["--cpu", "--test-timeout", "nan"], "--test-timeout must be a positive number"),
        (["--cpu", "--skip", "everything"], "argument --skip: invalid choice: 'everything'"),
    ],
)
def test_bad_arguments_fail_in_one_line(
    device_check: ModuleType, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        device_check.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_written_fails_in_one_line(
    device_check: ModuleType, in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = in_tmp / "a-file"
    taken.write_text("not a folder", encoding="utf-8")
    assert device_check.main(["--cpu", "--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("device_check: error: --out: ") and str(taken) in err
    assert "\n" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_the_gpu_mode_says_to_add_cpu(
    device_check: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        device_check.main(["--out", "unused"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no CUDA device is visible to torch" in err and "add --cpu" in err


def test_device_test_files_are_the_files_that_mark_device_tests(
    device_check: ModuleType, tmp_path: Path
) -> None:
    assert device_check.device_test_files() == ["tests/test_device.py"]
    (tmp_path / "tests").mkdir()
    _failing_device_test(tmp_path / "tests")
    (tmp_path / "tests" / "test_other.py").write_text("def test_x() -> None:\n    pass\n")
    assert device_check.device_test_files(tmp_path) == ["tests/test_failing_device.py"]
    assert device_check.device_test_files(tmp_path / "nothing") == []
