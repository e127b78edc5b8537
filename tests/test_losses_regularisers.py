"""Energy gap, distillation (KD, CAR-FT, FeatKD), L2-SP and the CLIP/FLYP contrastive loss."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from reference.losses_ref import (
    car_ft_ref,
    clip_ref,
    energy_gap_ref,
    featkd_ref,
    kd_ref,
    l2sp_ref,
)
from strategies import features, tree_pairs
from strategies import logits as logits_st

from robustft.losses import (
    clip_contrastive,
    context_distillation,
    distillation,
    energy_gap,
    feature_distillation,
    l2sp,
)


def _feats(*shapes: tuple[int, int], dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


# ---------------------------------------------------------------- energy gap


def test_energy_gap_hand_value() -> None:
    f = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    f0 = torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # sample 0: Δ = (1, −1): ⟨Δ, t⟩ = (1, −1, 0) → s²·2/(2·3); sample 1: Δ = 0
    out = energy_gap(
        f, reference_features=f0, text_features=texts, logit_scale=10.0, reduction="none"
    )
    torch.testing.assert_close(out, torch.tensor([100.0 * 2 / 6, 0.0]))
    torch.testing.assert_close(
        energy_gap(f, reference_features=f0, text_features=texts, logit_scale=10.0), out.mean()
    )
    torch.testing.assert_close(
        energy_gap(
            f, reference_features=f0, text_features=texts, logit_scale=10.0, reduction="sum"
        ),
        out.sum(),
    )


@given(f=features(3, 4), f0=features(3, 4), g=features(5, 4), s=st.floats(0.5, 100.0))
def test_energy_gap_matches_reference(f, f0, g, s: float) -> None:
    torch.testing.assert_close(
        energy_gap(f, reference_features=f0, text_features=g, logit_scale=s, reduction="none"),
        torch.tensor(energy_gap_ref(f, f0, g, s), dtype=torch.float64),
        atol=1e-9,
        rtol=1e-9,
    )


def test_energy_gap_zero_at_reference_with_zero_gradient() -> None:
    f, g = _feats((4, 6), (7, 6))
    x = f.clone().requires_grad_(True)
    loss = energy_gap(x, reference_features=f, text_features=g)
    assert loss == 0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(f))


def test_energy_gap_is_quadratic_in_the_difference() -> None:
    # exact: R_b = s²/(2M) · d_bᵀ (ĜᵀĜ) d_b with d_b = f̂_b − f̂0_b, a quadratic form in d
    f, f0, g = _feats((3, 5), (3, 5), (9, 5))
    d = F.normalize(f, dim=-1) - F.normalize(f0, dim=-1)
    gn = F.normalize(g, dim=-1)
    form = 1e4 / (2 * 9) * torch.einsum("bi,ij,bj->b", d, gn.T @ gn, d)
    torch.testing.assert_close(
        energy_gap(f, reference_features=f0, text_features=g, reduction="none"),
        form,
        atol=1e-10,
        rtol=1e-12,
    )
    # hence scaling a small raw difference Δ by k scales the loss by k² (to first order in k)
    f0n = F.normalize(f0, dim=-1)
    delta = f - f0n
    base = energy_gap(f0n + 1e-4 * delta, reference_features=f0n, text_features=g, reduction="none")
    for k in (2.0, 4.0):
        r = energy_gap(
            f0n + k * 1e-4 * delta, reference_features=f0n, text_features=g, reduction="none"
        )
        torch.testing.assert_close(r / base, torch.full_like(r, k * k), rtol=1e-2, atol=0)


@given(a=st.floats(1e-2, 1e2), b=st.floats(1e-2, 1e2), c=st.floats(1e-2, 1e2))
def test_energy_gap_unchanged_by_rescaling_raw_features(a: float, b: float, c: float) -> None:
    f, f0, g = _feats((3, 4), (3, 4), (6, 4))
    torch.testing.assert_close(
        energy_gap(a * f, reference_features=b * f0, text_features=c * g, reduction="none"),
        energy_gap(f, reference_features=f0, text_features=g, reduction="none"),
    )


def test_energy_gap_reference_is_detached() -> None:
    f, f0, g = _feats((3, 4), (3, 4), (6, 4))
    f0 = f0.requires_grad_(True)
    energy_gap(f.requires_grad_(True), reference_features=f0, text_features=g).backward()
    assert f0.grad is None


def test_energy_gap_gradcheck() -> None:
    f, f0, g = _feats((3, 4), (3, 4), (5, 4))
    f.requires_grad_(True)
    g.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, t: energy_gap(
            x, reference_features=f0, text_features=t, logit_scale=3.0, reduction="none"
        ),
        (f, g),
    )


# ---------------------------------------------------------------- distillation (KD)


def test_distillation_hand_values() -> None:
    s = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    t = torch.tensor([[1e4, -1e4], [0.0, 0.0]])
    # KL((1,0) ‖ (½,½)) = log 2; KL((½,½) ‖ (¼,¾)) = ½log 2 + ½log(2/3)
    expected = torch.tensor([math.log(2), 0.5 * math.log(2) + 0.5 * math.log(2 / 3)])
    torch.testing.assert_close(distillation(s, teacher_logits=t, reduction="none"), expected)
    # temperature 2: logits halved, multiplied by 4
    t2 = torch.tensor([[0.0, 2 * math.log(3.0)]])
    kl = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    torch.testing.assert_close(
        distillation(torch.zeros(1, 2), teacher_logits=t2, temperature=2.0),
        torch.tensor(4 * (0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5))),
    )
    assert kl > 0


@given(
    s=logits_st(max_batch=4, max_classes=5, dtype=torch.float64, scale=8.0), T=st.floats(0.2, 8.0)
)
def test_distillation_matches_reference_and_nonnegative(s: torch.Tensor, T: float) -> None:
    g = torch.Generator().manual_seed(s.numel())
    t = torch.randn(s.shape, generator=g, dtype=torch.float64) * 5
    out = distillation(s, teacher_logits=t, temperature=T, reduction="none")
    torch.testing.assert_close(
        out, torch.tensor(kd_ref(s, t, T), dtype=torch.float64), atol=1e-10, rtol=1e-9
    )
    assert (out >= -1e-12).all()


@given(s=logits_st(max_batch=4, max_classes=5, scale=8.0), T=st.floats(0.2, 8.0))
def test_distillation_zero_for_equal_logits(s: torch.Tensor, T: float) -> None:
    assert torch.equal(
        distillation(s, teacher_logits=s.clone(), temperature=T, reduction="none"),
        torch.zeros(s.shape[0], dtype=torch.promote_types(s.dtype, torch.float32)),
    )


def test_distillation_zero_gradient_wrt_teacher() -> None:
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    distillation(s, teacher_logits=t, temperature=2.0).backward()
    assert t.grad is None
    gs, gt = torch.func.grad(lambda a, b: distillation(a, teacher_logits=b), argnums=(0, 1))(
        s.detach(), t.detach()
    )
    assert torch.equal(gt, torch.zeros_like(gt))
    # ∂/∂z of KL(q ‖ softmax z) is (softmax z − q)/B
    torch.testing.assert_close(gs, (torch.softmax(s, -1) - torch.softmax(t, -1)).detach() / 3)


def test_distillation_gradcheck() -> None:
    s, t = _feats((3, 4), (3, 4))
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: distillation(x, teacher_logits=t, temperature=1.5, reduction="none"), (s,)
    )


# ---------------------------------------------------------------- CAR-FT context distillation


def test_context_distillation_hand_value() -> None:
    ctx = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    f = torch.tensor([[5.0, 0.0]])
    f0 = torch.tensor([[1.0, 1.0]])
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    expected = 0.5 * torch.log(0.5 / p).sum()
    torch.testing.assert_close(
        context_distillation(f, reference_features=f0, context_features=ctx, logit_scale=1.0),
        expected,
    )


@given(
    f=features(3, 4),
    f0=features(3, 4),
    w=features(5, 4),
    s=st.floats(1.0, 100.0),
    T=st.floats(0.5, 4.0),
)
def test_context_distillation_matches_reference(f, f0, w, s: float, T: float) -> None:
    torch.testing.assert_close(
        context_distillation(
            f,
            reference_features=f0,
            context_features=w,
            logit_scale=s,
            temperature=T,
            reduction="none",
        ),
        torch.tensor(car_ft_ref(f, f0, w, s, T), dtype=torch.float64),
        atol=1e-9,
        rtol=1e-8,
    )


def test_context_distillation_is_kd_of_context_logits() -> None:
    f, f0, w = _feats((4, 5), (4, 5), (6, 5))
    n = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    out = context_distillation(
        f,
        reference_features=f0,
        context_features=w,
        logit_scale=20.0,
        temperature=2.0,
        reduction="none",
    )
    kd = distillation(
        20 * n(f) @ n(w).T, teacher_logits=20 * n(f0) @ n(w).T, temperature=2.0, reduction="none"
    )
    torch.testing.assert_close(out, kd)


def test_context_distillation_zero_at_reference_and_detached() -> None:
    f, w = _feats((4, 5), (6, 5))
    x = f.clone().requires_grad_(True)
    ref = f.clone().requires_grad_(True)
    loss = context_distillation(x, reference_features=ref, context_features=w)
    torch.testing.assert_close(loss, torch.tensor(0.0, dtype=torch.float64))
    loss.backward()
    assert ref.grad is None
    torch.testing.assert_close(x.grad, torch.zeros_like(x))


# ---------------------------------------------------------------- feature distillation


def test_feature_distillation_hand_value_and_reference() -> None:
    f = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    f0 = torch.tensor([[0.0, 3.0], [-1.0, -1.0]])
    torch.testing.assert_close(
        feature_distillation(f, reference_features=f0, reduction="none"), torch.tensor([2.0, 4.0])
    )
    a, b = _feats((5, 3), (5, 3))
    torch.testing.assert_close(
        feature_distillation(a, reference_features=b, reduction="none"),
        torch.tensor(featkd_ref(a, b), dtype=torch.float64),
    )
    torch.testing.assert_close(
        feature_distillation(a, reference_features=b, reduction="sum"),
        torch.tensor(sum(featkd_ref(a, b)), dtype=torch.float64),
    )


def test_feature_distillation_reference_detached() -> None:
    a, b = _feats((5, 3), (5, 3))
    b.requires_grad_(True)
    a.requires_grad_(True)
    feature_distillation(a, reference_features=b).backward()
    assert b.grad is None and a.grad is not None
    assert torch.autograd.gradcheck(
        lambda x: feature_distillation(x, reference_features=b.detach(), reduction="none"), (a,)
    )


# ---------------------------------------------------------------- L2-SP


def test_l2sp_hand_value_with_extra_keys() -> None:
    params = {"w": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([3.0]), "head": torch.ones(4)}
    anchor = {"w": torch.tensor([[0.0, 0.0]]), "b": torch.tensor([1.0])}
    torch.testing.assert_close(l2sp(params, anchor=anchor), torch.tensor(0.5 * (1 + 4 + 4)))


@given(pair=tree_pairs())
def test_l2sp_matches_reference(pair) -> None:
    params, anchor = pair
    out = l2sp(params, anchor=anchor)
    assert out.dtype == (
        torch.float64 if any(v.dtype == torch.float64 for v in anchor.values()) else torch.float32
    )
    torch.testing.assert_close(
        out.double(),
        torch.tensor(l2sp_ref(params, anchor), dtype=torch.float64),
        rtol=1e-5,
        atol=1e-5,
    )


def test_l2sp_fast_path_equals_loop_path_with_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (3, 4), "b": (4,), "c": (2, 2, 2)}
    anchor = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    anchor["d"] = torch.randn(5, generator=g, dtype=torch.float64)
    values = {
        k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in anchor.items()
    }
    # eager with autograd: foreach kernels
    p1 = {k: v.clone().requires_grad_(True) for k, v in values.items()}
    l1 = l2sp(p1, anchor=anchor)
    l1.backward()
    # torch.func: per-tensor loop
    l2, g2 = torch.func.grad_and_value(lambda p: l2sp(p, anchor=anchor), has_aux=False)(values)[
        ::-1
    ]
    torch.testing.assert_close(l1.detach(), l2)
    for k in values:
        torch.testing.assert_close(p1[k].grad, values[k] - anchor[k])
        torch.testing.assert_close(g2[k], values[k] - anchor[k])
    with torch.no_grad():
        torch.testing.assert_close(l2sp(values, anchor=anchor), l2)


def test_l2sp_chunks_bounded_by_the_largest_tensor(monkeypatch) -> None:
    calls: list[list[int]] = []
    real = torch._foreach_norm

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append([t.numel() for t in args[0]])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", spy)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    anchor = {k: v.detach().clone() + 0.5 for k, v in model.named_parameters()}
    params = dict(model.named_parameters())
    loss = l2sp(params, anchor=anchor)
    loss.backward()
    # the weights (12 and 8 elements) alone; the biases (4 + 2) share one multi-tensor kernel,
    # each chunk no larger than the largest tensor
    assert sorted(calls) == [[4, 2], [8], [12]]
    assert sum(map(len, calls)) == 4
    torch.testing.assert_close(
        loss, torch.tensor(0.5 * 0.25 * sum(v.numel() for v in anchor.values()))
    )
    for v in model.parameters():
        torch.testing.assert_close(v.grad, torch.full_like(v, -0.5))


def _mlp(width: int, depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])


@pytest.mark.parametrize("order", ["penalty after the forward", "penalty before the forward"])
@pytest.mark.parametrize("batch", [8, 256])
def test_l2sp_step_adds_at_most_a_tenth_of_a_tree_of_peak_memory(order: str, batch: int) -> None:
    # issue 13: loss + backward of CE + λ·l2sp peaks at most 0.1 tree above the same CE step,
    # whether the penalty is computed after the model's forward (autograd would reach it first)
    # or before it; small and large activations. 24 tensors of 4 % of the tree each.
    from _memory import peak_alloc_bytes

    model = _mlp(128, 24)
    params = dict(model.named_parameters())
    anchor = {k: v.detach() + 0.01 for k, v in params.items()}
    tree = sum(v.numel() * v.element_size() for v in params.values())
    x = torch.randn(batch, 128)
    y = torch.randint(0, 128, (batch,))

    def ft() -> None:
        F.cross_entropy(model(x), y).backward()

    def step() -> None:
        if order == "penalty before the forward":
            reg = l2sp(params, anchor=anchor)
            loss = F.cross_entropy(model(x), y) + 0.1 * reg
        else:
            loss = F.cross_entropy(model(x), y) + 0.1 * l2sp(params, anchor=anchor)
        loss.backward()

    def peak(body: Callable[[], None]) -> int:
        model.zero_grad(set_to_none=True)  # outside: a free inside would count as negative bytes
        return peak_alloc_bytes(body)

    ft_peak = peak(ft)
    step_peak = peak(step)
    assert step_peak <= ft_peak + 0.1 * tree, (step_peak / tree, ft_peak / tree)
    # without the chunked, late-scheduled formulation it is at least one more tree: a check that
    # the measurement can fail
    naive = peak(
        lambda: (
            F.cross_entropy(model(x), y)
            + 0.05 * sum((p - anchor[k]).square().sum() for k, p in params.items())
        ).backward()
    )
    assert naive > ft_peak + 0.1 * tree
    # and the gradient is exact: CE's plus 0.1·(θ − θ0)
    model.zero_grad(set_to_none=True)
    step()
    lean = {k: v.grad.clone() for k, v in params.items()}
    model.zero_grad(set_to_none=True)
    ft()
    for k, v in params.items():
        torch.testing.assert_close(lean[k], v.grad + 0.1 * (v.detach() - anchor[k]))


def test_l2sp_keeps_no_difference_for_the_backward() -> None:
    # the autograd nodes save only the inputs (no Δ = θ − θ0 tensor)
    p = {"w": torch.randn(64, 64, requires_grad=True), "b": torch.randn(64, requires_grad=True)}
    a = {k: v.detach() + 1.0 for k, v in p.items()}
    out = l2sp(p, anchor=a)
    pending = [out.grad_fn]
    nodes = []
    while pending:
        node = pending.pop()
        if node is None:
            continue
        nodes.append(node)
        pending.extend(n for n, _ in node.next_functions)
    lean = [n for n in nodes if type(n).__name__ == "_HalfSquaredDistanceBackward"]
    assert len(lean) == 2  # w alone; b in a chunk of its own (the only small tensor)
    inputs = {t.data_ptr() for t in (*p.values(), *a.values())}
    for n in lean:
        assert n.saved_tensors and {t.data_ptr() for t in n.saved_tensors} <= inputs


def test_l2sp_double_backward() -> None:
    # create_graph=True: the gradient θ − θ0 is itself differentiable (Hessian = identity)
    p = {"w": torch.randn(3, 2, dtype=torch.float64, requires_grad=True)}
    a = {"w": torch.randn(3, 2, dtype=torch.float64)}
    (g,) = torch.autograd.grad(l2sp(p, anchor=a), (p["w"],), create_graph=True)
    torch.testing.assert_close(g, p["w"].detach() - a["w"])
    v = torch.randn(3, 2, dtype=torch.float64)
    (hv,) = torch.autograd.grad((g * v).sum(), (p["w"],))
    torch.testing.assert_close(hv, v)
    assert torch.autograd.gradcheck(lambda w: l2sp({"w": w}, anchor=a), (p["w"],))
    assert torch.autograd.gradgradcheck(lambda w: l2sp({"w": w}, anchor=a), (p["w"],))


def test_l2sp_only_some_parameters_trainable() -> None:
    p = {"w": torch.randn(4, requires_grad=True), "frozen": torch.randn(4)}
    a = {k: torch.zeros(4) for k in p}
    out = l2sp(p, anchor=a)
    out.backward()
    torch.testing.assert_close(p["w"].grad, p["w"].detach())
    torch.testing.assert_close(out, 0.5 * sum(v.detach().square().sum() for v in p.values()))


def test_l2sp_mixed_dtypes_accumulate_in_float32() -> None:
    anchor = {"w": torch.full((1000,), 0.1)}
    params = {"w": torch.full((1000,), 1.1, dtype=torch.bfloat16)}
    out = l2sp(params, anchor=anchor)
    assert out.dtype == torch.float32
    expected = 0.5 * 1000 * (torch.tensor(1.1, dtype=torch.bfloat16).float() - 0.1) ** 2
    torch.testing.assert_close(out, expected)


def test_l2sp_zero_at_anchor_with_finite_gradient() -> None:
    anchor = {"w": torch.randn(3, 3)}
    p = {"w": anchor["w"].clone().requires_grad_(True)}
    loss = l2sp(p, anchor=anchor)
    loss.backward()
    assert loss == 0
    assert torch.equal(p["w"].grad, torch.zeros(3, 3))
    assert l2sp({"x": torch.ones(2)}, anchor={}) == 0


def test_l2sp_anchor_detached() -> None:
    a = {"w": torch.randn(3, requires_grad=True)}
    p = {"w": torch.randn(3, requires_grad=True)}
    l2sp(p, anchor=a).backward()
    assert a["w"].grad is None and p["w"].grad is not None


# ---------------------------------------------------------------- CLIP / FLYP contrastive


def test_clip_contrastive_hand_value() -> None:
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # S = s·I: each CE is log(1 + e^{−s})
    out = clip_contrastive(f, f, logit_scale=3.0)
    torch.testing.assert_close(out, torch.log1p(torch.exp(torch.tensor(-3.0))))


@given(f=features(4, 3), g=features(4, 3), s=st.floats(0.5, 100.0))
def test_clip_contrastive_matches_reference(f, g, s: float) -> None:
    torch.testing.assert_close(
        clip_contrastive(f, g, logit_scale=s),
        torch.tensor(clip_ref(f, g, s), dtype=torch.float64),
        atol=1e-9,
        rtol=1e-9,
    )


def test_clip_contrastive_matches_open_clip() -> None:
    from open_clip.loss import ClipLoss

    f, g = _feats((6, 8), (6, 8), dtype=torch.float32)
    s = torch.tensor(50.0)
    expected = ClipLoss()(F.normalize(f, dim=-1), F.normalize(g, dim=-1), s)
    torch.testing.assert_close(clip_contrastive(f, g, logit_scale=s), expected)
    torch.testing.assert_close(clip_contrastive(f, g, logit_scale=50.0), expected)


def test_clip_contrastive_symmetric_and_gradcheck() -> None:
    f, g = _feats((4, 3), (4, 3))
    torch.testing.assert_close(clip_contrastive(f, g), clip_contrastive(g, f))
    f.requires_grad_(True)
    g.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: clip_contrastive(a, b, logit_scale=4.0), (f, g))


def test_l2sp_mixed_dtype_gradient() -> None:
    # bf16 parameters against a float32 anchor: the difference is taken in float32, the gradient
    # returned in the parameters' dtype, the value accumulated in float32
    a = {"w": torch.linspace(-1, 1, 50), "b": torch.zeros(3)}
    p = {
        "w": (a["w"] + 0.3).to(torch.bfloat16).requires_grad_(True),
        "b": torch.ones(3, dtype=torch.bfloat16, requires_grad=True),
    }
    out = l2sp(p, anchor=a)
    assert out.dtype == torch.float32
    (2.0 * out).backward()
    for k in p:
        assert p[k].grad.dtype == torch.bfloat16
        expected = (2.0 * (p[k].detach().float() - a[k])).to(torch.bfloat16)
        torch.testing.assert_close(p[k].grad, expected)
    expected_value = 0.5 * sum((p[k].detach().float() - a[k]).square().sum() for k in p)
    torch.testing.assert_close(out, expected_value)
