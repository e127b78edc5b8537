"""robustft.recipes._config: per-method defaults (SPEC §7), overrides, validation, config files."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from robustft.recipes import METHOD_DEFAULTS, METHODS, RunConfig, load_config_file, plan, resolve
from robustft.recipes._config import (
    _RULES,
    SUPERVISED,
    UNSUPERVISED,
    flag_of,
    lp_strengths,
)

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


def test_eval_sets_from_mapping_list_and_bare_paths() -> None:
    assert resolve({"eval": {"r": "/data/r"}}).eval == {"r": "/data/r"}
    assert resolve({"eval": ["r=/data/r", "/data/sketch"]}).eval == {
        "r": "/data/r",
        "sketch": "/data/sketch",
    }
    assert resolve({"eval": ["x=a=b"]}).eval == {"x": "a=b"}  # only the first '=' splits


def test_numpy_numbers_are_accepted() -> None:
    c = resolve({"lr": np.float32(1e-3), "momentum": np.float64(0.9)}, method="ueo")
    assert c.lr is not None and math.isclose(c.lr, 1e-3, rel_tol=1e-6) and c.momentum == 0.9


def test_epochs_replace_the_default_steps() -> None:
    # ``--epochs 2`` on a method whose defaults give ``steps`` must train for 2 epochs; before
    # the fix the default steps=5000 silently won
    c = resolve({"epochs": 2, "batch_size": 8}, method="ft")
    assert plan(c, 60, 1).steps == 14


# --- one rule per field ------------------------------------------------------------------------


def test_every_field_has_exactly_one_rule() -> None:
    assert list(_RULES) == [f.name for f in dataclasses.fields(RunConfig)]


def test_flag_of_names_the_flag_and_the_file_key() -> None:
    assert flag_of("batch_size") == "--batch-size (batch_size in a config file)"
    assert flag_of("lr") == "--lr (lr in a config file)"


# --- the battery: every field, good and bad values, from a dict, a YAML file and a JSON file ----


def _yaml_value(value: Any) -> str:
    """``value`` written as YAML flow text (JSON, with YAML's spelling of NaN and infinities)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _from(source: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` as ``resolve`` gets them from a dict, or after a round through a config file."""
    if source == "dict":
        return values
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"run.{source}"
        if source == "yaml":
            text = "".join(f"{k}: {_yaml_value(v)}\n" for k, v in values.items())
        else:
            text = json.dumps(values)
        path.write_text(text, encoding="utf-8")
        return load_config_file(path)


SOURCES = ["dict", "yaml", "json"]

# (overrides, field, the value stored): every field, edges included
GOOD: list[tuple[dict[str, Any], str, Any]] = [
    ({"method": "clipood"}, "method", "clipood"),
    ({"method": "ueo"}, "method", "ueo"),
    ({"model": "RN50"}, "model", "RN50"),
    ({"pretrained": "openai"}, "pretrained", "openai"),
    ({"train": ""}, "train", ""),
    ({"train": "data/train"}, "train", "data/train"),
    ({"val": "data/val"}, "val", "data/val"),
    ({"val_fraction": 0.2}, "val_fraction", 0.2),
    ({"eval": {"r": "/data/r"}}, "eval", {"r": "/data/r"}),
    ({"eval": ["r=/data/r", "/data/sketch"]}, "eval", {"r": "/data/r", "sketch": "/data/sketch"}),
    ({"eval": ["x=a=b", "/data/a=b"]}, "eval", {"x": "a=b", "a=b": "/data/a=b"}),
    ({"eval": [" r =/data/r"]}, "eval", {"r": "/data/r"}),
    ({"eval": {" r ": "/data/r"}}, "eval", {"r": "/data/r"}),
    ({"eval": []}, "eval", {}),
    ({"shift": {"sketch": "/s"}}, "shift", {"sketch": "/s"}),
    ({"ood": ["noise=/n"]}, "ood", {"noise": "/n"}),
    ({"ood_reference": "val", "ood": ["n=/n"]}, "ood_reference", "val"),
    ({"ood_reference": "r", "eval": ["r=/r"], "ood": ["n=/n"]}, "ood_reference", "r"),
    ({"ood_reference": "s", "shift": ["s=/s"]}, "ood_reference", "s"),
    ({"classnames": "names.txt"}, "classnames", "names.txt"),
    ({"eval_classes": "present"}, "eval_classes", "present"),
    ({"templates": "simple"}, "templates", "simple"),
    ({"skip_bad_images": True}, "skip_bad_images", True),
    ({"image_mean": [0.5, 0.25, 0.125]}, "image_mean", [0.5, 0.25, 0.125]),
    ({"image_mean": [-1, 0, 1]}, "image_mean", [-1.0, 0.0, 1.0]),
    ({"image_std": [0.2, 0.3, 4]}, "image_std", [0.2, 0.3, 4.0]),
    ({"image_resize": "squash"}, "image_resize", "squash"),
    ({"image_interpolation": "bilinear"}, "image_interpolation", "bilinear"),
    ({"output": "runs/x"}, "output", "runs/x"),
    ({"steps": 7}, "steps", 7),
    ({"epochs": 2}, "epochs", 2.0),
    ({"epochs": 0.5}, "epochs", 0.5),
    ({"batch_size": 12}, "batch_size", 12),
    ({"batch_size": 12, "accumulation": 3}, "accumulation", 3),
    ({"optimizer": "sgd"}, "optimizer", "sgd"),
    ({"lr": 1}, "lr", 1.0),
    ({"lr": 1e-5}, "lr", 1e-5),
    ({"weight_decay": 0}, "weight_decay", 0.0),
    ({"momentum": 0.9}, "momentum", 0.9),
    ({"momentum": 0}, "momentum", 0.0),
    ({"warmup": 0.0}, "warmup", 0.0),
    ({"schedule": "constant"}, "schedule", "constant"),
    ({"grad_clip": 1.5}, "grad_clip", 1.5),
    ({"average": "ema"}, "average", "ema"),
    ({"ema_decay": 1}, "ema_decay", 1.0),
    ({"ema_decay": 0.0}, "ema_decay", 0.0),
    ({"bma_beta": 0.1}, "bma_beta", 0.1),
    ({"margin": 0}, "margin", 0.0),
    ({"reg_weight": 0.0}, "reg_weight", 0.0),
    ({"temperature": 2}, "temperature", 2.0),
    ({"lipsum_texts": 1}, "lipsum_texts", 1),
    ({"lipsum_length": 4}, "lipsum_length", 4),
    ({"trade_off": 0}, "trade_off", 0.0),
    ({"lipsum_vocabulary": __file__}, "lipsum_vocabulary", __file__),
    ({"lipsum_rescale": False}, "lipsum_rescale", False),
    ({"ueo_scale": 0}, "ueo_scale", 0.0),
    ({"ueo_scale": 100}, "ueo_scale", 100.0),
    ({"prompt": "a"}, "prompt", "a"),
    ({"lp_c": "1,10"}, "lp_c", "1,10"),
    ({"lp_c": " 0.5 , 2"}, "lp_c", " 0.5 , 2"),
    ({"lp_c": [0.1, 1]}, "lp_c", "0.1,1.0"),
    ({"lp_c": 5}, "lp_c", "5.0"),
    ({"score": "energy"}, "score", "energy"),
    ({"tpr": 1}, "tpr", 1.0),
    ({"eval_every": 0}, "eval_every", 0),
    ({"select": "best", "eval_every": 5}, "select", "best"),
    ({"seed": 0}, "seed", 0),
    ({"seed": 2**63 - 1}, "seed", 2**63 - 1),
    ({"precision": "bf16"}, "precision", "bf16"),
    ({"device": "cpu"}, "device", "cpu"),
    ({"device": "cuda"}, "device", "cuda"),
    ({"device": "cuda:12"}, "device", "cuda:12"),
    ({"device": "mps"}, "device", "mps"),
    ({"distributed": "fsdp"}, "distributed", "fsdp"),
    ({"workers": 0}, "workers", 0),
    ({"log_every": 1}, "log_every", 1),
    ({"save_every": 0}, "save_every", 0),
    ({"progress": False}, "progress", False),
    ({"collective_timeout": 0.5}, "collective_timeout", 0.5),
    ({"collective_timeout": 30}, "collective_timeout", 30.0),
    ({"nonfinite": "skip"}, "nonfinite", "skip"),
    ({"label_smoothing": 0.1}, "label_smoothing", 0.1),
    ({"method": "tracer", "cross_norm": 0}, "cross_norm", 0.0),
    ({"method": "tracer", "cross_norm": 0.1}, "cross_norm", 0.1),
    ({"descriptions": __file__}, "descriptions", __file__),
    ({"descriptions": __file__, "descriptions_match": "order"}, "descriptions_match", "order"),
    ({"peft": "lora"}, "peft", "lora"),
    ({"peft": "lora", "peft_rank": 4}, "peft_rank", 4),
    ({"peft": "adapter", "peft_rank": 0}, "peft_rank", 0),
    ({"peft": "lora", "peft_alpha": 2}, "peft_alpha", 2.0),
    ({"peft": "lora", "peft_scaling": "sqrt_rank"}, "peft_scaling", "sqrt_rank"),
    ({"peft": "lora", "peft_targets": " *a.weight , *b"}, "peft_targets", "*a.weight,*b"),
    ({"peft": "lora", "peft_qkv": "v, q"}, "peft_qkv", "q,v"),
    ({"peft": "lora", "peft_dropout": 0.25}, "peft_dropout", 0.25),
    ({"peft": "adapter", "peft_drop": 0.2}, "peft_drop", 0.2),
    ({"peft": "adapter", "peft_rescale": 0.5}, "peft_rescale", 0.5),
    ({"method": "clip-lora"}, "peft", "lora"),
    ({"method": "r-adapter"}, "peft_rescale", 0.5),
]


def test_the_good_battery_covers_every_field() -> None:
    assert {field for _, field, _ in GOOD} == set(_RULES)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(("overrides", "field", "stored"), GOOD, ids=lambda v: repr(v)[:40])
def test_good_values(source: str, overrides: dict[str, Any], field: str, stored: Any) -> None:
    c = resolve(_from(source, overrides))
    value = getattr(c, field)
    assert value == stored and type(value) is type(stored)
    if isinstance(stored, list):
        assert all(type(v) is float for v in value)


_BOOL = "true or false (a boolean, not text or a number)"
_INT1 = "an integer >= 1"
_INT0 = "an integer >= 0"
_POS = "a finite number > 0"
_NONNEG = "a finite number >= 0"
_FRAC = "a number in [0, 1)"
_MEAN = "3 finite numbers, one per RGB channel"
_STD = "3 finite numbers > 0, one per RGB channel"
_LPC = "a comma-separated list of numbers > 0 such as 0.01,0.1,1"
_DEV = "cpu, cuda, cuda:N or mps"
_TPL = "openai, simple or an existing text file of templates"
_SETS = "a mapping NAME: DIR or a list of NAME=DIR strings"
_GLOBS = "comma-separated weight-name globs, e.g. '*attn.in_proj_weight,*mlp.c_fc.weight'"
_QKV = "comma-separated distinct blocks among q, k, v (e.g. q,k,v or q,v)"
_NOT_BOOLEANS: tuple[Any, ...] = ("no", "yes", "false", "off", 1, 0, 1.0, [])

# (field, value, exception, what is allowed): the message is
# "resolve: <flag> must be <allowed>, got <value!r>"
BAD: list[tuple[str, Any, type[Exception], str]] = [
    *[
        (field, value, TypeError, _BOOL)
        for field in ("progress", "skip_bad_images", "lipsum_rescale")
        for value in _NOT_BOOLEANS
    ],
    *[
        (field, value, kind, _INT1)
        for field in ("steps", "batch_size", "accumulation", "lipsum_texts", "lipsum_length")
        for value, kind in (
            (0, ValueError),
            (-3, ValueError),
            (2.5, TypeError),
            (2.0, TypeError),
            ("3", TypeError),
            (True, TypeError),
            ([1], TypeError),
        )
    ],
    ("log_every", 0, ValueError, _INT1),
    ("log_every", 1.0, TypeError, _INT1),
    *[
        (field, value, kind, _INT0)
        for field in ("workers", "save_every", "eval_every")
        for value, kind in (
            (-1, ValueError),
            (1.0, TypeError),
            (False, TypeError),
            ("0", TypeError),
        )
    ],
    ("seed", -1, ValueError, "an integer in [0, 9223372036854775807]"),
    ("seed", 2**63, ValueError, "an integer in [0, 9223372036854775807]"),
    ("seed", "7", TypeError, "an integer in [0, 9223372036854775807]"),
    *[
        (field, value, kind, allowed)
        for field, allowed in (
            ("lr", _POS),
            ("epochs", _POS),
            ("grad_clip", _POS),
            ("bma_beta", _POS),
            ("temperature", _POS),
            ("collective_timeout", _POS),
            ("weight_decay", _NONNEG),
            ("margin", _NONNEG),
            ("reg_weight", _NONNEG),
            ("trade_off", _NONNEG),
            ("ueo_scale", _NONNEG + " (the scale of cos; 0: the model's own scale)"),
            ("momentum", _FRAC),
            ("warmup", _FRAC),
            ("val_fraction", "a number in (0, 1)"),
            ("ema_decay", "a number in [0, 1]"),
            ("tpr", "a number in (0, 1]"),
        )
        for value, kind in (
            (math.nan, ValueError),
            (math.inf, ValueError),
            (-math.inf, ValueError),
            ("0.1", TypeError),
            (True, TypeError),
            ([0.1], TypeError),
            (10**400, ValueError),
        )
    ],
    ("lr", 0, ValueError, _POS),
    ("lr", -1.0, ValueError, _POS),
    ("epochs", 0.0, ValueError, _POS),
    ("grad_clip", -1.0, ValueError, _POS),
    ("bma_beta", 0.0, ValueError, _POS),
    ("temperature", 0.0, ValueError, _POS),
    ("collective_timeout", 0, ValueError, _POS),
    ("collective_timeout", -5.0, ValueError, _POS),
    ("weight_decay", -0.1, ValueError, _NONNEG),
    ("margin", -0.3, ValueError, _NONNEG),
    ("reg_weight", -1.0, ValueError, _NONNEG),
    ("trade_off", -1, ValueError, _NONNEG),
    ("momentum", 1.0, ValueError, _FRAC),
    ("momentum", -0.1, ValueError, _FRAC),
    ("warmup", 1, ValueError, _FRAC),
    ("warmup", -0.1, ValueError, _FRAC),
    ("val_fraction", 0.0, ValueError, "a number in (0, 1)"),
    ("val_fraction", 1.0, ValueError, "a number in (0, 1)"),
    ("ema_decay", 1.5, ValueError, "a number in [0, 1]"),
    ("ema_decay", -0.1, ValueError, "a number in [0, 1]"),
    ("tpr", 0.0, ValueError, "a number in (0, 1]"),
    ("tpr", 1.01, ValueError, "a number in (0, 1]"),
    ("label_smoothing", 1.0, ValueError, _FRAC),
    ("cross_norm", -0.1, ValueError, _NONNEG),
    ("descriptions", 3, TypeError, "an existing text file (a JSON object of class descriptions)"),
    ("descriptions", "", ValueError, "an existing text file (a JSON object of class descriptions)"),
    ("peft_rank", -1, ValueError, _INT0),
    ("peft_rank", 2.5, TypeError, _INT0),
    ("peft_alpha", 0, ValueError, _POS),
    ("peft_alpha", "1", TypeError, _POS),
    ("peft_dropout", 1.0, ValueError, _FRAC),
    ("peft_drop", -0.1, ValueError, _FRAC),
    ("peft_rescale", -0.5, ValueError, _NONNEG),
    *[
        ("peft_targets", value, kind, _GLOBS + end)
        for value, kind, end in (
            ("a,,b", ValueError, " (no empty entry)"),
            (",", ValueError, " (no empty entry)"),
            ("", ValueError, " (no empty entry)"),
            (3, TypeError, ""),
            (["*a"], TypeError, ""),
        )
    ],
    *[
        ("peft_qkv", value, kind, _QKV)
        for value, kind in (
            ("q,x", ValueError),
            ("q,q", ValueError),
            ("", ValueError),
            ("qkv", ValueError),
            (3, TypeError),
        )
    ],
    *[
        (field, value, kind, "a non-empty string")
        for field in (
            "model",
            "pretrained",
            "val",
            "classnames",
            "output",
            "prompt",
            "ood_reference",
        )
        for value, kind in (("", ValueError), (3, TypeError), (True, TypeError), (["a"], TypeError))
    ],
    ("train", 3, TypeError, "a string"),
    ("train", ["a", "b"], TypeError, "a string"),
    *[
        (field, value, ValueError, "one of " + allowed)
        for field, allowed, value in (
            ("method", ", ".join(METHODS), "sgd-ft"),
            ("method", ", ".join(METHODS), 3),
            ("optimizer", "adamw, sgd", "adam"),
            ("optimizer", "adamw, sgd", True),
            ("schedule", "cosine, constant", "linear"),
            ("average", "none, ema, bma, uniform", "swa"),
            ("select", "last, best", "worst"),
            ("precision", "auto, fp32, bf16", "fp16"),
            ("distributed", "ddp, fsdp", "zero3"),
            ("eval_classes", "all, present", "some"),
            ("image_resize", "shortest, longest, squash", "crop"),
            ("image_interpolation", "bicubic, bilinear", "nearest"),
            ("nonfinite", "stop, skip", "ignore"),
            ("peft", "none, lora, adapter", "qlora"),
            ("peft_scaling", "rank, sqrt_rank", "log"),
            ("descriptions_match", "name, index, order", "position"),
            ("score", "msp, mcm, energy, max_logit", "odin"),
            ("score", "msp, mcm, energy, max_logit", ["msp"]),
        )
    ],
    ("image_mean", [1, 2], ValueError, _MEAN),
    ("image_mean", [1, 2, 3, 4], ValueError, _MEAN),
    ("image_mean", [], ValueError, _MEAN),
    ("image_mean", [0.5, math.nan, 0.5], ValueError, _MEAN),
    ("image_mean", [0.5, 0.5, math.inf], ValueError, _MEAN),
    ("image_mean", "0.5,0.5,0.5", TypeError, _MEAN),
    ("image_mean", 0.5, TypeError, _MEAN),
    ("image_mean", [0.5, "a", 0.5], TypeError, _MEAN),
    ("image_mean", [True, 0, 0], TypeError, _MEAN),
    ("image_std", [1, 0, 1], ValueError, _STD),
    ("image_std", [1, -1, 1], ValueError, _STD),
    ("image_std", [1, 1], ValueError, _STD),
    ("image_std", {"r": 1}, TypeError, _STD),
    *[
        ("lp_c", value, ValueError, _LPC)
        for value in (
            ",",
            "",
            "0.1,,1",
            "0.1,",
            "a,b",
            "0,1",
            "nan",
            "1,inf",
            "-1",
            -1,
            0,
            [0.1, -1],
            [math.nan],
        )
    ],
    *[("lp_c", value, TypeError, _LPC) for value in ([], ["0.1"], True, [True], {"a": 1})],
    *[
        ("device", value, ValueError, _DEV)
        for value in ("tpu9", "cuda:", "cuda:x", "cuda:-1", "gpu", "CPU", "cpu:0", "cuda ", "")
    ],
    ("device", 0, TypeError, _DEV),
    ("device", ["cpu"], TypeError, _DEV),
    ("templates", 3, TypeError, _TPL),
    ("lipsum_vocabulary", 3, TypeError, "an existing text file (one text per line)"),
    ("lipsum_vocabulary", "", ValueError, "an existing text file (one text per line)"),
    *[
        (field, value, TypeError, _SETS)
        for field in ("eval", "shift", "ood")
        for value in (3, "a=/x", True)
    ],
]


def _message(field: str, value: Any, allowed: str) -> str:
    shown = f"dict with keys {sorted(value)!r}" if isinstance(value, dict) else repr(value)
    return f"resolve: {flag_of(field)} must be {allowed}, got {shown}"


def test_the_bad_battery_covers_every_field_but_the_cross_checked_ones() -> None:
    # ood_reference's names, the sets' entries and templates' files have their own tests below
    assert {field for field, *_ in BAD} | {"templates"} == set(_RULES)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(("field", "value", "kind", "allowed"), BAD, ids=lambda v: repr(v)[:30])
def test_bad_values(
    source: str, field: str, value: Any, kind: type[Exception], allowed: str
) -> None:
    overrides = _from(source, {field: value})
    with pytest.raises(Exception) as info:  # the exact type: asserted below
        resolve(overrides)
    assert type(info.value) is kind
    message = str(info.value)
    assert "\n" not in message
    if value == 10**400:  # shown shortened
        assert message.startswith(f"resolve: {flag_of(field)} must be {allowed}, got 1000")
        assert message.endswith("...")
    else:
        assert message == _message(field, value, allowed)


# --- hand-checked messages ---------------------------------------------------------------------


def test_messages_read_as_a_user_expects() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"batch_size": 0},
            "resolve: --batch-size (batch_size in a config file) must be an integer >= 1, got 0",
        ),
        (
            {"progress": "no"},
            "resolve: --progress (progress in a config file) must be true or false (a boolean, "
            "not text or a number), got 'no'",
        ),
        (
            {"device": "tpu9"},
            "resolve: --device (device in a config file) must be cpu, cuda, cuda:N or mps, got "
            "'tpu9'",
        ),
        (
            {"lp_c": ","},
            "resolve: --lp-c (lp_c in a config file) must be a comma-separated list of numbers "
            "> 0 such as 0.01,0.1,1, got ','",
        ),
        (
            {"image_std": [0.2, 0.0, 0.2]},
            "resolve: --image-std (image_std in a config file) must be 3 finite numbers > 0, one "
            "per RGB channel, got [0.2, 0.0, 0.2]",
        ),
        (
            {"lr": np.float32(-1)},
            "resolve: --lr (lr in a config file) must be a finite number > 0, got -1.0",
        ),
    ]
    for overrides, message in cases:
        with pytest.raises((TypeError, ValueError)) as info:
            resolve(overrides)
        assert str(info.value) == message


