"""The configuration of a recipe run: one dataclass, per-method defaults from the papers (SPEC §7).

Every field is a command-line flag of the same name (``--batch-size`` for ``batch_size``) and a
key of the YAML/JSON file given with ``--config``; flags override the file, the file overrides
the method's defaults, and the method's defaults override the generic ones. The resolved
configuration is written to ``config.json`` in the run folder, and ``--resume RUN`` reads it back.

Every value, from a flag, a file or Python, passes the same check (one rule per field, in
``_RULES``): a boolean must be ``true``/``false`` (``'no'``, ``"yes"``, ``1`` are refused, never
read as truthy), an integer an integer (not ``2.5``, ``"3"`` or ``true``), a number a finite
number. A refused value gets one line that names the flag and the file key, what is allowed and
what was given::

    resolve: --batch-size (batch_size in a config file) must be an integer >= 1, got 0

Config files may spell keys with dashes, as the flags do (``batch-size`` is ``batch_size``).
YAML files are read with YAML 1.2's scalars: ``1e-5`` is a number, only ``true``/``false`` are
booleans (``yes``/``no``/``on``/``off`` are strings, so a boolean field refuses them), dates
are strings, and a key given twice is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from robustft._checks import describe, is_real_number

__all__ = [
    "AVERAGES",
    "METHODS",
    "METHOD_DEFAULTS",
    "SCORES",
    "RunConfig",
    "flag_of",
    "load_config_file",
    "lp_strengths",
    "resolve",
]

SUPERVISED = ("ft", "lp-ft", "l2sp", "kd", "car-ft", "feature-kd", "flyp", "lipsum", "clipood")
UNSUPERVISED = ("ueo", "entropy", "im")
METHODS = SUPERVISED + UNSUPERVISED
"""Every trainable method, supervised first (``robustft finetune``), then unsupervised
(``robustft ueo``)."""
AVERAGES = ("none", "ema", "bma", "uniform")
"""The trajectory averages of ``--average`` (:mod:`robustft.averaging`; ``none`` keeps none)."""
SCORES = ("msp", "mcm", "energy", "max_logit")
"""The OOD scores of ``--score`` (``mcm``: MSP of the cosines at scale 1, UEO's score)."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a training run; ``None`` means "the method's default".

    See :data:`METHOD_DEFAULTS` for the per-method values and ``robustft finetune --help`` for
    the meaning of each field (the help strings below).
    """

    # what
    method: str = _f("ft", "the method: " + ", ".join(METHODS), choices=METHODS)
    model: str = _f("ViT-B-16", "open_clip model name, or a path to an open_clip model config JSON")
    pretrained: str | None = _f(
        None,
        "open_clip pretrained tag (e.g. openai) or a local checkpoint file; none = random init",
    )
    # data
    train: str = _f("", "ImageFolder root of the training images (one folder per class)")
    val: str | None = _f(None, "ImageFolder root of the validation split; none = held out of train")
    val_fraction: float = _f(0.1, "fraction of each class held out of train when --val is absent")
    eval: dict[str, str] = dataclasses.field(
        default_factory=dict,
        metadata={
            "help": "evaluation set NAME=DIR (repeatable); folders outside the classes are "
            "unknown classes (open set)",
            "repeat": True,
        },
    )
    shift: dict[str, str] = dataclasses.field(
        default_factory=dict,
        metadata={
            "help": "evaluation set NAME=DIR that is a distribution shift of the training data "
            "(repeatable): evaluated like --eval, and summarised as the mean and worst accuracy "
            "over the shifts",
            "repeat": True,
        },
    )
    ood: dict[str, str] = dataclasses.field(
        default_factory=dict,
        metadata={
            "help": "pure out-of-distribution set NAME=DIR (repeatable): every image is unknown, "
            "whatever its folders; scored by AUROC/FPR@95 against --ood-reference's known images",
            "repeat": True,
        },
    )
    ood_reference: str | None = _f(
        None,
        "the in-distribution set the --ood sets are scored against: val or a --eval/--shift "
        "name (default: the validation split, else the first evaluation set)",
    )
    classnames: str | None = _f(
        None, "class names file: one class per line, 'folder' or 'folder<TAB>name'; or JSON"
    )
    eval_classes: str = _f(
        "all",
        "classes an evaluation set is scored over: all, or present (only those with a folder in "
        "the set, as ImageNet-R/-A score 200 of the 1000 classes)",
        choices=("all", "present"),
    )
    templates: str = _f(
        "openai",
        "zero-shot head prompts: openai (CLIP's 80 templates), simple (1), or a text file of "
        "templates, one per line, each with one {} for the class name",
    )
    skip_bad_images: bool = _f(
        False,
        "skip images that cannot be decoded (reported with their count) instead of stopping",
    )
    # image preprocessing (default: the pretrained tag's, the model config's preprocess_cfg, or a
    # <checkpoint>.json sidecar next to a local checkpoint; else open_clip's OpenAI values)
    image_mean: list[float] | None = dataclasses.field(
        default=None, metadata={"help": "per-channel normalisation mean (3 numbers)"}
    )
    image_std: list[float] | None = dataclasses.field(
        default=None, metadata={"help": "per-channel normalisation std (3 numbers)"}
    )
    image_resize: str | None = _f(
        None,
        "resize mode of the eval transform: shortest, longest or squash",
        choices=("shortest", "longest", "squash"),
    )
    image_interpolation: str | None = _f(
        None, "resize interpolation: bicubic or bilinear", choices=("bicubic", "bilinear")
    )
    output: str = _f("runs/run", "run folder (created; config, metrics, results, weights)")
    # optimisation
    steps: int | None = _f(None, "optimiser steps (default: the method's, or from --epochs)")
    epochs: float | None = _f(None, "epochs instead of --steps (UEO's protocol: 5)")
    batch_size: int | None = _f(None, "global batch per optimiser step, over all ranks")
    accumulation: int = _f(1, "gradient-accumulation micro-steps per optimiser step")
    optimizer: str | None = _f(None, "adamw or sgd", choices=("adamw", "sgd"))
    lr: float | None = _f(None, "peak learning rate")
    weight_decay: float | None = _f(None, "decoupled (AdamW) or L2 (SGD) weight decay")
    momentum: float = _f(0.0, "SGD momentum (UEO uses none)")
    warmup: float | None = _f(None, "linear warm-up, as a fraction of the steps")
    schedule: str = _f(
        "cosine", "cosine or constant after the warm-up", choices=("cosine", "constant")
    )
    grad_clip: float | None = _f(None, "clip the global gradient norm to this value")
    average: str | None = _f(None, "trajectory average: " + ", ".join(AVERAGES), choices=AVERAGES)
    ema_decay: float = _f(0.999, "EMA decay per step")
    bma_beta: float = _f(0.5, "BMA's Beta(β, β) (CLIPood: 0.5; 0.1 for open classes)")
    # method hyper-parameters (the papers' units)
    margin: float = _f(0.3, "CLIPood: margin λ of the margin metric softmax")
    reg_weight: float | None = _f(
        None, "weight of the regulariser: L2-SP, KD, CAR-FT, FeatKD or Lipsum-FT's λ"
    )
    temperature: float = _f(1.0, "KD temperature")
    lipsum_texts: int = _f(80, "Lipsum-FT: random texts per step (M)")
    lipsum_length: int = _f(8, "Lipsum-FT: tokens per random text (L)")
    trade_off: float = _f(1.0, "UEO/IM: weight γ of the marginal-entropy term")
    prompt: str = _f("a photo of a", "UEO: the words the learned context starts from")
    lp_c: str = _f("0.01,0.1,1,10,100", "LP-FT: logistic-regression strengths to pick on val")
    # evaluation
    score: str | None = _f(None, "OOD score: msp, mcm (MSP at scale 1, UEO's), energy, max_logit")
    tpr: float = _f(0.95, "open-set threshold: accept this fraction of the validation knowns")
    eval_every: int = _f(0, "evaluate the validation split every N steps (0: at the end only)")
    select: str = _f(
        "last", "weights reported: last or best (on validation accuracy)", choices=("last", "best")
    )
    # runtime
    seed: int = _f(0, "seed of the data order, augmentation and random texts")
    precision: str = _f(
        "auto", "auto (bf16 autocast on GPU), fp32 or bf16", choices=("auto", "fp32", "bf16")
    )
    device: str | None = _f(None, "device (default: cuda if available, else cpu)")
    distributed: str = _f("ddp", "under torchrun: ddp or fsdp (FSDP2)", choices=("ddp", "fsdp"))
    workers: int = _f(4, "DataLoader worker processes per rank")
    log_every: int = _f(10, "steps between metrics.jsonl lines")
    save_every: int = _f(100, "steps between resumable checkpoints (0: only at the end)")
    progress: bool = _f(True, "show a tqdm progress bar on rank 0")
    collective_timeout: float = _f(
        600.0,
        "under torchrun: seconds a rank may wait in a collective (a stopped or hung peer) before "
        "the whole job fails",
    )
    nonfinite: str = _f(
        "stop",
        "on a non-finite loss: stop (at that step, naming it and the last good checkpoint) or "
        "skip (drop that step's update and count it)",
        choices=("stop", "skip"),
    )

    def to_json(self) -> dict[str, Any]:
        """The configuration as a JSON-able dict (every field)."""
        return dataclasses.asdict(self)


# FT as WiSE-FT / FLYP fine-tune CLIP: AdamW, weight decay 0.1, 10 % warm-up + cosine, batch 256
_FT: dict[str, Any] = dict(
    optimizer="adamw", lr=1e-5, weight_decay=0.1, warmup=0.1, batch_size=256, steps=5000,
    average="none",
)  # fmt: skip
# UEO (Liang et al. 2024, code): SGD lr 1e-4 without momentum, cosine per iteration, batch 64,
# 5 epochs, γ = 1, MSP at scale 1 as the OOD score; its baselines train the same way
_UEO: dict[str, Any] = dict(
    optimizer="sgd", lr=1e-4, weight_decay=0.0, warmup=0.0, batch_size=64, epochs=5.0,
    average="none", score="mcm",
)  # fmt: skip

METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "ft": _FT,
    "lp-ft": _FT,
    "l2sp": {**_FT, "weight_decay": 0.0, "reg_weight": 0.1},  # the penalty replaces the decay
    "kd": {**_FT, "reg_weight": 1.0},
    "car-ft": {**_FT, "reg_weight": 1.0},
    "feature-kd": {**_FT, "reg_weight": 1.0},
    "flyp": _FT,
    # Lipsum-FT (Nam et al. 2024, code): AdamW lr 1e-5, no weight decay, batch 256, 10 % warm-up
    # + cosine, M = 80, L = 8, λ = 1 at the paper's scale 100 (SPEC §4)
    "lipsum": {**_FT, "weight_decay": 0.0, "reg_weight": 1.0},
    # CLIPood (Shu et al. 2023, code): AdamW lr 1e-5, wd 0.1, cosine without warm-up, batch 36,
    # λ 0.3, BMA β 0.5
    "clipood": {**_FT, "warmup": 0.0, "batch_size": 36, "average": "bma"},
    "ueo": _UEO,
    "entropy": {**_UEO, "trade_off": 0.0},  # entropy minimisation: no marginal term
    "im": _UEO,  # information maximisation: UEO's objective with uniform weights
}
"""Per-method defaults (SPEC §7); a value the user sets always wins."""


NAMED_SETS = ("eval", "shift", "ood")
"""The fields that hold named image folders (``NAME=DIR``); a name is used once over all three."""
RESERVED_NAMES = ("train", "val")
"""Names no evaluation set may take: the run's own splits carry them in its results."""
DEVICES = "cpu, cuda, cuda:N or mps"
"""The devices ``--device`` accepts (default: cuda if available, else cpu)."""
_DEVICE = re.compile(r"cpu|mps|cuda(?::[0-9]+)?")
_FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(RunConfig)}

