"""The configuration of a recipe run: one dataclass, per-method defaults from the papers (SPEC §7).

Every field is a command-line flag of the same name (``--batch-size`` for ``batch_size``) and a
key of the YAML/JSON file given with ``--config``; flags override the file, the file overrides
the method's defaults, and the method's defaults override the generic ones. The resolved
configuration is written to ``config.json`` in the run folder, and ``--resume RUN`` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from robustft._checks import describe, is_real_number

__all__ = [
    "AVERAGES",
    "METHODS",
    "METHOD_DEFAULTS",
    "SCORES",
    "RunConfig",
    "load_config_file",
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
    image_mean: list[float] | None = _f(None, "per-channel normalisation mean (3 numbers)")
    image_std: list[float] | None = _f(None, "per-channel normalisation std (3 numbers)")
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
"""The fields that hold named image folders (``NAME=DIR``)."""


def _named_paths(fn: str, value: Any, key: str = "eval") -> dict[str, str]:
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out: dict[str, str] = {}
        for spec in value:
            name, sep, path = str(spec).partition("=")
            if not sep:
                name, path = Path(spec).name, str(spec)
            if not name or not path:
                raise ValueError(f"{fn}: {key} entries must be NAME=DIR, got {spec!r}")
            if name in out:
                raise ValueError(f"{fn}: {key} names must be unique, got {name!r} twice")
            out[name] = path
        return out
    raise TypeError(
        f"{fn}: {key} must be a mapping NAME -> DIR or a list of NAME=DIR, got {describe(value)}"
    )


def resolve(overrides: Mapping[str, Any], *, method: str | None = None) -> RunConfig:
    """Build the resolved configuration: generic defaults < method defaults < ``overrides``.

    Args:
        overrides: field values set by the user (flags and/or a file); ``None`` values are unset.
        method: the method, if not in ``overrides``.

    Returns:
        The :class:`RunConfig` with every per-method default filled in.

    Raises:
        ValueError: on an unknown field, an unknown method or choice, or an out-of-range value.
        TypeError: on a value of the wrong type.

    Example:
        >>> config = resolve({"train": "data/train", "lr": 3e-5}, method="clipood")
        >>> config.optimizer, config.lr, config.weight_decay, config.average, config.batch_size
        ('adamw', 3e-05, 0.1, 'bma', 36)
    """
    fn = "resolve"
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"{fn}: unknown configuration keys {unknown}; known: {sorted(fields)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    name = given.pop("method", None) or method or "ft"
    if name not in METHODS:
        raise ValueError(f"{fn}: method must be one of {', '.join(METHODS)}, got {name!r}")
    defaults = dict(METHOD_DEFAULTS[name])
    if "epochs" in given or "steps" in given:  # a length the user gives replaces the default's
        defaults.pop("steps", None)
        defaults.pop("epochs", None)
    values: dict[str, Any] = {**defaults, **given, "method": name}
    for key, value in values.items():  # NumPy numbers -> Python (config.json stays JSON)
        if key in _FLOATS and is_real_number(value) and type(value) not in (int, float):
            values[key] = float(value)
        elif key in _INTS and is_real_number(value) and hasattr(value, "__index__"):
            values[key] = int(value)  # NumPy integers; a float such as 2.0 is refused below
    if "epochs" in values and is_real_number(values["epochs"]):
        values["epochs"] = float(values["epochs"])
    for key in NAMED_SETS:
        if key in values:
            values[key] = _named_paths(fn, values[key], key)
    config = RunConfig(**values)
    _validate(fn, config, fields)
    return config


_FLOATS = frozenset(
    f.name for f in dataclasses.fields(RunConfig) if str(f.type).split("|")[0].strip() == "float"
)
_INTS = frozenset(
    f.name for f in dataclasses.fields(RunConfig) if str(f.type).split("|")[0].strip() == "int"
)


def _validate(fn: str, c: RunConfig, fields: Mapping[str, dataclasses.Field[Any]]) -> None:
    for name, f in fields.items():
        value = getattr(c, name)
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise ValueError(f"{fn}: {name} must be one of {', '.join(choices)}, got {value!r}")
    if c.score is not None and c.score not in SCORES:
        raise ValueError(f"{fn}: score must be one of {', '.join(SCORES)}, got {c.score!r}")
    positive_ints = ("batch_size", "accumulation", "lipsum_texts", "lipsum_length", "log_every")
    for name in ("steps", *positive_ints):
        value = getattr(c, name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise ValueError(f"{fn}: {name} must be an integer >= 1, got {value!r}")
    for name in ("workers", "save_every", "eval_every", "seed"):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{fn}: {name} must be an integer >= 0, got {value!r}")
    if c.steps is None and c.epochs is None:
        raise ValueError(f"{fn}: one of steps or epochs must be set, got neither")
    if c.epochs is not None and not (is_real_number(c.epochs) and 0 < c.epochs < math.inf):
        raise ValueError(f"{fn}: epochs must be a positive number, got {c.epochs!r}")
    checks = {
        "lr": (c.lr, lambda v: v > 0, "> 0"),
        "weight_decay": (c.weight_decay, lambda v: v >= 0, ">= 0"),
        "momentum": (c.momentum, lambda v: 0 <= v < 1, "in [0, 1)"),
        "warmup": (c.warmup, lambda v: 0 <= v < 1, "in [0, 1)"),
        "val_fraction": (c.val_fraction, lambda v: 0 < v < 1, "in (0, 1)"),
        "ema_decay": (c.ema_decay, lambda v: 0 <= v <= 1, "in [0, 1]"),
        "bma_beta": (c.bma_beta, lambda v: v > 0, "> 0"),
        "tpr": (c.tpr, lambda v: 0 < v <= 1, "in (0, 1]"),
        "temperature": (c.temperature, lambda v: v > 0, "> 0"),
        "grad_clip": (c.grad_clip, lambda v: v > 0, "> 0"),
        "reg_weight": (c.reg_weight, lambda v: v >= 0, ">= 0"),
        "margin": (c.margin, lambda v: v >= 0, ">= 0"),
        "trade_off": (c.trade_off, lambda v: v >= 0, ">= 0"),
    }
    for name, (value, ok, allowed) in checks.items():
        if value is None:
            continue
        if not is_real_number(value) or not math.isfinite(value):
            raise TypeError(f"{fn}: {name} must be a finite number, got {describe(value)}")
        if not ok(value):
            raise ValueError(f"{fn}: {name} must be {allowed}, got {value!r}")
    if c.select == "best" and not c.eval_every:
        raise ValueError(
            f"{fn}: select 'best' picks weights on the validation split every eval_every steps; "
            f"set eval_every >= 1, got {c.eval_every}"
        )
    if c.templates not in ("openai", "simple") and not Path(c.templates).expanduser().is_file():
        raise ValueError(
            f"{fn}: templates must be openai, simple or an existing text file of templates, got "
            f"{c.templates!r} (no such file)"
        )
    if c.batch_size is not None and c.batch_size % c.accumulation:
        raise ValueError(
            f"{fn}: batch_size must be a multiple of accumulation, got batch_size "
            f"{c.batch_size} and accumulation {c.accumulation}"
        )


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON configuration file into a dict of fields.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it is not a mapping, or has an unsupported suffix.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "run.json"
        >>> _ = p.write_text('{"method": "clipood", "lr": 1e-05}')
        >>> load_config_file(p)
        {'method': 'clipood', 'lr': 1e-05}
    """
    fn = "load_config_file"
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{fn}: config file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".yaml", ".yml"):
        data = _yaml_load(text)
    elif p.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"{fn}: config file must end in .json, .yaml or .yml, got {str(p)!r}")
    if not isinstance(data, dict):
        raise ValueError(f"{fn}: config file must hold a mapping of fields, got {describe(data)}")
    return data


def _yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2's floats: ``1e-5`` is a number (PyYAML's YAML 1.1 reads a
    string), as users write learning rates."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    float_re = re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    )
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", float_re, list("-+0123456789."))
    return yaml.load(text, Loader=Loader)  # a SafeLoader subclass: no arbitrary objects