def test_long_text_values_are_shortened_in_messages() -> None:
    with pytest.raises(ValueError) as info:
        resolve({"optimizer": "x" * 500})
    assert len(str(info.value)) < 300 and str(info.value).endswith("...")


def test_the_method_argument_is_checked_like_the_field() -> None:
    with pytest.raises(
        ValueError, match=r"^resolve: --method \(method in a config file\) must be one of ft, "
    ):
        resolve({}, method="wise")


def test_unknown_keys_are_listed_with_close_matches() -> None:
    with pytest.raises(ValueError) as info:
        resolve({"bach_size": 3, "learning_rate": 1e-3})
    assert str(info.value) == (
        "resolve: unknown configuration keys 'bach_size' (did you mean batch_size?), "
        "'learning_rate'; the keys are the names of the flags of robustft finetune --help, "
        "with _ for -"
    )
    with pytest.raises(ValueError, match=r"^resolve: unknown configuration key 'batch-size' "
                       r"\(did you mean batch_size\?\); "):  # fmt: skip
        resolve({"batch-size": 3})
    with pytest.raises(ValueError, match=r"^resolve: unknown configuration key 3; "):
        resolve({3: "x"})  # type: ignore[dict-item]


def test_overrides_must_be_a_mapping() -> None:
    with pytest.raises(
        TypeError, match=r"^resolve: overrides must be a mapping of field names to values, got"
    ):
        resolve([("lr", 1e-3)])  # type: ignore[arg-type]


