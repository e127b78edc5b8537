"""robustft.metrics functions: hand values, scikit-learn and naive references, properties, errors."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference.metrics_ref import (
    accuracy_ref,
    auroc_ref,
    ece_ref,
    fpr_at_tpr_ref,
    harmonic_mean_ref,
    nll_ref,
    open_set_ref,
)
from sklearn.metrics import roc_auc_score, roc_curve
from strategies import logits
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_calibration_error,
)

from robustft import metrics
from robustft.metrics import (
    OpenSetResult,
    accuracy,
    auroc,
    ece,
    fpr_at_tpr,
    harmonic_mean,
    nll,
    open_set,
)

CLOSED: list[Callable[[Tensor, Tensor], Tensor]] = [accuracy, nll, ece]


def t64(values: list[float] | list[list[float]]) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


@st.composite
def labelled(draw: st.DrawFn, *, rounded: bool = False) -> tuple[Tensor, Tensor]:
    """Float64 logits [B, C] and known labels; ``rounded`` makes argmax and confidence ties."""
    z = draw(logits(max_batch=12, max_classes=5, dtype=torch.float64))
    if rounded:
        z = torch.round(z)
    seed = draw(st.integers(0, 2**16))
    y = torch.randint(0, z.shape[1], (z.shape[0],), generator=torch.Generator().manual_seed(seed))
    return z, y


@st.composite
def ranked(draw: st.DrawFn, *, max_size: int = 30) -> tuple[Tensor, Tensor]:
    """Scores (rounded to one decimal: many ties) with at least one positive and one negative."""
    n = draw(st.integers(2, max_size))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    s = torch.round(torch.randn(n, generator=g, dtype=torch.float64) * 10) / 10
    pos = torch.rand(n, generator=g) < draw(st.floats(0.1, 0.9))
    pos[0], pos[1] = True, False
    return s, pos


# --------------------------------------------------------------------------- hand-computed


def test_accuracy_hand_values() -> None:
    z = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(z, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    # an argmax tie goes to the lowest class index
    assert accuracy(torch.tensor([[1.0, 1.0]]), torch.tensor([0])) == 1.0
    assert accuracy(torch.tensor([[1.0, 1.0]]), torch.tensor([1])) == 0.0
    assert accuracy(torch.tensor([[0.3], [2.0]]), torch.tensor([0, 0])) == 1.0  # one class


def test_nll_hand_values() -> None:
    z = t64([[0.0, 0.0], [2.0, 0.0]])
    want = (math.log(2) + math.log(1 + math.e**2)) / 2
    torch.testing.assert_close(
        nll(z, torch.tensor([0, 1])), torch.tensor(want, dtype=torch.float64)
    )


def test_ece_hand_values() -> None:
    # confidences 0.5, 0.5 (both correct) and s = e^3/(1+e^3) (wrong), 2 bins (0, .5], (.5, 1]
    z = t64([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0]])
    s = math.exp(3) / (1 + math.exp(3))
    want = (2 * (1 - 0.5) + abs(0 - s)) / 3
    torch.testing.assert_close(
        ece(z, torch.tensor([0, 0, 1]), num_bins=2), torch.tensor(want, dtype=torch.float64)
    )
    # one bin: |accuracy - mean confidence|
    got = ece(z, torch.tensor([0, 0, 1]), num_bins=1)
    torch.testing.assert_close(got, torch.tensor(abs(2 / 3 - (1 + s) / 3), dtype=torch.float64))


def test_ece_bins_are_right_closed_unlike_torchmetrics() -> None:
    """Confidence exactly 0.5 falls in (0, 0.5] here, in [0.5, 1) in torchmetrics."""
    z = t64([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    ours = ece(z, y, num_bins=2)
    torch.testing.assert_close(float(ours), ece_ref(z, y, 2))
    theirs = multiclass_calibration_error(torch.softmax(z, -1), y, num_classes=2, n_bins=2)
    s = math.exp(3) / (1 + math.exp(3))
    assert float(theirs) == pytest.approx(abs(2 / 3 - (1 + s) / 3), abs=1e-6)  # one merged bin
    assert float(ours) > float(theirs) + 0.5


def test_ece_equals_torchmetrics_off_the_bin_edges() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(200, 4, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 4, (200,), generator=g)
    for bins in (1, 10, 15):
        theirs = multiclass_calibration_error(torch.softmax(z, -1), y, num_classes=4, n_bins=bins)
        torch.testing.assert_close(ece(z, y, num_bins=bins), theirs.double())


def test_ece_zero_for_a_perfectly_calibrated_model() -> None:
    """In every bin the accuracy equals the (common) confidence."""
    rows, labels = [], []
    rows += [[0.0, 0.0]] * 2  # confidence 1/2, one of two right
    labels += [0, 1]
    rows += [[math.log(3.0), 0.0]] * 4  # confidence 3/4, three of four right
    labels += [0, 0, 0, 1]
    rows += [[0.0, 50.0]] * 3  # confidence ~1, all right
    labels += [1, 1, 1]
    z, y = t64(rows), torch.tensor(labels)
    for bins in (1, 4, 15, 100):
        assert float(ece(z, y, num_bins=bins)) == pytest.approx(0.0, abs=1e-12)
    three = t64([[1.0, 1.0, 1.0]] * 3)  # confidence 1/3, one of three right
    assert float(ece(three, torch.tensor([0, 1, 2]))) == pytest.approx(0.0, abs=1e-12)


def test_accuracy_equals_torchmetrics_up_to_its_float32_result() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(300, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (300,), generator=g)
    theirs = multiclass_accuracy(z, y, num_classes=5, average="micro")
    assert theirs.dtype == torch.float32  # whatever the input dtype: why we count by hand
    torch.testing.assert_close(accuracy(z, y).float(), theirs)
    assert float(accuracy(z, y)) == float((z.argmax(1) == y).sum()) / 300


# ------------------------------------------------------------------ references, closed set


@given(data=labelled(), bins=st.integers(1, 20))
def test_closed_set_metrics_match_reference(data: tuple[Tensor, Tensor], bins: int) -> None:
    z, y = data
    assert float(accuracy(z, y)) == pytest.approx(accuracy_ref(z, y), abs=1e-15)
    assert float(nll(z, y)) == pytest.approx(nll_ref(z, y), rel=1e-10, abs=1e-12)
    assert float(ece(z, y, num_bins=bins)) == pytest.approx(ece_ref(z, y, bins), abs=1e-12)


@given(data=labelled(rounded=True), bins=st.sampled_from([2, 4, 10, 15]))
def test_closed_set_metrics_match_reference_with_ties(
    data: tuple[Tensor, Tensor], bins: int
) -> None:
    z, y = data  # integer logits: tied argmaxes, confidences of exactly 1/2 on bin edges
    assert float(accuracy(z, y)) == pytest.approx(accuracy_ref(z, y), abs=1e-15)
    assert float(ece(z, y, num_bins=bins)) == pytest.approx(ece_ref(z, y, bins), abs=1e-12)


@given(data=labelled(), seed=st.integers(0, 2**16))
def test_closed_set_metrics_invariant_to_relabelling(
    data: tuple[Tensor, Tensor], seed: int
) -> None:
    z, y = data
    perm = torch.randperm(z.shape[1], generator=torch.Generator().manual_seed(seed))
    inverse = torch.argsort(perm)  # new column j is old class perm[j]; old class c is at inverse[c]
    for fn in CLOSED:
        torch.testing.assert_close(fn(z[:, perm], inverse[y]), fn(z, y), rtol=1e-12, atol=1e-12)


@given(data=labelled(), bins=st.integers(1, 20))
def test_closed_set_ranges(data: tuple[Tensor, Tensor], bins: int) -> None:
    z, y = data
    assert 0.0 <= float(accuracy(z, y)) <= 1.0
    assert 0.0 <= float(ece(z, y, num_bins=bins)) <= 1.0
    assert float(nll(z, y)) >= 0.0


# -------------------------------------------------------------------------------- ranking


def test_auroc_hand_values() -> None:
    s = torch.tensor([0.9, 0.4, 0.4, 0.1])
    assert float(auroc(s, torch.tensor([True, True, False, False]))) == pytest.approx(0.875)
    assert float(auroc(s, torch.tensor([1, 1, 0, 0]))) == pytest.approx(0.875)  # 0/1 integers
    assert float(auroc(torch.ones(4), torch.tensor([True, False, True, False]))) == 0.5  # all tied
    assert float(auroc(s, torch.tensor([False, False, True, True]))) == pytest.approx(0.125)


@given(data=ranked())
def test_auroc_matches_sklearn_and_pair_loop(data: tuple[Tensor, Tensor]) -> None:
    s, pos = data
    ours = float(auroc(s, pos))
    assert ours == pytest.approx(roc_auc_score(pos.numpy(), s.numpy()), abs=1e-12)
    assert ours == pytest.approx(auroc_ref(s, pos), abs=1e-12)


@given(data=ranked())
def test_auroc_properties(data: tuple[Tensor, Tensor]) -> None:
    s, pos = data
    a = float(auroc(s, pos))
    assert 0.0 <= a <= 1.0
    assert float(auroc(-s, pos)) == pytest.approx(1.0 - a, abs=1e-12)  # ties stay ½ both ways
    assert float(auroc(3.0 * s - 7.0, pos)) == pytest.approx(a, abs=1e-12)  # rank-based
    perm = torch.randperm(s.numel())
    assert float(auroc(s[perm], pos[perm])) == pytest.approx(a, abs=1e-12)


def test_auroc_large_scores_where_torchmetrics_saturates() -> None:
    """Energy-like scores above 17: torchmetrics' sigmoid makes them tie in float32."""
    s = torch.tensor([20.0, 25.0, 30.0, 18.0])
    y = torch.tensor([False, True, True, False])
    assert float(auroc(s, y)) == roc_auc_score(y.numpy(), s.numpy()) == 1.0
    assert float(binary_auroc(s, y.long())) == 0.5  # the reason auroc is written by hand


