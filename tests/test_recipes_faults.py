"""Faults of a run: one rank failing or stopping, interrupts, non-finite losses, empty shards.

- One rank's failure ends every rank within seconds with the error printed once
  (:func:`robustft.recipes._runtime.failfast`); a stopped rank ends the job after the collective
  timeout. Real processes (:func:`_dist.launch`) on two gloo ranks, as torchrun starts them.
- SIGINT and SIGTERM stop :func:`robustft.recipes.train` at a step boundary on every rank, save
  the checkpoint and raise :class:`~robustft.recipes._stopping.Interrupted`; resuming from it
  gives the uninterrupted run's weights. In this process (the loss raises the signal) and in real
  processes (the test sends it, to one rank or to every rank's process group).
- A non-finite loss stops the run at that step (naming the last good checkpoint) or, with
  ``nonfinite="skip"``, drops the step's update; every rank agrees.
- The evaluator with fewer samples than ranks equals one process.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

sys.path.insert(0, os.path.dirname(__file__))

from _dist import Ended, finish, launch, run_distributed

CLASSES = ["zero", "one", "two", "three", "four"]
N = 24  # training samples; global batch 8: 3 steps per epoch
STEPS = 6
TESTS = Path(__file__).resolve().parent
BAD = "cannot identify image file 'digits/one/0007.png'"


# --- the tiny run ------------------------------------------------------------------------------


def _setup(method: str = "ft", **overrides: Any) -> tuple[Any, Any, TensorDataset]:
    """A fresh tiny CLIP, its fine-tuning configuration and data (the same in every process)."""
    import open_clip

    from robustft import clip
    from robustft.recipes import Context, resolve

    torch.manual_seed(0)
    vision = open_clip.CLIPVisionCfg(image_size=32, patch_size=8, width=64, layers=2, head_width=32)
    text = open_clip.CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=2)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    g = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(N, 3, 32, 32, generator=g), torch.arange(N) % len(CLASSES))
    values = {
        "workers": 0,
        "progress": False,
        "log_every": 1,
        "save_every": 0,
        "steps": STEPS,
        "batch_size": 8,
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,  # the resumed optimiser state matters
        "precision": "fp32",
        "device": "cpu",
        **overrides,
    }
    config = resolve(values, method=method)
    templates = ["a photo of a {}."]
    with torch.no_grad():
        head = clip.zero_shot_head(model, tokenizer, CLASSES, templates)
    scale = float(clip.logit_scale(model).detach())
    ctx = Context(model, tokenizer, CLASSES, templates, head, scale, config)
    return config, ctx, dataset


Hook = Callable[[int, Tensor], Tensor]  # (step, loss) -> loss, inside the method's loss


def _run(
    hook: Hook | None = None,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    validate: Callable[[Any], float] | None = None,
    runtime: Any = None,
    method: str = "ft",
    **overrides: Any,
) -> Any:
    """``train`` of the tiny run in this process (``hook`` may change or interrupt each loss)."""
    from robustft.recipes import Runtime, build, train

    config, ctx, dataset = _setup(method, **overrides)
    built = build(ctx)
    if hook is not None:
        base = built.loss

        def loss(net: Any, batch: Any, step: int) -> Tensor:
            return hook(step, base(net, batch, step))

        built = built._replace(loss=loss)
    runtime = runtime or Runtime(torch.device("cpu"))
    return train(
        built,
        dataset,
        config,
        runtime,
        run_dir=run_dir,
        resume=resume,
        validate=validate,
        log=lambda _: None,
    )


@pytest.fixture(scope="module")
def reference() -> dict[str, Tensor]:
    """The uninterrupted run's trained classifier."""
    return dict(_run().last)


def _assert_same(got: dict[str, Tensor], want: dict[str, Tensor], *, tol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=tol, atol=tol, msg=name)