def test_python_values_numpy_and_tuples() -> None:
    c = resolve(
        {
            "lr": np.float32(1e-3),
            "momentum": np.float64(0.9),
            "steps": np.int64(9),
            "progress": np.bool_(False),
            "image_mean": (np.float32(0.5), 0, 1),
            "lp_c": (np.float64(0.5), 2),
            "eval": (("r=/r"),),
        },
        method="ueo",
    )
    assert c.lr is not None and math.isclose(c.lr, 1e-3, rel_tol=1e-6) and type(c.lr) is float
    assert (c.momentum, c.steps, c.progress) == (0.9, 9, False)
    assert (type(c.steps), type(c.progress)) == (int, bool)
    assert c.image_mean == [0.5, 0.0, 1.0] and type(c.image_mean) is list
    assert c.lp_c == "0.5,2.0" and c.eval == {"r": "/r"}
    json.dumps(c.to_json(), allow_nan=False)


def test_templates_may_be_a_file(tmp_path: Path) -> None:
    mine = tmp_path / "prompts.txt"
    mine.write_text("a photo of a {}.\n", encoding="utf-8")
    assert resolve({"templates": str(mine)}).templates == str(mine)
    for missing in ("imagenet", str(tmp_path / "nope.txt"), str(tmp_path)):
        with pytest.raises(ValueError) as info:
            resolve({"templates": missing})
        assert str(info.value) == (
            "resolve: --templates (templates in a config file) must be openai, simple or an "
            f"existing text file of templates, got {missing!r} (no such file)"
        )


