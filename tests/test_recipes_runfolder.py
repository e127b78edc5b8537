"""The run folder's own rules: atomic writes, claiming a folder, the lock, the recorded facts and
the checks every later command makes against them."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from robustft.recipes import _runfolder as run
from robustft.recipes._config import resolve
from robustft.recipes._runfolder import RunError
from robustft.recipes._runtime import one_line

# --- atomic writes -----------------------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    run.atomic_write(path, "old")
    run.atomic_write(path, b"new")
    assert path.read_text() == "new"
    run.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and path.read_text().endswith("}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        (errno.ENOSPC, "free some space"),
        (errno.EROFS, "read-only"),
        (errno.EACCES, "read-only"),
        (errno.EIO, "check the folder"),
    ],
)
def test_a_failed_write_keeps_the_old_file_and_says_what_to_do(
    tmp_path: Path, code: int, fix: str
) -> None:
    path = tmp_path / "summary.md"
    run.atomic_write(path, "kept")

    def writer(tmp: Path) -> None:
        tmp.write_text("partial")
        raise OSError(code, os.strerror(code))

    with pytest.raises(RunError) as info:
        run.atomic_write(path, writer)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and fix in message
    assert path.read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.md"]  # the temporary is gone


def test_torch_save_failure_inside_a_runtime_error_is_a_run_error(tmp_path: Path) -> None:
    def writer(tmp: Path) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64")

    with pytest.raises(RunError, match="could not write"):
        run.atomic_write(tmp_path / "checkpoint.pt", writer)

    def other(tmp: Path) -> None:
        raise RuntimeError("a bug, not a disk")

    with pytest.raises(RuntimeError, match="a bug") as info:
        run.atomic_write(tmp_path / "x", other)
    assert not isinstance(info.value, RunError)


def test_a_kill_during_a_write_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    run.write_json(path, {"v": "old"})
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from robustft.recipes._runfolder import atomic_write

        def writer(tmp):
            tmp.write_text('{{"v": "ne')
            os.kill(os.getpid(), signal.SIGKILL)

        atomic_write(Path({str(path)!r}), writer)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True)
    assert proc.returncode == -9
    assert json.loads(path.read_text()) == {"v": "old"}
    run.write_json(path, {"v": "new"})  # the stale temporary never blocks a later write
    assert json.loads(path.read_text()) == {"v": "new"}


# --- claiming a folder -------------------------------------------------------------------------


def _finished(folder: Path, command: str = "finetune") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    run.write_json(folder / "config.json", {})
    run.write_json(folder / "run.json", {"command": command, "status": "finished"})
    run.write_json(folder / "results.json", {})
    (folder / "last.safetensors").write_bytes(b"x")
    return folder


def _interrupted(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    run.write_json(folder / "config.json", {})
    run.write_json(folder / "run.json", {"command": "finetune", "status": "running"})
    (folder / "checkpoint.pt").write_bytes(b"x")
    return folder


def test_states(tmp_path: Path) -> None:
    assert run.state(tmp_path / "new") == "absent"
    assert run.state(tmp_path) == "empty"
    assert run.state(_finished(tmp_path / "f")) == "finished"
    assert run.state(_interrupted(tmp_path / "i")) == "interrupted"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cat.png").write_bytes(b"x")
    assert run.state(tmp_path / "data") == "foreign"
    # a finished run rerun and killed: results.json from before, run.json says running
    mixed = _finished(tmp_path / "m")
    run.write_json(mixed / "run.json", {"command": "finetune", "status": "running"})
    assert run.state(mixed) == "interrupted"


def test_claim_new_and_empty_folders(tmp_path: Path) -> None:
    out = run.claim(tmp_path / "a" / "b", command="finetune", overwrite=False, resume=False)
    assert out.is_dir() and out.is_absolute()
    assert run.claim(out, command="finetune", overwrite=False, resume=False) == out


def test_a_finished_run_is_never_replaced_silently(tmp_path: Path) -> None:
    folder = _finished(tmp_path / "run")
    with pytest.raises(RunError) as info:
        run.claim(folder, command="finetune", overwrite=False, resume=False)
    assert "finished run" in str(info.value) and "--overwrite" in str(info.value)
    assert (folder / "results.json").exists()
    (folder / "notes.txt").write_text("mine")
    run.claim(folder, command="finetune", overwrite=True, resume=False)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]  # only the run's files


def test_an_interrupted_run_names_the_resume_command(tmp_path: Path) -> None:
    folder = _interrupted(tmp_path / "run")
    with pytest.raises(RunError) as info:
        run.claim(folder, command="ueo", overwrite=False, resume=False)
    assert f"robustft ueo --resume {folder}" in str(info.value)
    assert run.claim(folder, command="ueo", overwrite=False, resume=True) == folder


def test_resume_needs_a_run_and_foreign_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="holds no run to continue"):
        run.claim(tmp_path / "none", command="finetune", overwrite=False, resume=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.png").write_bytes(b"x")
    for overwrite in (False, True):
        with pytest.raises(RunError, match="holds no robustft run"):
            run.claim(tmp_path / "data", command="finetune", overwrite=overwrite, resume=False)
    assert (tmp_path / "data" / "x.png").exists()


def test_evaluate_and_posthoc_never_write_into_a_training_run(tmp_path: Path) -> None:
    folder = _finished(tmp_path / "run")
    for command in ("evaluate", "posthoc"):
        with pytest.raises(RunError, match="never writes into a run folder"):
            run.claim(folder, command=command, overwrite=True, resume=False)
    assert (folder / "results.json").exists()
    results = _finished(tmp_path / "eval", command="evaluate")
    run.claim(results, command="evaluate", overwrite=True, resume=False)
    assert not (results / "results.json").exists()


def test_the_lock_refuses_a_second_writer(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from robustft.recipes._runfolder import RunError, locked
        try:
            with locked(Path({str(tmp_path)!r})):
                pass
        except RunError as err:
            print(err)
            sys.exit(3)
        """
    )
    with run.locked(tmp_path):
        claim = f"from robustft.recipes._runfolder import claim; claim({str(tmp_path)!r}, "
        claim += "command='finetune', overwrite=True, resume=False)"
        refused = subprocess.run(
            [sys.executable, "-c", claim], timeout=120, capture_output=True, text=True
        )
        assert refused.returncode == 1 and "being written by another" in refused.stderr
        proc = subprocess.run(
            [sys.executable, "-c", script], timeout=120, capture_output=True, text=True
        )
        assert proc.returncode == 3, proc.stderr
        assert f"pid {os.getpid()}" in proc.stdout and "another robustft process" in proc.stdout
    proc = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True)
    assert proc.returncode == 0  # released when the holder ends
    with run.locked(tmp_path, active=False):  # ranks other than 0 take no lock
        pass


