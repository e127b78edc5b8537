"""CaRot: the orthogonality penalty on the visual projection, and its EMA self-distillation recipe."""

from __future__ import annotations

import math

import pytest
import torch
from clip_models import tiny_resnet_clip, tiny_vit_clip
from hypothesis import given, settings
from hypothesis import strategies as st
from reference.losses_ref import orthogonality_ref
from strategies import tensors

from robustft import averaging, clip, losses
from robustft.losses import orthogonality

# ---------------------------------------------------------------- hand values


def test_hand_values() -> None:
    # orthonormal columns (m >= n) and orthonormal rows (m < n): 0
    assert orthogonality(torch.eye(3)[:, :2]).item() == 0.0
    assert orthogonality(torch.eye(3)[:2]).item() == 0.0
    # G = 4 I (2 x 2): 2 * (4 - 1)^2 = 18
    torch.testing.assert_close(orthogonality(2 * torch.eye(2)), torch.tensor(18.0))
    torch.testing.assert_close(
        orthogonality(2 * torch.eye(2), squared=False), torch.tensor(math.sqrt(18.0))
    )
    # W = [[1, 1], [0, 1], [0, 0]]: WᵀW = [[1, 1], [1, 2]], G - I = [[0, 1], [1, 1]] -> 3
    w = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(orthogonality(w), torch.tensor(3.0))
    torch.testing.assert_close(orthogonality(w.T), torch.tensor(3.0))  # the smaller side again
    torch.testing.assert_close(orthogonality(w, squared=False), torch.tensor(math.sqrt(3.0)))
    # a 1 x 1 "projection": (w^2 - 1)^2
    torch.testing.assert_close(orthogonality(torch.tensor([[3.0]])), torch.tensor(64.0))


# ---------------------------------------------------------------- reference and properties


@st.composite
def _weights(draw: st.DrawFn) -> torch.Tensor:
    m, n = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    return draw(tensors((m, n), torch.float64, scale=1.0))


@settings(max_examples=30, deadline=None)
@given(_weights(), st.booleans())
def test_equals_the_naive_reference(w: torch.Tensor, squared: bool) -> None:
    expected = orthogonality_ref(w, squared)
    assert orthogonality(w, squared=squared).item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(_weights())
def test_singular_value_form_transpose_and_orthogonal_invariance(w: torch.Tensor) -> None:
    r = orthogonality(w)
    sigma = torch.linalg.svdvals(w)  # min(m, n) singular values
    torch.testing.assert_close(r, ((sigma**2 - 1) ** 2).sum())
    torch.testing.assert_close(orthogonality(w.T), r)
    m, n = w.shape
    g = torch.Generator().manual_seed(m * 10 + n)
    q_left = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    q_right = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    torch.testing.assert_close(orthogonality(q_left @ w @ q_right), r)