def test_auroc_equals_torchmetrics_for_probability_scores() -> None:
    """Inside [0, 1] torchmetrics applies no sigmoid and agrees (ties included)."""
    g = torch.Generator().manual_seed(3)
    s = torch.round(torch.rand(400, generator=g, dtype=torch.float64) * 20) / 20
    y = torch.rand(400, generator=g) < 0.3
    torch.testing.assert_close(auroc(s, y), binary_auroc(s, y.long()).double())


def test_auroc_single_positive_or_negative() -> None:
    s = torch.tensor([0.3, 0.1, 0.2, 0.5])
    pos = torch.tensor([False, True, False, False])
    assert float(auroc(s, pos)) == pytest.approx(roc_auc_score(pos.numpy(), s.numpy()))
    assert float(auroc(s, ~pos)) == pytest.approx(roc_auc_score((~pos).numpy(), s.numpy()))


def test_auroc_infinite_scores_order() -> None:
    s = torch.tensor([float("inf"), 1.0, float("-inf"), 1.0])
    pos = torch.tensor([True, True, False, False])
    assert float(auroc(s, pos)) == pytest.approx(auroc_ref(s, pos)) == 0.875


def _sklearn_fpr(s: Tensor, pos: Tensor, tpr: float) -> float:
    fpr, tp_rate, _ = roc_curve(pos.numpy(), s.numpy(), drop_intermediate=False)
    p = int(pos.sum())
    k = math.ceil(__import__("fractions").Fraction(repr(tpr)) * p)
    tps = np.rint(tp_rate * p)
    return float(fpr[np.argmax(tps >= k)])  # first (highest) threshold with TPR >= k / P


