"""Recipes: every method end to end on open_clip models and image folders, from one command.

``robustft finetune|ueo|posthoc|evaluate`` (or ``python -m robustft``) runs the jobs below; under
``torchrun`` the same command runs with DDP or FSDP2. The building blocks are public for users
who want the loop without the command line: :func:`train` is the one training loop (the demo runs
it too), :func:`build` turns a configuration into a method (trained module + loss), and
:class:`RunConfig` holds every setting with the papers' defaults per method.

This package sits above :mod:`robustft.clip`: it imports open_clip, torchvision and safetensors.
"""

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
from robustft.recipes._jobs import evaluate_run, finetune, posthoc
from robustft.recipes._loop import Plan, TrainResult, lr_factor, plan, train
from robustft.recipes._methods import Context, Method, build, fit_linear_head
from robustft.recipes._model import ClipBundle, load_model
from robustft.recipes._runtime import Runtime

__all__ = [
    "AVERAGES",
    "METHODS",
    "METHOD_DEFAULTS",
    "SCORES",
    "ClipBundle",
    "Context",
    "Evaluator",
    "FolderDataset",
    "Method",
    "Plan",
    "RunConfig",
    "Runtime",
    "TrainResult",
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
    "threshold_at_tpr",
    "train",
]