# --- recorded facts ----------------------------------------------------------------------------


def _facts(classes: list[list[str]], images: int = 10, fp: str = "abc") -> dict:
    return {
        "classes": classes,
        "templates": ["a photo of a {}."],
        "preprocess": {"mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "shortest"},
        "data": {"train": {"root": "/d/train", "images": images, "fingerprint": fp}},
    }


CLASSES = [["cat", "cat"], ["dog", "dog"], ["fox", "red fox"]]


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        ([["dog", "dog"], ["cat", "cat"], ["fox", "red fox"]], "another label order (label 0"),
        ([*CLASSES, ["owl", "owl"]], "added ['owl']"),
        (CLASSES[:2], "missing ['fox']"),
        ([["cat", "cat"], ["dog", "dog"], ["fox", "fox"]], "readable name of class 'fox'"),
    ],
)
def test_class_drift_is_named(now: list[list[str]], expected: str) -> None:
    with pytest.raises(RunError) as info:
        run.check_record(_facts(CLASSES), _facts(now), where="evaluate", sets=("train",))
    assert expected in str(info.value) and str(info.value).startswith("evaluate: ")


def test_lipsum_vocabulary_drift_is_named() -> None:
    before = {**_facts(CLASSES), "lipsum_vocabulary": [320, 1125, 539]}
    run.check_record(before, dict(before), where="x", sets=("train",))  # unchanged
    run.check_record(_facts(CLASSES), before, where="x", sets=("train",))  # recorded before it
    with pytest.raises(RunError, match=r"Lipsum-FT vocabulary differs \(3 token ids recorded, "
                       r"2 token ids now\)"):  # fmt: skip
        run.check_record(
            before, {**before, "lipsum_vocabulary": [320, 539]}, where="x", sets=("train",)
        )
    with pytest.raises(RunError, match=r"3 token ids recorded, the whole vocabulary now"):
        run.check_record(before, _facts(CLASSES), where="x", sets=("train",))