Rule = Callable[[Any], Any]
"""A field's check: the value as given -> the value stored (Python types); raises ``_RuleError``."""


class _RuleError(Exception):
    """A value a rule refuses: ``kind`` is the exception to raise, ``text`` the message's end."""

    def __init__(self, kind: type[Exception], text: str) -> None:
        super().__init__(text)
        self.kind, self.text = kind, text


def flag_of(name: str) -> str:
    """How a message names field ``name``: its flag, then its key in a config file.

    Args:
        name: a field of :class:`RunConfig`.

    Returns:
        ``"--flag-name (field_name in a config file)"``, the subject of every message of
        :func:`resolve` about that field.

    Example:
        >>> flag_of("batch_size")
        '--batch-size (batch_size in a config file)'
    """
    return f"--{name.replace('_', '-')} ({name} in a config file)"


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


def _choice_of(name: str) -> Rule:
    """The choices the field's own metadata lists (the flag's ``choices`` too)."""
    return _choice(_FIELDS[name].metadata["choices"])


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


_POSITIVE = _number(lambda x: x > 0, "a finite number > 0")
_NON_NEGATIVE = _number(lambda x: x >= 0, "a finite number >= 0")
_FRACTION = _number(lambda x: 0 <= x < 1, "a number in [0, 1)")

