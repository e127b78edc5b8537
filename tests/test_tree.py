"""Tests of robustft.tree: hand values, properties, fast path vs loop, torch.func, errors."""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import tree_pairs, trees

from robustft import tree

# ---------------------------------------------------------------- helpers


def snapshot(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.items()}


def assert_tree_equal(a, b, *, exact: bool = True, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol)


def flat(t: dict[str, torch.Tensor]) -> torch.Tensor:
    if not t:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([v.reshape(-1).double() for v in t.values()])


# ---------------------------------------------------------------- hand values


def test_arithmetic_hand_values() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)}
    b = {"w": torch.tensor([3.0, -1.0]), "b": torch.tensor(1.0)}
    assert_tree_equal(tree.add(a, b), {"w": torch.tensor([4.0, 1.0]), "b": torch.tensor(4.0)})
    assert_tree_equal(tree.sub(a, b), {"w": torch.tensor([-2.0, 3.0]), "b": torch.tensor(2.0)})
    assert_tree_equal(tree.scale(a, 2), {"w": torch.tensor([2.0, 4.0]), "b": torch.tensor(6.0)})
    assert_tree_equal(
        tree.scale(a, {"w": 0.5, "b": torch.tensor(-1.0)}),
        {"w": torch.tensor([0.5, 1.0]), "b": torch.tensor(-3.0)},
    )
    assert_tree_equal(tree.lerp(a, b, 0.5), {"w": torch.tensor([2.0, 0.5]), "b": torch.tensor(2.0)})
    assert_tree_equal(
        tree.lerp(a, b, {"w": 1.0, "b": torch.tensor(0.25)}),
        {"w": torch.tensor([3.0, -1.0]), "b": torch.tensor(2.5)},
    )
    assert tree.dot(a, b).item() == pytest.approx(3.0 - 2.0 + 3.0)
    assert tree.sq_norm(a).item() == pytest.approx(14.0)
    assert tree.norm(a).item() == pytest.approx(14.0**0.5)
    per = tree.norm(a, per_tensor=True)
    assert list(per) == ["w", "b"]
    assert per["w"].item() == pytest.approx(5.0**0.5) and per["b"].item() == pytest.approx(3.0)
    assert tree.sq_norm({}).item() == 0.0 and tree.norm({}).item() == 0.0


def test_key_order_follows_first_tree_across_dtype_groups() -> None:
    a = {
        "z": torch.ones(2),
        "a": torch.ones(2, dtype=torch.float64),
        "m": torch.ones(1),
    }
    out = tree.add(a, a)
    assert list(out) == ["z", "a", "m"]
    assert out["a"].dtype == torch.float64
    assert list(tree.norm(a, per_tensor=True)) == ["z", "a", "m"]


def test_low_precision_reductions_accumulate_in_float32() -> None:
    x = {"w": torch.full((4096,), 1.0, dtype=torch.bfloat16)}
    # a bf16 accumulator would stall at 256 (8 significant bits); float32 gives the exact 4096
    assert tree.sq_norm(x).dtype == torch.float32
    assert tree.sq_norm(x).item() == 4096.0
    assert tree.dot(x, x).item() == 4096.0
    assert tree.norm(x).dtype == torch.float32
    assert tree.norm({"w": torch.ones(2, dtype=torch.float64)}).dtype == torch.float64
    assert "accumulation_dtype" not in tree.__all__  # the rule is _numerics.compute_dtype


def test_in_place_ops_write_only_first_argument() -> None:
    acc = {"w": torch.zeros(3), "b": torch.zeros(())}
    src = {"w": torch.tensor([2.0, 4.0, 6.0]), "b": torch.tensor(8.0)}
    before = snapshot(src)
    ptr = acc["w"].data_ptr()
    out = tree.lerp_(acc, src, 0.5)
    assert out is acc and acc["w"].data_ptr() == ptr
    assert_tree_equal(acc, {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor(4.0)})
    assert_tree_equal(src, before)
    tree.copy_(acc, src)
    assert_tree_equal(acc, src)


