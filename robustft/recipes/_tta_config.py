"""``robustft tta``'s configuration: the settings of a test-time adaptation run, checked, and its flags.

:class:`TtaConfig` holds the run (a :class:`~robustft.recipes.RunConfig` for the shared fields:
model, data, templates, prompt, seed, runtime) and the test-time settings; :func:`resolve_tta`
builds and checks it; :func:`add_arguments` and :func:`config_from` are its command line. The job
itself is :mod:`robustft.recipes._tta`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robustft.recipes import _runfolder as run
from robustft.recipes._config import RunConfig, load_config_file, resolve

if TYPE_CHECKING:
    import argparse


__all__ = [
    "CHECKPOINT",
    "FLAG_FIELDS",
    "FORMAT",
    "PROTOCOLS",
    "RESUMABLE",
    "RUN_FIELDS",
    "TTA_METHODS",
    "TtaConfig",
    "add_arguments",
    "config_from",
    "resolve_tta",
]

TTA_METHODS = ("tpt", "ctpt", "tda", "zero-shot")
"""The methods of ``robustft tta``."""
PROTOCOLS = ("episodic", "online")
"""``episodic``: the state is reset per image; ``online``: it is carried along the stream."""
RUN_FIELDS = (
    "model", "pretrained", "train", "classnames", "eval", "shift", "ood", "ood_reference",
    "templates", "descriptions", "descriptions_match", "skip_bad_images", "image_mean",
    "image_std", "image_resize", "image_interpolation", "output", "prompt", "score", "seed",
    "precision", "device", "workers", "collective_timeout",
)  # fmt: skip
"""The :class:`~robustft.recipes.RunConfig` fields a test-time run uses (model, data, runtime)."""
FLAG_FIELDS = ("method", *(f for f in RUN_FIELDS if f not in ("train", "prompt")))
"""The fields whose flags the command line builds from :class:`RunConfig`'s help (``--train``
and ``--prompt`` mean something else here and are added by :func:`add_arguments`)."""
RESUMABLE = frozenset({"output", "workers", "device", "save_every", "collective_timeout"})
"""What ``--resume`` may change: where and how the run is watched, never what it computes."""
CHECKPOINT = "checkpoint.pt"
FORMAT = "robustft-tta/1"


@dataclasses.dataclass(frozen=True)
class TtaConfig:
    """Everything that defines a test-time adaptation run (see ``robustft tta --help``).

    Attributes:
        run: the model, data and runtime fields (:data:`RUN_FIELDS` of a resolved
            :class:`RunConfig`; its other fields are unused).
        method: ``"tpt"``, ``"ctpt"``, ``"tda"`` or ``"zero-shot"``.
        tta_protocol: ``"episodic"`` or ``"online"`` (:data:`PROTOCOLS`).
        tta_steps: TPT/C-TPT optimiser steps per image (TPT: 1).
        tta_lr: TPT/C-TPT AdamW learning rate (TPT: 5e-3).
        tta_views: augmented views per image besides the original (TPT, TDA: 63).
        tta_fraction: fraction of the views kept as confident (TPT, TDA: 0.1).
        tta_augmix: add torchvision's AugMix to each augmented view.
        ctpt_weight: C-TPT's λ (50).
        tda_shots_pos, tda_shots_neg, tda_alpha_pos, tda_beta_pos, tda_alpha_neg, tda_beta_neg:
            TDA's cache settings (:func:`robustft.tta.tda`; the authors' ImageNet values).
        save_every: samples between checkpoints (on each rank; 0: only after each set).

    Example:
        >>> config = TtaConfig(run=RunConfig(), method="ctpt")
        >>> config.tta_views, config.ctpt_weight, config.to_json()["tta_protocol"]
        (63, 50.0, 'episodic')
    """

    run: RunConfig
    method: str = "tpt"
    tta_protocol: str = "episodic"
    tta_steps: int = 1
    tta_lr: float = 5e-3
    tta_views: int = 63
    tta_fraction: float = 0.1
    tta_augmix: bool = False
    ctpt_weight: float = 50.0
    tda_shots_pos: int = 3
    tda_shots_neg: int = 2
    tda_alpha_pos: float = 2.0
    tda_beta_pos: float = 5.0
    tda_alpha_neg: float = 0.117
    tda_beta_neg: float = 1.0
    save_every: int = 500

    def to_json(self) -> dict[str, Any]:
        """The configuration as one flat JSON-able dict (``config.json``; flags' names)."""
        out: dict[str, Any] = {"method": self.method}
        out.update({k: getattr(self.run, k) for k in RUN_FIELDS})
        out.update({k: getattr(self, k) for k in _TTA_KEYS if k != "method"})
        return out


_TTA_KEYS = tuple(f.name for f in dataclasses.fields(TtaConfig) if f.name != "run")
_INTS = ("tta_steps", "tta_views", "tda_shots_pos", "tda_shots_neg", "save_every")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _int(name: str, value: Any) -> int:
    text = f"resolve_tta: {_flag(name)} must be an integer >= 0, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(text)
    if value < 0:
        raise ValueError(text)
    return value


def _number(name: str, value: Any, *, low: float, inclusive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"resolve_tta: {_flag(name)} must be a number, got {value!r}")
    ok = math.isfinite(value) and (value >= low if inclusive else value > low)
    if not ok:
        bound = f">= {low:g}" if inclusive else f"> {low:g}"
        raise ValueError(
            f"resolve_tta: {_flag(name)} must be a finite number {bound}, got {value!r}"
        )
    return float(value)


def resolve_tta(values: Mapping[str, Any]) -> TtaConfig:
    """Build a :class:`TtaConfig` from flat field values (flags, a file or ``config.json``).

    The model and data fields are checked by :func:`robustft.recipes.resolve`; ``train`` (the
    folder whose sub-folders are the classes) defaults to the first ``--eval``/``--shift`` set.
    The protocol defaults to ``online`` for ``tda`` and ``episodic`` otherwise.

    Args:
        values: field values by name (``None`` values are unset).

    Returns:
        The checked configuration.

    Raises:
        ValueError: an unknown key, method or protocol; ``tpt``/``ctpt``/``zero-shot`` online (they
            keep no state along a stream); a number out of range; views too few to keep one
            confident view; no ``--eval``/``--shift`` set.
        TypeError: a value of the wrong type.

    Example:
        >>> c = resolve_tta({"method": "tda", "eval": ["r=data/r"]})
        >>> c.tta_protocol, c.tda_shots_pos, c.run.train
        ('online', 3, 'data/r')
    """
    fn = "resolve_tta"
    given = {k: v for k, v in values.items() if v is not None}
    unknown = sorted(k for k in given if k not in RUN_FIELDS and k not in _TTA_KEYS)
    if unknown:
        raise ValueError(
            f"{fn}: unknown key(s) {unknown} for robustft tta; the keys are the names of the "
            "flags of robustft tta --help, with _ for -"
        )
    method = given.pop("method", "tpt")
    if method not in TTA_METHODS:
        raise ValueError(f"{fn}: --method must be one of {', '.join(TTA_METHODS)}, got {method!r}")
    protocol = given.pop("tta_protocol", "online" if method == "tda" else "episodic")
    if protocol not in PROTOCOLS:
        raise ValueError(f"{fn}: --tta-protocol must be episodic or online, got {protocol!r}")
    if protocol == "online" and method != "tda":
        raise ValueError(
            f"{fn}: --tta-protocol online carries a state along the stream, and {method} has none "
            f"to carry ({'its prompt is reset per image' if method != 'zero-shot' else 'no state'}"
            "); use --tta-protocol episodic, or --method tda"
        )
    tta: dict[str, Any] = {"method": method, "tta_protocol": protocol}
    for name in _TTA_KEYS:
        if name in ("method", "tta_protocol") or name not in given:
            continue
        v = given.pop(name)
        if name in _INTS:
            tta[name] = _int(name, v)
        elif name == "tta_augmix":
            if not isinstance(v, bool):
                raise TypeError(f"{fn}: --tta-augmix must be true or false, got {v!r}")
            tta[name] = v
        elif name == "tta_lr":
            tta[name] = _number(name, v, low=0.0, inclusive=False)
        elif name == "tta_fraction":
            tta[name] = _number(name, v, low=0.0, inclusive=False)
            if tta[name] > 1:
                raise ValueError(f"{fn}: --tta-fraction must be in (0, 1], got {v!r}")
        else:  # ctpt_weight and the tda_* numbers
            tta[name] = _number(name, v, low=0.0, inclusive=True)
    defaults = TtaConfig(run=RunConfig())
    views = tta.get("tta_views", defaults.tta_views)
    fraction = tta.get("tta_fraction", defaults.tta_fraction)
    if method in ("tpt", "ctpt") and views == 0:
        raise ValueError(f"{fn}: --tta-views must be >= 1 for {method} (it tunes on views), got 0")
    if method in ("tpt", "ctpt", "tda") and views and int((views + 1) * fraction) < 1:
        raise ValueError(
            f"{fn}: --tta-views {views} with --tta-fraction {fraction:g} keeps no confident view "
            f"(int(({views} + 1) * {fraction:g}) = 0); give more views or a larger fraction"
        )
    config = resolve(given, method="ft")  # the model and data fields, checked as everywhere
    if not config.eval and not config.shift:
        raise ValueError(
            f"{fn}: give at least one --eval or --shift set NAME=DIR to adapt on (--ood sets are "
            "scored against one of them)"
        )
    if not config.train:
        config = dataclasses.replace(
            config, train=next(iter({**config.eval, **config.shift}.values()))
        )
    return TtaConfig(run=config, **tta)


# ---------------------------------------------------------------------------------------------
# the command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``robustft tta`` that are not :class:`RunConfig` fields (see
    :data:`FLAG_FIELDS` for those); every default is ``None`` (a file or the run's wins)."""
    import argparse

    p.add_argument(
        "--train",
        metavar="DIR",
        help="the folder whose class sub-folders (with --classnames) define the classes; no image "
        "of it is used (default: the first --eval/--shift set)",
    )
    p.add_argument(
        "--prompt", help="tpt/ctpt: the words the tuned context starts from (default: a photo of a)"
    )
    p.add_argument(
        "--tta-protocol",
        choices=PROTOCOLS,
        help="episodic (reset per image; tpt, ctpt, tda) or online (tda's caches carried along "
        "the stream; one process only); default: online for tda, else episodic",
    )
    p.add_argument(
        "--tta-steps", type=int, metavar="INT", help="tpt/ctpt: AdamW steps per image (default 1)"
    )
    p.add_argument(
        "--tta-lr", type=float, metavar="FLOAT", help="tpt/ctpt: AdamW learning rate (default 5e-3)"
    )
    p.add_argument(
        "--tta-views",
        type=int,
        metavar="INT",
        help="augmented views per image besides the original (default 63)",
    )
    p.add_argument(
        "--tta-fraction",
        type=float,
        metavar="FLOAT",
        help="fraction of the views kept as confident (default 0.1)",
    )
    p.add_argument(
        "--tta-augmix",
        action=argparse.BooleanOptionalAction,
        help="add torchvision's AugMix to the crop-and-flip views (default: off, TPT's ImageNet "
        "views)",
    )
    p.add_argument(
        "--ctpt-weight",
        type=float,
        metavar="FLOAT",
        help="ctpt: λ of the text dispersion (default 50)",
    )
    for name, kind, default in (
        ("tda_shots_pos", int, 3),
        ("tda_shots_neg", int, 2),
        ("tda_alpha_pos", float, 2.0),
        ("tda_beta_pos", float, 5.0),
        ("tda_alpha_neg", float, 0.117),
        ("tda_beta_neg", float, 1.0),
    ):
        p.add_argument(
            _flag(name),
            type=kind,
            metavar=kind.__name__.upper(),
            help=f"tda: {name[4:]} (default {default})",
        )
    p.add_argument(
        "--save-every",
        type=int,
        metavar="INT",
        help="samples (per rank) between checkpoints that --resume continues from; 0: only "
        "after each set (default 500)",
    )


def config_from(args: argparse.Namespace) -> tuple[TtaConfig, bool]:
    """The configuration of ``robustft tta`` from its parsed flags (and ``--config``/``--resume``).

    Returns:
        ``(config, resume)``.

    Raises:
        ValueError: ``--override`` without ``--resume``; ``--resume`` of a folder that holds no
            tta run, or with flags that change what the run computes.
    """
    from robustft.recipes._cli import _relocate, _run_config

    values: dict[str, Any] = {}
    saved: dict[str, Any] = {}
    if args.resume:
        saved = _run_config("--resume", args.resume)
        command = run.read_record(Path(args.resume), option="--resume").get("command")
        if command != "tta":
            raise ValueError(
                f"--resume {args.resume!r} holds a robustft {command or 'finetune'} run, not a tta "
                f"run; continue it with robustft {command or 'finetune'} --resume"
            )
        saved.pop("ueo_scale", None)
        values.update(saved)
    elif args.override:
        raise ValueError("--override moves a recorded path; use it with --resume RUN")
    if args.config:
        values.update(load_config_file(args.config))
    for name in (*RUN_FIELDS, *_TTA_KEYS):
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    if args.resume:
        values["output"] = str(Path(args.resume).absolute())
        _relocate(values, args.override, args.resume)
        given, then = resolve_tta(values).to_json(), resolve_tta(saved).to_json()
        moved = {"train", "classnames", "model", "pretrained", "templates"}
        changed = [k for k in given if k not in RESUMABLE | moved and given[k] != then[k]]
        if changed:
            raise ValueError(
                f"--resume continues the run as it was configured; it may change only "
                f"{', '.join(_flag(k) for k in sorted(RESUMABLE - {'output'}))} (and moved paths "
                f"with --override), got new values for {', '.join(_flag(k) for k in changed)}"
            )
    return resolve_tta(values), bool(args.resume)
