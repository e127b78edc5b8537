"""robustft.projections.ftp: fast trainable projection as a post-step operation."""

from __future__ import annotations

import io
import math

import pytest
import torch
from _memory import peak_alloc_bytes
from hypothesis import given, settings
from hypothesis import strategies as st
from reference.projections_ref import BaseStepRef, FtpRef
from strategies import tree_pairs
from torch import nn

from robustft.projections import FtpState, ftp


def _rows_l1(x: torch.Tensor) -> torch.Tensor:
    r = x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)
    return r.double().abs().sum(1)


# ---------------------------------------------------------------- hand values


def test_hand_values_of_two_updates() -> None:
    anchor = {"w": torch.zeros(2, dtype=torch.float64)}
    params = {"w": torch.tensor([3.0, 1.0], dtype=torch.float64)}  # after step 1: c = (3, 1)
    f = ftp()
    state = f.init(params, anchor=anchor)
    state = f.update_(state, params, grads={"w": torch.tensor([5.0, -7.0], dtype=torch.float64)})
    n1 = 4 + 1e-8
    assert float(state.radius["w"]) == 1e-8  # no gradient for the radius yet: gamma_0 stays
    torch.testing.assert_close(
        params["w"], torch.tensor([3.0, 1.0], dtype=torch.float64) * 1e-8 / n1
    )
    torch.testing.assert_close(
        state.direction["w"], torch.tensor([3.0, 1.0], dtype=torch.float64) / n1
    )
    # step 2: the step moved params to (1, 1); the gradient at the projected point is (-1, -1)
    params["w"] = torch.tensor([1.0, 1.0], dtype=torch.float64)
    state = f.update_(state, params, grads={"w": torch.tensor([-1.0, -1.0], dtype=torch.float64)})
    h = -(3 + 1) / n1  # <g, c_1 / n_1>: growing the radius lowers the loss
    m, v = 0.1 * h, 0.001 * h * h
    gamma = 1e-8 - 1e-2 * (m / (1 - 0.9**2)) / (math.sqrt(v / (1 - 0.999**2)) + 1e-8)
    assert float(state.radius["w"]) == pytest.approx(gamma, rel=1e-12)
    assert float(state.exp_avg["w"]) == pytest.approx(m) and float(
        state.exp_avg_sq["w"]
    ) == pytest.approx(v)
    torch.testing.assert_close(
        params["w"], torch.tensor([1.0, 1.0], dtype=torch.float64) * gamma / (2 + 1e-8)
    )
    assert int(state.step) == 2


def test_annealing_zero_freezes_the_radius_on_positive_gradients() -> None:
    anchor = {"w": torch.zeros(1, 3, dtype=torch.float64)}
    params = {"w": torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)}
    f = ftp(annealing=0.0)
    state = f.update_(f.init(params, anchor=anchor), params, grads={"w": torch.ones(1, 3).double()})
    params["w"] = torch.tensor([[2.0, 2.0, 2.0]], dtype=torch.float64)
    state = f.update_(state, params, grads={"w": torch.ones(1, 3).double()})  # h > 0, annealed to 0
    assert float(state.radius["w"]) == 1e-8 and float(state.exp_avg["w"]) == 0.0


def test_radius_clipped_to_the_largest_row_norm_and_rows_inside_untouched() -> None:
    anchor = {"w": torch.zeros(2, 2, dtype=torch.float64)}
    params = {"w": torch.tensor([[1.0, 1.0], [0.1, 0.0]], dtype=torch.float64)}
    f = ftp(lr=10.0)  # one huge radius step
    state = f.update_(
        f.init(params, anchor=anchor), params, grads={"w": torch.zeros(2, 2).double()}
    )
    params["w"] = torch.tensor([[1.0, 1.0], [0.1, 0.0]], dtype=torch.float64)
    state = f.update_(state, params, grads={"w": -torch.ones(2, 2).double()})
    assert float(state.radius["w"]) == pytest.approx(2 + 1e-8)  # clipped to max_i n_i
    assert torch.equal(params["w"], torch.tensor([[1.0, 1.0], [0.1, 0.0]], dtype=torch.float64))