def _strict_json(path: Path) -> list[dict[str, Any]]:
    """Every line of a metrics.jsonl, refusing NaN and infinities (which are not JSON)."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"{path} holds {name}")

    text = path.read_text(encoding="utf-8")
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines() if line]


def _nan_from(k: int, until: int | None = None) -> Hook:
    """A loss that is NaN at steps ``k`` (0-based, the loop's index) to ``until`` (excluded)."""

    def hook(step: int, loss: Tensor) -> Tensor:
        if step >= k and (until is None or step < until):
            return loss * math.nan
        return loss

    return hook


# --- non-finite losses (one process) -----------------------------------------------------------


def test_nonfinite_loss_stops_at_its_step_naming_the_last_good_checkpoint(tmp_path: Path) -> None:
    from robustft.recipes._runfolder import RunError
    from robustft.recipes._stopping import NonFiniteLoss

    with pytest.raises(NonFiniteLoss) as caught:
        _run(_nan_from(2), run_dir=tmp_path, save_every=1)  # the third step's loss is NaN
    err = caught.value
    assert isinstance(err, RunError)  # the command prints it as one line, status 1
    assert (err.step, err.checkpoint, err.checkpoint_step) == (3, tmp_path / "checkpoint.pt", 2)
    message = str(err)
    assert "\n" not in message
    assert message.startswith("non-finite loss (nan) at step 3; the last good checkpoint is ")
    assert f"{tmp_path / 'checkpoint.pt'} (step 2)" in message
    for flag in ("--lr", "--grad-clip", "--nonfinite skip"):
        assert flag in message
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert int(saved["loop"]["step"]) == 2
    assert all(torch.isfinite(v).all() for v in saved["module"].values())
    lines = _strict_json(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2]  # nothing of the NaN step was logged


def test_nonfinite_loss_without_a_checkpoint_says_so() -> None:
    from robustft.recipes._stopping import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss \(inf\) at step 1; no checkpoint"):
        _run(lambda step, loss: loss + math.inf)


def test_nonfinite_gradient_with_a_finite_loss(tmp_path: Path) -> None:
    """A finite loss whose gradient is NaN: caught by the gradient norm when clipping; otherwise
    the weights turn NaN, which no checkpoint or result ever holds."""
    from robustft.recipes._stopping import NonFiniteLoss

    def nan_gradient(step: int, loss: Tensor) -> Tensor:
        if step != 1:
            return loss
        # the value is the loss; the gradient of the other branch (sqrt at -loss) is NaN
        return torch.where(torch.tensor(True), loss, torch.sqrt(-loss.abs() - 1.0))

    with pytest.raises(NonFiniteLoss, match=r"^non-finite gradient norm \(nan\) at step 2;"):
        _run(nan_gradient, grad_clip=1.0)
    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss \(nan\) at step 3;"):
        _run(nan_gradient)  # the second step's update made the weights NaN
    with pytest.raises(NonFiniteLoss) as caught:
        _run(nan_gradient, run_dir=tmp_path, save_every=1)  # refused before the step-2 save
    assert str(caught.value).startswith("non-finite weights (")
    assert f"at step 2; the last good checkpoint is {tmp_path / 'checkpoint.pt'} (step 1)" in str(
        caught.value
    )
    assert int(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["loop"]["step"]) == 1
    with pytest.raises(NonFiniteLoss, match=r"^non-finite weights .* at step 6;"):
        _run(nan_gradient, nonfinite="skip")  # every later step skipped; NaN never returned


def test_skip_drops_the_update_and_keeps_the_schedule(tmp_path: Path) -> None:
    """``skip`` on a NaN step equals a run whose step has a zero gradient (plain SGD: no update),
    then the same learning rates; the skipped step is counted and logged."""

    def zero_at_2(step: int, loss: Tensor) -> Tensor:
        return loss * 0.0 if step == 2 else loss

    plain: dict[str, Any] = {"momentum": 0.0, "weight_decay": 0.0, "schedule": "cosine"}
    skipped = _run(_nan_from(2, until=3), run_dir=tmp_path, nonfinite="skip", **plain)
    zeroed = _run(zero_at_2, **plain)
    _assert_same(skipped.last, zeroed.last, tol=0.0)
    assert skipped.nonfinite_steps == 1 and zeroed.nonfinite_steps == 0
    lines = _strict_json(tmp_path / "metrics.jsonl")
    assert [line["nonfinite_steps"] for line in lines] == [0, 0, 1, 1, 1, 1]
    assert lines[2]["loss"] is None  # the NaN step's line has no finite loss to average
    assert [line["lr"] for line in lines] == [line["lr"] for line in zeroed.history]


def test_skip_every_step_leaves_weights_and_average_untouched() -> None:
    from robustft.recipes import build

    _, ctx, _ = _setup()
    method = build(ctx)
    before = method.export(method.module)
    result = _run(_nan_from(0), nonfinite="skip", average="ema", weight_decay=0.1)
    assert result.nonfinite_steps == STEPS
    assert all(line["loss"] is None for line in result.history)
    assert result.averaged is not None
    _assert_same(result.last, before, tol=0.0)  # no optimiser step at all: not even decay
    _assert_same(result.averaged, before, tol=0.0)


# --- interrupts in this process ----------------------------------------------------------------


def _raise_at(k: int, *signums: int) -> Hook:
    def hook(step: int, loss: Tensor) -> Tensor:
        if step == k:
            for signum in signums:
                signal.raise_signal(signum)
        return loss

    return hook


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_at_the_step_boundary_and_resumes_exactly(
    tmp_path: Path, reference: dict[str, Tensor], signum: int
) -> None:
    from robustft.recipes._stopping import Interrupted

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Interrupted) as caught:
        _run(_raise_at(2, signum), run_dir=tmp_path)  # during the third step
    stop = caught.value
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # restored
    assert not isinstance(stop, Exception)  # an `except Exception` does not swallow it
    assert (stop.signum, stop.step, stop.checkpoint) == (signum, 3, tmp_path / "checkpoint.pt")
    assert stop.exit_status == 128 + signum
    name = signal.Signals(signum).name
    assert str(stop) == f"stopped by {name} at step 3; saved {tmp_path / 'checkpoint.pt'}"
    assert int(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["loop"]["step"]) == 3
    resumed = _run(run_dir=tmp_path, resume=True)
    _assert_same(resumed.last, reference, tol=0.0)


