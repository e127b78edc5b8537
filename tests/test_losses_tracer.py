"""TRACER's distillation views: CRD, ICL, Cross KD (robustft.losses._relational), and FD by reuse.

Checked against a transcription of the authors' code (tests/reference/tracer_ref.py) to 1e-12 in
float64, against hand values, against robustft's own ``distillation`` / ``clip_contrastive`` /
``feature_distillation`` where a view reduces to them, and under torch.func, torch.compile,
half precision and two gloo ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import tracer_ref as ref
from strategies import features

from robustft import averaging
from robustft.losses import clip_contrastive, distillation, feature_distillation
from robustft.losses._relational import (
    contrastive_relational_distillation,
    cross_distillation,
    interaction_distillation,
)

CRD = contrastive_relational_distillation
ICL = interaction_distillation
XKD = cross_distillation
WITH_TEACHER_SCALE = (CRD, XKD)
ALL = (CRD, ICL, XKD)
IDS = ["crd", "icl", "cross"]


def _call(loss: Callable[..., torch.Tensor], f, g, f0, g0, s: Any = 100.0, t: Any = None, **kw):
    extra = {"teacher_logit_scale": t} if loss is not ICL else {}
    return loss(
        f, g, teacher_image_features=f0, teacher_text_features=g0, logit_scale=s, **extra, **kw
    )


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _four(b: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    return [_randn(b, d, seed=seed + k, dtype=dtype) for k in range(4)]


# ---------------------------------------------------------------- hand values


def _kl2(q_logits: list[float], p_logits: list[float]) -> float:
    q = torch.softmax(torch.tensor(q_logits, dtype=torch.float64), 0)
    p = torch.softmax(torch.tensor(p_logits, dtype=torch.float64), 0)
    return float((q * (q / p).log()).sum())


def test_hand_values() -> None:
    eye, flat = torch.eye(2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)
    # CRD: a structureless teacher (uniform rows) vs student softmax([1, 0]) in all 4 rows
    want = math.log1p(math.e) - 0.5 - math.log(2)  # KL(u ‖ softmax([1, 0]))
    assert CRD(
        eye, eye, teacher_image_features=flat, teacher_text_features=flat, logit_scale=1.0
    ).item() == pytest.approx(want, abs=1e-15)
    # CRD with two scales on orthonormal pairs: every row KL(softmax([t, 0]) ‖ softmax([s, 0]))
    for s, t in [(1.0, 3.0), (5.0, 2.0)]:
        got = _call(CRD, eye, eye, eye, eye, s, t).item()
        assert got == pytest.approx(_kl2([t, 0.0], [s, 0.0]), abs=1e-15)
    # ICL: identity pairs at scale s: -log softmax([s, 0])_0 = log(1 + e^{-s}) in every row
    for s in (1.0, 4.0):
        got = _call(ICL, eye, eye, eye, eye, s).item()
        assert got == pytest.approx(math.log1p(math.exp(-s)), abs=1e-15)
    # ICL with the teacher's texts swapped: the positive is the other column, log(1 + e^{s})
    got = _call(ICL, eye, eye, eye, eye.flip(0), 2.0).item()
    assert got == pytest.approx(0.5 * (math.log1p(math.exp(2.0)) + math.log1p(math.exp(-2.0))))
    # Cross KD: image rows agree; text rows: KL(softmax([1, 0]) ‖ uniform) each, over 2B = 4
    got = _call(XKD, eye, flat, eye, eye, 1.0).item()
    assert got == pytest.approx(_kl2([1.0, 0.0], [0.0, 0.0]) / 2, abs=1e-15)


# ---------------------------------------------------------------- the authors' code, exactly


@st.composite
def _step(draw: Any) -> tuple[list[torch.Tensor], float, float]:
    b, d = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    four = [draw(features(b, d)) for _ in range(4)]
    s = draw(st.floats(0.5, 100.0))
    t = draw(st.floats(0.5, 100.0))
    return four, s, t


@settings(max_examples=40, deadline=None)
@given(_step())
def test_values_and_gradients_equal_the_authors_code(case: Any) -> None:
    (f, g, f0, g0), s, t = case
    for ours_fn, ref_fn in [(CRD, ref.crd), (ICL, ref.icl), (XKD, ref.cross_kd)]:
        fa, ga = f.clone().requires_grad_(True), g.clone().requires_grad_(True)
        la = torch.tensor(math.log(s), dtype=torch.float64, requires_grad=True)
        ours = _call(ours_fn, fa, ga, f0, g0, la.exp(), torch.tensor(t, dtype=torch.float64))
        fb, gb = f.clone().requires_grad_(True), g.clone().requires_grad_(True)
        lb = torch.tensor(math.log(s), dtype=torch.float64, requires_grad=True)
        theirs = ref_fn(ref.Outputs(fb, gb, f0, g0, lb.exp(), torch.tensor(t, dtype=torch.float64)))
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
        for a, b_ in zip(
            torch.autograd.grad(ours, (fa, ga, la)), torch.autograd.grad(theirs, (fb, gb, lb))
        ):
            torch.testing.assert_close(a, b_, atol=1e-11, rtol=1e-10)


@settings(max_examples=30, deadline=None)
@given(_step())
def test_feature_view_is_feature_distillation_over_the_width(case: Any) -> None:
    # TRACER's FD is an MSE over batch x dim entries: robustft's per-sample sum, divided by D
    (f, g, f0, g0), s, t = case
    o = ref.Outputs(f, g, f0, g0, torch.tensor(s), t)
    ours = (
        feature_distillation(f, reference_features=f0)
        + feature_distillation(g, reference_features=g0)
    ) / f.shape[1]
    torch.testing.assert_close(ours, ref.fd(o), atol=1e-12, rtol=1e-12)


def test_the_scripts_total_is_the_weighted_sum_of_the_four_views() -> None:
    # tracer_{beta,lambda_distil,teacher_freq}.sh: distil_coef 0.9 x (CRD + 2000 FD + ICL + XKD)
    f, g, f0, g0 = _four(8, 6, seed=1)
    s, t = torch.tensor(30.0, dtype=torch.float64), torch.tensor(25.0, dtype=torch.float64)
    o = ref.Outputs(f, g, f0, g0, s, t)
    theirs = 0.9 * ref.total_kd(o, crd_w=1.0, fd_w=2000.0, icl_w=1.0, cross_w=1.0)
    fd = feature_distillation(f, reference_features=f0) + feature_distillation(
        g, reference_features=g0
    )
    ours = 0.9 * (
        _call(CRD, f, g, f0, g0, s, t)
        + 2000.0 / f.shape[1] * fd
        + _call(ICL, f, g, f0, g0, s)
        + _call(XKD, f, g, f0, g0, s, t)
    )
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)


def test_crd_is_the_monitored_kl_up_to_its_epsilon() -> None:
    # calculate_teacher_statistics logs KL with log(p + 1e-8): CRD without the epsilon (which
    # shifts it by about sum_j q_j 1e-8 / p_j per row: small while no student p_j is tiny)
    f0, g0, df, dg = _four(16, 8, seed=2)
    f, g = f0 + 0.3 * df, g0 + 0.3 * dg
    s = torch.tensor(5.0, dtype=torch.float64)
    o = ref.Outputs(f, g, f0, g0, s, s)
    crd = _call(CRD, f, g, f0, g0, s, s)
    monitored = ref.monitored_kl(o)
    assert 0 < abs(crd.item() - monitored.item()) < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_fallback_dist_loss_has_twice_crds_gradient_at_temperature_one(temperature: float) -> None:
    # tracer_loss.py's dist_loss (used when every alpha_* is 0) is a cross-entropy summed over
    # both directions: 2 CRD + the teacher's entropies (a constant) at temperature 1
    f, g, f0, g0 = _four(6, 4, seed=3)
    s = torch.tensor(10.0, dtype=torch.float64)
    fa = f.clone().requires_grad_(True)
    fb = f.clone().requires_grad_(True)
    fallback = ref.basic_dist_loss(ref.Outputs(fa, g, f0, g0, s, s), temperature)
    crd = _call(CRD, fb, g, f0, g0, s, s / temperature)
    (g_fallback,) = torch.autograd.grad(fallback, fa)
    (g_crd,) = torch.autograd.grad(crd, fb)
    torch.testing.assert_close(g_fallback, 2 * g_crd, atol=1e-12, rtol=1e-10)
    t_logits = s / temperature * ref.clip_output(f0) @ ref.clip_output(g0).T
    h = sum(
        -(torch.softmax(z, 1) * torch.log_softmax(z, 1)).sum(1).mean()
        for z in (t_logits, t_logits.T)
    )
    torch.testing.assert_close(fallback, 2 * crd.detach() + h, atol=1e-12, rtol=1e-12)


def test_temperature_scaled_view_is_crd_with_a_divided_teacher_scale() -> None:
    # alpha_temp_distil (0 in every script) divides only the teacher's logits by the temperature
    f, g, f0, g0 = _four(6, 4, seed=14)
    s, t = torch.tensor(12.0, dtype=torch.float64), torch.tensor(30.0, dtype=torch.float64)
    for temperature in (1.0, 2.5):
        theirs = ref.temp_distil(ref.Outputs(f, g, f0, g0, s, t), temperature)
        ours = _call(CRD, f, g, f0, g0, s, t / temperature)
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)


def test_bma_teacher_equals_the_authors_moving_average() -> None:
    # GeneralMovingAverage updated every step (ema_up_freq 0, beta 0.5) = averaging.bma
    total = 7
    trajectory = [_randn(3, seed=10 + k) for k in range(total + 1)]
    theirs = ref.general_moving_average(trajectory, beta=0.5, total_iterations=total)
    avg = averaging.bma(total, beta=0.5)
    state = avg.init({"w": trajectory[0]})
    for step, want in zip(trajectory[1:], theirs):
        state = avg.update(state, {"w": step})
        torch.testing.assert_close(state.average["w"], want, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- reductions to robustft's losses


def test_crd_and_cross_kd_are_distillation_of_their_logits() -> None:
    f, g, f0, g0 = _four(5, 4, seed=4)
    s, t = 7.0, 11.0
    n = [torch.nn.functional.normalize(x, dim=-1) for x in (f, g, f0, g0)]
    S, T = s * n[0] @ n[1].T, t * n[2] @ n[3].T
    want = 0.5 * (distillation(S, teacher_logits=T) + distillation(S.T, teacher_logits=T.T))
    torch.testing.assert_close(_call(CRD, f, g, f0, g0, s, t), want, atol=1e-12, rtol=1e-12)
    X, Y = s * n[0] @ n[3].T, s * n[1] @ n[2].T
    want = 0.5 * (distillation(X, teacher_logits=T) + distillation(Y, teacher_logits=T.T))
    torch.testing.assert_close(_call(XKD, f, g, f0, g0, s, t), want, atol=1e-12, rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(_step())
def test_icl_at_the_student_is_the_clip_loss(case: Any) -> None:
    (f, g, _, _), s, _ = case
    got = _call(ICL, f, g, f, g, s)
    torch.testing.assert_close(got, clip_contrastive(f, g, logit_scale=s), atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- properties


@settings(max_examples=30, deadline=None)
@given(_step())
def test_zero_when_the_student_is_the_teacher(case: Any) -> None:
    (f, g, _, _), s, _ = case
    for loss in WITH_TEACHER_SCALE:
        assert abs(_call(loss, f, g, f, g, s, s).item()) < 1e-13
        assert abs(_call(loss, f, g, f, g, s).item()) < 1e-13  # teacher scale None: the student's


@settings(max_examples=30, deadline=None)
@given(_step(), st.integers(0, 2**31 - 1))
def test_nonnegative_and_invariant_to_a_joint_permutation(case: Any, seed: int) -> None:
    four, s, t = case
    perm = torch.randperm(four[0].shape[0], generator=torch.Generator().manual_seed(seed))
    for loss in ALL:
        value = _call(loss, *four, s, t)
        assert value.item() >= -1e-13
        permuted = _call(loss, *[x[perm] for x in four], s, t)
        torch.testing.assert_close(permuted, value, atol=1e-12, rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(_step(), st.integers(0, 2**31 - 1))
def test_modalities_are_symmetric_and_feature_norms_do_not_matter(case: Any, seed: int) -> None:
    (f, g, f0, g0), s, t = case
    gen = torch.Generator().manual_seed(seed)
    scales = [
        torch.rand(f.shape[0], 1, generator=gen, dtype=torch.float64) * 5 + 0.1 for _ in range(4)
    ]
    for loss in ALL:
        value = _call(loss, f, g, f0, g0, s, t)
        torch.testing.assert_close(_call(loss, g, f, g0, f0, s, t), value, atol=1e-12, rtol=1e-12)
        rescaled = [x * c for x, c in zip((f, g, f0, g0), scales)]
        torch.testing.assert_close(_call(loss, *rescaled, s, t), value, atol=1e-12, rtol=1e-10)


def test_the_teacher_side_gets_no_gradient() -> None:
    f, g, f0, g0 = (x.requires_grad_(True) for x in _four(4, 3, seed=5))
    t = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    for loss in ALL:
        out = _call(loss, f, g, f0, g0, s, t)
        grads = torch.autograd.grad(out, (f, g, s, f0, g0, t), allow_unused=True)
        assert all(x is not None and torch.isfinite(x).all() for x in grads[:3])
        assert grads[3:] == (None, None, None)
        # a trained student scale is not silently used as the teacher's (None: detached copy)
        out = _call(loss, f, g, f0, g0, s, None)
        assert torch.autograd.grad(out, (f0, g0), allow_unused=True) == (None, None)


def test_teacher_scale_none_means_the_students_value() -> None:
    four = _four(5, 3, seed=6)
    for loss in WITH_TEACHER_SCALE:
        torch.testing.assert_close(
            _call(loss, *four, 12.0, None), _call(loss, *four, 12.0, 12.0), atol=0, rtol=0
        )
        assert _call(loss, *four, 12.0, 3.0).item() != _call(loss, *four, 12.0, None).item()


@pytest.mark.parametrize("loss", ALL, ids=IDS)
def test_gradcheck(loss: Callable[..., torch.Tensor]) -> None:
    f0, g0 = _four(4, 3, seed=7)[2:]
    f, g = (x.requires_grad_(True) for x in _four(4, 3, seed=8)[:2])
    log_s = torch.tensor(math.log(3.0), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: _call(loss, a, b, f0, g0, c.exp(), 2.0), (f, g, log_s)
    )


@pytest.mark.parametrize("loss", ALL, ids=IDS)
def test_extreme_scales_stay_finite(loss: Callable[..., torch.Tensor]) -> None:
    four = [x.requires_grad_(True) for x in _four(6, 4, seed=9)]
    out = _call(loss, *four, 1e4, 1e4)
    (grad,) = torch.autograd.grad(out, four[0])
    assert torch.isfinite(out) and torch.isfinite(grad).all()


@pytest.mark.parametrize("loss", ALL, ids=IDS)
def test_empty_batch_gives_zero_with_zero_gradient(loss: Callable[..., torch.Tensor]) -> None:
    f = torch.zeros(0, 3, requires_grad=True)
    out = _call(loss, f, f, torch.zeros(0, 3), torch.zeros(0, 3), 10.0, 10.0)
    assert out.item() == 0.0 and out.dtype == torch.float32
    (grad,) = torch.autograd.grad(out, f)
    assert grad.shape == (0, 3)


# ---------------------------------------------------------------- precision, torch.func, compile


@pytest.mark.parametrize("loss", ALL, ids=IDS)
def test_bf16_inputs_and_autocast_give_float32(loss: Callable[..., torch.Tensor]) -> None:
    four = _four(6, 8, seed=11, dtype=torch.float32)
    half = [x.bfloat16() for x in four]
    out = _call(loss, *half, 20.0, 15.0)
    assert out.dtype == torch.float32
    assert out.item() == _call(loss, *[x.float() for x in half], 20.0, 15.0).item()
    # a bf16 teacher (run under autocast) with a float32 student: float32 throughout
    mixed = _call(loss, four[0], four[1], half[2], half[3], 20.0, 15.0)
    assert (
        mixed.item()
        == _call(loss, four[0], four[1], half[2].float(), half[3].float(), 20.0, 15.0).item()
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = _call(loss, *four, 20.0, 15.0)
    assert auto.dtype == torch.float32 and auto.item() == _call(loss, *four, 20.0, 15.0).item()
    g16 = half[0].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_call(loss, g16, *half[1:], 20.0, 15.0), g16)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()
    assert _call(loss, *_four(3, 2, seed=12), 5.0, 5.0).dtype == torch.float64


@pytest.mark.parametrize("loss", ALL, ids=IDS)
def test_torch_func_grad_equals_autograd(loss: Callable[..., torch.Tensor]) -> None:
    f, g, f0, g0 = _four(5, 4, seed=13, dtype=torch.float32)

    def fn(a: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
        return _call(loss, a, g, f0, g0, log_s.exp(), 8.0)

    log_s = torch.tensor(math.log(6.0))
    got = torch.func.grad(fn, argnums=(0, 1))(f, log_s)
    a, ls = f.clone().requires_grad_(True), log_s.clone().requires_grad_(True)
    want = torch.autograd.grad(fn(a, ls), (a, ls))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


def test_compile_fullgraph_all_views_with_a_learned_scale_without_recompiling() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    log_s = torch.tensor(math.log(20.0), requires_grad=True)

    def step(f, g, f0, g0, t):
        s = log_s.exp()
        return (
            _call(CRD, f, g, f0, g0, s, t)
            + _call(ICL, f, g, f0, g0, s)
            + _call(XKD, f, g, f0, g0, s, t)
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for k in range(3):
        f, g, f0, g0 = _four(6, 4, seed=20 + 4 * k, dtype=torch.float32)
        t = torch.tensor(15.0 + k)
        fa = f.clone().requires_grad_(True)
        out = compiled(fa, g, f0, g0, t)
        got = torch.autograd.grad(out, (fa, log_s))
        fb = f.clone().requires_grad_(True)
        want_out = step(fb, g, f0, g0, t)
        torch.testing.assert_close(out, want_out)
        for x, y in zip(got, torch.autograd.grad(want_out, (fb, log_s))):
            torch.testing.assert_close(x, y)
    assert counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------- data parallelism (2 gloo ranks)


def _dp_body(rank: int, world_size: int, split: tuple[int, ...]) -> list[float]:
    n = sum(split)
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])
    x, y, f0, g0 = _four(n, 5, seed=30)
    proj = [_randn(5, 4, seed=40), _randn(5, 4, seed=41)]
    f0, g0 = f0[:, :4], g0[:, :4]
    values = []
    for loss in ALL:
        single = [p.clone().requires_grad_(True) for p in proj]
        ls1 = torch.tensor(math.log(5.0), dtype=torch.float64, requires_grad=True)
        ref_loss = _call(loss, x @ single[0], y @ single[1], f0, g0, ls1.exp(), 4.0)
        ref_loss.backward()
        local = [p.clone().requires_grad_(True) for p in proj]
        ls2 = torch.tensor(math.log(5.0), dtype=torch.float64, requires_grad=True)
        out = _call(
            loss,
            x[lo:hi] @ local[0],
            y[lo:hi] @ local[1],
            f0[lo:hi],
            g0[lo:hi],
            ls2.exp(),
            4.0,
            group=dist.group.WORLD,
        )
        out.backward()  # every rank, an empty one included, reaches the backward's collectives
        torch.testing.assert_close(out, ref_loss.detach(), atol=1e-12, rtol=1e-12)
        for mine, want in zip([*local, ls2], [*single, ls1]):
            avg = mine.grad.clone()
            dist.all_reduce(avg)  # what DDP applies: the rank average
            torch.testing.assert_close(avg / world_size, want.grad, atol=1e-12, rtol=1e-10)
        if 0 < hi - lo < n:  # group=None keeps the local batch even with a process group
            here = _call(
                loss, x[lo:hi] @ proj[0], y[lo:hi] @ proj[1], f0[lo:hi], g0[lo:hi], 5.0, 4.0
            )
            assert abs(here.item() - ref_loss.item()) > 1e-6
        values.append(out.item())
    return values


@pytest.mark.distributed
@pytest.mark.parametrize("split", [(3, 5), (0, 4)], ids=["uneven", "empty-rank"])
def test_global_batch_equals_one_process_on_the_concatenated_batch(split: tuple[int, ...]) -> None:
    results = run_distributed(_dp_body, world_size=2, args=(split,), timeout=120)
    assert results[0] == pytest.approx(results[1], abs=1e-12)
