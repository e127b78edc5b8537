"""The one training loop of robustft: recipes and the demo both run it.

Every source of randomness is a pure function of ``(seed, step, position)``: the batch of step
``t`` is a slice of epoch ``t // steps_per_epoch``'s seeded permutation, and each sample's
augmentation runs under a generator seeded from ``(seed, step, position)``. So a run resumed
from a checkpoint at step ``k`` sees exactly the batches, augmentations, random texts and
learning rates of an uninterrupted run, and ``N`` ranks together see exactly the global batch
one process sees (rank ``r`` takes its slice of every global batch).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from robustft import averaging
from robustft.recipes import _checkpoint as ckpt
from robustft.recipes._config import RunConfig
from robustft.recipes._methods import Method, trained_tree
from robustft.recipes._runtime import Runtime, autocast, no_sync, wrap

__all__ = ["Plan", "TrainResult", "lr_factor", "plan", "train"]


class Plan(NamedTuple):
    """The shape of a run: optimiser steps, global batch, micro-batch per rank and accumulation."""

    steps: int
    batch_size: int
    micro_batch: int
    accumulation: int
    steps_per_epoch: int


def plan(config: RunConfig, dataset_size: int, world: int) -> Plan:
    """Resolve steps (from ``steps`` or ``epochs``) and split the global batch over ranks and micro-steps.

    Raises:
        ValueError: if the global batch does not split evenly over ``world * accumulation`` or
            exceeds the dataset.
    """
    fn = "plan"
    batch = config.batch_size or 1
    parts = check_split(fn, batch, world, config.accumulation)
    if batch > dataset_size:
        raise ValueError(
            f"{fn}: batch_size must be at most the training set's {dataset_size} samples, got {batch}"
        )
    per_epoch = dataset_size // batch
    steps = (
        config.steps
        if config.steps is not None
        else max(1, round((config.epochs or 1) * per_epoch))
    )
    return Plan(steps, batch, batch // parts, config.accumulation, per_epoch)


def check_split(fn: str, batch_size: int, world: int, accumulation: int) -> int:
    """The number of parts the global batch splits into (ranks x micro-steps); raises if uneven."""
    parts = world * accumulation
    if batch_size % parts:
        raise ValueError(
            f"{fn}: batch_size must be a multiple of world size x accumulation = {parts}, "
            f"got {batch_size}"
        )
    return parts


def lr_factor(step: int, total: int, warmup: float, schedule: str) -> float:
    r"""The learning-rate multiplier of optimiser step ``step`` (0-based) of ``total``.

    Linear warm-up over the first :math:`w = \lfloor \text{warmup}\cdot T\rfloor` steps
    (:math:`(t+1)/w`), then cosine decay to 0 over the rest
    (:math:`\tfrac12(1+\cos(\pi (t-w)/(T-w)))`) or constant.

    >>> [round(lr_factor(t, 4, 0.5, "cosine"), 3) for t in range(4)]
    [0.5, 1.0, 1.0, 0.5]
    """
    w = int(warmup * total)
    if step < w:
        return (step + 1) / w
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, total - w)))


def _mix(*values: int) -> int:
    """A 63-bit hash of integers (SplitMix64 steps), for per-sample seeds."""
    z = 0x9E3779B97F4A7C15
    for v in values:
        z = (z ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z & 0x7FFFFFFFFFFFFFFF


class StepSampler(Sampler[list[tuple[int, int, int]]]):
    """Yields this rank's micro-batches of ``(index, sample_seed, step)`` from step ``start`` on.

    Step ``t``'s global batch is positions ``[p·B, (p+1)·B)`` of the permutation of epoch
    ``t // steps_per_epoch`` (``p = t % steps_per_epoch``, the permutation seeded by
    ``(seed, epoch)``); micro-step ``a`` of rank ``r`` takes the ``(a·world + r)``-th slice of
    ``micro_batch`` of it.
    """

    def __init__(self, n: int, p: Plan, *, seed: int, rank: int, world: int, start: int):
        self.n, self.p, self.seed, self.start = n, p, seed, start
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return (self.p.steps - self.start) * self.p.accumulation

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        p, epoch, order = self.p, -1, torch.empty(0, dtype=torch.long)
        for step in range(self.start, p.steps):
            if step // p.steps_per_epoch != epoch:
                epoch = step // p.steps_per_epoch
                g = torch.Generator().manual_seed(_mix(self.seed, epoch))
                order = torch.randperm(self.n, generator=g)
            base = (step % p.steps_per_epoch) * p.batch_size
            for a in range(p.accumulation):
                lo = base + (a * self.world + self.rank) * p.micro_batch
                yield [
                    (int(order[lo + j]), _mix(self.seed, step, lo + j), step)
                    for j in range(p.micro_batch)
                ]


class Seeded(Dataset[tuple[Any, int, int]]):
    """A dataset whose item ``(index, seed, step)`` is drawn under a generator seeded by ``seed``.

    Random augmentations (torchvision transforms draw from torch's global generator) then
    depend on the sample's position in the run only, not on the worker that loads it; the
    caller's global generator is left as it was.
    """

    def __init__(self, dataset: Dataset[Any]):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[Any, int, int]:
        index, seed, _ = key
        # the CPU generator only (what augmentations in a loader draw from): torch.manual_seed and
        # fork_rng also visit every accelerator backend, ~50x the cost per sample
        g = torch.default_generator
        state = g.get_state()
        g.manual_seed(seed)
        try:
            image, label = self.dataset[index]
        finally:
            g.set_state(state)
        return image, int(label), index


class TrainResult(NamedTuple):
    """What :func:`train` returns (every rank).

    Attributes:
        last: the exported classifier of the last iterate (full tensors).
        averaged: the exported classifier of the trajectory average, or ``None``.
        best: the exported classifier selected on validation (``select="best"``), or ``None``.
        history: the logged metrics, one dict per log line.
        seconds: wall time of the optimisation.
    """

    last: dict[str, Tensor]
    averaged: dict[str, Tensor] | None
    best: dict[str, Tensor] | None
    history: list[dict[str, float]]
    seconds: float


def make_averager(config: RunConfig, steps: int) -> averaging.Averager | None:
    """The trajectory average of ``config.average`` (``None`` for ``"none"``)."""
    kind = config.average or "none"
    if kind == "ema":
        return averaging.ema(config.ema_decay)
    if kind == "bma":
        return averaging.bma(steps, beta=config.bma_beta)
    if kind == "uniform":
        return averaging.uniform()
    return None


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's rule: no weight decay on gains, biases, norms, embeddings' scale (ndim < 2)."""
    decay: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = (
            p.ndim < 2 or "bias" in name or "logit_scale" in name or ".ln" in name or "bn" in name
        )
        (rest if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(module: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over the module's trainable parameters (``config.lr`` is the peak rate)."""
    groups = _param_groups(module, config.weight_decay or 0.0)
    if not groups:
        raise ValueError(f"make_optimizer: method {config.method!r} has no trainable parameters")
    lr = config.lr or 0.0
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=lr)


class _Swap:
    """Temporarily copy a tree (e.g. the average) into the module's trainable parameters."""

    def __init__(self, module: nn.Module, values: Mapping[str, Tensor]):
        self.params, self.values = trained_tree(module), values
        self.saved: dict[str, Tensor] = {}

    def __enter__(self) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                self.saved[name] = p.detach().clone()
                p.copy_(self.values[name].to(p.dtype))

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.saved[name])


def train(
    method: Method,
    dataset: Dataset[Any],
    config: RunConfig,
    runtime: Runtime,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    validate: Callable[[Mapping[str, Tensor]], float] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Optimise ``method`` on ``dataset`` as ``config`` says; checkpoint, log, average, select.

    Args:
        method: the built method (its module is wrapped here for the runtime).
        dataset: map-style dataset of ``(image, label)`` (an ImageFolder, a ``TensorDataset``).
        config: the resolved configuration (optimiser, schedule, average, steps, seeds...).
        runtime: where to run (:func:`robustft.recipes._runtime.init`).
        run_dir: the run folder for ``metrics.jsonl`` and checkpoints (``None``: in memory only).
        resume: continue from the checkpoint in ``run_dir``.
        validate: ``(classifier tree) -> validation accuracy``, called every ``eval_every`` steps
            on the reported weights (the average if any), for ``select="best"`` and the log.
        log: where progress lines go (rank 0).

    Returns:
        A :class:`TrainResult`.
    """
    if runtime.strategy == "fsdp" and method.ddp_only is not None:
        raise ValueError(
            f"train: method {config.method!r} cannot run under FSDP2 ({method.ddp_only}); use "
            f"--distributed ddp"
        )
    n = len(dataset)  # type: ignore[arg-type]
    p = plan(config, n, runtime.world)
    net, teacher = wrap(method.module, method.teacher, runtime)
    method = method._replace(module=net, teacher=teacher)
    optimizer = make_optimizer(net, config)
    base_lrs = [config.lr or 0.0 for _ in optimizer.param_groups]
    averager = make_averager(config, p.steps)
    # the same Parameter objects every step (FSDP2 re-registers its sharded ones after each
    # backward): looked up once, not per step (~0.3 ms of module walking)
    trained = trained_tree(net)
    state = averager.init(trained) if averager is not None else None
    start, best_score = 0, -math.inf
    best: dict[str, Tensor] | None = None
    history: list[dict[str, float]] = []
    if resume and run_dir is not None:
        loaded = ckpt.load(run_dir, net, optimizer, state, runtime)
        start, best_score = loaded.step, loaded.best_score
        if config.select == "best" and (run_dir / "best.safetensors").exists():
            best = ckpt.load_tree(run_dir / "best.safetensors")
        history = ckpt.trim_metrics(run_dir, start) if runtime.main else []
    sampler = StepSampler(
        n, p, seed=config.seed, rank=runtime.rank, world=runtime.world, start=start
    )
    workers = config.workers
    loader = DataLoader(
        Seeded(dataset),
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=runtime.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    bar = None
    if runtime.main and config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=p.steps, initial=start, desc=config.method, dynamic_ncols=True)

    def record(line: dict[str, float]) -> None:
        """A line of the history, appended to ``metrics.jsonl`` on rank 0."""
        history.append(line)
        if runtime.main and run_dir is not None:
            with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")

    net.train()
    running = torch.zeros((), device=runtime.device)  # summed step losses since the last line
    logged = start  # the step of the last line (or of the checkpoint resumed from)
    tic = time.perf_counter()
    micro = 0
    step = start
    for images, labels, indices in loader:
        if micro == 0:
            factor = lr_factor(step, p.steps, config.warmup or 0.0, config.schedule)
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr * factor
        batch = (
            images.to(runtime.device, non_blocking=True),
            labels.to(runtime.device, non_blocking=True),
            indices.to(runtime.device, non_blocking=True),
        )
        last_micro = micro == p.accumulation - 1
        with no_sync(net, skip=not last_micro):  # one context over forward and backward
            with autocast(runtime):
                loss = method.loss(net, batch, step)
            (loss / p.accumulation).backward()
        running += loss.detach() / p.accumulation
        micro += 1
        if not last_micro:
            continue
        micro = 0
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(trained.values()), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if averager is not None and state is not None:
            state = averager.update_(state, trained)
        step += 1
        if bar is not None:
            bar.update(1)
        if step % config.log_every == 0 or step == p.steps:
            value = running / (step - logged)  # the mean over the steps since the last line
            logged = step
            if runtime.world > 1:
                torch.distributed.all_reduce(value, group=runtime.group)
                value = value / runtime.world
            line = {
                "step": step,
                "loss": float(value),
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - tic,
            }
            running.zero_()
            record(line)
            if bar is not None:
                bar.set_postfix(loss=f"{line['loss']:.4f}")
        if (
            validate is not None
            and config.eval_every
            and (step % config.eval_every == 0 or step == p.steps)
        ):
            tree = _export(method, state)
            score = validate(tree)
            record({"step": step, "val_accuracy": score})
            if config.select == "best" and score > best_score:
                best_score, best = score, {k: v.detach().cpu().clone() for k, v in tree.items()}
                if runtime.main and run_dir is not None:
                    ckpt.save_tree(run_dir / "best.safetensors", best)
        if (
            run_dir is not None
            and config.save_every
            and step % config.save_every == 0
            and step < p.steps
        ):
            ckpt.save(run_dir, net, optimizer, state, runtime, step=step, best_score=best_score)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - tic
    net.eval()
    last = method.export(net)
    averaged = _export(method, state) if state is not None else None
    if run_dir is not None:
        ckpt.save(run_dir, net, optimizer, state, runtime, step=step, best_score=best_score)
    return TrainResult(last, averaged, best, history, seconds)


def _export(method: Method, state: Any) -> dict[str, Tensor]:
    """The exported classifier of the reported weights: the average if there is one."""
    net = method.module
    was_training = net.training
    net.eval()
    try:
        if state is None:
            return method.export(net)
        with _Swap(net, state.average):
            return method.export(net)
    finally:
        net.train(was_training)
