"""robustft.projections.tpgm: learned per-tensor radii on a tiny model through functional_call."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from robustft.projections import l2_ball, mars_ball, tpgm


def tiny_problem(seed: int = 0) -> tuple[nn.Module, dict[str, Any], dict[str, Any], Any]:
    """A pre-trained MLP (the anchor) and a fine-tune that overshoots the target 4x, plus noise.

    The validation labels come from the target (anchor + direction), so the best projection lies
    strictly between the anchor and the fine-tuned weights.
    """
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    direction = {k: 0.5 * torch.randn_like(v) for k, v in anchor.items()}
    params = {k: v + 4 * direction[k] + 0.3 * torch.randn_like(v) for k, v in anchor.items()}
    x = torch.randn(256, 6)
    with torch.no_grad():
        target = {k: v + direction[k] for k, v in anchor.items()}
        y = functional_call(model, target, (x,)).argmax(1)

    def loss_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    return model, anchor, params, loss_fn


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny ops: one intra-op thread (two threads on a shared 2-core machine wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def row_norms(x: torch.Tensor) -> torch.Tensor:
    return (x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)).abs().sum(1)


@pytest.mark.parametrize("norm", ["l2", "mars"])
def test_tpgm_reduces_validation_loss_and_never_grows_a_deviation(norm: str) -> None:
    model, anchor, params, loss_fn = tiny_problem()
    _, start_radii = tpgm(params, loss_fn, anchor=anchor, norm=norm, steps=0)
    project = l2_ball if norm == "l2" else mars_ball
    start = float(loss_fn(project(params, anchor=anchor, radius=start_radii)))
    projected, radii = tpgm(params, loss_fn, anchor=anchor, norm=norm, steps=100, lr=0.05)
    final = float(loss_fn(projected))
    assert final < 0.9 * start, (final, start)
    assert final < float(loss_fn(params))
    for k in params:
        before, after = params[k] - anchor[k], projected[k] - anchor[k]
        if norm == "l2":
            assert float(after.norm()) <= float(before.norm()) * (1 + 1e-6)
        else:
            assert (row_norms(after) <= row_norms(before) * (1 + 1e-6) + 1e-7).all()
        upper = float(before.norm()) if norm == "l2" else float(row_norms(before).max())
        assert float(torch.tensor(1e-8)) <= float(radii[k]) <= upper * (1 + 1e-6)
    # the result is the documented projection with the returned radii
    again = project(params, anchor=anchor, radius=radii)
    assert all(torch.equal(again[k], projected[k]) for k in params)
    assert all(p.grad is None for p in model.parameters())  # only the radii were trained


def test_tpgm_initial_radii_halve_the_smallest_norm() -> None:
    anchor = {"w": torch.zeros(2, 2), "b": torch.zeros(3)}
    params = {"w": torch.tensor([[3.0, 4.0], [0.0, 1.0]]), "b": torch.tensor([2.0, 0.0, 0.0])}

    def never(p: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - steps=0
        raise AssertionError("loss_fn must not be called with steps=0")

    out, radii = tpgm(params, never, anchor=anchor, steps=0)
    torch.testing.assert_close(radii["w"], torch.tensor(math.sqrt(26.0) / 2))
    torch.testing.assert_close(out["w"], params["w"] / 2)
    _, radii = tpgm(params, never, anchor=anchor, norm="mars", steps=0)
    torch.testing.assert_close(radii["w"], torch.tensor(0.5))  # min(7, 1) / 2
    torch.testing.assert_close(radii["b"], torch.tensor(1.0))


def test_tpgm_finds_the_hand_computed_optimum() -> None:
    # the loss is minimal at anchor + 0.2 * delta, i.e. radius 0.2 * |delta| = 1
    anchor = {"w": torch.zeros(2, dtype=torch.float64)}
    params = {"w": torch.tensor([3.0, 4.0], dtype=torch.float64)}
    target = torch.tensor([0.6, 0.8], dtype=torch.float64)
    _, radii = tpgm(
        params, lambda p: ((p["w"] - target) ** 2).sum(), anchor=anchor, steps=300, lr=0.05
    )
    assert float(radii["w"]) == pytest.approx(1.0, abs=1e-3)
    assert radii["w"].dtype == torch.float64


def test_tpgm_regularization_pulls_toward_the_anchor() -> None:
    _, anchor, params, loss_fn = tiny_problem(1)
    plain, _ = tpgm(params, loss_fn, anchor=anchor, steps=60, lr=0.05)
    pulled, _ = tpgm(params, loss_fn, anchor=anchor, steps=60, lr=0.05, regularization=5.0)

    def distance(t: dict[str, torch.Tensor]) -> float:
        return math.sqrt(sum(float(((t[k] - anchor[k]) ** 2).sum()) for k in t))

    assert distance(pulled) < 0.8 * distance(plain)


def test_tpgm_keeps_unchanged_tensors_and_inputs_intact() -> None:
    _, anchor, params, loss_fn = tiny_problem()
    params["0.bias"] = anchor["0.bias"].clone()  # a frozen tensor: delta = 0
    saved = {k: v.clone() for k, v in params.items()}, {k: v.clone() for k, v in anchor.items()}
    projected, radii = tpgm(params, loss_fn, anchor=anchor, steps=20)
    assert torch.equal(projected["0.bias"], anchor["0.bias"])
    assert all(torch.isfinite(r) for r in radii.values())
    assert all(torch.equal(params[k], saved[0][k]) for k in params)
    assert all(torch.equal(anchor[k], saved[1][k]) for k in anchor)


class Flaky:
    """A validation loss that returns NaN (or inf) on the given calls, like a corrupt batch."""

    def __init__(self, loss_fn: Any, bad: set[int], value: float = math.nan) -> None:
        self.loss_fn, self.bad, self.value, self.calls = loss_fn, bad, value, 0

    def __call__(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.loss_fn(p)
        self.calls += 1
        return loss * self.value if self.calls - 1 in self.bad else loss


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_tpgm_skips_and_reports_non_finite_losses(value: float) -> None:
    _, anchor, params, loss_fn = tiny_problem()
    clean, clean_radii = tpgm(params, loss_fn, anchor=anchor, steps=20, lr=0.05)
    flaky = Flaky(loss_fn, {0, 7}, value)  # the first step too
    with pytest.warns(RuntimeWarning, match=r"tpgm: skipped 2 of 22 steps .* \(first at step 0\)"):
        projected, radii = tpgm(params, flaky, anchor=anchor, steps=22, lr=0.05)
    assert flaky.calls == 22
    # a skipped step changes nothing (radii and Adam's moments): the run equals the clean one
    for k in params:
        assert torch.isfinite(radii[k]) and torch.isfinite(projected[k]).all()
        torch.testing.assert_close(radii[k], clean_radii[k], rtol=0, atol=0)
        torch.testing.assert_close(projected[k], clean[k], rtol=0, atol=0)


def test_tpgm_skips_non_finite_radius_gradients() -> None:
    _, anchor, params, loss_fn = tiny_problem()
    calls = [0]

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:  # finite value, NaN gradient once
        calls[0] += 1
        value = loss_fn(p)
        if calls[0] == 3:
            # sqrt at 0: a finite value (0) whose backward is 0 * inf = NaN
            dev = p["0.bias"] - p["0.bias"].detach()
            nan_grad = 0.0 * torch.sqrt((dev**2).sum())
            assert torch.isfinite(value + nan_grad)
            return value + nan_grad
        return value

    with pytest.warns(RuntimeWarning, match=r"skipped 1 of 10 steps"):
        _, radii = tpgm(params, loss, anchor=anchor, steps=10)
    assert all(torch.isfinite(r) for r in radii.values())


def test_tpgm_raises_when_every_step_is_non_finite() -> None:
    _, anchor, params, loss_fn = tiny_problem()
    with pytest.raises(ValueError, match=r"tpgm: loss_fn must return a finite loss .* all 4 steps"):
        tpgm(params, Flaky(loss_fn, set(range(4))), anchor=anchor, steps=4)