# ---------------------------------------------------------------- reference equivalence


def _tiny_problem() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(8, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=g),
        )
        for _ in range(6)
    ]
    return model, batches


def _grads(
    model: nn.Module, tree: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    leaves = {k: v.detach().clone().requires_grad_() for k, v in tree.items()}
    loss = nn.functional.cross_entropy(torch.func.functional_call(model, leaves, (x,)), y)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_matches_the_official_fused_optimisers(opt: str) -> None:
    model, batches = _tiny_problem()
    params = dict(model.named_parameters())
    anchor = {k: v.detach().clone() for k, v in params.items()}
    ref = {k: v.detach().clone() for k, v in params.items()}
    if opt == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        base = BaseStepRef("sgd", 0.5, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        base = BaseStepRef("adam", 0.05, weight_decay=0.1)
    f = ftp(annealing=0.5, lr=0.05)
    official = FtpRef(k=0.5, lr=0.05)
    state = f.init(params, anchor=anchor)
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        state = f.update_(state, params, grads={k: p.grad for k, p in params.items()})
        ref = official.run(ref, _grads(model, ref, x, y), anchor, base)
        for k in params:
            torch.testing.assert_close(params[k].detach(), ref[k], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(
                state.radius[k], official.gamma[k].double(), rtol=1e-10, atol=1e-14
            )
    # not vacuous: the radii were learned (moved away from 1e-8), rows were projected
    assert sum(float(r) > 1e-3 for r in state.radius.values()) >= 3, state.radius
    assert any(
        float(state.radius[k]) < float(_rows_l1(params[k].detach() - anchor[k]).max()) + 1e-8
        for k in params
    )


# ---------------------------------------------------------------- properties


@settings(max_examples=20, deadline=None)
@given(pairs=tree_pairs(n=5), lr=st.floats(1e-3, 1.0))
def test_pure_and_in_place_agree_and_rows_stay_in_the_ball(
    pairs: list[dict[str, torch.Tensor]], lr: float
) -> None:
    anchor, p1, g1, p2, g2 = pairs
    f = ftp(lr=lr)
    in_place = {k: v.clone() for k, v in p1.items()}
    s_in = f.init(in_place, anchor=anchor)
    s_pure = s_in
    pure = {k: v.clone() for k, v in p1.items()}
    for stepped, grads in ((p1, g1), (p2, g2)):
        for k in in_place:
            in_place[k].copy_(stepped[k])
        saved = {k: v.clone() for k, v in stepped.items()}
        pure, s_pure = f.update(s_pure, stepped, grads=grads)
        assert all(torch.equal(stepped[k], saved[k]) for k in saved)  # pure: reads only
        s_in = f.update_(s_in, in_place, grads=grads)
        for k in anchor:
            assert torch.equal(in_place[k], pure[k]), k
            assert torch.equal(s_in.direction[k], s_pure.direction[k]), k
            assert torch.equal(s_in.radius[k], s_pure.radius[k]), k
            assert pure[k].dtype == stepped[k].dtype
            gamma = float(s_pure.radius[k])
            before = _rows_l1(stepped[k] - anchor[k])
            after = _rows_l1(pure[k] - anchor[k])
            # rounding of a + s * c near |a|: a few ulps of the row's magnitudes
            tol = 4 * torch.finfo(anchor[k].dtype).eps * (_rows_l1(anchor[k]) + before)
            for n, m, t in zip(before.tolist(), after.tolist(), tol.tolist()):
                if n + 1e-8 <= gamma:
                    assert m == pytest.approx(n, rel=1e-6, abs=1e-12)  # inside: untouched
                else:
                    assert m <= gamma * (1 + 1e-6) + t  # outside: on or inside the sphere


def test_zero_deviation_stays_zero() -> None:
    anchor = {"w": torch.randn(3, 2), "b": torch.randn(3)}
    params = {k: v.clone() for k, v in anchor.items()}
    f = ftp()
    state = f.init(params, anchor=anchor)
    for _ in range(3):
        state = f.update_(state, params, grads={k: torch.randn_like(v) for k, v in params.items()})
        assert all(torch.equal(params[k], anchor[k]) for k in anchor)
        assert all(torch.isfinite(r) for r in state.radius.values())


def test_bf16_runs_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    anchor = {"w": torch.randn(300, 300, generator=g).bfloat16()}
    params = {"w": (anchor["w"].float() + torch.randn(300, 300, generator=g)).bfloat16()}
    grads = {"w": torch.randn(300, 300, generator=g).bfloat16()}
    f = ftp(lr=0.5)
    wide = {"w": params["w"].float()}
    s16 = f.update_(f.init(params, anchor=anchor), params, grads=grads)
    s32 = f.init(wide, anchor={"w": anchor["w"].float()})
    s32 = f.update_(s32, wide, grads={"w": grads["w"].float()})
    assert params["w"].dtype == torch.bfloat16 and s16.radius["w"].dtype == torch.float32
    assert s16.direction["w"].dtype == torch.bfloat16
    torch.testing.assert_close(params["w"], wide["w"].bfloat16(), rtol=0, atol=0)


def test_update_in_place_allocates_no_tensor_sized_temporary() -> None:
    g = torch.Generator().manual_seed(0)
    anchor = {f"w{i}": torch.randn(256, 256, generator=g) for i in range(4)}
    params = {k: v + torch.randn(v.shape, generator=g) for k, v in anchor.items()}
    grads = {k: torch.randn(v.shape, generator=g) for k, v in anchor.items()}
    f = ftp()
    state = f.update_(f.init(params, anchor=anchor), params, grads=grads)
    peak = peak_alloc_bytes(lambda: f.update_(state, params, grads=grads))
    assert peak <= 65536  # per-row norms and 0-d scalars only


# ---------------------------------------------------------------- state


def test_resuming_from_a_weights_only_checkpoint_is_bit_identical() -> None:
    g = torch.Generator().manual_seed(0)
    anchor = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(3, generator=g)}
    steps = [{k: torch.randn(v.shape, generator=g) for k, v in anchor.items()} for _ in range(4)]
    f = ftp()

    def run(
        params: dict[str, torch.Tensor], state: FtpState, todo: list[dict[str, torch.Tensor]]
    ) -> FtpState:
        for d in todo:
            for k in params:
                params[k] += 0.3 * d[k]
            state = f.update_(state, params, grads=d)
        return state

    straight = {k: v.clone() for k, v in anchor.items()}
    full = run(straight, f.init(straight, anchor=anchor), steps)
    resumed = {k: v.clone() for k, v in anchor.items()}
    half = run(resumed, f.init(resumed, anchor=anchor), steps[:2])
    buf = io.BytesIO()
    torch.save((half, resumed), buf)
    buf.seek(0)
    half, resumed = torch.load(buf, weights_only=True)
    assert isinstance(half, FtpState) and half.settings == full.settings
    end = run(resumed, half, steps[2:])
    assert all(torch.equal(resumed[k], straight[k]) for k in anchor)
    assert all(torch.equal(end.radius[k], full.radius[k]) for k in anchor)


def test_stale_and_foreign_states_are_refused() -> None:
    params = {"w": torch.ones(2)}
    f = ftp()
    state = f.init(params, anchor={"w": torch.zeros(2)})
    f.update_(state, params, grads=params)
    with pytest.raises(ValueError, match=r"ftp.update_: state is stale"):
        f.update_(state, params, grads=params)
    with pytest.raises(ValueError, match=r"state was made by ftp\(annealing=1.0, lr=0.01"):
        ftp(lr=0.1).update(f.init(params, anchor={"w": torch.zeros(2)}), params, grads=params)