def test_lerp_inplace_mixed_dtype_end() -> None:
    acc = {"w": torch.zeros(4)}
    end = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16)}
    tree.lerp_(acc, end, 0.25)
    assert acc["w"].dtype == torch.float32
    torch.testing.assert_close(acc["w"], torch.tensor([0.25, 0.5, 0.75, 1.0]))
    # tensor weights (e.g. a scheduled weight on device) take the per-tensor path
    tree.lerp_(acc, end, {"w": torch.tensor(1.0)})
    torch.testing.assert_close(acc["w"], torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_clone_zeros_cast() -> None:
    p = {"w": torch.ones(2, requires_grad=True), "n": torch.tensor([3])}
    c = tree.clone(p)
    assert c["w"].requires_grad and c["w"].data_ptr() != p["w"].data_ptr()
    d = tree.clone(p, detach=True)
    assert not d["w"].requires_grad and torch.equal(d["w"], p["w"].detach())
    z = tree.zeros_like(p)
    assert z["n"].dtype == torch.long and torch.equal(z["w"], torch.zeros(2))
    h = tree.cast(p, torch.float16)
    assert h["w"].dtype == torch.float16 and h["n"].dtype == torch.long
    assert tree.cast(p, torch.float16, floating_only=False)["n"].dtype == torch.float16
    same = tree.cast(d, torch.float32)
    assert same["w"] is d["w"]  # no copy when nothing changes


def test_from_module() -> None:
    m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    m[0].bias.requires_grad_(False)
    p = tree.from_module(m)
    assert list(p) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert p["0.weight"] is m[0].weight
    assert list(tree.from_module(m, trainable_only=True)) == ["0.weight", "1.weight", "1.bias"]
    pb = tree.from_module(m, buffers=True)
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(pb)
    out = torch.func.functional_call(m.eval(), tree.from_module(m, buffers=True), torch.ones(4, 2))
    torch.testing.assert_close(out, m(torch.ones(4, 2)))


NAMES = {
    "visual.ln_pre.weight": torch.ones(1),
    "visual.conv1.weight": torch.ones(1),
    "transformer.resblocks.0.ln_1.bias": torch.ones(1),
    "logit_scale": torch.ones(()),
}


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("visual.*", ["visual.ln_pre.weight", "visual.conv1.weight"]),
        ("*.ln_*", ["visual.ln_pre.weight", "transformer.resblocks.0.ln_1.bias"]),
        ("logit_scale", ["logit_scale"]),  # an exact name is a glob that matches itself
        (re.compile(r"^logit"), ["logit_scale"]),
        (re.compile(r"conv|ln_1"), ["visual.conv1.weight", "transformer.resblocks.0.ln_1.bias"]),
        (lambda k: k.startswith("visual"), ["visual.ln_pre.weight", "visual.conv1.weight"]),
        (lambda k: False, []),  # a predicate may select nothing
        (["logit_scale"], ["logit_scale"]),
        (("logit_scale", "visual.c*"), ["visual.conv1.weight", "logit_scale"]),
        ({"*.ln_*", "logit_scale"}, [k for k in NAMES if k != "visual.conv1.weight"]),
        ({"logit_scale": torch.zeros(())}, ["logit_scale"]),  # another tree's keys
        ([], []),
    ],
)
def test_select_and_partition_share_one_grammar(where: Any, expected: list[str]) -> None:
    selected = tree.select(NAMES, where)
    first, rest = tree.partition(NAMES, where)
    assert list(selected) == expected == list(first)  # tree order, whatever the where order
    assert list(rest) == [k for k in NAMES if k not in expected]
    assert all(selected[k] is NAMES[k] for k in selected)  # no copies
    assert tree.combine(first, rest).keys() == NAMES.keys()


def test_exact_names_with_glob_characters_match_themselves() -> None:
    t = {"heads[0].w": torch.ones(1), "heads0.w": torch.ones(1)}
    # an entry matches the key equal to it ("heads[0].w") and the keys its glob matches
    assert list(tree.select(t, ["heads[0].w"])) == ["heads[0].w", "heads0.w"]
    assert list(tree.select(t, "heads[0].w")) == ["heads[0].w", "heads0.w"]
    assert list(tree.select(t, "heads0.w")) == ["heads0.w"]


