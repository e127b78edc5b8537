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
from robustft.merging import (
    dare,
    depth_schedule,
    greedy_soup,
    lazy,
    model_stock,
    task_arithmetic,
    task_vector,
    ties,
    uniform_soup,
    wise,
)


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
            rf"{fn}: candidates must be {what} of parameter trees",
        )
        for fn, call, what in [
            ("uniform_soup", uniform_soup, "an iterable"),
            ("greedy_soup", lambda c: greedy_soup(c, score), "a sequence"),
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


class _Sub(torch.Tensor):
    """A tensor subclass standing in for a DTensor (not a plain tensor)."""


SUB = {"w": torch.zeros(2).as_subclass(_Sub), "b": torch.zeros(1)}
F64 = {"w": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}
OTHER = {"w": torch.zeros(2), "v": torch.zeros(1)}
BLOCKS = ["blocks.0.w", "head.w"]


def _gen(*trees: dict[str, torch.Tensor]) -> Any:
    yield from trees


# anchor-based merges: the shared candidate and anchor checks
MERGES: list[tuple[str, Callable[..., Any]]] = [
    ("task_arithmetic", lambda c, a: task_arithmetic(c, anchor=a)),
    ("ties", lambda c, a: ties(c, anchor=a)),
    ("model_stock", lambda c, a: model_stock(c, anchor=a)),
]

ERRORS += [
    # every anchor-based merge: candidates and anchor
    *[
        entry
        for fn, call in MERGES
        for entry in [
            (fn, lambda call=call: call(T, T), TypeError, rf"{fn}: candidates must be "),
            (fn, lambda call=call: call(3, T), TypeError, rf"{fn}: candidates must be "),
            (
                fn,
                lambda call=call: call([], T),
                ValueError,
                rf"{fn}: candidates must hold at least",
            ),
            (
                fn,
                lambda call=call: call([T, OTHER], T),
                ValueError,
                rf"{fn}: candidates\[1\] must have the same keys as anchor; missing keys \['b'\], "
                r"unexpected keys \['v'\]",
            ),
            (
                fn,
                lambda call=call: call([T, F64], T),
                TypeError,
                rf"{fn}: anchor and candidates\[1\] must have the same dtype",
            ),
            (
                fn,
                lambda call=call: call([T, {"w": torch.zeros(3), "b": torch.zeros(1)}], T),
                ValueError,
                rf"{fn}: anchor and candidates\[1\] must have the same shape",
            ),
            (
                fn,
                lambda call=call: call([T, INT], T),
                TypeError,
                rf"{fn}: candidates\[1\] must hold floating-point tensors only",
            ),
            (
                fn,
                lambda call=call: call([T, T], INT),
                TypeError,
                rf"{fn}: anchor must hold floating",
            ),
            (
                fn,
                lambda call=call: call([T, T], [1]),
                TypeError,
                rf"{fn}: anchor must be a mapping",
            ),
            (
                fn,
                lambda call=call: call([T, 5], T),
                TypeError,
                rf"{fn}: candidates\[1\] must be a mapping",
            ),
        ]
    ],
    ("task_arithmetic", lambda: task_arithmetic(_gen(), anchor=T), ValueError, r"at least one"),
    ("task_arithmetic", lambda: task_arithmetic([T], T), TypeError, r"positional argument"),  # type: ignore[misc]
    (
        "task_arithmetic",
        lambda: task_arithmetic([T], anchor=T, scale=math.nan),
        ValueError,
        r"task_arithmetic: scale must not be NaN",
    ),
    (
        "task_arithmetic",
        lambda: task_arithmetic([T], anchor=T, scale="1"),
        TypeError,
        r"task_arithmetic: scale must be a real number, a 0-d floating tensor or a dict",
    ),
    (
        "task_arithmetic",
        lambda: task_arithmetic([T], anchor=T, scale={"w": 1.0}),
        ValueError,
        r"task_arithmetic: scale given per tensor must have the same keys",
    ),
    # task_vector
    (
        "task_vector",
        lambda: task_vector([1], anchor=T),
        TypeError,
        r"task_vector: params must be a mapping",
    ),
    ("task_vector", lambda: task_vector(T, T), TypeError, r"positional argument"),  # type: ignore[misc]
    (
        "task_vector",
        lambda: task_vector(OTHER, anchor=T),
        ValueError,
        r"task_vector: params must have the same keys as anchor",
    ),
    (
        "task_vector",
        lambda: task_vector(T, anchor=INT),
        TypeError,
        r"task_vector: anchor must hold",
    ),
    # ties
    *[
        ("ties", lambda d=d: ties([T], anchor=T, density=d), ValueError, rf"ties: density must {m}")
        for d, m in [
            (0.0, r"be in \(0.0, 1.0\], got 0.0"),
            (1.5, "be in"),
            (math.nan, "not be NaN"),
        ]
    ],
    (
        "ties",
        lambda: ties([T], anchor=T, density="0.2"),
        TypeError,
        r"ties: density must be a real",
    ),
    (
        "ties",
        lambda: ties([T], anchor=T, trim="rows"),
        ValueError,
        r"ties: trim must be one of 'global', 'per_tensor', got 'rows'",
    ),
    ("ties", lambda: ties([T], anchor=T, trim=1), TypeError, r"ties: trim must be one of"),  # type: ignore[arg-type]
    (
        "ties",
        lambda: ties([T], anchor=T, scale=math.inf),
        ValueError,
        r"ties: scale must be a finite",
    ),
    ("ties", lambda: ties([T], T), TypeError, r"positional argument"),  # type: ignore[misc]
    (
        "ties",
        lambda: ties(_gen(T), anchor=T),
        TypeError,
        r"ties: candidates must be a sequence .*\(ties reads every candidate 2 times; an iterator "
        r"only once\)",
    ),
    (
        "ties",
        lambda: ties([SUB], anchor=SUB),
        TypeError,
        r"ties: anchor must hold plain tensors \(not DTensor .* _Sub at keys \['w'\]",
    ),
    (
        "ties",
        lambda: ties([T], anchor={"w": torch.zeros(2), "b": torch.zeros(1, device="meta")}),
        ValueError,
        r"ties: anchor must be on one device, got tensors on \['cpu', 'meta'\]",
    ),
    # dare
    *[
        ("dare", lambda d=d: dare(T, drop=d), ValueError, rf"dare: drop must {m}")
        for d, m in [
            (1.0, r"be in \[0.0, 1.0\), got 1.0"),
            (-0.1, "be in"),
            (math.nan, "not be NaN"),
        ]
    ],
    ("dare", lambda: dare(T, drop="0.5"), TypeError, r"dare: drop must be a real number"),
    ("dare", lambda: dare(T, drop=True), TypeError, r"dare: drop must be a real number"),
    ("dare", lambda: dare([1], drop=0.5), TypeError, r"dare: task_vector must be a mapping"),
    ("dare", lambda: dare(INT, drop=0.5), TypeError, r"dare: task_vector must hold floating"),
    (
        "dare",
        lambda: dare(T, drop=0.5, generator=0),  # type: ignore[arg-type]
        TypeError,
        r"dare: generator must be a torch.Generator or None, got 0",
    ),
    ("dare", lambda: dare(SUB, drop=0.5), TypeError, r"dare: task_vector must hold plain tensors"),
    (
        "dare",
        lambda: dare({"w": torch.zeros(2, device="meta")}, drop=0.5, generator=torch.Generator()),
        ValueError,
        r"dare: task_vector must be on the generator's device type \(cpu\), got meta",
    ),
    # model_stock
    (
        "model_stock",
        lambda: model_stock([T], anchor=T),
        ValueError,
        r"model_stock: candidates must hold at least 2 trees \(N >= 2\), got 1",
    ),
    (
        "model_stock",
        lambda: model_stock(_gen(T), anchor=T),
        ValueError,
        r"model_stock: candidates must hold at least 2 trees \(N >= 2\), got 1",
    ),
    ("model_stock", lambda: model_stock([T, T], T), TypeError, r"positional argument"),  # type: ignore[misc]
    # depth_schedule
    *[
        (
            "depth_schedule",
            lambda p=p: depth_schedule(p, start=0, end=1),
            err,
            rf"depth_schedule: {m}",
        )
        for p, err, m in [
            (3, TypeError, "params must be a parameter tree or an iterable of parameter names"),
            ("blocks.0.w", TypeError, "params must be a parameter tree or an iterable"),
            ([1], TypeError, "params must hold str names, got 1"),
            ({"w": 1}, TypeError, "params must have torch.Tensor leaves"),
            ([], ValueError, "params must hold at least one name, got none"),
            (["w", "b"], ValueError, r"keys must name transformer blocks .* pass depth_of="),
        ]
    ],
    (
        "depth_schedule",
        lambda: depth_schedule(BLOCKS, start=math.nan, end=1),
        ValueError,
        r"depth_schedule: start must not be NaN",
    ),
    (
        "depth_schedule",
        lambda: depth_schedule(BLOCKS, start=0, end=math.inf),
        ValueError,
        r"depth_schedule: end must be a finite number",
    ),
    (
        "depth_schedule",
        lambda: depth_schedule(BLOCKS, start="0", end=1),  # type: ignore[arg-type]
        TypeError,
        r"depth_schedule: start must be a real number",
    ),
    (
        "depth_schedule",
        lambda: depth_schedule(BLOCKS, start=0, end=1, depth_of=3),  # type: ignore[arg-type]
        TypeError,
        r"depth_schedule: depth_of must be callable or None, got 3",
    ),
    (
        "depth_schedule",
        lambda: depth_schedule(BLOCKS, start=0, end=1, depth_of=lambda k: "1"),  # type: ignore[arg-type,return-value]
        TypeError,
        r"depth_schedule: depth_of must return a real number, got '1' for 'blocks.0.w'",
    ),
    *[
        (
            "depth_schedule",
            lambda d=d: depth_schedule(BLOCKS, start=0, end=1, depth_of=lambda k: d),
            ValueError,
            r"depth_schedule: depth_of must return a finite number >= 0",
        )
        for d in (-1, math.nan, math.inf)
    ],
    (
        "depth_schedule",
        lambda: depth_schedule(BLOCKS, start=0, end=1, depth_of=lambda k: 0),
        ValueError,
        r"depth_schedule: depth_of must give some key a depth > 0, got 0 for every key",
    ),
    # lazy
    ("lazy", lambda: lazy(3, [1]), TypeError, r"lazy: load must be callable, got 3"),  # type: ignore[arg-type]
    (
        "lazy",
        lambda: lazy(dict, (x for x in [1])),  # type: ignore[arg-type]
        TypeError,
        r"lazy: sources must be a sequence",
    ),
    ("lazy", lambda: lazy(dict, "ab"), TypeError, r"lazy: sources must be a sequence"),  # type: ignore[arg-type]
    # the soups stream too
    (
        "uniform_soup",
        lambda: uniform_soup(_gen()),
        ValueError,
        r"uniform_soup: candidates must hold",
    ),
    (
        "greedy_soup",
        lambda: greedy_soup(_gen(S(0.0)), score),
        TypeError,
        r"greedy_soup: candidates must be a sequence .*\(greedy_soup reads every candidate 2 times",
    ),
]


@pytest.mark.parametrize(
    ("fn", "call", "err", "match"), ERRORS, ids=[f"{e[0]}-{i}" for i, e in enumerate(ERRORS)]
)
def test_errors(fn: str, call: Callable[[], Any], err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        call()


def test_error_table_covers_every_public_function() -> None:
    """This table plus the Fisher/ensemble table (tests/test_merging_fisher.py) cover __all__."""
    from test_merging_fisher import ERRORS as FISHER_ERRORS

    public = {n for n in merging.__all__ if callable(getattr(merging, n))}
    ours = {"wise", "uniform_soup", "greedy_soup", "task_vector", "task_arithmetic", "ties"}
    ours |= {"dare", "model_stock", "depth_schedule", "lazy"}
    assert ours <= public
    covered = {e[0] for e in ERRORS} | {e[0] for e in FISHER_ERRORS}
    assert public <= covered, public - covered
