"""robustft.tta: hand values, the authors' functions (tests/reference/tta_ref.py), properties, grads."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import tta_ref as ref
from strategies import tensors

from robustft import tta

F64 = torch.float64
CFG = {
    "shots_pos": 3,
    "shots_neg": 2,
    "alpha_pos": 2.0,
    "beta_pos": 5.0,
    "alpha_neg": 0.117,
    "beta_neg": 1.0,
    "entropy_bounds": (0.2, 0.5),
    "mask_bounds": (0.03, 1.0),
}


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ TPT


def test_marginal_entropy_hand_values() -> None:
    sure = torch.tensor([[30.0, -30.0], [-30.0, 30.0]], dtype=F64)
    close(tta.marginal_entropy(sure), torch.tensor(math.log(2), dtype=F64))
    same = torch.tensor([[1.0, 2.0, 3.0]] * 4, dtype=F64)
    close(tta.marginal_entropy(same), tta.marginal_entropy(same[:1]))
    p = torch.softmax(same[0], -1)
    close(tta.marginal_entropy(same), -(p * p.log()).sum())
    # mean of probabilities, not of logits: [0.9, 0.1] and [0.1, 0.9] average to uniform
    z = torch.tensor([[math.log(9.0), 0.0], [0.0, math.log(9.0)]], dtype=F64)
    close(tta.marginal_entropy(z), torch.tensor(math.log(2), dtype=F64))


def test_marginal_entropy_underflow_is_exact_and_finite() -> None:
    z = torch.tensor([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0]], dtype=F64, requires_grad=True)
    h = tta.marginal_entropy(z)
    (g,) = torch.autograd.grad(h, z)
    assert float(h.detach()) == 0.0 and torch.isfinite(g).all()
    close(h.detach(), ref.avg_entropy(z.detach()))


def test_confident_views_hand_values_and_authors_count() -> None:
    z = torch.tensor([[0.0, 0.0], [4.0, 0.0], [9.0, 0.0], [1.0, 0.0]])
    assert tta.confident_views(z, fraction=0.5).tolist() == [2, 1]
    assert tta.confident_views(z, fraction=1.0).tolist() == [2, 1, 3, 0]
    big = torch.randn(64, 5)
    assert tta.confident_views(big).shape == (6,)  # int(64 * 0.1) = 6, as TPT
    # int(100 * 0.29) = 28 in floating point; the authors' expression, kept
    assert tta.confident_views(torch.randn(100, 3), fraction=0.29).shape == (28,)


def test_tpt_loss_hand_value() -> None:
    z = torch.tensor([[9.0, 0.0], [0.0, 0.0], [0.0, 9.0], [0.0, 0.0]], dtype=F64)
    close(tta.tpt_loss(z, fraction=0.5), torch.tensor(math.log(2), dtype=F64))
    close(tta.tpt_loss(z, fraction=0.25), tta.marginal_entropy(z[:1]))


def _views_with_ties(g: torch.Generator, v: int, c: int) -> torch.Tensor:
    z = torch.randn(v, c, generator=g, dtype=F64) * 3
    z[1::3] = z[0]  # exact entropy ties between views
    return z


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_tpt_matches_authors_functions(fraction: float) -> None:
    g = torch.Generator().manual_seed(1)
    for v, c in [(64, 10), (20, 3), (10, 7)]:
        z = _views_with_ties(g, v, c)
        sel, idx = ref.select_confident_samples(z, fraction)
        assert tta.confident_views(z, fraction=fraction).tolist() == idx.tolist()
        close(tta.tpt_loss(z, fraction=fraction), ref.avg_entropy(sel))
        close(tta.marginal_entropy(z), ref.avg_entropy(z))


def test_tpt_batched_over_images_equals_per_image() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.stack([_views_with_ties(g, 30, 4) for _ in range(5)])
    per = torch.stack([tta.tpt_loss(zi, fraction=0.2) for zi in z])
    close(tta.tpt_loss(z, fraction=0.2, reduction="none"), per)
    close(tta.tpt_loss(z, fraction=0.2, reduction="sum"), per.sum())
    close(tta.tpt_loss(z, fraction=0.2), per.mean())
    idx = tta.confident_views(z, fraction=0.2)
    assert idx.shape == (5, 6)
    for i in range(5):
        assert idx[i].tolist() == tta.confident_views(z[i], fraction=0.2).tolist()
    close(tta.marginal_entropy(z), torch.stack([ref.avg_entropy(zi) for zi in z]))
    empty = torch.zeros(0, 30, 4, dtype=F64, requires_grad=True)
    out = tta.tpt_loss(empty, fraction=0.2)
    assert float(out.detach()) == 0.0 and tta.tpt_loss(
        empty, fraction=0.2, reduction="none"
    ).shape == (0,)


def test_tpt_loss_reuses_indices_like_later_tpt_steps() -> None:
    g = torch.Generator().manual_seed(3)
    first = torch.randn(40, 5, generator=g, dtype=F64)
    later = torch.randn(40, 5, generator=g, dtype=F64)
    idx = tta.confident_views(first, fraction=0.1)
    close(tta.tpt_loss(later, indices=idx), ref.avg_entropy(later[idx]))
    assert not torch.equal(tta.tpt_loss(later), tta.tpt_loss(later, indices=idx))


def test_tpt_gradient_reaches_only_selected_views() -> None:
    z = torch.randn(20, 4, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(tta.tpt_loss(z, fraction=0.2), z)
    idx = set(tta.confident_views(z, fraction=0.2).tolist())
    for v in range(20):
        assert (v in idx) == bool(g[v].abs().sum() > 0)


def test_text_dispersion_hand_values() -> None:
    c = 5
    eye = torch.eye(c, dtype=F64) * torch.arange(1, c + 1, dtype=F64)[:, None]  # norms ignored
    close(tta.text_dispersion(eye), torch.tensor(math.sqrt((c - 1) / c), dtype=F64))
    same = torch.ones(3, 4, dtype=F64)
    assert float(tta.text_dispersion(same)) == 0.0
    close(tta.text_dispersion(torch.stack([eye, -eye])), tta.text_dispersion(eye).expand(2))


def test_text_dispersion_matches_paper_transcription() -> None:
    g = torch.Generator().manual_seed(4)
    for c, d in [(2, 3), (10, 16), (7, 2)]:
        t = torch.randn(c, d, generator=g, dtype=F64)
        close(tta.text_dispersion(t), torch.tensor(ref.text_dispersion(t), dtype=F64))


def test_ctpt_sign_and_value() -> None:
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 16, 3, generator=g, dtype=F64)
    t = torch.randn(2, 3, 8, generator=g, dtype=F64, requires_grad=True)
    per = tta.ctpt_loss(z, text_features=t, fraction=0.25, weight=50.0, reduction="none")
    want = tta.tpt_loss(z, fraction=0.25, reduction="none") - 50.0 * tta.text_dispersion(t)
    close(per, want)
    # minimising the objective increases the dispersion: a small gradient step raises ATFD
    (grad,) = torch.autograd.grad(per.sum(), t)
    before = tta.text_dispersion(t).detach()
    after = tta.text_dispersion((t - 1e-3 * grad).detach())
    assert (after > before).all()
    shared = tta.ctpt_loss(z, text_features=t[0], fraction=0.25, weight=2.0, reduction="sum")
    close(
        shared,
        (tta.tpt_loss(z, fraction=0.25, reduction="none") - 2.0 * tta.text_dispersion(t[0])).sum(),
    )
    w = torch.tensor(3.0, dtype=F64)
    close(
        tta.ctpt_loss(z[0], text_features=t[0], fraction=0.25, weight=w),
        tta.tpt_loss(z[0], fraction=0.25) - 3.0 * tta.text_dispersion(t[0]),
    )


@given(tensors((2, 6, 4), F64, scale=20.0))
def test_marginal_entropy_in_zero_log_c(z: torch.Tensor) -> None:
    h = tta.marginal_entropy(z)
    assert (h >= -1e-12).all() and (h <= math.log(4) + 1e-12).all()
    # the marginal is at least as uncertain as the mean of the views' entropies (concavity)
    logp = torch.log_softmax(z, -1)
    mean_h = -(logp.exp() * logp).sum(-1).mean(-1)
    assert (h >= mean_h - 1e-12).all()


@given(tensors((12, 5), F64, scale=10.0), st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0]))
def test_selection_picks_lowest_entropy_views(z: torch.Tensor, fraction: float) -> None:
    idx = tta.confident_views(z, fraction=fraction)
    h = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    chosen = torch.zeros(12, dtype=torch.bool)
    chosen[idx] = True
    assert idx.numel() == int(12 * fraction) and int(chosen.sum()) == idx.numel()
    if (~chosen).any():
        assert h[chosen].max() <= h[~chosen].min()
    assert (h[idx][1:] >= h[idx][:-1]).all()  # most confident first


def test_gradcheck_losses() -> None:
    g = torch.Generator().manual_seed(6)
    z = torch.randn(2, 10, 3, generator=g, dtype=F64, requires_grad=True)
    t = torch.randn(2, 3, 4, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(tta.marginal_entropy, (z,))
    assert torch.autograd.gradcheck(lambda x: tta.tpt_loss(x, fraction=0.3), (z,))
    assert torch.autograd.gradcheck(tta.text_dispersion, (t,))
    assert torch.autograd.gradcheck(
        lambda x, y: tta.ctpt_loss(x, text_features=y, fraction=0.3, weight=5.0), (z, t)
    )


def test_finite_gradients_at_edges() -> None:
    t = torch.ones(3, 4, dtype=F64, requires_grad=True)  # ATFD = 0: a norm of zero vectors
    (g,) = torch.autograd.grad(tta.text_dispersion(t), t)
    assert torch.isfinite(g).all()
    z = torch.tensor([[1e4, -1e4], [-1e4, 1e4], [0.0, 0.0]], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(tta.tpt_loss(z, fraction=0.7), z)
    assert torch.isfinite(g).all()


def test_half_precision_computes_in_float32() -> None:
    z = torch.randn(16, 5).to(torch.bfloat16)
    t = torch.randn(5, 8).to(torch.bfloat16)
    assert tta.marginal_entropy(z).dtype == torch.float32
    assert tta.tpt_loss(z).dtype == torch.float32
    assert tta.text_dispersion(t).dtype == torch.float32
    close(tta.tpt_loss(z).double(), tta.tpt_loss(z.double()).to(torch.float32).double())


def test_tpt_under_func_grad_and_vmap() -> None:
    z = torch.randn(3, 20, 4, dtype=F64)
    per_image = torch.func.vmap(lambda x: tta.tpt_loss(x, fraction=0.2))(z)
    close(per_image, tta.tpt_loss(z, fraction=0.2, reduction="none"))
    g = torch.func.grad(lambda x: tta.tpt_loss(x, fraction=0.2, reduction="sum"))(z)
    close(
        g,
        torch.autograd.grad(tta.tpt_loss(z.requires_grad_(), fraction=0.2, reduction="sum"), z)[0],
    )


def test_views_stacks_original_then_random_views() -> None:
    torchvision = pytest.importorskip("torchvision")
    T = torchvision.transforms
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    aug = T.Compose(
        [
            T.RandomResizedCrop(32),
            T.RandomHorizontalFlip(),
            T.AugMix(severity=1, mixture_width=3, chain_depth=-1, alpha=1.0, all_ops=False),
            T.ConvertImageDtype(torch.float32),
        ]
    )
    orig = T.Compose([T.Resize(32), T.CenterCrop(32), T.ConvertImageDtype(torch.float32)])
    torch.manual_seed(0)
    x = tta.views(image, 7, aug, original=orig)
    torch.manual_seed(0)
    again = torch.stack([orig(image)] + [aug(image) for _ in range(7)])
    assert x.shape == (8, 3, 32, 32) and torch.equal(x, again)
    assert torch.equal(x[0], orig(image))
    assert tta.views(image, 3, orig).shape == (3, 3, 32, 32)


# ------------------------------------------------------------------------------------------ TDA


def _sample(g: torch.Generator, c: int, d: int, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    f = torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=F64), dim=0)
    z = torch.randn(views, c, generator=g, dtype=F64) * float(torch.rand((), generator=g) * 8)
    return f, z


def _ref_rows(cache: dict, c: int) -> list[list[float]]:
    return [[float(item[1]) for item in cache.get(k, [])] for k in range(c)]


def _same_rows(a: list[list[float]], b: list[list[float]]) -> bool:
    """Same counts per class and the same entropies up to float64 rounding."""
    return [len(r) for r in a] == [len(r) for r in b] and all(
        math.isclose(x, y, rel_tol=1e-13, abs_tol=1e-15)
        for ra, rb in zip(a, b)
        for x, y in zip(ra, rb)
    )


def _state_rows(entropy: torch.Tensor, count: torch.Tensor) -> list[list[float]]:
    return [entropy[k, : int(count[k])].tolist() for k in range(entropy.shape[0])]


@pytest.mark.parametrize(
    "cfg",
    [
        CFG,
        {**CFG, "shots_pos": 1, "shots_neg": 1, "entropy_bounds": (0.0, 0.7)},
        {
            **CFG,
            "shots_pos": 4,
            "shots_neg": 3,
            "entropy_bounds": (0.05, 0.3),
            "mask_bounds": (0.1, 0.9),
        },
        {**CFG, "shots_neg": 0},
    ],
)
def test_tda_matches_authors_update_and_cache_logits(cfg: dict) -> None:
    g = torch.Generator().manual_seed(7)
    c, d = 4, 6
    cache = tta.tda(**cfg)
    state = cache.init(c, d, dtype=F64)
    pos, neg = {}, {}
    repeat = None
    for step in range(60):
        views = [1, 1, 5][step % 3]
        f, z = _sample(g, c, d, views)
        if step % 7 == 3 and repeat is not None:
            z = repeat  # the same logits again: exact entropy ties, another feature
        repeat = z
        ref.tda_step(pos, neg, f[None], z, cfg)
        state = cache.update(state, f, z if z.shape[0] > 1 else z[0])
        assert _same_rows(_state_rows(state.pos_entropy, state.pos_count), _ref_rows(pos, c))
        assert _same_rows(_state_rows(state.neg_entropy, state.neg_count), _ref_rows(neg, c))
        for k in range(c):
            for s, item in enumerate(pos.get(k, [])):
                assert torch.equal(state.pos_keys[k, s], item[0][0])
            for s, item in enumerate(neg.get(k, [])):
                assert torch.equal(state.neg_keys[k, s], item[0][0])
                assert torch.equal(state.neg_probs[k, s], item[2][0])
        q = torch.nn.functional.normalize(torch.randn(3, d, generator=g, dtype=F64), dim=-1)
        close(cache.logits(state, q), ref.tda_logits(pos, neg, q, cfg, c))
        close(cache.logits(state, q[0]), ref.tda_logits(pos, neg, q[:1], cfg, c)[0])
    assert int(state.pos_count.sum()) == sum(len(v) for v in pos.values()) > 0
    assert int(state.neg_count.sum()) == sum(len(v) for v in neg.values())
    if cfg["shots_neg"]:
        assert int(state.neg_count.sum()) > 0


def test_tda_hand_values_and_capacity_edge() -> None:
    cache = tda1 = tta.tda(shots_pos=2, shots_neg=0, alpha_pos=1.0, beta_pos=0.0)
    s = tda1.init(2, 2, dtype=F64)
    e = torch.tensor([1.0, 0.0], dtype=F64)
    zs = [torch.tensor([a, 0.0], dtype=F64) for a in (1.0, 3.0, 2.0, 5.0, 5.0)]
    h = [float(ref.softmax_entropy(z[None])[0]) for z in zs]
    for z in zs[:2]:
        s = cache.update(s, e, z)
    assert _same_rows(s.pos_entropy[:1].tolist(), [[h[1], h[0]]]) and s.pos_count.tolist() == [2, 0]
    s = cache.update(s, e, zs[2])  # full: replaces the worst (z=1), lands in the middle
    assert _same_rows(s.pos_entropy[:1].tolist(), [[h[1], h[2]]])
    s = cache.update(s, 2 * e, zs[3])
    s2 = cache.update(s, 3 * e, zs[4])  # equal entropy to the best, better than the worst
    assert _same_rows(s2.pos_entropy[:1].tolist(), [[h[3], h[4]]])
    assert s2.pos_keys[0, :, 0].tolist() == [2.0, 3.0]  # ties: the older entry first
    s3 = cache.update(s2, 4 * e, zs[4])  # equal to the worst: not strictly lower, no change
    assert all(torch.equal(a, b) for a, b in zip(s3[:7], s2[:7]))
    # beta = 0: every filled slot weighs exp(0) = 1, alpha = 1: counts per class
    assert cache.logits(s3, torch.zeros(2, dtype=F64)).tolist() == [2.0, 0.0]


def test_tda_negative_gate_and_mask() -> None:
    c = 3
    cache = tta.tda(shots_pos=0, shots_neg=1, alpha_neg=1.0, beta_neg=0.0, mask_bounds=(0.2, 0.5))
    s = cache.init(c, 2, dtype=F64)
    f = torch.tensor([1.0, 0.0], dtype=F64)
    sure = torch.tensor([20.0, 0.0, 0.0], dtype=F64)  # H / log2 3 ~ 0: below the gate
    assert torch.equal(cache.update(s, f, sure).neg_count, s.neg_count)
    flat = torch.zeros(c, dtype=F64)  # H / log2 3 = ln 2 ~ 0.69: above 0.5
    assert torch.equal(cache.update(s, f, flat).neg_count, s.neg_count)
    z = torch.log(torch.tensor([0.7, 0.25, 0.05], dtype=F64))
    ratio = float(ref.softmax_entropy(z[None])[0]) / math.log2(c)
    assert 0.2 < ratio < 0.5
    s = cache.update(s, f, z)
    assert s.neg_count.tolist() == [1, 0, 0]
    # mask (0.2, 0.5): only class 1's probability 0.25 counts; the adjustment is subtracted
    close(cache.logits(s, f), torch.tensor([0.0, -1.0, 0.0], dtype=F64))


@given(st.data())
def test_tda_cache_properties(data: st.DataObject) -> None:
    c, d = 3, 2
    shots = data.draw(st.integers(1, 3))
    cache = tta.tda(shots_pos=shots, shots_neg=shots, entropy_bounds=(-math.inf, math.inf))
    state = cache.init(c, d, dtype=F64)
    fresh = cache.init(c, d, dtype=F64)
    for i in range(data.draw(st.integers(1, 12))):
        z = data.draw(tensors((c,), F64, scale=6.0))
        f = torch.full((d,), float(i), dtype=F64)
        new = cache.update(state, f, z)
        k = int(torch.argmax(z))
        h = float(tta.marginal_entropy(z[None]))
        for cnt, ent, old_cnt, old_ent in [
            (new.pos_count, new.pos_entropy, state.pos_count, state.pos_entropy),
            (new.neg_count, new.neg_entropy, state.neg_count, state.neg_entropy),
        ]:
            assert (cnt <= shots).all() and (cnt >= old_cnt).all()
            row = ent[k, : int(cnt[k])]
            assert (row[1:] >= row[:-1]).all()  # sorted
            others = [j for j in range(c) if j != k]
            assert torch.equal(ent[others], old_ent[others])
            if int(old_cnt[k]) == shots:
                worst = float(old_ent[k, -1])
                changed = not torch.equal(ent[k], old_ent[k])
                assert changed == (h < worst)  # replaces the worst only if strictly lower
                if changed:
                    assert float(ent[k].max()) <= worst
        state = new
    # episodic reset: init again gives a fresh state, equal to the first one, whatever came before
    reset = cache.init(c, d, dtype=F64)
    assert all(torch.equal(a, b) for a, b in zip(reset[:7], fresh[:7]))
    assert reset.settings == state.settings
    assert torch.equal(cache.logits(reset, torch.ones(d, dtype=F64)), torch.zeros(c, dtype=F64))


def test_tda_update_is_pure_and_checkpointable() -> None:
    cache = tta.tda()
    s0 = cache.init(5, 4)
    copies = [t.clone() for t in s0[:7]]
    s1 = cache.update(s0, torch.randn(4), torch.randn(5))
    assert all(torch.equal(a, b) for a, b in zip(s0[:7], copies))
    assert int(s1.pos_count.sum()) == 1
    buf = io.BytesIO()
    torch.save(s1, buf)
    buf.seek(0)
    back = torch.load(buf)  # weights_only=True by default
    assert isinstance(back, tta.TdaState) and back.settings == s1.settings
    assert all(torch.equal(a, b) for a, b in zip(back[:7], s1[:7]))
    q = torch.randn(2, 4)
    assert torch.equal(cache.logits(back, q), cache.logits(s1, q))


def test_tda_dtypes() -> None:
    cache = tta.tda()
    s = cache.init(3, 4)
    assert s.pos_keys.dtype == torch.float32 and s.pos_count.dtype == torch.int64
    s = cache.update(s, torch.randn(4, dtype=F64), torch.randn(3).to(torch.bfloat16))
    assert s.pos_keys.dtype == torch.float32
    assert cache.logits(s, torch.randn(4).to(torch.bfloat16)).dtype == torch.float32
    assert cache.logits(s, torch.randn(4, dtype=F64)).dtype == F64


def test_tda_update_compiles_once() -> None:
    cache = tta.tda(entropy_bounds=(-math.inf, math.inf))
    state = cache.init(4, 3, dtype=F64)
    eager = state
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(cache.update, fullgraph=True, dynamic=False, backend=counter)
    g = torch.Generator().manual_seed(8)
    for _ in range(6):
        f, z = _sample(g, 4, 3, 1)
        state = step(state, f, z[0])
        eager = cache.update(eager, f, z[0])
    assert counter.frame_count == 1
    assert torch.equal(state.pos_count, eager.pos_count)
    assert torch.equal(state.neg_count, eager.neg_count)
    for a, b in zip(state[:7], eager[:7]):
        close(a, b)


def test_tda_bounds_are_open_intervals() -> None:
    c = 3
    z = torch.log(torch.tensor([0.7, 0.25, 0.05], dtype=F64))
    f = torch.tensor([1.0, 0.0], dtype=F64)
    ratio = float(tta.marginal_entropy(z[None])) / math.log2(c)  # the gate's own arithmetic
    for bounds, admitted in [
        ((ratio, ratio + 0.1), False),
        ((ratio - 0.1, ratio), False),
        ((math.nextafter(ratio, -math.inf), ratio + 0.1), True),
    ]:
        cache = tta.tda(shots_pos=0, shots_neg=1, entropy_bounds=bounds)
        s = cache.update(cache.init(c, 2, dtype=F64), f, z)
        assert int(s.neg_count.sum()) == int(admitted)
    p = torch.softmax(z[None], -1).mean(0)  # the stored probabilities, bit for bit
    for bounds, want in [
        ((float(p[1]), 1.0), [-1.0, 0.0, 0.0]),  # p_1 on the lower bound: not a pseudo-label
        ((0.0, float(p[0])), [0.0, -1.0, -1.0]),  # p_0 on the upper bound: not one either
    ]:
        cache = tta.tda(
            shots_pos=0,
            shots_neg=1,
            alpha_neg=1.0,
            beta_neg=0.0,
            entropy_bounds=(0.0, 1.0),
            mask_bounds=bounds,
        )
        s = cache.update(cache.init(c, 2, dtype=F64), f, z)
        close(cache.logits(s, f), torch.tensor(want, dtype=F64))
