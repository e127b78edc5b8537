"""Multi-positive (labels), label-smoothed and margin contrastive losses: R-Adapter's MPM-NCE.

``clip_contrastive`` and ``sigmoid_contrastive`` with ``labels=``, ``smoothing=`` and ``margin=``:
hand values, the loop reference ``tests/reference/mpm_nce_ref.py``, the defaults and distinct
labels against today's loss, invariances (hypothesis), gradients, compile, bf16, and two gloo ranks
with uneven batches against one process on the concatenated batch.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _dist import run_distributed
from hypothesis import given, settings
from hypothesis import strategies as st
from reference.mpm_nce_ref import mpm_nce_ref, sigmoid_multi_positive_ref, soft_targets_ref
from strategies import features

from robustft.losses import clip_contrastive, sigmoid_contrastive
from robustft.losses._contrastive import _soft_targets

EYE2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
EYE3 = torch.eye(3, dtype=torch.float64)


def _lse(*values: float) -> float:
    return math.log(sum(math.exp(v) for v in values))


def _log_sigmoid(u: float) -> float:
    return -math.log1p(math.exp(-u))


def _batch(b: int, d: int = 3) -> st.SearchStrategy[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    return st.tuples(
        features(b, d), features(b, d), st.lists(st.integers(-2, 2), min_size=b, max_size=b)
    )


batches = st.integers(1, 6).flatmap(_batch)


# ---------------------------------------------------------------- hand values


def test_two_samples_of_one_class_share_the_target() -> None:
    # S = I (s = 1); both texts are positives of both images: target 1/2 each, no negative
    out = clip_contrastive(EYE2, EYE2, logit_scale=1.0, labels=torch.tensor([4, 4]))
    assert out.item() == pytest.approx(_lse(1.0, 0.0) - 0.5, rel=1e-12)
    # no negative in any row: the smoothing has nowhere to go, the margin nothing to shift
    same = clip_contrastive(
        EYE2, EYE2, logit_scale=1.0, labels=torch.tensor([4, 4]), smoothing=0.3, margin=0.7
    )
    assert same.item() == pytest.approx(out.item(), rel=1e-12)


def test_margin_on_the_negative_of_two_classes() -> None:
    # two classes: row logits [1, δ] (s = 1), target [1, 0]: CE = log(1 + e^{δ − 1})
    for delta in (0.0, 0.25, 2.0):
        out = clip_contrastive(
            EYE2, EYE2, logit_scale=1.0, labels=torch.tensor([0, 1]), margin=delta
        )
        assert out.item() == pytest.approx(math.log1p(math.exp(delta - 1.0)), rel=1e-12)
    # s scales the shifted cosine: S = s·(cos + δ) on the negative
    out = clip_contrastive(EYE2, EYE2, logit_scale=3.0, margin=0.5)
    assert out.item() == pytest.approx(math.log1p(math.exp(3.0 * 0.5 - 3.0)), rel=1e-12)


def test_three_samples_two_classes_smoothing_and_margin() -> None:
    eps, delta = 0.2, 0.3
    out = clip_contrastive(
        EYE3, EYE3, logit_scale=1.0, labels=torch.tensor([7, 7, 9]), smoothing=eps, margin=delta
    )
    # rows 0, 1: logits (1, 0, δ) up to order, targets 0.4 on the two positives, 0.2 on the negative
    lse01 = _lse(1.0, 0.0, delta)
    ce01 = -(0.4 * (1.0 - lse01) + 0.4 * (0.0 - lse01) + 0.2 * (delta - lse01))
    # row 2: logits (δ, δ, 1), target 0.8 on itself, 0.1 on each negative
    lse2 = _lse(delta, delta, 1.0)
    ce2 = -(0.8 * (1.0 - lse2) + 0.1 * (delta - lse2) + 0.1 * (delta - lse2))
    # S is symmetric here: both directions give the same three rows; L = (2 Σ CE) / (2·3)
    assert out.item() == pytest.approx((2 * ce01 + ce2) / 3, rel=1e-12)


def test_smoothing_without_labels_is_label_smoothing_over_the_columns() -> None:
    # B = 3, S = I: target 1 − ε on the matched column, ε/2 on the two others
    eps = 0.3
    out = clip_contrastive(EYE3, EYE3, logit_scale=1.0, smoothing=eps)
    lse = _lse(1.0, 0.0, 0.0)
    assert out.item() == pytest.approx(-((1 - eps) * (1.0 - lse) + eps * (0.0 - lse)), rel=1e-12)
    # and torch's own label smoothing with ε' = ε·B/(B − 1) spreads the same targets
    logits = EYE3 * 2.0
    ref = F.cross_entropy(logits, torch.arange(3), label_smoothing=eps * 3 / 2)
    out = clip_contrastive(EYE3, EYE3, logit_scale=2.0, smoothing=eps)
    torch.testing.assert_close(out, ref)


def test_sigmoid_hand_values() -> None:
    # one class: each image has two positive texts, at logits 1 − 0.5 and 0 − 0.5
    same = sigmoid_contrastive(
        EYE2, EYE2, logit_scale=1.0, logit_bias=-0.5, labels=torch.tensor([3, 3])
    )
    assert same.item() == pytest.approx(-_log_sigmoid(0.5) - _log_sigmoid(-0.5), rel=1e-12)
    # margin: the negative's logit is t·(0 + δ) + b
    out = sigmoid_contrastive(EYE2, EYE2, logit_scale=2.0, logit_bias=0.0, margin=0.5)
    assert out.item() == pytest.approx(-_log_sigmoid(2.0) - _log_sigmoid(-1.0), rel=1e-12)
    # smoothing: targets 0.9 / 0.1
    out = sigmoid_contrastive(EYE2, EYE2, logit_scale=2.0, logit_bias=-1.0, smoothing=0.1)
    pos = -(0.9 * _log_sigmoid(1.0) + 0.1 * _log_sigmoid(-1.0))
    neg = -(0.1 * _log_sigmoid(-1.0) + 0.9 * _log_sigmoid(1.0))
    assert out.item() == pytest.approx(pos + neg, rel=1e-12)


# ---------------------------------------------------------------- references


@settings(max_examples=40, deadline=None)
@given(batches, st.floats(0.5, 30.0), st.floats(0.0, 0.9), st.floats(0.0, 1.0), st.booleans())
def test_clip_equals_the_mpm_nce_loop_reference(
    batch: tuple[torch.Tensor, torch.Tensor, list[int]],
    s: float,
    eps: float,
    delta: float,
    use_labels: bool,
) -> None:
    f, g, ids = batch
    labels = torch.tensor(ids) if use_labels else None
    out = clip_contrastive(f, g, logit_scale=s, labels=labels, smoothing=eps, margin=delta)
    assert out.dtype == torch.float64
    want = mpm_nce_ref(f, g, s, labels, eps, delta)
    assert out.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    batches,
    st.floats(0.1, 30.0),
    st.floats(-15.0, 5.0),
    st.floats(0.0, 0.45),
    st.floats(0.0, 1.0),
    st.booleans(),
)
def test_sigmoid_equals_the_loop_reference(
    batch: tuple[torch.Tensor, torch.Tensor, list[int]],
    t: float,
    b: float,
    eps: float,
    delta: float,
    use_labels: bool,
) -> None:
    f, g, ids = batch
    labels = torch.tensor(ids) if use_labels else None
    out = sigmoid_contrastive(
        f, g, logit_scale=t, logit_bias=b, labels=labels, smoothing=eps, margin=delta
    )
    want = sigmoid_multi_positive_ref(f, g, t, b, labels, eps, delta)
    assert out.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


# ---------------------------------------------------------------- today's loss, symmetry


def _todays_clip(f: torch.Tensor, g: torch.Tensor, s: float) -> torch.Tensor:
    logits = (F.normalize(f, dim=-1) * s) @ F.normalize(g, dim=-1).T
    target = torch.arange(f.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _todays_sigmoid(f: torch.Tensor, g: torch.Tensor, t: float, b: float) -> torch.Tensor:
    logits = (F.normalize(f, dim=-1) * t) @ F.normalize(g, dim=-1).T + b
    eye = torch.eye(f.shape[0], dtype=torch.bool)
    return -F.logsigmoid(torch.where(eye, logits, -logits)).sum() / f.shape[0]


@settings(max_examples=25, deadline=None)
@given(batches, st.floats(0.5, 30.0), st.floats(-10.0, 2.0))
def test_defaults_are_bit_equal_and_distinct_labels_equal_todays_loss(
    batch: tuple[torch.Tensor, torch.Tensor, list[int]], s: float, b: float
) -> None:
    f, g, _ = batch
    distinct = torch.randperm(f.shape[0]) * 3 - 5  # all different, in any order
    today = _todays_clip(f, g, s)
    assert torch.equal(clip_contrastive(f, g, logit_scale=s), today)
    assert torch.equal(clip_contrastive(f, g, logit_scale=s, smoothing=0.0, margin=0.0), today)
    torch.testing.assert_close(clip_contrastive(f, g, logit_scale=s, labels=distinct), today)
    today_sig = _todays_sigmoid(f, g, s, b)
    assert torch.equal(sigmoid_contrastive(f, g, logit_scale=s, logit_bias=b), today_sig)
    torch.testing.assert_close(
        sigmoid_contrastive(f, g, logit_scale=s, logit_bias=b, labels=distinct), today_sig
    )


@settings(max_examples=25, deadline=None)
@given(batches, st.floats(0.5, 30.0), st.floats(0.0, 0.45), st.floats(0.0, 1.0))
def test_swapping_the_towers_gives_the_same_loss_with_labels(
    batch: tuple[torch.Tensor, torch.Tensor, list[int]], s: float, eps: float, delta: float
) -> None:
    # the positive structure [y_i = y_j] is symmetric, so S ↦ Sᵀ swaps the two directions
    f, g, ids = batch
    kw = {"labels": torch.tensor(ids), "smoothing": eps, "margin": delta}
    torch.testing.assert_close(
        clip_contrastive(f, g, logit_scale=s, **kw), clip_contrastive(g, f, logit_scale=s, **kw)
    )
    torch.testing.assert_close(
        sigmoid_contrastive(f, g, logit_scale=s, logit_bias=-2.0, **kw),
        sigmoid_contrastive(g, f, logit_scale=s, logit_bias=-2.0, **kw),
    )


# ---------------------------------------------------------------- invariances, targets


@settings(max_examples=30, deadline=None)
@given(batches, st.integers(0, 2**31 - 1), st.floats(0.0, 0.45), st.floats(0.0, 1.0))
def test_invariant_to_permuting_the_batch_and_relabelling_the_classes(
    batch: tuple[torch.Tensor, torch.Tensor, list[int]], seed: int, eps: float, delta: float
) -> None:
    f, g, ids = batch
    labels = torch.tensor(ids)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(f.shape[0], generator=gen)
    # a bijection of the class ids: a random permutation of the ids present, then an affine map
    present = torch.unique(labels)
    image = present[torch.randperm(present.shape[0], generator=gen)] * 11 - 40
    relabelled = image[torch.searchsorted(present, labels)]
    for loss in (
        lambda a, c, y: clip_contrastive(
            a, c, logit_scale=7.0, labels=y, smoothing=eps, margin=delta
        ),
        lambda a, c, y: sigmoid_contrastive(
            a, c, logit_scale=7.0, logit_bias=-3.0, labels=y, smoothing=eps, margin=delta
        ),
    ):
        base = loss(f, g, labels)
        torch.testing.assert_close(loss(f[perm], g[perm], labels[perm]), base)
        torch.testing.assert_close(loss(f, g, relabelled.to(torch.int32)), base)
        # a relabelling that merges two classes is not a bijection, and changes the loss
        if present.shape[0] >= 2:
            merged = torch.where(labels == present[1], present[0], labels)
            assert not torch.allclose(loss(f, g, merged), base)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 7).flatmap(lambda b: st.lists(st.integers(0, 3), min_size=b, max_size=b)),
    st.floats(0.0, 0.99),
)
def test_soft_targets_are_distributions_spreading_epsilon_over_the_negatives(
    ids: list[int], eps: float
) -> None:
    labels = torch.tensor(ids)
    positive = labels[:, None] == labels[None, :]
    target = _soft_targets(positive, eps, torch.float64)
    assert (target >= 0).all()
    torch.testing.assert_close(target.sum(1), torch.ones(len(ids), dtype=torch.float64))
    has_negative = (~positive).any(1)
    neg_mass = torch.where(positive, 0.0, target).sum(1)
    want = torch.where(has_negative, eps, 0.0).to(torch.float64)
    torch.testing.assert_close(neg_mass, want)
    expected = torch.tensor(soft_targets_ref(ids, len(ids), eps), dtype=torch.float64)
    torch.testing.assert_close(target, expected)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 7).flatmap(lambda b: st.lists(st.integers(0, 3), min_size=b, max_size=b)),
    st.floats(0.0, 0.99),
    st.floats(0.5, 50.0),
)
def test_uniform_logits_give_log_batch_so_the_targets_sum_to_one(
    ids: list[int], eps: float, s: float
) -> None:
    # equal features: every logit of a row is the same, the softmax is 1/B, and the loss is
    # log B · Σ_j ỹ_ij averaged over rows: log B exactly when every target row sums to 1
    b = len(ids)
    f = torch.ones(b, 4, dtype=torch.float64)
    out = clip_contrastive(f, 2 * f, logit_scale=s, labels=torch.tensor(ids), smoothing=eps)
    assert out.item() == pytest.approx(math.log(b), rel=1e-12, abs=1e-12)


def test_margin_raises_the_loss_without_smoothing() -> None:
    g = torch.Generator().manual_seed(3)
    f, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    values = [
        clip_contrastive(f, t, logit_scale=10.0, labels=labels, margin=d).item()
        for d in (0.0, 0.1, 0.3, 1.0)
    ]
    assert all(a < b for a, b in itertools.pairwise(values)), values


# ---------------------------------------------------------------- gradients, compile, dtypes


def test_gradcheck_with_labels_smoothing_margin_and_a_trained_scale() -> None:
    g = torch.Generator().manual_seed(2)
    f = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 0, 1, 2, 1])
    assert torch.autograd.gradcheck(
        lambda f, t, s: clip_contrastive(
            f, t, logit_scale=s, labels=labels, smoothing=0.1, margin=0.2
        ),
        (f, t, s),
    )
    assert torch.autograd.gradcheck(
        lambda f, t, s, b: sigmoid_contrastive(
            f, t, logit_scale=s, logit_bias=b, labels=labels, smoothing=0.1, margin=0.2
        ),
        (f, t, s, b),
    )


def test_torch_func_grad_equals_autograd() -> None:
    g = torch.Generator().manual_seed(4)
    f = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.randn(5, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2])
    kw = {"labels": labels, "smoothing": 0.2, "margin": 0.3}
    calls = (
        lambda x: clip_contrastive(x, t, logit_scale=5.0, **kw),
        lambda x: sigmoid_contrastive(x, t, logit_scale=5.0, logit_bias=-1.0, **kw),
    )
    for call in calls:
        x = f.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(call(x), x)
        torch.testing.assert_close(torch.func.grad(call)(f), want)


def test_compile_fullgraph_equals_eager_without_recompiling() -> None:
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(5)
    log_s = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-5.0, requires_grad=True)

    def clip_step(f: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return clip_contrastive(f, t, logit_scale=log_s.exp(), labels=y, smoothing=0.1, margin=0.2)

    def sig_step(f: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sigmoid_contrastive(
            f, t, logit_scale=log_s.exp(), logit_bias=bias, labels=y, smoothing=0.1, margin=0.2
        )

    for step in (clip_step, sig_step):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        for _ in range(3):
            f = torch.randn(6, 4, generator=g).requires_grad_(True)
            t = torch.randn(6, 4, generator=g)
            y = torch.randint(0, 3, (6,), generator=g)
            out = compiled(f, t, y)
            got = torch.autograd.grad(out, (f, log_s))
            f2 = f.detach().clone().requires_grad_(True)
            ref = step(f2, t, y)
            torch.testing.assert_close(out, ref)
            for a, b in zip(got, torch.autograd.grad(ref, (f2, log_s))):
                torch.testing.assert_close(a, b)
        assert counters["stats"]["unique_graphs"] == 1


def test_bf16_inputs_and_autocast_compute_in_float32() -> None:
    g = torch.Generator().manual_seed(6)
    f, t = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    labels = torch.tensor([0, 1, 0, 1, 1], dtype=torch.uint8)
    kw = {"labels": labels, "smoothing": 0.1, "margin": 0.25}
    calls = (
        lambda a, c: clip_contrastive(a, c, logit_scale=20.0, **kw),
        lambda a, c: sigmoid_contrastive(a, c, logit_scale=10.0, logit_bias=-4.0, **kw),
    )
    for call in calls:
        out16 = call(f.bfloat16(), t.bfloat16())
        assert out16.dtype == torch.float32
        torch.testing.assert_close(out16, call(f.bfloat16().float(), t.bfloat16().float()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = call(f, t)
        assert auto.dtype == torch.float32
        torch.testing.assert_close(auto, call(f, t))


def test_empty_batch_is_zero_with_zero_gradient() -> None:
    f = torch.zeros(0, 3, requires_grad=True)
    s = torch.tensor(10.0, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    kw = {"labels": labels, "smoothing": 0.1, "margin": 0.2}
    for out in (
        clip_contrastive(f, f, logit_scale=s, **kw),
        clip_contrastive(f, f, logit_scale=s, smoothing=0.1),
        sigmoid_contrastive(f, f, logit_scale=s, logit_bias=-1.0, **kw),
    ):
        assert out.item() == 0.0
        gf, gs = torch.autograd.grad(out, (f, s))
        assert gf.shape == (0, 3) and gs.item() == 0.0


def test_extreme_scale_stays_finite() -> None:
    f = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    for out in (
        clip_contrastive(
            f, f.detach().flip(0), logit_scale=1e4, labels=labels, smoothing=0.1, margin=0.5
        ),
        sigmoid_contrastive(
            f,
            -f.detach(),
            logit_scale=1e4,
            logit_bias=-1e4,
            labels=labels,
            smoothing=0.1,
            margin=0.5,
        ),
    ):
        (grad,) = torch.autograd.grad(out, f)
        assert torch.isfinite(out) and torch.isfinite(grad).all()


# ---------------------------------------------------------------- data parallelism (2 gloo ranks)

LABELS8 = [2, 0, 1, 0, 2, 2, 1, 0]  # every class on both ranks of the (3, 5) split


def _data(n: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(21)
    img = torch.randn(n, 5, generator=g, dtype=torch.float64)
    txt = torch.randn(n, 5, generator=g, dtype=torch.float64)
    proj_i, proj_t = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(2))
    return img, txt, proj_i, proj_t


def _leaves(proj_i: torch.Tensor, proj_t: torch.Tensor) -> list[torch.Tensor]:
    scalars = [torch.tensor(math.log(4.0), dtype=torch.float64), torch.tensor(-1.5).double()]
    return [p.clone().requires_grad_(True) for p in (proj_i, proj_t, *scalars)]


def _losses(img: torch.Tensor, txt: torch.Tensor, p: list[torch.Tensor], **kw: object) -> dict:
    f, t = img @ p[0], txt @ p[1]
    clip = clip_contrastive(f, t, logit_scale=p[2].exp(), **kw)
    sig = sigmoid_contrastive(f, t, logit_scale=p[2].exp(), logit_bias=p[3], **kw)
    return {"clip": clip, "sigmoid": sig}


def _check_ddp(rank: int, world_size: int, split: tuple[int, ...], kw: dict) -> dict:
    n = sum(split)
    img, txt, proj_i, proj_t = _data(n)
    labels = torch.tensor(LABELS8[:n], dtype=torch.int32)
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])
    use_labels = kw.pop("labels", False)
    values = {}
    for name in ("clip", "sigmoid"):
        ps = _leaves(proj_i, proj_t)
        single = _losses(img, txt, ps, labels=labels if use_labels else None, **kw)[name]
        single.backward()
        pd = _leaves(proj_i, proj_t)
        local_labels = labels[lo:hi] if use_labels else None
        loss = _losses(
            img[lo:hi], txt[lo:hi], pd, labels=local_labels, group=dist.group.WORLD, **kw
        )[name]
        loss.backward()  # every rank, an empty one included, reaches the backward's collectives
        torch.testing.assert_close(loss, single.detach(), atol=1e-12, rtol=1e-12)
        for p_ddp, p_single in zip(pd, ps):
            grad = p_ddp.grad if p_ddp.grad is not None else torch.zeros_like(p_ddp)
            g_avg = grad.clone()
            dist.all_reduce(g_avg)
            want = p_single.grad if p_single.grad is not None else torch.zeros_like(p_single)
            torch.testing.assert_close(g_avg / world_size, want, atol=1e-12, rtol=1e-10)
        # the local batch alone (no group) is another loss: the global positives mattered
        if 0 not in split:
            alone = _losses(
                img[lo:hi], txt[lo:hi], _leaves(proj_i, proj_t), labels=local_labels, **kw
            )[name]
            assert abs(alone.item() - single.item()) > 1e-3
        values[name] = loss.item()
    return values


def _ddp_body(rank: int, world_size: int) -> list[float]:
    settings_ = [
        {"labels": True, "smoothing": 0.2, "margin": 0.3},
        {"labels": True},
        {"labels": False, "smoothing": 0.1, "margin": 0.2},  # matched pairs via the rank offset
    ]
    out = []
    for split in ((3, 5), (0, 5)):  # uneven; a rank without samples
        for kw in settings_:
            values = _check_ddp(rank, world_size, split, dict(kw))
            out += [values["clip"], values["sigmoid"]]
    return out


@pytest.mark.distributed
def test_global_batch_positives_under_data_parallelism() -> None:
    results = run_distributed(_ddp_body, world_size=2, timeout=120)
    assert results[0] == pytest.approx(results[1], abs=1e-12)