def test_lp_strengths() -> None:
    assert lp_strengths("0.01,0.1, 1") == [0.01, 0.1, 1.0]
    assert lp_strengths(resolve({}, method="lp-ft").lp_c) == [0.01, 0.1, 1.0, 10.0, 100.0]
    assert lp_strengths([2, 0.5]) == [2.0, 0.5]
    with pytest.raises(ValueError, match=r"^resolve: --lp-c \(lp_c in a config file\) must be a "):
        lp_strengths(",")
    with pytest.raises(TypeError, match=r"^resolve: --lp-c .* got None$"):
        lp_strengths(None)


# --- named sets --------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["eval", "shift", "ood"])
def test_named_set_entries(field: str) -> None:
    flag = flag_of(field).replace("(", r"\(").replace(")", r"\)")
    cases: list[tuple[Any, type[Exception], str]] = [
        (["=/data/r"], ValueError, "entries must be NAME=DIR, got '=/data/r'"),
        (["r="], ValueError, "entries must be NAME=DIR, got 'r='"),
        ([" =/x"], ValueError, "entries must be NAME=DIR, got ' =/x'"),
        (["r=/a", "r=/b"], ValueError, "names must be unique, got 'r' twice"),
        (["r=/a", "/b/r"], ValueError, "names must be unique, got 'r' twice"),
        ({"r": "/a", " r": "/b"}, ValueError, "names must be unique, got 'r' twice"),
        ([3], TypeError, "entries must be NAME=DIR or DIR strings, got 3"),
        (["/"], ValueError, "entry '/' has no folder name to use; write NAME=DIR"),
        ([""], ValueError, "entry '' has no folder name to use; write NAME=DIR"),
        (["val=/x"], ValueError, "name 'val' is reserved for the run's own val split; choose"),
        ({"train": "/x"}, ValueError, "name 'train' is reserved for the run's own train split"),
        ({"r": None}, TypeError, "must map each name to a folder, got None for 'r'"),
        ({"r": ""}, TypeError, "must map each name to a folder, got '' for 'r'"),
        ({"": "/x"}, ValueError, "names must be non-empty strings, got ''"),
        ({"  ": "/x"}, ValueError, "names must be non-empty strings, got '  '"),
        ({1: "/x"}, TypeError, "names must be non-empty strings, got 1"),
    ]
    for value, kind, text in cases:
        with pytest.raises(kind, match=rf"^resolve: {flag} {_escape(text)}"):
            resolve({field: value})


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_a_set_name_is_used_once_over_eval_shift_and_ood() -> None:
    with pytest.raises(ValueError) as info:
        resolve({"eval": {"a": "/x"}, "shift": ["a=/y"]})
    assert str(info.value) == (
        "resolve: --shift (shift in a config file) name 'a' is already the name of a --eval "
        "set; give every evaluation set its own name"
    )
    with pytest.raises(ValueError, match=r"--ood \(ood in a config file\) name 'b' .* --shift"):
        resolve({"shift": {"b": "/x"}, "ood": ["b=/y"]})
    with pytest.raises(ValueError, match=r"--ood .* name 'c' is already the name of a --eval"):
        resolve({"eval": ["c=/x"], "ood": ["c=/y"]})
    ok = resolve({"eval": ["a=/x"], "shift": ["b=/x"], "ood": ["c=/x"]})
    assert (ok.eval, ok.shift, ok.ood) == ({"a": "/x"}, {"b": "/x"}, {"c": "/x"})


