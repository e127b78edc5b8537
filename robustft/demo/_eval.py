"""Evaluate a classifier tree the way the papers do, and format the tables.

Per classifier: accuracy on the clean known-class test set (ID), accuracy on each shifted copy of
it, ECE, and open-set detection of the unknown digits with the MSP score -- AUROC, FPR at 95 %
TPR and HOS at the threshold that accepts 95 % of the known validation images -- all from
:mod:`robustft.metrics` / :mod:`robustft.scores`. The last column is Lipsum-FT's energy gap to
the zero-shot model (:func:`robustft.metrics.energy_gap`): how far the image features moved,
as seen through random texts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from robustft import clip, metrics, scores
from robustft.demo._data import normalize
from robustft.demo._finetune import Bench, Tree, features, logits

__all__ = ["COLUMNS", "Result", "evaluate", "format_shift_table", "format_sweep", "format_table"]


class Result(NamedTuple):
    """The metrics of one classifier (fractions in [0, 1], except the energy gap)."""

    id_acc: float
    shift_acc: float  # mean over the shifted test sets
    worst_shift: float
    ece: float
    auroc: float
    fpr95: float
    hos: float
    energy_gap: float
    per_shift: dict[str, float]


COLUMNS = (
    "ID acc",
    "shifted acc",
    "worst shift",
    "ECE ↓",
    "AUROC",
    "FPR95 ↓",
    "HOS",
    "energy gap ↓",
)


@torch.no_grad()
def evaluate(bench: Bench, theta: Tree) -> Result:
    """Every metric of the classifier ``theta`` on the demo's test sets."""
    data = bench.data
    val_msp = scores.msp(logits(bench, theta, data.val_x))
    threshold = float(torch.quantile(val_msp, 0.05))  # accepts 95 % of the known val images
    f = features(bench, theta, data.test_x)
    evaluation = metrics.Evaluation(score="msp", threshold=threshold)
    evaluation.update(bench.scale * f @ theta["head"].T, data.test_y)
    unknown = data.unknown_test_x
    evaluation.update(logits(bench, theta, unknown), torch.full((len(unknown),), -1))
    r = evaluation.compute()
    assert r.accuracy is not None and r.ece is not None and r.auroc is not None
    assert r.fpr_at_tpr is not None and r.hos is not None
    per_shift = {
        name: float(metrics.accuracy(logits(bench, theta, x), data.test_y))
        for name, x in bench.shifted.items()
    }
    f0 = clip.frozen_copy_features(bench.model, normalize(data.test_x))
    gap = metrics.energy_gap(
        f, reference_features=f0, text_features=bench.bank.features, logit_scale=bench.scale
    )
    return Result(
        id_acc=float(r.accuracy),
        shift_acc=sum(per_shift.values()) / len(per_shift),
        worst_shift=min(per_shift.values()),
        ece=float(r.ece),
        auroc=float(r.auroc),
        fpr95=float(r.fpr_at_tpr),
        hos=float(r.hos),
        energy_gap=float(gap),
        per_shift=per_shift,
    )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def format_table(results: Mapping[str, Result], seconds: Mapping[str, float] | None = None) -> str:
    """The main markdown table: one row per method, percentages, optional training seconds."""
    head = ["method", *COLUMNS] + (["time (s)"] if seconds is not None else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [r.id_acc, r.shift_acc, r.worst_shift, r.ece, r.auroc, r.fpr95, r.hos]
        row = [name, *map(_pct, cells), f"{r.energy_gap:.2f}"]
        if seconds is not None:
            row.append(f"{seconds.get(name, 0.0):.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_shift_table(results: Mapping[str, Result], shifts: Sequence[str]) -> str:
    """Accuracy (%) on each shifted test set, one row per method."""
    head = ["method", "clean", *shifts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        row = [name, _pct(r.id_acc), *(_pct(r.per_shift[s]) for s in shifts)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_sweep(sweep: Mapping[float, Result]) -> str:
    """The WiSE-FT sweep: accuracy and AUROC (%) for each mixing coefficient α."""
    lines = ["| α | ID acc | shifted acc | AUROC |", "|---|---|---|---|"]
    for alpha, r in sweep.items():
        cells = " | ".join(_pct(v) for v in (r.id_acc, r.shift_acc, r.auroc))
        lines.append(f"| {alpha:g} | {cells} |")
    return "\n".join(lines)
