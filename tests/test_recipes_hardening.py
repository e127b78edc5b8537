"""The command line under hostile use: run folders never lost or silently replaced, runs that mean
what they recorded (relocated, drifted data, foreign weights), and the report every command gives."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_recipes_cli import Tiny, argv, make_tiny, overrides, read_json

from robustft.recipes._cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.getbasetemp())


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("robustft: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def done(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A finished ft run with a shift set (and its settings)."""
    d = tiny.digits
    out = tmp_path_factory.mktemp("hardening") / "ft"
    values = overrides(tiny, out, "ft", eval={"test": str(d.test)})
    assert main([*argv(values), "--shift", f"shifted={d.shifted}"]) == 0
    return out, values


# --- run folders are precious ------------------------------------------------------------------


def test_a_finished_run_is_not_overwritten_without_a_word(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    values = overrides(tiny, out, "ft", steps=2)
    assert main(argv(values)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, _, err = _main(argv(values), capsys)
    assert code == 1
    line = _error_line(err)
    assert "finished run" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # --resume of a finished run says so and redoes nothing
    code, stdout, _ = _main(["finetune", "--resume", str(out)], capsys)
    assert code == 0 and "already finished" in stdout
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # --overwrite replaces it
    assert main([*argv(values), "--overwrite"]) == 0
    assert read_json(out / "run.json")["status"] == "finished"


def test_an_interrupted_run_is_continued_not_restarted(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    values = overrides(tiny, out, "ft", steps=4, save_every=2)
    assert main(argv(values)) == 0
    final = load_file(str(out / "last.safetensors"))
    # make it look like a run killed after its step-2 checkpoint, as a requeue script sees it
    rerun = tmp_path / "rerun"
    assert main(argv({**values, "output": str(rerun), "steps": 4, "save_every": 2})) == 0
    record = read_json(rerun / "run.json")
    record["status"] = "running"
    (rerun / "run.json").write_text(json.dumps(record), encoding="utf-8")
    code, _, err = _main(argv({**values, "output": str(rerun)}), capsys)
    assert code == 1 and f"robustft finetune --resume {rerun}" in _error_line(err)
    assert torch.equal(load_file(str(rerun / "last.safetensors"))["head"], final["head"])


def test_evaluate_and_posthoc_never_replace_a_runs_results(
    done: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = done
    before = (out / "results.json").read_bytes()
    for args in (
        ["evaluate", "--run", str(out), "--output", str(out)],
        ["evaluate", "--run", str(out), "--output", str(out), "--overwrite"],
        ["posthoc", "wise", "--runs", str(out), "--output", str(out), "--overwrite"],
    ):
        code, _, err = _main(args, capsys)
        assert code == 1 and "never writes into a run folder" in _error_line(err), args
    assert (out / "results.json").read_bytes() == before


def test_evaluate_writes_results_and_summary_to_a_new_folder(
    done: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = done
    target = tmp_path / "eval"
    code, stdout, _ = _main(
        ["evaluate", "--run", str(out), "--weights", "last", "zero-shot", "--output", str(target)],
        capsys,
    )
    assert code == 0 and "| weights | set | accuracy |" in stdout
    payload = read_json(target / "results.json")
    saved = read_json(out / "results.json")
    for weights in ("last", "zero-shot"):
        assert payload["results"][weights] == saved["results"][weights]
        assert payload["summary"][weights] == saved["summary"][weights]
    assert (target / "summary.md").read_text().startswith("# evaluate\n")
    code, _, err = _main(["evaluate", "--run", str(out), "--output", str(target)], capsys)
    assert code == 1 and "--overwrite" in _error_line(err)


# --- the report --------------------------------------------------------------------------------


def test_every_run_reports_shifts_and_the_energy_gap(done: tuple[Path, dict[str, Any]]) -> None:
    out, _ = done
    payload = read_json(out / "results.json")
    for weights in ("zero-shot", "last"):
        row = payload["summary"][weights]
        shifted = payload["results"][weights]["shifted"]["accuracy"]
        assert row["shift_mean_accuracy"] == shifted == row["shift_worst_accuracy"]
        assert row["shift_worst_set"] == "shifted" and row["energy_gap_set"] == "val"
    assert payload["summary"]["zero-shot"]["energy_gap"] == 0.0  # the model against itself
    assert payload["summary"]["last"]["energy_gap"] > 0.0
    summary = (out / "summary.md").read_text()
    assert "| weights | shift mean acc | shift worst acc (set) | energy gap |" in summary


def test_shift_mean_and_worst_over_several_sets(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tiny.digits
    out = tmp_path / "eval"
    _, _ = tmp_path, capsys
    values = overrides(tiny, tmp_path / "run", "ft", steps=1)
    assert main([*argv(values), "--shift", f"a={d.test}", "--shift", f"b={d.shifted}"]) == 0
    payload = read_json(tmp_path / "run" / "results.json")
    for weights, row in payload["summary"].items():
        accs = {n: payload["results"][weights][n]["accuracy"] for n in ("a", "b")}
        assert row["shift_mean_accuracy"] == pytest.approx(sum(accs.values()) / 2)
        assert row["shift_worst_accuracy"] == min(accs.values())
        assert row["shift_worst_set"] == min(accs, key=accs.__getitem__)
    del out


def test_templates_from_a_file(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    templates = tmp_path / "prompts.txt"
    templates.write_text("# my prompts\na photo of the digit {}.\n\na drawing of {}.\n")
    values = overrides(tiny, tmp_path / "run", "ft", steps=1, templates=str(templates))
    assert main(argv(values)) == 0
    record = read_json(tmp_path / "run" / "run.json")
    assert record["templates"] == ["a photo of the digit {}.", "a drawing of {}."]
    templates.write_text("no placeholder\n")
    code, _, err = _main(argv({**values, "output": str(tmp_path / "bad")}), capsys)
    assert code == 2 and "line 1" in _error_line(err) and "{}" in _error_line(err)


def test_pure_ood_sets_are_scored_against_the_reference(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tiny.digits
    ood = tmp_path / "ood"  # images of the unknown digits only, in folders of any name
    for digit in ("five", "six"):
        shutil.copytree(d.open / digit, ood / f"x-{digit}")
    values = overrides(tiny, tmp_path / "run", "ft", steps=1)
    assert main([*argv(values), "--ood", f"digits56={ood}"]) == 0
    m = read_json(tmp_path / "run" / "results.json")["results"]["last"]["ood:digits56"]
    n_val = read_json(tmp_path / "run" / "results.json")["results"]["last"]["val"]["num_known"]
    assert (m["num_known"], m["num_unknown"]) == (n_val, 12)
    assert 0.0 <= m["auroc"] <= 1.0 and 0.0 <= m["fpr95"] <= 1.0
    # an evaluation folder that matches no class must be declared a pure OOD set
    code, _, err = _main(
        argv({**values, "output": str(tmp_path / "r2"), "eval": {"nothing": str(ood)}}), capsys
    )
    assert code == 2 and "nothing" in _error_line(err) and "--ood" in _error_line(err)
    assert not (tmp_path / "r2" / "results.json").exists()


def test_a_validation_folder_without_known_classes_is_refused(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    val = tmp_path / "val"
    shutil.copytree(tiny.digits.open / "five", val / "five")
    values = overrides(tiny, tmp_path / "run", "ft", val=str(val))
    code, _, err = _main(argv(values), capsys)
    assert code == 2 and "val" in _error_line(err)


# --- runs mean what they recorded --------------------------------------------------------------


def test_a_run_is_relocatable_and_moved_data_is_named(
    tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny.digits.train.parent, data)
    monkeypatch.chdir(tmp_path)
    values = overrides(tiny, Path("runs/ft"), "ft", steps=1)
    values.update(train="data/train", val="data/val", classnames="data/classnames.txt")
    values["eval"] = {"test": "data/test"}
    assert main(argv(values)) == 0
    config = read_json(tmp_path / "runs" / "ft" / "config.json")
    assert config["train"] == str(tmp_path / "data" / "train")
    assert config["eval"] == {"test": str(tmp_path / "data" / "test")}
    record = read_json(tmp_path / "runs" / "ft" / "run.json")
    assert record["cwd"] == str(tmp_path) and record["classes"][0] == ["zero", "digit zero"]
    assert set(record["data"]) == {"train", "val"} and record["status"] == "finished"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", "--run", str(tmp_path / "runs" / "ft")]) == 0
    capsys.readouterr()
    os.rename(data, tmp_path / "moved")
    code, _, err = _main(["evaluate", "--run", str(tmp_path / "runs" / "ft")], capsys)
    line = _error_line(err)
    assert code == 1 and "config.json" in line and "--override train=PATH" in line
    moved = tmp_path / "moved"
    code, _, err = _main(
        [
            "evaluate",
            "--run",
            str(tmp_path / "runs" / "ft"),
            "--override",
            f"train={moved / 'train'}",
            "--override",
            f"val={moved / 'val'}",
            "--override",
            f"classnames={moved / 'classnames.txt'}",
            "--eval",
            f"test={moved / 'test'}",
        ],
        capsys,
    )
    assert code == 0, err


def test_a_reordered_class_file_or_an_added_class_is_refused(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny.digits.train.parent, data)
    values = overrides(tiny, tmp_path / "run", "ft", steps=1)
    values.update(train=str(data / "train"), val=str(data / "val"))
    values["classnames"] = str(data / "classnames.txt")
    assert main(argv(values)) == 0
    names = data / "classnames.txt"
    original = names.read_text()
    names.write_text("".join(reversed(original.splitlines(keepends=True))))
    code, _, err = _main(["evaluate", "--run", str(tmp_path / "run")], capsys)
    assert code == 1 and "another label order" in _error_line(err)
    names.write_text(original + "five\tdigit five\n")
    shutil.copytree(tiny.digits.open / "five", data / "train" / "five")
    code, _, err = _main(["evaluate", "--run", str(tmp_path / "run")], capsys)
    assert code == 1 and "added ['five']" in _error_line(err)
    code, _, err = _main(["finetune", "--resume", str(tmp_path / "run")], capsys)
    assert code == 0  # a finished run: nothing to do, nothing recomputed


def test_weights_of_the_wrong_shapes_or_classes_are_refused(
    done: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = done
    tree = load_file(str(out / "last.safetensors"))
    for rows in (3, 7):
        bad = {**tree, "head": torch.zeros(rows, tree["head"].shape[1])}
        path = tmp_path / f"head{rows}.safetensors"
        save_file(bad, str(path))
        code, _, err = _main(["evaluate", "--run", str(out), "--weights", str(path)], capsys)
        assert code == 1 and str(path) in _error_line(err) and "head" in _error_line(err)
    name = next(k for k in tree if k.startswith("visual.") and tree[k].ndim == 2)
    bad = {**tree, name: torch.zeros(1, tree[name].shape[1])}
    save_file(bad, str(tmp_path / "visual.safetensors"))
    code, _, err = _main(
        ["evaluate", "--run", str(out), "--weights", str(tmp_path / "visual.safetensors")], capsys
    )
    assert code == 1 and name in _error_line(err)


def test_ueo_zero_shot_evaluation_matches_the_runs_own_row(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tiny.digits
    values = overrides(tiny, tmp_path / "ueo", "ueo", steps=1, eval={"open": str(d.open)})
    assert main(argv(values)) == 0
    code, _, _ = _main(
        ["evaluate", "--run", str(tmp_path / "ueo"), "--weights", "zero-shot", "--output",
         str(tmp_path / "e")],
        capsys,
    )  # fmt: skip
    assert code == 0
    own = read_json(tmp_path / "ueo" / "results.json")["results"]["zero-shot"]
    assert read_json(tmp_path / "e" / "results.json")["results"]["zero-shot"] == own


def test_soups_refuse_runs_of_different_methods_unless_told(
    done: tuple[Path, dict[str, Any]],
    tiny: Tiny,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, values = done
    other = tmp_path / "kd"
    assert main(argv({**values, "method": "kd", "output": str(other)})) == 0
    args = ["posthoc", "uniform-soup", "--runs", str(out), str(other)]
    code, _, err = _main([*args, "--output", str(tmp_path / "s1")], capsys)
    assert code == 1 and "'method'" in _error_line(err) and "--allow-mixed" in _error_line(err)
    code, stdout, _ = _main([*args, "--output", str(tmp_path / "s2"), "--allow-mixed"], capsys)
    assert code == 0 and "| uniform-soup |" in stdout  # posthoc prints its table
    meta = json.loads(
        __import__("safetensors")
        .safe_open(str(tmp_path / "s2" / "uniform-soup.safetensors"), "pt")
        .metadata()["robustft"]
    )
    assert meta["kind"] == "uniform-soup" and meta["classes"][0] == ["zero", "digit zero"]
    assert "mean" in meta["preprocess"]


def test_bad_configuration_values_are_one_line(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("skip_bad_images: 'no'\n")
    values = overrides(tiny, tmp_path / "run", "ft")
    code, _, err = _main([*argv(values), "--config", str(config)], capsys)
    assert code == 2 and "--skip-bad-images" in _error_line(err)
    config.write_text("lr: [1\n")
    code, _, err = _main([*argv(values), "--config", str(config)], capsys)
    assert code == 2 and str(config) in _error_line(err)
    code, _, err = _main([*argv(values), "--device", "tpu9"], capsys)
    assert code == 2 and "tpu9" in _error_line(err)
    code, _, err = _main([*argv(values), "--lp-c", ","], capsys)
    assert code == 2 and "--lp-c" in _error_line(err)
    assert not (tmp_path / "run").exists()