_RULES: dict[str, Rule] = {
    "method": _choice(METHODS),
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
    "eval_classes": _choice_of("eval_classes"),
    "templates": _templates,
    "skip_bad_images": _boolean,
    "image_mean": _channels(positive=False),
    "image_std": _channels(positive=True),
    "image_resize": _choice_of("image_resize"),
    "image_interpolation": _choice_of("image_interpolation"),
    "output": _text(),
    "steps": _integer(1),
    "epochs": _POSITIVE,
    "batch_size": _integer(1),
    "accumulation": _integer(1),
    "optimizer": _choice_of("optimizer"),
    "lr": _POSITIVE,
    "weight_decay": _NON_NEGATIVE,
    "momentum": _FRACTION,
    "warmup": _FRACTION,
    "schedule": _choice_of("schedule"),
    "grad_clip": _POSITIVE,
    "average": _choice_of("average"),
    "ema_decay": _number(lambda x: 0 <= x <= 1, "a number in [0, 1]"),
    "bma_beta": _POSITIVE,
    "margin": _NON_NEGATIVE,
    "reg_weight": _NON_NEGATIVE,
    "temperature": _POSITIVE,
    "lipsum_texts": _integer(1),
    "lipsum_length": _integer(1),
    "trade_off": _NON_NEGATIVE,
    "prompt": _text(),
    "lp_c": _lp_c,
    "score": _choice(SCORES),
    "tpr": _number(lambda x: 0 < x <= 1, "a number in (0, 1]"),
    "eval_every": _integer(0),
    "select": _choice_of("select"),
    "seed": _integer(0, 2**63 - 1),
    "precision": _choice_of("precision"),
    "device": _device,
    "distributed": _choice_of("distributed"),
    "workers": _integer(0),
    "log_every": _integer(1),
    "save_every": _integer(0),
    "progress": _boolean,
    "collective_timeout": _POSITIVE,
    "nonfinite": _choice_of("nonfinite"),
}
"""Every field's check, one rule per field (``None`` is never checked: it means unset)."""