@pytest.mark.parametrize("shape", [(6, 3), (3, 6), (4, 4)])
def test_zero_exactly_at_semi_orthogonal_weights(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    m, n = shape
    q = torch.linalg.qr(torch.randn(max(shape), min(shape), generator=g, dtype=torch.float64))[0]
    w = q if m >= n else q.T
    assert orthogonality(w).item() == pytest.approx(0.0, abs=1e-24)
    assert orthogonality(w, squared=False).item() == pytest.approx(0.0, abs=1e-12)
    assert orthogonality(2 * w).item() == pytest.approx(9.0 * min(shape))  # σ² = 4: 9 each


def test_the_larger_gram_differs_by_a_constant_same_gradient() -> None:
    # squared: ‖WWᵀ - I_m‖² = ‖WᵀW - I_n‖² + (m - n); CaRot's literal ResNet code takes the larger
    g = torch.Generator().manual_seed(1)
    w = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    larger = (w @ w.T - torch.eye(7, dtype=torch.float64)).square().sum()
    ours = orthogonality(w)
    torch.testing.assert_close(larger, ours + 4)
    (g_larger,) = torch.autograd.grad(larger, w)
    (g_ours,) = torch.autograd.grad(ours, w)
    torch.testing.assert_close(g_ours, g_larger)


def test_gradient_is_the_closed_form() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(orthogonality(w), w)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(grad, 4 * w.detach() @ (w.detach().T @ w.detach() - eye))
    (grad_fro,) = torch.autograd.grad(orthogonality(w, squared=False), w)
    torch.testing.assert_close(grad_fro, grad / (2 * orthogonality(w, squared=False).detach()))


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("shape", [(4, 3), (2, 5)])
def test_gradcheck(squared: bool, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: orthogonality(t, squared=squared), (w,))


@pytest.mark.parametrize("squared", [True, False])
def test_finite_zero_gradient_at_an_orthogonal_weight(squared: bool) -> None:
    # the Frobenius norm is not differentiable at 0: its gradient must be 0 there, not NaN
    w = torch.eye(3, 2, requires_grad=True)
    (grad,) = torch.autograd.grad(orthogonality(w, squared=squared), w)
    assert torch.equal(grad, torch.zeros(3, 2))


def test_dtypes_bf16_float64_and_autocast() -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(12, 8, generator=g)
    w16 = w.bfloat16().requires_grad_(True)
    out = orthogonality(w16)
    assert out.dtype == torch.float32
    assert out.item() == orthogonality(w16.detach().float()).item()  # float32 from bf16 values
    out.backward()
    assert w16.grad.dtype == torch.bfloat16 and torch.isfinite(w16.grad).all()
    assert orthogonality(w.double()).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = orthogonality(w)
    assert auto.dtype == torch.float32
    assert auto.item() == orthogonality(w).item()  # autocast is off inside: float32 exactly


def test_near_orthogonal_penalty_is_resolved_in_float32() -> None:
    # computed from G - I, not ‖G‖² - 2 tr G + k (which cancels ~k to float32 precision)
    g = torch.Generator().manual_seed(5)
    q = torch.linalg.qr(torch.randn(768, 512, generator=g, dtype=torch.float64))[0]
    w = q + 1e-5 * torch.randn(768, 512, generator=g, dtype=torch.float64)
    exact = orthogonality(w)
    torch.testing.assert_close(orthogonality(w.float()).double(), exact, rtol=1e-3, atol=0)


def test_torch_func_grad_and_compile_without_recompiling() -> None:
    g = torch.Generator().manual_seed(6)
    w = torch.randn(6, 4, generator=g)
    grad = torch.func.grad(orthogonality)(w)
    x = w.clone().requires_grad_(True)
    orthogonality(x).backward()
    torch.testing.assert_close(grad, x.grad)

    torch._dynamo.reset()
    compiled = torch.compile(orthogonality, fullgraph=True, backend="aot_eager")
    from torch._dynamo.utils import counters

    counters.clear()
    for step in range(3):  # new values, same shapes: one graph
        v = (w + step).requires_grad_(True)
        out = compiled(v)
        out.backward()
        torch.testing.assert_close(out, orthogonality(w + step))
        torch.testing.assert_close(v.grad, torch.func.grad(orthogonality)(w + step))
    assert counters["stats"]["unique_graphs"] == 1


def test_squared_is_keyword_only() -> None:
    with pytest.raises(TypeError, match=r"orthogonality\(\) takes 1 positional argument"):
        orthogonality(torch.eye(2), False)  # type: ignore[misc]


def test_input_not_mutated() -> None:
    w = torch.randn(5, 3)
    before = w.clone()
    orthogonality(w, squared=False)
    assert torch.equal(w, before)


# ---------------------------------------------------------------- open_clip projections


def test_vit_visual_proj_is_carots_proj_t_proj() -> None:
    proj = tiny_vit_clip().visual.proj  # [width, embed_dim] = [32, 16], applied as x @ proj
    assert proj.shape[0] > proj.shape[1]
    covv = proj.T @ proj  # CaRot's code, then its (unsquared) Frobenius norm
    official = ((covv - torch.eye(covv.shape[0])) ** 2).sum() ** 0.5
    torch.testing.assert_close(orthogonality(proj, squared=False), official)
    torch.testing.assert_close(orthogonality(proj), official**2)


def test_resnet_attnpool_c_proj_weight_constrains_the_output_side() -> None:
    weight = tiny_resnet_clip().visual.attnpool.c_proj.weight  # nn.Linear: [out, in] = [16, 256]
    assert weight.shape[0] < weight.shape[1]
    # the same constraint as on the x @ W layout (W = weight.T): Wᵀ W = weight @ weight.T
    w = weight.T
    expected = ((w.T @ w - torch.eye(16)) ** 2).sum()
    torch.testing.assert_close(orthogonality(weight), expected)
    torch.testing.assert_close(orthogonality(weight), orthogonality(w))


def test_carot_recipe_from_the_docs_runs_and_trains() -> None:
    # the composition documented in orthogonality's docstring and the guide: EMA teacher,
    # FLYP contrastive loss + λ_orth·orthogonality + λ_sd·distillation of the contrastive logits
    model = tiny_vit_clip().train()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 49406, (4, 77), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    avg = averaging.ema(0.9)
    teacher = avg.init(dict(model.named_parameters()))
    values = []
    for _ in range(3):
        f, tf = clip.image_features(model, None, x), clip.text_features(model, None, tokens)
        s = clip.logit_scale(model)
        with torch.no_grad():
            f0 = clip.image_features(model, teacher.average, x)
            g0 = clip.text_features(model, teacher.average, tokens)
            s0 = clip.logit_scale(model, params=teacher.average)
        orth = losses.orthogonality(model.visual.proj)
        distil = losses.distillation(s * f @ tf.T, teacher_logits=s0 * f0 @ g0.T)
        distil = distil + losses.distillation(s * tf @ f.T, teacher_logits=s0 * g0 @ f0.T)
        loss = losses.clip_contrastive(f, tf, logit_scale=s) + 0.2 * orth + 1.5 * distil
        opt.zero_grad()
        loss.backward()
        assert model.visual.proj.grad is not None
        assert torch.isfinite(model.visual.proj.grad).all()
        opt.step()
        teacher = avg.update_(teacher, dict(model.named_parameters()))
        values.append(orth.item())
    assert values[-1] < values[0]  # the penalty pulls the projection toward orthogonality
