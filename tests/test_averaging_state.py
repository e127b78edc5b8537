"""robustft.averaging states: recorded settings, stale-state detection, resuming, aliasing."""

from __future__ import annotations

import copy
import gc
import io
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from robustft import averaging

FACTORIES: dict[str, Callable[[], averaging.Averager]] = {
    "bma": lambda: averaging.bma(8, beta=0.5),
    "ema": lambda: averaging.ema(0.7),
    "uniform": averaging.uniform,
}
NAMES = list(FACTORIES)


def tree(seed: int = 0, n: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(4, 3, generator=g) for i in range(n)}


def assert_trees_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- settings


def test_states_record_the_settings_of_their_averager() -> None:
    p = tree()
    assert averaging.bma(10, beta=0.1, device="cpu").init(p).settings == {
        "kind": "bma",
        "total_steps": 10,
        "beta": 0.1,
        "accumulator_dtype": torch.float32,
        "device": "cpu",
    }
    assert averaging.ema(0.9, accumulator_dtype=torch.float64).init(p).settings == {
        "kind": "ema",
        "decay": 0.9,
        "accumulator_dtype": torch.float64,
        "device": None,
    }
    assert averaging.uniform().init(p).settings == {
        "kind": "uniform",
        "accumulator_dtype": torch.float32,
        "device": None,
    }


def test_numpy_hyper_parameters_record_the_same_settings_as_python_ones() -> None:
    p = tree()
    a = averaging.bma(np.int64(10), beta=np.float32(0.5)).init(p)
    assert a.settings == averaging.bma(10, beta=0.5).init(p).settings
    assert type(a.settings["total_steps"]) is int and type(a.settings["beta"]) is float
    # a state made with NumPy numbers is updated by the averager made with Python ones
    averaging.bma(10, beta=0.5).update_(a, p)
    assert averaging.ema(np.float64(0.25)).init(p).settings["decay"] == 0.25


@pytest.mark.parametrize(
    ("made_by", "updated_by", "match"),
    [
        (
            lambda: averaging.bma(100),
            lambda: averaging.bma(200),
            r"bma.update_: state was made by bma\(total_steps=100, beta=0.5, accumulator_dtype="
            r"torch.float32, device=None\), but this averager is bma\(total_steps=200, beta=0.5,",
        ),
        (
            lambda: averaging.bma(100, beta=0.5),
            lambda: averaging.bma(100, beta=0.1),
            r"state was made by bma\(total_steps=100, beta=0.5, .*this averager is "
            r"bma\(total_steps=100, beta=0.1,",
        ),
        (
            lambda: averaging.ema(0.9),
            lambda: averaging.ema(0.99),
            r"ema.update_: state was made by ema\(decay=0.9, .*this averager is ema\(decay=0.99,",
        ),
        (
            lambda: averaging.ema(0.9),
            lambda: averaging.ema(0.9, accumulator_dtype=torch.float64),
            r"accumulator_dtype=torch.float32, .*accumulator_dtype=torch.float64",
        ),
        (
            lambda: averaging.uniform(),
            lambda: averaging.uniform(device="cpu"),
            r"uniform\(accumulator_dtype=torch.float32, device=None\), but this averager is "
            r"uniform\(accumulator_dtype=torch.float32, device='cpu'\)",
        ),
    ],
)
def test_an_averager_with_other_settings_refuses_the_state(
    made_by: Any, updated_by: Any, match: str
) -> None:
    p = tree()
    state = made_by().init(p)
    other = updated_by()
    with pytest.raises(ValueError, match=match):
        other.update_(state, p)
    with pytest.raises(ValueError, match=match.replace("update_", "update")):
        other.update(state, p)
    made_by().update_(state, p)  # the state itself is untouched and still usable


@pytest.mark.parametrize(("src", "dst"), [("ema", "bma"), ("bma", "uniform"), ("uniform", "ema")])
def test_a_state_of_another_kind_is_refused_naming_both(src: str, dst: str) -> None:
    p = tree()
    state = FACTORIES[src]().init(p)
    with pytest.raises(
        TypeError,
        match=rf"{dst}.update_: state must be the \w+State returned by {dst}'s init or a previous "
        rf"update, got \w+State made by {src}\(.*\); this averager is {dst}\(",
    ):
        FACTORIES[dst]().update_(state, p)