def _check_field(fn: str, name: str, value: Any) -> Any:
    """Field ``name``'s value as stored, or the one-line error naming its flag."""
    try:
        return _RULES[name](value)
    except _RuleError as bad:
        raise bad.kind(f"{fn}: {flag_of(name)} {bad.text}") from None


def lp_strengths(lp_c: Any) -> list[float]:
    """LP-FT's logistic-regression strengths (``RunConfig.lp_c``) as numbers.

    Args:
        lp_c: ``"0.01,0.1,1"``, a list of numbers or one number.

    Returns:
        The strengths, in the order given.

    Raises:
        TypeError: ``lp_c`` is neither text nor numbers.
        ValueError: an entry is not a finite number > 0, or there is none (``","``).

    Example:
        >>> lp_strengths("0.01,0.1, 1")
        [0.01, 0.1, 1.0]
    """
    try:
        return _strengths(lp_c)
    except _RuleError as bad:
        raise bad.kind(f"resolve: {flag_of('lp_c')} {bad.text}") from None


def _unknown_keys(fn: str, unknown: Sequence[Any]) -> str:
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key).replace("-", "_"), list(_FIELDS), n=2)
        parts.append(f"{key!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return (
        f"{fn}: unknown configuration key{'s' if len(unknown) > 1 else ''} {', '.join(parts)}; "
        "the keys are the names of the flags of robustft finetune --help, with _ for -"
    )