def test_a_signal_during_the_last_validation_still_stops(tmp_path: Path) -> None:
    """After the last step's agreement: the run is complete, its checkpoint saved, and it stops."""
    from robustft.recipes._stopping import Interrupted

    def validate(tree: Any) -> float:
        signal.raise_signal(signal.SIGTERM)
        return 0.0

    with pytest.raises(Interrupted) as caught:
        _run(run_dir=tmp_path, validate=validate, eval_every=STEPS)
    assert caught.value.step == STEPS
    assert int(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["loop"]["step"]) == STEPS


def test_a_second_ctrl_c_aborts_at_once() -> None:
    handler = signal.getsignal(signal.SIGINT)
    seen: list[int] = []

    def hook(step: int, loss: Tensor) -> Tensor:
        seen.append(step)
        if step == 1:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # the previous handler: KeyboardInterrupt
        return loss

    with pytest.raises(KeyboardInterrupt):
        _run(hook)
    assert seen == [0, 1]  # not even the step boundary
    assert signal.getsignal(signal.SIGINT) is handler


def test_no_handlers_outside_the_main_thread() -> None:
    handler = signal.getsignal(signal.SIGINT)
    seen: list[Any] = []
    out: list[Any] = []

    def hook(step: int, loss: Tensor) -> Tensor:
        seen.append(signal.getsignal(signal.SIGINT))
        return loss

    thread = threading.Thread(target=lambda: out.append(_run(hook)))
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive() and len(out) == 1
    assert seen == [handler] * STEPS


def test_interrupted_and_nonfinite_survive_pickling(tmp_path: Path) -> None:
    import pickle

    from robustft.recipes._stopping import Interrupted, NonFiniteLoss

    stop = pickle.loads(pickle.dumps(Interrupted(signal.SIGTERM, 4, tmp_path)))
    assert (stop.signum, stop.step, stop.checkpoint, stop.exit_status) == (15, 4, tmp_path, 143)
    err = NonFiniteLoss(3, tmp_path, checkpoint_step=2, what="loss (nan)")
    again = pickle.loads(pickle.dumps(err))
    assert (again.step, again.checkpoint, again.checkpoint_step, str(again)) == (
        3,
        tmp_path,
        2,
        str(err),
    )


