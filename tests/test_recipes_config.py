"""robustft.recipes._config: per-method defaults (SPEC §7), overrides, validation, config files."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from robustft.recipes import METHOD_DEFAULTS, METHODS, RunConfig, load_config_file, plan, resolve
from robustft.recipes._config import SUPERVISED, UNSUPERVISED

# --- defaults per method (SPEC §7) -------------------------------------------------------------


def test_clipood_defaults_follow_the_paper() -> None:
    c = resolve({}, method="clipood")
    assert (c.optimizer, c.lr, c.weight_decay, c.warmup, c.schedule) == (
        "adamw",
        1e-5,
        0.1,
        0.0,
        "cosine",
    )
    assert (c.average, c.bma_beta, c.margin, c.batch_size, c.steps) == ("bma", 0.5, 0.3, 36, 5000)


def test_ueo_defaults_follow_the_paper() -> None:
    c = resolve({}, method="ueo")
    assert (c.optimizer, c.lr, c.momentum, c.weight_decay, c.warmup) == ("sgd", 1e-4, 0.0, 0.0, 0.0)
    assert (c.epochs, c.steps, c.batch_size, c.trade_off) == (5.0, None, 64, 1.0)
    assert (c.score, c.average, c.schedule) == ("mcm", "none", "cosine")


def test_lipsum_defaults_follow_the_paper() -> None:
    c = resolve({}, method="lipsum")
    assert (c.optimizer, c.lr, c.weight_decay, c.warmup, c.schedule) == (
        "adamw",
        1e-5,
        0.0,
        0.1,
        "cosine",
    )
    assert (c.lipsum_texts, c.lipsum_length, c.reg_weight, c.batch_size, c.steps) == (
        80,
        8,
        1.0,
        256,
        5000,
    )


def test_unsupervised_baselines_share_ueos_protocol() -> None:
    ueo = resolve({}, method="ueo")
    for name, trade_off in (("entropy", 0.0), ("im", 1.0)):
        c = resolve({}, method=name)
        same = ("optimizer", "lr", "momentum", "weight_decay", "batch_size", "epochs", "score")
        assert {f: getattr(c, f) for f in same} == {f: getattr(ueo, f) for f in same}
        assert c.trade_off == trade_off


def test_supervised_defaults() -> None:
    for name in ("ft", "lp-ft", "kd", "car-ft", "feature-kd", "flyp"):
        c = resolve({}, method=name)
        assert (c.optimizer, c.lr, c.weight_decay, c.warmup, c.average) == (
            "adamw",
            1e-5,
            0.1,
            0.1,
            "none",
        )
    assert resolve({}, method="l2sp").weight_decay == 0.0  # L2-SP replaces weight decay
    assert resolve({}, method="l2sp").reg_weight == 0.1
    assert resolve({}, method="kd").reg_weight == 1.0
    assert resolve({}, method="ft").reg_weight is None


def test_every_method_has_defaults_and_the_families_partition_them() -> None:
    assert set(METHOD_DEFAULTS) == set(METHODS)
    assert SUPERVISED + UNSUPERVISED == METHODS
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    for name in METHODS:
        assert set(METHOD_DEFAULTS[name]) <= fields
        assert resolve({}, method=name).method == name


# --- precedence --------------------------------------------------------------------------------


def test_overrides_beat_method_defaults_and_none_means_unset() -> None:
    c = resolve({"lr": 3e-5, "average": "ema", "batch_size": None, "steps": 7}, method="clipood")
    assert (c.lr, c.average, c.batch_size, c.steps) == (3e-5, "ema", 36, 7)
    assert c.weight_decay == 0.1  # untouched default


def test_method_in_overrides_wins_over_the_argument_and_ft_is_the_fallback() -> None:
    assert resolve({"method": "lipsum"}, method="clipood").method == "lipsum"
    assert resolve({"method": None}, method="clipood").method == "clipood"
    assert resolve({}).method == "ft"


def test_resolved_config_round_trips_through_json() -> None:
    c = resolve({"train": "t", "eval": ["a=/x", "b=/y"], "lr": 2e-5, "seed": 3}, method="lipsum")
    again = resolve(json.loads(json.dumps(c.to_json())))
    assert again == c
    assert c.to_json()["eval"] == {"a": "/x", "b": "/y"}


def test_eval_sets_from_mapping_list_and_bare_paths() -> None:
    assert resolve({"eval": {"r": "/data/r"}}).eval == {"r": "/data/r"}
    assert resolve({"eval": ["r=/data/r", "/data/sketch"]}).eval == {
        "r": "/data/r",
        "sketch": "/data/sketch",
    }
    assert resolve({"eval": ["x=a=b"]}).eval == {"x": "a=b"}  # only the first '=' splits


def test_numpy_numbers_are_accepted() -> None:
    c = resolve({"lr": np.float32(1e-3), "momentum": np.float64(0.9)}, method="ueo")
    assert math.isclose(c.lr, 1e-3, rel_tol=1e-6) and c.momentum == 0.9


def test_epochs_replace_the_default_steps() -> None:
    # ``--epochs 2`` on a method whose defaults give ``steps`` must train for 2 epochs; before
    # the fix the default steps=5000 silently won
    c = resolve({"epochs": 2, "batch_size": 8}, method="ft")
    assert plan(c, 60, 1).steps == 14


# --- validation: every error -------------------------------------------------------------------


def test_unknown_key_is_listed() -> None:
    with pytest.raises(
        ValueError, match=r"resolve: unknown configuration keys \['learning_rate'\]"
    ):
        resolve({"learning_rate": 1e-3})


def test_unknown_method() -> None:
    with pytest.raises(
        ValueError, match=r"resolve: method must be one of ft, .*clipood.*got 'sgd-ft'"
    ):
        resolve({"method": "sgd-ft"})
    with pytest.raises(ValueError, match="method must be one of"):
        resolve({}, method="wise")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("optimizer", "adam"),
        ("schedule", "linear"),
        ("average", "swa"),
        ("select", "worst"),
        ("precision", "fp16"),
        ("distributed", "zero3"),
    ],
)
def test_choices(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=rf"resolve: {field} must be one of .*got '{value}'"):
        resolve({field: value})


def test_score_choice() -> None:
    with pytest.raises(
        ValueError, match=r"resolve: score must be one of msp, mcm, energy, max_logit, got 'odin'"
    ):
        resolve({"score": "odin"})


@pytest.mark.parametrize(
    "field", ["steps", "batch_size", "accumulation", "lipsum_texts", "lipsum_length", "log_every"]
)
@pytest.mark.parametrize("value", [0, -3, 2.0, True, "4"])
def test_positive_integers(field: str, value: Any) -> None:
    with pytest.raises(
        ValueError, match=rf"resolve: {field} must be an integer >= 1, got {value!r}"
    ):
        resolve({field: value})


@pytest.mark.parametrize("field", ["workers", "save_every", "eval_every", "seed"])
@pytest.mark.parametrize("value", [-1, 1.0, False, "0"])
def test_non_negative_integers(field: str, value: Any) -> None:
    with pytest.raises(
        ValueError, match=rf"resolve: {field} must be an integer >= 0, got {value!r}"
    ):
        resolve({field: value})


@pytest.mark.parametrize("value", [0, -1.5, "2"])
def test_epochs_must_be_positive(value: Any) -> None:
    with pytest.raises(
        ValueError, match=rf"resolve: epochs must be a positive number, got {value!r}"
    ):
        resolve({"epochs": value}, method="ueo")


@pytest.mark.parametrize(
    ("field", "bad", "allowed"),
    [
        ("lr", 0.0, "> 0"),
        ("weight_decay", -0.1, ">= 0"),
        ("momentum", 1.0, r"in \[0, 1\)"),
        ("warmup", 1.0, r"in \[0, 1\)"),
        ("warmup", -0.1, r"in \[0, 1\)"),
        ("val_fraction", 0.0, r"in \(0, 1\)"),
        ("val_fraction", 1.0, r"in \(0, 1\)"),
        ("ema_decay", 1.5, r"in \[0, 1\]"),
        ("bma_beta", 0.0, "> 0"),
        ("tpr", 0.0, r"in \(0, 1\]"),
        ("tpr", 1.01, r"in \(0, 1\]"),
        ("temperature", 0.0, "> 0"),
        ("grad_clip", -1.0, "> 0"),
        ("reg_weight", -1.0, ">= 0"),
        ("margin", -0.3, ">= 0"),
        ("trade_off", -1.0, ">= 0"),
    ],
)
def test_number_ranges(field: str, bad: float, allowed: str) -> None:
    with pytest.raises(ValueError, match=rf"resolve: {field} must be {allowed}, got {bad!r}"):
        resolve({field: bad})


@pytest.mark.parametrize("field", ["lr", "momentum", "tpr", "grad_clip", "margin"])
@pytest.mark.parametrize("value", [math.nan, math.inf, "0.1", True])
def test_numbers_must_be_finite_numbers(field: str, value: Any) -> None:
    with pytest.raises(TypeError, match=rf"resolve: {field} must be a finite number, got"):
        resolve({field: value})


def test_range_edges_that_are_allowed() -> None:
    c = resolve(
        {
            "momentum": 0.0,
            "warmup": 0.0,
            "ema_decay": 1.0,
            "tpr": 1.0,
            "reg_weight": 0.0,
            "margin": 0.0,
            "trade_off": 0.0,
            "weight_decay": 0.0,
            "seed": 0,
            "workers": 0,
        }
    )
    assert (c.ema_decay, c.tpr) == (1.0, 1.0)


def test_templates_choice() -> None:
    with pytest.raises(
        ValueError, match=r"resolve: templates must be openai or simple, got 'imagenet'"
    ):
        resolve({"templates": "imagenet"})


def test_batch_must_split_into_accumulation_steps() -> None:
    with pytest.raises(
        ValueError,
        match=r"resolve: batch_size must be a multiple of accumulation, got batch_size 10 and accumulation 4",
    ):
        resolve({"batch_size": 10, "accumulation": 4})
    assert resolve({"batch_size": 12, "accumulation": 4}).accumulation == 4


def test_eval_entry_errors() -> None:
    with pytest.raises(ValueError, match=r"resolve: eval entries must be NAME=DIR, got '=/data/r'"):
        resolve({"eval": ["=/data/r"]})
    with pytest.raises(ValueError, match=r"resolve: eval entries must be NAME=DIR, got 'r='"):
        resolve({"eval": ["r="]})
    with pytest.raises(ValueError, match=r"resolve: eval names must be unique, got 'r' twice"):
        resolve({"eval": ["r=/a", "r=/b"]})
    with pytest.raises(
        TypeError, match=r"resolve: eval must be a mapping NAME -> DIR or a list of NAME=DIR, got"
    ):
        resolve({"eval": 3})


# --- configuration files -----------------------------------------------------------------------


def test_load_yaml_and_json(tmp_path: Path) -> None:
    yml = tmp_path / "run.yaml"
    yml.write_text(
        "method: clipood\nlr: 2.0e-5\neval:\n  r: /data/r\nprogress: false\n", encoding="utf-8"
    )
    expected = {"method": "clipood", "lr": 2e-5, "eval": {"r": "/data/r"}, "progress": False}
    assert load_config_file(yml) == expected
    short = tmp_path / "run.yml"
    short.write_text(yml.read_text(encoding="utf-8"), encoding="utf-8")
    assert load_config_file(str(short)) == expected
    js = tmp_path / "run.json"
    js.write_text(json.dumps(expected), encoding="utf-8")
    assert load_config_file(js) == expected
    assert resolve(load_config_file(js)).eval == {"r": "/data/r"}


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads ``1e-5`` as a string; users write learning rates that way
    yml = tmp_path / "run.yaml"
    yml.write_text("lr: 1e-5\n", encoding="utf-8")
    assert resolve(load_config_file(yml)).lr == 1e-5


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"load_config_file: config file '.*nope.yaml' does not exist"
    ):
        load_config_file(tmp_path / "nope.yaml")
    toml = tmp_path / "run.toml"
    toml.write_text("lr = 1e-5\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"load_config_file: config file must end in .json, .yaml or .yml, got"
    ):
        load_config_file(toml)
    listed = tmp_path / "list.yaml"
    listed.write_text("- lr\n- 1\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"load_config_file: config file must hold a mapping of fields, got"
    ):
        load_config_file(listed)
    empty = tmp_path / "empty.json"
    empty.write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config_file(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config_file(tmp_path)  # a folder is not a file