# ---------------------------------------------------------------- stale states


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("second", ["update", "update_"])
def test_the_state_update_consumed_is_stale(name: str, second: str) -> None:
    avg = FACTORIES[name]()
    p0, p1, p2 = tree(0), tree(1), tree(2)
    old = avg.init(p0)
    new = avg.update_(old, p1)
    assert not bool(old.live) and bool(new.live)
    before = {k: v.clone() for k, v in new.average.items()}
    with pytest.raises(ValueError, match=rf"{name}.{second}: state is stale: update_ advanced"):
        getattr(avg, second)(old, p2)
    assert_trees_equal(new.average, before)  # the refused call wrote nothing
    newer = getattr(avg, second)(new, p2)  # the fresh state works
    assert int(newer.step) == 2


@pytest.mark.parametrize("name", NAMES)
def test_the_pure_update_leaves_the_old_state_live(name: str) -> None:
    avg = FACTORIES[name]()
    old = avg.init(tree(0))
    a = avg.update(old, tree(1))
    b = avg.update(old, tree(2))  # branching from the same state is what update is for
    assert bool(old.live) and bool(a.live) and bool(b.live)
    assert_trees_equal(old.average, tree(0))
    c = avg.update_(old, tree(2))  # old still owns its (untouched) accumulators
    assert_trees_equal(c.average, b.average)


@pytest.mark.parametrize("name", NAMES)
def test_a_failed_update_does_not_consume_the_state(name: str) -> None:
    avg = FACTORIES[name]()
    state = avg.init(tree())
    with pytest.raises(ValueError, match="same keys"):
        avg.update_(state, {"t0": torch.zeros(4, 3)})
    assert bool(state.live)
    avg.update_(state, tree(1))


@pytest.mark.parametrize("name", NAMES)
def test_a_state_resumed_from_disk_works_and_a_saved_stale_state_stays_stale(name: str) -> None:
    avg = FACTORIES[name]()
    state = avg.update_(avg.init(tree(0)), tree(1))
    buf = io.BytesIO()
    torch.save({"live": state}, buf)
    buf.seek(0)
    loaded = torch.load(buf)["live"]
    resumed = avg.update_(loaded, tree(2))
    expected = avg.update_(state, tree(2))
    assert_trees_equal(resumed.average, expected.average)
    buf = io.BytesIO()
    torch.save(state, buf)  # `state` was consumed above: its buffers are ahead of its counters
    buf.seek(0)
    with pytest.raises(ValueError, match="state is stale"):
        avg.update_(torch.load(buf), tree(3))


@pytest.mark.parametrize("name", NAMES)
def test_a_deep_copy_is_an_independent_live_state(name: str) -> None:
    avg = FACTORIES[name]()
    state = avg.update_(avg.init(tree(0)), tree(1))
    twin = copy.deepcopy(state)
    a = avg.update_(state, tree(2))
    b = avg.update_(twin, tree(2))
    assert_trees_equal(a.average, b.average)


# ---------------------------------------------------------------- resuming in a fresh process


