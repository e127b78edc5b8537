"""The standard suites' metrics: macro-F1, per-class accuracy, worst-group accuracy, AUPR-in/out.

Hand values, equality with scikit-learn where it computes the same thing, naive references from
the definitions (tests/reference/metrics_ref.py), and hypothesis properties. Error paths are in
the table of tests/test_metrics_errors.py.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference.metrics_ref import (
    average_precision_ref,
    macro_f1_ref,
    per_class_accuracy_ref,
    worst_group_accuracy_ref,
)
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score
from strategies import logits
from torch import Tensor

from robustft.metrics import (
    accuracy,
    aupr_in,
    aupr_out,
    auroc,
    macro_f1,
    per_class_accuracy,
    worst_group_accuracy,
)


@st.composite
def classified(
    draw: st.DrawFn, *, max_batch: int = 16, max_classes: int = 6, rounded: bool = False
) -> tuple[Tensor, Tensor]:
    """Float64 logits [B, C] and known labels drawn from a random subset of the classes (so some
    classes are absent from the labels, and some predictions name classes no label has)."""
    z = draw(logits(max_batch=max_batch, max_classes=max_classes, dtype=torch.float64))
    if rounded:  # argmax ties: to the lowest index
        z = torch.round(z / 4)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    present = torch.randperm(z.shape[1], generator=g)[: draw(st.integers(1, z.shape[1]))]
    y = present[torch.randint(0, len(present), (z.shape[0],), generator=g)]
    return z, y


@st.composite
def ranked(draw: st.DrawFn, *, max_size: int = 30) -> tuple[Tensor, Tensor]:
    """Float64 scores with many ties (one decimal) and both known and unknown samples."""
    n = draw(st.integers(2, max_size))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    s = torch.round(torch.randn(n, generator=g, dtype=torch.float64) * 10) / 10
    known = torch.rand(n, generator=g) < draw(st.floats(0.1, 0.9))
    known[0], known[1] = True, False
    return s, known


def _np(t: Tensor) -> np.ndarray:
    return t.numpy()


# --------------------------------------------------------------------------- hand-computed


def test_macro_f1_hand_values() -> None:
    z = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    # predictions 0, 1, 1. labels 0, 1, 0: class 0 TP 1 FN 1 -> 2/3; class 1 TP 1 FP 1 -> 2/3;
    # classes 2 and 3 are in neither labels nor predictions: left out (not counted as 0)
    assert float(macro_f1(z, torch.tensor([0, 1, 0]))) == pytest.approx(2 / 3)
    # labels 2, 1, 1: class 0 predicted only (F1 0), class 1 F1 1, class 2 labelled only (F1 0)
    y = torch.tensor([2, 1, 1])
    assert float(macro_f1(z, y)) == pytest.approx(1 / 3)
    assert float(macro_f1(z, y, average_over="labels")) == pytest.approx(1 / 2)  # classes 1, 2
    perfect = torch.eye(4)[torch.tensor([3, 3, 0])]
    assert float(macro_f1(perfect, torch.tensor([3, 3, 0]))) == 1.0
    assert float(macro_f1(torch.tensor([[1.0, 1.0]]), torch.tensor([1]))) == 0.0  # tie -> class 0


def test_per_class_accuracy_hand_values() -> None:
    z = torch.tensor([[2.0, 0.0, 0.0]] * 4 + [[0.0, 0.0, 2.0]])
    y = torch.tensor([0, 0, 0, 1, 1])
    # class 0: 3/3, class 1: 0/2; class 2 has no samples (only a prediction): left out
    assert float(per_class_accuracy(z, y)) == pytest.approx(0.5)
    assert float(accuracy(z, y)) == pytest.approx(0.6)  # the frequent class dominates accuracy


def test_worst_group_accuracy_hand_values() -> None:
    z = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 1, 1, 0, 1])
    groups = torch.tensor([-3, -3, 40, 40, 7])  # any integer ids, not contiguous
    # group -3: 2/2, group 40: 1/2, group 7: 1/1
    assert float(worst_group_accuracy(z, y, groups=groups)) == pytest.approx(0.5)
    one = worst_group_accuracy(z, y, groups=torch.zeros(5, dtype=torch.long))
    assert float(one) == pytest.approx(0.8)  # one group: the accuracy


def test_aupr_hand_values_with_ties() -> None:
    s = torch.tensor([0.5, 0.5, 0.2], dtype=torch.float64)
    known = torch.tensor([True, False, True])
    # thresholds 0.5 (1 of 2 known, half the recall), 0.2 (2 of 3): (1/2 + 2/3) / 2
    assert float(aupr_in(s, known)) == pytest.approx((1 / 2 + 2 / 3) / 2, abs=1e-15)
    # ranked by -s: -0.2 (known) first, then -0.5, where the unknown ties a known -> 1/3
    assert float(aupr_out(s, known)) == pytest.approx(1 / 3, abs=1e-15)
    separated = torch.tensor([3.0, float("inf"), -1.0, float("-inf")])
    k = torch.tensor([True, True, False, False])
    assert float(aupr_in(separated, k)) == 1.0 and float(aupr_out(separated, k)) == 1.0
    reversed_ = torch.tensor([0.1, 0.2, 0.9])  # the unknown sample scores highest
    k = torch.tensor([True, True, False])
    assert float(aupr_in(reversed_, k)) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert float(aupr_out(reversed_, k)) == pytest.approx(1 / 3)


def test_aupr_integer_mask_equals_bool_mask() -> None:
    s = torch.tensor([0.9, 0.3, 0.5, 0.1])
    k = torch.tensor([True, False, True, False])
    for fn in (aupr_in, aupr_out):
        assert torch.equal(fn(s, k.to(torch.uint8)), fn(s, k))
        assert torch.equal(fn(s, k.long()), fn(s, k))


# --------------------------------------------------------------------------- scikit-learn


@given(data=classified())
def test_macro_f1_equals_sklearn_and_reference(data: tuple[Tensor, Tensor]) -> None:
    z, y = data
    pred = z.argmax(-1)
    ours = float(macro_f1(z, y))
    assert ours == pytest.approx(f1_score(_np(y), _np(pred), average="macro"), abs=1e-12)
    assert ours == pytest.approx(macro_f1_ref(z, y), abs=1e-12)
    wilds = float(macro_f1(z, y, average_over="labels"))
    want = f1_score(_np(y), _np(pred), average="macro", labels=np.unique(_np(y)), zero_division=0)
    assert wilds == pytest.approx(want, abs=1e-12)
    assert wilds == pytest.approx(macro_f1_ref(z, y, "labels"), abs=1e-12)


@given(data=classified(rounded=True))
def test_macro_f1_and_pacc_with_argmax_ties(data: tuple[Tensor, Tensor]) -> None:
    z, y = data
    pred = z.argmax(-1)  # torch and the reference both take the lowest index
    assert float(macro_f1(z, y)) == pytest.approx(f1_score(_np(y), _np(pred), average="macro"))
    assert float(per_class_accuracy(z, y)) == pytest.approx(per_class_accuracy_ref(z, y))


@given(data=classified())
def test_per_class_accuracy_equals_balanced_accuracy(data: tuple[Tensor, Tensor]) -> None:
    z, y = data
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": same value
        warnings.simplefilter("ignore", UserWarning)
        want = balanced_accuracy_score(_np(y), _np(z.argmax(-1)))
    assert float(per_class_accuracy(z, y)) == pytest.approx(want, abs=1e-12)
    assert float(per_class_accuracy(z, y)) == pytest.approx(per_class_accuracy_ref(z, y))


@given(data=classified(), seed=st.integers(0, 2**16), groups=st.integers(1, 5))
def test_worst_group_accuracy_matches_reference(
    data: tuple[Tensor, Tensor], seed: int, groups: int
) -> None:
    z, y = data
    g = torch.randint(-groups, groups, (len(y),), generator=torch.Generator().manual_seed(seed))
    got = float(worst_group_accuracy(z, y, groups=g))
    assert got == pytest.approx(worst_group_accuracy_ref(z, y, g), abs=1e-12)
    assert got <= float(accuracy(z, y)) + 1e-12  # the minimum of the groups' accuracies
    one = float(worst_group_accuracy(z, y, groups=torch.zeros_like(y)))
    assert one == pytest.approx(float(accuracy(z, y)), abs=1e-15)
    # with the classes as groups: the lowest per-class recall, below their mean (PACC)
    assert float(worst_group_accuracy(z, y, groups=y)) <= float(per_class_accuracy(z, y)) + 1e-12


@given(data=ranked())
def test_aupr_equals_sklearn_average_precision_and_reference(data: tuple[Tensor, Tensor]) -> None:
    s, known = data
    pr_in, pr_out = float(aupr_in(s, known)), float(aupr_out(s, known))
    assert pr_in == pytest.approx(average_precision_score(_np(known), _np(s)), abs=1e-12)
    assert pr_out == pytest.approx(average_precision_score(_np(~known), _np(-s)), abs=1e-12)
    assert pr_in == pytest.approx(average_precision_ref(s, known), abs=1e-12)
    assert pr_out == pytest.approx(average_precision_ref(-s, ~known), abs=1e-12)


# --------------------------------------------------------------------------- properties


@given(data=classified(), seed=st.integers(0, 2**16))
def test_perfect_predictions_score_one(data: tuple[Tensor, Tensor], seed: int) -> None:
    _, y = data
    classes = int(y.max()) + 1
    z = torch.nn.functional.one_hot(y, classes).double() * 5
    g = torch.randint(0, 3, (len(y),), generator=torch.Generator().manual_seed(seed))
    for over in ("union", "labels"):
        assert float(macro_f1(z, y, average_over=over)) == 1.0
    assert float(per_class_accuracy(z, y)) == 1.0
    assert float(worst_group_accuracy(z, y, groups=g)) == 1.0


@given(data=classified(), seed=st.integers(0, 2**16))
def test_invariant_to_sample_order_and_class_relabelling(
    data: tuple[Tensor, Tensor], seed: int
) -> None:
    z, y = data
    gen = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, 3, (len(y),), generator=gen)
    rows = torch.randperm(len(y), generator=gen)
    cols = torch.randperm(z.shape[1], generator=gen)  # class c is renamed inverse[c]
    inverse = torch.argsort(cols)
    for fn in (macro_f1, per_class_accuracy):
        want = float(fn(z, y))
        assert float(fn(z[rows], y[rows])) == pytest.approx(want, abs=1e-12)
        assert float(fn(z[:, cols], inverse[y])) == pytest.approx(want, abs=1e-12)
    want = float(worst_group_accuracy(z, y, groups=groups))
    assert float(worst_group_accuracy(z[rows], y[rows], groups=groups[rows])) == want
    assert float(worst_group_accuracy(z, y, groups=groups * 7 - 100)) == want  # ids are names


@given(data=classified(max_batch=8, max_classes=4), repeat=st.integers(1, 3))
def test_pacc_equals_accuracy_on_balanced_labels(data: tuple[Tensor, Tensor], repeat: int) -> None:
    z, _ = data
    classes = z.shape[1]
    y = torch.arange(classes).repeat(repeat)  # every class equally often
    zz = z[torch.arange(len(y)) % len(z)]
    assert float(per_class_accuracy(zz, y)) == pytest.approx(float(accuracy(zz, y)), abs=1e-12)


@given(data=ranked(), seed=st.integers(0, 2**16))
def test_aupr_properties(data: tuple[Tensor, Tensor], seed: int) -> None:
    s, known = data
    pr_in, pr_out = aupr_in(s, known), aupr_out(s, known)
    assert 0.0 < float(pr_in) <= 1.0 and 0.0 < float(pr_out) <= 1.0
    # the sign convention: AUPR-out is AUPR-in of the negated score with the roles swapped
    assert torch.equal(pr_out, aupr_in(-s, ~known))
    assert torch.equal(pr_in, aupr_out(-s, ~known))
    # only the order matters: a strictly increasing map changes nothing; order of samples neither
    assert float(aupr_in(2 * s + 1, known)) == pytest.approx(float(pr_in), abs=1e-15)
    assert float(aupr_out(torch.exp(s), known)) == pytest.approx(float(pr_out), abs=1e-15)
    perm = torch.randperm(len(s), generator=torch.Generator().manual_seed(seed))
    assert float(aupr_in(s[perm], known[perm])) == pytest.approx(float(pr_in), abs=1e-15)
    # a perfect score (known above every unknown) gives 1 for both; AUROC agrees
    perfect = torch.where(known, s + 100, s - 100)
    assert float(aupr_in(perfect, known)) == 1.0 == float(aupr_out(perfect, known))
    assert float(auroc(perfect, known)) == 1.0


def test_aupr_random_scores_near_the_positive_share() -> None:
    """The baseline of AP is the positives' share, unlike AUROC's 1/2: the sets' mix matters."""
    g = torch.Generator().manual_seed(0)
    known = torch.rand(20_000, generator=g) < 0.8
    s = torch.rand(20_000, generator=g, dtype=torch.float64)
    share = float(known.double().mean())
    assert float(aupr_in(s, known)) == pytest.approx(share, abs=0.01)
    assert float(aupr_out(s, known)) == pytest.approx(1 - share, abs=0.01)
    assert float(auroc(s, known)) == pytest.approx(0.5, abs=0.02)


