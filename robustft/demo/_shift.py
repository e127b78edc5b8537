"""Experiment 1, domain shift (Lipsum-FT Table 1, CLIPood Table 1 in miniature).

Fine-tune on the clean known digits; report accuracy on the clean test set (ID) and on each of
the five shifted copies of it, their mean and worst, ECE and NLL on ID, and Lipsum-FT's energy
gap to the zero-shot model on *held-out* random texts. The trained rows run through
:func:`robustft.demo._grid.run_grid`; the post-hoc rows (WiSE-FT, TPGM, soups) are tree
arithmetic on the FT runs of the same seed, choosing what they choose on that seed's validation
split.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from robustft import clip, merging, metrics, projections
from robustft.demo._bench import (
    Bench,
    Tree,
    accuracy,
    features,
    moved,
    relative_change,
    visual,
    zero_shot_tree,
)
from robustft.demo._data import CLASSNAMES, KNOWN, PROMPT, SHIFTS, Splits, normalize, resplit
from robustft.demo._grid import Point, RunSpec, label, run_grid
from robustft.recipes import fit_linear_head

__all__ = ["REGULARISED", "SPECS", "WISE_ALPHAS", "run_shift", "shift_metrics"]


WISE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""WiSE-FT's sweep of FT; the other rows' curves use (0, 0.5, 1) (:data:`REGULARISED_ALPHAS`)."""
REGULARISED_ALPHAS = (0.0, 0.5, 1.0)
LP_STRENGTHS = (0.01, 0.1, 1.0, 10.0, 100.0)


def specs(
    steps: int, lipsum_weights: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
) -> dict[str, RunSpec]:
    """The trained runs of the experiment, their rows and the overrides of the paper defaults.

    The EMA decay is scaled to the run length so that it forgets the start as fast, relative to
    the run, as 0.999 over Lipsum-FT's 5,000 steps: ``decay ** steps == 0.999 ** 5000``.
    Lipsum-FT crosses its λ grid with the learning rates (its paper tunes λ) and reports its
    best checkpoint on validation, as its official code does; CLIPood's plain row ("MMS only")
    is a run without the average that reports its best checkpoint on validation (its paper
    selects on validation), its BMA row the Beta moving average of a run with it (the best
    checkpoint of *that* run would be of the average, not of MMS alone).
    Lipsum-FT's λ is not rescaled (``lipsum_rescale`` off): the model's scale is the paper's 100.
    """
    ema = 0.999 ** (5000 / steps)
    return {
        "ft": RunSpec("ft", {"FT": "last", "FT + EMA": "averaged"}, 1e-5,
                      {"average": "ema", "ema_decay": ema}),
        "lp-ft": RunSpec("lp-ft", {"LP-FT": "last"}),
        "l2sp": RunSpec("l2sp", {"L2-SP": "last"}),
        "kd": RunSpec("kd", {"KD": "last"}),
        "car-ft": RunSpec("car-ft", {"CAR-FT": "last"}),
        "feature-kd": RunSpec("feature-kd", {"FeatKD": "last"}),
        "flyp": RunSpec("flyp", {"FLYP": "last"}),
        "lipsum": RunSpec("lipsum", {"Lipsum-FT": "best"}, 1e-5, {"lipsum_rescale": False},
                          lipsum_weights, 1.0),
        "clipood-mms": RunSpec("clipood", {"CLIPood (MMS only)": "best"}, 1e-5,
                               {"average": "none"}),
        "clipood": RunSpec("clipood", {"CLIPood (MMS + BMA)": "averaged"}, 1e-5,
                           {"bma_beta": 0.5}),
    }  # fmt: skip


SPECS = specs(100)
"""The runs at the full budget (for the docs)."""

REGULARISED = (
    "L2-SP",
    "KD",
    "CAR-FT",
    "FeatKD",
    "Lipsum-FT",
    "CLIPood (MMS + BMA)",
    "LP-FT",
    "FLYP",
)
"""The trained rows whose WiSE-FT curves the figure draws beside FT's."""


