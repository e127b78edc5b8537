"""robustft.projections.spd: selective projection decay as a post-step operation."""

from __future__ import annotations

import io

import pytest
import torch
from _memory import peak_alloc_bytes
from hypothesis import given, settings
from hypothesis import strategies as st
from reference.projections_ref import BaseStepRef, spd_step_ref
from strategies import tree_pairs
from torch import nn

from robustft import projections
from robustft.projections import SpdState, spd


def _step(params: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, p in params.items():
            p.add_(delta[k])


# ---------------------------------------------------------------- hand values


def test_hand_values_decay_only_where_selected_and_growing() -> None:
    anchor = {"a": torch.zeros(2), "b": torch.zeros(2), "c": torch.zeros(2), "d": torch.zeros(2)}
    params = {
        "a": torch.tensor([3.0, 0.0]),  # grad agrees with the deviation (c < 0), step grows it
        "b": torch.tensor([3.0, 0.0]),  # grad opposes the deviation (c > 0): never decayed
        "c": torch.tensor([3.0, 0.0]),  # c < 0 but the step brings it closer: r = 0
        "d": torch.tensor([0.0, 4.0]),  # c < 0, step grows |d| from 4 to 5: r = 1/5
    }
    grads = {
        "a": torch.tensor([1.0, 0.0]),
        "b": torch.tensor([-1.0, 0.0]),
        "c": torch.tensor([1.0, 0.0]),
        "d": torch.tensor([0.0, 2.0]),
    }
    s = spd(0.5)
    state = s.prepare(s.init(params, anchor=anchor), params, grads=grads)
    assert {k: float(v) for k, v in state.decay.items()} == {"a": 1, "b": 0, "c": 1, "d": 1}
    assert {k: float(v) for k, v in state.previous_norm.items()} == {"a": 3, "b": 3, "c": 3, "d": 4}
    _step(
        params,
        {
            "a": torch.tensor([1.0, 0.0]),  # |a| 3 -> 4: r = 1/4
            "b": torch.tensor([1.0, 0.0]),
            "c": torch.tensor([-1.0, 0.0]),
            "d": torch.tensor([3.0, 0.0]),  # (3, 4): |d| = 5
        },
    )
    state = s.update_(state, params)
    assert torch.equal(params["a"], torch.tensor([3.5, 0.0]))  # 4 - 0.5 * 1/4 * 4
    assert torch.equal(params["b"], torch.tensor([4.0, 0.0]))  # bit-identical: not selected
    assert torch.equal(params["c"], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(params["d"], torch.tensor([3.0, 4.0]) * (1 - 0.5 * 0.2))
    assert int(state.step) == 1 and state.decay is None


def test_weight_decay_one_returns_to_the_previous_sphere() -> None:
    # lambda = 1: theta~ - r (theta~ - theta0) has norm (1 - r) * curr = prev exactly
    anchor = {"w": torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)}
    params = {"w": anchor["w"] + torch.tensor([0.3, 0.2, -0.1], dtype=torch.float64)}
    s = spd(1.0)
    state = s.prepare(s.init(params, anchor=anchor), params, grads={"w": params["w"] - anchor["w"]})
    prev = float(torch.linalg.vector_norm(params["w"] - anchor["w"]))
    _step(params, {"w": torch.tensor([0.5, 0.4, -0.3], dtype=torch.float64)})
    s.update_(state, params)
    assert float(torch.linalg.vector_norm(params["w"] - anchor["w"])) == pytest.approx(
        prev, rel=1e-14
    )


def test_zero_weight_decay_and_zero_deviation_are_exact_identities() -> None:
    anchor = {"w": torch.randn(3, 2)}
    params = {"w": anchor["w"] + 1.0}
    grads = {"w": torch.ones(3, 2)}
    s0 = spd(0.0)
    state = s0.prepare(s0.init(params, anchor=anchor), params, grads=grads)
    _step(params, {"w": torch.full((3, 2), 2.0)})
    before = params["w"].clone()
    s0.update_(state, params)
    assert torch.equal(params["w"], before)
    # a step landing exactly on theta0: the ratio is 0 (the official code divides 0 by 0)
    s = spd(0.7)
    params = {"w": anchor["w"].clone()}
    state = s.prepare(s.init(params, anchor=anchor), params, grads=grads)
    new, _ = s.update(state, params)
    assert torch.equal(new["w"], anchor["w"])
    assert torch.isfinite(new["w"]).all()


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


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_matches_the_official_fused_optimiser(opt: str) -> None:
    model, batches = _tiny_problem()
    params = dict(model.named_parameters())
    anchor = {k: v.detach().clone() for k, v in params.items()}
    ref = {k: v.detach().clone() for k, v in params.items()}
    lr, lam = (0.05, 1.0) if opt == "adam" else (0.3, 1.0)
    if opt == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        base = BaseStepRef("adam", lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        base = BaseStepRef("sgd", lr, momentum=0.9)
    plain = BaseStepRef(opt, lr, momentum=0.9 if opt == "sgd" else 0.0)
    free = {k: v.clone() for k, v in ref.items()}  # the same optimiser without SPD
    s = spd(lam)
    state = s.init(params, anchor=anchor)
    decayed = 0
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads = {k: p.grad for k, p in params.items()}
        state = s.prepare(state, params, grads=grads)
        decayed += int(sum(float(v) for v in state.decay.values()))
        optimizer.step()
        state = s.update_(state, params)
        ref_grads = _grads(model, ref, x, y)
        ref = {k: v.detach() for k, v in spd_step_ref(ref, ref_grads, anchor, base, lam).items()}
        free = {k: v - plain.d_p(k, v, ref_grads[k]) for k, v in free.items()}
        for k in params:
            torch.testing.assert_close(params[k].detach(), ref[k], rtol=1e-12, atol=1e-12)
    assert decayed > 0  # the condition selected tensors, and the trajectory really changed
    assert any(not torch.allclose(ref[k], free[k], atol=1e-6) for k in ref)


# ---------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(pairs=tree_pairs(n=4), lam=st.floats(0.0, 2.0))
def test_pure_and_in_place_agree_and_never_grow_the_deviation(
    pairs: list[dict[str, torch.Tensor]], lam: float
) -> None:
    anchor, params, grads, delta = pairs
    s = spd(lam)
    state = s.prepare(s.init(params, anchor=anchor), params, grads=grads)
    stepped = {k: params[k] + delta[k] for k in params}
    saved = {k: v.clone() for k, v in stepped.items()}
    pure, next_state = s.update(state, stepped)
    assert all(torch.equal(stepped[k], saved[k]) for k in saved)  # the pure form reads only
    assert bool(state.live) and int(next_state.step) == 1
    in_place = {k: v.clone() for k, v in stepped.items()}
    s.update_(state, in_place)
    for k in params:
        torch.testing.assert_close(in_place[k], pure[k], rtol=0, atol=0)
        assert pure[k].dtype == params[k].dtype
        before = float(torch.linalg.vector_norm((stepped[k] - anchor[k]).double()))
        after = float(torch.linalg.vector_norm((pure[k] - anchor[k]).double()))
        assert after <= before * (1 + 1e-6) + 1e-12
        if float(state.decay[k]) == 0 or lam == 0:  # not selected: left bit-identical
            assert torch.equal(pure[k], stepped[k])


def test_bf16_is_measured_and_decayed_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    anchor = {"w": torch.randn(40, 30, generator=g).bfloat16()}
    params = {"w": (anchor["w"].float() + 0.1 * torch.randn(40, 30, generator=g)).bfloat16()}
    grads = {"w": params["w"] - anchor["w"]}
    wide = {
        name: {k: v.float() for k, v in t.items()}
        for name, t in (("anchor", anchor), ("params", params), ("grads", grads))
    }
    s = spd(0.8)
    state = s.prepare(s.init(params, anchor=anchor), params, grads=grads)
    state32 = s.prepare(
        s.init(wide["params"], anchor=wide["anchor"]), wide["params"], grads=wide["grads"]
    )
    assert state.previous_norm["w"].dtype == torch.float32
    torch.testing.assert_close(state.previous_norm["w"], state32.previous_norm["w"])
    _step(params, {"w": 0.5 * grads["w"]})
    want, _ = s.update(state32, {"w": params["w"].float()})
    s.update_(state, params)
    assert params["w"].dtype == torch.bfloat16
    torch.testing.assert_close(params["w"], want["w"].bfloat16(), rtol=0, atol=0)
    assert not torch.equal(params["w"].float(), (wide["params"]["w"] + 0.5 * wide["grads"]["w"]))


def test_update_in_place_allocates_at_most_one_tensor() -> None:
    g = torch.Generator().manual_seed(0)
    anchor = {f"w{i}": torch.randn(256, 256, generator=g) for i in range(4)}
    params = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in anchor.items()}
    grads = {k: params[k] - anchor[k] for k in params}
    s = spd(0.5)
    state = s.init(params, anchor=anchor)
    largest = 256 * 256 * 4
    box = {}
    peak = peak_alloc_bytes(lambda: box.update(st=s.prepare(state, params, grads=grads)))
    assert peak <= largest + 65536
    _step(params, {k: 0.2 * v for k, v in grads.items()})
    peak = peak_alloc_bytes(lambda: s.update_(box["st"], params))
    assert peak <= largest + 65536


# ---------------------------------------------------------------- state


def test_state_round_trips_through_weights_only_load() -> None:
    anchor = {"w": torch.zeros(3)}
    params = {"w": torch.tensor([1.0, 2.0, 2.0])}
    s = spd(0.5)
    state = s.prepare(s.init(params, anchor=anchor), params, grads={"w": torch.ones(3)})
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert isinstance(loaded, SpdState) and loaded.settings == state.settings
    _step(params, {"w": torch.tensor([1.0, 0.0, 0.0])})
    a, _ = s.update(state, params)
    b, nxt = s.update(loaded, params)
    assert torch.equal(a["w"], b["w"]) and int(nxt.step) == 1


def test_stale_and_foreign_states_are_refused() -> None:
    params = {"w": torch.ones(2)}
    s = spd(0.5)
    state = s.prepare(s.init(params, anchor={"w": torch.zeros(2)}), params, grads=params)
    new = s.update_(state, params)
    with pytest.raises(ValueError, match=r"spd.update_: state is stale"):
        s.update_(state, params)
    with pytest.raises(ValueError, match=r"spd.update: state must be prepared"):
        s.update(new, params)
    with pytest.raises(ValueError, match=r"state was made by spd\(weight_decay=0.5\)"):
        spd(0.1).prepare(new, params, grads=params)
    assert projections.spd(0.5).prepare(new, params, grads=params).decay is not None


# ---------------------------------------------------------------- FSDP2 (DTensor) trees


def _sharded_body(rank: int, world_size: int) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))  # 7 and 3 rows: uneven
    full = {k: v.detach().clone() for k, v in model.named_parameters()}
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    sharded = dict(model.named_parameters())
    assert all(isinstance(v, DTensor) for v in sharded.values())
    anchor_s = {k: v.detach().clone() for k, v in sharded.items()}
    anchor_f = {k: v.clone() for k, v in full.items()}
    g = torch.Generator().manual_seed(1)
    s, f = spd(0.7), projections.ftp(lr=0.1)
    spd_s, spd_f = s.init(sharded, anchor=anchor_s), s.init(full, anchor=anchor_f)
    ftp_s, ftp_f = f.init(sharded, anchor=anchor_s), f.init(full, anchor=anchor_f)
    for _ in range(3):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in full.items()}
        grads_s = {
            k: distribute_tensor(grads[k], sharded[k].device_mesh, sharded[k].placements)
            for k in grads
        }
        spd_s = s.prepare(spd_s, sharded, grads=grads_s)
        spd_f = s.prepare(spd_f, full, grads=grads)
        with torch.no_grad():
            for k in full:
                sharded[k].add_(grads_s[k], alpha=0.3)
                full[k].add_(grads[k], alpha=0.3)
        spd_s, spd_f = s.update_(spd_s, sharded), s.update_(spd_f, full)
        ftp_s = f.update_(ftp_s, sharded, grads=grads_s)
        ftp_f = f.update_(ftp_f, full, grads=grads)
    for k in full:  # global norms and inner products: the same as on the full tensors
        torch.testing.assert_close(sharded[k].full_tensor(), full[k], rtol=1e-5, atol=1e-6)
    return "ok"


@pytest.mark.distributed
def test_spd_and_ftp_on_fsdp2_sharded_trees_match_the_full_tensors() -> None:
    from _dist import run_distributed

    assert run_distributed(_sharded_body, world_size=2) == ["ok", "ok"]
