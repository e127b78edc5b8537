"""Recipes: every method end to end on open_clip models and image folders, from one command.

``robustft finetune|ueo|posthoc|evaluate|tta`` (or ``python -m robustft``) runs the jobs below; under
``torchrun`` the same command runs with DDP or FSDP2. The building blocks are public for users
who want the loop without the command line: :func:`train` is the one training loop (the demo runs
it too), :func:`build` turns a configuration into a method (trained module + loss), and
:class:`RunConfig` holds every setting with the papers' defaults per method.

This package sits above :mod:`robustft.clip`: it imports open_clip, torchvision and safetensors,
lazily, on first use of a name (so ``robustft --help`` answers at once).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from robustft.recipes._config import (
        AVERAGES,
        METHOD_DEFAULTS,
        METHODS,
        SCORES,
        RunConfig,
        load_config_file,
        resolve,
    )
    from robustft.recipes._data import FolderDataset, class_names, holdout
    from robustft.recipes._evaluate import Evaluator, threshold_at_tpr
    from robustft.recipes._images import BadImageError
    from robustft.recipes._jobs import evaluate_run, finetune, posthoc
    from robustft.recipes._loop import Plan, TrainResult, lr_factor, plan, train
    from robustft.recipes._methods import Context, Method, build, fit_linear_head
    from robustft.recipes._model import ClipBundle, SavedModel, load_model, save_model
    from robustft.recipes._runfolder import RunError
    from robustft.recipes._runtime import Runtime
    from robustft.recipes._stopping import Interrupted, NonFiniteLoss
    from robustft.recipes._tta import TtaConfig, resolve_tta, run_tta

_HOMES = {
    "_config": ("AVERAGES", "METHODS", "METHOD_DEFAULTS", "SCORES", "RunConfig",
                "load_config_file", "resolve"),
    "_data": ("FolderDataset", "class_names", "holdout"),
    "_evaluate": ("Evaluator", "threshold_at_tpr"),
    "_images": ("BadImageError",),
    "_jobs": ("evaluate_run", "finetune", "posthoc"),
    "_loop": ("Plan", "TrainResult", "lr_factor", "plan", "train"),
    "_runfolder": ("RunError",),
    "_methods": ("Context", "Method", "build", "fit_linear_head"),
    "_model": ("ClipBundle", "SavedModel", "load_model", "save_model"),
    "_runtime": ("Runtime",),
    "_stopping": ("Interrupted", "NonFiniteLoss"),
    "_tta": ("TtaConfig", "resolve_tta", "run_tta"),
}  # fmt: skip
_HOME = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "AVERAGES",
    "METHODS",
    "METHOD_DEFAULTS",
    "SCORES",
    "BadImageError",
    "ClipBundle",
    "Context",
    "Evaluator",
    "FolderDataset",
    "Interrupted",
    "Method",
    "NonFiniteLoss",
    "Plan",
    "RunConfig",
    "RunError",
    "Runtime",
    "SavedModel",
    "TrainResult",
    "TtaConfig",
    "build",
    "class_names",
    "evaluate_run",
    "finetune",
    "fit_linear_head",
    "holdout",
    "load_config_file",
    "load_model",
    "lr_factor",
    "plan",
    "posthoc",
    "resolve",
    "resolve_tta",
    "run_tta",
    "save_model",
    "threshold_at_tpr",
    "train",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'robustft.recipes' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"robustft.recipes.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
