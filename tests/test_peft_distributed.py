"""robustft.peft under data parallelism: an attached tiny open_clip model on two gloo CPU ranks.

One spawn, two scenarios on the same random factors (q/v LoRA on the fused in-projections and a
LoRA on ``c_fc``, both towers):

- DDP over the attached model: the factors are DDP's parameters, so after one backward on each
  rank's half of the batch every rank holds the gradient of the whole batch, and one SGD step
  equals one process stepping on the concatenated batch;
- FSDP2: ``fully_shard`` on every transformer block, then on the root (the 0-d ``logit_scale``
  ignored, as the recipes do), so each block's factors are sharded with it; forward, backward and
  one SGD step again equal one process.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _dist import run_distributed
from torch import Tensor, nn

pytestmark = pytest.mark.distributed

LOCAL = 2  # images per rank
LR = 0.5


class _Pair(nn.Module):
    """The module DDP / FSDP2 wrap: its forward runs both towers of the attached model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, tokens: Tensor) -> Tensor:
        return self.model.encode_image(images) @ self.model.encode_text(tokens).T


def _batch(rank: int | None) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2 * LOCAL, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 49407, (3, 77), generator=g)
    tokens[:, 6:] = 0
    tokens[:, 5] = 49407
    if rank is not None:
        images = images[rank * LOCAL : (rank + 1) * LOCAL]
    return images, tokens


def _attached() -> tuple[nn.Module, dict[str, Tensor]]:
    from clip_models import tiny_vit_clip

    from robustft import peft

    model = tiny_vit_clip()
    spec = peft.lora(
        rank=2, alpha=4, targets=["*attn.in_proj_weight", "*mlp.c_fc.weight"], qkv=("q", "v")
    )
    f0 = peft.init(spec, dict(model.named_parameters()), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    f = {k: 0.2 * torch.randn(v.shape, generator=g) for k, v in f0.items()}
    return _Pair(peft.attach_(model, spec, f)), f


def _step(module: nn.Module, wrapper: nn.Module, rank: int | None) -> dict[str, Tensor]:
    """One SGD step on ``wrapper`` (the module itself, DDP or FSDP2); the gradients it used."""
    images, tokens = _batch(rank)
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=LR)
    loss = wrapper(images, tokens).square().mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    opt.step()
    return grads


def _full(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _body(rank: int, world_size: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    from robustft import peft

    torch.manual_seed(0)
    # one process on the whole batch
    single, f = _attached()
    grads_single = _step(single, single, None)
    assert set(grads_single) == {f"model.{k}" for k in f}
    after_single = {n: p.detach().clone() for n, p in single.named_parameters()}

    # DDP
    module, _ = _attached()
    ddp = DistributedDataParallel(module)
    grads_ddp = _step(module, ddp, rank)
    assert set(grads_ddp) == set(grads_single)
    for n, g in grads_ddp.items():
        torch.testing.assert_close(g, grads_single[n], rtol=1e-4, atol=1e-6, msg=f"ddp grad {n}")
    for n, p in module.named_parameters():
        torch.testing.assert_close(p.detach(), after_single[n], rtol=1e-5, atol=1e-6, msg=n)

    # FSDP2: every block, then the root
    module, _ = _attached()
    mesh = init_device_mesh("cpu", (world_size,))
    inner = module.model
    for blocks in (inner.visual.transformer.resblocks, inner.transformer.resblocks):
        for block in blocks:
            fully_shard(block, mesh=mesh)
    scalars = {p for p in module.parameters() if p.ndim == 0}
    fully_shard(module, mesh=mesh, ignored_params=scalars)
    sharded = dict(module.named_parameters())
    for k in f:
        assert isinstance(sharded[f"model.{k}"], DTensor), k
    assert peft.attached(inner) is not None
    grads_fsdp = _step(module, module, rank)
    assert set(grads_fsdp) == set(grads_single)
    for n, g in grads_fsdp.items():
        torch.testing.assert_close(
            _full(g), grads_single[n], rtol=1e-4, atol=1e-6, msg=f"fsdp grad {n}"
        )
    for n, p in module.named_parameters():
        torch.testing.assert_close(
            _full(p.detach()), after_single[n], rtol=1e-5, atol=1e-6, msg=f"fsdp {n}"
        )
    moved = max(float((after_single[f"model.{k}"] - f[k]).abs().max()) for k in f)
    return {"moved": moved}


def test_attached_factors_under_ddp_and_fsdp2_equal_one_process() -> None:
    results = run_distributed(_body, world_size=2, timeout=90)
    assert all(r["moved"] > 1e-3 for r in results)  # the step changed the factors
