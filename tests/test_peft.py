"""robustft.peft tree functions: init, apply, delta, fold, factorize, rescale, split, size, save/load.

Hand values on 2x2 tensors, round-trip properties of :func:`peft.factorize` (hypothesis), the
weight-space tools on factor and update trees (averaging, WiSE-FT, task arithmetic, L2-SP), the
factor file, dtypes and float64 gradchecks.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import tensors

from robustft import averaging, losses, merging, peft
from robustft.peft import Spec

S2 = math.sqrt(2.0)


def _t(x: Any) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _random_like(factors: dict[str, torch.Tensor], seed: int, scale: float = 0.5) -> dict[str, Any]:
    """Random factors with ``factors``' keys, shapes and dtypes (init's B is zero)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (scale * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v.dtype)
        for k, v in factors.items()
    }


# ---------------------------------------------------------------- hand values: LoRA


@pytest.mark.parametrize(("scaling", "s"), [("rank", 2.0), ("sqrt_rank", 2.0 * S2)])
def test_lora_apply_delta_fold_hand_values(scaling: str, s: float) -> None:
    # r = 2, alpha = 4: s = 4/2 = 2 ("rank") or 4/sqrt(2) = 2 sqrt(2) ("sqrt_rank")
    spec = peft.lora(rank=2, alpha=4, targets="w", scaling=scaling)
    assert spec.scale == pytest.approx(s)
    f = {"w_lora_A": _t([[1.0, 2.0], [0.0, 1.0]]), "w_lora_B": _t([[1.0, 0.0], [1.0, 1.0]])}
    base = {"w": _t([[1.0, 1.0], [1.0, 1.0]]), "w_bias": _t([5.0, 6.0]), "v": _t([7.0])}
    ba = _t([[1.0, 2.0], [1.0, 3.0]])  # B @ A by hand
    d = peft.delta(spec, f, base=base)
    assert list(d) == ["w"]
    torch.testing.assert_close(d["w"], s * ba, rtol=1e-14, atol=1e-14)
    a = peft.apply(spec, f, base=base)
    assert list(a) == ["w"]
    torch.testing.assert_close(a["w"], base["w"] + s * ba, rtol=1e-14, atol=1e-14)
    out = peft.fold(spec, f, base=base)
    assert list(out) == list(base)
    torch.testing.assert_close(out["w"], base["w"] + s * ba, rtol=1e-14, atol=1e-14)
    # untouched tensors are the base's own objects; the base is not written
    assert out["w_bias"] is base["w_bias"] and out["v"] is base["v"]
    assert torch.equal(base["w"], _t([[1.0, 1.0], [1.0, 1.0]]))
    assert not out["w"].requires_grad


def test_lora_rank_one_docstring_values() -> None:
    spec = peft.lora(rank=1, alpha=2, targets="w")
    f = {"w_lora_A": torch.tensor([[1.0, 2.0]]), "w_lora_B": torch.tensor([[1.0], [0.0]])}
    d = peft.delta(spec, f, base={"w": torch.zeros(2, 2)})["w"]
    assert torch.equal(d, torch.tensor([[2.0, 4.0], [0.0, 0.0]]))