# --------------------------------------------------------------------------- dtypes and inputs


def test_dtypes() -> None:
    z = torch.randn(12, 3)
    y = torch.tensor([0, 1, 2] * 4)
    g = torch.tensor([0, 1] * 6)
    s, known = torch.randn(12), torch.tensor([True, False] * 6)
    for dtype, want in (
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ):
        assert macro_f1(z.to(dtype), y).dtype == want
        assert per_class_accuracy(z.to(dtype), y).dtype == want
        assert worst_group_accuracy(z.to(dtype), y, groups=g).dtype == want
        assert aupr_in(s.to(dtype), known).dtype == want
        assert aupr_out(s.to(dtype), known).dtype == want
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert macro_f1(z, y).dtype == torch.float32
        assert aupr_out(s, known).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
def test_every_integer_label_and_group_dtype(dtype: torch.dtype) -> None:
    z = torch.randn(10, 4, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3, 1, 1, 0, 2, 3, 3])
    g = torch.tensor([5, 5, 6, 6, 6, 7, 7, 7, 7, 5])
    assert torch.equal(macro_f1(z, y.to(dtype)), macro_f1(z, y))
    assert torch.equal(per_class_accuracy(z, y.to(dtype)), per_class_accuracy(z, y))
    got = worst_group_accuracy(z, y.to(dtype), groups=g.to(dtype))
    assert torch.equal(got, worst_group_accuracy(z, y, groups=g))


