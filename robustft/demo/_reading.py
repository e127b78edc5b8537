"""The honest reading: each paper's claims, checked against this run's own numbers.

A claim compares two rows of one experiment on one metric in a stated direction ("Lipsum-FT keeps
more shifted accuracy than FT"). Its evidence is the *paired* difference per seed (both rows on
the same seed's split, the same test images), oriented so that a positive difference supports
the claim. With the mean :math:`\\bar d` and the standard deviation :math:`s_d` of those
differences over the seeds, the verdict is

- ``reproduced``: :math:`\\bar d > s_d` (the claimed direction, beyond the seed spread);
- ``same direction, within seed spread``: :math:`0 < \\bar d \\le s_d`;
- ``no difference``: :math:`|\\bar d| <` :data:`RESOLUTION` (0.1 points: a third of one test
  image of the 347; smaller differences are rounding, whatever the spread);
- ``opposite, within seed spread``: :math:`-s_d \\le \\bar d < 0`;
- ``not reproduced``: :math:`\\bar d < -s_d` (the opposite direction, beyond the seed spread).

The list of claims is fixed in the code before any run; every verdict is computed from the run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

__all__ = ["CLAIMS", "RESOLUTION", "VERDICTS", "Claim", "judge", "summarise", "verdict"]

VERDICTS = (
    "reproduced",
    "same direction, within seed spread",
    "no difference",
    "opposite, within seed spread",
    "not reproduced",
)

RESOLUTION = 1e-3
"""Mean differences below this (0.1 points of a rate, 0.001 of NLL or energy gap) are ties."""

Rows = Mapping[str, Sequence[Mapping[str, float]]]


class Claim(NamedTuple):
    """``a`` beats ``b`` on ``metric`` of ``experiment`` (lower is better if not ``higher``)."""

    paper: str
    text: str
    experiment: str
    metric: str
    a: str
    b: str
    higher: bool = True


_S, _O, _U = "shift", "open", "universal"
CLAIMS = (
    Claim("Lipsum-FT, WiSE-FT", "FT raises ID accuracy over zero-shot", _S, "id", "FT", "zero-shot"),
    Claim("Lipsum-FT, WiSE-FT", "FT loses shifted accuracy against zero-shot", _S, "shifted",
          "zero-shot", "FT"),
    Claim("Lipsum-FT", "Lipsum-FT keeps more shifted accuracy than FT", _S, "shifted",
          "Lipsum-FT", "FT"),
    Claim("Lipsum-FT", "Lipsum-FT has a smaller energy gap than FT (held-out texts)", _S,
          "energy_gap", "Lipsum-FT", "FT", higher=False),
    Claim("Lipsum-FT", "Lipsum-FT's ID accuracy is at least FT's", _S, "id", "Lipsum-FT", "FT"),
    *(
        Claim("Lipsum-FT", f"Lipsum-FT beats {other} on shifted accuracy", _S, "shifted",
              "Lipsum-FT", other)
        for other in ("L2-SP", "KD", "CAR-FT", "FeatKD", "FT + EMA")
    ),
    Claim("Lipsum-FT (baselines)", "EMA beats the last iterate of FT on shifted accuracy", _S,
          "shifted", "FT + EMA", "FT"),
    Claim("CAR-FT", "CAR-FT beats FT on shifted accuracy", _S, "shifted", "CAR-FT", "FT"),
    Claim("CLIPood", "CLIPood (MMS + BMA) beats FT on shifted accuracy", _S, "shifted",
          "CLIPood (MMS + BMA)", "FT"),
    Claim("CLIPood", "MMS alone beats FT (cross-entropy) on shifted accuracy", _S, "shifted",
          "CLIPood (MMS only)", "FT"),
    Claim("CLIPood", "BMA improves over the last iterate (shifted accuracy)", _S, "shifted",
          "CLIPood (MMS + BMA)", "CLIPood (MMS only)"),
    Claim("CLIPood", "BMA improves over the last iterate (ID accuracy)", _S, "id",
          "CLIPood (MMS + BMA)", "CLIPood (MMS only)"),
    Claim("WiSE-FT", "WiSE-FT (α = 0.5) beats FT on shifted accuracy", _S, "shifted",
          "WiSE-FT (α = 0.5)", "FT"),
    Claim("WiSE-FT", "WiSE-FT (α = 0.5) keeps FT's ID accuracy", _S, "id", "WiSE-FT (α = 0.5)",
          "FT"),
    Claim("TPGM", "TPGM beats FT on shifted accuracy", _S, "shifted", "TPGM", "FT"),
    Claim("Model soups", "the greedy soup beats its best ingredient (FT) on ID accuracy", _S,
          "id", "greedy soup", "FT"),
    Claim("Model soups", "the greedy soup beats FT on shifted accuracy", _S, "shifted",
          "greedy soup", "FT"),
    Claim("FLYP", "FLYP beats FT on shifted accuracy", _S, "shifted", "FLYP", "FT"),
    Claim("LP-FT", "LP-FT beats FT on shifted accuracy", _S, "shifted", "LP-FT", "FT"),
    Claim("CLIPood", "FT loses new-class accuracy against zero-shot", _O, "new", "zero-shot",
          "FT"),
    Claim("CLIPood", "CLIPood's new-class accuracy exceeds zero-shot's", _O, "new",
          "CLIPood (MMS + BMA, β = 0.1)", "zero-shot"),
    Claim("CLIPood", "CLIPood's H exceeds zero-shot's", _O, "H", "CLIPood (MMS + BMA, β = 0.1)",
          "zero-shot"),
    Claim("CLIPood", "CLIPood's H exceeds FT's", _O, "H", "CLIPood (MMS + BMA, β = 0.1)", "FT"),
    Claim("UEO", "UEO raises known-class accuracy over zero-shot", _U, "known", "UEO",
          "zero-shot (UEO's prompt)"),
    Claim("UEO", "UEO raises AUROC over zero-shot", _U, "auroc", "UEO",
          "zero-shot (UEO's prompt)"),
    Claim("UEO", "UEO raises HOS over zero-shot", _U, "hos", "UEO", "zero-shot (UEO's prompt)"),
    Claim("UEO", "UEO at the paper's lr (1e-4) raises AUROC over zero-shot", _U, "auroc",
          "UEO (paper's lr)", "zero-shot (UEO's prompt)"),
    Claim("UEO", "UEO at the paper's lr (1e-4) raises known-class accuracy over zero-shot", _U,
          "known", "UEO (paper's lr)", "zero-shot (UEO's prompt)"),
    Claim("UEO", "UEO beats entropy minimisation on AUROC", _U, "auroc", "UEO", "entropy min."),
    Claim("UEO", "UEO beats IM on AUROC", _U, "auroc", "UEO", "IM"),
    Claim("UEO", "UEO beats entropy minimisation on known-class accuracy", _U, "known", "UEO",
          "entropy min."),
    Claim("UEO", "UEO beats IM on known-class accuracy", _U, "known", "UEO", "IM"),
)  # fmt: skip
"""Every claim the demo checks, in report order."""


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarise(rows: Rows) -> dict[str, dict[str, list[float]]]:
    """Mean and sample standard deviation over seeds: ``{row: {metric: [mean, std]}}``."""
    out: dict[str, dict[str, list[float]]] = {}
    for row, per_seed in rows.items():
        out[row] = {
            metric: list(_mean_std([m[metric] for m in per_seed])) for metric in per_seed[0]
        }
    return out


def verdict(mean: float, spread: float) -> str:
    """The verdict of a claim from the mean and spread of its oriented paired differences.

    Example:
        >>> verdict(0.02, 0.01), verdict(0.005, 0.01), verdict(-0.02, 0.01), verdict(1e-4, 0.0)
        ('reproduced', 'same direction, within seed spread', 'not reproduced', 'no difference')
    """
    if abs(mean) < RESOLUTION:
        return VERDICTS[2]
    if mean > 0:
        return VERDICTS[0] if mean > spread else VERDICTS[1]
    return VERDICTS[4] if -mean > spread else VERDICTS[3]


def judge(claim: Claim, experiments: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The evidence and verdict of one claim from the experiments' per-seed rows.

    Returns:
        The claim's fields plus ``differences`` (per seed, ``a - b`` in the metric's units, not
        oriented), ``mean``, ``std`` (of those differences) and ``verdict``.
    """
    rows = experiments[claim.experiment]["rows"]
    a = [m[claim.metric] for m in rows[claim.a]]
    b = [m[claim.metric] for m in rows[claim.b]]
    differences = [x - y for x, y in zip(a, b, strict=True)]
    mean, std = _mean_std(differences)
    oriented = mean if claim.higher else -mean
    return {
        **claim._asdict(),
        "differences": differences,
        "mean": mean,
        "std": std,
        "verdict": verdict(oriented, std),
    }
