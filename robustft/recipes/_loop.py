"""The one training loop of robustft: recipes and the demo both run it.

Every source of randomness is a pure function of ``(seed, step, position)``: the batch of step
``t`` is a slice of epoch ``t // steps_per_epoch``'s seeded permutation, and each sample's
augmentation runs under a generator seeded from ``(seed, step, position)``. So a run resumed
from a checkpoint at step ``k`` sees exactly the batches, augmentations, random texts and
learning rates of an uninterrupted run, and ``N`` ranks together see exactly the global batch
one process sees (rank ``r`` takes its slice of every global batch).

**Stopping.** At the end of every optimiser step, before the optimiser applies it, the ranks
agree in one small collective (one host synchronisation on one process) on two things:

- *Interrupts.* While :func:`train` runs it handles SIGINT (Ctrl-C) and SIGTERM (what
  schedulers and torchrun's agent send) in the main thread: the handler only records the
  signal. At the next step boundary every rank finishes that step (its update, log line,
  validation and checkpoint when due), saves the checkpoint (with a run folder) and raises
  :class:`Interrupted` -- the same step on every rank, whichever rank got the signal. A second
  signal while stopping aborts at once: the previous handler runs (``KeyboardInterrupt`` for
  SIGINT, the default action -- the end of the process -- for SIGTERM); the checkpoint on disk
  is then the previous one, intact (its writes are atomic). Under torchrun the agent forwards
  a signal to every worker once, then kills them 30 s later: a step and a save must fit in that.
  The previous handlers are restored when :func:`train` returns or raises; in another thread
  no handler is installed. DataLoader workers ignore both signals
  (:func:`robustft.recipes._runtime.quiet_worker`).
- *Non-finite steps.* A loss (or, with ``--grad-clip``, a gradient norm) that is NaN or
  infinite on any rank stops the run at that step by default (``nonfinite="stop"``), before
  its update, raising :class:`NonFiniteLoss`; with ``nonfinite="skip"`` the step's update is
  dropped (no optimiser or average update; the learning-rate schedule still advances) and
  counted (``nonfinite_steps``). Weights are checked before every checkpoint, before
  ``best.safetensors`` and at the end, so non-finite weights are never written or returned.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from robustft import averaging
from robustft.recipes import _checkpoint as ckpt
from robustft.recipes import _peft
from robustft.recipes._config import RunConfig, flag_of
from robustft.recipes._methods import Method, trained_tree
from robustft.recipes._runtime import Runtime, autocast, no_sync, quiet_worker, wrap
from robustft.recipes._stopping import Interrupted, NonFiniteLoss, Stop, agree, finite, local

__all__ = [
    "Plan",
    "TrainResult",
    "lr_factor",
    "plan",
    "train",
]


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
            exceeds the dataset (the message names the flag, ``--batch-size``). Every rank
            raises the same error: it depends only on the arguments.
    """
    batch = config.batch_size or 1
    parts = check_split(None, batch, world, config.accumulation)
    if batch > dataset_size:
        raise ValueError(
            f"{flag_of('batch_size')} must be at most the training set's {dataset_size} "
            f"samples, got {batch} — lower --batch-size or add training images"
        )
    per_epoch = dataset_size // batch
    steps = (
        config.steps
        if config.steps is not None
        else max(1, round((config.epochs or 1) * per_epoch))
    )
    return Plan(steps, batch, batch // parts, config.accumulation, per_epoch)


def check_split(fn: str | None, batch_size: int, world: int, accumulation: int) -> int:
    """The number of parts the global batch splits into (ranks x micro-steps).

    Args:
        fn: a prefix for the message (``None``: the message starts with the flag).
        batch_size: the global batch.
        world: the number of ranks.
        accumulation: micro-steps per optimiser step.

    Returns:
        ``world * accumulation``.

    Raises:
        ValueError: if ``batch_size`` is not a multiple of it (the message names
            ``--batch-size``).
    """
    parts = world * accumulation
    if batch_size % parts:
        where = f"{fn}: " if fn else ""
        raise ValueError(
            f"{where}{flag_of('batch_size')} must be a multiple of the number of ranks x "
            f"--accumulation = {world} x {accumulation} = {parts}, got {batch_size}"
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
        nonfinite_steps: optimiser steps skipped for a non-finite loss (``nonfinite="skip"``);
            after a resume, rank 0 also counts those of the log lines before the checkpoint.
    """

    last: dict[str, Tensor]
    averaged: dict[str, Tensor] | None
    best: dict[str, Tensor] | None
    history: list[dict[str, Any]]
    seconds: float
    nonfinite_steps: int = 0


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
        raise ValueError(f"--method {config.method}: the method has no trainable parameters")
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

    SIGINT and SIGTERM stop the run at the next optimiser-step boundary on every rank, after
    saving the checkpoint (:class:`Interrupted`); a non-finite loss stops it at that step or
    skips the step (``config.nonfinite``; :class:`NonFiniteLoss`). See the module's docstring.

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

    Raises:
        Interrupted: SIGINT or SIGTERM stopped the run (the checkpoint is saved).
        NonFiniteLoss: a non-finite loss with ``nonfinite="stop"``, or non-finite weights.
        ValueError: if the global batch does not split over the ranks, exceeds the dataset, or
            the method cannot run under FSDP2.
    """
    with Stop() as stop:
        return _train(method, dataset, config, runtime, run_dir, resume, validate, log, stop)


def _train(
    method: Method,
    dataset: Dataset[Any],
    config: RunConfig,
    runtime: Runtime,
    run_dir: Path | None,
    resume: bool,
    validate: Callable[[Mapping[str, Tensor]], float] | None,
    log: Callable[[str], None],
    stop: Stop,
) -> TrainResult:
    if runtime.strategy == "fsdp" and method.ddp_only is not None:
        raise ValueError(
            f"--distributed fsdp: method {config.method!r} cannot run under FSDP2 "
            f"({method.ddp_only}); use --distributed ddp"
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
    if method.on_average is not None and state is not None:  # TRACER's teacher
        method.on_average(state.average)
    start, best_score = 0, -math.inf
    best: dict[str, Tensor] | None = None
    history: list[dict[str, Any]] = []
    checkpoint = None
    if run_dir is not None:
        checkpoint = Path(run_dir) / (ckpt.DCP if runtime.strategy == "fsdp" else ckpt.PT)
    saved: int | None = None  # the step of the last checkpoint written (or resumed from)
    if resume and run_dir is not None:
        loaded = ckpt.load(run_dir, net, optimizer, state, runtime)
        start, best_score, saved = loaded.step, loaded.best_score, loaded.step
        if method.on_average is not None and state is not None:
            method.on_average(state.average)
        if config.select == "best" and (run_dir / "best.safetensors").exists():
            best = _peft.load_best(run_dir, config)
        history = ckpt.trim_metrics(run_dir, start) if runtime.main else []
    skip = config.nonfinite == "skip"
    skipped = next(
        (int(h["nonfinite_steps"]) for h in reversed(history) if "nonfinite_steps" in h), 0
    )

    def fail(step: int, what: str) -> NonFiniteLoss:
        return NonFiniteLoss(
            step, checkpoint if saved is not None else None, checkpoint_step=saved, what=what
        )

    def check_weights(step: int) -> None:
        """Refuse non-finite weights (or average) before they are saved or returned."""
        tensors = [local(t) for t in trained.values()]
        if state is not None:
            tensors += [local(t) for t in state.average.values()]
        bad = ~finite(tensors).to(runtime.device)
        if agree(bad, 0, runtime)[0]:
            raise fail(step, "weights (a non-finite gradient with a finite loss?)")

    def save(step: int, folder: Path) -> None:
        nonlocal saved
        check_weights(step)
        ckpt.save(folder, net, optimizer, state, runtime, step=step, best_score=best_score)
        saved = step

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
        worker_init_fn=quiet_worker if workers else None,
    )
    bar = None
    if runtime.main and config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=p.steps, initial=start, desc=config.method, dynamic_ncols=True)

    def record(line: dict[str, Any]) -> None:
        """A line of the history, appended to ``metrics.jsonl`` on rank 0."""
        history.append(line)
        if runtime.main and run_dir is not None:
            with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")

    net.train()
    running = torch.zeros((), device=runtime.device)  # summed step losses since the last line
    logged = start  # the step of the last line (or of the checkpoint resumed from)
    skipped_since = 0  # steps skipped since the last line
    tic = time.perf_counter()
    micro = 0
    step = start
    signum = 0
    step_loss = running
    try:
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
            part = loss.detach() / p.accumulation
            step_loss = part if micro == 0 else step_loss + part
            micro += 1
            if not last_micro:
                continue
            micro = 0
            bad = ~torch.isfinite(step_loss)
            norm = None
            if config.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(list(trained.values()), config.grad_clip)
                full_tensor = getattr(norm, "full_tensor", None)
                norm = full_tensor() if callable(full_tensor) else norm
                bad = bad | ~torch.isfinite(norm)
            nonfinite, signum = agree(bad, stop.signum, runtime)  # one collective per step
            if nonfinite and not skip:
                optimizer.zero_grad(set_to_none=True)
                value = float(step_loss)
                if not math.isfinite(value):
                    what = f"loss ({value})"
                elif norm is not None and not math.isfinite(float(norm)):
                    what = f"gradient norm ({float(norm)})"
                else:
                    what = "loss (on another rank)"
                raise fail(step + 1, what)
            if nonfinite:  # skip: drop the update, keep the schedule
                skipped += 1
                skipped_since += 1
            else:
                optimizer.step()
                if averager is not None and state is not None:
                    state = averager.update_(state, trained)
                    if method.on_average is not None:
                        method.on_average(state.average)
                running += step_loss
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if bar is not None:
                bar.update(1)
            if step % config.log_every == 0 or step == p.steps:
                counted = step - logged - skipped_since  # finite steps since the last line
                logged, skipped_since = step, 0
                mean: float | None = None
                if counted:  # every rank agrees on it
                    value_t = running / counted  # the mean over the steps since the last line
                    if runtime.world > 1:
                        dist.all_reduce(value_t, group=runtime.group)
                        value_t = value_t / runtime.world
                    mean = float(value_t)
                line: dict[str, Any] = {
                    "step": step,
                    "loss": mean,
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - tic,
                }
                if skip:
                    line["nonfinite_steps"] = skipped
                running.zero_()
                record(line)
                if bar is not None and mean is not None:
                    bar.set_postfix(loss=f"{mean:.4f}")
            if (
                validate is not None
                and config.eval_every
                and (step % config.eval_every == 0 or step == p.steps)
            ):
                tree = _export(method, state)
                score = validate(tree)
                record({"step": step, "val_accuracy": score})
                if config.select == "best" and score > best_score:
                    if not bool(finite(list(tree.values()))):  # the same full tree on every rank
                        raise fail(step, "weights (a non-finite gradient with a finite loss?)")
                    best_score, best = score, {k: v.detach().cpu().clone() for k, v in tree.items()}
                    if runtime.main and run_dir is not None:
                        _peft.save_best(run_dir, best, config)
            if (
                run_dir is not None
                and config.save_every
                and step % config.save_every == 0
                and step < p.steps
            ):
                save(step, run_dir)
            if signum:
                break  # every rank: the same step
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - tic
    if run_dir is None:
        check_weights(step)
    elif saved != step:  # the last checkpoint, or the one to resume an interrupted run from
        save(step, run_dir)
    if not signum:  # a signal after the last step's agreement (every rank: the same collective)
        signum = agree(
            torch.zeros((), dtype=torch.bool, device=runtime.device), stop.signum, runtime
        )[1]
    if signum:
        raise Interrupted(signum, step, checkpoint)
    net.eval()
    last = method.export(net)
    averaged = _export(method, state) if state is not None else None
    return TrainResult(last, averaged, best, history, seconds, skipped)


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
