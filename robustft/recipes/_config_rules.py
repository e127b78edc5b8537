"""The checks of a configuration's values: one rule per kind of value, and the table of them.

A rule takes a value as given (from a flag, a file or Python) and returns it as stored, or raises
``_RuleError`` with the end of the message (what is allowed, what was given); the caller adds the
function and the flag (``resolve: --batch-size (batch_size in a config file) must be ...``).
:func:`field_rules` builds the table of :class:`~robustft.recipes.RunConfig`'s fields, one rule
per field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from robustft._checks import describe, is_real_number

__all__ = ["DEVICES", "RESERVED_NAMES", "Rule", "field_rules"]

RESERVED_NAMES = ("train", "val")
"""Names no evaluation set may take: the run's own splits carry them in its results."""
DEVICES = "cpu, cuda, cuda:N or mps"
"""The devices ``--device`` accepts (default: cuda if available, else cpu)."""
_DEVICE = re.compile(r"cpu|mps|cuda(?::[0-9]+)?")

Rule = Callable[[Any], Any]
"""A field's check: the value as given -> the value stored (Python types); raises ``_RuleError``."""


class _RuleError(Exception):
    """A value a rule refuses: ``kind`` is the exception to raise, ``text`` the message's end."""

    def __init__(self, kind: type[Exception], text: str) -> None:
        super().__init__(text)
        self.kind, self.text = kind, text