def resolve(overrides: Mapping[str, Any], *, method: str | None = None) -> RunConfig:
    """Build the resolved configuration: generic defaults < method defaults < ``overrides``.

    Every value is checked as its flag is (``_RULES``: booleans only ``True``/``False``,
    integers only integers, numbers finite), then the fields that depend on each other: a set
    name is used once over ``eval``, ``shift`` and ``ood``, ``ood_reference`` names ``val`` or an
    ``eval``/``shift`` set, ``batch_size`` splits into ``accumulation`` micro-steps, ``select``
    ``best`` needs ``eval_every``. ``resolve(config.to_json())`` gives ``config`` back.

    Args:
        overrides: field values set by the user (flags and/or a file); ``None`` values are unset.
        method: the method, if not in ``overrides``.

    Returns:
        The :class:`RunConfig` with every per-method default filled in.

    Raises:
        ValueError: on an unknown field (with close matches), an unknown method or choice, an
            out-of-range value, or fields that contradict each other; the message names the
            flag, e.g. ``resolve: --lr (lr in a config file) must be a finite number > 0, got 0``.
        TypeError: on a value of the wrong type (``'no'`` for a boolean, ``2.5`` for an integer).

    Example:
        >>> config = resolve({"train": "data/train", "lr": 3e-5}, method="clipood")
        >>> config.optimizer, config.lr, config.weight_decay, config.average, config.batch_size
        ('adamw', 3e-05, 0.1, 'bma', 36)
    """
    fn = "resolve"
    if not isinstance(overrides, Mapping):
        raise TypeError(
            f"{fn}: overrides must be a mapping of field names to values, got {describe(overrides)}"
        )
    unknown = [k for k in overrides if k not in _FIELDS]
    if unknown:
        raise ValueError(_unknown_keys(fn, unknown))
    given = {k: v for k, v in overrides.items() if v is not None}
    name = _check_field(fn, "method", given.pop("method", method if method is not None else "ft"))
    defaults = dict(METHOD_DEFAULTS[name])
    if "epochs" in given or "steps" in given:  # a length the user gives replaces the default's
        defaults.pop("steps", None)
        defaults.pop("epochs", None)
    values: dict[str, Any] = {**dataclasses.asdict(RunConfig()), **defaults, **given}
    values["method"] = name
    checked: dict[str, Any] = {
        k: None if v is None else _check_field(fn, k, v) for k, v in values.items()
    }
    _check_together(fn, checked)
    return RunConfig(**checked)


def _check_together(fn: str, c: Mapping[str, Any]) -> None:
    """The checks of fields that depend on each other (each field alone is already valid)."""
    if c["select"] == "best" and not c["eval_every"]:
        raise ValueError(
            f"{fn}: {flag_of('select')} is best, which picks the weights on the validation split "
            f"every --eval-every steps; set --eval-every >= 1, got {c['eval_every']}"
        )
    if c["batch_size"] is not None and c["batch_size"] % c["accumulation"]:
        raise ValueError(
            f"{fn}: {flag_of('batch_size')} must be a multiple of --accumulation, got "
            f"{c['batch_size']} and --accumulation {c['accumulation']}"
        )
    owner: dict[str, str] = {}
    for key in NAMED_SETS:
        for name in c[key]:
            if name in owner:
                raise ValueError(
                    f"{fn}: {flag_of(key)} name {name!r} is already the name of a --{owner[name]} "
                    "set; give every evaluation set its own name"
                )
            owner[name] = key
    ref = c["ood_reference"]
    known = [*c["eval"], *c["shift"]]
    has_val = bool(c["val"]) or c["method"] in SUPERVISED  # supervised runs hold one out
    if ref is not None and ref != "val" and ref not in known:
        why = " (an --ood set has no known images)" if ref in c["ood"] else ""
        raise ValueError(
            f"{fn}: {flag_of('ood_reference')} must be val or the name of an --eval or --shift "
            f"set ({', '.join(known) or 'none given'}), got {ref!r}{why}"
        )
    if c["ood"] and (ref == "val" or (ref is None and not known)) and not has_val:
        raise ValueError(
            f"{fn}: {flag_of('ood')} sets are scored against the known images of "
            f"--ood-reference ({ref or 'val'} by default here), but {c['method']} has no "
            "validation split without --val; give --val DIR, or an --eval/--shift set and name "
            "it with --ood-reference"
        )


# --- configuration files -----------------------------------------------------------------------


