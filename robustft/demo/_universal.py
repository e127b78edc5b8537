"""Experiment 3, universal unsupervised fine-tuning (UEO Tables 1-2 in miniature).

The target domain is :data:`robustft.demo._data.TARGET`. The unlabelled
training pool mixes the seed's training images of the known digits and unknown objects (the
digits eight and nine), all in that domain; labels are never used for
training. Rows: zero-shot with UEO's single prompt (its starting point), entropy minimisation
(γ = 0, uniform weights), information maximisation (γ = 1, uniform weights), UEO (confidence
weights, γ = 1) and UEO with *oracle* weights (known 1 + 10⁻³, unknown 10⁻³: the official
code's ``--oracle``, the upper bound of what better weights can give) -- all training UEO's
parameters (a CoOp context + the visual norm affines) with UEO's optimiser: SGD without
momentum, cosine per iteration, batch 64, on 100·cos logits (the official code's, the recipes'
``ueo_scale``), for ``preset.ueo_steps`` steps (the paper's 5 epochs of this small pool would be
a few dozen steps: too few to move).

Test: the target-domain known-class test images and the unknown test objects. Known-class
accuracy and per-class accuracy; AUROC and FPR95 of MSP at scale 1 (UEO's score, MCM), known
positive; HOS at the threshold accepting 95 % of the (labelled, target-domain) validation knowns.

Learning rate: the paper's 1e-4 times the same multipliers as every other method, chosen on the
labelled validation split of the target domain (ties toward 1e-4) -- an oracle an unsupervised
user would not have, given to every unsupervised row alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from robustft import clip, losses, metrics, scores
from robustft.demo._bench import (
    Bench,
    Tree,
    accuracy,
    features,
    logits,
    moved,
    relative_change,
    zero_shot_tree,
)
from robustft.demo._data import CLASSNAMES, KNOWN, PROMPT, TARGET, Splits, resplit
from robustft.demo._grid import RunSpec, label, run_grid
from robustft.recipes import threshold_at_tpr

__all__ = ["ORACLE", "SPECS", "oracle_weights", "run_universal"]

SPECS = {
    "entropy": RunSpec("entropy", {"entropy min.": "last"}, 1e-4),
    "im": RunSpec("im", {"IM": "last"}, 1e-4),
    "ueo": RunSpec("ueo", {"UEO": "last"}, 1e-4),
    "ueo-oracle": RunSpec("ueo", {"UEO (oracle weights)": "last"}, 1e-4),
}
ORACLE = 1e-3
"""The oracle weights' offset: known 1 + 10⁻³, unknown 10⁻³ (tim-learn/UEO ``demo.py``)."""


def oracle_weights(labels: torch.Tensor) -> torch.Tensor:
    """UEO's ``--oracle`` weights from the pool's labels (-1 unknown): ``1[known] + 10⁻³``."""
    return (labels >= 0).to(torch.float32) + ORACLE


def universal_metrics(
    bench: Bench, theta: Tree, s: Splits, test: tuple[torch.Tensor, torch.Tensor]
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Metrics of ``theta`` on the target domain; also the known and unknown test scores."""
    known_x, unknown_x = test
    z_known = logits(bench, theta, known_x)
    z_unknown = logits(bench, theta, unknown_x)
    score_known = scores.msp(z_known / bench.scale)
    score_unknown = scores.msp(z_unknown / bench.scale)
    val = scores.msp(logits(bench, theta, s.target_val_x) / bench.scale)
    tau = threshold_at_tpr(val, 0.95)
    all_scores = torch.cat([score_known, score_unknown])
    is_known = torch.cat(
        [
            torch.ones(len(score_known), dtype=torch.bool),
            torch.zeros(len(score_unknown), dtype=torch.bool),
        ]
    )
    labels = torch.cat([bench.data.test_y, torch.full((len(unknown_x),), -1)])
    open_set = metrics.open_set(torch.cat([z_known, z_unknown]), labels, all_scores, threshold=tau)
    out = {
        "known": float(metrics.accuracy(z_known, bench.data.test_y)),
        "pacc": float(metrics.per_class_accuracy(z_known, bench.data.test_y)),
        "auroc": float(metrics.auroc(all_scores, is_known)),
        "fpr95": float(metrics.fpr_at_tpr(all_scores, is_known)),
        "hos": float(open_set.hos),
    }
    return out, score_known, score_unknown


def run_universal(bench: Bench, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run experiment 3; returns rows, chosen rates and seed 0's test scores (for the histograms)."""
    tic = time.perf_counter()
    names = CLASSNAMES[:KNOWN]
    with torch.no_grad():
        context = clip.init_context(bench.model, bench.tokenizer, PROMPT)
        text0 = clip.encode_text_with_context(bench.model, context, names, bench.tokenizer)
    theta0 = zero_shot_tree(bench, text0)
    test = (bench.data.target_test_x, bench.data.unknown_test_x)
    unknown_pool = bench.data.unknown_train_x
    splits = {seed: resplit(bench.data, seed) for seed in range(bench.preset.seeds)}
    pools: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def inputs(name: str, seed: int) -> dict[str, Any]:
        if seed not in pools:
            s = splits[seed]
            images = torch.cat([s.target_train_x, unknown_pool])
            labels = torch.cat([s.train_y, torch.full((len(unknown_pool),), -1)])
            f0 = features(bench, theta0, images)
            pools[seed] = (images, labels, losses.ueo_confidence(f0 @ text0.T))  # cosines, scale 1
        images, labels, confidence = pools[seed]
        if name == "ueo-oracle":
            confidence = oracle_weights(labels)
        return {"images": images, "labels": labels, "classnames": names,
                "head": text0, "confidence": confidence}  # fmt: skip

    def validate(theta: Tree, seed: int) -> float:
        s = splits[seed]
        return accuracy(bench, theta, s.target_val_x, s.val_y)

    grid = run_grid(bench, SPECS, inputs=inputs, validate=validate, log=log)
    rows: dict[str, list[dict[str, float]]] = {}
    histograms: dict[str, dict[str, list[float]]] = {}
    trees = {"zero-shot (UEO's prompt)": [theta0] * bench.preset.seeds, **grid.trees}
    change = {row: [relative_change(t, theta0) for t in grid.trees[row]] for row in grid.trees}
    for row, per_seed in trees.items():
        rows[row] = []
        for seed, theta in enumerate(per_seed):
            m, known, unknown = universal_metrics(bench, theta, splits[seed], test)
            rows[row].append(m)
            if seed == 0:
                histograms[row] = {"known": known.tolist(), "unknown": unknown.tolist()}
    pool = pools[0]
    known_pool = pool[1] >= 0
    return {
        "rows": rows,
        "points": {row: label(p) for row, p in grid.points.items()},
        "lrs": {row: p[0] for row, p in grid.points.items()},
        "validation": grid.validation,
        "margins": grid.margins,
        "val_size": len(splits[0].val_y),
        "change": change,
        "not_moved": moved(change),
        "scores_seed0": histograms,
        "confidence_auroc": float(metrics.auroc(pool[2], known_pool)),
        "pool": {"known": int(known_pool.sum()), "unknown": int((~known_pool).sum())},
        "domain": TARGET,
        "steps": bench.preset.ueo_steps,
        "train_seconds": grid.seconds,
        "seconds": time.perf_counter() - tic,
    }