def test_ood_reference_names_val_or_an_eval_or_shift_set() -> None:
    start = "resolve: --ood-reference (ood_reference in a config file) must be val or the name "
    with pytest.raises(ValueError) as info:
        resolve({"eval": ["a=/x"], "shift": ["b=/y"], "ood": ["n=/n"], "ood_reference": "zz"})
    assert str(info.value) == start + "of an --eval or --shift set (a, b), got 'zz'"
    with pytest.raises(ValueError) as info:
        resolve({"ood": ["n=/n"], "ood_reference": "n"})
    assert str(info.value) == (
        start
        + "of an --eval or --shift set (none given), got 'n' (an --ood set has no known images)"
    )


def test_ood_sets_need_known_images_to_score_against() -> None:
    message = (
        r"^resolve: --ood \(ood in a config file\) sets are scored against the known images of "
        r"--ood-reference \(val by default here\), but ueo has no validation split without --val; "
    )
    with pytest.raises(ValueError, match=message):
        resolve({"ood": ["n=/n"]}, method="ueo")
    with pytest.raises(ValueError, match=message):
        resolve({"ood": ["n=/n"], "eval": ["a=/a"], "ood_reference": "val"}, method="ueo")
    # a --val folder, an evaluation set to default to, or a supervised method's held-out split
    assert resolve({"ood": ["n=/n"], "val": "/v"}, method="ueo").ood == {"n": "/n"}
    assert resolve({"ood": ["n=/n"], "shift": ["s=/s"]}, method="ueo").ood_reference is None
    assert resolve({"ood": ["n=/n"], "ood_reference": "val"}, method="ft").ood_reference == "val"


