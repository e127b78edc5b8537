"""Experiment 2, open classes (CLIPood Table 3 in miniature): base -> new classes.

The known digits are cut into *base* classes (zero-three) and *new* ones (four-seven). Each
method fine-tunes on the base classes only (labelled clean images of the seed's split). Base
accuracy is measured on the base test images with the run's own head over the base classes; new
accuracy on the new test images with the fine-tuned visual tower and the zero-shot head of the
new class names (no trained head exists for them); H is their harmonic mean.

Every method reuses the grid point (learning rate, and Lipsum-FT's λ) experiment 1 chose for it
on ID validation (the same budget, fewer classes) and reports the same weights (Lipsum-FT its
best checkpoint on the base classes' validation images); CLIPood runs with β = 0.1, its paper's
setting for open classes, from its single-prompt head.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from robustft import clip, merging, metrics
from robustft.demo._bench import (
    Bench,
    Tree,
    accuracy,
    fit,
    moved,
    relative_change,
    visual,
    zero_shot_tree,
)
from robustft.demo._data import BASE, CLASSNAMES, KNOWN, PROMPT, resplit

__all__ = ["SPECS", "run_open"]

SPECS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    # row: (recipes method, weights reported, overrides, experiment 1's row whose lr it reuses)
    "FT": ("ft", "last", {}, "FT"),
    "L2-SP": ("l2sp", "last", {}, "L2-SP"),
    "KD": ("kd", "last", {}, "KD"),
    "CAR-FT": ("car-ft", "last", {}, "CAR-FT"),
    "FeatKD": ("feature-kd", "last", {}, "FeatKD"),
    "Lipsum-FT": ("lipsum", "best", {"lipsum_rescale": False}, "Lipsum-FT"),
    "CLIPood (MMS + BMA, β = 0.1)": (
        "clipood", "averaged", {"bma_beta": 0.1}, "CLIPood (MMS + BMA)"
    ),
}  # fmt: skip


def open_metrics(bench: Bench, theta: Tree, new_head: torch.Tensor) -> dict[str, float]:
    """Base, new and H of a classifier trained on the base classes."""
    d = bench.data
    base = d.test_y < BASE
    new = (d.test_y >= BASE) & (d.test_y < KNOWN)
    b = accuracy(bench, theta, d.test_x[base], d.test_y[base])
    n = accuracy(bench, {**theta, "head": new_head}, d.test_x[new], d.test_y[new] - BASE)
    return {"base": b, "new": n, "H": float(metrics.harmonic_mean(b, n))}


def run_open(
    bench: Bench,
    points: dict[str, tuple[float, float | None]],
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run experiment 2 with experiment 1's grid points ``points`` (row -> (lr, weight))."""
    tic = time.perf_counter()
    base_names, new_names = CLASSNAMES[:BASE], CLASSNAMES[BASE:KNOWN]
    with torch.no_grad():
        head = clip.zero_shot_head(bench.model, bench.tokenizer, base_names, bench.templates)
        single = clip.zero_shot_head(bench.model, bench.tokenizer, base_names, [PROMPT + " {}."])
        new_head = clip.zero_shot_head(bench.model, bench.tokenizer, new_names, bench.templates)
    theta0 = zero_shot_tree(bench, head)
    rows: dict[str, list[dict[str, float]]] = {
        "zero-shot": [open_metrics(bench, theta0, new_head)] * bench.preset.seeds
    }
    seconds: dict[str, float] = {}
    change: dict[str, list[float]] = {}
    wise: list[dict[str, float]] = []
    for row, (method, which, overrides, source) in SPECS.items():
        rows[row], change[row] = [], []
        lr, weight = points[source]
        start = single if method == "clipood" else head
        extra: dict[str, Any] = dict(overrides)
        if weight is not None:
            extra["reg_weight"] = weight
        if which == "best":
            extra.update(select="best", eval_every=bench.preset.eval_every)
        for seed in range(bench.preset.seeds):
            s = resplit(bench.data, seed)
            keep, val = s.train_y < BASE, s.val_y < BASE

            def check(theta: Any, s: Any = s, val: torch.Tensor = val) -> float:
                return accuracy(bench, theta, s.val_x[val], s.val_y[val])

            result = fit(
                bench, method, lr=lr, seed=seed, images=s.train_x[keep], labels=s.train_y[keep],
                classnames=base_names, head=start, validate=check if which == "best" else None,
                **extra,
            )  # fmt: skip
            theta = {"last": result.last, "averaged": result.averaged, "best": result.best}[which]
            assert theta is not None
            rows[row].append(open_metrics(bench, theta, new_head))
            change[row].append(relative_change(theta, {**visual(theta0), "head": start}))
            seconds[row] = seconds.get(row, 0.0) + result.seconds
            if row == "FT":
                mixed = merging.wise(theta, anchor=theta0, alpha=0.5)
                wise.append(open_metrics(bench, mixed, new_head))
        log(f"  {row:<30} {bench.preset.seeds} seeds: {seconds[row]:5.1f} s")
    rows["WiSE-FT (α = 0.5)"] = wise
    return {
        "rows": rows,
        "points": {row: points[spec[3]] for row, spec in SPECS.items()},
        "change": change,
        "not_moved": moved(change),
        "train_seconds": seconds,
        "seconds": time.perf_counter() - tic,
    }
