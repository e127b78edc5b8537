"""robustft.projections: l2_ball, mars_ball, their in-place forms, and the error table."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from _memory import peak_alloc_bytes
from hypothesis import given
from hypothesis import strategies as st
from reference.projections_ref import l2_ball_ref, mars_ball_ref
from strategies import tree_pairs

from robustft import projections
from robustft.projections import l2_ball, l2_ball_, mars_ball, mars_ball_, tpgm

BALLS = {"l2_ball": (l2_ball, l2_ball_ref), "mars_ball": (mars_ball, mars_ball_ref)}
IN_PLACE = {"l2_ball": l2_ball_, "mars_ball": mars_ball_}


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


# ---------------------------------------------------------------- balls: values


def test_l2_ball_hand_values() -> None:
    anchor = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])}
    params = {"w": torch.tensor([4.0, 5.0]), "b": torch.tensor([0.5])}  # deltas (3, 4) and 0.5
    out = l2_ball(params, anchor=anchor, radius=1.0)
    torch.testing.assert_close(out["w"], torch.tensor([1.6, 1.8]))
    assert torch.equal(out["b"], params["b"])  # inside: returned exactly
    out = l2_ball(params, anchor=anchor, radius={"w": 10.0, "b": 0.25})
    assert torch.equal(out["w"], params["w"])
    assert torch.equal(out["b"], torch.tensor([0.25]))
    out = l2_ball(params, anchor=anchor, radius=0.0)
    assert all(torch.equal(out[k], anchor[k]) for k in anchor)


def test_mars_ball_hand_values() -> None:
    anchor = {"w": torch.zeros(2, 2), "v": torch.zeros(3), "s": torch.tensor(1.0)}
    params = {
        "w": torch.tensor([[3.0, -1.0], [0.5, 0.0]]),  # row L1 norms 4 and 0.5
        "v": torch.tensor([1.0, -2.0, 1.0]),  # one row, L1 norm 4
        "s": torch.tensor(4.0),  # a 0-d tensor is one row of one element
    }
    out = mars_ball(params, anchor=anchor, radius=2.0)
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
    out = fn(params, anchor=anchor, radius=radius)
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
    once = fn(params, anchor=anchor, radius=radius)
    twice = fn(once, anchor=anchor, radius=radius)
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
    fast = fn(params, anchor=anchor, radius=radius)
    with torch.enable_grad():  # the autograd path computes the norms without chunking
        slow = fn(
            {k: v.clone().requires_grad_() for k, v in params.items()}, anchor=anchor, radius=radius
        )
    for k in anchor:
        ref = ref_fn({k: params[k]}, {k: anchor[k]}, radius[k])[k]
        torch.testing.assert_close(fast[k].double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast[k], slow[k].detach(), rtol=1e-5, atol=1e-5)


def test_l2_ball_bf16_lands_on_the_sphere() -> None:
    g = torch.Generator().manual_seed(0)
    anchor = {"w": torch.randn(64, 32, generator=g).bfloat16()}
    params = {"w": (anchor["w"].float() + torch.randn(64, 32, generator=g)).bfloat16()}
    out = l2_ball(params, anchor=anchor, radius=5.0)
    assert out["w"].dtype == torch.bfloat16
    assert fro(out["w"].float() - anchor["w"].float()) == pytest.approx(5.0, rel=1e-2)


def test_balls_never_mutate_inputs() -> None:
    anchor = {"w": torch.randn(4, 3)}
    params = {"w": anchor["w"] + 5.0}
    saved = (anchor["w"].clone(), params["w"].clone())
    for fn in (l2_ball, mars_ball):
        fn(params, anchor=anchor, radius=1.0)
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
        return fn({"w": p}, anchor={"w": anchor}, radius=r)["w"]

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
    out = fn({"w": p}, anchor={"w": anchor}, radius=radius)["w"]
    (out * torch.arange(6.0, dtype=torch.float64).reshape(3, 2)).sum().backward()
    assert p.grad is not None and radius.grad is not None
    assert torch.isfinite(p.grad).all() and torch.isfinite(radius.grad).all()
    assert torch.equal(out.detach(), anchor)


def test_l2_ball_radius_gradient_hand_value() -> None:
    # outside the ball out = a + (r / |d|) d, so d/dr sum(out) = sum(d) / |d| = 7 / 5
    anchor = {"w": torch.zeros(2, dtype=torch.float64)}
    params = {"w": torch.tensor([3.0, 4.0], dtype=torch.float64)}
    grad = torch.func.grad(lambda r: l2_ball(params, anchor=anchor, radius=r)["w"].sum())(
        torch.tensor(2.0, dtype=torch.float64)
    )
    assert float(grad) == pytest.approx(7.0 / 5.0)


def test_projections_compile_fullgraph() -> None:
    g = torch.Generator().manual_seed(0)
    anchor = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    params = {k: v + torch.randn(v.shape, generator=g) for k, v in anchor.items()}

    def f(p: dict[str, torch.Tensor], a: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [l2_ball(p, anchor=a, radius=0.5), mars_ball(p, anchor=a, radius=0.5)]

    eager = f(params, anchor)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(params, anchor)
    for e, c in zip(eager, compiled):
        assert_close_tree(c, e)


# ---------------------------------------------------------------- keyword-only anchor


@pytest.mark.parametrize("fn", [l2_ball, mars_ball, l2_ball_, mars_ball_])
def test_anchor_is_keyword_only(fn: Any) -> None:
    a, p = {"w": torch.zeros(2)}, {"w": torch.tensor([3.0, 4.0])}
    with pytest.raises(TypeError, match=r"positional argument"):
        fn(a, p, radius=1.0)  # the swapped call would have projected the anchor onto params
    with pytest.raises(TypeError, match=r"positional argument"):
        tpgm(p, lambda q: q["w"].sum(), a)  # type: ignore[misc]


# ---------------------------------------------------------------- extreme radii


@pytest.mark.parametrize("name", list(BALLS))
@pytest.mark.parametrize(
    "radius",
    [
        math.inf,
        1e39,  # beyond float32: clamped, no inf / inf
        np.float64(1e300),
        torch.tensor(1e39, dtype=torch.float64),  # a float64 tensor stays finite
        {"w": math.inf, "b": 1e39},
    ],
    ids=["inf", "1e39", "numpy-1e300", "tensor64-1e39", "dict"],
)
def test_huge_and_infinite_radii_are_the_identity(name: str, radius: Any) -> None:
    fn, ip = BALLS[name][0], IN_PLACE[name]
    g = torch.Generator().manual_seed(3)
    anchor = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    params = {k: v + 1e15 * torch.randn(v.shape, generator=g) for k, v in anchor.items()}
    out = fn(params, anchor=anchor, radius=radius)
    assert all(torch.equal(out[k], params[k]) for k in params)
    inplace = {k: v.clone() for k, v in params.items()}
    ip(inplace, anchor=anchor, radius=radius)
    assert all(torch.equal(inplace[k], params[k]) for k in params)


@pytest.mark.parametrize("name", list(BALLS))
def test_numpy_radius_equals_float(name: str) -> None:
    fn = BALLS[name][0]
    anchor, params = {"w": torch.zeros(2, 2)}, {"w": torch.tensor([[3.0, 4.0], [1.0, 0.0]])}
    for r in (np.float32(1.5), np.int64(1), np.float64(0.0)):
        got = fn(params, anchor=anchor, radius=r)
        assert torch.equal(got["w"], fn(params, anchor=anchor, radius=float(r))["w"])


# ---------------------------------------------------------------- mars: the official uncapped scale


@given(pair=tree_pairs(n=2), radius=st.floats(0.1, 10.0))
def test_mars_uncapped_matches_the_official_code(
    pair: list[dict[str, torch.Tensor]], radius: float
) -> None:
    anchor, params = pair
    out = mars_ball(params, anchor=anchor, radius=radius, cap=False)
    assert_close_tree(out, mars_ball_ref(params, anchor, radius, cap=False))
    inplace = {k: v.clone() for k, v in params.items()}
    mars_ball_(inplace, anchor=anchor, radius=radius, cap=False)
    assert_close_tree(inplace, out)


def test_mars_uncapped_scales_rows_inside_the_ball_up() -> None:
    anchor = {"w": torch.zeros(2, 2, dtype=torch.float64)}
    params = {"w": torch.tensor([[3.0, -1.0], [0.5, 0.0]], dtype=torch.float64)}  # L1: 4, 0.5
    capped = mars_ball(params, anchor=anchor, radius=1.0)["w"]
    official = mars_ball(params, anchor=anchor, radius=1.0, cap=False)["w"]
    assert torch.equal(capped[1], params["w"][1])  # inside: left alone
    torch.testing.assert_close(official[1], torch.tensor([1.0, 0.0], dtype=torch.float64))  # up
    torch.testing.assert_close(official[0], capped[0])


# ---------------------------------------------------------------- in place


@pytest.mark.parametrize("name", list(BALLS))
@given(pair=tree_pairs(n=2), frac=st.floats(0.0, 3.0))
def test_in_place_equals_pure(name: str, pair: list[dict[str, torch.Tensor]], frac: float) -> None:
    fn, ip = BALLS[name][0], IN_PLACE[name]
    anchor, params = pair
    radius = frac * 3.0
    pure = fn(params, anchor=anchor, radius=radius)
    saved = {k: v.clone() for k, v in anchor.items()}
    target = {k: v.clone() for k, v in params.items()}
    ptrs = {k: v.data_ptr() for k, v in target.items()}
    assert ip(target, anchor=anchor, radius=radius) is target
    assert {k: v.data_ptr() for k, v in target.items()} == ptrs  # written in place
    assert_close_tree(target, pure)
    for k in params:  # inside the ball: untouched, bit for bit
        if torch.equal(pure[k], params[k]):
            assert torch.equal(target[k], params[k])
    assert all(torch.equal(anchor[k], saved[k]) for k in anchor)


@pytest.mark.parametrize("name", list(BALLS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_in_place_on_large_low_precision_parameters(name: str, dtype: torch.dtype) -> None:
    # > 2**18 elements: the chunked norm pass and (bf16/fp16) the chunked float32 rescale, with
    # rows narrower and wider than a chunk; nn.Parameters requiring grad (a model's own leaves)
    fn, ip = BALLS[name][0], IN_PLACE[name]
    g = torch.Generator().manual_seed(0)
    shapes = {"wide": (3, 2**18 + 5), "tall": (2**12 + 1, 70), "flat": (2**18 + 7,), "s": ()}
    anchor = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    params = {
        k: torch.nn.Parameter((v.float() + torch.randn(v.shape, generator=g)).to(dtype))
        for k, v in anchor.items()
    }
    radius = {"wide": 50.0, "tall": torch.tensor(30.0), "flat": 100.0, "s": 0.25}
    pure = fn(params, anchor=anchor, radius=radius)
    ip(params, anchor=anchor, radius=radius)
    for k in params:
        assert params[k].dtype == dtype and params[k].grad_fn is None and params[k].requires_grad
        # the chunked norm pass sums in another order: the scale may differ in its last bit
        torch.testing.assert_close(params[k].detach(), pure[k].detach())


def test_in_place_tensor_and_dict_radius_and_zero() -> None:
    anchor = {"w": torch.zeros(2), "b": torch.ones(3)}
    params = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0, 1.0, 2.0])}
    l2_ball_(params, anchor=anchor, radius={"w": torch.tensor(1.0), "b": 0.0})
    torch.testing.assert_close(params["w"], torch.tensor([0.6, 0.8]))
    assert torch.equal(params["b"], anchor["b"])


@pytest.mark.parametrize("name", list(BALLS))
def test_in_place_adds_at_most_one_tensor_of_peak_memory(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {f"t{i}": (512, 1024) for i in range(4)}  # 2 MiB each, 8 MiB in all
    anchor = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    params = {k: v + torch.randn(v.shape, generator=g) for k, v in anchor.items()}
    one_tensor = 512 * 1024 * 4
    ip, fn = IN_PLACE[name], BALLS[name][0]
    peak = peak_alloc_bytes(lambda: ip(params, anchor=anchor, radius=1.0))
    assert peak <= one_tensor + 64 * 1024, (peak, one_tensor)
    pure_peak = peak_alloc_bytes(lambda: fn(params, anchor=anchor, radius=1.0))
    assert pure_peak >= 4 * one_tensor  # the pure form allocates its output tree
    # bf16: float32 chunks, never a float32 copy of a whole tensor
    anchor16 = {k: v.bfloat16() for k, v in anchor.items()}
    params16 = {k: (v + 5).bfloat16() for k, v in params.items()}
    peak = peak_alloc_bytes(lambda: ip(params16, anchor=anchor16, radius=1.0))
    assert peak <= one_tensor // 2 + 64 * 1024, peak


# ---------------------------------------------------------------- the error table

T = {"w": torch.zeros(2), "b": torch.zeros(1)}
INT = {"w": torch.zeros(2, dtype=torch.int32), "b": torch.zeros(1, dtype=torch.int32)}


def _loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return p["w"].sum()


P1 = {"w": torch.ones(2)}
A1 = {"w": torch.zeros(2)}

_BALL_FNS: dict[str, Callable[..., Any]] = {
    "l2_ball": l2_ball,
    "mars_ball": mars_ball,
    "l2_ball_": l2_ball_,
    "mars_ball_": mars_ball_,
}


def _ball_rows(fn: str) -> list[tuple[str, Callable[[], Any], type, str]]:
    f = _BALL_FNS[fn]

    def call(params: Any = None, anchor: Any = None, **kw: Any) -> Callable[[], Any]:
        kw.setdefault("radius", 1.0)
        return lambda: f(
            {k: v.clone() for k, v in T.items()} if params is None else params,
            anchor=T if anchor is None else anchor,
            **kw,
        )

    rows = [
        (call(radius=-1.0), ValueError, r"radius must be in \[0.0, inf\), got -1.0"),
        (call(radius=np.float32(-1)), ValueError, r"radius must be in \[0.0, inf\)"),
        (call(radius=math.nan), ValueError, r"radius must not be NaN"),
        (call(radius="1"), TypeError, r"radius must be a real number, a 0-d floating tensor or"),
        (call(radius=True), TypeError, r"radius must be a real number"),
        (call(radius=torch.ones(2)), TypeError, r"radius must be a real number or a 0-d floating"),
        (call(radius={"w": 1.0}), ValueError, r"radius given per tensor must have the same keys"),
        (call(radius={"w": 1.0, "b": -0.5}), ValueError, r"radius\['b'\] must be in \[0.0, inf\)"),
        (call(params=[1]), TypeError, r"params must be a mapping"),
        (call(anchor={"w": 1.0, "b": 2.0}), TypeError, r"anchor must have torch.Tensor leaves"),
        (
            call(params={"v": torch.zeros(2)}, anchor={"w": torch.zeros(2)}),
            ValueError,
            r"params must have the same keys as anchor; missing keys \['w'\], unexpected keys "
            r"\['v'\]",
        ),
        (
            call(params={"w": torch.zeros(3)}, anchor={"w": torch.zeros(2)}),
            ValueError,
            r"anchor and params must have the same shape",
        ),
        (
            call(params={"w": torch.zeros(2, dtype=torch.float64)}, anchor={"w": torch.zeros(2)}),
            TypeError,
            r"anchor and params must have the same dtype",
        ),
        (call(params=INT, anchor=INT), TypeError, r"params must hold floating-point tensors"),
    ]
    if fn.startswith("mars"):
        rows += [
            (call(cap=1), TypeError, r"cap must be a bool, got 1"),
            (
                call(cap=False, radius=math.inf),
                ValueError,
                r"radius must be a finite number in \[0.0, inf\), got inf",
            ),
        ]
    return [(fn, c, e, rf"{fn}: " + m) for c, e, m in rows]


ERRORS: list[tuple[str, Callable[[], Any], type, str]] = [
    *[row for fn in _BALL_FNS for row in _ball_rows(fn)],
    (
        "tpgm",
        lambda: tpgm(P1, _loss, anchor=A1, norm="l1"),
        ValueError,
        r"tpgm: norm must be one of 'l2', 'mars', got 'l1'",
    ),
    (
        "tpgm",
        lambda: tpgm(P1, _loss, anchor=A1, norm=2),
        TypeError,
        r"tpgm: norm must be one of 'l2', 'mars', got 2",
    ),
    (
        "tpgm",
        lambda: tpgm(P1, _loss, anchor=A1, steps=-1),
        ValueError,
        r"tpgm: steps must be an int >= 0, got -1",
    ),
    (
        "tpgm",
        lambda: tpgm(P1, _loss, anchor=A1, steps=2.5),
        TypeError,
        r"tpgm: steps must be an int, got 2.5",
    ),
    (
        "tpgm",
        lambda: tpgm(P1, _loss, anchor=A1, lr=0.0),
        ValueError,
        r"tpgm: lr must be in \(0.0, inf\), got 0.0",
    ),
    (
        "tpgm",
        lambda: tpgm(P1, _loss, anchor=A1, lr=math.inf),
        ValueError,
        r"tpgm: lr must be a finite number in \(0.0, inf\), got inf",
    ),
    (
        "tpgm",
        lambda: tpgm(P1, _loss, anchor=A1, lr="1e-2"),
        TypeError,
        r"tpgm: lr must be a real number, got '1e-2'",
    ),
    (
        "tpgm",
        lambda: tpgm(P1, _loss, anchor=A1, regularization=-0.1),
        ValueError,
        r"tpgm: regularization must be in \[0.0, inf\)",
    ),
    (
        "tpgm",
        lambda: tpgm(P1, _loss, anchor=A1, regularization=math.nan),
        ValueError,
        r"tpgm: regularization must not be NaN",
    ),
    (
        "tpgm",
        lambda: tpgm({"v": torch.ones(2)}, lambda q: q["v"].sum(), anchor=A1),
        ValueError,
        r"tpgm: params must have the same keys as anchor",
    ),
    (
        "tpgm",
        lambda: tpgm(INT, _loss, anchor=INT),
        TypeError,
        r"tpgm: params must hold floating-point tensors",
    ),
    (
        "tpgm",
        lambda: tpgm(P1, 3, anchor=A1),  # type: ignore[arg-type]
        TypeError,
        r"tpgm: loss_fn must be callable, got 3",
    ),
    (
        "tpgm",
        lambda: tpgm(P1, lambda q: 1.0, anchor=A1),  # type: ignore[arg-type,return-value]
        TypeError,
        r"tpgm: loss_fn must return a 0-d floating tensor, got 1.0",
    ),
    (
        "tpgm",
        lambda: tpgm(P1, lambda q: q["w"], anchor=A1),
        TypeError,
        r"tpgm: loss_fn must return a 0-d floating tensor, got Tensor",
    ),
    (
        "tpgm",
        lambda: tpgm(P1, lambda q: q["w"].detach().sum(), anchor=A1),
        ValueError,
        r"tpgm: loss_fn must return a loss differentiable",
    ),
    (
        "tpgm",
        lambda: tpgm({"w": torch.tensor([1.0, math.nan])}, _loss, anchor=A1),
        ValueError,
        r"tpgm: params - anchor must be finite, got NaN or inf deviations at keys \['w'\]",
    ),
    (
        "tpgm",
        lambda: tpgm(P1, lambda q: q["w"].sum() * math.nan, anchor=A1, steps=3),
        ValueError,
        r"tpgm: loss_fn must return a finite loss .* NaN or inf on all 3 steps",
    ),
]


def _spd_state() -> Any:
    return projections.spd(0.5).init(P1, anchor=A1)


def _prepared() -> Any:
    return projections.spd(0.5).prepare(_spd_state(), P1, grads=P1)


def _ftp_state() -> Any:
    return projections.ftp().init(P1, anchor=A1)


def _stale(kind: str) -> Any:
    if kind == "spd":
        state = _prepared()
        projections.spd(0.5).update_(state, {"w": torch.ones(2)})
    else:
        state = _ftp_state()
        projections.ftp().update_(state, {"w": torch.ones(2)}, grads=P1)
    return state


def _post_step_rows() -> list[tuple[str, Callable[[], Any], type, str]]:
    spd, ftp = projections.spd, projections.ftp
    s, f = spd(0.5), ftp()
    rows: list[tuple[str, Callable[[], Any], type, str]] = [
        ("spd", lambda: spd(-0.1), ValueError, r"spd: weight_decay must be in \[0.0, inf\)"),
        ("spd", lambda: spd(np.float32(-1)), ValueError, r"spd: weight_decay must be in"),
        ("spd", lambda: spd(math.inf), ValueError, r"spd: weight_decay must be a finite number"),
        ("spd", lambda: spd(math.nan), ValueError, r"spd: weight_decay must not be NaN"),
        ("spd", lambda: spd("0.1"), TypeError, r"spd: weight_decay must be a real number"),
        ("spd", lambda: spd(True), TypeError, r"spd: weight_decay must be a real number"),
        ("Spd", lambda: s.init(P1, A1), TypeError, r"takes 1 positional argument"),
        ("Spd", lambda: s.init([1], anchor=A1), TypeError, r"spd.init: params must be a mapping"),
        ("Spd", lambda: s.init(INT, anchor=INT), TypeError, r"spd.init: params must hold float"),
        (
            "Spd",
            lambda: s.init({"v": torch.ones(2)}, anchor=A1),
            ValueError,
            r"spd.init: params must have the same keys as anchor; missing keys \['w'\]",
        ),
        (
            "Spd",
            lambda: s.init(P1, anchor={"w": torch.zeros(3)}),
            ValueError,
            r"spd.init: anchor and params must have the same shape",
        ),
        (
            "Spd",
            lambda: s.init(P1, anchor=P1),
            ValueError,
            r"spd.init: anchor must not share memory with params .* keys \['w'\]",
        ),
        (
            "Spd",
            lambda: s.init(P1, anchor={"w": P1["w"].view(2)}),
            ValueError,
            r"spd.init: anchor must not share memory with params",
        ),
        (
            "Spd",
            lambda: s.prepare(_spd_state(), P1, grads={"w": torch.ones(3)}),
            ValueError,
            r"spd.prepare: params and grads must have the same shape",
        ),
        (
            "Spd",
            lambda: s.prepare(_spd_state(), P1, grads={"w": None}),
            TypeError,
            r"spd.prepare: grads must have torch.Tensor leaves",
        ),
        (
            "Spd",
            lambda: s.prepare(_spd_state(), P1, grads={"w": torch.ones(2).double()}),
            TypeError,
            r"spd.prepare: params and grads must have the same dtype",
        ),
        (
            "Spd",
            lambda: s.prepare(_spd_state(), {"v": torch.ones(2)}, grads={"v": torch.ones(2)}),
            ValueError,
            r"spd.prepare: params must have the same keys as anchor; missing keys \['w'\]",
        ),
        (
            "Spd",
            lambda: s.update(_spd_state(), P1),
            ValueError,
            r"spd.update: state must be prepared: call state = spd.prepare",
        ),
        (
            "Spd",
            lambda: s.update_(_stale("spd"), P1),
            ValueError,
            r"spd.update_: state is stale",
        ),
        (
            "Spd",
            lambda: spd(0.1).update_(_prepared(), P1),
            ValueError,
            r"spd.update_: state was made by spd\(weight_decay=0.5\), but this one is "
            r"spd\(weight_decay=0.1\)",
        ),
        (
            "SpdState",
            lambda: s.update(_ftp_state(), P1),
            TypeError,
            r"spd.update: state must be the SpdState returned by spd.init",
        ),
        (
            "SpdState",
            lambda: s.update(_prepared()._replace(step=3), P1),
            TypeError,
            r"spd.update: state must be .* got a malformed one",
        ),
        (
            "SpdState",
            lambda: s.update(_prepared()._replace(decay={"v": torch.ones(())}), P1),
            ValueError,
            r"spd.update: state was prepared for keys \['v'\], got params with keys \['w'\]",
        ),
        ("ftp", lambda: ftp(annealing=-1.0), ValueError, r"ftp: annealing must be in \[0.0, inf\)"),
        ("ftp", lambda: ftp(annealing=math.inf), ValueError, r"ftp: annealing must be a finite"),
        ("ftp", lambda: ftp(lr=0.0), ValueError, r"ftp: lr must be in \(0.0, inf\), got 0.0"),
        ("ftp", lambda: ftp(lr=np.float64(math.nan)), ValueError, r"ftp: lr must not be NaN"),
        ("ftp", lambda: ftp(lr="1"), TypeError, r"ftp: lr must be a real number, got '1'"),
        ("ftp", lambda: ftp(eps=0.0), ValueError, r"ftp: eps must be in \(0.0, inf\)"),
        ("ftp", lambda: ftp(betas=0.9), TypeError, r"ftp: betas must be a pair of numbers"),
        ("ftp", lambda: ftp(betas=(0.9,)), TypeError, r"ftp: betas must be a pair of numbers"),
        (
            "ftp",
            lambda: ftp(betas=(1.0, 0.9)),
            ValueError,
            r"ftp: betas\[0\] must be in \[0.0, 1.0\)",
        ),
        ("ftp", lambda: ftp(betas=(0.9, -0.1)), ValueError, r"ftp: betas\[1\] must be in"),
        (
            "ftp",
            lambda: ftp(betas=(0.9, True)),
            TypeError,
            r"ftp: betas\[1\] must be a real number",
        ),
        ("ftp", lambda: ftp(0.5), TypeError, r"takes 0 positional arguments"),
        (
            "Ftp",
            lambda: f.init(P1, anchor=P1),
            ValueError,
            r"ftp.init: anchor must not share memory",
        ),
        ("Ftp", lambda: f.init(INT, anchor=INT), TypeError, r"ftp.init: params must hold float"),
        (
            "Ftp",
            lambda: f.update_(_ftp_state(), P1, grads={"v": torch.ones(2)}),
            ValueError,
            r"ftp.update_: grads must have the same keys as params; missing keys \['w'\], "
            r"unexpected keys \['v'\]",
        ),
        (
            "Ftp",
            lambda: f.update(_ftp_state(), P1, grads=[torch.ones(2)]),
            TypeError,
            r"ftp.update: grads must be a mapping",
        ),
        (
            "Ftp",
            lambda: f.update(_ftp_state(), {"w": torch.ones(3)}, grads={"w": torch.ones(3)}),
            ValueError,
            r"ftp.update: anchor and params must have the same shape",
        ),
        (
            "Ftp",
            lambda: f.update_(_stale("ftp"), P1, grads=P1),
            ValueError,
            r"ftp.update_: state is stale",
        ),
        (
            "Ftp",
            lambda: ftp(lr=0.5).update(_ftp_state(), P1, grads=P1),
            ValueError,
            r"ftp.update: state was made by ftp\(annealing=1.0, lr=0.01, betas=\(0.9, 0.999\), "
            r"eps=1e-08\), but this one is ftp\(annealing=1.0, lr=0.5",
        ),
        (
            "FtpState",
            lambda: f.update(_prepared(), P1, grads=P1),
            TypeError,
            r"ftp.update: state must be the FtpState returned by ftp.init",
        ),
        (
            "FtpState",
            lambda: f.update(_ftp_state()._replace(live=True), P1, grads=P1),
            TypeError,
            r"ftp.update: state must be .* got a malformed one",
        ),
    ]
    return rows


ERRORS += _post_step_rows()


@pytest.mark.parametrize(
    ("fn", "call", "err", "match"), ERRORS, ids=[f"{e[0]}-{i}" for i, e in enumerate(ERRORS)]
)
def test_errors(fn: str, call: Callable[[], Any], err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        call()


def test_error_table_covers_every_public_function() -> None:
    public = {n for n in projections.__all__ if callable(getattr(projections, n))}
    assert public == {"l2_ball", "l2_ball_", "mars_ball", "mars_ball_", "tpgm", "spd", "ftp"} | {
        "Spd",
        "SpdState",
        "Ftp",
        "FtpState",
    }
    assert public <= {e[0] for e in ERRORS}, public - {e[0] for e in ERRORS}
