"""robustft.merging: wise (WiSE-FT), and the error table of every public merging function."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference.merging_ref import wise_ref
from strategies import tree_pairs

from robustft import merging
from robustft.merging import greedy_soup, uniform_soup, wise


def assert_close_tree(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(ref)
    for k, v in got.items():
        tol = 1e-5 if v.dtype == torch.float32 else 1e-11
        torch.testing.assert_close(v.double(), ref[k].double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------- values


def test_wise_hand_values_and_per_key_alpha() -> None:
    anchor = {"w": torch.tensor([0.0, 2.0]), "b": torch.tensor([1.0])}
    params = {"w": torch.tensor([4.0, 6.0]), "b": torch.tensor([3.0])}
    out = wise(params, anchor=anchor, alpha=0.25)
    assert torch.equal(out["w"], torch.tensor([1.0, 3.0]))
    assert torch.equal(out["b"], torch.tensor([1.5]))
    out = wise(params, anchor=anchor, alpha={"w": 0.5, "b": 1.0})
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(out["b"], torch.tensor([3.0]))
    # NumPy numbers are numbers
    out = wise(params, anchor=anchor, alpha=np.float32(0.25))
    assert torch.equal(out["w"], torch.tensor([1.0, 3.0]))
    out = wise(params, anchor=anchor, alpha={"w": np.float64(0.5), "b": np.int64(1)})
    assert torch.equal(out["b"], torch.tensor([3.0]))


def test_wise_anchor_is_keyword_only() -> None:
    anchor = {"w": torch.zeros(2)}
    params = {"w": torch.ones(2)}
    with pytest.raises(TypeError, match=r"positional argument"):
        wise(anchor, params, alpha=0.3)  # type: ignore[misc]  # the swapped call of 0.x
    with pytest.raises(TypeError, match=r"anchor"):
        wise(params, alpha=0.3)  # type: ignore[call-arg]


def random_pair(seed: int, dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (5, 3), "b": (3,), "logit_scale": ()}
    anchor = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    params = {
        k: (v.float() + torch.randn(v.shape, generator=g)).to(dtype) for k, v in anchor.items()
    }
    return anchor, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["float", "numpy", "tensor32", "tensor64", "dict"])
def test_wise_endpoints_are_exact_for_every_alpha_kind(dtype: torch.dtype, kind: str) -> None:
    anchor, params = random_pair(0, dtype)

    def alpha(v: float) -> Any:
        return {
            "float": v,
            "numpy": np.float64(v),
            "tensor32": torch.tensor(v),
            "tensor64": torch.tensor(v, dtype=torch.float64),
            "dict": {k: (torch.tensor(v) if k == "w" else v) for k in anchor},
        }[kind]

    one, zero = (
        wise(params, anchor=anchor, alpha=alpha(1.0)),
        wise(params, anchor=anchor, alpha=alpha(0.0)),
    )
    for k in params:
        assert one[k].dtype == dtype and zero[k].dtype == dtype
        assert torch.equal(one[k], params[k]), k  # bit for bit
        assert torch.equal(zero[k], anchor[k]), k
        assert one[k].data_ptr() != params[k].data_ptr()  # a new tree, not an alias


def test_tensor_alpha_keeps_low_precision_scalar_leaves() -> None:
    # a float32 0-d alpha must not promote a bf16 0-d leaf (open_clip's logit_scale) to float32
    anchor = {"logit_scale": torch.tensor(4.0, dtype=torch.bfloat16)}
    params = {"logit_scale": torch.tensor(4.5, dtype=torch.bfloat16)}
    for alpha in (torch.tensor(0.5), {"logit_scale": torch.tensor(0.5, dtype=torch.float64)}):
        out = wise(params, anchor=anchor, alpha=alpha)
        assert out["logit_scale"].dtype == torch.bfloat16
        assert out["logit_scale"].shape == ()
        assert float(out["logit_scale"]) == 4.25


@given(pair=tree_pairs(n=2), alpha=st.floats(-0.5, 1.5))
def test_wise_endpoints_and_reference(pair: list[dict[str, torch.Tensor]], alpha: float) -> None:
    anchor, params = pair
    for k, v in wise(params, anchor=anchor, alpha=0.0).items():
        assert torch.equal(v, anchor[k])
    for k, v in wise(params, anchor=anchor, alpha=1.0).items():
        assert torch.equal(v, params[k])
    assert_close_tree(wise(params, anchor=anchor, alpha=alpha), wise_ref(anchor, params, alpha))
    # a 0-d tensor alpha gives the same numbers as the float
    t = wise(params, anchor=anchor, alpha=torch.tensor(alpha, dtype=torch.float64))
    assert_close_tree(t, wise_ref(anchor, params, alpha))


@given(pair=tree_pairs(n=2), a=st.floats(0, 1), b=st.floats(0, 1), lam=st.floats(0, 1))
def test_wise_is_linear_in_alpha(
    pair: list[dict[str, torch.Tensor]], a: float, b: float, lam: float
) -> None:
    anchor, params = pair
    mixed = wise(params, anchor=anchor, alpha=lam * a + (1 - lam) * b)
    wa, wb = wise(params, anchor=anchor, alpha=a), wise(params, anchor=anchor, alpha=b)
    assert_close_tree(mixed, {k: lam * wa[k].double() + (1 - lam) * wb[k].double() for k in wa})


def test_wise_gradient_in_alpha_and_params() -> None:
    anchor = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    params = {"w": torch.tensor([4.0, 3.0], dtype=torch.float64)}

    def f(alpha: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return wise(p, anchor=anchor, alpha=alpha)["w"].sum()

    ga, gp = torch.func.grad(f, argnums=(0, 1))(torch.tensor(0.3, dtype=torch.float64), params)
    assert float(ga) == pytest.approx(8.0)  # sum(params - anchor)
    torch.testing.assert_close(gp["w"], torch.full((2,), 0.3, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda a, p: wise({"w": p}, anchor=anchor, alpha=a)["w"],
        (
            torch.tensor(0.3, dtype=torch.float64, requires_grad=True),
            params["w"].clone().requires_grad_(),
        ),
    )


def test_wise_never_mutates_and_compiles() -> None:
    anchor, params = random_pair(1)
    saved = [{k: v.clone() for k, v in t.items()} for t in (anchor, params)]
    eager = wise(params, anchor=anchor, alpha=0.3)
    compiled = torch.compile(
        lambda p, a: wise(p, anchor=a, alpha=0.3), fullgraph=True, backend="aot_eager"
    )(params, anchor)
    assert_close_tree(compiled, eager)
    for t, s in zip((anchor, params), saved):
        assert all(torch.equal(t[k], s[k]) for k in t)


# ---------------------------------------------------------------- the error table

T = {"w": torch.zeros(2), "b": torch.zeros(1)}
INT = {"w": torch.zeros(2, dtype=torch.int64), "b": torch.zeros(1, dtype=torch.int64)}


def S(x: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([x], dtype=torch.float64)}


def score(p: dict[str, torch.Tensor]) -> float:
    return -float(p["w"].abs().sum())


ERRORS: list[tuple[str, Callable[[], Any], type, str]] = [
    # wise: trees
    ("wise", lambda: wise([1], anchor=T, alpha=0.5), TypeError, r"wise: params must be a mapping"),
    (
        "wise",
        lambda: wise({"v": torch.zeros(2)}, anchor={"w": torch.zeros(2)}, alpha=0.5),
        ValueError,
        r"wise: params must have the same keys as anchor; missing keys \['w'\], unexpected keys "
        r"\['v'\]",
    ),
    (
        "wise",
        lambda: wise({"w": torch.zeros(3)}, anchor={"w": torch.zeros(2)}, alpha=0.5),
        ValueError,
        r"wise: anchor and params must have the same shape",
    ),
    (
        "wise",
        lambda: wise(
            {"w": torch.zeros(2, dtype=torch.float64)}, anchor={"w": torch.zeros(2)}, alpha=0.5
        ),
        TypeError,
        r"wise: anchor and params must have the same dtype",
    ),
    (
        "wise",
        lambda: wise(INT, anchor=INT, alpha=0.5),
        TypeError,
        r"wise: params must hold floating-point",
    ),
    (
        "wise",
        lambda: wise(T, anchor=INT, alpha=0.5),
        TypeError,
        r"wise: anchor must hold floating-point",
    ),
    ("wise", lambda: wise(T, T, alpha=0.5), TypeError, r"positional argument"),  # type: ignore[misc]
    # wise: alpha
    ("wise", lambda: wise(T, anchor=T, alpha=math.nan), ValueError, r"wise: alpha must not be NaN"),
    (
        "wise",
        lambda: wise(T, anchor=T, alpha=math.inf),
        ValueError,
        r"wise: alpha must be a finite number in \(-inf, inf\), got inf",
    ),
    (
        "wise",
        lambda: wise(T, anchor=T, alpha=np.float64(-np.inf)),
        ValueError,
        r"wise: alpha must be a finite number",
    ),
    (
        "wise",
        lambda: wise(T, anchor=T, alpha="0.5"),
        TypeError,
        r"wise: alpha must be a real number, a 0-d floating tensor or a dict of them",
    ),
    (
        "wise",
        lambda: wise(T, anchor=T, alpha=True),
        TypeError,
        r"wise: alpha must be a real number",
    ),
    (
        "wise",
        lambda: wise(T, anchor=T, alpha=torch.ones(2)),
        TypeError,
        r"wise: alpha must be a real number or a 0-d floating tensor, got Tensor\(shape=\(2,\)",
    ),
    (
        "wise",
        lambda: wise(T, anchor=T, alpha=torch.tensor(1)),
        TypeError,
        r"wise: alpha must be a real number or a 0-d floating tensor",
    ),
    (
        "wise",
        lambda: wise(T, anchor=T, alpha={"w": 0.5}),
        ValueError,
        r"wise: alpha given per tensor must have the same keys .* missing keys \['b'\]",
    ),
    (
        "wise",
        lambda: wise(T, anchor=T, alpha={"w": 0.5, "b": "x"}),
        TypeError,
        r"wise: alpha\['b'\] must be a real number",
    ),
    (
        "wise",
        lambda: wise(T, anchor=T, alpha={"w": 0.5, "b": math.nan}),
        ValueError,
        r"wise: alpha\['b'\] must not be NaN",
    ),
    # soups: candidates
    *[
        (fn, lambda call=call: call([]), ValueError, rf"{fn}: candidates must hold at least one")
        for fn, call in [
            ("uniform_soup", uniform_soup),
            ("greedy_soup", lambda c: greedy_soup(c, score)),
        ]
    ],
    *[
        (
            fn,
            lambda call=call: call(S(1.0)),
            TypeError,
            rf"{fn}: candidates must be a sequence of parameter trees",
        )
        for fn, call in [
            ("uniform_soup", uniform_soup),
            ("greedy_soup", lambda c: greedy_soup(c, score)),
        ]
    ],
    *[
        (
            fn,
            lambda call=call: call([S(1.0), {"v": torch.zeros(1, dtype=torch.float64)}]),
            ValueError,
            rf"{fn}: candidates\[1\] must have the same keys as candidates\[0\]; "
            r"missing keys \['w'\], unexpected keys \['v'\]",
        )
        for fn, call in [
            ("uniform_soup", uniform_soup),
            ("greedy_soup", lambda c: greedy_soup(c, score)),
        ]
    ],
    *[
        (
            fn,
            lambda call=call: call([S(1.0), {"w": torch.zeros(1, dtype=torch.int64)}]),
            TypeError,
            rf"{fn}: candidates\[1\] must hold floating-point tensors only, got torch.int64 .*"
            r"num_batches_tracked",
        )
        for fn, call in [
            ("uniform_soup", uniform_soup),
            ("greedy_soup", lambda c: greedy_soup(c, score)),
        ]
    ],
    (
        "uniform_soup",
        lambda: uniform_soup([S(1.0), {"w": torch.zeros(2, dtype=torch.float64)}]),
        ValueError,
        r"uniform_soup: candidates\[0\] and candidates\[1\] must have the same shape",
    ),
    # greedy_soup: evaluate and strict
    (
        "greedy_soup",
        lambda: greedy_soup([S(0.0)], 3),  # type: ignore[arg-type]
        TypeError,
        r"greedy_soup: evaluate must be callable, got 3",
    ),
    (
        "greedy_soup",
        lambda: greedy_soup([S(0.0), S(1.0)], lambda p: "x"),
        TypeError,
        r"greedy_soup: evaluate must return a real number .*'x' for candidates\[0\]",
    ),
    (
        "greedy_soup",
        lambda: greedy_soup([S(0.0), S(1.0)], lambda p: torch.ones(2)),
        TypeError,
        r"greedy_soup: evaluate must return a real number",
    ),
    (
        "greedy_soup",
        lambda: greedy_soup([S(0.0), S(1.0)], lambda p: math.nan),
        ValueError,
        r"greedy_soup: evaluate must not return NaN",
    ),
    (
        "greedy_soup",
        lambda: greedy_soup([S(0.0)], score, strict=1),  # type: ignore[arg-type]
        TypeError,
        r"greedy_soup: strict must be a bool, got 1",
    ),
]


@pytest.mark.parametrize(
    ("fn", "call", "err", "match"), ERRORS, ids=[f"{e[0]}-{i}" for i, e in enumerate(ERRORS)]
)
def test_errors(fn: str, call: Callable[[], Any], err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        call()


def test_error_table_covers_every_public_function() -> None:
    public = {n for n in merging.__all__ if callable(getattr(merging, n))}
    assert public == {"wise", "uniform_soup", "greedy_soup"}
    assert public <= {e[0] for e in ERRORS}, public - {e[0] for e in ERRORS}
