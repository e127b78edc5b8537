"""SigLIP's sigmoid loss: hand values, naive and open_clip references, gradients, DDP.

The 2-process tests (gloo on CPU) check that with ``group=`` every rank returns the
single-process loss of the concatenated batch and that the DDP-averaged gradient is its gradient,
for uneven local batches and a rank with none, and compare with open_clip's ``SigLipLoss``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _dist import run_distributed
from hypothesis import given, settings
from hypothesis import strategies as st
from reference.losses_ref import sigmoid_ref
from strategies import features

from robustft.losses import sigmoid_contrastive


def _open_clip_formula(f: torch.Tensor, g: torch.Tensor, t: float, b: float) -> torch.Tensor:
    """open_clip's ``SigLipLoss._loss``: labels 2I - 1, -Σ logsigmoid(labels · logits) / B."""
    f, g = F.normalize(f, dim=-1), F.normalize(g, dim=-1)
    logits = t * f @ g.T + b
    labels = 2 * torch.eye(f.shape[0], dtype=f.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / f.shape[0]


# ---------------------------------------------------------------- hand values


def test_hand_values() -> None:
    pairs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # each image: -log σ(t·1 + b) for its text, -log σ(-(t·0 + b)) for the other one
    out = sigmoid_contrastive(pairs, pairs, logit_scale=1.0, logit_bias=0.0)
    expected = (2 * math.log1p(math.exp(-1.0)) + 2 * math.log(2.0)) / 2
    assert out.item() == pytest.approx(expected, rel=1e-6)
    out = sigmoid_contrastive(pairs, pairs, logit_scale=2.0, logit_bias=-1.0)
    expected = (2 * math.log1p(math.exp(-1.0)) + 2 * math.log1p(math.exp(-1.0))) / 2
    assert out.item() == pytest.approx(expected, rel=1e-6)
    # one pair: a single positive, -log σ(t + b), on raw (unnormalised) features
    one = sigmoid_contrastive(
        torch.tensor([[3.0, 4.0]]), torch.tensor([[6.0, 8.0]]), logit_scale=10.0, logit_bias=-12.0
    )
    assert one.item() == pytest.approx(math.log1p(math.exp(2.0)), rel=1e-6)


# ---------------------------------------------------------------- references and properties


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 5).flatmap(lambda b: st.tuples(features(b, 3), features(b, 3))),
    st.floats(0.1, 30.0),
    st.floats(-15.0, 5.0),
)
def test_equals_the_naive_double_loop_and_open_clip(
    pair: tuple[torch.Tensor, torch.Tensor], t: float, b: float
) -> None:
    f, g = pair
    out = sigmoid_contrastive(f, g, logit_scale=t, logit_bias=b)
    assert out.dtype == torch.float64
    assert out.item() == pytest.approx(sigmoid_ref(f, g, t, b), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(out, _open_clip_formula(f, g, t, b))
    # the two towers play symmetric roles
    torch.testing.assert_close(sigmoid_contrastive(g, f, logit_scale=t, logit_bias=b), out)


def test_equals_open_clip_sigliploss_on_a_siglip_model_forward() -> None:
    from open_clip.loss import SigLipLoss

    g = torch.Generator().manual_seed(0)
    f, t = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    log_scale = torch.tensor(math.log(10.0))  # open_clip stores the log of the scale
    bias = torch.tensor(-10.0)
    reference = SigLipLoss()(F.normalize(f, dim=-1), F.normalize(t, dim=-1), log_scale.exp(), bias)
    out = sigmoid_contrastive(f, t, logit_scale=log_scale.exp(), logit_bias=bias)
    torch.testing.assert_close(out, reference)


def test_scale_and_bias_tensors_are_trained_and_never_read() -> None:
    g = torch.Generator().manual_seed(1)
    f, t = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(2))
    log_s = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    out = sigmoid_contrastive(f, t, logit_scale=log_s.exp(), logit_bias=b)
    out.backward()
    # closed form: dL/db = (1/B) Σ_ij -z_ij σ(-z_ij ℓ_ij), dL/dt = (1/B) Σ_ij -z_ij σ(-z_ij ℓ_ij) c_ij
    c = F.normalize(f, dim=-1) @ F.normalize(t, dim=-1).T
    z = 2 * torch.eye(5, dtype=torch.float64) - 1
    w = -z * torch.sigmoid(-z * (10.0 * c - 3.0))
    torch.testing.assert_close(b.grad, w.sum() / 5)
    torch.testing.assert_close(log_s.grad, 10.0 * (w * c).sum() / 5)  # chain rule through exp


