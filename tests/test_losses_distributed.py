"""UEO and the CLIP/FLYP contrastive loss under data parallelism (2 gloo ranks on CPU).

Both couple samples: with a group, the loss is the global-batch loss on every rank and the
DDP-averaged gradient equals the single-process gradient on the concatenated batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed

from robustft.losses import clip_contrastive, ueo

SPLIT = (3, 5)  # uneven local batches


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(sum(SPLIT), 6, generator=g, dtype=torch.float64)
    conf = torch.rand(sum(SPLIT), generator=g, dtype=torch.float64) * 0.9 + 0.05
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64) * 2
    return x, conf, weight


def _ueo_detached_other_ranks(logits: torch.Tensor, w: torch.Tensor, gamma: float) -> torch.Tensor:
    """UEO whose global sums treat the other ranks' parts as constants (the wrong way)."""
    logp = torch.log_softmax(logits, -1)
    h = -(logp.exp() * logp).sum(-1)
    local = torch.cat(
        [(logp.exp() / w[:, None]).sum(0), (w * h).sum()[None], w.sum()[None], (1 / w).sum()[None]]
    )
    total = local.detach().clone()
    dist.all_reduce(total)
    sums = local + (total - local.detach())
    c = logits.shape[1]
    pbar = sums[:c] / sums[c + 2]
    return sums[c] / sums[c + 1] + gamma * (pbar * pbar.log()).sum()


def _body(rank: int, world_size: int) -> dict[str, float]:
    x, conf, weight = _data()
    lo = sum(SPLIT[:rank])
    xs, cs = x[lo : lo + SPLIT[rank]], conf[lo : lo + SPLIT[rank]]

    # reference: one process, concatenated global batch
    w_single = weight.clone().requires_grad_(True)
    single = ueo(x @ w_single, conf, trade_off=0.7)
    single.backward()

    # data parallel: global sums through the autograd-aware all-reduce, DDP-averaged gradient
    w_ddp = weight.clone().requires_grad_(True)
    loss = ueo(xs @ w_ddp, cs, trade_off=0.7, group=dist.group.WORLD)
    loss.backward()
    grad = w_ddp.grad.clone()
    dist.all_reduce(grad)
    grad /= world_size
    torch.testing.assert_close(loss, single.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, w_single.grad, atol=1e-12, rtol=1e-10)

    # detaching the other ranks' parts gives the same value, but after DDP's averaging only
    # 1/world_size of the gradient: each rank then back-propagates its own share only
    w_det = weight.clone().requires_grad_(True)
    wrong = _ueo_detached_other_ranks(xs @ w_det, cs, 0.7)
    wrong.backward()
    grad_det = w_det.grad.clone()
    dist.all_reduce(grad_det)
    grad_det /= world_size
    torch.testing.assert_close(wrong.detach(), single.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad_det, w_single.grad / world_size, atol=1e-12, rtol=1e-10)
    rel = ((grad_det - w_single.grad).norm() / w_single.grad.norm()).item()

    # CLIP/FLYP contrastive loss: negatives from the global batch, gradients through both gathers
    gc = torch.Generator().manual_seed(11)
    img = torch.randn(sum(SPLIT), 5, generator=gc, dtype=torch.float64)
    txt = torch.randn(sum(SPLIT), 5, generator=gc, dtype=torch.float64)
    proj_i, proj_t = (torch.randn(5, 4, generator=gc, dtype=torch.float64) for _ in range(2))
    ps = [proj_i.clone().requires_grad_(True), proj_t.clone().requires_grad_(True)]
    single_c = clip_contrastive(img @ ps[0], txt @ ps[1], logit_scale=3.0)
    single_c.backward()
    pd = [proj_i.clone().requires_grad_(True), proj_t.clone().requires_grad_(True)]
    hi = lo + SPLIT[rank]
    loss_c = clip_contrastive(
        img[lo:hi] @ pd[0], txt[lo:hi] @ pd[1], logit_scale=3.0, group=dist.group.WORLD
    )
    loss_c.backward()
    torch.testing.assert_close(loss_c, single_c.detach(), atol=1e-12, rtol=1e-12)
    for p_ddp, p_single in zip(pd, ps):
        g_avg = p_ddp.grad.clone()
        dist.all_reduce(g_avg)
        torch.testing.assert_close(g_avg / world_size, p_single.grad, atol=1e-12, rtol=1e-10)
    local_c = clip_contrastive(img[lo:hi] @ proj_i, txt[lo:hi] @ proj_t, logit_scale=3.0)
    assert abs(local_c.item() - single_c.item()) > 1e-3  # group=None: local negatives only

    # group=None stays local even with an initialised process group
    local = ueo(xs @ weight, cs, trade_off=0.7)
    torch.testing.assert_close(local, ueo(xs @ weight, cs, trade_off=0.7, group=None))
    return {
        "loss": loss.item(),
        "single": single.item(),
        "local": local.item(),
        "detached_rel_error": rel,
    }