# --- failfast, init, messages (one process) ----------------------------------------------------


def test_failfast_on_one_process_reraises_unchanged() -> None:
    from robustft.recipes._runtime import Runtime, failfast

    runtime = Runtime(torch.device("cpu"))
    with failfast(runtime) as got:
        assert got is runtime
    error = ValueError("--batch-size (batch_size in a config file) must be at most 7")
    with pytest.raises(ValueError) as caught, failfast(runtime):
        raise error
    assert caught.value is error


def test_one_line_and_exit_status() -> None:
    from robustft.recipes._runtime import exit_status, one_line
    from robustft.recipes._stopping import Interrupted, NonFiniteLoss

    worker = ValueError(
        "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        f'last):\n  File "x.py", line 1, in f\n    g()\nPIL.UnidentifiedImageError: {BAD}\n'
    )
    assert one_line(worker) == BAD
    assert one_line(RuntimeError("")) == "RuntimeError"
    assert one_line(ValueError("two\n  lines")) == "two lines"
    assert exit_status(ValueError()) == exit_status(FileNotFoundError()) == 2
    assert exit_status(RuntimeError()) == 1 and exit_status(KeyboardInterrupt()) == 130
    assert exit_status(SystemExit(3)) == 3 and exit_status(SystemExit("bye")) == 1
    assert exit_status(Interrupted(signal.SIGINT, 1, None)) == 130
    assert exit_status(NonFiniteLoss(1, None)) == 1


def test_collective_failures_are_told_from_a_ranks_own_error() -> None:
    import torch.distributed as dist

    from robustft.recipes._runtime import _collective_trouble

    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer"
    timeout = "[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv"
    assert _collective_trouble(RuntimeError(gloo)) == "lost"
    assert _collective_trouble(dist.DistNetworkError("Failed to recv, got 0 bytes")) == "lost"
    assert _collective_trouble(RuntimeError(timeout)) == "timeout"
    wrapped = ValueError("reading the batch failed")
    wrapped.__cause__ = RuntimeError(gloo)
    assert _collective_trouble(wrapped) == "lost"
    assert _collective_trouble(ValueError(BAD)) is None
    assert _collective_trouble(OSError("Connection reset by peer")) is None  # a file system's


@pytest.mark.parametrize("timeout", [0, -1.0, math.inf, math.nan, True, "600"])
def test_init_refuses_a_bad_collective_timeout(timeout: Any) -> None:
    from robustft.recipes._runtime import init

    with pytest.raises(
        ValueError, match=r"^--collective-timeout \(collective_timeout in a config file\) must be a"
    ):
        init(device="cpu", precision="fp32", distributed="ddp", timeout=timeout)


def test_init_records_the_timeout() -> None:
    from robustft.recipes._runtime import init

    runtime = init(device="cpu", precision="fp32", distributed="ddp", timeout=3)
    assert (runtime.world, runtime.timeout) == (1, 3.0)


def test_loop_errors_name_flags() -> None:
    from robustft.recipes import Runtime, plan, resolve

    one_image = resolve({"batch_size": 2, "steps": 1}, method="ueo")
    with pytest.raises(
        ValueError,
        match=r"^--batch-size \(batch_size in a config file\) must be at most the training set's 1 "
        r"samples, got 2",
    ):
        plan(one_image, 1, 2)  # a UEO pool of one image on two ranks: refused, every rank alike
    with pytest.raises(
        ValueError,
        match=r"^--batch-size \(batch_size in a config file\) must be a multiple of the number of "
        r"ranks x "
        r"--accumulation = 4 x 3 = 12, got 6$",
    ):
        plan(resolve({"batch_size": 6, "accumulation": 3, "steps": 1}), 60, 4)
    fsdp = Runtime(torch.device("cpu"), 0, 1, "fsdp", None)
    with pytest.raises(ValueError, match=r"^--distributed fsdp: method 'l2sp' cannot run under"):
        _run(runtime=fsdp, method="l2sp")