class _DuplicateKeyError(Exception):
    """A JSON object with the same key twice."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON configuration file into a dict of fields.

    Keys may be written as the fields (``batch_size``) or as the flags (``batch-size``); both
    come back as the field's name. Values are returned as read: :func:`resolve` checks them.
    YAML is read with YAML 1.2's scalars (``1e-5`` is a number; only ``true``/``false`` are
    booleans; dates are strings) and a safe loader (no tags that build objects).

    Args:
        path: the file.

    Returns:
        ``{field: value}`` as written in the file.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: in one line naming the file: a directory or other non-regular file, a
            suffix other than ``.json``/``.yaml``/``.yml``, an unreadable or non-UTF-8 file,
            malformed YAML or JSON (with the line and column), a key given twice (also once
            with dashes and once with underscores), a key that is not text, or a top level
            that is not a mapping.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "run.json"
        >>> _ = p.write_text('{"method": "clipood", "lr": 1e-05, "batch-size": 32}')
        >>> load_config_file(p)
        {'method': 'clipood', 'lr': 1e-05, 'batch_size': 32}
    """
    fn = "load_config_file"
    p = Path(path)
    where = f"{fn}: config file {str(p)!r}"
    if not p.exists():
        raise FileNotFoundError(f"{where} does not exist")
    if p.is_dir():
        raise ValueError(f"{where} is a directory; give a .yaml, .yml or .json file")
    if not p.is_file():
        raise ValueError(f"{where} is not a regular file; give a .yaml, .yml or .json file")
    if p.suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(f"{fn}: config file must end in .json, .yaml or .yml, got {str(p)!r}")
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise ValueError(f"{where} cannot be read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{where} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); save it "
            "as UTF-8"
        ) from None
    data = _parse_yaml(where, text) if p.suffix != ".json" else _parse_json(where, text)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else describe(data)
        raise ValueError(f"{where} must hold a mapping of fields (key: value), got {got}")
    return _field_keys(where, data)


def _parse_json(where: str, text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{where} is not valid JSON: line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    except _DuplicateKeyError as err:
        raise ValueError(
            f"{where} has the key {err.args[0]!r} twice in one object; keep one"
        ) from None
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply to be a configuration") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise ValueError(
            f"{where} is not a usable JSON file: {' '.join(str(err).split())}"
        ) from None


def _parse_yaml(where: str, text: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass: no objects
    except yaml.YAMLError as err:
        raise ValueError(f"{where} is not valid YAML: {_yaml_problem(err, text)}") from None
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply to be a configuration") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise ValueError(
            f"{where} is not a usable YAML file: {' '.join(str(err).split())}"
        ) from None


def _yaml_problem(err: Exception, text: str) -> str:
    """``line L, column C: problem (context)`` of a PyYAML error, in one line."""
    import yaml

    if isinstance(err, yaml.reader.ReaderError):
        line = text.count("\n", 0, err.position) + 1
        column = err.position - text.rfind("\n", 0, err.position)
        return f"line {line}, column {column}: {err.reason} (character #x{err.character:04x})"
    assert isinstance(err, yaml.MarkedYAMLError)  # the loader's other errors
    mark = err.problem_mark or err.context_mark
    problem = err.problem or err.context or "malformed"
    context = f" ({err.context})" if err.context and err.problem else ""
    at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{at}{problem}{context}".split())


@functools.cache
def _yaml_loader() -> type[Any]:
    """PyYAML's SafeLoader with YAML 1.2's booleans and floats, no timestamps, unique keys."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:  # unhashable: SafeLoader refuses it with its own mark
                    continue
                if seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (first on line {first[key]})",
                        key_node.start_mark,
                    )  # fmt: skip
                first[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    replaced = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")
    Loader.yaml_implicit_resolvers = {
        k: [(tag, rx) for tag, rx in v if tag not in replaced]
        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool",
        re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
        list("tTfF"),
    )
    float_re = re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    )
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", float_re, list("-+0123456789."))
    return Loader


def _field_keys(where: str, data: Mapping[Any, Any]) -> dict[str, Any]:
    """The file's keys as field names (``batch-size`` -> ``batch_size``); unknown keys stay."""
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ValueError(
                f"{where} has a key that is not text, {_show(key)}; the keys are field names "
                "such as batch_size"
            )
        name = key.replace("-", "_")
        name = name if name in _FIELDS else key
        if name in out:
            raise ValueError(
                f"{where} sets {name} twice, as {spelled[name]!r} and {key!r}; keep one"
            )
        out[name], spelled[name] = value, key
    return out