def test_gradcheck_features_scale_and_bias() -> None:
    g = torch.Generator().manual_seed(2)
    f = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda f, t, s, b: sigmoid_contrastive(f, t, logit_scale=s, logit_bias=b), (f, t, s, b)
    )


def test_extreme_logits_are_finite_and_exact() -> None:
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    # t = 1e4, b = -1e4: positives ℓ = 0 (log 2 each), negatives ℓ = -1e4 (e^-1e4 each)
    out = sigmoid_contrastive(f, f.detach(), logit_scale=1e4, logit_bias=-1e4)
    assert out.item() == pytest.approx(math.log(2.0), rel=1e-6)
    (grad,) = torch.autograd.grad(out, f)
    assert torch.isfinite(grad).all()
    # positives at ℓ = -1e4 (1e4 each), negatives at ℓ = 0 (log 2 each)
    big = sigmoid_contrastive(f, -f.detach(), logit_scale=1e4, logit_bias=0.0)
    assert big.item() == pytest.approx(1e4 + math.log(2.0), rel=1e-7)
    (grad,) = torch.autograd.grad(big, f)
    assert torch.isfinite(grad).all()


def test_empty_batch_is_zero_with_zero_gradients() -> None:
    f = torch.zeros(0, 3, requires_grad=True)
    s = torch.tensor(10.0, requires_grad=True)
    b = torch.tensor(-10.0, requires_grad=True)
    out = sigmoid_contrastive(f, f, logit_scale=s, logit_bias=b)
    assert out.item() == 0.0
    out.backward()
    assert f.grad.shape == (0, 3)
    assert s.grad.item() == 0.0 and b.grad.item() == 0.0


def test_scale_and_bias_are_required_keywords() -> None:
    # no default: SigLIP's from-scratch initialisation (t = 10, b = -10) is not a pre-trained
    # model's, so a fine-tune must pass its model's values
    f = torch.randn(2, 3)
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'logit_scale'"):
        sigmoid_contrastive(f, f, logit_bias=-10.0)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'logit_bias'"):
        sigmoid_contrastive(f, f, logit_scale=10.0)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="takes 2 positional arguments"):
        sigmoid_contrastive(f, f, 10.0, -10.0)  # type: ignore[misc]


def test_vmap_over_independent_batches() -> None:
    g = torch.Generator().manual_seed(3)
    f, t = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)

    def loss(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return sigmoid_contrastive(a, c, logit_scale=10.0, logit_bias=-5.0)

    expected = torch.stack([loss(a, c) for a, c in zip(f, t)])
    torch.testing.assert_close(torch.vmap(loss)(f, t), expected)


def test_compile_fullgraph_with_learned_scale_and_bias_without_recompiling() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(4)
    log_s = torch.tensor(math.log(10.0), requires_grad=True)
    b = torch.tensor(-10.0, requires_grad=True)

    def step(f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return sigmoid_contrastive(f, t, logit_scale=log_s.exp(), logit_bias=b)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        f = torch.randn(6, 4, generator=g).requires_grad_(True)
        t = torch.randn(6, 4, generator=g)
        out = compiled(f, t)
        (gf, gs, gb) = torch.autograd.grad(out, (f, log_s, b))
        f2 = f.detach().clone().requires_grad_(True)
        ref = step(f2, t)
        torch.testing.assert_close(out, ref)
        for got, want in zip((gf, gs, gb), torch.autograd.grad(ref, (f2, log_s, b))):
            torch.testing.assert_close(got, want)
    assert counters["stats"]["unique_graphs"] == 1


def test_bf16_and_autocast_give_float32() -> None:
    g = torch.Generator().manual_seed(5)
    f, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    out16 = sigmoid_contrastive(f.bfloat16(), t.bfloat16(), logit_scale=10.0, logit_bias=-10.0)
    assert out16.dtype == torch.float32
    ref16 = sigmoid_contrastive(
        f.bfloat16().float(), t.bfloat16().float(), logit_scale=10.0, logit_bias=-10.0
    )
    torch.testing.assert_close(out16, ref16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = sigmoid_contrastive(f, t, logit_scale=10.0, logit_bias=-10.0)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, sigmoid_contrastive(f, t, logit_scale=10.0, logit_bias=-10.0))


# ---------------------------------------------------------------- data parallelism (2 gloo ranks)


def _data(n: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(11)
    img = torch.randn(n, 5, generator=g, dtype=torch.float64)
    txt = torch.randn(n, 5, generator=g, dtype=torch.float64)
    proj_i, proj_t = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(2))
    return img, txt, proj_i, proj_t


def _leaves(proj_i: torch.Tensor, proj_t: torch.Tensor) -> list[torch.Tensor]:
    """The trained tensors: both projections, the log scale and the bias."""
    scalars = [torch.tensor(math.log(3.0), dtype=torch.float64), torch.tensor(-1.5).double()]
    return [p.clone().requires_grad_(True) for p in (proj_i, proj_t, *scalars)]


def _loss(
    img: torch.Tensor, txt: torch.Tensor, p: list[torch.Tensor], **kw: object
) -> torch.Tensor:
    return sigmoid_contrastive(
        img @ p[0], txt @ p[1], logit_scale=p[2].exp(), logit_bias=p[3], **kw
    )


def _check_ddp(rank: int, world_size: int, split: tuple[int, ...]) -> float:
    """Global loss on every rank; DDP-averaged gradient = single-process gradient."""
    n = sum(split)
    img, txt, proj_i, proj_t = _data(n)
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])
    ps = _leaves(proj_i, proj_t)
    single = _loss(img, txt, ps)
    single.backward()
    pd = _leaves(proj_i, proj_t)
    loss = _loss(img[lo:hi], txt[lo:hi], pd, group=dist.group.WORLD)
    loss.backward()  # every rank, an empty one included, reaches the backward's collectives
    torch.testing.assert_close(loss, single.detach(), atol=1e-12, rtol=1e-12)
    for p_ddp, p_single in zip(pd, ps):
        g_avg = p_ddp.grad.clone()
        dist.all_reduce(g_avg)
        torch.testing.assert_close(g_avg / world_size, p_single.grad, atol=1e-12, rtol=1e-10)
    return loss.item()