@pytest.mark.distributed
def test_ueo_global_batch_under_data_parallelism() -> None:
    results = run_distributed(_body, world_size=2)
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], abs=1e-12)
    # the local losses differ from the global one (the all-reduce did something)
    assert all(abs(r["local"] - r["single"]) > 1e-3 for r in results)
    # the detached variant's DDP gradient is off by a factor 1/world_size (50 % here)
    assert all(r["detached_rel_error"] == pytest.approx(0.5) for r in results), results


# ---------------------------------------------------------------- a rank with an empty batch


def _empty_rank_body(rank: int, world_size: int, split: tuple[int, ...]) -> dict[str, float]:
    x, conf, weight = _data()
    n = sum(split)
    x, conf = x[:n], conf[:n]
    lo, hi = sum(split[:rank]), sum(split[: rank + 1])

    w_single = weight.clone().requires_grad_(True)
    single = ueo(x @ w_single, conf, trade_off=0.7)
    single.backward()
    w_ddp = weight.clone().requires_grad_(True)
    loss = ueo(x[lo:hi] @ w_ddp, conf[lo:hi], trade_off=0.7, group=dist.group.WORLD)
    loss.backward()  # every rank, the empty one included, reaches the backward's all-reduce
    grad = w_ddp.grad.clone()
    dist.all_reduce(grad)
    torch.testing.assert_close(loss, single.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad / world_size, w_single.grad, atol=1e-12, rtol=1e-10)

    gc = torch.Generator().manual_seed(11)
    img = torch.randn(n, 5, generator=gc, dtype=torch.float64)
    txt = torch.randn(n, 5, generator=gc, dtype=torch.float64)
    proj = torch.randn(5, 4, generator=gc, dtype=torch.float64)
    p_single = proj.clone().requires_grad_(True)
    single_c = clip_contrastive(img @ p_single, txt @ p_single, logit_scale=3.0)
    single_c.backward()
    p_ddp = proj.clone().requires_grad_(True)
    loss_c = clip_contrastive(
        img[lo:hi] @ p_ddp, txt[lo:hi] @ p_ddp, logit_scale=3.0, group=dist.group.WORLD
    )
    loss_c.backward()
    g_avg = p_ddp.grad.clone()
    dist.all_reduce(g_avg)
    torch.testing.assert_close(loss_c, single_c.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g_avg / world_size, p_single.grad, atol=1e-12, rtol=1e-10)
    return {"ueo": loss.item(), "clip": loss_c.item()}


@pytest.mark.distributed
def test_a_rank_with_an_empty_batch_gets_the_global_loss_and_no_one_waits() -> None:
    # rank 0 has no samples: both ranks reach the same collectives (a bounded run, no hang), get
    # the global loss, and DDP's averaged gradient is the single-process one
    results = run_distributed(_empty_rank_body, world_size=2, args=((0, 5),), timeout=90)
    assert results[0] == pytest.approx(results[1], abs=1e-12)


def _all_empty_body(rank: int, world_size: int) -> list[float]:
    logits = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    loss = ueo(logits, torch.zeros(0, dtype=torch.float64), group=dist.group.WORLD)
    loss.backward()
    feats = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    loss_c = clip_contrastive(feats, feats, group=dist.group.WORLD)
    loss_c.backward()
    return [loss.item(), loss_c.item()]


@pytest.mark.distributed
def test_an_empty_global_batch_gives_zero_on_every_rank() -> None:
    assert run_distributed(_all_empty_body, world_size=2, timeout=90) == [[0.0, 0.0]] * 2


def _bad_confidence_body(rank: int, world_size: int) -> str:
    x, conf, weight = _data()
    conf = conf[:4].clone()
    if rank == 1:
        conf[1] = -0.25  # only rank 1 sees the bad value
    try:
        ueo(x[:4] @ weight, conf, group=dist.group.WORLD)
    except ValueError as err:
        # the group is still usable: nobody is stuck in a collective
        flag = torch.ones(1)
        dist.all_reduce(flag)
        assert flag.item() == world_size
        return str(err)
    return "no error"


@pytest.mark.distributed
def test_a_bad_confidence_on_one_rank_raises_on_every_rank() -> None:
    messages = run_distributed(_bad_confidence_body, world_size=2, timeout=90)
    assert messages[1] == "ueo: confidence must be > 0 everywhere, got -0.25"
    assert messages[0].startswith("ueo: confidence must be > 0 everywhere, got a non-positive")
    assert "another rank" in messages[0]
