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

import atexit
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from robustft import clip, metrics, tree
from robustft.demo import _world as world
from robustft.demo._cache import pretrained
from robustft.demo._data import TEMPLATES, Splits, load_splits, normalize
from robustft.demo._model import build_tokenizer
from robustft.recipes import Context, Runtime, TrainResult, build, resolve, train
from robustft.recipes._report import HELDOUT_TEXT_SEED

__all__ = [
    "FULL",
    "HELDOUT_SEED",
    "MOVED",
    "QUICK",
    "Bench",
    "Preset",
    "Tree",
    "accuracy",
    "features",
    "fit",
    "logits",
    "moved",
    "participation_ratio",
    "relative_change",
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
        ueo_steps: optimiser steps of UEO, entropy minimisation and IM (batch 64, the paper's;
            the paper's 5 epochs of the toy pool would be too few steps to move).
        tpgm_steps: Adam steps on TPGM's radii (the paper's 200 post hoc).
        heldout_texts: random texts of the held-out energy-gap bank.
        lipsum_weights: Lipsum-FT's λ grid (crossed with the learning-rate grid).
        eval_every: steps between validation checks of the runs that keep their best
            checkpoint on validation (Lipsum-FT, CLIPood's plain row).
    """

    pretrain_steps: int
    steps: int
    batch_size: int
    seeds: int
    lr_multipliers: tuple[float, ...]
    ueo_steps: int
    tpgm_steps: int
    heldout_texts: int
    lipsum_weights: tuple[float, ...]
    eval_every: int


FULL = Preset(1000, 100, 32, 5, (1.0, 3.0, 10.0, 30.0), 200, 200, 2000, (0.1, 0.3, 1.0, 3.0), 20)
QUICK = Preset(120, 12, 32, 2, (10.0, 30.0), 8, 10, 200, (1.0, 3.0), 6)


class Bench(NamedTuple):
    """Everything an experiment needs, built once by :func:`setup`.

    Attributes:
        model: the pre-trained open_clip model (eval mode; never modified after pre-training).
        tokenizer: its BPE tokenizer.
        data: the splits of seed 0 (images in ``[0, 1]``); :func:`robustft.demo._data.resplit`
            re-draws train / val per seed.
        shifted: the shifted test sets, name -> ``[n, 3, 32, 32]`` images (labels ``data.test_y``).
        scale: the pre-trained logit scale :math:`s` (100).
        templates: the prompt templates of every zero-shot head (and of CAR-FT's contexts and
            FLYP's captions).
        heldout: ``[texts, dim]`` features of the held-out random texts (energy gap), drawn from
            the pre-training vocabulary as Lipsum-FT's training texts are.
        preset: the budget.
        vocabulary_file: the text file of the grammar's words (Lipsum-FT's
            ``lipsum_vocabulary``).
        regime: what makes the toy CLIP-like, measured on this run (:func:`setup`).
    """

    model: nn.Module
    tokenizer: Any
    data: Splits
    shifted: dict[str, Tensor]
    scale: float
    templates: list[str]
    heldout: Tensor
    preset: Preset
    vocabulary_file: str
    regime: dict[str, Any]


def participation_ratio(features: Tensor) -> float:
    """The participation ratio :math:`(\\sum_i \\lambda_i)^2 / \\sum_i \\lambda_i^2` of the
    covariance eigenvalues of ``features`` ``[n, dim]``: how many directions carry their spread
    (``dim`` for an isotropic cloud, 1 for a line). Gao et al., "A theory of multineuronal
    dimensionality, dynamics and measurement", 2017."""
    centred = features.double() - features.double().mean(0)
    eig = torch.linalg.eigvalsh(centred.T @ centred).clamp(min=0)
    return float(eig.sum() ** 2 / (eig**2).sum())


def relative_change(theta: Mapping[str, Tensor], start: Mapping[str, Tensor]) -> float:
    """:math:`\\lVert \\theta - \\theta_0 \\rVert / \\lVert \\theta_0 \\rVert` over the tensors that
    changed at all (the trained ones; 0 if none did): how far a run moved from its start."""
    changed = [k for k in theta if k in start and not torch.equal(theta[k], start[k])]
    if not changed:
        return 0.0
    delta = sum(float((theta[k] - start[k]).double().pow(2).sum()) for k in changed)
    base = sum(float(start[k].double().pow(2).sum()) for k in changed)
    return (delta / base) ** 0.5 if base > 0 else float("inf")


MOVED = 0.01
"""A row whose trained weights moved less than this (relative) from its start "did not move"."""


def moved(changes: Mapping[str, Sequence[float]]) -> list[str]:
    """The rows whose mean :func:`relative_change` over seeds is below :data:`MOVED`."""
    return [row for row, per_seed in changes.items() if sum(per_seed) / len(per_seed) < MOVED]


def _vocabulary_file() -> str:
    """The grammar's words, one text per line, in a temporary file removed at exit."""
    folder = tempfile.mkdtemp(prefix="robustft-demo-")
    atexit.register(shutil.rmtree, folder, True)
    path = Path(folder) / "vocabulary.txt"
    path.write_text("".join(f"{t}\n" for t in world.vocabulary_texts()), encoding="utf-8")
    return str(path)


def setup(
    preset: Preset, log: Callable[[str], None] = print, *, learned_scale: bool = False
) -> Bench:
    """Draw the splits, pre-train the tiny CLIP, measure its regime, encode held-out texts.

    The regime (written to ``results.json``): the logit scale; the share of the random texts
    Lipsum-FT draws (from the grammar's vocabulary, :func:`robustft.clip.token_vocabulary`)
    whose tokens all occurred in pre-training captions, and the same share for texts drawn from
    the whole 49,408-token vocabulary as the official code draws them; the participation ratio
    of the random texts' features (of ``dim``).
    """
    tic = time.perf_counter()
    data = load_splits(seed=0)
    tokenizer = build_tokenizer()
    model, stats = pretrained(
        data, steps=preset.pretrain_steps, learned_scale=learned_scale, log=log
    )
    stats = dict(stats)
    vocabulary_file = _vocabulary_file()
    vocabulary = clip.token_vocabulary(world.vocabulary_texts(), tokenizer)
    g = torch.Generator().manual_seed(HELDOUT_SEED)
    bank = clip.RandomTextBank.from_model(
        model, preset.heldout_texts, tokenizer=tokenizer, generator=g, vocabulary=vocabulary
    )
    seen = torch.tensor(sorted(stats.pop("seen_tokens")))
    full = clip.random_text_tokens(
        preset.heldout_texts, context_length=bank.tokens.shape[1], tokenizer=tokenizer,
        generator=torch.Generator().manual_seed(HELDOUT_SEED),
    )  # fmt: skip

    def covered(tokens: Tensor) -> float:
        body = tokens[:, 1 : 1 + 8]
        return float(torch.isin(body, seen).all(1).double().mean())

    scale = float(clip.logit_scale(model).detach())
    regime = {
        **stats,
        "seen_tokens": len(seen),
        "vocabulary": len(vocabulary),
        "random_texts_seen": covered(bank.tokens),
        "random_texts_seen_full_vocabulary": covered(full),
        "participation_ratio": participation_ratio(bank.features),
        "dim": int(bank.features.shape[1]),
    }
    log(
        f"  pre-training ({preset.pretrain_steps} steps): {time.perf_counter() - tic:.1f} s; "
        f"s = {scale:.1f}, random texts seen {100 * regime['random_texts_seen']:.1f} %, "
        f"participation ratio {regime['participation_ratio']:.1f} of {regime['dim']}"
    )
    return Bench(
        model, tokenizer, data, dict(data.shifted), scale, list(TEMPLATES), bank.features, preset,
        vocabulary_file, regime,
    )  # fmt: skip


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
    validate: Callable[[Mapping[str, Tensor]], float] | None = None,
    **overrides: Any,
) -> TrainResult:
    """One run of ``method`` through :func:`robustft.recipes.train`, on in-memory images.

    The configuration is the method's paper defaults (:data:`robustft.recipes.METHOD_DEFAULTS`)
    with the miniature's budget (``preset.steps`` and ``preset.batch_size`` for the supervised
    methods; the paper's batch 64 and ``preset.ueo_steps`` steps for UEO and its baselines),
    ``lr`` and ``seed``, Lipsum-FT's random texts from the pre-training vocabulary, then
    ``overrides``. ``validate`` (tree -> validation accuracy) is what ``select="best"`` and
    ``eval_every`` use.
    """
    supervised = confidence is None
    budget: dict[str, Any] = (
        {"steps": bench.preset.steps, "batch_size": bench.preset.batch_size}
        if supervised
        else {"steps": bench.preset.ueo_steps, "batch_size": min(64, len(labels))}
    )
    if method == "lipsum":
        budget["lipsum_vocabulary"] = bench.vocabulary_file
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
    return train(
        build(ctx), dataset, config, Runtime(torch.device("cpu")), validate=validate,
        log=lambda _: None,
    )  # fmt: skip
