"""The honest reading: each paper's claims, checked against this run's own numbers.

A claim compares two rows of one experiment on one metric, the two rows its paper compares
("Lipsum-FT keeps more shifted accuracy than FT" compares Lipsum-FT with FT, not with the best
other row). The claims are fixed in the code (:data:`CLAIMS`) before any run; every verdict is
computed from the run.

Evidence. The *paired* difference per seed (both rows on the same seed's split, the same test
images), oriented so that a positive difference :math:`d_i` supports the claim (the sign flipped for
a metric where lower is better). A claim either says that ``a`` *beats* ``b`` (margin
:math:`\\delta = 0`) or that ``a`` is *no worse* than ``b`` by more than a margin :math:`\\delta > 0`
fixed with the claim in the metric's units (non-inferiority: "keeps", "at least"; 0.01 = 1
accuracy point, stated in the claim's text as "within 1 point").

Test. Two one-sided paired t-tests over the :math:`n` seeds (:func:`paired_test`), at level
:data:`ALPHA` = 0.05 each:

- ``reproduced``: :math:`H_0: \\mathbb{E}[d] \\le -\\delta` is rejected (:math:`p_+ < \\alpha`);
- ``refuted``: :math:`H_0: \\mathbb{E}[d] \\ge -\\delta` is rejected (:math:`p_- < \\alpha`);
- ``inconclusive``: neither (the seeds cannot tell, whatever the sign of the mean);
- ``not judged``: one of the two rows did not move from its start (a fine-tuned row equal to the
  model it started from says nothing about its method), or the run has a single seed. The
  statistics are still reported, with the reason.

A claim whose true difference is exactly :math:`-\\delta` (no effect, for a "beats" claim) is called
``reproduced`` in at most 5 % of runs, and likewise ``refuted``: noise alone cannot produce a
verdict more often than that (under the t-test's normal model; ``tests/test_demo_reading.py``
checks it by simulation, on continuous and on discrete accuracy-like differences).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from numbers import Real
from typing import Any, NamedTuple

__all__ = [
    "ALPHA",
    "CLAIMS",
    "VERDICTS",
    "Claim",
    "judge",
    "paired_test",
    "summarise",
    "verdict",
]

VERDICTS = ("reproduced", "inconclusive", "refuted", "not judged")

ALPHA = 0.05
"""The level of each one-sided test: a verdict other than ``inconclusive`` needs p < ALPHA."""

EXPERIMENTS = ("shift", "open", "universal")

Rows = Mapping[str, Sequence[Mapping[str, float]]]


class Claim(NamedTuple):
    """``a`` beats ``b`` on ``metric`` of ``experiment`` (lower is better if not ``higher``).

    With ``margin`` > 0 the claim is non-inferiority instead: ``a`` is no worse than ``b`` by
    more than ``margin`` (in the metric's units: 0.01 is one accuracy point).
    """

    paper: str
    text: str
    experiment: str
    metric: str
    a: str
    b: str
    higher: bool = True
    margin: float = 0.0


_S, _O, _U = "shift", "open", "universal"
_POINT = 0.01
CLAIMS = (
    Claim("Lipsum-FT, WiSE-FT", "FT raises ID accuracy over zero-shot", _S, "id", "FT", "zero-shot"),
    Claim("Lipsum-FT, WiSE-FT", "FT loses shifted accuracy against zero-shot", _S, "shifted",
          "zero-shot", "FT"),
    Claim("Lipsum-FT", "Lipsum-FT keeps more shifted accuracy than FT", _S, "shifted",
          "Lipsum-FT", "FT"),
    Claim("Lipsum-FT", "Lipsum-FT has a smaller energy gap than FT (held-out texts)", _S,
          "energy_gap", "Lipsum-FT", "FT", higher=False),
    Claim("Lipsum-FT", "Lipsum-FT's ID accuracy is at least FT's (within 1 point)", _S, "id",
          "Lipsum-FT", "FT", margin=_POINT),
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
    Claim("CLIPood", "BMA improves over MMS alone (its best checkpoint on val), shifted accuracy", _S, "shifted",
          "CLIPood (MMS + BMA)", "CLIPood (MMS only)"),
    Claim("CLIPood", "BMA improves over MMS alone (its best checkpoint on val), ID accuracy", _S, "id",
          "CLIPood (MMS + BMA)", "CLIPood (MMS only)"),
    Claim("WiSE-FT", "WiSE-FT (α = 0.5) beats FT on shifted accuracy", _S, "shifted",
          "WiSE-FT (α = 0.5)", "FT"),
    Claim("WiSE-FT", "WiSE-FT (α = 0.5) keeps FT's ID accuracy (within 1 point)", _S, "id",
          "WiSE-FT (α = 0.5)", "FT", margin=_POINT),
    Claim("TPGM", "TPGM beats FT on shifted accuracy", _S, "shifted", "TPGM", "FT"),
    Claim("Model soups", "the greedy soup beats its best ingredient (FT) on ID accuracy", _S,
          "id", "greedy soup", "FT"),
    Claim("Model soups", "the greedy soup beats FT on shifted accuracy", _S, "shifted",
          "greedy soup", "FT"),
    Claim("FLYP", "FLYP beats FT on shifted accuracy", _S, "shifted", "FLYP", "FT"),
    Claim("LP-FT", "LP-FT beats FT started from the zero-shot head on shifted accuracy (the "
          "LP-FT paper's FT starts from a random head)", _S, "shifted", "LP-FT", "FT"),
    Claim("CLIPood", "FT loses new-class accuracy against zero-shot", _O, "new", "zero-shot",
          "FT"),
    Claim("CLIPood", "CLIPood's new-class accuracy exceeds zero-shot's", _O, "new",
          "CLIPood (MMS + BMA, β = 0.1)", "zero-shot"),
    Claim("CLIPood", "CLIPood's H exceeds zero-shot's", _O, "H", "CLIPood (MMS + BMA, β = 0.1)",
          "zero-shot"),
    Claim("CLIPood", "CLIPood's H exceeds FT's", _O, "H", "CLIPood (MMS + BMA, β = 0.1)", "FT"),
    Claim("UEO", "UEO raises known-class accuracy over zero-shot", _U, "known", "UEO",
          "zero-shot (UEO's prompt)"),
    Claim("UEO", "UEO keeps known-class accuracy within 1 point of zero-shot", _U, "known",
          "UEO", "zero-shot (UEO's prompt)", margin=_POINT),
    Claim("UEO", "UEO raises AUROC over zero-shot", _U, "auroc", "UEO",
          "zero-shot (UEO's prompt)"),
    Claim("UEO", "UEO raises HOS over zero-shot", _U, "hos", "UEO", "zero-shot (UEO's prompt)"),
    Claim("UEO", "UEO with oracle weights beats UEO on AUROC (the weights are the bottleneck)",
          _U, "auroc", "UEO (oracle weights)", "UEO"),
    Claim("UEO", "UEO beats entropy minimisation on AUROC", _U, "auroc", "UEO", "entropy min."),
    Claim("UEO", "UEO beats IM on AUROC", _U, "auroc", "UEO", "IM"),
    Claim("UEO", "UEO beats entropy minimisation on known-class accuracy", _U, "known", "UEO",
          "entropy min."),
    Claim("UEO", "UEO beats IM on known-class accuracy", _U, "known", "UEO", "IM"),
)  # fmt: skip
"""Every claim the demo checks, in report order (fixed before any run)."""


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarise(rows: Rows) -> dict[str, dict[str, list[float]]]:
    """Mean and sample standard deviation over seeds: ``{row: {metric: [mean, std]}}``.

    Example:
        >>> summarise({"FT": [{"id": 0.5}, {"id": 0.7}]})["FT"]["id"]
        [0.6, 0.1414...]
    """
    out: dict[str, dict[str, list[float]]] = {}
    for row, per_seed in rows.items():
        out[row] = {
            metric: list(_mean_std([m[metric] for m in per_seed])) for metric in per_seed[0]
        }
    return out


def _number(x: object) -> float | None:
    """``x`` as a float if it is a real number (not a bool), else ``None``."""
    if isinstance(x, Real) and not isinstance(x, bool):
        return float(x)
    return None


def _check_margin(where: str, margin: object) -> float:
    value = _number(margin)
    if value is None or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: margin must be a finite number >= 0, got {margin!r}")
    return value


def paired_test(differences: Sequence[float], *, margin: float = 0.0) -> tuple[float, float]:
    """One-sided paired t-tests of a claim over seeds: ``(p_support, p_against)``.

    The differences :math:`d_1, \\dots, d_n` are per seed and oriented (positive supports the
    claim); :math:`\\delta` is the claim's margin (0 for "a beats b"). With the mean
    :math:`\\bar d` and the sample standard deviation :math:`s_d` (:math:`n - 1` in the
    denominator),

    .. math::

        t = \\frac{\\bar d + \\delta}{s_d / \\sqrt{n}}, \\qquad
        p_+ = P(T_{n-1} \\ge t), \\qquad p_- = P(T_{n-1} \\le t),

    with :math:`T_{n-1}` Student's t with :math:`n - 1` degrees of freedom. :math:`p_+` tests
    :math:`H_0: \\mathbb{E}[d] \\le -\\delta` against :math:`\\mathbb{E}[d] > -\\delta` (the claim
    holds); :math:`p_-` tests :math:`H_0: \\mathbb{E}[d] \\ge -\\delta` against
    :math:`\\mathbb{E}[d] < -\\delta` (the claim fails). For :math:`s_d > 0`,
    :math:`p_+ + p_- = 1`. With no spread (every :math:`d_i` equal) t is infinite and would give
    p = 0; the p of that side is instead :math:`2^{-n}`, the exact sign-flip p of :math:`n` seeds
    that all agree (the least a symmetric null can give them: 1/4 for 2 seeds, so "+1 image on
    both seeds" is not a reproduction; 1/32 for 5), the other side 1; ``(1, 1)`` if
    :math:`d_1 + \\delta = 0` (nothing shown either way).

    Why t and not an exact sign-flip (permutation) test: with 5 seeds the sign-flip test has
    :math:`2^5 = 32` sign patterns, so its smallest one-sided p is 1/32 ≈ 0.031, reached only
    when every seed agrees; one seed the other way already gives p ≥ 2/32 > 0.05. It would
    almost never call a claim either way. The t-test assumes roughly normal differences, and
    :func:`judge`'s tests check its error rates on discrete (accuracy-count) differences too.

    Args:
        differences: the oriented paired differences, one per seed (at least 2, finite).
        margin: the non-inferiority margin :math:`\\delta \\ge 0`, in the differences' units.

    Returns:
        ``(p_support, p_against)``, each in ``[0, 1]``.

    Raises:
        ValueError: fewer than 2 differences, a non-finite or non-numeric difference, or a
            negative or non-finite margin.

    Example:
        >>> p_support, p_against = paired_test([0.02, 0.03, 0.01, 0.025, 0.015])
        >>> round(p_support, 5), round(p_against, 5)
        (0.00241, 0.99759)
        >>> paired_test([0.0, 0.0, 0.0]), paired_test([-0.01, -0.01], margin=0.02)
        ((1.0, 1.0), (0.25, 1.0))

    References:
        Student, "The probable error of a mean", Biometrika 6(1), 1908. Wellek, "Testing
        Statistical Hypotheses of Equivalence and Noninferiority", 2nd ed., CRC 2010, ch. 2
        (the shifted null of a non-inferiority test).
    """
    if isinstance(differences, (str, bytes, Mapping)) or not isinstance(differences, Iterable):
        raise ValueError(
            f"paired_test: differences must be a sequence of numbers, got {differences!r}"
        )
    given = list(differences)  # a list, a tuple or a 1-D NumPy array
    if len(given) < 2:
        raise ValueError(
            f"paired_test: differences must hold at least 2 values (one per seed), got {given!r}"
        )
    values = [_number(x) for x in given]
    d = [x for x in values if x is not None and math.isfinite(x)]
    if len(d) != len(values):
        raise ValueError(f"paired_test: differences must be finite numbers, got {given!r}")
    delta = _check_margin("paired_test", margin)
    n = len(d)
    if min(d) == max(d):  # exactly no spread: the mean is d[0], with no rounding
        shifted = d[0] + delta
        floor = 0.5**n  # the exact sign-flip p of n agreeing seeds (t would say 0)
        if shifted > 0:
            return floor, 1.0
        if shifted < 0:
            return 1.0, floor
        return 1.0, 1.0
    from scipy.special import stdtr

    mean, std = _mean_std(d)
    t = (mean + delta) / (std / math.sqrt(n))
    # the smaller tail directly (no 1 - p cancellation), and the same rounding for -t and t
    small = float(stdtr(n - 1, -abs(t)))
    return (small, 1.0 - small) if t > 0 else (1.0 - small, small)


def _check_p(name: str, p: object) -> float:
    value = _number(p)
    if value is None or not 0.0 <= value <= 1.0:
        raise ValueError(f"verdict: {name} must be a number in [0, 1], got {p!r}")
    return value


def verdict(p_support: float, p_against: float) -> str:
    """The verdict of a claim from its two one-sided p-values (:func:`paired_test`).

    ``reproduced`` if ``p_support`` < :data:`ALPHA`, ``refuted`` if ``p_against`` < :data:`ALPHA`,
    else ``inconclusive``.

    Raises:
        ValueError: a p-value outside ``[0, 1]`` (or NaN), or both below :data:`ALPHA` (two
            complementary one-sided tests cannot both reject).

    Example:
        >>> verdict(0.01, 0.99), verdict(0.3, 0.7), verdict(0.98, 0.02), verdict(1.0, 1.0)
        ('reproduced', 'inconclusive', 'refuted', 'inconclusive')
    """
    support, against = _check_p("p_support", p_support), _check_p("p_against", p_against)
    if support < ALPHA and against < ALPHA:
        raise ValueError(
            f"verdict: p_support and p_against cannot both be below {ALPHA} (complementary "
            f"one-sided tests), got {p_support!r} and {p_against!r}"
        )
    if support < ALPHA:
        return "reproduced"
    if against < ALPHA:
        return "refuted"
    return "inconclusive"


def _rows(claim: Claim, experiments: Mapping[str, Mapping[str, Any]], row: str) -> list[float]:
    if claim.experiment not in experiments:
        raise ValueError(
            f"judge: experiments has no experiment {claim.experiment!r} (claim {claim.text!r}); "
            f"it has {sorted(experiments)}"
        )
    rows = experiments[claim.experiment]["rows"]
    if row not in rows:
        raise ValueError(
            f"judge: experiment {claim.experiment!r} has no row {row!r} (claim "
            f"{claim.text!r}); its rows are {list(rows)}"
        )
    return [float(m[claim.metric]) for m in rows[row]]


def judge(
    claim: Claim,
    experiments: Mapping[str, Mapping[str, Any]],
    *,
    not_moved: Collection[str] = (),
) -> dict[str, Any]:
    """The evidence and verdict of one claim from the experiments' per-seed rows.

    The differences ``a - b`` per seed are oriented by the metric's direction (negated where
    lower is better) and tested with :func:`paired_test` at the claim's margin; the verdict is
    :func:`verdict` of the two p-values, or ``not judged`` when ``claim.a`` or ``claim.b`` is in
    ``not_moved`` (the statistics are still computed) or the run has a single seed (no test).

    Args:
        claim: the claim.
        experiments: experiment name -> ``{"rows": {row: [per-seed {metric: value}]}}``.
        not_moved: rows that did not move from their start (their verdict says nothing).

    Returns:
        The claim's fields plus ``differences`` (per seed, ``a - b`` in the metric's units, not
        oriented), ``mean`` and ``std`` (of those differences), ``seeds`` (their number),
        ``p_support``, ``p_against``, ``p`` (the p-value of the verdict's test: ``p_against``
        for ``refuted``, else ``p_support``), ``verdict`` (one of :data:`VERDICTS`) and
        ``reason`` (why not judged, else ``None``). With a single seed the p-values are ``None``.

    Raises:
        ValueError: an unknown experiment or row, rows with different numbers of seeds, a
            claim with a negative margin, a non-finite metric value, or ``not_moved`` given as a
            single string.

    Example:
        >>> rows = {"FT": [{"id": 0.80}, {"id": 0.82}, {"id": 0.81}],
        ...         "zero-shot": [{"id": 0.70}, {"id": 0.70}, {"id": 0.70}]}
        >>> judged = judge(CLAIMS[0], {"shift": {"rows": rows}})
        >>> judged["verdict"], judged["seeds"], judged["p"] < 0.01
        ('reproduced', 3, True)
        >>> judge(CLAIMS[0], {"shift": {"rows": rows}}, not_moved=["FT"])["reason"]
        'FT did not move from its start'
    """
    if isinstance(not_moved, (str, bytes)):
        raise ValueError(f"judge: not_moved must be a collection of row names, got {not_moved!r}")
    margin = _check_margin(f"judge: claim {claim.text!r}", claim.margin)
    a, b = _rows(claim, experiments, claim.a), _rows(claim, experiments, claim.b)
    if len(a) != len(b):
        raise ValueError(
            f"judge: rows {claim.a!r} and {claim.b!r} of {claim.experiment!r} must have the same "
            f"number of seeds to be paired, got {len(a)} and {len(b)}"
        )
    if not a:
        raise ValueError(
            f"judge: rows {claim.a!r} and {claim.b!r} of {claim.experiment!r} have no seeds"
        )
    differences = [x - y for x, y in zip(a, b, strict=True)]
    mean, std = _mean_std(differences)
    n = len(differences)
    p_support: float | None = None
    p_against: float | None = None
    reason: str | None = None
    still = [row for row in (claim.a, claim.b) if row in not_moved]
    if still:
        verb = "did not move from its start" if len(still) == 1 else "did not move from their start"
        reason = f"{' and '.join(still)} {verb}"
    if n >= 2:
        oriented = differences if claim.higher else [-x for x in differences]
        p_support, p_against = paired_test(oriented, margin=margin)
        result = "not judged" if reason else verdict(p_support, p_against)
    else:
        reason = reason or "1 seed: a paired test needs at least 2"
        result = "not judged"
    return {
        **claim._asdict(),
        "differences": differences,
        "mean": mean,
        "std": std,
        "seeds": n,
        "p_support": p_support,
        "p_against": p_against,
        "p": p_against if result == "refuted" else p_support,
        "verdict": result,
        "reason": reason,
    }
