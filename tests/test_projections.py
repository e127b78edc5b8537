"""robustft.projections: wise, l2_ball, mars_ball."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference.projections_ref import l2_ball_ref, mars_ball_ref, wise_ref
from strategies import tree_pairs

from robustft import projections
from robustft.projections import l2_ball, mars_ball, wise

BALLS = {"l2_ball": (l2_ball, l2_ball_ref), "mars_ball": (mars_ball, mars_ball_ref)}


def rows_l1(x: torch.Tensor) -> torch.Tensor:
    r = x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)
    return r.double().abs().sum(1)


def fro(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.double()))


def assert_close_tree(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(ref)
    for k, v in got.items():
        tol = 1e-5 if v.dtype == torch.float32 else 1e-11
        torch.testing.assert_close(v.double(), ref[k].double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------- wise


def test_wise_hand_values_and_per_key_alpha() -> None:
    anchor = {"w": torch.tensor([0.0, 2.0]), "b": torch.tensor([1.0])}
    params = {"w": torch.tensor([4.0, 6.0]), "b": torch.tensor([3.0])}
    out = wise(anchor, params, alpha=0.25)
    assert torch.equal(out["w"], torch.tensor([1.0, 3.0]))
    assert torch.equal(out["b"], torch.tensor([1.5]))
    out = wise(anchor, params, alpha={"w": 0.5, "b": 1.0})
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(out["b"], torch.tensor([3.0]))


@given(pair=tree_pairs(n=2), alpha=st.floats(-0.5, 1.5))
def test_wise_endpoints_and_reference(pair: list[dict[str, torch.Tensor]], alpha: float) -> None:
    anchor, params = pair
    for k, v in wise(anchor, params, alpha=0.0).items():
        assert torch.equal(v, anchor[k])
    for k, v in wise(anchor, params, alpha=1.0).items():
        assert torch.equal(v, params[k])
    assert_close_tree(wise(anchor, params, alpha=alpha), wise_ref(anchor, params, alpha))


@given(pair=tree_pairs(n=2), a=st.floats(0, 1), b=st.floats(0, 1), lam=st.floats(0, 1))
def test_wise_is_linear_in_alpha(
    pair: list[dict[str, torch.Tensor]], a: float, b: float, lam: float
) -> None:
    anchor, params = pair
    mixed = wise(anchor, params, alpha=lam * a + (1 - lam) * b)
    wa, wb = wise(anchor, params, alpha=a), wise(anchor, params, alpha=b)
    assert_close_tree(mixed, {k: lam * wa[k].double() + (1 - lam) * wb[k].double() for k in wa})


def test_wise_gradient_in_alpha_and_params() -> None:
    anchor = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    params = {"w": torch.tensor([4.0, 3.0], dtype=torch.float64)}

    def f(alpha: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return wise(anchor, p, alpha=alpha)["w"].sum()

    ga, gp = torch.func.grad(f, argnums=(0, 1))(torch.tensor(0.3, dtype=torch.float64), params)
    assert float(ga) == pytest.approx(8.0)  # sum(params - anchor)
    torch.testing.assert_close(gp["w"], torch.full((2,), 0.3, dtype=torch.float64))


@pytest.mark.parametrize(
    ("alpha", "err", "match"),
    [
        (math.nan, ValueError, r"wise: alpha must be a finite real number, got nan"),
        (math.inf, ValueError, r"wise: alpha must be a finite real number, got inf"),
        ("0.5", TypeError, r"wise: alpha must be a real number, a 0-d floating tensor or a dict"),
        (True, TypeError, r"wise: alpha must be a real number"),
        (torch.ones(2), TypeError, r"wise: alpha must be a real number or a 0-d floating tensor"),
        ({"w": 0.5}, ValueError, r"wise: alpha given per tensor must have the same keys"),
        ({"w": 0.5, "b": "x"}, TypeError, r"wise: alpha\['b'\] must be a real number"),
    ],
)
def test_wise_bad_alpha(alpha: Any, err: type, match: str) -> None:
    tree = {"w": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(err, match=match):
        wise(tree, tree, alpha=alpha)


def test_wise_mismatched_trees() -> None:
    with pytest.raises(ValueError, match=r"wise: params must have the same keys as anchor"):
        wise({"w": torch.zeros(2)}, {"v": torch.zeros(2)}, alpha=0.5)
    with pytest.raises(TypeError, match=r"wise: anchor and params must have the same dtype"):
        wise({"w": torch.zeros(2)}, {"w": torch.zeros(2, dtype=torch.float64)}, alpha=0.5)
    with pytest.raises(TypeError, match=r"wise: anchor and params must hold floating-point"):
        wise(
            {"w": torch.zeros(2, dtype=torch.int64)},
            {"w": torch.zeros(2, dtype=torch.int64)},
            alpha=0.5,
        )


# ---------------------------------------------------------------- balls: values


def test_l2_ball_hand_values() -> None:
    anchor = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])}
    params = {"w": torch.tensor([4.0, 5.0]), "b": torch.tensor([0.5])}  # deltas (3, 4) and 0.5
    out = l2_ball(params, anchor, radius=1.0)
    torch.testing.assert_close(out["w"], torch.tensor([1.6, 1.8]))
    assert torch.equal(out["b"], params["b"])  # inside: returned exactly
    out = l2_ball(params, anchor, radius={"w": 10.0, "b": 0.25})
    assert torch.equal(out["w"], params["w"])
    assert torch.equal(out["b"], torch.tensor([0.25]))
    out = l2_ball(params, anchor, radius=0.0)
    assert all(torch.equal(out[k], anchor[k]) for k in anchor)


def test_mars_ball_hand_values() -> None:
    anchor = {"w": torch.zeros(2, 2), "v": torch.zeros(3), "s": torch.tensor(1.0)}
    params = {
        "w": torch.tensor([[3.0, -1.0], [0.5, 0.0]]),  # row L1 norms 4 and 0.5
        "v": torch.tensor([1.0, -2.0, 1.0]),  # one row, L1 norm 4
        "s": torch.tensor(4.0),  # a 0-d tensor is one row of one element
    }
    out = mars_ball(params, anchor, radius=2.0)
    assert torch.equal(out["w"], torch.tensor([[1.5, -0.5], [0.5, 0.0]]))
    assert torch.equal(out["v"], torch.tensor([0.5, -1.0, 0.5]))
    assert torch.equal(out["s"], torch.tensor(3.0))
    assert out["s"].shape == ()


@pytest.mark.parametrize("name", list(BALLS))
@given(pair=tree_pairs(n=2), frac=st.floats(0.05, 3.0))
def test_balls_match_reference_and_geometry(
    name: str, pair: list[dict[str, torch.Tensor]], frac: float
) -> None:
    fn, ref_fn = BALLS[name]
    anchor, params = pair
    radius = frac * 3.0  # the strategy's entries are ~N(0, 3^2): both sides of the sphere occur
    out = fn(params, anchor, radius=radius)
    assert_close_tree(out, ref_fn(params, anchor, radius))
    for k, v in out.items():
        assert v.dtype == params[k].dtype and v.shape == params[k].shape
        delta, new = params[k] - anchor[k], v - anchor[k]
        norms = [fro(delta)] if name == "l2_ball" else rows_l1(delta).tolist()
        new_norms = [fro(new)] if name == "l2_ball" else rows_l1(new).tolist()
        for n, m in zip(norms, new_norms):
            if n <= radius:  # identity inside the ball
                assert m == pytest.approx(n, rel=1e-6, abs=1e-12)
            else:  # on the sphere outside it
                assert m == pytest.approx(radius, rel=1e-5)
        if name == "l2_ball" and norms[0] <= radius:
            assert torch.equal(v, params[k])


@pytest.mark.parametrize("name", list(BALLS))
@given(pair=tree_pairs(n=2), radius=st.floats(0.1, 10.0))
def test_balls_are_idempotent(
    name: str, pair: list[dict[str, torch.Tensor]], radius: float
) -> None:
    fn, _ = BALLS[name]
    anchor, params = pair
    once = fn(params, anchor, radius=radius)
    twice = fn(once, anchor, radius=radius)
    assert_close_tree(twice, once)


@pytest.mark.parametrize("name", list(BALLS))
def test_fused_norm_pass_matches_reference_on_large_tensors(name: str) -> None:
    # > 2**18 elements: the chunked difference-norm pass; rows both narrower and wider than a chunk
    g = torch.Generator().manual_seed(0)
    shapes = {"wide": (3, 2**18 + 5), "tall": (2**12 + 1, 70), "flat": (2**18 + 7,)}
    anchor = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    params = {k: v + torch.randn(v.shape, generator=g) for k, v in anchor.items()}
    fn, ref_fn = BALLS[name]
    radius = {"wide": 50.0, "tall": 30.0, "flat": 100.0}
    fast = fn(params, anchor, radius=radius)
    with torch.enable_grad():  # the autograd path computes the norms without chunking
        slow = fn({k: v.clone().requires_grad_() for k, v in params.items()}, anchor, radius=radius)
    for k in anchor:
        ref = ref_fn({k: params[k]}, {k: anchor[k]}, radius[k])[k]
        torch.testing.assert_close(fast[k].double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast[k], slow[k].detach(), rtol=1e-5, atol=1e-5)


def test_l2_ball_bf16_lands_on_the_sphere() -> None:
    g = torch.Generator().manual_seed(0)
    anchor = {"w": torch.randn(64, 32, generator=g).bfloat16()}
    params = {"w": (anchor["w"].float() + torch.randn(64, 32, generator=g)).bfloat16()}
    out = l2_ball(params, anchor, radius=5.0)
    assert out["w"].dtype == torch.bfloat16
    assert fro(out["w"].float() - anchor["w"].float()) == pytest.approx(5.0, rel=1e-2)


def test_balls_never_mutate_inputs() -> None:
    anchor = {"w": torch.randn(4, 3)}
    params = {"w": anchor["w"] + 5.0}
    saved = (anchor["w"].clone(), params["w"].clone())
    for fn in (l2_ball, mars_ball):
        fn(params, anchor, radius=1.0)
    wise(anchor, params, alpha=0.3)
    assert torch.equal(anchor["w"], saved[0]) and torch.equal(params["w"], saved[1])


# ---------------------------------------------------------------- balls: gradients


@pytest.mark.parametrize("name", list(BALLS))
def test_balls_gradcheck_in_params_and_radius(name: str) -> None:
    fn, _ = BALLS[name]
    g = torch.Generator().manual_seed(1)
    anchor = torch.randn(3, 4, generator=g, dtype=torch.float64)
    delta = torch.randn(3, 4, generator=g, dtype=torch.float64)
    radius = torch.tensor(1.3, dtype=torch.float64)  # norms ~3.5 (l2) and ~3 (rows): outside

    def f(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return fn({"w": p}, {"w": anchor}, radius=r)["w"]

    p = (anchor + delta).requires_grad_()
    assert torch.autograd.gradcheck(f, (p, radius.clone().requires_grad_()))
    # inside the ball the projection is the identity and does not depend on the radius
    inside = (anchor + 0.01 * delta).requires_grad_()
    assert torch.autograd.gradcheck(f, (inside, radius.clone().requires_grad_()))


@pytest.mark.parametrize("name", list(BALLS))
@pytest.mark.parametrize("r", [0.0, 0.7])
def test_balls_finite_gradient_at_zero_deviation(name: str, r: float) -> None:
    fn, _ = BALLS[name]
    anchor = torch.randn(3, 2, dtype=torch.float64)
    p = anchor.clone().requires_grad_()
    radius = torch.tensor(r, dtype=torch.float64, requires_grad=True)
    out = fn({"w": p}, {"w": anchor}, radius=radius)["w"]
    (out * torch.arange(6.0, dtype=torch.float64).reshape(3, 2)).sum().backward()
    assert p.grad is not None and radius.grad is not None
    assert torch.isfinite(p.grad).all() and torch.isfinite(radius.grad).all()
    assert torch.equal(out.detach(), anchor)


def test_l2_ball_radius_gradient_hand_value() -> None:
    # outside the ball out = a + (r / |d|) d, so d/dr sum(out) = sum(d) / |d| = 7 / 5
    anchor = {"w": torch.zeros(2, dtype=torch.float64)}
    params = {"w": torch.tensor([3.0, 4.0], dtype=torch.float64)}
    grad = torch.func.grad(lambda r: l2_ball(params, anchor, radius=r)["w"].sum())(
        torch.tensor(2.0, dtype=torch.float64)
    )
    assert float(grad) == pytest.approx(7.0 / 5.0)


def test_projections_compile_fullgraph() -> None:
    g = torch.Generator().manual_seed(0)
    anchor = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    params = {k: v + torch.randn(v.shape, generator=g) for k, v in anchor.items()}

    def f(p: dict[str, torch.Tensor], a: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [wise(a, p, alpha=0.3), l2_ball(p, a, radius=0.5), mars_ball(p, a, radius=0.5)]

    eager = f(params, anchor)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(params, anchor)
    for e, c in zip(eager, compiled):
        assert_close_tree(c, e)


# ---------------------------------------------------------------- balls: bad input


@pytest.mark.parametrize("name", list(BALLS))
@pytest.mark.parametrize(
    ("radius", "err", "match"),
    [
        (-1.0, ValueError, r"{fn}: radius must be in \[0.0, inf\), got -1.0"),
        (math.inf, ValueError, r"{fn}: radius must be a finite number >= 0, got inf"),
        (math.nan, ValueError, r"{fn}: radius must not be NaN"),
        ("1", TypeError, r"{fn}: radius must be a real number, got '1'"),
        (torch.ones(2), TypeError, r"{fn}: radius must be a real number >= 0 or a 0-d floating"),
        ({"w": 1.0}, ValueError, r"{fn}: radius given per tensor must have the same keys"),
        ({"w": 1.0, "b": -0.5}, ValueError, r"{fn}: radius\['b'\] must be in \[0.0, inf\)"),
    ],
)
def test_balls_bad_radius(name: str, radius: Any, err: type, match: str) -> None:
    fn, _ = BALLS[name]
    tree = {"w": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(err, match=match.format(fn=name)):
        fn(tree, tree, radius=radius)


@pytest.mark.parametrize("name", list(BALLS))
def test_balls_mismatched_trees(name: str) -> None:
    fn, _ = BALLS[name]
    with pytest.raises(
        ValueError,
        match=rf"{name}: params must have the same keys as anchor; missing keys \['w'\], "
        r"unexpected keys \['v'\]",
    ):
        fn({"v": torch.zeros(2)}, {"w": torch.zeros(2)}, radius=1.0)
    with pytest.raises(ValueError, match=rf"{name}: anchor and params must have the same shape"):
        fn({"w": torch.zeros(3)}, {"w": torch.zeros(2)}, radius=1.0)
    with pytest.raises(TypeError, match=rf"{name}: anchor and params must hold floating-point"):
        fn(
            {"w": torch.zeros(2, dtype=torch.int32)},
            {"w": torch.zeros(2, dtype=torch.int32)},
            radius=1.0,
        )


def test_public_names() -> None:
    assert sorted(projections.__all__) == ["l2_ball", "mars_ball", "tpgm", "wise"]