@pytest.mark.parametrize("fn", [tree.select, lambda t, w: tree.partition(t, w)[0]])
def test_patterns_that_match_nothing_raise_listing_them(fn: Any) -> None:
    name = "select" if fn is tree.select else "partition"
    with pytest.raises(
        ValueError,
        match=rf"tree\.{name}: where must match at least one key with every name or glob, got "
        r"entries that match none of the 4 key\(s\): \['visaul\.\*', 'zz'\]",
    ):
        fn(NAMES, ["logit_scale", "visaul.*", "zz"])
    with pytest.raises(ValueError, match=rf"tree\.{name}: where must match at least one key"):
        fn(NAMES, "visaul.*")
    with pytest.raises(
        ValueError, match=rf"tree\.{name}: where must match at least one key, got regex"
    ):
        fn(NAMES, re.compile("^visaul"))


# ---------------------------------------------------------------- properties


@given(tree_pairs(2), st.floats(-2, 2))
def test_lerp_endpoints_and_formula(pair, w) -> None:
    a, b = pair
    before = [snapshot(a), snapshot(b)]
    assert_tree_equal(tree.lerp(a, b, 0.0), a)
    assert_tree_equal(tree.lerp(a, b, 1.0), b, exact=False)
    expected = {k: a[k] + w * (b[k] - a[k]) for k in a}
    assert_tree_equal(tree.lerp(a, b, w), expected, exact=False, rtol=1e-5, atol=1e-5)
    assert_tree_equal(a, before[0])
    assert_tree_equal(b, before[1])


@given(tree_pairs(2))
def test_add_sub_roundtrip_and_commutativity(pair) -> None:
    a, b = pair
    assert_tree_equal(tree.sub(tree.add(a, b), b), a, exact=False, rtol=1e-5, atol=1e-5)
    assert_tree_equal(tree.add(a, b), tree.add(b, a))
    assert_tree_equal(tree.sub(a, a), tree.zeros_like(a))


@given(trees())
def test_norm_equals_norm_of_flattened_concatenation(t) -> None:
    expected = torch.linalg.vector_norm(flat(t))
    assert tree.norm(t).double().item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert tree.sq_norm(t).double().item() == pytest.approx(
        expected.item() ** 2, rel=1e-5, abs=1e-5
    )
    per = tree.sq_norm(t, per_tensor=True)
    assert sum(v.double().item() for v in per.values()) == pytest.approx(
        expected.item() ** 2, rel=1e-5, abs=1e-5
    )


@given(tree_pairs(2), st.floats(-3, 3))
def test_dot_bilinear_and_consistent_with_sq_norm(pair, c) -> None:
    a, b = pair
    expected = torch.dot(flat(a), flat(b)).item()
    assert tree.dot(a, b).double().item() == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert tree.dot(tree.scale(a, c), b).double().item() == pytest.approx(
        c * expected, rel=1e-4, abs=1e-4
    )
    assert tree.dot(a, a).double().item() == pytest.approx(
        tree.sq_norm(a).double().item(), rel=1e-5, abs=1e-5
    )


@given(trees(min_keys=0), st.sampled_from(["*", "?*.*", "a*", "zz*"]))
def test_partition_then_combine_is_identity(t, pattern) -> None:
    if not any(fnmatch.fnmatchcase(k, pattern) for k in t):
        with pytest.raises(ValueError, match=r"where must match at least one key"):
            tree.partition(t, pattern)
        pattern = lambda k: fnmatch.fnmatchcase(k, "zz*")  # noqa: E731 - may select nothing
    sel, rest = tree.partition(t, pattern)
    assert sel == tree.select(t, pattern)
    assert not set(sel) & set(rest)
    merged = tree.combine(sel, rest)
    assert set(merged) == set(t)
    assert all(merged[k] is t[k] for k in t)