def test_select_best_needs_eval_every() -> None:
    with pytest.raises(ValueError) as info:
        resolve({"select": "best", "steps": 3})
    assert str(info.value) == (
        "resolve: --select (select in a config file) is best, which picks the weights on the "
        "validation split every --eval-every steps; set --eval-every >= 1, got 0"
    )


def test_batch_must_split_into_accumulation_steps() -> None:
    with pytest.raises(ValueError) as info:
        resolve({"batch_size": 10, "accumulation": 4})
    assert str(info.value) == (
        "resolve: --batch-size (batch_size in a config file) must be a multiple of "
        "--accumulation, got 10 and --accumulation 4"
    )
    assert resolve({"batch_size": 12, "accumulation": 4}).accumulation == 4
    with pytest.raises(ValueError, match="must be a multiple of --accumulation, got 36 and"):
        resolve({"accumulation": 5}, method="clipood")  # against the method's default batch


# --- round trip --------------------------------------------------------------------------------


def test_resolved_config_round_trips_through_json() -> None:
    c = resolve(
        {"train": "t", "eval": ["a=/x", "b=/y"], "lr": 2e-5, "seed": 3, "image_std": (1, 2, 3)},
        method="lipsum",
    )
    again = resolve(json.loads(json.dumps(c.to_json(), allow_nan=False)))
    assert again == c
    assert c.to_json()["eval"] == {"a": "/x", "b": "/y"}


_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)
_names = st.text("abcxyz-_.0123456789 ", min_size=1, max_size=6).filter(
    lambda n: n == n.strip() and n and n not in ("train", "val")
)


def _floats(low: float | None, high: float | None, *, open_low: bool, open_high: bool) -> Any:
    return st.floats(
        low, high, exclude_min=open_low, exclude_max=open_high, allow_nan=False,
        allow_infinity=False,
    )  # fmt: skip


@st.composite
def valid_overrides(draw: Callable[[Any], Any]) -> dict[str, Any]:
    """Any valid ``resolve`` input: a method and a random subset of the fields set."""
    method = draw(st.sampled_from(METHODS))
    d: dict[str, Any] = {"method": method}
    pos = _floats(0, None, open_low=True, open_high=False)
    nonneg = _floats(0, None, open_low=False, open_high=False)
    frac = _floats(0, 1, open_low=False, open_high=True)
    fields = dataclasses.fields(RunConfig)
    choices = {f.name: f.metadata["choices"] for f in fields if "choices" in f.metadata}
    strategies: dict[str, Any] = {
        **{
            k: st.sampled_from(v)
            for k, v in choices.items()
            # peft: drawn together, below; descriptions_match needs a --descriptions file
            if k not in ("method", "peft", "peft_scaling", "descriptions_match")
        },
        "label_smoothing": frac,
        **{k: _text for k in ("model", "pretrained", "train", "val", "classnames", "output")},
        "prompt": _text,
        "val_fraction": _floats(0, 1, open_low=True, open_high=True),
        "templates": st.sampled_from(["openai", "simple"]),
        "skip_bad_images": st.booleans(),
        "progress": st.booleans(),
        "image_mean": st.lists(_floats(-1e3, 1e3, open_low=False, open_high=False), min_size=3,
                               max_size=3),
        "image_std": st.lists(pos, min_size=3, max_size=3),
        **{k: st.integers(1, 10**6) for k in ("lipsum_texts", "lipsum_length", "log_every")},
        **{k: st.integers(0, 10**6) for k in ("workers", "save_every", "eval_every")},
        "seed": st.integers(0, 2**63 - 1),
        **{k: pos for k in ("lr", "grad_clip", "bma_beta", "temperature", "collective_timeout")},
        **{k: nonneg for k in ("weight_decay", "margin", "reg_weight", "trade_off")},
        "momentum": frac,
        "warmup": frac,
        "ema_decay": _floats(0, 1, open_low=False, open_high=False),
        "tpr": _floats(0, 1, open_low=True, open_high=False),
        "score": st.sampled_from(["msp", "mcm", "energy", "max_logit"]),
        "device": st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:7", "mps"]),
        "lp_c": st.one_of(
            st.lists(pos, min_size=1, max_size=4),
            st.lists(pos, min_size=1, max_size=4).map(lambda xs: ",".join(map(repr, xs))),
        ),
    }  # fmt: skip
    for key, strategy in strategies.items():
        if draw(st.booleans()):
            d[key] = draw(strategy)
    if method == "tracer":  # its teacher is the BMA; cross_norm is its own
        d.pop("average", None)
        if draw(st.booleans()):
            d["cross_norm"] = draw(nonneg)
    # --peft and its settings (the settings of one kind only, the kind a method fixes)
    kind = {"r-adapter": "adapter", "clip-lora": "lora"}.get(method) or draw(
        st.sampled_from(["none", "lora", "adapter"])
    )
    if kind != "none":
        d["peft"] = kind
        peft: dict[str, Any] = {
            "peft_targets": st.lists(_names.map(lambda n: "*" + n), min_size=1, max_size=3).map(
                ",".join
            ),
            "peft_rescale": nonneg,
        }
        if kind == "lora":
            peft.update(
                peft_rank=st.integers(1, 64),
                peft_alpha=pos,
                peft_scaling=st.sampled_from(["rank", "sqrt_rank"]),
                peft_qkv=st.sampled_from(["q", "q,v", "q,k,v"]),
                peft_dropout=frac,
            )
        else:
            peft.update(peft_rank=st.integers(0, 64), peft_drop=frac)
        for key, strategy in peft.items():
            if draw(st.booleans()):
                d[key] = draw(strategy)
    length = draw(st.sampled_from(["default", "steps", "epochs"]))
    if length == "steps":
        d["steps"] = draw(st.integers(1, 10**7))
    elif length == "epochs":
        d["epochs"] = draw(pos)
    if draw(st.booleans()):
        d["accumulation"] = draw(st.integers(1, 8))
        d["batch_size"] = d["accumulation"] * draw(st.integers(1, 64))
    elif "batch_size" in d:
        del d["batch_size"]
    if d.get("select") == "best":
        d["eval_every"] = draw(st.integers(1, 100))
    names = draw(st.lists(_names, max_size=6, unique=True))
    cut = sorted(draw(st.lists(st.integers(0, len(names)), min_size=2, max_size=2)))
    for key, part in zip(("eval", "shift", "ood"), (names[: cut[0]], names[cut[0] : cut[1]],
                                                    names[cut[1] :])):  # fmt: skip
        paths = [draw(_text) for _ in part]
        if draw(st.booleans()):
            d[key] = dict(zip(part, paths))
        else:
            d[key] = [f"{n}={p}" for n, p in zip(part, paths)]
    known = names[: cut[1]]  # the eval and shift names
    has_val = method in SUPERVISED or "val" in d
    if (known or has_val) and draw(st.booleans()):
        d["ood_reference"] = draw(st.sampled_from(known + (["val"] if has_val else [])))
    elif names[cut[1] :] and not known and not has_val:
        d["val"] = "v"
    return d


