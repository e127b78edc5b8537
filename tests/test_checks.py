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


def test_apply_reduction_empty_batch_rule() -> None:
    empty = torch.zeros(0, requires_grad=True)
    for reduction in ("mean", "sum"):
        out = c.apply_reduction("f", empty * 2.0, reduction)
        assert out.shape == () and out.item() == 0.0
        (grad,) = torch.autograd.grad(out, empty)
        assert grad.shape == (0,)
    assert c.apply_reduction("f", empty, "none").shape == (0,)


def test_numpy_scalars_and_infinities() -> None:
    np = pytest.importorskip("numpy")
    assert c.check_number("f", "x", np.float32(0.5), low=0, high=1) == 0.5
    assert c.check_number("f", "x", np.int64(3)) == 3.0
    assert c.check_int("f", "n", np.int32(4), low=1) == 4
    assert isinstance(c.check_int("f", "n", np.int64(4)), int)
    with pytest.raises(TypeError, match=r"f: x must be a real number, got (np\.)?True"):
        c.check_number("f", "x", np.bool_(True))
    with pytest.raises(TypeError, match=r"f: n must be an int"):
        c.check_int("f", "n", np.float64(2.0))
    with pytest.raises(
        ValueError, match=r"f: scale must be a finite number in \(0, inf\), got inf"
    ):
        c.check_number("f", "scale", float("inf"), low=0, low_inclusive=False)
    assert c.check_number("f", "threshold", float("-inf"), finite=False) == float("-inf")
    assert c.check_scalar("f", "t", np.float64(2.0), positive=True) == 2.0
    t = torch.tensor(2.0)
    assert c.check_scalar("f", "t", t, positive=True) is t
    with pytest.raises(ValueError, match=r"f: t must be in \(0, inf\), got 0"):
        c.check_scalar("f", "t", 0, positive=True)
    with pytest.raises(ValueError, match=r"f: t must be a finite number"):
        c.check_scalar("f", "t", float("inf"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
def test_every_integer_label_dtype_is_accepted_as_int64(dtype: torch.dtype) -> None:
    labels = torch.tensor([0, 2, 1], dtype=dtype)
    out = c.check_labels("f", "labels", labels, batch=3)
    assert out.dtype == torch.int64 and out.tolist() == [0, 2, 1]
    assert (out is labels) == (dtype == torch.int64)


def test_floating_tree_device_dtype_group_and_keys() -> None:
    t = {"w": torch.zeros(2)}
    assert c.check_floating_tree("f", "params", t) is t
    with pytest.raises(TypeError, match=r"f: params must be a mapping .* got list"):
        c.check_floating_tree("f", "params", [torch.zeros(1)])
    with pytest.raises(TypeError, match=r"f: params must have str keys"):
        c.check_floating_tree("f", "params", {1: torch.zeros(1)})
    with pytest.raises(TypeError, match=r"f: params must have torch.Tensor leaves, .*\['w'\]"):
        c.check_floating_tree("f", "params", {"w": 1.0})
    with pytest.raises(
        TypeError,
        match=r"f: params must hold floating-point tensors only, got torch.int64 .*; hint",
    ):
        c.check_floating_tree("f", "params", {"n": torch.zeros(1, dtype=torch.long)}, hint="hint")
    assert c.check_device("f", "device", None) is None
    assert c.check_device("f", "device", "cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"f: device must name a torch device .* got 'gpu:x'"):
        c.check_device("f", "device", "gpu:x")
    with pytest.raises(TypeError, match=r"f: device must be None, a str or a torch.device, got 0"):
        c.check_device("f", "device", 0)
    assert c.check_dtype("f", "dtype", torch.float64) is torch.float64
    with pytest.raises(TypeError, match=r"f: dtype must be a floating-point torch.dtype"):
        c.check_dtype("f", "dtype", torch.int32)
    assert c.check_dtype("f", "dtype", torch.int32, floating=False) is torch.int32
    assert c.check_group("f", None) is None
    with pytest.raises(
        TypeError, match=r"f: group must be a torch.distributed ProcessGroup or None"
    ):
        c.check_group("f", 0)
    assert c.fmt_keys(["b", "a"]) == "['a', 'b']"
    assert c.fmt_keys([str(i) for i in range(12)], limit=2) == "['0', '1', ... (10 more)]"