@given(tree_pairs(2), st.floats(-1, 2))
def test_fast_path_equals_per_tensor_loop(pair, w) -> None:
    a, b = pair
    # requires_grad disables the foreach path: the per-tensor loop must give the same numbers
    ga = {k: v.clone().requires_grad_(True) for k, v in a.items()}
    for fast, slow in [
        (tree.add(a, b), tree.add(ga, b)),
        (tree.sub(a, b), tree.sub(ga, b)),
        (tree.scale(a, w), tree.scale(ga, w)),
        (tree.lerp(a, b, w), tree.lerp(ga, b, w)),
        (tree.norm(a, per_tensor=True), tree.norm(ga, per_tensor=True)),
    ]:
        assert_tree_equal(fast, {k: v.detach() for k, v in slow.items()}, exact=False)
    acc_fast, acc_slow = snapshot(a), snapshot(a)
    tree.lerp_(acc_fast, b, w)
    for k in acc_slow:
        acc_slow[k].lerp_(b[k], w)
    assert_tree_equal(acc_fast, acc_slow, exact=False)


@given(tree_pairs(2))
def test_pure_functions_do_not_mutate(pair) -> None:
    a, b = pair
    before = [snapshot(a), snapshot(b)]
    tree.add(a, b), tree.sub(a, b), tree.scale(a, 3.0), tree.lerp(a, b, 0.3), tree.dot(a, b)
    tree.norm(a), tree.sq_norm(b, per_tensor=True), tree.clone(a), tree.cast(a, torch.float16)
    tree.map(torch.mul, a, b), tree.zeros_like(a), tree.partition(a, "*")
    assert_tree_equal(a, before[0])
    assert_tree_equal(b, before[1])


# ---------------------------------------------------------------- autograd / torch.func


def test_gradients_through_tree_functions() -> None:
    a = {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    b = {k: torch.randn_like(v) for k, v in a.items()}

    def loss(p):
        d = tree.sub(p, b)
        return 0.5 * tree.sq_norm(d) + tree.dot(tree.lerp(p, b, 0.3), b) + tree.norm(p)

    g = torch.func.grad(loss)(a)
    n = tree.norm(a)
    for k in a:
        expected = (a[k] - b[k]) + 0.7 * b[k] + a[k] / n
        torch.testing.assert_close(g[k], expected)
    # the same through plain autograd
    ga = {k: v.clone().requires_grad_(True) for k, v in a.items()}
    loss(ga).backward()
    for k in a:
        torch.testing.assert_close(ga[k].grad, g[k])


def test_gradcheck_norm_and_dot() -> None:
    a = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: tree.norm({"a": x, "b": y}), (a, b))
    assert torch.autograd.gradcheck(lambda x, y: tree.dot({"a": x}, {"a": y.reshape(-1)}), (a, b))


def test_norm_gradient_finite_at_zero() -> None:
    z = {"w": torch.zeros(3, requires_grad=True)}
    tree.norm(z).backward()
    assert torch.isfinite(z["w"].grad).all()


def test_vmap_over_batched_trees() -> None:
    a = {"w": torch.randn(5, 3), "b": torch.randn(5)}
    out = torch.func.vmap(lambda t: tree.sq_norm(t))(a)
    torch.testing.assert_close(out, (a["w"] ** 2).sum(1) + a["b"] ** 2)


def test_compile_fullgraph() -> None:
    a = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    b = {k: torch.randn_like(v) for k, v in a.items()}

    def f(x, y):
        return tree.sq_norm(tree.lerp(x, y, 0.25)) + tree.dot(x, y)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(a, b), f(a, b))


