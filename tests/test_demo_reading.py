"""The demo's honest reading: the paired t-tests, their error rates on noise, the claims.

Fast (no model): hand values against scipy's one-sample t-test, simulated null and real effects
(continuous and accuracy-like discrete differences), non-inferiority at its boundary, "not
judged", hypothesis properties and every error path.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import ttest_1samp

from robustft.demo._reading import (
    ALPHA,
    CLAIMS,
    VERDICTS,
    Claim,
    judge,
    paired_test,
    summarise,
    verdict,
)

DRAWS = 4000
TEST_IMAGES = 347  # accuracy differences on the demo's test set are multiples of 1/347


def _experiments(a: Sequence[float], b: Sequence[float], metric: str = "m") -> dict[str, Any]:
    return {"shift": {"rows": {"A": [{metric: x} for x in a], "B": [{metric: y} for y in b]}}}


BEATS = Claim("paper", "A beats B", "shift", "m", "A", "B")


def _rates(differences: np.ndarray, claim: Claim = BEATS, *, rows: bool = True) -> dict[str, float]:
    """Fraction of each verdict over the rows of ``differences`` (``[draws, seeds]``, a - b)."""
    counts = dict.fromkeys(VERDICTS, 0)
    for d in differences:
        if rows:  # through judge, from two rows whose difference is d
            b = [0.5] * len(d)
            judged = judge(claim, _experiments([0.5 + x for x in d], b))
            counts[judged["verdict"]] += 1
        else:
            counts[verdict(*paired_test(list(d), margin=claim.margin))] += 1
    return {k: v / len(differences) for k, v in counts.items()}


# --- hand values -------------------------------------------------------------------------------

VECTORS = [
    [0.02, 0.03, 0.01, 0.025, 0.015],
    [0.01, -0.02, 0.005, 0.0, 0.012],
    [-0.03, -0.01, -0.025],
    [1.0, 2.0],
    [0.004, -0.006, 0.001, 0.003, -0.002, 0.0, 0.005],
]


@pytest.mark.parametrize("d", VECTORS)
@pytest.mark.parametrize("margin", [0.0, 0.01, 0.5])
def test_paired_test_equals_scipy_one_sample_t(d: list[float], margin: float) -> None:
    p_support, p_against = paired_test(d, margin=margin)
    greater = ttest_1samp(d, popmean=-margin, alternative="greater").pvalue
    less = ttest_1samp(d, popmean=-margin, alternative="less").pvalue
    assert math.isclose(p_support, greater, rel_tol=1e-10, abs_tol=1e-15)
    assert math.isclose(p_against, less, rel_tol=1e-10, abs_tol=1e-15)


def test_paired_test_hand_value() -> None:
    # d = (1, 2, 3): mean 2, s = 1, t = 2 * sqrt(3) with 2 dof; P(T_2 >= t) = (1 - t / sqrt(t^2 + 2)) / 2
    t = 2 * math.sqrt(3)
    expected = (1 - t / math.sqrt(t * t + 2)) / 2
    p_support, p_against = paired_test([1.0, 2.0, 3.0])
    assert math.isclose(p_support, expected, rel_tol=1e-12)
    assert math.isclose(p_against, 1 - expected, rel_tol=1e-12)
    # a margin shifts the null: d = (-1, 0, 1) with margin 2 is the same t
    assert paired_test([-1.0, 0.0, 1.0], margin=2.0) == pytest.approx((expected, 1 - expected))


def test_paired_test_without_spread() -> None:
    # every seed agrees: the exact sign-flip p 2^-n, not t's 0
    assert paired_test([0.01, 0.01, 0.01]) == (0.125, 1.0)
    assert paired_test([-0.01, -0.01]) == (1.0, 0.25)
    assert paired_test([0.01] * 5) == (1 / 32, 1.0)
    assert paired_test([0.0] * 5) == (1.0, 1.0)
    assert paired_test([-0.01] * 4, margin=0.01) == (1.0, 1.0)  # exactly at the margin
    assert paired_test([-0.005] * 4, margin=0.01) == (1 / 16, 1.0)
    assert paired_test([-0.02] * 4, margin=0.01) == (1.0, 1 / 16)
    assert paired_test(np.array([0.1, 0.1, 0.1])) == (0.125, 1.0)  # type: ignore[arg-type]


def test_paired_test_accepts_numpy_numbers_and_does_not_mutate() -> None:
    d = [np.float32(0.5), np.float64(0.25), 1]
    before = list(d)
    p = paired_test(d, margin=np.float64(0.0))
    assert d == before
    assert p == pytest.approx(paired_test([0.5, 0.25, 1.0]))


def test_verdict_on_hand_values() -> None:
    assert verdict(0.01, 0.99) == "reproduced"
    assert verdict(0.99, 0.01) == "refuted"
    assert verdict(0.3, 0.7) == "inconclusive"
    assert verdict(ALPHA, 1 - ALPHA) == "inconclusive"  # strictly below alpha
    assert verdict(1.0, 1.0) == "inconclusive"
    assert verdict(0.0, 1.0) == "reproduced"


def test_judge_fields_and_orientation() -> None:
    exp = _experiments([0.80, 0.82, 0.81, 0.83], [0.70, 0.71, 0.70, 0.72])
    judged = judge(BEATS, exp)
    assert judged["differences"] == [0.80 - 0.70, 0.82 - 0.71, 0.81 - 0.70, 0.83 - 0.72]
    assert judged["mean"] == pytest.approx(0.1075)
    assert judged["std"] == pytest.approx(np.std(judged["differences"], ddof=1))
    assert judged["seeds"] == 4
    assert (judged["p_support"], judged["p_against"]) == paired_test(judged["differences"])
    assert judged["p"] == judged["p_support"] < ALPHA
    assert judged["verdict"] == "reproduced" and judged["reason"] is None
    assert {k: judged[k] for k in BEATS._fields} == BEATS._asdict()
    # lower is better: the same rows refute "A has the lower m", and p is then p_against
    lower = BEATS._replace(higher=False)
    flipped = judge(lower, exp)
    assert flipped["differences"] == judged["differences"]  # reported as a - b, not oriented
    assert flipped["verdict"] == "refuted"
    assert (flipped["p_support"], flipped["p_against"]) == (
        judged["p_against"],
        judged["p_support"],
    )
    assert flipped["p"] == flipped["p_against"]


def test_judge_non_inferiority() -> None:
    # a is 0.5 points below b on every seed, with spread: within a 1-point margin
    exp = _experiments([0.795, 0.81, 0.80, 0.79, 0.805], [0.80, 0.815, 0.806, 0.795, 0.81])
    beats = judge(BEATS, exp)
    keeps = judge(BEATS._replace(margin=0.01), exp)
    assert beats["verdict"] == "refuted"
    assert keeps["verdict"] == "reproduced"
    shifted = [x + 0.01 for x in keeps["differences"]]
    assert keeps["p_support"] == pytest.approx(paired_test(shifted)[0], rel=1e-6)


def test_judge_not_judged_when_a_row_did_not_move() -> None:
    exp = _experiments([0.8, 0.82, 0.81], [0.7, 0.71, 0.7])
    judged = judge(BEATS, exp, not_moved={"A"})
    assert judged["verdict"] == "not judged"
    assert judged["reason"] == "A did not move from its start"
    assert judged["p_support"] == judge(BEATS, exp)["p_support"] < ALPHA  # still reported
    assert judged["p"] == judged["p_support"]
    both = judge(BEATS, exp, not_moved=["B", "A", "C"])
    assert both["verdict"] == "not judged"
    assert both["reason"] == "A and B did not move from their start"
    assert judge(BEATS, exp, not_moved=["C"])["verdict"] == "reproduced"


def test_judge_single_seed_is_not_judged() -> None:
    judged = judge(BEATS, _experiments([0.9], [0.1]))
    assert judged["verdict"] == "not judged"
    assert judged["reason"] == "1 seed: a paired test needs at least 2"
    assert judged["p_support"] is judged["p_against"] is judged["p"] is None
    assert judged["mean"] == pytest.approx(0.8) and judged["std"] == 0.0


def test_judge_does_not_mutate() -> None:
    exp = _experiments([0.8, 0.82, 0.81], [0.7, 0.71, 0.7])
    before = repr(exp)
    judge(BEATS, exp, not_moved=["A"])
    assert repr(exp) == before


def test_summarise() -> None:
    assert summarise({"r": [{"m": 1.0}, {"m": 3.0}]}) == {"r": {"m": [2.0, math.sqrt(2.0)]}}
    assert summarise({"r": [{"m": 0.5}]}) == {"r": {"m": [0.5, 0.0]}}


# --- error rates on simulated effects ----------------------------------------------------------


@pytest.mark.parametrize("higher", [True, False])
def test_null_effects_are_called_at_most_alpha_of_the_time(higher: bool) -> None:
    rng = np.random.default_rng(18)
    d = rng.normal(0.0, 0.01, size=(DRAWS, 5))
    rates = _rates(d, BEATS._replace(higher=higher))
    assert 0.03 <= rates["reproduced"] <= 0.07, rates
    assert 0.03 <= rates["refuted"] <= 0.07, rates
    assert rates["not judged"] == 0.0


@pytest.mark.parametrize("images", [1, 2, 3])
def test_discrete_null_effects_exactly(images: int) -> None:
    # every pattern of 5 seeds whose difference is uniform on -images..+images test images,
    # enumerated: the exact rate, no sampling error (a t-test on a few discrete values runs a
    # little above alpha: 6.6 %, 6.3 %, 5.7 %; with 2 seeds and +-1 image it would be 11 %)
    steps = range(-images, images + 1)
    d = np.array(list(itertools.product(steps, repeat=5))) / TEST_IMAGES
    rates = _rates(d, rows=False)
    assert rates["reproduced"] <= 0.07, rates
    assert rates["refuted"] == pytest.approx(rates["reproduced"])  # a symmetric null


@pytest.mark.parametrize("seeds", [3, 5])
def test_discrete_null_effects_of_two_accuracies(seeds: int) -> None:
    # the difference of two test-set accuracies around 80 %: binomial counts out of 347
    rng = np.random.default_rng(347)
    shape = (DRAWS, seeds)
    counts = rng.binomial(TEST_IMAGES, 0.8, shape) - rng.binomial(TEST_IMAGES, 0.8, shape)
    rates = _rates(counts / TEST_IMAGES)
    assert rates["reproduced"] <= 0.07, rates
    assert rates["refuted"] <= 0.07, rates


def test_real_effects_are_found() -> None:
    rng = np.random.default_rng(1908)
    d = rng.normal(1.5 * 0.01, 0.01, size=(DRAWS, 5))
    rates = _rates(d)
    assert rates["reproduced"] >= 0.75, rates
    assert rates["refuted"] <= 0.01, rates


def test_non_inferiority_at_its_boundary_is_called_at_alpha() -> None:
    rng = np.random.default_rng(5)
    margin = 0.01
    d = rng.normal(-margin, 0.004, size=(DRAWS, 5))
    rates = _rates(d, BEATS._replace(margin=margin))
    assert 0.03 <= rates["reproduced"] <= 0.07, rates
    assert 0.03 <= rates["refuted"] <= 0.07, rates


def test_non_inferiority_holds_when_there_is_no_loss() -> None:
    rng = np.random.default_rng(6)
    sd = 0.004
    d = rng.normal(0.0, sd, size=(DRAWS, 5))
    rates = _rates(d, BEATS._replace(margin=3 * sd), rows=False)
    assert rates["reproduced"] >= 0.9, rates
    assert rates["refuted"] == 0.0, rates
    # the same data without a margin is a null effect for a "beats" claim
    assert _rates(d, rows=False)["reproduced"] <= 0.07


# --- properties --------------------------------------------------------------------------------

values = st.floats(0.0, 1.0, allow_nan=False)
margins = st.sampled_from([0.0, 0.001, 0.01, 0.1])


@given(st.lists(st.floats(-1.0, 1.0), min_size=2, max_size=8), margins)
def test_one_sided_p_values_are_complementary(d: list[float], margin: float) -> None:
    p_support, p_against = paired_test(d, margin=margin)
    assert 0.0 <= p_support <= 1.0 and 0.0 <= p_against <= 1.0
    if min(d) != max(d):
        assert math.isclose(p_support + p_against, 1.0, abs_tol=1e-15)
    assert verdict(p_support, p_against) in VERDICTS


@given(st.data(), st.integers(2, 7))
def test_swapping_the_rows_swaps_the_p_values(data: st.DataObject, n: int) -> None:
    a = data.draw(st.lists(values, min_size=n, max_size=n))
    b = data.draw(st.lists(values, min_size=n, max_size=n))
    exp = _experiments(a, b)
    forward = judge(BEATS, exp)
    backward = judge(BEATS._replace(a="B", b="A"), exp)
    assert backward["p_support"] == forward["p_against"]
    assert backward["p_against"] == forward["p_support"]
    swapped = {"reproduced": "refuted", "refuted": "reproduced", "inconclusive": "inconclusive"}
    assert backward["verdict"] == swapped[forward["verdict"]]


@given(st.lists(st.floats(-1.0, 1.0), min_size=2, max_size=8), st.floats(0.0, 0.5))
def test_a_larger_margin_never_weakens_support(d: list[float], extra: float) -> None:
    assert paired_test(d, margin=0.01 + extra)[0] <= paired_test(d, margin=0.01)[0]


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (([0.1],), {}, r"paired_test: differences must hold at least 2 values .*got \[0\.1\]"),
        (([],), {}, r"paired_test: differences must hold at least 2 values"),
        (([0.1, math.nan],), {}, r"paired_test: differences must be finite numbers, got \[0\.1, nan\]"),
        (([0.1, math.inf],), {}, r"paired_test: differences must be finite numbers"),
        (([0.1, "0.2"],), {}, r"paired_test: differences must be finite numbers"),
        (([0.1, True],), {}, r"paired_test: differences must be finite numbers"),
        (("0.1",), {}, r"paired_test: differences must be a sequence of numbers, got '0\.1'"),
        ((0.1,), {}, r"paired_test: differences must be a sequence of numbers, got 0\.1"),
        (([0.1, 0.2],), {"margin": -0.01}, r"paired_test: margin must be a finite number >= 0, got -0\.01"),
        (([0.1, 0.2],), {"margin": math.nan}, r"paired_test: margin must be a finite number >= 0"),
        (([0.1, 0.2],), {"margin": math.inf}, r"paired_test: margin must be a finite number >= 0"),
        (([0.1, 0.2],), {"margin": "0.01"}, r"paired_test: margin must be a finite number >= 0"),
    ],
)  # fmt: skip
def test_paired_test_errors(args: tuple[Any, ...], kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        paired_test(*args, **kwargs)


@pytest.mark.parametrize(
    ("p_support", "p_against", "match"),
    [
        (-0.1, 0.5, r"verdict: p_support must be a number in \[0, 1\], got -0\.1"),
        (0.5, 1.5, r"verdict: p_against must be a number in \[0, 1\], got 1\.5"),
        (math.nan, 0.5, r"verdict: p_support must be a number in \[0, 1\], got nan"),
        (None, 0.5, r"verdict: p_support must be a number in \[0, 1\], got None"),
        (0.01, 0.02, r"verdict: p_support and p_against cannot both be below 0\.05"),
    ],
)
def test_verdict_errors(p_support: Any, p_against: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        verdict(p_support, p_against)


def test_judge_errors() -> None:
    exp = _experiments([0.8, 0.82], [0.7, 0.71])
    with pytest.raises(ValueError, match=r"judge: experiments has no experiment 'open'"):
        judge(BEATS._replace(experiment="open"), exp)
    with pytest.raises(
        ValueError, match=r"judge: experiment 'shift' has no row 'C' .*\['A', 'B'\]"
    ):
        judge(BEATS._replace(b="C"), exp)
    with pytest.raises(
        ValueError, match=r"judge: rows 'A' and 'B' .* same number of seeds.*2 and 3"
    ):
        judge(BEATS, _experiments([0.8, 0.82], [0.7, 0.71, 0.7]))
    with pytest.raises(ValueError, match=r"judge: rows 'A' and 'B' of 'shift' have no seeds"):
        judge(BEATS, _experiments([], []))
    with pytest.raises(ValueError, match=r"judge: claim 'A beats B': margin must be .* got -0\.01"):
        judge(BEATS._replace(margin=-0.01), exp)
    with pytest.raises(
        ValueError, match=r"judge: not_moved must be a collection of row names, got 'A'"
    ):
        judge(BEATS, exp, not_moved="A")
    with pytest.raises(ValueError, match=r"paired_test: differences must be finite numbers"):
        judge(BEATS, _experiments([0.8, math.nan], [0.7, 0.71]))  # fmt: skip


# --- the claims --------------------------------------------------------------------------------


def test_claims_are_well_formed() -> None:
    assert len({c.text for c in CLAIMS}) == len(CLAIMS)
    for c in CLAIMS:
        assert c.experiment in ("shift", "open", "universal"), c
        assert math.isfinite(c.margin) and c.margin >= 0, c
        assert c.a != c.b, c
        # a non-inferiority claim states its margin in its text
        assert (c.margin > 0) == ("within 1 point" in c.text), c
        assert c.margin in (0.0, 0.01), c
    assert VERDICTS == ("reproduced", "inconclusive", "refuted", "not judged")


def test_claims_compare_what_the_issue_fixed() -> None:
    by_text = {c.text: c for c in CLAIMS}
    assert not [c for c in CLAIMS if "paper's lr" in c.text or "paper's lr" in c.a]
    oracle = by_text["UEO with oracle weights beats UEO on AUROC (the weights are the bottleneck)"]
    assert (oracle.experiment, oracle.metric, oracle.a, oracle.b, oracle.margin) == (
        "universal", "auroc", "UEO (oracle weights)", "UEO", 0.0,
    )  # fmt: skip
    keeps = by_text["UEO keeps known-class accuracy within 1 point of zero-shot"]
    assert (keeps.metric, keeps.a, keeps.b, keeps.margin) == (
        "known", "UEO", "zero-shot (UEO's prompt)", 0.01,
    )  # fmt: skip
    non_inferior = {(c.a, c.b, c.metric) for c in CLAIMS if c.margin > 0}
    assert non_inferior == {
        ("Lipsum-FT", "FT", "id"),
        ("WiSE-FT (α = 0.5)", "FT", "id"),
        ("UEO", "zero-shot (UEO's prompt)", "known"),
    }
    lp_ft = [c for c in CLAIMS if c.a == "LP-FT"]
    assert len(lp_ft) == 1 and "FT started from the zero-shot head" in lp_ft[0].text
    assert "random head" in lp_ft[0].text
