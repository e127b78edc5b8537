"""Averages and projections on FSDP2-sharded parameter trees (DTensors), two gloo ranks on CPU.

One spawn: a small MLP is sharded with ``fully_shard``; its ``named_parameters()`` (DTensors,
unevenly split along dim 0) go through bma / ema / uniform / wise / l2_ball / mars_ball, the
in-place l2_ball_ / mars_ball_ and the per-tensor merges (task_vector, task_arithmetic with a
number, a 0-d tensor and a depth schedule, model_stock, uniform_soup), and every result, gathered with ``full_tensor()``, must match the
same calls on the unsharded tensors. The
module is never copied; ``torch.optim.swa_utils.AveragedModel`` needs a deepcopy of it and fails.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _dist import run_distributed
from torch import nn

pytestmark = pytest.mark.distributed


def _close(sharded: dict[str, Any], full: dict[str, torch.Tensor], what: str) -> None:
    assert list(sharded) == list(full), what
    for k, v in sharded.items():
        got = v.full_tensor()
        assert got.dtype == full[k].dtype, (what, k)
        torch.testing.assert_close(got, full[k], rtol=1e-6, atol=1e-6, msg=f"{what}: {k}")


def _body(rank: int, world_size: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from robustft import averaging
    from robustft.merging import (
        depth_schedule,
        model_stock,
        task_arithmetic,
        task_vector,
        uniform_soup,
        wise,
    )
    from robustft.projections import l2_ball, l2_ball_, mars_ball, mars_ball_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))  # 7 and 3 rows: uneven
    full = {k: v.detach().clone() for k, v in model.named_parameters()}
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    sharded = dict(model.named_parameters())
    assert all(isinstance(v, DTensor) for v in sharded.values())
    assert sharded["0.weight"].to_local().shape[0] == (4 if rank == 0 else 3)
    anchor_s = {k: v.detach().clone() for k, v in sharded.items()}
    anchor_f = {k: v.clone() for k, v in full.items()}

    averagers = {
        "bma": averaging.bma(4, beta=0.5),
        "ema": averaging.ema(0.6),
        "uniform": averaging.uniform(),
    }
    states_s = {n: a.init(sharded) for n, a in averagers.items()}
    states_f = {n: a.init(full) for n, a in averagers.items()}
    g = torch.Generator().manual_seed(1)
    for t in range(4):  # the "optimiser steps": the same full-size update on both copies
        step = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in full.items()}
        with torch.no_grad():
            for k, p in sharded.items():
                p.add_(distribute_tensor(step[k], p.device_mesh, p.placements))
                full[k] += step[k]
        for n, avg in averagers.items():
            # alternate the in-place fast path and the pure path on the sharded tree
            upd = avg.update_ if t % 2 == 0 else avg.update
            states_s[n] = upd(states_s[n], sharded)
            states_f[n] = avg.update_(states_f[n], full)
    for n in averagers:
        assert all(isinstance(v, DTensor) for v in states_s[n].average.values()), n
        _close(states_s[n].average, states_f[n].average, n)
    _close(sharded, full, "the params themselves")  # never written by the averages

    _close(
        wise(sharded, anchor=anchor_s, alpha=0.3), wise(full, anchor=anchor_f, alpha=0.3), "wise"
    )
    _close(
        wise(sharded, anchor=anchor_s, alpha=torch.tensor(0.3)),
        wise(full, anchor=anchor_f, alpha=0.3),
        "wise, 0-d tensor alpha",
    )
    # radii below every norm: the result depends on the *global* norm of each tensor / row
    pure_l2 = l2_ball(full, anchor=anchor_f, radius=0.2)
    _close(l2_ball(sharded, anchor=anchor_s, radius=0.2), pure_l2, "l2_ball")
    radius = {k: 0.1 for k in full}
    pure_mars = mars_ball(full, anchor=anchor_f, radius=radius)
    _close(mars_ball(sharded, anchor=anchor_s, radius=radius), pure_mars, "mars")
    projected = l2_ball(sharded, anchor=anchor_s, radius=0.2)
    # the in-place forms write the projection into the (sharded) parameters themselves
    for name, fn_, r, expected in [
        ("l2_ball_", l2_ball_, 0.2, pure_l2),
        ("mars_ball_", mars_ball_, radius, pure_mars),
    ]:
        target = {k: v.detach().clone() for k, v in sharded.items()}
        assert fn_(target, anchor=anchor_s, radius=r) is target
        assert all(isinstance(v, DTensor) for v in target.values()), name
        _close(target, expected, name)
    live = dict(model.named_parameters())  # the module's own DTensor parameters, in place
    l2_ball_(live, anchor=anchor_s, radius=0.2)
    _close(dict(model.named_parameters()), pure_l2, "l2_ball_ on the module's parameters")
    norms = [float((projected[k] - anchor_s[k]).full_tensor().norm()) for k in full]

    # task-vector merges are per tensor: sharded candidates give the unsharded results
    full_now = {k: v.detach().full_tensor() for k, v in sharded.items()}
    cands_f = [
        full_now,
        *(
            {k: v + 0.1 * (i + 1) * torch.randn(v.shape, generator=g) for k, v in anchor_f.items()}
            for i in range(2)
        ),
    ]
    cands_s = [
        {
            k: distribute_tensor(v, sharded[k].device_mesh, sharded[k].placements)
            for k, v in c.items()
        }
        for c in cands_f
    ]
    _close(
        task_vector(cands_s[0], anchor=anchor_s),
        task_vector(cands_f[0], anchor=anchor_f),
        "task_vector",
    )
    sched = depth_schedule(full, start=0.5, end=1.0, depth_of=lambda k: int(k.split(".")[0]))
    for scale in (0.4, torch.tensor(0.4), sched):
        _close(
            task_arithmetic(cands_s, anchor=anchor_s, scale=scale),
            task_arithmetic(cands_f, anchor=anchor_f, scale=scale),
            f"task_arithmetic, scale {type(scale).__name__}",
        )
    _close(
        model_stock(cands_s, anchor=anchor_s), model_stock(cands_f, anchor=anchor_f), "model_stock"
    )
    _close(uniform_soup(iter(cands_s)), uniform_soup(cands_f), "uniform_soup")

    try:
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        averaged_model = "constructed"
    except Exception as err:  # the deepcopy of an FSDP2 module
        averaged_model = f"{type(err).__name__}: {err}"
    return {"norms": norms, "averaged_model": averaged_model}


def test_fsdp2_sharded_trees_match_unsharded_results() -> None:
    results = run_distributed(_body, world_size=2)
    for r in results:
        assert r["norms"] == pytest.approx([0.2] * 4, rel=1e-5)  # on the global sphere
        assert "deepcopy" in r["averaged_model"], r["averaged_model"]