# ---------------------------------------------------------------- weights: dtypes and endpoints


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize(
    "weight",
    [torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64), np.float32(0.5), 0.5],
    ids=["tensor32", "tensor64", "numpy", "float"],
)
def test_weights_never_change_leaf_dtypes(dtype: torch.dtype, weight: Any) -> None:
    # open_clip's logit_scale is a 0-d leaf: a 0-d float32 weight would promote a bf16 one
    a = {"logit_scale": torch.tensor(4.0, dtype=dtype), "w": torch.ones(3, dtype=dtype)}
    b = {"logit_scale": torch.tensor(5.0, dtype=dtype), "w": torch.zeros(3, dtype=dtype)}
    for out in (
        tree.lerp(a, b, weight),
        tree.scale(a, weight),
        tree.lerp(a, b, {"logit_scale": weight, "w": weight}),
        tree.scale(a, {"logit_scale": weight, "w": 2.0}),
    ):
        assert {k: v.dtype for k, v in out.items()} == {"logit_scale": dtype, "w": dtype}
        assert out["logit_scale"].shape == ()
    assert float(tree.lerp(a, b, weight)["logit_scale"]) == 4.5
    assert float(tree.scale(a, weight)["logit_scale"]) == 2.0
    acc = tree.clone(a)
    tree.lerp_(acc, b, weight)
    assert acc["logit_scale"].dtype == dtype and float(acc["logit_scale"]) == 4.5