def _show(value: Any) -> str:
    """A value as a message shows it: plain scalars and short lists of them, within 200 chars."""
    if isinstance(value, np.generic):
        value = value.item()
    scalars = (bool, int, float, str, type(None), np.generic)
    if isinstance(value, str):
        text = repr(value)
    elif (
        isinstance(value, (list, tuple))
        and len(value) <= 8
        and all(isinstance(v, scalars) for v in value)
    ):
        text = repr([v.item() if isinstance(v, np.generic) else v for v in value])
    else:
        text = describe(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` if it is NaN, infinite or too large for one."""
    try:
        x = float(value)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


# --- the rules, one kind of value each ---------------------------------------------------------


def _boolean(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise _RuleError(
        TypeError, f"must be true or false (a boolean, not text or a number), got {_show(value)}"
    )


def _integer(low: int, high: int | None = None) -> Rule:
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def rule(value: Any) -> int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise _RuleError(TypeError, f"must be {allowed}, got {_show(value)}")
        x = int(value)
        if x < low or (high is not None and x > high):
            raise _RuleError(ValueError, f"must be {allowed}, got {_show(value)}")
        return x

    return rule


def _number(ok: Callable[[float], bool], allowed: str) -> Rule:
    """A finite real number (ints and NumPy numbers too, never ``bool``) for which ``ok`` holds."""

    def rule(value: Any) -> float:
        if not is_real_number(value):
            raise _RuleError(TypeError, f"must be {allowed}, got {_show(value)}")
        x = _finite(value)
        if x is None or not ok(x):
            raise _RuleError(ValueError, f"must be {allowed}, got {_show(value)}")
        return x

    return rule


def _text(*, empty: bool = False) -> Rule:
    allowed = "a string" if empty else "a non-empty string"

    def rule(value: Any) -> str:
        if not isinstance(value, str):
            raise _RuleError(TypeError, f"must be {allowed}, got {_show(value)}")
        if not (empty or value):
            raise _RuleError(ValueError, f"must be {allowed}, got ''")
        return value

    return rule


def _choice(choices: Sequence[str]) -> Rule:
    allowed = "one of " + ", ".join(choices)

    def rule(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _RuleError(ValueError, f"must be {allowed}, got {_show(value)}")
        return value

    return rule


def _channels(*, positive: bool) -> Rule:
    allowed = f"3 finite numbers{' > 0' if positive else ''}, one per RGB channel"

    def rule(value: Any) -> list[float]:
        if not isinstance(value, (list, tuple)) or not all(is_real_number(v) for v in value):
            raise _RuleError(TypeError, f"must be {allowed}, got {_show(value)}")
        xs = [_finite(v) for v in value]
        if len(xs) != 3 or any(x is None or (positive and x <= 0) for x in xs):
            raise _RuleError(ValueError, f"must be {allowed}, got {_show(value)}")
        return [float(v) for v in value]

    return rule


def _named_entry(spec: Any) -> tuple[str, str]:
    """``NAME=DIR`` -> ``(NAME, DIR)``; a bare ``DIR`` is named by its last folder. The text
    before the first ``=`` is a name only if it holds no path separator (``/data/a=b`` is a DIR)."""
    if not isinstance(spec, str):
        raise _RuleError(TypeError, f"entries must be NAME=DIR or DIR strings, got {_show(spec)}")
    name, eq, path = spec.partition("=")
    if eq and "/" not in name and os.sep not in name:
        if not name.strip() or not path:
            raise _RuleError(ValueError, f"entries must be NAME=DIR, got {spec!r}")
        return name.strip(), path
    if not Path(spec).name:
        raise _RuleError(ValueError, f"entry {spec!r} has no folder name to use; write NAME=DIR")
    return Path(spec).name, spec


def _named_sets(value: Any) -> dict[str, str]:
    """``{NAME: DIR}`` from a mapping or a list of ``NAME=DIR``; names lose surrounding spaces."""
    items: list[tuple[str, str]]
    if isinstance(value, Mapping):
        items = []
        for name, path in value.items():
            if not isinstance(name, str) or not name.strip():
                kind = ValueError if isinstance(name, str) else TypeError
                raise _RuleError(kind, f"names must be non-empty strings, got {_show(name)}")
            if not isinstance(path, str) or not path:
                raise _RuleError(
                    TypeError, f"must map each name to a folder, got {_show(path)} for {name!r}"
                )
            items.append((name.strip(), path))
    elif isinstance(value, (list, tuple)):
        items = [_named_entry(spec) for spec in value]
    else:
        raise _RuleError(
            TypeError,
            f"must be a mapping NAME: DIR or a list of NAME=DIR strings, got {_show(value)}",
        )
    out: dict[str, str] = {}
    for name, path in items:
        if name in RESERVED_NAMES:
            raise _RuleError(
                ValueError,
                f"name {name!r} is reserved for the run's own {name} split; choose another",
            )
        if name in out:
            raise _RuleError(ValueError, f"names must be unique, got {name!r} twice")
        out[name] = path
    return out


def _strengths(value: Any) -> list[float]:
    """LP-FT's strengths: ``"0.01,0.1,1"``, a list of numbers or one number."""
    allowed = "a comma-separated list of numbers > 0 such as 0.01,0.1,1"
    if isinstance(value, str):
        xs: list[float | None] = []
        for part in value.split(","):
            try:
                xs.append(_finite(part))
            except ValueError:
                raise _RuleError(ValueError, f"must be {allowed}, got {_show(value)}") from None
    elif is_real_number(value):
        xs = [_finite(value)]
    elif isinstance(value, (list, tuple)) and value and all(is_real_number(v) for v in value):
        xs = [_finite(v) for v in value]
    else:
        raise _RuleError(TypeError, f"must be {allowed}, got {_show(value)}")
    if not all(x is not None and x > 0 for x in xs):
        raise _RuleError(ValueError, f"must be {allowed}, got {_show(value)}")
    return [x for x in xs if x is not None]


def _lp_c(value: Any) -> str:
    """The field keeps a string: as given, or the numbers of a list joined by commas."""
    xs = _strengths(value)
    return value if isinstance(value, str) else ",".join(repr(x) for x in xs)


def _device(value: Any) -> str:
    if not isinstance(value, str):
        raise _RuleError(TypeError, f"must be {DEVICES}, got {_show(value)}")
    if not _DEVICE.fullmatch(value):
        raise _RuleError(ValueError, f"must be {DEVICES}, got {_show(value)}")
    return value


def _templates(value: Any) -> str:
    allowed = "openai, simple or an existing text file of templates"
    if not isinstance(value, str):
        raise _RuleError(TypeError, f"must be {allowed}, got {_show(value)}")
    if value in ("openai", "simple") or Path(value).expanduser().is_file():
        return value
    raise _RuleError(ValueError, f"must be {allowed}, got {value!r} (no such file)")


def _text_file(what: str) -> Rule:
    """The path of an existing file (``~`` expanded when read); what it must hold: ``what``."""
    allowed = f"an existing text file ({what})"

    def rule(value: Any) -> str:
        if not isinstance(value, str):
            raise _RuleError(TypeError, f"must be {allowed}, got {_show(value)}")
        if not value:
            raise _RuleError(ValueError, f"must be {allowed}, got ''")
        if not Path(value).expanduser().is_file():
            raise _RuleError(ValueError, f"must be {allowed}, got {value!r} (no such file)")
        return value

    return rule


_POSITIVE = _number(lambda x: x > 0, "a finite number > 0")
_NON_NEGATIVE = _number(lambda x: x >= 0, "a finite number >= 0")
_FRACTION = _number(lambda x: 0 <= x < 1, "a number in [0, 1)")


def _globs(value: Any) -> str:
    """Comma-separated non-empty name globs (``--peft-targets``)."""
    allowed = "comma-separated weight-name globs, e.g. '*attn.in_proj_weight,*mlp.c_fc.weight'"
    if not isinstance(value, str):
        raise _RuleError(TypeError, f"must be {allowed}, got {_show(value)}")
    parts = [p.strip() for p in value.split(",")]
    if not all(parts):
        raise _RuleError(ValueError, f"must be {allowed} (no empty entry), got {_show(value)}")
    return ",".join(parts)


def _qkv(value: Any) -> str:
    """Distinct blocks among q, k, v (``--peft-qkv``), stored in q, k, v order."""
    allowed = "comma-separated distinct blocks among q, k, v (e.g. q,k,v or q,v)"
    if not isinstance(value, str):
        raise _RuleError(TypeError, f"must be {allowed}, got {_show(value)}")
    parts = [p.strip() for p in value.split(",")]
    if not parts or any(p not in ("q", "k", "v") for p in parts) or len(set(parts)) != len(parts):
        raise _RuleError(ValueError, f"must be {allowed}, got {_show(value)}")
    return ",".join(b for b in ("q", "k", "v") if b in parts)


def field_rules(
    fields: Mapping[str, dataclasses.Field[Any]], *, methods: Sequence[str], scores: Sequence[str]
) -> dict[str, Rule]:
    """Every field's check, one rule per field (``None`` is never checked: it means unset).

    Args:
        fields: :class:`~robustft.recipes.RunConfig`'s fields by name; a field with ``choices``
            in its metadata takes one of those.
        methods: the values of ``method``.
        scores: the values of ``score``.

    Returns:
        ``{field: rule}``, in the order of :class:`~robustft.recipes.RunConfig`'s fields.
    """

    def choice_of(name: str) -> Rule:
        """The choices the field's own metadata lists (the flag's ``choices`` too)."""
        return _choice(fields[name].metadata["choices"])

    return {
        "method": _choice(methods),
        "model": _text(),
        "pretrained": _text(),
        "train": _text(empty=True),  # empty: not given (the command then asks for --train)
        "val": _text(),
        "val_fraction": _number(lambda x: 0 < x < 1, "a number in (0, 1)"),
        "eval": _named_sets,
        "shift": _named_sets,
        "ood": _named_sets,
        "ood_reference": _text(),  # which names it may take: _check_together
        "classnames": _text(),
        "eval_classes": choice_of("eval_classes"),
        "templates": _templates,
        "descriptions": _text_file("a JSON object of class descriptions"),
        "descriptions_match": choice_of("descriptions_match"),
        "skip_bad_images": _boolean,
        "image_mean": _channels(positive=False),
        "image_std": _channels(positive=True),
        "image_resize": choice_of("image_resize"),
        "image_interpolation": choice_of("image_interpolation"),
        "output": _text(),
        "steps": _integer(1),
        "epochs": _POSITIVE,
        "batch_size": _integer(1),
        "accumulation": _integer(1),
        "optimizer": choice_of("optimizer"),
        "lr": _POSITIVE,
        "weight_decay": _NON_NEGATIVE,
        "momentum": _FRACTION,
        "warmup": _FRACTION,
        "schedule": choice_of("schedule"),
        "grad_clip": _POSITIVE,
        "average": choice_of("average"),
        "ema_decay": _number(lambda x: 0 <= x <= 1, "a number in [0, 1]"),
        "bma_beta": _POSITIVE,
        "margin": _NON_NEGATIVE,
        "cross_norm": _NON_NEGATIVE,
        "label_smoothing": _FRACTION,
        "reg_weight": _NON_NEGATIVE,
        "temperature": _POSITIVE,
        "lipsum_texts": _integer(1),
        "lipsum_length": _integer(1),
        "lipsum_vocabulary": _text_file("one text per line"),
        "lipsum_rescale": _boolean,
        "trade_off": _NON_NEGATIVE,
        "ueo_scale": _number(
            lambda x: x >= 0, "a finite number >= 0 (the scale of cos; 0: the model's own scale)"
        ),
        "prompt": _text(),
        "lp_c": _lp_c,
        "peft": choice_of("peft"),
        "peft_rank": _integer(0),
        "peft_alpha": _POSITIVE,
        "peft_scaling": choice_of("peft_scaling"),
        "peft_targets": _globs,
        "peft_qkv": _qkv,
        "peft_dropout": _FRACTION,
        "peft_drop": _FRACTION,
        "peft_rescale": _NON_NEGATIVE,
        "score": _choice(scores),
        "tpr": _number(lambda x: 0 < x <= 1, "a number in (0, 1]"),
        "eval_every": _integer(0),
        "select": choice_of("select"),
        "seed": _integer(0, 2**63 - 1),
        "precision": choice_of("precision"),
        "device": _device,
        "distributed": choice_of("distributed"),
        "workers": _integer(0),
        "log_every": _integer(1),
        "save_every": _integer(0),
        "progress": _boolean,
        "collective_timeout": _POSITIVE,
        "nonfinite": choice_of("nonfinite"),
    }