def test_data_templates_and_preprocessing_drift_are_named() -> None:
    before = _facts(CLASSES)
    run.check_record(before, _facts(CLASSES), where="x", sets=("train", "val"))  # unchanged
    with pytest.raises(RunError, match=r"train images changed \(10 images then, 11 now"):
        run.check_record(before, _facts(CLASSES, 11, "def"), where="x", sets=("train",))
    run.check_record(before, _facts(CLASSES, 11, "def"), where="x", sets=())  # not checked
    templates = {**_facts(CLASSES), "templates": ["a {}."] * 2}
    with pytest.raises(RunError, match="prompt templates differ"):
        run.check_record(before, templates, where="x", sets=())
    pre = _facts(CLASSES)
    pre["preprocess"] = {**pre["preprocess"], "mean": [0.4] * 3}
    with pytest.raises(RunError, match="image preprocessing differs"):
        run.check_record(before, pre, where="x", sets=())
    run.check_record({}, _facts([["a", "a"]]), where="x", sets=("train",))  # an older run


def test_fingerprint_follows_paths_labels_and_order(tmp_path: Path) -> None:
    a = [(str(tmp_path / "cat" / "0.png"), 0), (str(tmp_path / "dog" / "0.png"), 1)]
    assert run.fingerprint(a, tmp_path) == run.fingerprint(a, tmp_path)
    assert run.fingerprint(a, tmp_path) != run.fingerprint(a[::-1], tmp_path)
    assert run.fingerprint(a, tmp_path) != run.fingerprint([(a[0][0], 1), a[1]], tmp_path)
    moved = [(p.replace(str(tmp_path), "/elsewhere"), y) for p, y in a]
    assert run.fingerprint(a, tmp_path) == run.fingerprint(moved, "/elsewhere")  # relocatable


def test_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train").mkdir()
    (tmp_path / "names.txt").write_text("cat\n")
    config = resolve(
        {
            "train": "train",
            "classnames": "names.txt",
            "eval": ["v2=sets/v2"],
            "shift": ["r=sets/r"],
            "model": "ViT-B-16",
            "pretrained": "openai",
            "output": "runs/a",
        }
    )
    fixed = run.absolute(config)
    assert fixed.train == str(tmp_path / "train")
    assert fixed.classnames == str(tmp_path / "names.txt")
    assert fixed.output == str(tmp_path / "runs" / "a")
    assert fixed.eval == {"v2": str(tmp_path / "sets" / "v2")}
    assert fixed.shift == {"r": str(tmp_path / "sets" / "r")}
    assert (fixed.model, fixed.pretrained, fixed.templates) == ("ViT-B-16", "openai", "openai")
    assert config.train == "train"  # the input is not changed
    assert run.absolute(fixed) == fixed


def test_one_line_messages() -> None:
    worker = RuntimeError(
        "Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in f\n    raise\n'
        "robustft.recipes._data.BadImageError: train: cannot read image 'a.png': truncated"
    )
    assert one_line(worker) == "train: cannot read image 'a.png': truncated"
    assert one_line(ValueError("a\nb")) == "a b"
    assert one_line(KeyError()) == "KeyError"


def test_damaged_run_files_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text('{"status": "fini')
    with pytest.raises(RunError) as info:
        run.read_record(tmp_path, option="--run")
    message = str(info.value)
    assert message.startswith("--run: ") and "run.json" in message and "damaged" in message
    assert "\n" not in message
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(RunError, match=r"config.json' must hold a JSON object"):
        run.read_json(tmp_path / "config.json", option="--resume")
    assert run.read_record(tmp_path / "absent", option="--run") == {}


def test_write_record_holds_the_job_and_its_facts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run.write_record(tmp_path, command="evaluate", status="finished", weights=["last"])
    record = run.read_record(tmp_path, option="--run")
    assert record["command"] == "evaluate" and record["status"] == "finished"
    assert record["weights"] == ["last"] and record["cwd"] == str(tmp_path)
    assert set(record["versions"]) >= {"robustft", "torch"} and isinstance(record["argv"], list)