@given(data=ranked(), tpr=st.sampled_from([0.95, 1.0, 0.5, 0.7, 0.1, 0.01]))
def test_fpr_at_tpr_matches_sklearn_roc_curve_and_loop(
    data: tuple[Tensor, Tensor], tpr: float
) -> None:
    s, pos = data
    ours = float(fpr_at_tpr(s, pos, tpr=tpr))
    assert ours == pytest.approx(_sklearn_fpr(s, pos, tpr), abs=1e-12)
    assert ours == pytest.approx(fpr_at_tpr_ref(s, pos, tpr), abs=1e-12)


@given(data=ranked(), rates=st.lists(st.floats(0.01, 1.0), min_size=2, max_size=5))
def test_fpr_at_tpr_monotone_in_tpr(data: tuple[Tensor, Tensor], rates: list[float]) -> None:
    s, pos = data
    values = [float(fpr_at_tpr(s, pos, tpr=r)) for r in sorted(rates)]
    assert values == sorted(values)
    assert all(0.0 <= v <= 1.0 for v in values)


def test_fpr_at_tpr_hand_values() -> None:
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.85, 0.75, 0.1])
    known = torch.tensor([True, True, True, True, False, False, False])
    assert float(fpr_at_tpr(scores, known, tpr=0.75)) == pytest.approx(2 / 3)  # threshold 0.7
    assert float(fpr_at_tpr(scores, known, tpr=1.0)) == pytest.approx(2 / 3)  # threshold 0.6
    assert float(fpr_at_tpr(scores, known, tpr=0.25)) == pytest.approx(0.0)  # threshold 0.9
    assert float(fpr_at_tpr(scores, known, tpr=0.5)) == pytest.approx(1 / 3)  # threshold 0.8
    # a negative tied with the threshold counts as a false positive
    tied = torch.tensor([0.9, 0.8, 0.8, 0.1])
    assert float(fpr_at_tpr(tied, torch.tensor([True, True, False, False]), tpr=1.0)) == 0.5