def test_inputs_untouched_and_no_graph() -> None:
    z = torch.randn(6, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    g = torch.tensor([1, 1, 2, 2, 3, 3])
    s = torch.randn(6, requires_grad=True)
    known = torch.tensor([True, False, True, False, True, True])
    before = [t.detach().clone() for t in (z, y, g, s, known)]
    outs = [
        macro_f1(z, y),
        per_class_accuracy(z, y),
        worst_group_accuracy(z, y, groups=g),
        aupr_in(s, known),
        aupr_out(s, known),
    ]
    assert not any(o.requires_grad for o in outs)
    for a, b in zip(before, (z, y, g, s, known)):
        assert torch.equal(a, b.detach())


def test_large_exact_counts() -> None:
    """Counts are exact integers: 1M samples give the value of the repeating 21-sample pattern."""
    n = 21 * 50_000
    y = torch.arange(n) % 3
    pred = torch.where(torch.arange(n) % 7 == 0, (y + 1) % 3, y)
    z = torch.nn.functional.one_hot(pred, 3).double()
    assert float(per_class_accuracy(z, y)) == pytest.approx(
        per_class_accuracy_ref(z[:21], y[:21]), abs=1e-12
    )
    assert float(macro_f1(z, y)) == pytest.approx(macro_f1_ref(z[:21], y[:21]), abs=1e-12)