# --- the evaluator with empty shards -----------------------------------------------------------


def _evaluator(runtime: Any, workers: int = 0) -> tuple[Any, dict[str, Tensor], TensorDataset]:
    from robustft.recipes import Evaluator

    _, ctx, dataset = _setup()
    evaluator = Evaluator(ctx.model.visual, ctx.scale, runtime, batch_size=2, workers=workers)
    tree = {**{f"visual.{n}": p for n, p in ctx.model.visual.named_parameters()}, "head": ctx.head}
    evaluator.load(tree)
    return evaluator, tree, dataset


def test_evaluator_passes_over_an_empty_set() -> None:
    from robustft.recipes import Runtime

    evaluator, tree, dataset = _evaluator(Runtime(torch.device("cpu")))
    logits, labels = evaluator.logits_and_labels(Subset(dataset, []))
    features, _ = evaluator.features_and_labels(Subset(dataset, []))
    assert logits.shape == (0, len(CLASSES)) and labels.shape == (0,)
    assert features.shape == (0, tree["head"].shape[1]) and labels.dtype == torch.long
    with pytest.raises(ValueError, match=r"^Evaluator.evaluate: the set must hold at least one"):
        evaluator.evaluate(Subset(dataset, []))


def _empty_shards(rank: int, world: int) -> Any:
    """Sets of 1 and 3 samples on two ranks (rank 1 holds nothing of the first), and the NaN of
    one rank stopping both."""
    import torch.distributed as dist

    from robustft.recipes import Runtime
    from robustft.recipes._stopping import NonFiniteLoss

    group = dist.group.WORLD if world > 1 else None
    runtime = Runtime(torch.device("cpu"), rank, world, "ddp" if world > 1 else "single", group)
    evaluator, _, dataset = _evaluator(runtime)
    labels = dataset.tensors[1].clone()
    labels[1] = -1  # an unknown sample: AUROC and the open-set metrics are defined
    data = TensorDataset(dataset.tensors[0], labels)
    out: dict[Any, Any] = {
        n: evaluator.evaluate(Subset(data, list(range(n))), threshold=0.2) for n in (1, 3)
    }
    local, _ = evaluator.logits_and_labels(Subset(dataset, list(range(rank, 1, world))))
    out["local"] = local.shape[0]
    try:  # rank 1's loss alone is NaN at step 2: every rank stops there
        _run(_nan_from(2) if rank == 1 else None, runtime=runtime)
    except NonFiniteLoss as err:
        out["stop"] = (err.step, str(err))
    return out


@pytest.mark.distributed
def test_fewer_samples_than_ranks_equals_one_process() -> None:
    one = _empty_shards(0, 1)
    ranks = run_distributed(_empty_shards, world_size=2, timeout=300)
    assert [r["local"] for r in ranks] == [1, 0]
    for got in ranks:
        for n in (1, 3):
            assert got[n].keys() == one[n].keys()
            for name, value in one[n].items():
                assert got[n][name] == (
                    value if value is None else pytest.approx(value, rel=1e-6)
                ), (n, name)
    assert "stop" not in one  # one process: the hook is rank 1's
    assert ranks[0]["stop"][0] == ranks[1]["stop"][0] == 3
    assert "loss (on another rank)" in ranks[0]["stop"][1]  # rank 0's own loss was finite
    assert "loss (nan)" in ranks[1]["stop"][1]


# --- real processes: failures, a stopped rank, signals -----------------------------------------


class _Unreadable(Dataset[tuple[Tensor, int]]):
    """A dataset whose sample 1 cannot be read (rank 1's share on two ranks)."""

    def __init__(self, dataset: TensorDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if index == 1:
            raise ValueError(BAD)
        x, y = self.dataset[index]
        return x, int(y)


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.02)