@pytest.mark.parametrize(
    "make",
    [
        lambda v: v,
        lambda v: np.float64(v),
        lambda v: torch.tensor(v),
        lambda v: torch.tensor(v, dtype=torch.float64),
        lambda v: {"w": torch.tensor(v), "b": v, "s": np.float32(v)},
    ],
    ids=["float", "numpy", "tensor32", "tensor64", "dict"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_lerp_endpoints_are_exact_for_every_weight_kind(make: Any, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    a = {
        k: torch.randn(s, generator=g).to(dtype)
        for k, s in {"w": (4, 3), "b": (3,), "s": ()}.items()
    }
    b = {k: torch.randn(v.shape, generator=g).to(dtype) for k, v in a.items()}
    for w, expected in ((0.0, a), (1.0, b)):
        out = tree.lerp(a, b, make(w))
        assert all(torch.equal(out[k], expected[k]) for k in a)
        acc = tree.clone(a)
        tree.lerp_(acc, b, make(w))
        assert all(torch.equal(acc[k], expected[k]) for k in a)


def test_tensor_weights_are_differentiable() -> None:
    a = {"w": torch.randn(3, dtype=torch.float64)}
    b = {"w": torch.randn(3, dtype=torch.float64)}
    w = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: tree.lerp(a, b, w)["w"], (w,))
    assert torch.autograd.gradcheck(lambda w: tree.scale(a, w)["w"], (w,))


# ---------------------------------------------------------------- the error table

A = {"w": torch.zeros(2), "b": torch.zeros(1)}
I64 = {"n": torch.tensor([1])}


def _lerp_(w: Any) -> Callable[[], Any]:
    return lambda: tree.lerp_(tree.clone(A), A, w)


ERRORS: list[tuple[str, Callable[[], Any], type, str]] = [
    # structure
    (
        "add",
        lambda: tree.add(A, {"w": torch.zeros(2), "x": torch.zeros(1)}),
        ValueError,
        r"tree\.add: b must have the same keys as a; missing keys \['b'\], unexpected keys \['x'\]",
    ),
    (
        "add",
        lambda: tree.add({"x": 1.0}, {"x": 1.0}),
        TypeError,
        r"tree\.add: a must have torch.Tensor leaves, got non-tensor leaves \(float\) at keys "
        r"\['x'\]",
    ),
    (
        "sub",
        lambda: tree.sub(A, {"w": torch.zeros(3), "b": torch.zeros(1)}),
        ValueError,
        r"tree\.sub: .*same shape.*'w': \(2,\) vs \(3,\)",
    ),
    (
        "lerp",
        lambda: tree.lerp(A, {"w": torch.zeros(2), "b": torch.zeros(1, dtype=torch.float64)}, 0.5),
        TypeError,
        r"tree\.lerp: .*same dtype.*'b': torch.float32 vs torch.float64",
    ),
    ("lerp", lambda: tree.lerp(I64, I64, 0.5), TypeError, r"tree\.lerp: start must hold floating"),
    (
        "lerp_",
        lambda: tree.lerp_(tree.clone(A), {"w": torch.zeros(2)}, 0.5),
        ValueError,
        r"tree\.lerp_: end must have the same keys as start",
    ),
    (
        "lerp_",
        lambda: tree.lerp_(
            tree.clone(A), {"w": torch.zeros(2, dtype=torch.int64), "b": torch.zeros(1)}, 0.5
        ),
        TypeError,
        r"tree\.lerp_: end must hold floating-point tensors only, got torch.int64 at keys \['w'\]",
    ),
    (
        "dot",
        lambda: tree.dot(A, {"w": torch.zeros(2)}),
        ValueError,
        r"tree\.dot: .*missing keys",
    ),
    ("dot", lambda: tree.dot(I64, I64), TypeError, r"tree\.dot: a must hold floating-point"),
    ("copy_", lambda: tree.copy_(A, {}), ValueError, r"tree\.copy_: src must have the same keys"),
    (
        "map",
        lambda: tree.map(torch.add, A, {"w": torch.zeros(2)}),
        ValueError,
        r"tree\.map: rest\[0\] must have the same keys",
    ),
    ("map", lambda: tree.map(3, A), TypeError, r"tree\.map: fn must be callable"),
    (
        "norm",
        lambda: tree.norm([torch.zeros(1)]),
        TypeError,
        r"tree\.norm: tree must be a mapping .* got list",
    ),
    (
        "sq_norm",
        lambda: tree.sq_norm(I64),
        TypeError,
        r"tree\.sq_norm: tree must hold floating-point tensors only, got torch.int64",
    ),
    ("norm", lambda: tree.norm(I64), TypeError, r"tree\.norm: tree must hold floating-point"),
    (
        "clone",
        lambda: tree.clone({0: torch.zeros(1)}),
        TypeError,
        r"tree\.clone: tree must have str keys",
    ),
    (
        "zeros_like",
        lambda: tree.zeros_like(A, dtype="half"),
        TypeError,
        r"tree\.zeros_like: dtype must be a torch.dtype",
    ),
    (
        "zeros_like",
        lambda: tree.zeros_like(3),
        TypeError,
        r"tree\.zeros_like: tree must be a mapping",
    ),
    (
        "cast",
        lambda: tree.cast(A, "float16"),
        TypeError,
        r"tree\.cast: dtype must be a torch.dtype",
    ),
    ("cast", lambda: tree.cast(A, device=3), TypeError, r"tree\.cast: device must be None, a str"),
    (
        "cast",
        lambda: tree.cast(A, device="gpu:x"),
        ValueError,
        r"tree\.cast: device must name a torch device",
    ),
    (
        "from_module",
        lambda: tree.from_module(A),
        TypeError,
        r"tree\.from_module: module must be a torch.nn.Module",
    ),
    (
        "combine",
        lambda: tree.combine(A, A),
        ValueError,
        r"tree\.combine: trees must be disjoint, got keys present twice \['b', 'w'\]",
    ),
    (
        "combine",
        lambda: tree.combine(A, 3),
        TypeError,
        r"tree\.combine: trees\[1\] must be a mapping",
    ),
    (
        "check_tree",
        lambda: tree.check_tree({"w": 1}, fn="demo", name="params"),
        TypeError,
        r"demo: params must have torch.Tensor leaves",
    ),
    (
        "check_same_structure",
        lambda: tree.check_same_structure(
            {"w": torch.zeros(2)},
            {"v": torch.zeros(2)},
            what="demo",
            names=("anchor", "params"),
            subset=True,
        ),
        ValueError,
        r"demo: params must have all the keys of anchor; missing keys \['w'\]",
    ),
    # weights and factors (one validator: numbers incl. NumPy, 0-d tensors, dicts per key)
    (
        "scale",
        lambda: tree.scale(A, "2"),
        TypeError,
        r"tree\.scale: factor must be a real number, a 0-d floating tensor or a dict",
    ),
    ("scale", lambda: tree.scale(A, True), TypeError, r"tree\.scale: factor must be a real number"),
    (
        "scale",
        lambda: tree.scale(A, math.inf),
        ValueError,
        r"tree\.scale: factor must be a finite number",
    ),
    (
        "scale",
        lambda: tree.scale(A, np.float64(np.nan)),
        ValueError,
        r"tree\.scale: factor must not be NaN",
    ),
    (
        "scale",
        lambda: tree.scale(A, {"w": "x", "b": 1.0}),
        TypeError,
        r"tree\.scale: factor\['w'\] must be a real number",
    ),
    (
        "scale",
        lambda: tree.scale(I64, 2.0),
        TypeError,
        r"tree\.scale: tree must hold floating-point",
    ),
    (
        "lerp",
        lambda: tree.lerp(A, A, torch.ones(2)),
        TypeError,
        r"tree\.lerp: weight must be a real number or a 0-d floating tensor",
    ),
    (
        "lerp",
        lambda: tree.lerp(A, A, torch.tensor(1)),
        TypeError,
        r"tree\.lerp: weight must be a real number or a 0-d floating tensor",
    ),
    (
        "lerp",
        lambda: tree.lerp(A, A, {"v": 0.5}),
        ValueError,
        r"tree\.lerp: weight given per tensor must have the same keys .* missing keys \['b', 'w'\]",
    ),
    (
        "lerp",
        lambda: tree.lerp(A, A, -math.inf),
        ValueError,
        r"tree\.lerp: weight must be a finite number",
    ),
    ("lerp_", _lerp_(math.nan), ValueError, r"tree\.lerp_: weight must not be NaN"),
    (
        "lerp_",
        _lerp_({"w": 0.5, "b": torch.ones(1)}),
        TypeError,
        r"tree\.lerp_: weight\['b'\] must be a real number or a 0-d",
    ),
    # the selection grammar
    (
        "select",
        lambda: tree.select(A, 3),
        TypeError,
        r"tree\.select: where must be a name or glob str, a compiled regex",
    ),
    (
        "select",
        lambda: tree.select(A, ["w", 1]),
        TypeError,
        r"tree\.select: where must be a collection of str names or globs, got entries \[1\]",
    ),
    (
        "select",
        lambda: tree.select(A, ["nope"]),
        ValueError,
        r"tree\.select: where must match at least one key .* \['nope'\]",
    ),
    (
        "select",
        lambda: tree.select(A, re.compile(b"w")),
        TypeError,
        r"tree\.select: where must be a str regex",
    ),
    ("select", lambda: tree.select([1], "w"), TypeError, r"tree\.select: tree must be a mapping"),
    (
        "partition",
        lambda: tree.partition(A, 3),
        TypeError,
        r"tree\.partition: where must be a name or glob str",
    ),
    (
        "partition",
        lambda: tree.partition(A, [1]),
        TypeError,
        r"tree\.partition: where must be a collection of str",
    ),
    (
        "partition",
        lambda: tree.partition(A, "nope*"),
        ValueError,
        r"tree\.partition: where must match at least one key .* \['nope\*'\]",
    ),
    (
        "partition",
        lambda: tree.partition(A, b"w"),
        TypeError,
        r"tree\.partition: where must be a name or glob str",
    ),
]


@pytest.mark.parametrize(
    ("fn", "call", "err", "match"), ERRORS, ids=[f"{e[0]}-{i}" for i, e in enumerate(ERRORS)]
)
def test_errors(fn: str, call: Callable[[], Any], err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        call()


def test_error_table_covers_every_public_function() -> None:
    public = {n for n in tree.__all__ if callable(getattr(tree, n)) and n != "Where"}
    assert public <= {e[0] for e in ERRORS}, public - {e[0] for e in ERRORS}


def test_check_same_structure_subset_and_flags() -> None:
    anchor = {"w": torch.zeros(2)}
    params = {"w": torch.zeros(2), "head": torch.zeros(3)}
    tree.check_same_structure(anchor, params, what="l2sp", names=("anchor", "params"), subset=True)
    tree.check_same_structure(anchor, {"w": torch.zeros(5)}, what="f", shapes=False)
    tree.check_same_structure(
        anchor, {"w": torch.zeros(2, dtype=torch.half)}, what="f", dtypes=False
    )