def shift_metrics(bench: Bench, theta: Tree, f0: torch.Tensor) -> dict[str, float]:
    """Every column of the experiment for the classifier ``theta``.

    One forward over the clean test images and every shifted copy of them, stacked.

    Args:
        bench: the benchmark.
        theta: the classifier tree.
        f0: ``[n, dim]`` the zero-shot model's features of the clean test images (the energy
            gap's reference).
    """
    data = bench.data
    n = len(data.test_y)
    stacked = features(bench, theta, torch.cat([data.test_x, *bench.shifted.values()]))
    f = stacked[:n]
    z = bench.scale * f @ theta["head"].T
    out = {
        "id": float(metrics.accuracy(z, data.test_y)),
        "ece": float(metrics.ece(z, data.test_y)),
        "nll": float(metrics.nll(z, data.test_y)),
        "energy_gap": float(
            metrics.energy_gap(
                f, reference_features=f0, text_features=bench.heldout, logit_scale=bench.scale
            )
        ),
    }
    shifted_logits = (bench.scale * stacked[n:] @ theta["head"].T).split(n)
    per_shift = {
        name: float(metrics.accuracy(zs, data.test_y))
        for name, zs in zip(bench.shifted, shifted_logits, strict=True)
    }
    out["shifted"] = sum(per_shift.values()) / len(per_shift)
    out["worst"] = min(per_shift.values())
    return {**out, **per_shift}


