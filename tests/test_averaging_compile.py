"""robustft.averaging under torch.compile(fullgraph=True): one compilation for a whole run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from robustft import averaging

FACTORIES: dict[str, Callable[[], averaging.Averager]] = {
    "bma": lambda: averaging.bma(25, beta=0.5),
    "ema": lambda: averaging.ema(0.8),
    "uniform": averaging.uniform,
}
STEPS = 20


def trajectory(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "w": torch.randn(4, 3, generator=g),
            "b": torch.randn(3, generator=g, dtype=torch.float64),
            "h": torch.randn(5, generator=g).bfloat16(),  # converted into a float32 accumulator
        }
        for _ in range(n)
    ]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("method", ["update_", "update"])
def test_twenty_compiled_steps_compile_once_and_equal_eager(name: str, method: str) -> None:
    avg = FACTORIES[name]()
    counter = CompileCounter()
    compiled = torch.compile(getattr(avg, method), fullgraph=True, backend=counter)
    traj = trajectory(STEPS + 1)
    eager_state = compiled_state = avg.init(traj[0])
    compiled_state = avg.init(traj[0])
    for p in traj[1:]:
        previous = compiled_state
        compiled_state = compiled(compiled_state, p)
        eager_state = getattr(avg, method)(eager_state, p)
        if method == "update_":
            assert compiled_state.average is previous.average  # in place, same buffers
            assert not bool(previous.live) and bool(compiled_state.live)
    assert counter.frame_count == 1  # no recompilation across the 20 steps
    assert int(compiled_state.step) == int(eager_state.step) == STEPS
    for k, v in eager_state.average.items():
        assert compiled_state.average[k].dtype == v.dtype
        assert torch.equal(compiled_state.average[k], v), k
    if name == "bma":
        assert torch.equal(compiled_state.log_weight_sum, eager_state.log_weight_sum)


@pytest.mark.parametrize("name", ["bma", "uniform"])
def test_update_compiles_once_through_aot_autograd(name: str) -> None:
    avg = FACTORIES[name]()
    counters.clear()
    compiled = torch.compile(avg.update_, fullgraph=True, backend="aot_eager")
    traj = trajectory(STEPS + 1)
    state, eager = avg.init(traj[0]), avg.init(traj[0])
    for p in traj[1:]:
        state, eager = compiled(state, p), avg.update_(eager, p)
    # one graph, one successful AOT compilation (dynamo may restart its first analysis once to
    # turn Python scalars into tensors; that is not a recompilation)
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["aot_autograd"]["ok"] == 1
    assert not counters["recompiles"]
    for k, v in eager.average.items():
        torch.testing.assert_close(state.average[k], v, rtol=1e-6, atol=1e-6)


def test_a_compiled_run_continues_eagerly_and_keeps_the_rules() -> None:
    avg = averaging.bma(4)
    compiled = torch.compile(avg.update_, fullgraph=True, backend="eager")
    traj = trajectory(6)
    state = avg.init(traj[0])
    stale = state
    for p in traj[1:5]:
        state = compiled(state, p)
    with pytest.raises(ValueError, match="state is stale"):
        avg.update_(stale, traj[1])  # eager code still refuses what compiled code consumed
    with pytest.raises(ValueError, match="cannot fold in a step past total_steps=4"):
        avg.update_(state, traj[5])
    # compiled code cannot raise on a counter's value: past total_steps it folds in nothing
    before = {k: v.clone() for k, v in state.average.items()}
    after = compiled(state, traj[5])
    for k, v in before.items():
        assert torch.equal(after.average[k], v), k
    assert torch.equal(after.log_weight_sum, state.log_weight_sum)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_updates_still_validate_the_tree_and_the_settings(fullgraph: bool) -> None:
    avg = averaging.ema(0.5)
    state = avg.init({"w": torch.zeros(2)})
    # without fullgraph dynamo falls back to eager and our ValueError surfaces as is; with
    # fullgraph=True dynamo refuses to trace a raise and reports it with our message inside
    err: type[Exception] = Exception if fullgraph else ValueError
    compiled = torch.compile(avg.update_, fullgraph=fullgraph, backend="eager")
    with pytest.raises(err, match=r"ema.update_: params must have the same keys"):
        compiled(state, {"v": torch.zeros(2)})
    other = torch.compile(averaging.ema(0.6).update_, fullgraph=fullgraph, backend="eager")
    with pytest.raises(err, match=r"state was made by ema\(decay=0.5"):
        other(state, {"w": torch.zeros(2)})
    assert bool(state.live)
