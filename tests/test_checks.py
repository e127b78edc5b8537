"""The house-form validators: messages name function, argument, value and what is allowed."""

from __future__ import annotations

import pytest
import torch

from robustft import _checks as c


def test_check_number() -> None:
    assert c.check_number("f", "x", 2, low=0) == 2.0
    assert c.check_number("f", "x", 0.5, low=0, high=1) == 0.5
    with pytest.raises(ValueError, match=r"f: decay must be in \[0, 1\], got 1.5"):
        c.check_number("f", "decay", 1.5, low=0, high=1)
    with pytest.raises(ValueError, match=r"f: t must be in \(0, inf\), got 0"):
        c.check_number("f", "t", 0, low=0, low_inclusive=False)
    with pytest.raises(ValueError, match=r"f: tpr must be in \(0, 1\], got 0.0"):
        c.check_number("f", "tpr", 0.0, low=0, high=1, low_inclusive=False)
    with pytest.raises(ValueError, match=r"f: x must not be NaN"):
        c.check_number("f", "x", float("nan"))
    with pytest.raises(TypeError, match=r"f: x must be a real number, got True"):
        c.check_number("f", "x", True)
    with pytest.raises(TypeError, match=r"f: x must be a real number, got Tensor"):
        c.check_number("f", "x", torch.tensor(1.0))
    t = torch.tensor(0.3)
    assert c.check_number("f", "x", t, allow_tensor=True) is t
    with pytest.raises(TypeError, match=r"f: x must be a real number or a 0-d floating tensor"):
        c.check_number("f", "x", torch.ones(2), allow_tensor=True)


def test_check_int_choice_reduction() -> None:
    assert c.check_int("f", "n", 3, low=1) == 3
    with pytest.raises(ValueError, match=r"f: n must be an int >= 1, got 0"):
        c.check_int("f", "n", 0, low=1)
    with pytest.raises(TypeError, match=r"f: n must be an int, got 2.0"):
        c.check_int("f", "n", 2.0)
    with pytest.raises(ValueError, match=r"f: norm must be one of 'l2', 'mars', got 'l1'"):
        c.check_choice("f", "norm", "l1", ("l2", "mars"))
    assert c.check_reduction("f", "none") == "none"
    with pytest.raises(
        ValueError, match=r"f: reduction must be one of 'mean', 'sum', 'none', got 'avg'"
    ):
        c.check_reduction("f", "avg")
    with pytest.raises(TypeError, match=r"f: reduction must be one of"):
        c.check_reduction("f", None)


def test_tensor_checks() -> None:
    x = torch.zeros(2, 3)
    assert c.check_floating("f", "x", x, ndim=2) is x
    with pytest.raises(TypeError, match=r"f: x must be a torch.Tensor, got list of length 2"):
        c.check_tensor("f", "x", [1, 2])
    with pytest.raises(
        TypeError, match=r"f: x must be a floating-point tensor, got dtype torch.int64"
    ):
        c.check_floating("f", "x", torch.zeros(2, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"f: x must have 1 or 3 dimension\(s\), got shape \(2, 3\)"
    ):
        c.check_ndim("f", "x", x, (1, 3))
    with pytest.raises(
        ValueError,
        match=r"f: a.shape\[0\] must equal b.shape\[0\], got a of shape \(2, 3\) and b of shape \(4,\)",
    ):
        c.check_same_size("f", "a", x, 0, "b", torch.zeros(4), 0)
    labels = torch.tensor([0, 1])
    assert c.check_labels("f", "labels", labels, batch=2) is labels
    with pytest.raises(
        TypeError, match=r"f: labels must be an integer tensor, got dtype torch.float32"
    ):
        c.check_labels("f", "labels", labels.float())
    with pytest.raises(
        TypeError, match=r"f: labels must be an integer tensor, got dtype torch.bool"
    ):
        c.check_labels("f", "labels", labels.bool())
    with pytest.raises(ValueError, match=r"f: labels must have length 3 \(the batch size\)"):
        c.check_labels("f", "labels", labels, batch=3)


def test_per_tensor_and_describe() -> None:
    c.check_per_tensor("f", "radius", 1.0, ["a"])
    c.check_per_tensor("f", "radius", {"a": 1.0}, ["a"])
    with pytest.raises(
        ValueError,
        match=r"f: radius given per tensor .* missing keys \['a'\], unexpected keys \['b'\]",
    ):
        c.check_per_tensor("f", "radius", {"b": 1.0}, ["a"])
    assert c.describe(torch.zeros(2, dtype=torch.float64)).startswith(
        "Tensor(shape=(2,), dtype=torch.float64"
    )
    assert c.describe("x") == "'x'"
    assert c.describe([1, 2, 3] * 100) == "list of length 300"
    assert c.describe({"b": 1, "a": 2}) == "dict with keys ['a', 'b']"
    assert c.describe(object.__new__(type("Big", (), {"__repr__": lambda s: "x" * 200}))).endswith(
        "..."
    )


def test_apply_reduction() -> None:
    per = torch.tensor([1.0, 2.0, 3.0])
    assert c.apply_reduction("f", per, "mean").item() == 2.0
    assert c.apply_reduction("f", per, "sum").item() == 6.0
    assert c.apply_reduction("f", per, "none") is per
    with pytest.raises(ValueError, match=r"f: reduction must be one of"):
        c.apply_reduction("f", per, "max")


def test_is_functorch_wrapped() -> None:
    x = torch.randn(3, 2)
    assert not c.is_functorch_wrapped(x)
    seen: list[bool] = []

    def probe(row: torch.Tensor) -> torch.Tensor:
        seen.append(c.is_functorch_wrapped(row))
        return row.sum()

    torch.func.vmap(probe)(x)
    torch.func.grad(probe)(x[0])
    assert seen == [True, True]
