"""Where a run executes: one process, or torchrun's ranks with DDP or FSDP2; device and autocast.

One process without torchrun needs no set-up. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the
environment) :func:`init` joins the process group that torchrun's rendezvous describes (NCCL on
GPUs, gloo on CPUs), one device per local rank. :func:`wrap` then wraps the method's trained
module in ``DistributedDataParallel``, or shards it with FSDP2's ``fully_shard`` per transformer
block and once at the root; the frozen teacher is sharded the same way under FSDP2 and
replicated under DDP.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from robustft.recipes._nets import shard_units

__all__ = ["Runtime", "autocast", "init", "shutdown", "wrap"]


class Runtime(NamedTuple):
    """The execution context of a run.

    Attributes:
        device: this rank's device.
        rank: this process's rank (0 on one process).
        world: number of processes.
        strategy: ``"single"``, ``"ddp"`` or ``"fsdp"``.
        group: the process group (``torch.distributed.group.WORLD``) or ``None`` on one process.
        amp_dtype: the autocast dtype (``torch.bfloat16``) or ``None`` for plain fp32.
    """

    device: torch.device
    rank: int = 0
    world: int = 1
    strategy: str = "single"
    group: Any = None
    amp_dtype: torch.dtype | None = None

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the rank that writes files and shows progress)."""
        return self.rank == 0


def init(*, device: str | None, precision: str, distributed: str) -> Runtime:
    """Set up the run: join torchrun's process group if there is one, pick the device and precision.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``..., or ``None`` for CUDA when available.
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 elsewhere), ``"fp32"`` or ``"bf16"``.
        distributed: ``"ddp"`` or ``"fsdp"``, used when torchrun started several processes.

    Raises:
        ValueError: on an unknown precision or strategy, or CUDA asked for and unavailable.
    """
    fn = "init"
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"{fn}: precision must be auto, fp32 or bf16, got {precision!r}")
    if distributed not in ("ddp", "fsdp"):
        raise ValueError(f"{fn}: distributed must be ddp or fsdp, got {distributed!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if device is None:
        dev = torch.device(
            f"cuda:{local_rank}" if cuda and world > 1 else ("cuda" if cuda else "cpu")
        )
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and world > 1 and dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        if not cuda:
            raise ValueError(f"{fn}: device is {device!r} but CUDA is not available")
        torch.cuda.set_device(dev)
    amp = None
    if precision == "bf16" or (precision == "auto" and dev.type == "cuda"):
        amp = torch.bfloat16
    if world == 1:
        return Runtime(dev, amp_dtype=amp)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Runtime(dev, dist.get_rank(), dist.get_world_size(), distributed, dist.group.WORLD, amp)


def shutdown(runtime: Runtime) -> None:
    """Leave the process group (a no-op on one process)."""
    if runtime.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _shard(module: nn.Module) -> nn.Module:
    """``fully_shard`` every transformer block, then the root; 0-d parameters stay replicated.

    FSDP2 cannot shard a 0-d parameter (CLIP's ``logit_scale``): it is left out of the root's
    group (``ignored_params``), which is right for a frozen one. A trained 0-d parameter would then
    get no gradient reduction, so it is refused.
    """
    from torch.distributed.fsdp import fully_shard

    scalars = {p for p in module.parameters() if p.ndim == 0}
    trained = [n for n, p in module.named_parameters() if p.ndim == 0 and p.requires_grad]
    if trained:
        raise ValueError(
            f"wrap: FSDP2 cannot shard the trained 0-d parameter(s) {trained} (fully_shard needs "
            f"at least one dimension); run this method with --distributed ddp"
        )
    for unit in shard_units(module):
        fully_shard(unit)
    fully_shard(module, ignored_params=scalars or None)
    return module


def wrap(
    module: nn.Module, teacher: nn.Module | None, runtime: Runtime
) -> tuple[nn.Module, nn.Module | None]:
    """Move the trained module (and the teacher) to the device and apply the data parallelism.

    Returns:
        ``(trained, teacher)``: the module to call in the loop (DDP wrapper, FSDP2 module or the
        module itself) and the teacher (sharded under FSDP2).
    """
    module = module.to(runtime.device)
    if teacher is not None:
        teacher = teacher.to(runtime.device)
    if runtime.strategy == "ddp":
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids), teacher
    if runtime.strategy == "fsdp":
        return _shard(module), (_shard(teacher) if teacher is not None else None)
    return module, teacher


@contextlib.contextmanager
def no_sync(module: nn.Module, skip: bool) -> Iterator[None]:
    """Skip the gradient all-reduce of a non-final accumulation micro-step (DDP and FSDP2)."""
    if not skip:
        yield
        return
    if isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
        return
    setter = getattr(module, "set_requires_gradient_sync", None)
    if setter is None:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


def autocast(runtime: Runtime) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on the run's device when its precision asks for it, else nothing."""
    if runtime.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(runtime.device.type, dtype=runtime.amp_dtype)
