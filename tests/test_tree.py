"""Tests of robustft.tree: hand values, properties, fast path vs loop, torch.func, errors."""

from __future__ import annotations

import re

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
    assert tree.accumulation_dtype(torch.float16) == torch.float32
    assert tree.accumulation_dtype(torch.float64) == torch.float64


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


def test_select_partition_combine() -> None:
    t = {
        "visual.ln_pre.weight": torch.ones(1),
        "visual.conv1.weight": torch.ones(1),
        "transformer.resblocks.0.ln_1.bias": torch.ones(1),
        "logit_scale": torch.ones(()),
    }
    assert list(tree.select(t, "visual.*")) == ["visual.ln_pre.weight", "visual.conv1.weight"]
    assert list(tree.select(t, "*.ln_*")) == [
        "visual.ln_pre.weight",
        "transformer.resblocks.0.ln_1.bias",
    ]
    assert list(tree.select(t, regex=r"^logit")) == ["logit_scale"]
    assert list(tree.select(t, regex=re.compile("conv"), predicate=lambda k: "ln_1" in k)) == [
        "visual.conv1.weight",
        "transformer.resblocks.0.ln_1.bias",
    ]
    for where in ("visual.*", re.compile("^visual"), lambda k: k.startswith("visual")):
        sel, rest = tree.partition(t, where)
        assert set(sel) == {"visual.ln_pre.weight", "visual.conv1.weight"}
        assert set(rest) == {"transformer.resblocks.0.ln_1.bias", "logit_scale"}
    sel, rest = tree.partition(t, ["logit_scale"])
    assert list(sel) == ["logit_scale"] and len(rest) == 3
    assert sel["logit_scale"] is t["logit_scale"]  # no copies


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
    sel, rest = tree.partition(t, pattern)
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


# ---------------------------------------------------------------- errors


def test_structure_errors_list_keys() -> None:
    a = {"w": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(
        ValueError,
        match=r"tree\.add: b must have the same keys as a; missing keys \['b'\], unexpected keys \['x'\]",
    ):
        tree.add(a, {"w": torch.zeros(2), "x": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"tree\.sub: .*same shape.*'w': \(2,\) vs \(3,\)"):
        tree.sub(a, {"w": torch.zeros(3), "b": torch.zeros(1)})
    with pytest.raises(
        TypeError, match=r"tree\.lerp: .*same dtype.*'b': torch.float32 vs torch.float64"
    ):
        tree.lerp(a, {"w": torch.zeros(2), "b": torch.zeros(1, dtype=torch.float64)}, 0.5)
    with pytest.raises(ValueError, match=r"tree\.map: rest\[0\] must have the same keys"):
        tree.map(torch.add, a, {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"tree\.lerp_: end must have the same keys as start"):
        tree.lerp_(a, {"w": torch.zeros(2)}, 0.5)
    with pytest.raises(ValueError, match=r"tree\.dot: .*missing keys"):
        tree.dot(a, {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"tree\.copy_: src must have the same keys as dst"):
        tree.copy_(a, {})


def test_check_same_structure_subset_and_flags() -> None:
    anchor = {"w": torch.zeros(2)}
    params = {"w": torch.zeros(2), "head": torch.zeros(3)}
    tree.check_same_structure(anchor, params, what="l2sp", names=("anchor", "params"), subset=True)
    with pytest.raises(
        ValueError, match=r"l2sp: params must have all the keys of anchor; missing keys \['w'\]"
    ):
        tree.check_same_structure(
            anchor, {"v": torch.zeros(2)}, what="l2sp", names=("anchor", "params"), subset=True
        )
    tree.check_same_structure(anchor, {"w": torch.zeros(5)}, what="f", shapes=False)
    tree.check_same_structure(
        anchor, {"w": torch.zeros(2, dtype=torch.half)}, what="f", dtypes=False
    )


def test_non_tree_and_non_tensor_leaves() -> None:
    with pytest.raises(TypeError, match=r"tree\.norm: tree must be a mapping .* got list"):
        tree.norm([torch.zeros(1)])  # type: ignore[arg-type]
    with pytest.raises(
        TypeError,
        match=r"tree\.add: a must have torch.Tensor leaves, got non-tensor leaves \(float\) at keys \['x'\]",
    ):
        tree.add({"x": 1.0}, {"x": 1.0})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"tree\.clone: tree must have str keys"):
        tree.clone({0: torch.zeros(1)})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"tree\.sq_norm: tree must hold floating-point tensors"):
        tree.sq_norm({"n": torch.tensor([1])})
    with pytest.raises(TypeError, match=r"tree\.dot: trees must be floating-point"):
        tree.dot({"n": torch.tensor([1])}, {"n": torch.tensor([1])})
    with pytest.raises(TypeError, match=r"tree\.from_module: module must be a torch.nn.Module"):
        tree.from_module({"w": torch.zeros(1)})  # type: ignore[arg-type]


def test_argument_errors() -> None:
    a = {"w": torch.zeros(2)}
    with pytest.raises(TypeError, match=r"tree\.scale: factor must be a real number, a 0-d tensor"):
        tree.scale(a, "2")
    with pytest.raises(TypeError, match=r"tree\.lerp: weight must be a real number"):
        tree.lerp(a, a, torch.ones(2))
    with pytest.raises(
        ValueError,
        match=r"tree\.lerp: weight given per tensor must have the same keys .* missing keys \['w'\]",
    ):
        tree.lerp(a, a, {"v": 0.5})
    with pytest.raises(TypeError, match=r"tree\.scale: factor must map keys to real numbers"):
        tree.scale(a, {"w": "x"})
    with pytest.raises(TypeError, match=r"tree\.map: fn must be callable"):
        tree.map(3, a)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"tree\.cast: dtype must be a torch.dtype"):
        tree.cast(a, "float16")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"tree\.cast: device must be"):
        tree.cast(a, device=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"tree\.zeros_like: dtype must be a torch.dtype"):
        tree.zeros_like(a, dtype="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"tree\.select: give at least one"):
        tree.select(a)
    with pytest.raises(TypeError, match=r"tree\.select: patterns must be glob strs"):
        tree.select(a, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"tree\.select: regex must be"):
        tree.select(a, regex=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"tree\.select: predicate must be callable"):
        tree.select(a, predicate=3)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"tree\.partition: where names keys that are not in the tree: \['nope'\]"
    ):
        tree.partition(a, ["nope"])
    with pytest.raises(TypeError, match=r"tree\.partition: where must contain str names"):
        tree.partition(a, [1])
    with pytest.raises(TypeError, match=r"tree\.partition: where must be a glob str"):
        tree.partition(a, 3)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"tree\.combine: trees must be disjoint, got keys present twice \['w'\]"
    ):
        tree.combine(a, a)