def run_shift(
    bench: Bench,
    log: Callable[[str], None] = print,
    on_chosen: Callable[[dict[str, Point]], None] | None = None,
) -> dict[str, Any]:
    """Run experiment 1; returns rows (per-seed metrics), chosen points, WiSE curves, timings.

    ``on_chosen`` gets the chosen grid points (row -> (lr, weight)) once seed 0 has fixed them.
    """
    tic = time.perf_counter()
    names = CLASSNAMES[:KNOWN]
    with torch.no_grad():
        head = clip.zero_shot_head(bench.model, bench.tokenizer, names, bench.templates)
        single = clip.zero_shot_head(bench.model, bench.tokenizer, names, [PROMPT + " {}."])
    theta0 = zero_shot_tree(bench, head)
    splits: dict[int, Splits] = {}
    probes: dict[int, Any] = {}

    def split(seed: int) -> Splits:
        if seed not in splits:
            splits[seed] = resplit(bench.data, seed)
        return splits[seed]

    def linear_probe(seed: int) -> torch.Tensor:
        if seed not in probes:
            s = split(seed)
            f, fv = features(bench, theta0, s.train_x), features(bench, theta0, s.val_x)
            probes[seed] = fit_linear_head(
                f, s.train_y, fv, s.val_y, strengths=LP_STRENGTHS, scale=bench.scale,
                classes=KNOWN,
            )  # fmt: skip
        return probes[seed][0]

    def start(name: str, seed: int) -> torch.Tensor:
        """The head a run starts from: LP-FT's probe, CLIPood's single prompt, else the ensemble."""
        if name.startswith("clipood"):
            return single
        return linear_probe(seed) if name == "lp-ft" else head

    def inputs(name: str, seed: int) -> dict[str, Any]:
        s = split(seed)
        return {"images": s.train_x, "labels": s.train_y, "classnames": names,
                "head": start(name, seed)}  # fmt: skip

    def validate(theta: Tree, seed: int) -> float:
        s = split(seed)
        return accuracy(bench, theta, s.val_x, s.val_y)

    spec_map = specs(bench.preset.steps, bench.preset.lipsum_weights)
    grid = run_grid(
        bench, spec_map, inputs=inputs, validate=validate, full_grid=("ft",), log=log,
        on_chosen=on_chosen,
    )  # fmt: skip
    f0 = features(bench, theta0, bench.data.test_x)
    rows: dict[str, list[dict[str, float]]] = {}
    rows["zero-shot"] = [shift_metrics(bench, theta0, f0)] * bench.preset.seeds
    trees = dict(grid.trees)
    method_of = {row: name for name, spec in spec_map.items() for row in spec.rows}
    change: dict[str, list[float]] = {
        row: [
            relative_change(t, {**visual(theta0), "head": start(method_of[row], seed)})
            for seed, t in enumerate(row_trees)
        ]
        for row, row_trees in trees.items()
    }
    post = time.perf_counter()
    soup_sizes: list[dict[str, int]] = []
    for seed in range(bench.preset.seeds):
        ft = trees["FT"][seed]
        s = split(seed)
        trees.setdefault("WiSE-FT (α = 0.5)", []).append(merging.wise(ft, anchor=theta0, alpha=0.5))

        batches = _val_batches(s, seed)

        def val_loss(
            projected: Tree, s: Splits = s, batches: Iterator[torch.Tensor] = batches
        ) -> torch.Tensor:
            take = next(batches)  # one validation batch per step, as TPGM's code does
            f = _features_grad(bench, projected, s.val_x[take])
            return F.cross_entropy(bench.scale * f @ projected["head"].T, s.val_y[take])

        projected, _ = projections.tpgm(
            ft, val_loss, anchor=theta0, norm="l2", steps=bench.preset.tpgm_steps, lr=1e-2
        )  # 200 Adam steps at 1e-2 on validation batches of 64
        trees.setdefault("TPGM", []).append(projected)
        ingredients = [
            run["last"]
            for (name, _, run_seed), run in sorted(grid.runs.items(), key=lambda kv: kv[0][1][0])
            if name == "ft" and run_seed == seed and run["last"] is not None
        ]
        trees.setdefault("uniform soup", []).append(merging.uniform_soup(ingredients))

        def val_accuracy(theta: Tree, s: Splits = s) -> float:
            return validate_split(bench, theta, s)

        greedy, kept = merging.greedy_soup(ingredients, val_accuracy)
        trees.setdefault("greedy soup", []).append(greedy)
        soup_sizes.append({"ingredients": len(ingredients), "greedy_kept": len(kept)})
    post_seconds = time.perf_counter() - post
    for row in ("WiSE-FT (α = 0.5)", "TPGM", "uniform soup", "greedy soup"):
        change[row] = [relative_change(t, theta0) for t in trees[row]]
    for row, row_trees in trees.items():
        rows[row] = [shift_metrics(bench, t, f0) for t in row_trees]
    curves: dict[str, dict[str, list[dict[str, float]]]] = {}
    for row in ("FT", *REGULARISED):
        curves[row] = {}
        for alpha in WISE_ALPHAS if row == "FT" else REGULARISED_ALPHAS:
            if alpha in (0.0, 1.0):  # the zero-shot row and the row itself
                ends = rows["zero-shot" if alpha == 0.0 else row]
                per_seed = [{"id": m["id"], "shifted": m["shifted"]} for m in ends]
            else:
                per_seed = []
                for t in trees[row]:
                    m = shift_metrics(bench, merging.wise(t, anchor=theta0, alpha=alpha), f0)
                    per_seed.append({"id": m["id"], "shifted": m["shifted"]})
            curves[row][f"{alpha:g}"] = per_seed
    return {
        "rows": rows,
        "points": {row: label(p) for row, p in grid.points.items()},
        "lrs": {row: p[0] for row, p in grid.points.items()},
        "weights": {row: p[1] for row, p in grid.points.items() if p[1] is not None},
        "validation": grid.validation,
        "margins": grid.margins,
        "val_size": len(split(0).val_y),
        "change": change,
        "not_moved": moved(change),
        "wise_curves": curves,
        "soups": soup_sizes,
        "linear_probe_C": [probes[seed][1] for seed in sorted(probes)],
        "train_seconds": {**grid.seconds, "post-hoc (TPGM, soups)": post_seconds},
        "seconds": time.perf_counter() - tic,
        "shifts": list(SHIFTS),
    }


TPGM_BATCH = 64
"""Validation images per TPGM step (the official code steps on validation batches)."""


def _val_batches(s: Splits, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of :data:`TPGM_BATCH` validation indices, reshuffled every pass."""
    g = torch.Generator().manual_seed(20_011 + seed)
    while True:
        yield from torch.randperm(len(s.val_y), generator=g).split(TPGM_BATCH)


def _features_grad(bench: Bench, theta: Tree, images: torch.Tensor) -> torch.Tensor:
    """Image features with gradient (TPGM's radii learn through them)."""
    return clip.image_features(bench.model, visual(theta), normalize(images))


def validate_split(bench: Bench, theta: Tree, s: Splits) -> float:
    """Validation accuracy of ``theta`` on the split ``s``."""
    return accuracy(bench, theta, s.val_x, s.val_y)