def test_fpr_at_tpr_uses_the_decimal_tpr() -> None:
    """ceil(0.55 * 100) is 56 in floating point; the 55th best positive is meant."""
    assert math.ceil(0.55 * 100) == 56
    pos_scores = torch.arange(100, 0, -1, dtype=torch.float64)  # 100 .. 1; 55th best is 46
    s = torch.cat([pos_scores, torch.tensor([45.5, 46.0], dtype=torch.float64)])
    pos = torch.cat([torch.ones(100, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)])
    assert float(fpr_at_tpr(s, pos, tpr=0.55)) == 0.5  # only the 46.0 negative is >= 46
    assert float(fpr_at_tpr(s, pos, tpr=0.56)) == 1.0  # 56th best is 45


# ------------------------------------------------------------------------------- open set


def test_open_set_hand_values() -> None:
    z = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    y = torch.tensor([0, 0, 1, -1, 5])  # -1 and 5 (>= C) are both unknown
    s = torch.tensor([0.9, 0.9, 0.2, 0.8, 0.1])
    r = open_set(z, y, s, threshold=0.5)
    assert isinstance(r, OpenSetResult)
    torch.testing.assert_close(r.os_star, torch.tensor(0.25))  # class 0: 1/2, class 1: 0/1
    torch.testing.assert_close(r.unk, torch.tensor(0.5))
    torch.testing.assert_close(r.hos, torch.tensor(2 * 0.25 * 0.5 / 0.75))
    # a score equal to the threshold is accepted
    r = open_set(z, y, s, threshold=0.8)
    torch.testing.assert_close(r.unk, torch.tensor(0.5))


