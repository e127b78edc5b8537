"""The benchmark's shared state, and its bridge to the one training loop of :mod:`robustft.recipes`.

Every trained row of the demo is a :func:`robustft.recipes.train` run: the method is built by
:func:`robustft.recipes.build` from the same pre-trained model (``build`` deep-copies it, so one
model serves every run), its configuration is :func:`robustft.recipes.resolve` of the paper's
defaults with the miniature's budget, and it is fed from an in-memory ``TensorDataset``. The
result's classifier trees (``{"visual.*": ..., "head": [classes, dim]}``) are evaluated here with
:func:`robustft.clip.image_features` (a ``functional_call`` of the pre-trained module with the
tree swapped in), so WiSE-FT, TPGM and soups are tree arithmetic on them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from robustft import clip, metrics, tree
from robustft.demo._data import CAPTIONS, SHIFTS, Splits, load_splits, normalize
from robustft.demo._model import build_model, build_tokenizer, pretrain
from robustft.recipes import Context, Runtime, TrainResult, build, resolve, train
from robustft.recipes._report import HELDOUT_TEXT_SEED

__all__ = [
    "FULL",
    "HELDOUT_SEED",
    "QUICK",
    "Bench",
    "Preset",
    "Tree",
    "accuracy",
    "features",
    "fit",
    "logits",
    "setup",
    "visual",
    "zero_shot_tree",
]

Tree = dict[str, Tensor]
HELDOUT_SEED = HELDOUT_TEXT_SEED
"""Seed of the held-out random-text bank of the energy-gap column: the command line's own
(:data:`robustft.recipes._report.HELDOUT_TEXT_SEED`), which no Lipsum-FT training step draws."""


class Preset(NamedTuple):
    """The budget of a run: the same for every method.

    Attributes:
        pretrain_steps: contrastive pre-training steps of the tiny CLIP.
        steps: optimiser steps of every supervised fine-tuning run.
        batch_size: global batch of every supervised run (UEO and its baselines use their
            paper's 64).
        seeds: seeds per trained row (splits and runs).
        lr_multipliers: the learning-rate grid, as multiples of each method's paper learning
            rate (the same multiples for every method).
        ueo_epochs: epochs of UEO, entropy minimisation and IM (the paper's 5).
        tpgm_steps: Adam steps on TPGM's radii (the paper's 200 post hoc).
        heldout_texts: random texts of the held-out energy-gap bank.
    """

    pretrain_steps: int
    steps: int
    batch_size: int
    seeds: int
    lr_multipliers: tuple[float, ...]
    ueo_epochs: float
    tpgm_steps: int
    heldout_texts: int


FULL = Preset(600, 100, 32, 3, (1.0, 3.0, 10.0, 30.0), 5.0, 200, 2000)
QUICK = Preset(150, 16, 32, 2, (10.0, 30.0), 1.0, 10, 200)


class Bench(NamedTuple):
    """Everything an experiment needs, built once by :func:`setup`.

    Attributes:
        model: the pre-trained open_clip model (eval mode; never modified after pre-training).
        tokenizer: its BPE tokenizer.
        data: the splits of seed 0 (images in ``[0, 1]``); :func:`robustft.demo._data.resplit`
            re-draws train / val per seed.
        shifted: the shifted test sets, name -> ``[n, 3, 16, 16]`` images (labels ``data.test_y``).
        scale: the pre-trained logit scale :math:`s`.
        templates: the prompt templates of every zero-shot head (and of CAR-FT's contexts and
            FLYP's captions).
        heldout: ``[texts, dim]`` features of the held-out random texts (energy gap).
        preset: the budget.
    """

    model: nn.Module
    tokenizer: Any
    data: Splits
    shifted: dict[str, Tensor]
    scale: float
    templates: list[str]
    heldout: Tensor
    preset: Preset


def setup(preset: Preset, log: Callable[[str], None] = print) -> Bench:
    """Load the digits, pre-train the tiny CLIP and encode the held-out random texts."""
    tic = time.perf_counter()
    data = load_splits(seed=0)
    tokenizer = build_tokenizer()
    model = build_model(seed=0)
    pretrain(model, tokenizer, data.pretrain_x, data.pretrain_y, steps=preset.pretrain_steps)
    g = torch.Generator().manual_seed(HELDOUT_SEED)
    bank = clip.RandomTextBank.from_model(
        model, preset.heldout_texts, tokenizer=tokenizer, generator=g
    )
    shifted = {name: shift(data.test_x) for name, shift in SHIFTS.items()}
    scale = float(clip.logit_scale(model).detach())
    log(f"  pre-training ({preset.pretrain_steps} steps): {time.perf_counter() - tic:.1f} s")
    return Bench(model, tokenizer, data, shifted, scale, list(CAPTIONS), bank.features, preset)


def visual(theta: Mapping[str, Tensor]) -> Tree:
    """The visual tower's part of a tree (every ``"visual.*"`` key)."""
    return tree.select(theta, "visual.*")


def zero_shot_tree(bench: Bench, head: Tensor) -> Tree:
    """The pre-trained visual tower with the head ``head`` ``[classes, dim]``."""
    params = {k: v.detach().clone() for k, v in bench.model.named_parameters()}
    return {**visual(params), "head": head.detach()}


def features(bench: Bench, theta: Mapping[str, Tensor], images: Tensor) -> Tensor:
    """``[n, dim]`` normalised image features of the tree's visual tower on ``[0, 1]`` images."""
    with torch.no_grad():
        return clip.image_features(bench.model, visual(theta), normalize(images))


def logits(bench: Bench, theta: Mapping[str, Tensor], images: Tensor) -> Tensor:
    """``[n, classes]`` logits :math:`s\\,\\hat f\\,W^\\top` of the classifier ``theta``."""
    return bench.scale * features(bench, theta, images) @ theta["head"].T


def accuracy(bench: Bench, theta: Mapping[str, Tensor], images: Tensor, labels: Tensor) -> float:
    """Accuracy of the classifier ``theta`` on ``(images, labels)``."""
    return float(metrics.accuracy(logits(bench, theta, images), labels))


def fit(
    bench: Bench,
    method: str,
    *,
    lr: float,
    seed: int,
    images: Tensor,
    labels: Tensor,
    classnames: Sequence[str],
    head: Tensor,
    confidence: Tensor | None = None,
    **overrides: Any,
) -> TrainResult:
    """One run of ``method`` through :func:`robustft.recipes.train`, on in-memory images.

    The configuration is the method's paper defaults (:data:`robustft.recipes.METHOD_DEFAULTS`)
    with the miniature's budget (``preset.steps`` and ``preset.batch_size`` for the supervised
    methods; the paper's batch 64 and ``preset.ueo_epochs`` epochs for UEO and its baselines),
    ``lr`` and ``seed``, then ``overrides``.
    """
    supervised = confidence is None
    budget: dict[str, Any] = (
        {"steps": bench.preset.steps, "batch_size": bench.preset.batch_size}
        if supervised
        else {"epochs": bench.preset.ueo_epochs, "batch_size": min(64, len(labels))}
    )
    config = resolve(
        {
            **budget,
            "lr": lr,
            "seed": seed,
            "workers": 0,
            "progress": False,
            "save_every": 0,
            "log_every": 10_000,
            **overrides,
        },
        method=method,
    )
    ctx = Context(
        bench.model, bench.tokenizer, list(classnames), bench.templates, head, bench.scale,
        config, confidence, None,
    )  # fmt: skip
    dataset = TensorDataset(normalize(images), labels)
    return train(build(ctx), dataset, config, Runtime(torch.device("cpu")), log=lambda _: None)
