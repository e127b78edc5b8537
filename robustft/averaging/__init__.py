"""Weight averages along a fine-tuning run and across fine-tuned models.

Running averages of the trajectory -- CLIPood's Beta moving average (:func:`bma`), the EMA
(:func:`ema`) and the uniform mean (:func:`uniform`, SWA) -- are ``(init, update, update_)``
factories in optax's style: the state is a NamedTuple of Python counters and one accumulator tree,
``update`` is pure and ``update_`` folds the new parameters into the state's own buffers in place
(one ``torch._foreach_lerp_`` per device/dtype group, no parameter-sized temporary). All three
share one stateless kernel, a lerp with a time-varying weight. Model soups (:func:`uniform_soup`,
:func:`greedy_soup`) average fine-tuned candidates, streaming them.

Parameters are trees, ``dict(model.named_parameters())``; averages work on sharded (FSDP2
``DTensor``) trees as on plain ones, without copying the module.
"""

from robustft.averaging._averagers import (
    Averager,
    AverageState,
    BmaState,
    EmaState,
    UniformState,
    bma,
    ema,
    uniform,
)
from robustft.averaging._soups import greedy_soup, uniform_soup
from robustft.averaging._weights import beta_weights

__all__ = [
    "AverageState",
    "Averager",
    "BmaState",
    "EmaState",
    "UniformState",
    "beta_weights",
    "bma",
    "ema",
    "greedy_soup",
    "uniform",
    "uniform_soup",
]