@given(valid_overrides())
def test_every_valid_config_round_trips(overrides: dict[str, Any]) -> None:
    c = resolve(overrides)
    data = c.to_json()
    text = json.dumps(data, allow_nan=False)
    again = resolve(json.loads(text))
    assert again == c
    assert again.to_json() == data
    with tempfile.TemporaryDirectory() as tmp:  # and through a --config JSON file
        (Path(tmp) / "config.json").write_text(text, encoding="utf-8")
        assert resolve(load_config_file(Path(tmp) / "config.json")) == c


# --- configuration files -----------------------------------------------------------------------


def _write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_load_yaml_and_json(tmp_path: Path) -> None:
    yml = _write(
        tmp_path, "run.yaml", "method: clipood\nlr: 2.0e-5\neval:\n  r: /data/r\nprogress: false\n"
    )
    expected = {"method": "clipood", "lr": 2e-5, "eval": {"r": "/data/r"}, "progress": False}
    assert load_config_file(yml) == expected
    short = _write(tmp_path, "run.yml", yml.read_text(encoding="utf-8"))
    assert load_config_file(str(short)) == expected
    js = _write(tmp_path, "run.json", json.dumps(expected))
    assert load_config_file(js) == expected
    assert resolve(load_config_file(js)).eval == {"r": "/data/r"}
    bom = _write(tmp_path, "bom.json", b"\xef\xbb\xbf" + json.dumps(expected).encode())
    assert load_config_file(bom) == expected