def test_open_set_averages_over_present_classes_and_extremes() -> None:
    z = torch.tensor([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([1, 1, 2, -1])  # class 0 absent: averaged over classes 1 and 2
    s = torch.tensor([1.0, 1.0, 1.0, 0.0])
    r = open_set(z, y, s, threshold=0.5)
    torch.testing.assert_close(r.os_star, torch.tensor(0.5))
    torch.testing.assert_close(r.unk, torch.tensor(1.0))
    accept_all = open_set(z, y, s, threshold=float("-inf"))
    torch.testing.assert_close(accept_all.unk, torch.tensor(0.0))
    torch.testing.assert_close(accept_all.hos, torch.tensor(0.0))
    reject_all = open_set(z, y, s, threshold=float("inf"))
    torch.testing.assert_close(
        reject_all, OpenSetResult(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.0))
    )
    # OS* = UNK = 0: HOS is 0, not NaN
    wrong = torch.tensor([[9.0, 0.0], [0.0, 1.0]])
    both_zero = open_set(wrong, torch.tensor([1, -1]), torch.zeros(2), threshold=0.0)
    torch.testing.assert_close(both_zero, OpenSetResult(*(torch.tensor(0.0),) * 3))


@given(
    data=labelled(rounded=True),
    seed=st.integers(0, 2**16),
    pick=st.integers(0, 100),
)
def test_open_set_matches_reference(data: tuple[Tensor, Tensor], seed: int, pick: int) -> None:
    z, y = data
    g = torch.Generator().manual_seed(seed)
    b, c = z.shape
    y = y.clone()
    y[torch.rand(b, generator=g) < 0.4] = -1
    y[0] = c + 2  # at least one unknown (outside [0, C) on the high side)
    y = torch.cat([y, torch.tensor([0])])  # at least one known
    z = torch.cat([z, torch.zeros(1, c, dtype=z.dtype)])
    s = torch.round(torch.rand(b + 1, generator=g, dtype=torch.float64) * 10) / 10
    threshold = float(s[pick % (b + 1)])  # a threshold equal to some scores: ties
    got = open_set(z, y, s, threshold=threshold)
    want = open_set_ref(z, y, s, threshold)
    for a, w in zip(got, want):
        assert float(a) == pytest.approx(w, abs=1e-12)
        assert 0.0 <= float(a) <= 1.0


def test_open_set_threshold_may_be_a_tensor() -> None:
    z, y, s = torch.randn(6, 3), torch.tensor([0, 1, 2, -1, -1, 1]), torch.rand(6)
    assert open_set(z, y, s, threshold=torch.tensor(0.5)) == open_set(z, y, s, threshold=0.5)


def test_harmonic_mean() -> None:
    f64 = torch.float64
    torch.testing.assert_close(
        harmonic_mean(0.8, 0.6), torch.tensor(2 * 0.8 * 0.6 / 1.4, dtype=f64)
    )
    torch.testing.assert_close(harmonic_mean(0.0, 0.0), torch.tensor(0.0, dtype=f64))
    torch.testing.assert_close(harmonic_mean(0.0, 0.7), torch.tensor(0.0, dtype=f64))
    a = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)
    got = harmonic_mean(a, torch.tensor([0.5, 0.0, 0.25], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([0.5, 0.0, 0.4], dtype=torch.float64))
    torch.testing.assert_close(harmonic_mean(70, 80), torch.tensor(2 * 70 * 80 / 150, dtype=f64))


@given(a=st.floats(0, 1), b=st.floats(0, 1))
def test_harmonic_mean_properties(a: float, b: float) -> None:
    h = float(harmonic_mean(a, b))
    assert h == pytest.approx(float(harmonic_mean(b, a)))
    assert min(a, b) - 1e-6 <= h <= (a + b) / 2 + 1e-6  # min <= H <= arithmetic mean


def test_harmonic_mean_huge_and_infinite_inputs() -> None:
    """2ab overflows float32 from a, b ~ 1.3e19; the value itself is representable."""
    big = torch.tensor([1e38, 3e38, 3.4e38, 1e30], dtype=torch.float32)
    other = torch.tensor([1e38, 1e38, 3.4e38, 1e-30], dtype=torch.float32)
    got = harmonic_mean(big, other)
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    want = [harmonic_mean_ref(float(x), float(w)) for x, w in zip(big, other)]
    torch.testing.assert_close(
        got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0
    )
    inf = float("inf")
    assert float(harmonic_mean(inf, 3.0)) == 6.0  # the limit 2b
    assert float(harmonic_mean(3.0, torch.tensor(inf))) == 6.0
    assert float(harmonic_mean(inf, inf)) == inf
    assert float(harmonic_mean(0.0, inf)) == 0.0
    assert float(harmonic_mean(np.float32(0.8), np.float64(0.6))) == pytest.approx(2 * 0.48 / 1.4)
    huge64 = harmonic_mean(torch.tensor(1e308, dtype=torch.float64), 1e308)
    assert huge64.dtype == torch.float64 and float(huge64) == pytest.approx(1e308, rel=1e-15)
    # Python numbers are doubles: two of them give float64; with a tensor, the tensor's dtype
    assert harmonic_mean(1e308, 1e308).dtype == torch.float64
    assert float(harmonic_mean(1e308, 1e308)) == pytest.approx(1e308, rel=1e-15)
    assert harmonic_mean(torch.tensor(0.5), 0.25).dtype == torch.float32


@given(
    a=st.floats(0, 3.3999999521443642e38, allow_subnormal=False, width=32),
    b=st.floats(0, 3.3999999521443642e38, allow_subnormal=False, width=32),
)
def test_harmonic_mean_matches_exact_arithmetic_over_float32_range(a: float, b: float) -> None:
    got = harmonic_mean(torch.tensor(a), torch.tensor(b))
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(harmonic_mean_ref(a, b), rel=1e-6, abs=1e-37)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
def test_every_integer_label_dtype(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    z = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    for fn in CLOSED:
        assert fn(z, y.to(dtype)) == fn(z, y)
    if dtype != torch.uint8:  # -1 needs a signed dtype
        mixed = torch.where(torch.arange(20) % 3 == 0, -1, y)
        s = torch.rand(20, generator=g)
        assert open_set(z, mixed.to(dtype), s, threshold=0.5) == open_set(
            z, mixed, s, threshold=0.5
        )


def test_nan_logits_are_refused_not_counted() -> None:
    """torch.argmax treats NaN as the maximum: row [NaN, 5] with label 0 would count correct."""
    z = torch.tensor([[float("nan"), 5.0], [3.0, 0.0]])
    assert int(z.argmax(-1)[0]) == 0
    for fn in CLOSED:
        with pytest.raises(ValueError, match=rf"{fn.__name__}: logits must have a finite maximum"):
            fn(z, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"open_set: logits must have a finite maximum"):
        open_set(z, torch.tensor([0, -1]), torch.rand(2), threshold=0.5)
    # a masked class (-inf) is fine; a label on a masked class has probability 0
    masked = torch.tensor([[float("-inf"), 5.0], [3.0, float("-inf")]])
    assert float(accuracy(masked, torch.tensor([1, 0]))) == 1.0
    assert float(nll(masked, torch.tensor([1, 0]))) == 0.0
    assert float(nll(masked, torch.tensor([0, 0]))) == math.inf  # the true value
    assert float(ece(masked, torch.tensor([1, 0]))) == 0.0


def test_extreme_but_accepted_logits_and_confidences() -> None:
    big = 3e38  # near float32's maximum: softmax must not overflow
    z = torch.tensor([[big, -big], [-big, big], [0.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    assert float(accuracy(z, y)) == pytest.approx(1 / 3)
    # confidences 1, 1, 0.5, only the first right: |1/3 - 2.5/3| = 1/2 with one bin
    assert float(ece(z, y, num_bins=1)) == pytest.approx(1 / 2)
    assert float(ece(z, y)) == pytest.approx(ece_ref(z, y), abs=1e-7)
    assert float(nll(z[2:], y[2:])) == pytest.approx(math.log(2))
    # many classes: confidence 1/C, tiny but positive, lands in the first bin (both wrong)
    wide = torch.zeros(2, 200_000)
    assert float(ece(wide, torch.tensor([1, 1]), num_bins=15)) == pytest.approx(1 / 200_000)
    # a confidence a hair above a bin edge and one exactly on it (float64)
    edge = t64([[0.0, 0.0], [0.0, -1e-15]])
    assert float(ece(edge, torch.tensor([0, 0]), num_bins=2)) == pytest.approx(
        ece_ref(edge, torch.tensor([0, 0]), 2), abs=1e-15
    )


# ------------------------------------------------------------------------ dtypes and purity


def test_dtypes() -> None:
    z, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    s, pos = torch.randn(8, dtype=torch.float64), torch.arange(8) % 2 == 0
    for fn in CLOSED:
        assert fn(z, y).dtype == torch.float64
        assert fn(z.float(), y).dtype == torch.float32
        assert fn(z.bfloat16(), y).dtype == torch.float32
        torch.testing.assert_close(fn(z.bfloat16(), y), fn(z.bfloat16().float(), y))
    for rank in (auroc, fpr_at_tpr):
        assert rank(s, pos).dtype == torch.float64
        assert rank(s.bfloat16(), pos).dtype == torch.float32
    r = open_set(z, torch.where(pos, y, -1), s.float(), threshold=0.0)
    assert r.os_star.dtype == r.unk.dtype == r.hos.dtype == torch.float64


def test_metrics_do_not_mutate_inputs_and_ignore_autograd() -> None:
    z = torch.randn(8, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, -1, -1, 1, 2])
    s = torch.randn(8, requires_grad=True)
    pos = y >= 0
    copies = [t.detach().clone() for t in (z, y, s, pos)]
    known = y >= 0
    outs = [fn(z[known], y[known]) for fn in CLOSED]
    outs += [auroc(s, pos), fpr_at_tpr(s, pos), *open_set(z, y, s, threshold=0.0)]
    assert not any(o.requires_grad for o in outs)
    for a, b in zip((z, y, s, pos), copies):
        assert torch.equal(a.detach(), b)


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("fn", CLOSED, ids=lambda f: f.__name__)
def test_closed_set_errors(fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    name = fn.__name__
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    with pytest.raises(TypeError, match=rf"{name}: labels must be an integer tensor"):
        fn(z, y.float())
    with pytest.raises(TypeError, match=rf"{name}: logits must be a floating-point tensor"):
        fn(z.long(), y)
    with pytest.raises(ValueError, match=rf"{name}: logits must have 2 dimension"):
        fn(z[0], y)
    with pytest.raises(ValueError, match=rf"{name}: labels must have length 4"):
        fn(z, y[:3])
    with pytest.raises(ValueError, match=rf"{name}: logits must have shape \[batch, classes\]"):
        fn(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    for bad in (-1, 3):
        with pytest.raises(ValueError, match=rf"{name}: labels must be known classes in \[0, 3\)"):
            fn(z, torch.tensor([0, bad, 2, 1]))


def test_ece_num_bins_errors() -> None:
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"ece: num_bins must be an int >= 1, got 0"):
        ece(z, y, num_bins=0)
    with pytest.raises(TypeError, match=r"ece: num_bins must be an int, got 2.0"):
        ece(z, y, num_bins=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ece(z, y, 15)  # type: ignore[misc]


@pytest.mark.parametrize("fn", [auroc, fpr_at_tpr], ids=lambda f: f.__name__)
def test_ranking_errors(fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    name = fn.__name__
    s, pos = torch.rand(4), torch.tensor([True, False, True, False])
    with pytest.raises(
        ValueError,
        match=rf"{name}: is_positive must contain at least one positive and one negative sample, got 0 positive",
    ):
        fn(s, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(
        ValueError,
        match=rf"{name}: is_positive must contain at least one positive and one negative sample, got 4 positive\(s\) and 0",
    ):
        fn(s, torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match=rf"{name}: is_positive must be a bool tensor"):
        fn(s, pos.float())
    with pytest.raises(ValueError, match=rf"{name}: is_positive must contain only 0 and 1"):
        fn(s, torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match=rf"{name}: is_positive must have the shape of scores"):
        fn(s, pos[:3])
    with pytest.raises(ValueError, match=rf"{name}: scores must have 1 dimension"):
        fn(s[None], pos[None])
    with pytest.raises(TypeError, match=rf"{name}: scores must be a floating-point tensor"):
        fn(torch.arange(4), pos)
    with pytest.raises(ValueError, match=rf"{name}: scores must not contain NaN"):
        fn(torch.tensor([0.1, float("nan"), 0.2, 0.3]), pos)


def test_fpr_at_tpr_tpr_errors() -> None:
    s, pos = torch.rand(4), torch.tensor([True, False, True, False])
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"fpr_at_tpr: tpr must be in \(0.0, 1.0\]"):
            fpr_at_tpr(s, pos, tpr=bad)
    with pytest.raises(ValueError, match=r"fpr_at_tpr: tpr must not be NaN"):
        fpr_at_tpr(s, pos, tpr=float("nan"))
    with pytest.raises(TypeError, match=r"fpr_at_tpr: tpr must be a real number"):
        fpr_at_tpr(s, pos, tpr="0.95")  # type: ignore[arg-type]


def test_open_set_errors() -> None:
    z, y, s = torch.randn(4, 3), torch.tensor([0, 1, -1, 2]), torch.rand(4)
    with pytest.raises(ValueError, match=r"open_set: threshold must not be NaN"):
        open_set(z, y, s, threshold=float("nan"))
    with pytest.raises(ValueError, match=r"open_set: threshold must not be NaN"):
        open_set(z, y, s, threshold=torch.tensor(float("nan")))
    with pytest.raises(TypeError, match=r"open_set: threshold must be a real number or a 0-d"):
        open_set(z, y, s, threshold=torch.tensor([0.5]))
    with pytest.raises(TypeError, match=r"open_set: threshold must be a real number"):
        open_set(z, y, s, threshold=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"open_set: scores must have length 4"):
        open_set(z, y, s[:3], threshold=0.5)
    with pytest.raises(ValueError, match=r"open_set: scores must not contain NaN"):
        open_set(z, y, torch.tensor([0.1, 0.2, float("nan"), 0.3]), threshold=0.5)
    with pytest.raises(TypeError, match=r"open_set: labels must be an integer tensor"):
        open_set(z, y.float(), s, threshold=0.5)
    with pytest.raises(ValueError, match=r"open_set: labels must have length 4"):
        open_set(z, y[:2], s, threshold=0.5)
    with pytest.raises(
        ValueError,
        match=r"open_set: labels must contain known-class samples .* got 4 known and 0 unknown",
    ):
        open_set(z, torch.tensor([0, 1, 2, 0]), s, threshold=0.5)
    with pytest.raises(
        ValueError, match=r"open_set: labels must contain .* got 0 known and 4 unknown"
    ):
        open_set(z, torch.tensor([-1, 3, -1, 7]), s, threshold=0.5)
    with pytest.raises(TypeError):
        open_set(z, y, s, 0.5)  # type: ignore[misc]


def test_harmonic_mean_errors() -> None:
    with pytest.raises(ValueError, match=r"harmonic_mean: a must be in \[0.0, inf\), got -0.1"):
        harmonic_mean(-0.1, 0.5)
    with pytest.raises(ValueError, match=r"harmonic_mean: b must not be NaN"):
        harmonic_mean(0.5, float("nan"))
    with pytest.raises(ValueError, match=r"harmonic_mean: b must not contain NaN"):
        harmonic_mean(0.5, torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match=r"harmonic_mean: a must be >= 0 everywhere"):
        harmonic_mean(torch.tensor([0.5, -1.0]), 0.5)
    with pytest.raises(TypeError, match=r"harmonic_mean: a must be a real number or a floating"):
        harmonic_mean(torch.tensor([1, 2]), 0.5)
    with pytest.raises(TypeError, match=r"harmonic_mean: b must be a real number"):
        harmonic_mean(0.5, "0.5")  # type: ignore[arg-type]


def test_public_names() -> None:
    assert set(metrics.__all__) >= {
        "accuracy",
        "nll",
        "ece",
        "auroc",
        "fpr_at_tpr",
        "open_set",
        "harmonic_mean",
        "Evaluation",
        "energy_gap",
        "macro_f1",
        "per_class_accuracy",
        "worst_group_accuracy",
        "aupr_in",
        "aupr_out",
    }