def _rank_main() -> None:
    """One rank of a launched job (``python -c`` below): the spec is JSON in ``argv[1]``.

    It builds the tiny run, meets the other ranks through files (so slow imports never meet the
    short rendezvous timeout), joins the process group with :func:`init`, and runs ``train`` (or
    an evaluation) inside :func:`failfast`, reporting an interrupt as the command line does.
    """
    from safetensors.torch import save_file

    from robustft.recipes import Evaluator, build, train
    from robustft.recipes._runtime import failfast, init
    from robustft.recipes._stopping import Interrupted

    spec = json.loads(sys.argv[1])
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    folder = Path(spec["folder"])
    torch.set_num_threads(1)
    config, ctx, dataset = _setup(workers=spec.get("workers", 0), steps=spec.get("steps", STEPS))
    method = build(ctx)
    base = method.loss

    def loss(net: Any, batch: Any, step: int) -> Tensor:
        if spec.get("fail_rank") == rank and spec.get("fail_at") == step:
            raise ValueError(BAD)
        if rank in spec.get("hold_ranks", []) and spec.get("hold_at") == step:
            (folder / f"ready-{rank}").touch()  # the test sends its signal, then "go"
            deadline = time.monotonic() + 60
            while not (folder / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return base(net, batch, step)

    method = method._replace(loss=loss)
    (folder / f"up-{rank}").touch()
    for r in range(world):
        _wait_for(folder / f"up-{r}", 300)
    runtime = init(device="cpu", precision="fp32", distributed="ddp", timeout=spec["timeout"])
    try:
        with failfast(runtime):
            if spec.get("evaluate"):
                evaluator = Evaluator(
                    ctx.model.visual, ctx.scale, runtime, batch_size=2, workers=spec["workers"]
                )
                tree = {f"visual.{n}": p for n, p in ctx.model.visual.named_parameters()}
                evaluator.load({**tree, "head": ctx.head})
                evaluator.evaluate(_Unreadable(dataset))
            else:
                run_dir = Path(spec["run_dir"]) if spec.get("run_dir") else None
                result = train(method, dataset, config, runtime, run_dir=run_dir)
                if runtime.main:
                    save_file(result.last, str(folder / "last.safetensors"))
    except Interrupted as stop:  # rank 0 only (failfast ends the others quietly)
        where = f"; saved {stop.checkpoint}" if stop.checkpoint else ""
        name = signal.Signals(stop.signum).name
        print(f"robustft: stopped by {name} at step {stop.step}{where}", file=sys.stderr)
        sys.exit(stop.exit_status)


def _launch(tmp_path: Path, world: int, **spec: Any) -> tuple[list[Any], Path]:
    folder = tmp_path / "job"
    folder.mkdir()
    spec = {"folder": str(folder), "timeout": 120.0, **spec}
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import {__name__} as t; t._rank_main()"
    return launch([sys.executable, "-c", code, json.dumps(spec)], world=world, logs=folder), folder


def _errors(ended: list[Ended]) -> list[str]:
    return [line for e in ended for line in e.stderr.splitlines() if "robustft: error" in line]


@pytest.mark.distributed
def test_one_rank_failing_mid_training_ends_both_at_once(tmp_path: Path) -> None:
    procs, folder = _launch(tmp_path, 2, fail_rank=1, fail_at=2)
    ended = finish(procs, logs=folder, timeout=240)
    assert [e.returncode for e in ended] == [1, 2], [e.stderr for e in ended]
    assert _errors(ended) == [f"robustft: error: [rank 1] {BAD}"]
    # seconds: well below the collective timeout (120), and below the 5 s after which orphaned
    # DataLoader workers holding copies of the dead rank's sockets would notice and exit
    assert ended[0].at - ended[1].at < 4
    assert "Traceback" not in ended[0].stderr + ended[1].stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_rank_0_failing_is_reported_by_it(tmp_path: Path) -> None:
    """Rank 0 hosts the store here (torchrun's agent does under torchrun): once it is gone, the
    other rank cannot know whether its error was printed, and says one short line."""
    procs, folder = _launch(tmp_path, 2, fail_rank=0, fail_at=2)
    ended = finish(procs, logs=folder, timeout=240)
    assert [e.returncode for e in ended] == [2, 1], [e.stderr for e in ended]
    first, second = _errors(ended)
    assert first == f"robustft: error: [rank 0] {BAD}"
    assert second.startswith("robustft: error: [rank 1] another rank stopped (it failed or was")
    assert ended[1].at - ended[0].at < 4


@pytest.mark.distributed
@pytest.mark.slow
def test_one_rank_failing_mid_evaluation_in_a_worker_ends_both(tmp_path: Path) -> None:
    procs, folder = _launch(tmp_path, 2, evaluate=True, workers=1)
    ended = finish(procs, logs=folder, timeout=240)
    assert [e.returncode for e in ended] == [1, 2], [e.stderr for e in ended]
    assert _errors(ended) == [f"robustft: error: [rank 1] {BAD}"]  # the worker's last line
    assert ended[0].at - ended[1].at < 4  # rank 1's worker, which forked its sockets, died too


@pytest.mark.distributed
@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_after_the_collective_timeout(tmp_path: Path) -> None:
    procs, folder = _launch(tmp_path, 2, hold_ranks=[1], hold_at=1, timeout=4.0)
    try:
        _wait_for(folder / "ready-1", 240)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
    finally:
        ended = finish(procs, logs=folder, timeout=240, wait=[0])
    assert ended[0].returncode == 1 and ended[1].returncode is None  # rank 1 was killed after
    assert ended[0].at - stopped < 30
    (line,) = _errors(ended)
    assert line.startswith(
        "robustft: error: [rank 0] a collective operation waited longer than 4 s"
    )
    assert "--collective-timeout" in line


def _signal_job(
    tmp_path: Path, world: int, signum: int, *, every_rank: bool, workers: int
) -> tuple[list[Ended], Path]:
    """A job held at its third step until the test has sent ``signum`` (to every rank's process
    group, as a terminal's Ctrl-C, or to rank ``world - 1`` alone, as a scheduler might)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    target = list(range(world)) if every_rank else [world - 1]
    procs, folder = _launch(
        tmp_path, world, run_dir=str(run_dir), hold_ranks=target, hold_at=2, workers=workers
    )
    try:
        for r in target:
            _wait_for(folder / f"ready-{r}", 240)
            if every_rank:
                os.killpg(procs[r].pid, signum)  # the rank and its DataLoader workers
            else:
                os.kill(procs[r].pid, signum)
        (folder / "go").touch()
    finally:
        ended = finish(procs, logs=folder, timeout=240)
    return ended, run_dir


def _check_stopped(ended: list[Ended], run_dir: Path, signum: int) -> None:
    name = signal.Signals(signum).name
    assert [e.returncode for e in ended] == [128 + signum] * len(ended), [e.stderr for e in ended]
    lines = [line for e in ended for line in e.stderr.splitlines() if line.startswith("robustft")]
    assert lines == [f"robustft: stopped by {name} at step 3; saved {run_dir / 'checkpoint.pt'}"]
    everything = "".join(e.stderr for e in ended)
    assert "Traceback" not in everything and "KeyboardInterrupt" not in everything
    assert int(torch.load(run_dir / "checkpoint.pt", weights_only=True)["loop"]["step"]) == 3


@pytest.mark.parametrize(
    ("signum", "world", "every_rank", "workers"),
    [
        pytest.param(signal.SIGINT, 1, True, 1, id="sigint-one-process"),
        pytest.param(signal.SIGTERM, 2, False, 0, id="sigterm-to-rank-1-of-two"),
        pytest.param(signal.SIGTERM, 1, False, 0, id="sigterm-one-process", marks=pytest.mark.slow),
        pytest.param(signal.SIGINT, 2, True, 1, id="sigint-two-processes", marks=pytest.mark.slow),
    ],
)
@pytest.mark.distributed
def test_signals_stop_every_rank_at_one_step_and_the_run_resumes(
    tmp_path: Path,
    reference: dict[str, Tensor],
    signum: int,
    world: int,
    every_rank: bool,
    workers: int,
) -> None:
    ended, run_dir = _signal_job(tmp_path, world, signum, every_rank=every_rank, workers=workers)
    _check_stopped(ended, run_dir, signum)
    resumed = _run(run_dir=run_dir, resume=True)  # here, on one process
    _assert_same(resumed.last, reference, tol=1e-6 if world == 1 else 2e-5)