def test_yaml_reads_yaml_1_2_scalars(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads ``1e-5`` as a string, ``no``/``on`` as booleans and dates as dates
    text = (
        "lr: 1e-5\nmomentum: .5\nsteps: 10\nprogress: true\nskip_bad_images: False\n"
        "output: 2024-01-01\nprompt: no\nmodel: on\ncollective_timeout: .inf\n"
    )
    data = load_config_file(_write(tmp_path, "run.yaml", text))
    assert data == {
        "lr": 1e-5, "momentum": 0.5, "steps": 10, "progress": True, "skip_bad_images": False,
        "output": "2024-01-01", "prompt": "no", "model": "on", "collective_timeout": math.inf,
    }  # fmt: skip
    assert type(data["steps"]) is int


@pytest.mark.parametrize("word", ["no", "'no'", '"yes"', "on", "off", "y", "1", "0"])
def test_a_yaml_boolean_field_refuses_anything_but_true_and_false(
    tmp_path: Path, word: str
) -> None:
    data = load_config_file(_write(tmp_path, "run.yaml", f"progress: {word}\n"))
    with pytest.raises(TypeError, match=r"^resolve: --progress \(progress in a config file\) "
                       r"must be true or false \(a boolean, not text or a number\), got "):  # fmt: skip
        resolve(data)


def test_keys_may_be_written_with_dashes(tmp_path: Path) -> None:
    data = load_config_file(_write(tmp_path, "run.yaml", "batch-size: 8\nlp-c: 1,2\nlr: 1.0e-3\n"))
    assert data == {"batch_size": 8, "lp_c": "1,2", "lr": 1e-3}
    assert resolve(data).batch_size == 8
    both = _write(tmp_path, "both.json", '{"batch-size": 8, "batch_size": 16}')
    with pytest.raises(ValueError) as info:
        load_config_file(both)
    assert str(info.value) == (
        f"load_config_file: config file {str(both)!r} sets batch_size twice, as 'batch-size' and "
        "'batch_size'; keep one"
    )
    # a misspelt dashed key stays as written, and resolve suggests the field
    data = load_config_file(_write(tmp_path, "typo.yaml", "bach-size: 8\n"))
    with pytest.raises(ValueError, match=r"key 'bach-size' \(did you mean batch_size\?\)"):
        resolve(data)


def test_malformed_yaml_names_the_line_and_column(tmp_path: Path) -> None:
    cases = [
        ("lr: [1, 2\n", "line 2, column 1: expected ',' or ']', but got '<stream end>' (while "
         "parsing a flow sequence)"),
        ("a: b: c\n", "line 1, column 5: mapping values are not allowed here"),
        ("lr: 1\n\tsteps: 2\n", "line 2, column 1: found character '\\t' that cannot start any "
         "token (while scanning for the next token)"),
        ("--- {}\n--- {}\n", "line 2, column 1: but found another document (expected a single "
         "document in the stream)"),
        ("lr: *x\n", "line 1, column 5: found undefined alias 'x'"),
        ("lr: \x07\n", "line 1, column 5: special characters are not allowed (character #x0007)"),
        ("a:\n  b: 1\nlr: 1\nlr: 2\n", "line 4, column 1: key 'lr' appears twice (first on line 3)"),
        ("eval:\n  r: /a\n  r: /b\n", "line 3, column 3: key 'r' appears twice (first on line 2)"),
        ("? [1, 2]\n: 3\n", "line 1, column 3: found unhashable key (while constructing a "
         "mapping)"),
    ]  # fmt: skip
    for text, problem in cases:
        path = _write(tmp_path, "bad.yaml", text)
        with pytest.raises(ValueError) as info:
            load_config_file(path)
        assert str(info.value) == (
            f"load_config_file: config file {str(path)!r} is not valid YAML: {problem}"
        )


def test_yaml_tags_that_build_objects_are_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = _write(
        tmp_path, "evil.yaml", f"lr: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    with pytest.raises(ValueError, match=r"line 1, column 5: could not determine a constructor "
                       r"for the tag 'tag:yaml.org,2002:python/object/apply:os.system'$"):  # fmt: skip
        load_config_file(path)
    assert not marker.exists()


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    text = "base: &b {lr: 1}\nrun:\n  <<: *b\n  lr: 2\n"
    assert load_config_file(_write(tmp_path, "m.yaml", text))["run"] == {"lr": 2}


def test_malformed_json_names_the_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.json", '{\n  "lr": 1,\n}\n')
    with pytest.raises(ValueError) as info:
        load_config_file(path)
    assert str(info.value) == (
        f"load_config_file: config file {str(path)!r} is not valid JSON: line 3, column 1: "
        "Expecting property name enclosed in double quotes"
    )
    dup = _write(tmp_path, "dup.json", '{"eval": {"r": "/a", "r": "/b"}}')
    with pytest.raises(ValueError) as info:
        load_config_file(dup)
    assert str(info.value) == (
        f"load_config_file: config file {str(dup)!r} has the key 'r' twice in one object; keep one"
    )


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_pathological_files_end_in_one_line(tmp_path: Path, suffix: str) -> None:
    kind = suffix.upper()
    depth = 1000 if suffix == "yaml" else 100_000  # beyond Python's recursion limit (1000)
    deep = _write(tmp_path, f"deep.{suffix}", '{"a": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ValueError) as info:
        load_config_file(deep)
    assert str(info.value) == (
        f"load_config_file: config file {str(deep)!r} is nested too deeply to be a configuration"
    )
    huge = _write(tmp_path, f"huge.{suffix}", '{"seed": ' + "1" * 5000 + "}")
    with pytest.raises(ValueError) as info:
        load_config_file(huge)
    assert str(info.value).startswith(
        f"load_config_file: config file {str(huge)!r} is not a usable {kind} file: Exceeds the "
        "limit (4300 digits)"
    )
    assert "\n" not in str(info.value)


def test_config_file_errors(tmp_path: Path) -> None:
    def message(path: Path) -> str:
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            load_config_file(path)
        assert "\n" not in str(info.value)
        return str(info.value)

    where = f"load_config_file: config file {str(tmp_path)!r}"
    assert message(tmp_path / "nope.yaml") == where[:-1] + "/nope.yaml' does not exist"
    assert message(tmp_path) == where + " is a directory; give a .yaml, .yml or .json file"
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert message(fifo) == (
        f"load_config_file: config file {str(fifo)!r} is not a regular file; give a .yaml, .yml "
        "or .json file"
    )
    toml = _write(tmp_path, "run.toml", "lr = 1e-5\n")
    assert message(toml) == (
        f"load_config_file: config file must end in .json, .yaml or .yml, got {str(toml)!r}"
    )
    latin = _write(tmp_path, "latin.yaml", "prompt: a\nmodel: caf\xe9\n".encode("latin-1"))
    assert message(latin) == (
        f"load_config_file: config file {str(latin)!r} is not UTF-8 text (byte 0xe9 on line 2); "
        "save it as UTF-8"
    )
    for name, text, got in [
        ("list.yaml", "- lr\n- 1\n", "list of length 2"),
        ("list.json", "[]", "list of length 0"),
        ("scalar.yaml", "lr\n", "'lr'"),
        ("empty.yaml", "", "an empty file"),
        ("comment.yaml", "# nothing yet\n", "an empty file"),
        ("null.json", "null", "an empty file"),
    ]:
        path = _write(tmp_path, name, text)
        assert message(path) == (
            f"load_config_file: config file {str(path)!r} must hold a mapping of fields "
            f"(key: value), got {got}"
        )
    keyed = _write(tmp_path, "keyed.yaml", "1: 2\n")
    assert message(keyed) == (
        f"load_config_file: config file {str(keyed)!r} has a key that is not text, 1; the keys "
        "are field names such as batch_size"
    )


def test_an_unreadable_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "run.yaml", "lr: 1\n")

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ValueError) as info:
        load_config_file(path)
    assert str(info.value) == (
        f"load_config_file: config file {str(path)!r} cannot be read: Permission denied"
    )
