"""robustft.averaging: beta_weights and the running averages (bma, ema, uniform)."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _memory import peak_alloc_bytes
from hypothesis import given
from hypothesis import strategies as st
from reference.averaging_ref import (
    beta_weights_logspace_ref,
    beta_weights_ref,
    bma_logspace_ref,
    bma_ref,
    ema_ref,
    uniform_ref,
)
from strategies import tree_pairs, trees
from torch import nn

from robustft import averaging
from robustft.averaging import BmaState, EmaState, UniformState

FACTORIES: dict[str, Callable[..., averaging.Averager]] = {
    "bma": lambda **kw: averaging.bma(8, beta=0.5, **kw),
    "ema": lambda **kw: averaging.ema(0.7, **kw),
    "uniform": lambda **kw: averaging.uniform(**kw),
}


def trajectory(n: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (3, 2), "a.bias": (3,), "scale": ()}
    return [
        {k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in shapes.items()}
        for _ in range(n)
    ]


def run(avg: averaging.Averager, traj: list[dict[str, Any]], *, in_place: bool) -> Any:
    state = avg.init(traj[0])
    for p in traj[1:]:
        state = avg.update_(state, p) if in_place else avg.update(state, p)
    return state


def counters(state: Any) -> tuple[float, ...]:
    """The state's counters as Python numbers (step, and BMA's log weight sum)."""
    return tuple(float(getattr(state, f)) for f in ("step", "log_weight_sum") if f in state._fields)


def assert_trees_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- beta_weights


def test_beta_weights_hand_values() -> None:
    # beta = 1/2: pdf(x) = 1 / (pi sqrt(x (1 - x))); T = 1 evaluates it at x = 1/4 and 3/4
    expected = 1.0 / (math.pi * math.sqrt(0.25 * 0.75))
    w = averaging.beta_weights(1)
    assert w.dtype == torch.float64 and w.shape == (2,)
    torch.testing.assert_close(w, torch.tensor([expected, expected], dtype=torch.float64))
    assert torch.equal(averaging.beta_weights(3, beta=1.0), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("total_steps", [1, 7, 1000])
@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 3.0])
def test_beta_weights_match_scipy(total_steps: int, beta: float) -> None:
    got = averaging.beta_weights(total_steps, beta=beta)
    ref = torch.tensor(beta_weights_ref(total_steps, beta), dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("total_steps", "beta"), [(1000, 150.0), (1000, 500.0), (50, 2000.0)])
def test_beta_weights_in_the_hundreds_match_scipy(total_steps: int, beta: float) -> None:
    # the first and last weights are below float64's range: 0 in both, no overflow, no NaN
    got = averaging.beta_weights(total_steps, beta=beta)
    ref = torch.tensor(beta_weights_ref(total_steps, beta), dtype=torch.float64)
    assert torch.isfinite(got).all()
    assert torch.equal(got == 0, ref == 0)
    if beta >= 500:
        assert got[0] == 0 and got[total_steps // 2] > 1
    normal = ref > 1e-300
    torch.testing.assert_close(got[normal], ref[normal], rtol=1e-10, atol=0)


@pytest.mark.parametrize("beta", [1e-3, 1e-8, 1e-300])
def test_beta_weights_for_tiny_beta_match_the_log_density(beta: float) -> None:
    # scipy.stats.beta(1e-300, 1e-300).pdf underflows to 0; the density is 1 / (x (1 - x) B)
    got = averaging.beta_weights(100, beta=beta)
    ref = torch.tensor(beta_weights_logspace_ref(100, beta), dtype=torch.float64)
    assert torch.isfinite(got).all() and (got > 0).all()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("beta", [99.9999, 100.0, 100.0001, 3e4])
def test_beta_weights_either_side_of_the_stirling_series_match_scipy(beta: float) -> None:
    # below beta = 100 the constant comes from lgamma, from 100 on from the Stirling series
    got = averaging.beta_weights(9, beta=beta)
    ref = torch.tensor(beta_weights_logspace_ref(9, beta), dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(
        got, torch.tensor(beta_weights_ref(9, beta), dtype=torch.float64), rtol=1e-9, atol=0
    )


# ---------------------------------------------------------------- bma


def test_bma_hand_value() -> None:
    # beta = 2, T = 2: alpha = 6 x (1 - x) at x = 1/6, 1/2, 5/6 = (5/6, 3/2, 5/6)
    avg = averaging.bma(2, beta=2.0)
    state = avg.init({"w": torch.tensor([0.0], dtype=torch.float64)})
    state = avg.update(state, {"w": torch.tensor([0.0], dtype=torch.float64)})
    state = avg.update(state, {"w": torch.tensor([6.0], dtype=torch.float64)})
    assert int(state.step) == 2
    assert state.weight_sum.dtype == torch.float64
    assert float(state.weight_sum) == pytest.approx(19 / 6, rel=1e-14)
    torch.testing.assert_close(state.average["w"], torch.tensor([30 / 19], dtype=torch.float64))


@pytest.mark.parametrize("in_place", [False, True])
def test_bma_equals_closed_form_weighted_mean(in_place: bool) -> None:
    T, beta = 9, 0.5
    traj = trajectory(T + 1)
    avg = averaging.bma(T, beta=beta)
    state = avg.init(traj[0])
    for t in range(1, T + 1):
        state = avg.update_(state, traj[t]) if in_place else avg.update(state, traj[t])
        ref = bma_ref(traj[: t + 1], T, beta)
        for k in ref:  # every prefix is the weighted mean of what was seen
            torch.testing.assert_close(state.average[k], ref[k], rtol=1e-12, atol=1e-12)
    assert float(state.weight_sum) == pytest.approx(sum(beta_weights_ref(T, beta)), rel=1e-13)


@given(
    traj=tree_pairs(n=4),
    total=st.integers(3, 6),
    beta=st.floats(0.1, 4.0),
    in_place=st.booleans(),
)
def test_bma_running_equals_closed_form_property(
    traj: list[dict[str, torch.Tensor]], total: int, beta: float, in_place: bool
) -> None:
    state = run(averaging.bma(total, beta=beta), traj, in_place=in_place)
    ref = bma_ref(traj, total, beta)
    for k, v in state.average.items():
        tol = 1e-5 if v.dtype == torch.float32 else 1e-11
        torch.testing.assert_close(v.double(), ref[k], rtol=tol, atol=tol * 4)


def test_bma_update_past_total_steps_raises() -> None:
    avg = averaging.bma(2)
    state = avg.init({"w": torch.zeros(2)})
    for _ in range(2):
        state = avg.update_(state, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match=r"bma.update_: cannot fold in a step past total_steps=2"):
        avg.update_(state, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match=r"bma.update: cannot fold in a step past total_steps=2"):
        avg.update(state, {"w": torch.ones(2)})


@pytest.mark.parametrize(("total_steps", "beta"), [(400, 500.0), (7, 1e6)])
def test_bma_with_a_huge_beta_is_the_exact_weighted_mean(total_steps: int, beta: float) -> None:
    # the first weights underflow to 0 in float64: a linear weight sum would divide 0 by 0
    traj = trajectory(total_steps + 1)
    avg = averaging.bma(total_steps, beta=beta)
    state = avg.init(traj[0])
    for t in range(1, total_steps + 1):
        state = avg.update_(state, traj[t])
        if t in (1, 2, total_steps // 2, total_steps):
            ref = bma_logspace_ref(traj[: t + 1], total_steps, beta)
            for k in ref:
                torch.testing.assert_close(state.average[k], ref[k], rtol=1e-9, atol=1e-12)
    assert math.isfinite(float(state.log_weight_sum))


def test_bma_with_an_astronomical_beta_keeps_the_middle_iterates() -> None:
    # beta = 1e12, T = 3: x = 1/8, 3/8, 5/8, 7/8; log-weights -8e11, -6e10, -6e10, -8e11, so
    # the average is theta_1 after step 1 and the mean of theta_1 and theta_2 after step 2.
    # The density is ill-conditioned in float64 here (its log is ~6e10, carried to ~1e-5), so
    # the two middle weights agree to ~1e-5, not to the last bit: finite and right, not exact.
    traj = trajectory(4)
    avg = averaging.bma(3, beta=1e12)
    state = avg.update_(avg.init(traj[0]), traj[1])
    assert_trees_equal(state.average, traj[1])
    for t in (2, 3):
        state = avg.update_(state, traj[t])
        for k, v in state.average.items():
            torch.testing.assert_close(v, (traj[1][k] + traj[2][k]) / 2, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- ema / uniform


def test_ema_decay_zero_returns_last_and_one_keeps_start() -> None:
    traj = trajectory(4, torch.float32)
    last = run(averaging.ema(0.0), traj, in_place=True)
    assert_trees_equal(last.average, traj[-1])
    start = run(averaging.ema(1.0), traj, in_place=False)
    assert_trees_equal(start.average, traj[0])
    assert int(last.step) == int(start.step) == 3


@pytest.mark.parametrize("decay", [0.3, 0.9, 0.999])
def test_ema_equals_closed_form(decay: float) -> None:
    traj = trajectory(7)
    state = run(averaging.ema(decay), traj, in_place=True)
    ref = ema_ref(traj, decay)
    for k in ref:
        torch.testing.assert_close(state.average[k], ref[k], rtol=1e-12, atol=1e-12)


def test_uniform_is_the_mean_of_everything_seen() -> None:
    avg = averaging.uniform()
    state = avg.init({"w": torch.tensor([1.0])})
    for x in (2.0, 6.0, 11.0):
        state = avg.update_(state, {"w": torch.tensor([x])})
    assert int(state.step) == 3
    assert torch.equal(state.average["w"], torch.tensor([5.0]))  # (1 + 2 + 6 + 11) / 4
    traj = trajectory(6)
    state = run(averaging.uniform(), traj, in_place=False)
    ref = uniform_ref(traj)
    for k in ref:
        torch.testing.assert_close(state.average[k], ref[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(FACTORIES))
@given(tree=trees(), in_place=st.booleans())
def test_average_of_a_constant_trajectory_is_constant(
    name: str, tree: dict[str, torch.Tensor], in_place: bool
) -> None:
    state = run(FACTORIES[name](), [tree] * 5, in_place=in_place)
    for k, v in tree.items():
        assert torch.equal(state.average[k], v.to(state.average[k].dtype)), k


# ---------------------------------------------------------------- state: save, resume, paths


@pytest.mark.parametrize("name", list(FACTORIES))
def test_save_and_load_mid_run_resumes_bit_identically(name: str) -> None:
    traj = trajectory(8, torch.float32, seed=1)
    avg = FACTORIES[name]()
    uninterrupted = run(avg, traj, in_place=True)

    state = avg.init(traj[0])
    for p in traj[1:4]:
        state = avg.update_(state, p)
    buf = io.BytesIO()
    torch.save(state, buf)
    del state
    buf.seek(0)
    state = torch.load(buf)  # weights_only=True by default: the state classes are allowed
    assert type(state) is type(uninterrupted)
    assert state.settings == uninterrupted.settings and bool(state.live)
    for p in traj[4:]:
        state = avg.update_(state, p)
    assert counters(state) == counters(uninterrupted)
    assert_trees_equal(state.average, uninterrupted.average)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_in_place_path_equals_pure_path(name: str) -> None:
    g = torch.Generator().manual_seed(3)
    big = 2**20 + 3  # above tree.lerp_'s conversion chunk: the chunked bf16 -> fp32 path
    traj = [
        {
            "f32": torch.randn(4, 3, generator=g),
            "f64": torch.randn(5, generator=g, dtype=torch.float64),
            "bf16": torch.randn(3, 2, generator=g).bfloat16(),
            "big_bf16": torch.randn(big, generator=g).bfloat16(),
        }
        for _ in range(5)
    ]
    avg = FACTORIES[name]()
    pure, fast = run(avg, traj, in_place=False), run(avg, traj, in_place=True)
    assert counters(pure) == counters(fast)
    assert_trees_equal(pure.average, fast.average)
    assert {k: v.dtype for k, v in fast.average.items()} == {
        "f32": torch.float32,
        "f64": torch.float64,  # the wider of the param dtype and the accumulator dtype
        "bf16": torch.float32,
        "big_bf16": torch.float32,
    }


@pytest.mark.parametrize("name", list(FACTORIES))
def test_inputs_are_never_mutated(name: str) -> None:
    traj = trajectory(3, torch.float32)
    saved = [{k: v.clone() for k, v in p.items()} for p in traj]
    avg = FACTORIES[name]()
    state = avg.init(traj[0])
    assert all(state.average[k].data_ptr() != v.data_ptr() for k, v in traj[0].items())
    before = {k: v.clone() for k, v in state.average.items()}
    new = avg.update(state, traj[1])
    assert_trees_equal(state.average, before)  # the pure update leaves the old state alone
    assert int(new.step) == int(state.step) + 1
    avg.update_(new, traj[2])
    for p, s in zip(traj, saved):
        assert_trees_equal(p, s)


def test_parameters_requiring_grad_give_a_detached_average() -> None:
    model = nn.Linear(3, 2)
    params = dict(model.named_parameters())
    avg = averaging.ema(0.5)
    state = avg.init(params)
    with torch.no_grad():
        model.weight.add_(1.0)
    state = avg.update_(state, params)
    state = avg.update(state, params)
    for k, v in state.average.items():
        assert not v.requires_grad and v.grad_fn is None, k
    expected = params["weight"].detach() - 0.25  # 0.25 * w0 + 0.75 * (w0 + 1) = w0 + 0.75
    torch.testing.assert_close(state.average["weight"], expected)


def test_update_in_place_allocates_no_parameter_sized_temporary() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(512, 256), (256,), (256, 512), (512,), (1000, 64)]
    params = {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    tree_bytes = sum(v.numel() * v.element_size() for v in params.values())
    for avg in (averaging.bma(10), averaging.ema(0.9), averaging.uniform()):
        state = avg.init(params)
        state = avg.update_(state, params)  # warm-up
        peak = peak_alloc_bytes(lambda: avg.update_(state, params))  # noqa: B023
        assert peak <= 0.01 * tree_bytes, (peak, tree_bytes)
    # the pure path, by contrast, allocates a whole new tree: the measurement can see it
    avg = averaging.ema(0.9)
    state = avg.init(params)
    pure = peak_alloc_bytes(lambda: avg.update(state, params))
    assert pure >= tree_bytes


def test_bf16_parameters_are_converted_chunk_by_chunk() -> None:
    # 2**22 bf16 elements into float32 accumulators: converting the tensor at once would allocate
    # 16 MiB; tree.lerp_ converts 2**20 elements (4 MiB) at a time, also for nn.Parameters
    model = nn.Linear(2**11, 2**11, bias=False).to(torch.bfloat16)
    params = dict(model.named_parameters())
    avg = averaging.ema(0.9)
    state = avg.init(params)
    peak = peak_alloc_bytes(lambda: avg.update_(state, params))
    assert 0 < peak <= 4 * 2**20 + 4096, peak


# ---------------------------------------------------------------- dtypes and devices


def test_bf16_params_with_fp32_accumulators_track_the_fp32_result() -> None:
    g = torch.Generator().manual_seed(0)
    walk = torch.cumsum(torch.randn(30, 64, generator=g) * 0.05, dim=0) + 1.0
    traj_bf16 = [{"w": w.bfloat16()} for w in walk]
    traj_fp32 = [{"w": p["w"].float()} for p in traj_bf16]  # the same values, upcast
    for make in (lambda: averaging.bma(29), lambda: averaging.ema(0.9), averaging.uniform):
        a = run(make(), traj_bf16, in_place=True).average["w"]
        b = run(make(), traj_fp32, in_place=True).average["w"]
        assert a.dtype == torch.float32
        assert torch.equal(a, b)


def test_bf16_accumulators_stall_where_fp32_ones_move() -> None:
    # EMA from 1 toward 2 with d = 0.999: each increment (1e-3) is below half a bf16 ulp at 1.0
    traj = [{"w": torch.ones(4, dtype=torch.bfloat16)}] + [
        {"w": torch.full((4,), 2.0, dtype=torch.bfloat16)}
    ] * 100
    stalled = run(averaging.ema(0.999, accumulator_dtype=torch.bfloat16), traj, in_place=True)
    moving = run(averaging.ema(0.999), traj, in_place=True)
    assert torch.equal(stalled.average["w"], torch.ones(4, dtype=torch.bfloat16))
    expected = torch.full((4,), 2.0 - 0.999**100, dtype=torch.float64)
    torch.testing.assert_close(moving.average["w"].double(), expected, rtol=1e-5, atol=1e-6)


def test_device_argument_places_the_average() -> None:
    traj = trajectory(3, torch.float32)
    for name, make in FACTORIES.items():
        avg = make(device="meta")  # a device other than the params'; meta keeps the test cheap
        state = run(avg, traj, in_place=True)
        assert all(v.device.type == "meta" for v in state.average.values()), name
        state = avg.update(state, traj[0])
        assert all(v.device.type == "meta" for v in state.average.values()), name


def test_integer_buffers_are_rejected() -> None:
    params = {"w": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(3)}
    for name, make in FACTORIES.items():
        with pytest.raises(TypeError, match=rf"{name}.init: params must hold floating-point .*"):
            make().init(params)
        avg = make()
        state = avg.init({"w": torch.zeros(2)})
        with pytest.raises(TypeError, match=rf"{name}.update_: params must hold .* torch.bool"):
            avg.update_(state, {"w": torch.zeros(2, dtype=torch.bool)})


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", list(FACTORIES))
def test_mismatched_trees_and_foreign_states_fail_clearly(name: str) -> None:
    avg = FACTORIES[name]()
    state = avg.init({"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(
        ValueError,
        match=rf"{name}.update_: params must have the same keys as state.average; "
        r"missing keys \['b'\], unexpected keys \['c'\]",
    ):
        avg.update_(state, {"a": torch.zeros(2), "c": torch.zeros(3)})
    with pytest.raises(ValueError, match=rf"{name}.update: .* same shape at every key"):
        avg.update(state, {"a": torch.zeros(2), "b": torch.zeros(4)})
    with pytest.raises(TypeError, match=rf"{name}.init: params must be a mapping"):
        avg.init([torch.zeros(2)])
    other = averaging.ema(0.5) if name != "ema" else averaging.uniform()
    foreign = other.init({"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(
        TypeError, match=rf"{name}.update: state must be the \w+State returned by {name}'s init"
    ):
        avg.update(foreign, {"a": torch.zeros(2), "b": torch.zeros(3)})


def test_states_are_the_documented_named_tuples() -> None:
    state = averaging.bma(3).init({"w": torch.ones(1)})
    assert isinstance(state, BmaState)
    assert state._fields == ("step", "log_weight_sum", "average", "settings", "live")
    assert EmaState._fields == UniformState._fields == ("step", "average", "settings", "live")
    assert state.step.dtype == torch.int64 and state.step.device.type == "cpu"
    assert state.log_weight_sum.dtype == torch.float64 and state.live.dtype == torch.bool
    assert int(state.step) == 0
    assert float(state.weight_sum) == pytest.approx(float(averaging.beta_weights(3)[0]), rel=1e-14)
    assert averaging.ema(0.5)._fields == ("init", "update", "update_")
