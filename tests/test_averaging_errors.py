"""Every callable of robustft.averaging.__all__ against bad input: the house error, never torch's.

Each case names the public object it exercises; a test checks every callable in ``__all__`` has
cases, so a new public name cannot ship without its error paths.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from robustft import averaging

P = {"w": torch.zeros(2), "b": torch.zeros(3)}


def _state(make: Callable[[], averaging.Averager]) -> Any:
    return make().init(P)


def _stale(make: Callable[[], averaging.Averager]) -> Any:
    avg = make()
    state = avg.init(P)
    avg.update_(state, P)
    return state


def _past_end() -> Any:
    avg = averaging.bma(1)
    return avg.update_(avg.init(P), P)


def _malformed(make: Callable[[], averaging.Averager], **fields: Any) -> Any:
    return _state(make)._replace(**fields)


BMA, EMA, UNI = (lambda: averaging.bma(4)), (lambda: averaging.ema(0.5)), averaging.uniform

# (public name, description, call, exception type, message regex)
CASES: list[tuple[str, str, Callable[[], Any], type[Exception], str]] = [
    # ---- beta_weights
    (
        "beta_weights",
        "steps 0",
        lambda: averaging.beta_weights(0),
        ValueError,
        r"beta_weights: total_steps must be an int >= 1, got 0",
    ),
    (
        "beta_weights",
        "float steps",
        lambda: averaging.beta_weights(2.0),
        TypeError,
        r"beta_weights: total_steps must be an int, got 2.0",
    ),
    (
        "beta_weights",
        "bool steps",
        lambda: averaging.beta_weights(True),
        TypeError,
        r"beta_weights: total_steps must be an int, got True",
    ),
    (
        "beta_weights",
        "beta 0",
        lambda: averaging.beta_weights(3, beta=0.0),
        ValueError,
        r"beta_weights: beta must be in \(0.0, inf\), got 0.0",
    ),
    (
        "beta_weights",
        "beta < 0",
        lambda: averaging.beta_weights(3, beta=-1),
        ValueError,
        r"beta_weights: beta must be in \(0.0, inf\), got -1",
    ),
    (
        "beta_weights",
        "beta inf",
        lambda: averaging.beta_weights(3, beta=math.inf),
        ValueError,
        r"beta_weights: beta must be a finite number in \(0.0, inf\), got inf",
    ),
    (
        "beta_weights",
        "numpy inf",
        lambda: averaging.beta_weights(3, beta=np.inf),
        ValueError,
        r"beta_weights: beta must be a finite number",
    ),
    (
        "beta_weights",
        "beta nan",
        lambda: averaging.beta_weights(3, beta=math.nan),
        ValueError,
        r"beta_weights: beta must not be NaN",
    ),
    (
        "beta_weights",
        "beta str",
        lambda: averaging.beta_weights(3, beta="0.5"),
        TypeError,
        r"beta_weights: beta must be a real number, got '0.5'",
    ),
    (
        "beta_weights",
        "beta tensor",
        lambda: averaging.beta_weights(3, beta=torch.tensor(0.5)),
        TypeError,
        r"beta_weights: beta must be a real number, got Tensor",
    ),
    # ---- bma
    (
        "bma",
        "steps 0",
        lambda: averaging.bma(0),
        ValueError,
        r"bma: total_steps must be an int >= 1, got 0",
    ),
    (
        "bma",
        "numpy steps < 1",
        lambda: averaging.bma(np.int32(-3)),
        ValueError,
        r"bma: total_steps must be an int >= 1, got -3",
    ),
    (
        "bma",
        "float steps",
        lambda: averaging.bma(10.0),
        TypeError,
        r"bma: total_steps must be an int, got 10.0",
    ),
    (
        "bma",
        "str steps",
        lambda: averaging.bma("10"),
        TypeError,
        r"bma: total_steps must be an int, got '10'",
    ),
    (
        "bma",
        "beta 0",
        lambda: averaging.bma(10, beta=0.0),
        ValueError,
        r"bma: beta must be in \(0.0, inf\), got 0.0",
    ),
    (
        "bma",
        "beta < 0",
        lambda: averaging.bma(10, beta=-2),
        ValueError,
        r"bma: beta must be in \(0.0, inf\)",
    ),
    (
        "bma",
        "beta inf",
        lambda: averaging.bma(10, beta=math.inf),
        ValueError,
        r"bma: beta must be a finite number",
    ),
    (
        "bma",
        "beta numpy nan",
        lambda: averaging.bma(10, beta=np.float64("nan")),
        ValueError,
        r"bma: beta must not be NaN",
    ),
    (
        "bma",
        "int dtype",
        lambda: averaging.bma(3, accumulator_dtype=torch.int64),
        TypeError,
        r"bma: accumulator_dtype must be a floating-point torch.dtype \(e.g. torch.float32\), "
        r"got torch.int64",
    ),
    (
        "bma",
        "bad device name",
        lambda: averaging.bma(3, device="gpu7"),
        ValueError,
        r"bma: device must name a torch device .*got 'gpu7'",
    ),
    (
        "bma",
        "int device",
        lambda: averaging.bma(3, device=0),
        TypeError,
        r"bma: device must be None, a str or a torch.device, got 0",
    ),
    # ---- ema
    (
        "ema",
        "decay > 1",
        lambda: averaging.ema(1.5),
        ValueError,
        r"ema: decay must be in \[0.0, 1.0\], got 1.5",
    ),
    (
        "ema",
        "decay < 0",
        lambda: averaging.ema(-0.1),
        ValueError,
        r"ema: decay must be in \[0.0, 1.0\], got -0.1",
    ),
    (
        "ema",
        "numpy decay > 1",
        lambda: averaging.ema(np.float32(2.0)),
        ValueError,
        r"ema: decay must be in \[0.0, 1.0\], got .*2.0",
    ),
    (
        "ema",
        "decay nan",
        lambda: averaging.ema(math.nan),
        ValueError,
        r"ema: decay must not be NaN",
    ),
    (
        "ema",
        "decay inf",
        lambda: averaging.ema(-math.inf),
        ValueError,
        r"ema: decay must be a finite number in \[0.0, 1.0\], got -inf",
    ),
    (
        "ema",
        "decay str",
        lambda: averaging.ema("0.9"),
        TypeError,
        r"ema: decay must be a real number, got '0.9'",
    ),
    (
        "ema",
        "decay bool",
        lambda: averaging.ema(True),
        TypeError,
        r"ema: decay must be a real number, got True",
    ),
    (
        "ema",
        "str dtype",
        lambda: averaging.ema(0.9, accumulator_dtype="float32"),
        TypeError,
        r"ema: accumulator_dtype must be a floating-point torch.dtype .*got 'float32'",
    ),
    (
        "ema",
        "bad device",
        lambda: averaging.ema(0.9, device="nope"),
        ValueError,
        r"ema: device must name a torch device",
    ),
    # ---- uniform
    (
        "uniform",
        "int dtype",
        lambda: averaging.uniform(accumulator_dtype=torch.int64),
        TypeError,
        r"uniform: accumulator_dtype must be a floating-point torch.dtype",
    ),
    (
        "uniform",
        "bool dtype",
        lambda: averaging.uniform(accumulator_dtype=torch.bool),
        TypeError,
        r"uniform: accumulator_dtype must be a floating-point torch.dtype",
    ),
    (
        "uniform",
        "int device",
        lambda: averaging.uniform(device=0),
        TypeError,
        r"uniform: device must be None, a str or a torch.device",
    ),
    (
        "uniform",
        "bad device",
        lambda: averaging.uniform(device="cpu:x"),
        ValueError,
        r"uniform: device must name a torch device",
    ),
    # ---- Averager: init / update / update_
    (
        "Averager",
        "init list",
        lambda: BMA().init([torch.zeros(2)]),
        TypeError,
        r"bma.init: params must be a mapping from parameter names to tensors",
    ),
    (
        "Averager",
        "init int buffer",
        lambda: EMA().init({"w": torch.zeros(2), "n": torch.tensor(3)}),
        TypeError,
        r"ema.init: params must hold floating-point tensors only, got torch.int64 at keys \['n'\]; "
        r"integer and bool buffers",
    ),
    (
        "Averager",
        "init non-str key",
        lambda: UNI().init({0: torch.zeros(2)}),
        TypeError,
        r"uniform.init: params must have str keys",
    ),
    (
        "Averager",
        "init non-tensor",
        lambda: UNI().init({"w": [0.0]}),
        TypeError,
        r"uniform.init: params must have torch.Tensor leaves",
    ),
    (
        "Averager",
        "update missing key",
        lambda: BMA().update(_state(BMA), {"w": P["w"]}),
        ValueError,
        r"bma.update: params must have the same keys as state.average; missing keys "
        r"\['b'\], unexpected keys \[\]",
    ),
    (
        "Averager",
        "update_ shape",
        lambda: EMA().update_(_state(EMA), {**P, "b": torch.zeros(1)}),
        ValueError,
        r"ema.update_: state.average and params must have the same shape at every key",
    ),
    (
        "Averager",
        "update_ bool leaf",
        lambda: UNI().update_(_state(UNI), {**P, "b": torch.zeros(3, dtype=torch.bool)}),
        TypeError,
        r"uniform.update_: params must hold floating-point tensors only, got torch.bool",
    ),
    (
        "Averager",
        "update_ not a tree",
        lambda: UNI().update_(_state(UNI), 3.0),
        TypeError,
        r"uniform.update_: params must be a mapping",
    ),
    (
        "Averager",
        "not a state",
        lambda: BMA().update_({"average": P}, P),
        TypeError,
        r"bma.update_: state must be the BmaState returned by bma's init or a previous update, "
        r"got dict; this averager is bma\(total_steps=4",
    ),
    (
        "Averager",
        "other kind",
        lambda: BMA().update(_state(EMA), P),
        TypeError,
        r"bma.update: state must be the BmaState .*got EmaState made by ema\(decay=0.5",
    ),
    (
        "Averager",
        "other settings",
        lambda: averaging.bma(5).update_(_state(BMA), P),
        ValueError,
        r"bma.update_: state was made by bma\(total_steps=4, .*this averager is "
        r"bma\(total_steps=5,",
    ),
    (
        "Averager",
        "stale bma",
        lambda: BMA().update_(_stale(BMA), P),
        ValueError,
        r"bma.update_: state is stale",
    ),
    (
        "Averager",
        "stale ema pure",
        lambda: EMA().update(_stale(EMA), P),
        ValueError,
        r"ema.update: state is stale",
    ),
    (
        "Averager",
        "stale uniform",
        lambda: UNI().update_(_stale(UNI), P),
        ValueError,
        r"uniform.update_: state is stale",
    ),
    (
        "Averager",
        "past total_steps",
        lambda: averaging.bma(1).update_(_past_end(), P),
        ValueError,
        r"bma.update_: cannot fold in a step past total_steps=1, got state.step=1",
    ),
    # ---- the state classes: what a malformed state of each kind gets
    (
        "BmaState",
        "int step",
        lambda: BMA().update_(_malformed(BMA, step=0), P),
        TypeError,
        r"bma.update_: state must be the BmaState returned by init or a previous update, got "
        r"malformed fields \['step'\] \(step=0\)",
    ),
    (
        "BmaState",
        "float32 log sum",
        lambda: BMA().update(_malformed(BMA, log_weight_sum=torch.tensor(0.0)), P),
        TypeError,
        r"bma.update: .*malformed fields \['log_weight_sum'\]",
    ),
    (
        "BmaState",
        "average list",
        lambda: BMA().update_(_malformed(BMA, average=list(P.values())), P),
        TypeError,
        r"malformed fields \['average'\]",
    ),
    (
        "BmaState",
        "settings edited",
        lambda: BMA().update_(_malformed(BMA, settings={"kind": "bma"}), P),
        ValueError,
        r"bma.update_: state was made by bma\(\), but this averager is bma\(total_steps=4",
    ),
    (
        "EmaState",
        "bool live",
        lambda: EMA().update_(_malformed(EMA, live=True), P),
        TypeError,
        r"ema.update_: .*malformed fields \['live'\] \(live=True\)",
    ),
    (
        "EmaState",
        "settings junk",
        lambda: EMA().update(_malformed(EMA, settings=None), P),
        ValueError,
        r"ema.update: state was made by unknown settings None",
    ),
    (
        "UniformState",
        "vector step",
        lambda: UNI().update_(_malformed(UNI, step=torch.zeros(2, dtype=torch.int64)), P),
        TypeError,
        r"uniform.update_: .*malformed fields \['step'\]",
    ),
    (
        "UniformState",
        "float step",
        lambda: UNI().update(_malformed(UNI, step=torch.tensor(0.0)), P),
        TypeError,
        r"uniform.update: .*malformed fields \['step'\]",
    ),
]


@pytest.mark.parametrize(
    ("name", "what", "call", "err", "match"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_bad_input_raises_the_house_error(
    name: str, what: str, call: Callable[[], Any], err: type[Exception], match: str
) -> None:
    with pytest.raises(err, match=match) as info:
        call()
    assert type(info.value) is err  # exactly ValueError/TypeError, never a torch error subclass


def test_every_public_callable_has_error_cases() -> None:
    public = {n for n in averaging.__all__ if callable(getattr(averaging, n))}
    assert public == {n for n, *_ in CASES}
    # the one non-callable name is the union of the state types
    assert set(averaging.__all__) - public == {"AverageState"}


def test_numpy_numbers_are_accepted_where_python_numbers_are() -> None:
    a = averaging.beta_weights(np.int64(4), beta=np.float32(0.5))
    assert torch.equal(a, averaging.beta_weights(4, beta=0.5))
    for avg in (averaging.bma(np.int16(4), beta=np.float64(2.0)), averaging.ema(np.float16(0.5))):
        state = avg.update_(avg.init(P), P)
        assert int(state.step) == 1
