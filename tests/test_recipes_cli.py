"""The ``robustft`` command end to end on tiny digit folders and a tiny CLIP: every method's run
folder, post-hoc and evaluate commands, configuration files, ``--help`` and bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from recipes_fixtures import KNOWN, DigitFolders, write_digits, write_tiny_config
from safetensors.torch import load_file, save_file

from robustft.recipes import METHOD_DEFAULTS, METHODS, load_model, lr_factor, resolve
from robustft.recipes._cli import main
from robustft.recipes._config import SUPERVISED, UNSUPERVISED, RunConfig

METRIC_KEYS = {
    "accuracy",
    "per_class_accuracy",
    "macro_f1",
    "nll",
    "ece",
    "auroc",
    "aupr_in",
    "aupr_out",
    "fpr95",
    "os_star",
    "unk",
    "hos",
    "num_known",
    "num_unknown",
    "threshold",
}
OPEN_SET_KEYS = ("auroc", "aupr_in", "aupr_out", "fpr95", "os_star", "unk", "hos")


class Tiny(NamedTuple):
    """The digit folders, the tiny model config and its (random) pre-trained weights."""

    digits: DigitFolders
    config: Path
    weights: Path


def make_tiny(base: Path) -> Tiny:
    """Write the folders and the tiny model once per session under ``base`` (shared by the files)."""
    root = base / "recipes-tiny"
    names = ("train", "val", "test", "shifted", "open")
    digits = DigitFolders(
        *(root / "digits" / n for n in names), names_file=root / "digits" / "classnames.txt"
    )
    tiny = Tiny(digits, root / "recipes-tiny-clip.json", root / "recipes-tiny-clip.safetensors")
    if not (root / "done").exists():
        write_digits(root / "digits")
        write_tiny_config(tiny.config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = load_model(tiny.config).model
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tiny.weights))
        (root / "done").write_text("ok", encoding="utf-8")
    return tiny


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.getbasetemp())


def overrides(tiny: Tiny, out: Path, method: str, **extra: Any) -> dict[str, Any]:
    """The fields of a short run on the digits (train: labelled known classes, or for the
    unsupervised methods the unlabeled open-set folder with unknown digits)."""
    d = tiny.digits
    values: dict[str, Any] = {
        "method": method,
        "model": str(tiny.config),
        "pretrained": str(tiny.weights),
        "train": str(d.open if method in UNSUPERVISED else d.train),
        "val": str(d.val),
        "classnames": str(d.names_file),
        "output": str(out),
        "steps": 3,
        "batch_size": 8,
        "workers": 0,
        "progress": False,
        "templates": "simple",
        "log_every": 1,
        "lipsum_texts": 8,
    }
    values.update(extra)
    return values


def argv(values: dict[str, Any]) -> list[str]:
    """``robustft finetune|ueo --field value ...`` for a dict of fields."""
    args = ["ueo" if values["method"] in UNSUPERVISED else "finetune"]
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif key == "eval":
            for name, path in value.items():
                args += [flag, f"{name}={path}"]
        else:
            args += [flag, str(value)]
    return args


def run(values: dict[str, Any]) -> Path:
    """Run the command in this process; the run folder."""
    assert main(argv(values)) == 0
    return Path(values["output"])


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def metrics_lines(run_dir: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    ]


# --- every method's run folder -----------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_method_writes_a_complete_run_folder(tiny: Tiny, tmp_path: Path, method: str) -> None:
    d = tiny.digits
    sets = {"test": str(d.test), "shifted": str(d.shifted), "open": str(d.open)}
    values = overrides(tiny, tmp_path / method, method, eval=sets)
    out = run(values)
    config = resolve(values)

    # config.json is the resolved configuration, with the method's own defaults
    saved = read_json(out / "config.json")
    assert saved == config.to_json()
    for key in ("optimizer", "lr", "weight_decay", "average"):
        assert saved[key] == METHOD_DEFAULTS[method][key]

    # one metrics line per step; the logged lr is the schedule's
    lines = metrics_lines(out)
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line in lines:
        assert set(line) == {"step", "loss", "lr", "seconds"} and math.isfinite(line["loss"])
        expected = config.lr * lr_factor(line["step"] - 1, 3, config.warmup or 0.0, config.schedule)
        assert line["lr"] == pytest.approx(expected, rel=1e-12)

    # results.json: every metric per set and weights; open-set metrics exactly on the open set
    payload = read_json(out / "results.json")
    assert payload["method"] == method and payload["steps"] == 3 and payload["train_seconds"] > 0
    weights = ["zero-shot", "last"] + (["average"] if config.average != "none" else [])
    assert list(payload["results"]) == weights
    for name in weights:
        per_set = payload["results"][name]
        assert list(per_set) == ["val", "test", "shifted", "open"]
        thresholds = {m["threshold"] for m in per_set.values()}
        assert len(thresholds) == 1 and None not in thresholds  # τ chosen once, on val
        for set_name, m in per_set.items():
            assert set(m) == METRIC_KEYS
            assert 0.0 <= m["accuracy"] <= 1.0 and m["nll"] > 0 and 0.0 <= m["ece"] <= 1.0
            assert 0.0 <= m["macro_f1"] <= 1.0 and 0.0 <= m["per_class_accuracy"] <= 1.0
            if set_name == "open":
                assert (m["num_known"], m["num_unknown"]) == (KNOWN * 12, 12)
                for key in OPEN_SET_KEYS:
                    assert 0.0 <= m[key] <= 1.0, key
                os_star, unk = m["os_star"], m["unk"]
                hos = 0.0 if os_star + unk == 0 else 2 * os_star * unk / (os_star + unk)
                assert m["hos"] == pytest.approx(hos, abs=1e-6)
            else:
                assert m["num_unknown"] == 0 and m["num_known"] == (
                    KNOWN * 4 if set_name == "val" else KNOWN * 12
                )
                assert all(m[key] is None for key in OPEN_SET_KEYS)
    if method == "lp-ft":
        probe = payload["linear_probe"]
        assert probe["C"] in (0.01, 0.1, 1.0, 10.0, 100.0) and len(probe["val_accuracy"]) == 5

    # summary.md: one table row per (weights, set)
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert summary.startswith(f"# {method}\n") and "| weights | set | accuracy |" in summary
    for name in weights:
        for set_name in ("val", "test", "shifted", "open"):
            assert f"| {name} | {set_name} |" in summary

    # the weights: the classifier (visual tower + head) in safetensors, trained away from θ0
    visual = dict(load_model(tiny.config, pretrained=tiny.weights).model.visual.named_parameters())
    for name in weights[1:]:
        tree = load_file(str(out / f"{name}.safetensors"))
        assert set(tree) == {"head"} | {f"visual.{k}" for k in visual}
        assert tree["head"].shape == (KNOWN, 32)
        assert all(bool(t.isfinite().all()) for t in tree.values())
        assert any(not torch.equal(tree[f"visual.{k}"], v) for k, v in visual.items())
    assert (out / "average.safetensors").exists() == (config.average != "none")
    assert (out / "checkpoint.pt").exists()


def test_validation_split_held_out_of_train(tiny: Tiny, tmp_path: Path) -> None:
    values = overrides(tiny, tmp_path / "run", "ft", val_fraction=0.25)
    del values["val"]
    out = run(values)
    val = read_json(out / "results.json")["results"]["last"]["val"]
    assert (val["num_known"], val["num_unknown"]) == (KNOWN * 3, 0)  # round(0.25 · 12) per class
    assert read_json(out / "config.json")["val"] is None


def test_entry_point_python_m_robustft(tiny: Tiny, tmp_path: Path) -> None:
    values = overrides(
        tiny, tmp_path / "run", "clipood", steps=2, eval={"open": str(tiny.digits.open)}
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "robustft", *argv(values)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "| average | open |" in done.stdout
    payload = read_json(tmp_path / "run" / "results.json")
    assert payload["steps"] == 2 and set(payload["results"]) == {"zero-shot", "last", "average"}


def test_console_script_is_installed() -> None:
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "robustft"]
    assert script.load() is main


# --- post hoc and evaluate ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ft_runs(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two short fine-tuning runs (different seeds) with an evaluation set."""
    base = tmp_path_factory.mktemp("posthoc")
    sets = {"test": str(tiny.digits.test), "open": str(tiny.digits.open)}
    return tuple(  # type: ignore[return-value]
        run(overrides(tiny, base / f"ft{seed}", "ft", steps=4, lr=1e-3, seed=seed, eval=sets))
        for seed in (0, 1)
    )