def test_a_saved_state_loads_with_weights_only_after_import_robustft(tmp_path: Path) -> None:
    p = tree()
    states = {}
    for name, make in FACTORIES.items():
        avg = make()
        states[name] = avg.update_(avg.init(p), tree(1))
    torch.save(states, tmp_path / "states.pt")
    code = textwrap.dedent(
        f"""
        import torch, robustft
        states = torch.load({str(tmp_path / "states.pt")!r})  # weights_only=True by default
        print(sorted((k, type(v).__name__, v.settings["kind"], int(v.step), bool(v.live))
                     for k, v in states.items()))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == (
        "[('bma', 'BmaState', 'bma', 1, True), ('ema', 'EmaState', 'ema', 1, True), "
        "('uniform', 'UniformState', 'uniform', 1, True)]"
    )


# ---------------------------------------------------------------- aliasing


def _alias_cases(state: Any) -> dict[str, dict[str, torch.Tensor]]:
    a = state.average
    square = ("t0", "t1", "t2")
    return {
        "the average itself": dict(a),
        "clones of the average": {k: v.clone() for k, v in a.items()},
        "swapped keys": {**a, "t0": a["t1"], "t1": a["t0"]},
        "one tensor for every key": {**{k: a["t0"] for k in square}, "big": a["big"]},
        "transposed views": {**{k: a[k].t() for k in square}, "big": a["big"]},
        "overlapping slices of one buffer": {
            **{k: a["big"][4 * i : 4 * i + 9].view(3, 3) for i, k in enumerate(square)},
            "big": a["big"],
        },
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "case",
    [
        "the average itself",
        "clones of the average",
        "swapped keys",
        "one tensor for every key",
        "transposed views",
        "overlapping slices of one buffer",
    ],
)
def test_update_and_update_agree_when_params_alias_the_state(name: str, case: str) -> None:
    avg = FACTORIES[name]()
    g = torch.Generator().manual_seed(5)
    base = {k: torch.randn(3, 3, generator=g) for k in ("t0", "t1", "t2")}
    base["big"] = torch.randn(20, generator=g)
    step = {k: torch.randn_like(v) for k, v in base.items()}
    pure_state = avg.update(avg.init(base), step)
    fast_state = avg.update(avg.init(base), step)
    for _ in range(3):  # the later calls take the cached (validated-once) path
        pure_state = avg.update(pure_state, _alias_cases(pure_state)[case])
        fast_state = avg.update_(fast_state, _alias_cases(fast_state)[case])
        assert_trees_equal(fast_state.average, pure_state.average)


@pytest.mark.parametrize("name", NAMES)
def test_the_same_aliasing_params_object_twice_takes_the_cached_path(name: str) -> None:
    avg = FACTORIES[name]()
    base = {"t0": torch.randn(3, 3), "t1": torch.randn(3, 3)}
    state = avg.update(avg.init(base), {k: v + 1 for k, v in base.items()})
    pure = copy.deepcopy(state)
    params = {"t0": state.average["t1"], "t1": state.average["t0"]}  # one dict, reused
    for _ in range(3):
        pure = avg.update(pure, {"t0": pure.average["t1"], "t1": pure.average["t0"]})
        state = avg.update_(state, params)
        assert_trees_equal(state.average, pure.average)


# ---------------------------------------------------------------- validation once per structure


@pytest.mark.parametrize("name", NAMES)
def test_the_cached_path_still_raises_for_a_changed_tree(name: str) -> None:
    avg = FACTORIES[name]()
    p = tree()
    state = avg.init(p)
    for _ in range(3):
        state = avg.update_(state, p)  # validated once, then cached
    with pytest.raises(ValueError, match=r"missing keys \['t2'\], unexpected keys \[\]"):
        avg.update_(state, {k: v for k, v in p.items() if k != "t2"})
    with pytest.raises(
        ValueError, match=r"same shape at every key, got mismatches at keys \['t1'\]"
    ):
        avg.update_(state, {**p, "t1": torch.zeros(3)})  # broadcastable: must not slip through
    with pytest.raises(TypeError, match=r"params must hold floating-point tensors only, got torch"):
        avg.update_(state, {**p, "t1": torch.zeros(4, 3, dtype=torch.int64)})
    with pytest.raises(TypeError, match=r"params must have torch.Tensor leaves"):
        avg.update_(state, {**p, "t1": [0.0]})
    with pytest.raises(TypeError, match=r"params must be a mapping"):
        avg.update_(state, list(p.values()))
    state = avg.update_(state, p)  # and the good tree still works


@pytest.mark.parametrize("name", NAMES)
def test_new_tensors_key_orders_and_dtypes_between_calls_give_the_pure_result(name: str) -> None:
    avg = FACTORIES[name]()
    traj = [tree(i) for i in range(6)]
    traj[2] = dict(reversed(list(traj[2].items())))  # another key order
    traj[3] = {k: v.double() for k, v in traj[3].items()}  # another dtype: converted
    traj[4] = {k: v.bfloat16() for k, v in traj[4].items()}
    pure = fast = avg.init(traj[0])
    same = traj[1]
    for p in [same, same, *traj[2:], same]:
        pure, fast = avg.update(pure, p), avg.update_(fast, p)
        assert_trees_equal(fast.average, pure.average)


def test_the_averager_keeps_neither_the_params_nor_a_dropped_state_alive() -> None:
    import weakref

    avg = averaging.ema(0.5)
    params = tree()
    state = avg.init(params)
    state = avg.update_(state, params)
    state = avg.update_(state, params)  # cached plan in use
    param_ref, buffer_ref = weakref.ref(params["t0"]), weakref.ref(state.average["t0"])
    del params
    gc.collect()
    assert param_ref() is None  # the plan holds only weak references to the caller's tensors
    del state
    gc.collect()
    assert buffer_ref() is None  # the plan is dropped with the state that owns the buffers