def test_qkv_split_with_some_blocks_hand_values() -> None:
    # a fused [3d, d] in-projection, d = 2; factors for q and v only, s = 1
    spec = peft.lora(rank=1, alpha=1, targets="*in_proj_weight", qkv=["v", "q"])
    assert spec.qkv == ("q", "v")  # normalised to q, k, v order
    w = torch.arange(12, dtype=torch.float64).reshape(6, 2)
    base = {"attn.in_proj_weight": w, "attn.in_proj_bias": torch.zeros(6, dtype=torch.float64)}
    f = {
        "attn.in_proj_weight_lora_A_q": _t([[1.0, 0.0]]),
        "attn.in_proj_weight_lora_B_q": _t([[1.0], [2.0]]),
        "attn.in_proj_weight_lora_A_v": _t([[0.0, 1.0]]),
        "attn.in_proj_weight_lora_B_v": _t([[3.0], [1.0]]),
    }
    want = _t([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    d = peft.delta(spec, f, base=base)
    assert list(d) == ["attn.in_proj_weight"]  # LoRA never touches the bias
    assert torch.equal(d["attn.in_proj_weight"], want)
    assert torch.equal(peft.apply(spec, f, base=base)["attn.in_proj_weight"], w + want)
    # the same spec on a weight that is not a fused in-projection gets one pair
    assert sorted(peft.factor_names(spec, "mlp.weight", (6, 2))) == ["lora_A", "lora_B"]
    assert peft.factor_names(spec, "x.in_proj_weight", (4, 2)) == {
        "lora_A": "x.in_proj_weight_lora_A",
        "lora_B": "x.in_proj_weight_lora_B",
    }  # 4 rows: not 3 blocks


def test_qkv_whole_weight_when_qkv_is_none() -> None:
    spec = peft.lora(rank=1, alpha=1, targets="*in_proj_weight")
    f = peft.init(spec, {"a.in_proj_weight": torch.zeros(6, 2)})
    assert sorted(f) == ["a.in_proj_weight_lora_A", "a.in_proj_weight_lora_B"]
    assert f["a.in_proj_weight_lora_B"].shape == (6, 1)


# ---------------------------------------------------------------- hand values: adapters


def test_full_rank_adapter_hand_values_with_bias() -> None:
    spec = peft.adapter(targets="l.weight")
    assert spec.scale == 1.0 and spec.rank is None
    base = {"l.weight": _t([[1.0, 2.0], [3.0, 4.0]]), "l.bias": _t([1.0, -1.0]), "o": _t([2.0])}
    f = {"l.weight_adapter": _t([[0.0, 1.0], [2.0, 0.0]])}
    # (I + W_adp) = [[1, 1], [2, 1]]
    d = peft.delta(spec, f, base=base)
    assert sorted(d) == ["l.bias", "l.weight"]
    assert torch.equal(d["l.weight"], _t([[3.0, 4.0], [2.0, 4.0]]))
    assert torch.equal(d["l.bias"], _t([-1.0, 2.0]))
    a = peft.apply(spec, f, base=base)
    assert torch.equal(a["l.weight"], _t([[4.0, 6.0], [5.0, 8.0]]))
    assert torch.equal(a["l.bias"], _t([0.0, 1.0]))  # b' = (I + W_adp) b
    out = peft.fold(spec, f, base=base)
    assert list(out) == list(base) and out["o"] is base["o"]
    assert torch.equal(out["l.bias"], _t([0.0, 1.0]))
    # without a bias in the tree only the weight is transformed
    assert list(peft.apply(spec, f, base={"l.weight": base["l.weight"]})) == ["l.weight"]


def test_low_rank_adapter_hand_values_with_bias() -> None:
    spec = peft.adapter(targets="l.weight", rank=1)
    base = {"l.weight": _t([[1.0, 2.0], [3.0, 4.0]]), "l.bias": _t([1.0, -1.0])}
    f = {"l.weight_adapter_A": _t([[1.0, -1.0]]), "l.weight_adapter_B": _t([[1.0], [2.0]])}
    # W_adp = B A = [[1, -1], [2, -2]]
    a = peft.apply(spec, f, base=base)
    assert torch.equal(a["l.weight"], _t([[-1.0, 0.0], [-1.0, 0.0]]))
    assert torch.equal(a["l.bias"], _t([3.0, 3.0]))
    d = peft.delta(spec, f, base=base)
    assert torch.equal(d["l.weight"], _t([[-2.0, -2.0], [-4.0, -4.0]]))
    assert torch.equal(d["l.bias"], _t([2.0, 4.0]))


def test_adapter_on_a_non_square_layer_and_in_proj_bias_name() -> None:
    # [out, in] = [3, 2]: W_adp is [3, 3]; an in_proj_weight's bias is in_proj_bias
    spec = peft.adapter(targets="m.in_proj_weight")
    w = _t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = _t([1.0, 2.0, 3.0])
    adp = _t([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    f = {"m.in_proj_weight_adapter": adp}
    a = peft.apply(spec, f, base={"m.in_proj_weight": w, "m.in_proj_bias": b})
    assert torch.equal(a["m.in_proj_weight"], w + adp @ w)
    assert torch.equal(a["m.in_proj_bias"], _t([4.0, 2.0, 4.0]))


def test_gates_scale_the_update() -> None:
    spec = peft.lora(rank=1, alpha=1, targets="w")
    f = {"w_lora_A": _t([[1.0, 2.0]]), "w_lora_B": _t([[1.0], [1.0]])}
    base = {"w": torch.zeros(2, 2, dtype=torch.float64)}
    for g in (0.0, 2.5, torch.tensor(2.5, dtype=torch.float64)):
        got = peft.apply(spec, f, base=base, gates={"w": g})["w"]
        assert torch.equal(got, float(g) * _t([[1.0, 2.0], [1.0, 2.0]]))
    aspec = peft.adapter(targets="w")
    fa = {"w_adapter": _t([[1.0, 0.0], [0.0, 1.0]])}
    wa = {"w": _t([[1.0, 2.0], [3.0, 4.0]])}
    assert torch.equal(peft.apply(aspec, fa, base=wa, gates={"w": 0.0})["w"], wa["w"])
    assert torch.equal(peft.apply(aspec, fa, base=wa, gates={"w": 3.0})["w"], 4 * wa["w"])


# ---------------------------------------------------------------- init: keys, draws, dtypes


def test_init_keys_shapes_and_draws() -> None:
    params = {
        "t.in_proj_weight": torch.zeros(6, 2),
        "t.in_proj_bias": torch.zeros(6),
        "t.out.weight": torch.zeros(3, 4),
        "t.out.bias": torch.zeros(3),
    }
    spec = peft.lora(rank=2, alpha=1, targets=["*in_proj_weight", "t.out.weight"], qkv=("q", "k"))
    f = peft.init(spec, params, generator=torch.Generator().manual_seed(3))
    assert {k: tuple(v.shape) for k, v in f.items()} == {
        "t.in_proj_weight_lora_A_q": (2, 2),
        "t.in_proj_weight_lora_B_q": (2, 2),
        "t.in_proj_weight_lora_A_k": (2, 2),
        "t.in_proj_weight_lora_B_k": (2, 2),
        "t.out.weight_lora_A": (2, 4),
        "t.out.weight_lora_B": (3, 2),
    }
    assert all(peft.is_factor(k) for k in f) and not any(v.requires_grad for v in f.values())
    # B = 0; A ~ U(-1/sqrt(cols), 1/sqrt(cols)) drawn on the CPU in params order
    g = torch.Generator().manual_seed(3)
    for key, cols in [
        ("t.in_proj_weight_lora_A_q", 2),
        ("t.in_proj_weight_lora_A_k", 2),
        ("t.out.weight_lora_A", 4),
    ]:
        want = (2 * torch.rand(f[key].shape, generator=g) - 1) * (1.0 / math.sqrt(cols))
        assert torch.equal(f[key], want), key
        assert f[key].abs().max() <= 1 / math.sqrt(cols)
        assert torch.equal(f[key.replace("_A", "_B")], torch.zeros_like(f[key.replace("_A", "_B")]))
    # so applying the fresh factors leaves the weights unchanged
    for k, v in peft.apply(spec, f, base=params).items():
        assert torch.equal(v, params[k])


def test_init_adapters_keys_and_zero_update() -> None:
    params = {"l.weight": torch.randn(3, 2), "l.bias": torch.randn(3)}
    full = peft.init(peft.adapter(targets="l.weight"), params)
    assert list(full) == ["l.weight_adapter"]
    assert torch.equal(full["l.weight_adapter"], torch.zeros(3, 3))
    low = peft.init(peft.adapter(targets="l.weight", rank=2), params)
    assert {k: tuple(v.shape) for k, v in low.items()} == {
        "l.weight_adapter_A": (2, 3),
        "l.weight_adapter_B": (3, 2),
    }
    assert low["l.weight_adapter_A"].abs().max() <= 1 / math.sqrt(3)
    assert low["l.weight_adapter_A"].abs().max() > 0
    spec = peft.adapter(targets="l.weight", rank=2)
    for k, v in peft.apply(spec, low, base=params).items():
        assert torch.equal(v, params[k])


def test_init_dtype_and_reproducible() -> None:
    params = {"w": torch.zeros(4, 3, dtype=torch.bfloat16)}
    spec = peft.lora(rank=2, alpha=1, targets="w")
    assert all(v.dtype == torch.bfloat16 for v in peft.init(spec, params).values())
    f32 = peft.init(spec, params, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    assert all(v.dtype == torch.float32 for v in f32.values())
    again = peft.init(spec, params, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(f32[k], again[k]) for k in f32)
    # the global generator when none is given
    torch.manual_seed(5)
    a = peft.init(spec, params, dtype=torch.float32)
    torch.manual_seed(5)
    b = peft.init(spec, params, dtype=torch.float32)
    assert torch.equal(a["w_lora_A"], b["w_lora_A"])
    # factor keys already in the tree are never targets (a tree after attach_)
    both = {**params, "w_lora_A": torch.zeros(2, 3), "w_lora_B": torch.zeros(4, 2)}
    assert sorted(peft.init(peft.lora(rank=1, alpha=1, targets="w*"), both)) == [
        "w_lora_A",
        "w_lora_B",
    ]


def test_spec_metadata_and_names() -> None:
    spec = peft.lora(rank=3, alpha=6, targets=["a", "b"], qkv=("k",), dropout=0.25)
    assert spec.targets == ("a", "b")
    assert spec.metadata() == {
        "kind": "lora",
        "rank": 3,
        "alpha": 6.0,
        "scaling": "rank",
        "qkv": ["k"],
        "dropout": 0.25,
        "drop": 0.0,
    }
    json.dumps(spec.metadata())
    assert spec == peft.lora(rank=3, alpha=6, targets=["a", "b"], qkv=("k",), dropout=0.25)
    assert peft.adapter(targets="x", drop=0.2).metadata()["drop"] == 0.2
    assert peft.BLOCKS == ("q", "k", "v")
    assert peft.is_factor("a.in_proj_weight_lora_B_q") and peft.is_factor("w_adapter_A")
    assert not peft.is_factor("w_lora_C") and not peft.is_factor("w") and not peft.is_factor(3)


def test_split_and_size() -> None:
    tree = {"w": torch.zeros(2, 2), "w_lora_A": torch.ones(1, 2), "w_lora_B": torch.ones(2, 1)}
    f, rest = peft.split(tree)
    assert list(f) == ["w_lora_A", "w_lora_B"] and list(rest) == ["w"]
    assert f["w_lora_A"] is tree["w_lora_A"]
    assert peft.size(f) == 4 and peft.size({}) == 0


# ---------------------------------------------------------------- rescale


@pytest.mark.parametrize(
    "spec",
    [
        peft.lora(rank=2, alpha=3, targets=["a.weight", "m.in_proj_weight"], qkv=("q", "v")),
        peft.lora(rank=2, alpha=3, targets=["a.weight", "m.in_proj_weight"]),
        peft.adapter(targets=["a.weight", "m.in_proj_weight"]),
        peft.adapter(targets=["a.weight", "m.in_proj_weight"], rank=2),
    ],
    ids=["lora-qkv", "lora", "adapter", "adapter-r2"],
)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, -0.5])
def test_rescale_folds_to_wise(spec: Spec, alpha: float) -> None:
    g = torch.Generator().manual_seed(0)
    base = {
        "a.weight": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "a.bias": torch.randn(3, generator=g, dtype=torch.float64),
        "m.in_proj_weight": torch.randn(6, 2, generator=g, dtype=torch.float64),
        "m.in_proj_bias": torch.randn(6, generator=g, dtype=torch.float64),
        "other": torch.randn(5, generator=g, dtype=torch.float64),
    }
    f = _random_like(peft.init(spec, base), 1)
    r = peft.rescale(spec, f, alpha)
    assert list(r) == list(f)
    for k, v in r.items():  # only one factor per pair is scaled; the A factors are f's own
        if k.endswith(("_lora_A", "_lora_A_q", "_lora_A_v", "_adapter_A")):
            assert v is f[k]
    got = peft.fold(spec, r, base=base)
    want = merging.wise(peft.fold(spec, f, base=base), anchor=base, alpha=alpha)
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)
    dr, d = peft.delta(spec, r, base=base), peft.delta(spec, f, base=base)
    for k in d:
        torch.testing.assert_close(dr[k], alpha * d[k], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- factorize (hypothesis)


@st.composite
def _low_rank(draw: Any) -> tuple[Spec, str, torch.Tensor, torch.Tensor]:
    """(spec, weight name, update U of rank <= spec.rank per factored block, expected delta)."""
    fused = draw(st.booleans())
    d = draw(st.integers(1, 4))
    rows, cols = (3 * d, d) if fused else (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    r = draw(st.integers(1, 5))  # may exceed the true rank and even min(rows, cols)
    scaling = draw(st.sampled_from(["rank", "sqrt_rank"]))
    alpha = draw(st.sampled_from([0.5, 1.0, 4.0]))
    name = "blk.attn.in_proj_weight" if fused else "blk.mlp.weight"
    qkv = None
    if fused and draw(st.booleans()):
        qkv = tuple(b for b in peft.BLOCKS if draw(st.booleans())) or ("k",)
    spec = peft.lora(rank=r, alpha=alpha, targets=name, scaling=scaling, qkv=qkv)

    def block(m: int, n: int) -> torch.Tensor:
        k = draw(st.integers(0, min(r, m, n)))  # the true rank
        b = draw(tensors((m, k), torch.float64, scale=1.0))
        a = draw(tensors((k, n), torch.float64, scale=1.0))
        return b @ a

    if qkv is None:
        u = block(rows, cols)
        return spec, name, u, u
    blocks = [block(d, cols) for _ in peft.BLOCKS]
    u = torch.cat(blocks)
    want = torch.cat(
        [blk if b in qkv else torch.zeros_like(blk) for b, blk in zip(peft.BLOCKS, blocks)]
    )
    return spec, name, u, want


@given(case=_low_rank())
def test_factorize_then_delta_round_trips_a_low_rank_update(
    case: tuple[Spec, str, torch.Tensor, torch.Tensor],
) -> None:
    spec, name, u, want = case
    base = {name: torch.zeros_like(u)}
    f = peft.factorize(spec, {name: u}, base=base)
    assert sorted(f) == sorted(peft.factor_names(spec, name, tuple(u.shape)).values())
    assert all(v.dtype == u.dtype for v in f.values())
    got = peft.delta(spec, f, base=base)[name]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 6),
    r=st.integers(1, 4),
    seed=st.integers(0, 2**20),
    qkv=st.sampled_from([None, ("q",), ("k", "v"), ("q", "k", "v")]),
)
def test_factorize_of_delta_then_fold_equals_fold(
    rows: int, cols: int, r: int, seed: int, qkv: tuple[str, ...] | None
) -> None:
    g = torch.Generator().manual_seed(seed)
    base = {
        "x.in_proj_weight": torch.randn(3 * cols, cols, generator=g, dtype=torch.float64),
        "y.weight": torch.randn(rows, cols, generator=g, dtype=torch.float64),
        "y.bias": torch.randn(rows, generator=g, dtype=torch.float64),
    }
    spec = peft.lora(rank=r, alpha=2, targets=["*.weight", "*in_proj_weight"], qkv=qkv)
    f = _random_like(peft.init(spec, base, generator=g), seed)
    d = peft.delta(spec, f, base=base)
    f2 = peft.factorize(spec, d)
    assert sorted(f2) == sorted(f)
    got, want = peft.fold(spec, f2, base=base), peft.fold(spec, f, base=base)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-9)


def test_factorize_truncates_to_the_best_rank_r_approximation() -> None:
    # diag(3, 2, 1) at rank 1: Eckart-Young keeps the top singular value
    spec = peft.lora(rank=1, alpha=1, targets="w")
    u = torch.diag(_t([3.0, 2.0, 1.0]))
    got = peft.delta(spec, peft.factorize(spec, {"w": u}), base={"w": u})["w"]
    torch.testing.assert_close(got, torch.diag(_t([3.0, 0.0, 0.0])), rtol=0, atol=1e-12)
    # float32 updates give float32 factors
    f = peft.factorize(spec, {"w": u.float()})
    assert all(v.dtype == torch.float32 for v in f.values())


# ---------------------------------------------------------------- the weight-space tools


def _two_runs(spec: Spec, base: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
    f0 = peft.init(spec, base, generator=torch.Generator().manual_seed(0))
    return _random_like(f0, 1), _random_like(f0, 2)


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    return {
        "l.weight": torch.randn(4, 3, generator=g, dtype=torch.float64),
        "l.bias": torch.randn(4, generator=g, dtype=torch.float64),
        "n.weight": torch.randn(5, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("avg", ["ema", "uniform"])
def test_averaging_factors_is_not_averaging_updates(avg: str) -> None:
    spec = peft.lora(rank=2, alpha=2, targets="l.weight")
    base = _base()
    f1, f2 = _two_runs(spec, base)
    averager = averaging.ema(0.5) if avg == "ema" else averaging.uniform()
    state = averager.update(averager.init(f1), f2)  # both: (f1 + f2) / 2
    mean = state.average
    assert list(mean) == list(f1) and peft.size(mean) == peft.size(f1) == 2 * 3 + 4 * 2
    for k in f1:
        torch.testing.assert_close(mean[k].double(), (f1[k] + f2[k]) / 2, rtol=1e-6, atol=1e-6)
    d_of_mean = peft.delta(spec, {k: v.double() for k, v in mean.items()}, base=base)["l.weight"]
    d1, d2 = (peft.delta(spec, f, base=base)["l.weight"] for f in (f1, f2))
    assert (d_of_mean - (d1 + d2) / 2).abs().max() > 1e-2
    # the identity behind it: (B1 + B2)/2 (A1 + A2)/2 = (B1A1 + B2A2)/2 - (B1 - B2)(A1 - A2)/4
    b1, a1, b2, a2 = (
        f1["l.weight_lora_B"],
        f1["l.weight_lora_A"],
        f2["l.weight_lora_B"],
        f2["l.weight_lora_A"],
    )
    gap = spec.scale * (b1 - b2) @ (a1 - a2) / 4
    torch.testing.assert_close(d_of_mean, (d1 + d2) / 2 - gap, rtol=1e-6, atol=1e-6)
    # with the A factors shared, the average of the factors is the average of the updates
    f2_shared = {**f2, "l.weight_lora_A": f1["l.weight_lora_A"]}
    state = averager.update(averager.init(f1), f2_shared)
    d_of_mean = peft.delta(spec, {k: v.double() for k, v in state.average.items()}, base=base)
    d2 = peft.delta(spec, f2_shared, base=base)["l.weight"]
    torch.testing.assert_close(d_of_mean["l.weight"], (d1 + d2) / 2, rtol=1e-6, atol=1e-6)


def test_average_of_factors_concrete_scalars() -> None:
    # B1 = A1 = 1, B2 = A2 = 0 (1x1): average of factors gives 1/4, average of updates 1/2
    spec = peft.lora(rank=1, alpha=1, targets="w")
    base = {"w": torch.zeros(1, 1)}
    f1 = {"w_lora_A": torch.ones(1, 1), "w_lora_B": torch.ones(1, 1)}
    f2 = {"w_lora_A": torch.zeros(1, 1), "w_lora_B": torch.zeros(1, 1)}
    avg = averaging.uniform()
    mean = avg.update(avg.init(f1), f2).average
    assert peft.delta(spec, mean, base=base)["w"].item() == 0.25


def test_task_arithmetic_over_two_lora_runs_is_base_plus_sum_of_deltas() -> None:
    spec = peft.lora(rank=2, alpha=2, targets="l.weight")
    base = _base()
    f1, f2 = _two_runs(spec, base)
    merged = merging.task_arithmetic(
        [peft.fold(spec, f1, base=base), peft.fold(spec, f2, base=base)], anchor=base, scale=1.0
    )
    d1, d2 = peft.delta(spec, f1, base=base), peft.delta(spec, f2, base=base)
    want = {k: base[k] + d1[k] + d2[k] if k in d1 else base[k] for k in base}
    assert list(merged) == list(base)
    for k in base:
        torch.testing.assert_close(merged[k], want[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "spec",
    [peft.lora(rank=2, alpha=2, targets="l.weight"), peft.adapter(targets="l.weight", rank=2)],
    ids=["lora", "adapter"],
)
def test_l2sp_of_applied_weights_is_half_the_squared_norm_of_delta(spec: Spec) -> None:
    base = _base()
    f, _ = _two_runs(spec, base)
    applied = peft.apply(spec, f, base=base)
    d = peft.delta(spec, f, base=base)
    anchor = {k: base[k] for k in applied}  # the touched keys only (a bias for adapters)
    assert sorted(anchor) == sorted(d)
    got = losses.l2sp(applied, anchor=anchor)
    want = 0.5 * sum(float((v**2).sum()) for v in d.values())  # l2sp = 1/2 sum ||theta - theta0||^2
    assert float(got) == pytest.approx(want, rel=1e-10)


# ---------------------------------------------------------------- dtypes and gradcheck


def test_bf16_base_with_fp32_factors_gives_bf16_weights() -> None:
    g = torch.Generator().manual_seed(0)
    w32 = torch.randn(6, 4, generator=g)
    b32 = torch.randn(6, generator=g)
    base = {"l.weight": w32.bfloat16(), "l.bias": b32.bfloat16()}
    for spec in (peft.lora(rank=2, alpha=2, targets="l.weight"), peft.adapter(targets="l.weight")):
        f = _random_like(peft.init(spec, base, dtype=torch.float32), 1)
        assert all(v.dtype == torch.float32 for v in f.values())
        out = peft.apply(spec, f, base=base)
        d = peft.delta(spec, f, base=base)
        assert all(v.dtype == torch.bfloat16 for v in out.values())
        assert all(v.dtype == torch.bfloat16 for v in d.values())
        assert all(v.dtype == torch.bfloat16 for v in peft.fold(spec, f, base=base).values())
        # the update is formed in float32 from the bf16 weights, then rounded once
        exact = peft.apply(spec, f, base={k: v.float() for k, v in base.items()})
        for k, v in out.items():
            torch.testing.assert_close(v.float(), exact[k], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "spec",
    [
        peft.lora(rank=2, alpha=3, targets=["l.weight", "m.in_proj_weight"], scaling="sqrt_rank"),
        peft.lora(rank=1, alpha=1, targets=["l.weight", "m.in_proj_weight"], qkv=("q", "v")),
        peft.adapter(targets=["l.weight", "m.in_proj_weight"]),
        peft.adapter(targets=["l.weight", "m.in_proj_weight"], rank=2),
    ],
    ids=["lora", "lora-qkv", "adapter", "adapter-r2"],
)
def test_gradcheck_apply_float64(spec: Spec) -> None:
    g = torch.Generator().manual_seed(0)
    base = {
        "l.weight": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "l.bias": torch.randn(3, generator=g, dtype=torch.float64),
        "m.in_proj_weight": torch.randn(6, 2, generator=g, dtype=torch.float64),
        "m.in_proj_bias": torch.randn(6, generator=g, dtype=torch.float64),
    }
    f = _random_like(peft.init(spec, base), 3)
    keys = list(f)
    out_keys = sorted(peft.apply(spec, f, base=base))

    def fn(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = peft.apply(spec, dict(zip(keys, xs)), base=base)
        return tuple(out[k] for k in out_keys)

    inputs = tuple(f[k].clone().requires_grad_(True) for k in keys)
    assert torch.autograd.gradcheck(fn, inputs)
    # and through the base weights as well (apply is differentiable in both)
    wkeys = sorted(base)

    def fw(*ws: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = peft.apply(spec, f, base=dict(zip(wkeys, ws)))
        return tuple(out[k] for k in out_keys)

    assert torch.autograd.gradcheck(fw, tuple(base[k].clone().requires_grad_(True) for k in wkeys))


# ---------------------------------------------------------------- factor files


@pytest.mark.parametrize(
    "spec",
    [
        peft.lora(
            rank=2, alpha=3, targets=["*.weight", "*in_proj_weight"], qkv=("k",), dropout=0.25
        ),
        peft.lora(rank=1, alpha=1, targets=["*.weight", "*_weight"], scaling="sqrt_rank"),
        peft.adapter(targets=["*.weight", "*_weight"], rank=2, drop=0.2),
        peft.adapter(targets="*weight"),
    ],
    ids=["lora-qkv", "lora", "adapter-r2", "adapter"],
)
def test_save_load_round_trip(tmp_path: Any, spec: Spec) -> None:
    params = {"a.in_proj_weight": torch.randn(6, 2), "b.weight": torch.randn(3, 2)}
    f = _random_like(peft.init(spec, params), 4)
    path = tmp_path / "f.safetensors"
    assert peft.save(path, spec, f) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]  # no temp file left
    spec2, f2 = peft.load(str(path))
    assert spec2 == Spec(**{**spec.__dict__, "targets": ("a.in_proj_weight", "b.weight")})
    assert sorted(f2) == sorted(f)
    for k in f:
        assert torch.equal(f2[k], f[k]) and f2[k].dtype == f[k].dtype
    # the metadata is readable by any safetensors reader
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as h:
        meta = json.loads(h.metadata()["robustft.peft"])
    assert meta["targets"] == ["a.in_proj_weight", "b.weight"] and meta["kind"] == spec.kind
    # overwriting an existing file replaces it atomically
    g = {k: v + 1 for k, v in f.items()}
    peft.save(path, spec, g)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]
    assert all(torch.equal(peft.load(path)[1][k], g[k]) for k in g)
    # and a loaded spec serves init on the same tree
    assert sorted(peft.init(spec2, params)) == sorted(f)


def test_header_is_what_save_writes(tmp_path: Any) -> None:
    spec = peft.lora(rank=2, alpha=3, targets="*in_proj_weight", qkv=("q", "v"), dropout=0.1)
    f = peft.init(spec, {"a.in_proj_weight": torch.zeros(6, 2)})
    h = peft.header(spec, f)
    assert list(h) == ["robustft.peft"]
    assert json.loads(h["robustft.peft"]) == {**spec.metadata(), "targets": ["a.in_proj_weight"]}
    path = peft.save(tmp_path / "f.safetensors", spec, f)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == h


def test_save_non_contiguous_and_requires_grad(tmp_path: Any) -> None:
    spec = peft.lora(rank=2, alpha=1, targets="w")
    f = {
        "w_lora_A": torch.randn(3, 2).T.requires_grad_(True),
        "w_lora_B": torch.randn(4, 2),
    }
    peft.save(tmp_path / "x.safetensors", spec, f)
    _, f2 = peft.load(tmp_path / "x.safetensors")
    assert torch.equal(f2["w_lora_A"], f["w_lora_A"].detach()) and not f2["w_lora_A"].requires_grad


def test_load_a_file_without_metadata_and_a_damaged_file(tmp_path: Any) -> None:
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w_lora_A": torch.zeros(1, 2), "w_lora_B": torch.zeros(2, 1)}, str(plain))
    with pytest.raises(ValueError, match=r"load: .*plain\.safetensors.* has no 'robustft\.peft'"):
        peft.load(plain)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match=r"load: .*bad\.safetensors.* is not a readable"):
        peft.load(bad)
    with pytest.raises(FileNotFoundError, match=r"load: path must be an existing factor file"):
        peft.load(tmp_path / "missing.safetensors")


def test_a_ball_around_the_base_scales_the_update_and_refactors_exactly() -> None:
    """projections.l2_ball on the applied weights bounds ||ΔW|| and scales it by a number, so the
    projected update keeps rank r and factorize gives its factors back exactly."""
    from robustft import projections, tree

    g = torch.Generator().manual_seed(3)
    base = {"a.weight": torch.randn(6, 5, generator=g), "b.weight": torch.randn(4, 4, generator=g)}
    spec = peft.lora(rank=2, alpha=3, targets="*.weight")
    factors = {
        k: torch.randn(v.shape, generator=g, dtype=v.dtype)
        for k, v in peft.init(spec, base, generator=g).items()
    }
    w = peft.apply(spec, factors, base=base)
    norms = {k: float((w[k] - base[k]).norm()) for k in w}
    radius = 0.5 * min(norms.values())
    inside = projections.l2_ball(w, anchor=base, radius=radius)
    update = tree.sub(inside, base)
    for k in update:
        assert math.isclose(float(update[k].norm()), radius, rel_tol=1e-5)
        expected = (w[k] - base[k]) * (radius / norms[k])
        torch.testing.assert_close(update[k], expected, rtol=1e-5, atol=1e-6)
    again = peft.delta(spec, peft.factorize(spec, update), base=base)
    for k in update:
        torch.testing.assert_close(again[k], update[k], rtol=1e-4, atol=1e-5)


def test_targets_by_tower_from_clip_names() -> None:
    """A tower is a target list built from robustft.clip's name helpers (or a 'visual.*' glob)."""
    from clip_models import tiny_vit_clip

    from robustft import clip

    model = tiny_vit_clip()
    params = dict(model.named_parameters())
    visual = [n for n in clip.visual_names(model) if n.endswith("attn.in_proj_weight")]
    text = [n for n in clip.text_names(model) if n.endswith("attn.in_proj_weight")]
    assert visual and text
    spec = peft.lora(rank=1, alpha=1, targets=visual)
    assert {peft._spec.parse(k)[0] for k in peft.init(spec, params)} == set(visual)
    glob = peft.lora(rank=1, alpha=1, targets="visual.*attn.in_proj_weight")
    assert set(peft.init(glob, params)) == set(peft.init(spec, params))
    spec = peft.lora(rank=1, alpha=1, targets=text, qkv=("v",))
    assert {peft._spec.parse(k) for k in peft.init(spec, params)} == {
        (n, part, "v") for n in text for part in ("lora_A", "lora_B")
    }