def assert_same_metrics(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for key in METRIC_KEYS:
            if a[name][key] is None:
                assert b[name][key] is None
            else:
                assert a[name][key] == pytest.approx(b[name][key], abs=1e-5), (name, key)


def test_posthoc_wise_sweep_ends_at_zero_shot_and_fine_tuned(
    ft_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    run_dir = ft_runs[0]
    assert (
        main(
            [
                "posthoc",
                "wise",
                "--runs",
                str(run_dir),
                "--alphas",
                "0,0.5,1",
                "--output",
                str(tmp_path),
            ]
        )
        == 0
    )
    payload = read_json(tmp_path / "results.json")
    assert payload["posthoc"] == "wise" and payload["runs"] == [str(run_dir / "last.safetensors")]
    results = payload["results"]
    assert list(results) == ["zero-shot", "wise-0", "wise-0.5", "wise-1"]
    trained = read_json(run_dir / "results.json")["results"]
    assert_same_metrics(results["wise-0"], results["zero-shot"])
    assert_same_metrics(results["zero-shot"], trained["zero-shot"])
    assert_same_metrics(results["wise-1"], trained["last"])
    assert results["wise-0.5"]["test"]["nll"] != results["wise-1"]["test"]["nll"]
    assert "| wise-0.5 | open |" in (tmp_path / "summary.md").read_text(encoding="utf-8")


def test_posthoc_uniform_soup_is_the_mean(ft_runs: tuple[Path, Path], tmp_path: Path) -> None:
    args = ["posthoc", "uniform-soup", "--runs", *map(str, ft_runs), "--output", str(tmp_path)]
    assert main(args) == 0
    soup = load_file(str(tmp_path / "uniform-soup.safetensors"))
    a, b = (load_file(str(r / "last.safetensors")) for r in ft_runs)
    assert soup.keys() == a.keys()
    for k in soup:
        torch.testing.assert_close(soup[k], (a[k] + b[k]) / 2)
    assert set(read_json(tmp_path / "results.json")["results"]) == {"zero-shot", "uniform-soup"}


def test_posthoc_greedy_soup_keeps_a_subset(ft_runs: tuple[Path, Path], tmp_path: Path) -> None:
    args = ["posthoc", "greedy-soup", "--runs", *map(str, ft_runs), "--output", str(tmp_path)]
    assert main(args) == 0
    payload = read_json(tmp_path / "results.json")
    files = [str(r / "last.safetensors") for r in ft_runs]
    assert payload["kept"] and set(payload["kept"]) <= set(files)
    soup = load_file(str(tmp_path / "greedy-soup.safetensors"))
    kept = [load_file(f) for f in payload["kept"]]
    for k in soup:
        torch.testing.assert_close(soup[k], sum(t[k] for t in kept) / len(kept))
    assert list(payload["results"]["greedy-soup"]) == ["val", "test", "open"]


def test_posthoc_tpgm_projects_towards_the_zero_shot_model(
    ft_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    args = [
        "posthoc",
        "tpgm",
        "--runs",
        str(ft_runs[0]),
        "--tpgm-steps",
        "3",
        "--output",
        str(tmp_path),
    ]
    assert main(args) == 0
    projected = load_file(str(tmp_path / "tpgm.safetensors"))
    tuned = load_file(str(ft_runs[0] / "last.safetensors"))
    zero = read_json(tmp_path / "results.json")
    assert set(zero["results"]) == {"zero-shot", "tpgm"}
    bundle = load_model(
        read_json(ft_runs[0] / "config.json")["model"],
        pretrained=read_json(ft_runs[0] / "config.json")["pretrained"],
    )
    theta0 = {f"visual.{k}": v.detach() for k, v in bundle.model.visual.named_parameters()}
    assert projected.keys() == tuned.keys()
    for k, v in theta0.items():  # every tensor stays within its fine-tuned distance of θ0
        assert float((projected[k] - v).norm()) <= float((tuned[k] - v).norm()) * (1 + 1e-5) + 1e-7


def test_posthoc_missing_run_weights(
    ft_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "absent.safetensors"
    args = [
        "posthoc",
        "wise",
        "--runs",
        str(ft_runs[0]),
        str(missing),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    assert (
        "robustft: error: posthoc: --runs must hold last.safetensors, missing"
        in capsys.readouterr().err
    )


def test_evaluate_reproduces_the_runs_results(
    ft_runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = ft_runs[1]
    other = tmp_path / "copy.safetensors"
    other.write_bytes((run_dir / "last.safetensors").read_bytes())
    capsys.readouterr()
    args = [
        "evaluate",
        "--run",
        str(run_dir),
        "--weights",
        "last",
        "zero-shot",
        str(other),
        "--output",
        str(tmp_path / "ev"),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out  # the tables of summary.md
    payload = read_json(tmp_path / "ev" / "results.json")
    assert list(payload["results"]) == ["last", "zero-shot", "copy"]
    assert (tmp_path / "ev" / "summary.md").read_text().split("\n", 2)[2].strip() in printed
    trained = read_json(run_dir / "results.json")["results"]
    assert_same_metrics(payload["results"]["last"], trained["last"])
    assert_same_metrics(payload["results"]["copy"], trained["last"])
    assert_same_metrics(payload["results"]["zero-shot"], trained["zero-shot"])


def test_evaluate_on_other_sets(
    ft_runs: tuple[Path, Path], tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["evaluate", "--run", str(ft_runs[0]), "--eval", f"inverted={tiny.digits.shifted}"]
    assert main([*args, "--output", str(tmp_path / "ev")]) == 0
    assert "| last | inverted |" in capsys.readouterr().out
    payload = read_json(tmp_path / "ev" / "results.json")
    assert list(payload["results"]) == ["last"] and list(payload["results"]["last"]) == [
        "val",
        "inverted",
    ]


def test_evaluate_errors(
    tmp_path: Path, ft_runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", "--run", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    # ft has no average
    assert main(["evaluate", "--run", str(ft_runs[0]), "--weights", "average"]) == 2
    assert "average.safetensors" in capsys.readouterr().err


# --- configuration files and flags -------------------------------------------------------------


def test_yaml_config_with_flags_overriding(tiny: Tiny, tmp_path: Path) -> None:
    values = overrides(
        tiny,
        tmp_path / "from-file",
        "clipood",
        lr=2e-4,
        steps=2,
        eval={"open": str(tiny.digits.open)},
    )
    del values["progress"]
    text = "".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()) + "progress: false\n"
    file = tmp_path / "run.yaml"
    file.write_text(text, encoding="utf-8")
    out = tmp_path / "flags-win"
    assert (
        main(
            [
                "finetune",
                "--config",
                str(file),
                "--steps",
                "3",
                "--output",
                str(out),
                "--eval",
                f"test={tiny.digits.test}",
            ]
        )
        == 0
    )
    saved = read_json(out / "config.json")
    assert (saved["method"], saved["lr"], saved["steps"], saved["output"]) == (
        "clipood",
        2e-4,
        3,
        str(out),
    )
    assert saved["eval"] == {"test": str(tiny.digits.test)}  # the flag replaces the file's sets
    assert (
        saved
        == resolve(
            {
                **values,
                "steps": 3,
                "output": str(out),
                "progress": False,
                "eval": {"test": str(tiny.digits.test)},
            }
        ).to_json()
    )
    assert [line["step"] for line in metrics_lines(out)] == [1, 2, 3]


def test_json_config_with_flags_overriding(tiny: Tiny, tmp_path: Path) -> None:
    values = overrides(tiny, tmp_path / "run", "ueo", steps=2, momentum=0.5)
    file = tmp_path / "run.json"
    file.write_text(json.dumps(values), encoding="utf-8")
    assert main(["ueo", "--config", str(file), "--lr", "0.01", "--no-progress"]) == 0
    saved = read_json(tmp_path / "run" / "config.json")
    assert (saved["method"], saved["lr"], saved["momentum"], saved["optimizer"]) == (
        "ueo",
        0.01,
        0.5,
        "sgd",
    )


def test_every_field_is_a_flag() -> None:
    import dataclasses

    from robustft.recipes._cli import parser

    for command in ("finetune", "ueo"):
        args = parser().parse_args([command])
        for f in dataclasses.fields(RunConfig):
            assert hasattr(args, f.name), (command, f.name)
            assert getattr(args, f.name) is None  # unset flags leave the file/defaults in charge


# --- help --------------------------------------------------------------------------------------


def _help(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main([*args, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    top = _help([], capsys)
    for word in (
        "finetune",
        "ueo",
        "posthoc",
        "evaluate",
        "torchrun",
        "--resume",
        "clipood",
        "lipsum",
    ):
        assert word in top
    finetune = _help(["finetune"], capsys)
    for word in (
        *SUPERVISED,
        "--batch-size",
        "--config",
        "--resume",
        "--eval NAME=DIR",
        "--average",
        "--distributed",
        "--accumulation",
        "--save-every",
    ):
        assert word in finetune, word
    ueo = _help(["ueo"], capsys)
    for word in (*UNSUPERVISED, "--trade-off", "--prompt", "--score"):
        assert word in ueo, word
    posthoc = _help(["posthoc"], capsys)
    for word in (
        "wise",
        "tpgm",
        "uniform-soup",
        "greedy-soup",
        "--runs",
        "--alphas",
        "--tpgm-steps",
    ):
        assert word in posthoc, word
    evaluate = _help(["evaluate"], capsys)
    for word in ("--run", "--weights", "zero-shot", "average", "--eval"):
        assert word in evaluate, word


# --- bad input ---------------------------------------------------------------------------------


def _argparse_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_argparse_rejects_unknown_methods_and_malformed_values(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert "invalid choice: 'nope'" in _argparse_error(["finetune", "--method", "nope"], capsys)
    assert "invalid choice: 'clipood'" in _argparse_error(["ueo", "--method", "clipood"], capsys)
    assert "invalid choice: 'ueo'" in _argparse_error(["finetune", "--method", "ueo"], capsys)
    assert "invalid float value: 'fast'" in _argparse_error(["finetune", "--lr", "fast"], capsys)
    assert "invalid int value: '2.5'" in _argparse_error(["finetune", "--steps", "2.5"], capsys)
    assert "invalid choice: 'adam'" in _argparse_error(["finetune", "--optimizer", "adam"], capsys)
    assert "invalid choice: 'soup'" in _argparse_error(
        ["posthoc", "soup", "--runs", "x", "--output", "y"], capsys
    )
    assert "--runs" in _argparse_error(["posthoc", "wise", "--output", "y"], capsys)
    assert "--run" in _argparse_error(["evaluate"], capsys)
    assert "required" in _argparse_error([], capsys)


def test_method_from_a_file_must_belong_to_the_command(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "run.json"
    file.write_text(
        json.dumps({"method": "clipood", "train": str(tiny.digits.train)}), encoding="utf-8"
    )
    assert main(["ueo", "--config", str(file)]) == 2
    err = capsys.readouterr().err
    assert "robustft: error: --method must be one of ueo, entropy, im here, got 'clipood'" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--lr", "-1"],
            "resolve: --lr (lr in a config file) must be a finite number > 0, got -1.0",
        ),
        (
            ["--steps", "0"],
            "resolve: --steps (steps in a config file) must be an integer >= 1, got 0",
        ),
        (
            ["--warmup", "1.5"],
            "resolve: --warmup (warmup in a config file) must be a number in [0, 1), got 1.5",
        ),
        (
            ["--batch-size", "9", "--accumulation", "2"],
            "resolve: --batch-size (batch_size in a config file) must be a multiple of "
            "--accumulation, got 9 and --accumulation 2",
        ),
        (
            ["--eval", "=nowhere"],
            "resolve: --eval (eval in a config file) entries must be NAME=DIR, got '=nowhere'",
        ),
        (
            ["--config", "/nonexistent/run.yaml"],
            "load_config_file: config file '/nonexistent/run.yaml' does not exist",
        ),
    ],
)
def test_bad_values_exit_2_before_creating_the_run(
    tiny: Tiny, tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main([*argv(overrides(tiny, out, "ft")), *extra]) == 2
    assert f"robustft: error: {message}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("train", "--train '{missing}' is not an existing directory"),
        ("val", "--val '{missing}' is not an existing directory"),
        ("eval", "--eval x='{missing}' is not an existing directory"),
        ("classnames", "--classnames '{missing}' is not an existing file"),
    ],
)
def test_missing_folders(
    tiny: Tiny, tmp_path: Path, field: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "missing")
    values = overrides(
        tiny, tmp_path / "run", "ft", **{field: {"x": missing} if field == "eval" else missing}
    )
    assert main(argv(values)) == 2
    assert f"robustft: error: {message.format(missing=missing)}" in capsys.readouterr().err
    assert not (tmp_path / "run" / "results.json").exists()


def test_batch_larger_than_the_training_set(
    tiny: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv(overrides(tiny, tmp_path / "run", "ft", batch_size=64))) == 2
    expected = (
        "robustft: error: --batch-size (batch_size in a config file) must be at most the "
        "training set's 60 samples, got 64"
    )
    assert expected in capsys.readouterr().err


def test_missing_train_and_resume_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["finetune", "--output", str(tmp_path / "run")]) == 2
    assert "robustft: error: --train is required" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(tmp_path)]) == 2
    expected = f"--resume {str(tmp_path)!r} must be a run folder holding config.json"
    assert expected in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path)]) == 2
    expected = f"--run {str(tmp_path)!r} must be a run folder holding config.json"
    assert expected in capsys.readouterr().err
    assert main(["posthoc", "wise", "--runs", str(tmp_path), "--output", str(tmp_path / "p")]) == 2
    expected = f"--runs {str(tmp_path)!r} must be a run folder holding config.json"
    assert expected in capsys.readouterr().err


# --- options added after review: class subsets, saved blends, early refusals -------------------


def test_posthoc_saves_wise_blends_of_the_chosen_weights(
    ft_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    run_dir = ft_runs[0]
    args = ["posthoc", "wise", "--runs", str(run_dir), "--alphas", "0,1", "--save-weights"]
    assert main([*args, "--weights", "last", "--output", str(tmp_path)]) == 0
    zero, one = (load_file(str(tmp_path / f"wise-{a}.safetensors")) for a in (0, 1))
    last = load_file(str(run_dir / "last.safetensors"))
    for key in last:
        torch.testing.assert_close(one[key], last[key], rtol=0, atol=0)
    assert not torch.equal(zero["head"], last["head"])  # alpha 0 is the zero-shot classifier
    # a weights file the runs do not have is named
    assert main([*args, "--weights", "average", "--output", str(tmp_path / "b")]) == 2


def test_eval_classes_present_scores_only_the_classes_of_the_set(
    tiny: Tiny, tmp_path: Path
) -> None:
    """A set holding classes 0-1 only: with "present" every prediction is 0 or 1."""
    subset = tmp_path / "subset"
    for folder in ("zero", "one"):
        shutil.copytree(tiny.digits.test / folder, subset / folder)
    sets = {"subset": str(subset)}
    full = read_json(run(overrides(tiny, tmp_path / "all", "ft", eval=sets)) / "results.json")
    part = read_json(
        run(overrides(tiny, tmp_path / "present", "ft", eval=sets, eval_classes="present"))
        / "results.json"
    )
    a, b = full["results"]["last"]["subset"], part["results"]["last"]["subset"]
    assert a["num_known"] == b["num_known"] > 0
    assert b["accuracy"] >= a["accuracy"]  # fewer wrong classes to choose from
    assert b["nll"] <= a["nll"] + 1e-6  # the 2-class softmax puts more mass on the truth
    # the validation split keeps all classes either way
    assert part["results"]["last"]["val"] == pytest.approx(full["results"]["last"]["val"])


def test_select_best_needs_eval_every() -> None:
    with pytest.raises(
        ValueError,
        match=r"resolve: --select \(select in a config file\) is best, .* set --eval-every >= 1, "
        r"got 0",
    ):
        resolve({"select": "best", "steps": 3})


def test_batch_and_fsdp_refusals_come_before_loading(tiny: Tiny, tmp_path: Path) -> None:
    from robustft.recipes import Runtime
    from robustft.recipes._prepare import check_runtime

    two = Runtime(torch.device("cpu"), 0, 2, "fsdp", None)
    with pytest.raises(
        ValueError, match=r"--batch-size \(batch_size in a config file\) must be a multiple of the"
    ):
        check_runtime(resolve({"batch_size": 9}, method="clipood"), two)
    for method in ("l2sp", "flyp"):
        with pytest.raises(
            ValueError, match=rf"--distributed fsdp: method '{method}' cannot run under FSDP2"
        ):
            check_runtime(resolve({"batch_size": 8}, method=method), two)
    check_runtime(resolve({"batch_size": 8}, method="clipood"), two)