def _ddp_body(rank: int, world_size: int) -> dict[str, float]:
    uneven = _check_ddp(rank, world_size, (3, 5))
    empty = _check_ddp(rank, world_size, (0, 5))  # rank 0 has no samples

    # local negatives without a group, even with an initialised process group
    img, txt, proj_i, proj_t = _data(8)
    lo, hi = 4 * rank, 4 * rank + 4
    local = _loss(img[lo:hi], txt[lo:hi], _leaves(proj_i, proj_t))
    ddp = _loss(img[lo:hi], txt[lo:hi], _leaves(proj_i, proj_t), group=dist.group.WORLD)
    assert abs(local.item() - ddp.item()) > 1e-3

    # an empty global batch: 0 on every rank, and the backward's collectives complete
    nothing = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    zero = sigmoid_contrastive(
        nothing, nothing, logit_scale=2.0, logit_bias=-1.0, group=dist.group.WORLD
    )
    zero.backward()
    return {"uneven": uneven, "empty_rank": empty, "all_empty": zero.item()}


@pytest.mark.distributed
def test_global_batch_loss_and_ddp_gradient_match_single_process() -> None:
    results = run_distributed(_ddp_body, world_size=2, timeout=120)
    assert results[0] == pytest.approx(results[1], abs=1e-12)
    assert results[0]["all_empty"] == 0.0


def test_matches_open_clip_distributed_sigliploss_after_ddp_averaging() -> None:
    # open_clip's SigLipLoss under world_size W (dist_impl "gather"/"bidir"/...): rank r returns
    # [_loss(f_r, g_r) + Σ_{i≠r} _loss(f_r, g_i, negative_only=True)], a sum over its rows divided
    # by its *local* batch, with gradients flowing to every rank's texts. DDP averages the ranks'
    # gradients, i.e. differentiates (1/W) Σ_r loss_r. Simulated in one process (equal local
    # batches, as open_clip requires): that average and its gradient are our global loss's.
    from open_clip.loss import SigLipLoss

    world, local = 3, 4
    img, txt, proj_i, proj_t = _data(world * local)
    theirs = _leaves(proj_i, proj_t)
    f = F.normalize(img @ theirs[0], dim=-1).split(local)
    g = F.normalize(txt @ theirs[1], dim=-1).split(local)
    scale, bias = theirs[2].exp(), theirs[3]
    oc = SigLipLoss()
    per_rank = [
        oc._loss(f[r], g[r], scale, bias)
        + sum(oc._loss(f[r], g[i], scale, bias, negative_only=True) for i in range(world) if i != r)
        for r in range(world)
    ]
    averaged = torch.stack(per_rank).mean()
    averaged.backward()
    ours = _leaves(proj_i, proj_t)
    loss = _loss(img, txt, ours)
    loss.backward()
    torch.testing.assert_close(loss, averaged.detach(), atol=1e-12, rtol=1e-12)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-10)
    # the per-rank values differ from one another (each rank's rows only)
    assert max(v.item() for v in per_rank) - min(v.item() for v in per_rank) > 1e-3
