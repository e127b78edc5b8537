"""The shared pieces of every method: the benchmark state, the classifier's forward, one loop.

A fine-tuned classifier is a parameter tree ``theta``: the visual tower's tensors (names as in
``model.named_parameters()``, ``"visual.*"``) plus a ``"head"`` ``[classes, dim]``, initialised
to the zero-shot head. The pre-trained module itself is never modified after pre-training: every
forward swaps a tree in with :func:`robustft.clip.image_features` (a
:func:`torch.func.functional_call`), so the module *is* the frozen zero-shot teacher
(:func:`robustft.clip.frozen_copy_features`) and WiSE-FT, TPGM and soups are plain tree
arithmetic on ``theta``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from robustft import averaging, clip, tree
from robustft.demo._data import Splits, normalize

__all__ = ["Bench", "Budget", "Tree", "features", "fit", "logits", "visual", "zero_shot_logits"]

Tree = dict[str, Tensor]
Loss = Callable[[Tree, Tensor, Tensor], Tensor]
"""``(params, images, targets) -> loss`` of one batch."""


class Budget(NamedTuple):
    """How long each method trains; the same for every method of a run."""

    steps: int = 150  # optimiser steps per fine-tuning run
    batch_size: int = 64
    lr: float = 3e-4  # AdamW, cosine decay, the same for every method
    tpgm_steps: int = 200  # Adam steps on the projection radii (TPGM's post hoc default)
    soup_size: int = 4  # fine-tuning runs in the soups (the FT run + soup_size - 1 others)
    bank_size: int = 1000  # random texts pre-encoded for Lipsum-FT and the energy-gap column


class Bench(NamedTuple):
    """Everything a method needs, built once by :func:`robustft.demo._main.setup`.

    Attributes:
        model: the pre-trained open_clip model (frozen: ``requires_grad=False``, eval mode).
        tokenizer: its BPE tokenizer.
        data: the splits (images in ``[0, 1]``).
        shifted: the shifted test sets, name -> ``[n, 3, 16, 16]`` images (labels: ``data.test_y``).
        theta0: the zero-shot classifier tree: the pre-trained visual tensors + the zero-shot head.
        scale: the pre-trained logit scale :math:`s` (:func:`robustft.clip.logit_scale`).
        bank: Lipsum-FT's pre-encoded random texts (also the energy-gap column's).
        budget: the training budget.
    """

    model: nn.Module
    tokenizer: Any
    data: Splits
    shifted: dict[str, Tensor]
    theta0: Tree
    scale: float
    bank: clip.RandomTextBank
    budget: Budget


def visual(theta: Mapping[str, Tensor]) -> Tree:
    """The visual tower's part of a tree (every ``"visual.*"`` key)."""
    return tree.select(theta, "visual.*")


def features(bench: Bench, theta: Mapping[str, Tensor], images: Tensor) -> Tensor:
    """``[batch, dim]`` normalised image features of the tree's visual tower.

    A :func:`torch.func.functional_call` of ``model.encode_image`` with the tree's visual tensors
    swapped in (the module's own fill in whatever the tree leaves out, e.g. for UEO).
    """
    return clip.image_features(bench.model, visual(theta), normalize(images))


def logits(bench: Bench, theta: Mapping[str, Tensor], images: Tensor) -> Tensor:
    """``[batch, classes]`` logits :math:`s\\,\\hat f\\,W^\\top` of the classifier ``theta``."""
    return bench.scale * features(bench, theta, images) @ theta["head"].T


def zero_shot_logits(bench: Bench, images: Tensor) -> tuple[Tensor, Tensor]:
    """The frozen teacher: ``(features, logits)`` of the zero-shot model, without gradient."""
    f0 = clip.frozen_copy_features(bench.model, normalize(images))
    return f0, bench.scale * f0 @ bench.theta0["head"].T


def fit(
    bench: Bench,
    params: Mapping[str, Tensor],
    loss_fn: Loss,
    data: tuple[Tensor, Tensor],
    *,
    seed: int = 0,
    lr: float | None = None,
    averagers: Mapping[str, averaging.Averager] | None = None,
) -> tuple[Tree, dict[str, Tree]]:
    """The training loop every method shares: AdamW + cosine decay on a tree of leaf tensors.

    Args:
        bench: the benchmark (budget: steps, batch size, learning rate).
        params: the initial trainable tree (copied; the copies are the leaves AdamW updates).
        loss_fn: ``(params, images, targets) -> loss`` of one batch.
        data: ``(images, targets)`` to draw batches from, uniformly with replacement.
        seed: seed of the batch order (and nothing else: the start point is ``params``).
        lr: learning rate (default ``bench.budget.lr``).
        averagers: weight averages to track along the run (``update_`` after every step).

    Returns:
        ``(params, averages)``: the final tree and the final average of every averager.
    """
    budget = bench.budget
    params = {k: v.requires_grad_(True) for k, v in tree.clone(params, detach=True).items()}
    opt = torch.optim.AdamW(params.values(), lr=lr or budget.lr, weight_decay=0.0)
    steps = budget.steps
    cosine = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / steps))
    )
    averagers = averagers or {}
    states = {name: avg.init(params) for name, avg in averagers.items()}
    g = torch.Generator().manual_seed(seed)
    images, targets = data
    for _ in range(steps):
        batch = torch.randint(0, len(targets), (budget.batch_size,), generator=g)
        loss = loss_fn(params, images[batch], targets[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cosine.step()
        for name, avg in averagers.items():
            states[name] = avg.update_(states[name], params)
    averages = {name: dict(state.average) for name, state in states.items()}
    return tree.clone(params, detach=True), averages
