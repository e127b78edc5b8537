"""The recipes under data parallelism: two gloo ranks (DDP and FSDP2) equal one process.

Every body runs the real loop (:func:`robustft.recipes.train`) with the same global batch as a
one-process run and compares the trained classifier. A mutation that drops the gradient
synchronisation (the module is not wrapped) must make the comparison fail, so the equality is
evidence of the synchronisation and not of something weaker. FSDP2 runs also check the sharded
checkpoint (``torch.distributed.checkpoint``): interrupted and resumed equals uninterrupted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from _dist import run_distributed

CLASSES = ["zero", "one", "two", "three", "four"]
N = 24  # training samples; global batch 8: 3 steps per epoch
STEPS = 4


class InterruptedRunError(Exception):
    """Raised inside the loop to emulate a run killed after its step-2 checkpoint."""


def _setup(method: str, **overrides: Any) -> tuple[Any, Any, Any]:
    """Identical model, data and configuration in every process."""
    import open_clip

    from robustft import clip
    from robustft.recipes import Context, resolve

    torch.manual_seed(0)
    vision = open_clip.CLIPVisionCfg(image_size=32, patch_size=8, width=64, layers=2, head_width=32)
    text = open_clip.CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=2)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(N, 3, 32, 32, generator=g)
    labels = torch.arange(N) % len(CLASSES)
    dataset = torch.utils.data.TensorDataset(images, labels)
    values = {
        "workers": 0,
        "progress": False,
        "log_every": 1,
        "save_every": 0,
        "steps": STEPS,
        "batch_size": 8,
        "lipsum_texts": 6,
        # SGD: Adam would turn float noise in exactly-zero gradients (attention key biases)
        # into full-size steps, hiding a real difference below a loose tolerance
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        **overrides,
    }
    config = resolve(values, method=method)
    templates = ["a photo of a {}."]
    with torch.no_grad():
        head = clip.zero_shot_head(model, tokenizer, CLASSES, templates)
    confidence = torch.rand(N, generator=g) * 0.8 + 0.2
    scale = float(clip.logit_scale(model).detach())
    ctx = Context(model, tokenizer, CLASSES, templates, head, scale, config, confidence, None)
    return config, ctx, dataset


def _run(
    rank: int,
    world: int,
    method: str,
    strategy: str,
    mutate: bool = False,
    run_dir: str | None = None,
    interrupt_at: int = 0,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    import torch.distributed as dist

    from robustft.recipes import Runtime, _loop, _runtime, build, train

    config, ctx, dataset = _setup(method, **(overrides or {}))
    group = dist.group.WORLD if world > 1 else None
    ctx = ctx._replace(group=group)
    runtime = Runtime(torch.device("cpu"), rank, world, strategy if world > 1 else "single", group)
    if mutate:  # drop the gradient synchronisation: every rank trains on its own half
        _loop.wrap = lambda module, teacher, rt: (module, teacher)  # type: ignore[assignment]
    validate = None
    if interrupt_at:
        config = config.__class__(
            **{**config.to_json(), "eval_every": interrupt_at, "save_every": 2}
        )

        def validate(tree: Any) -> float:
            raise InterruptedRunError

    elif resume:
        config = config.__class__(**{**config.to_json(), "eval_every": 3, "save_every": 2})

        def validate(tree: Any) -> float:
            return 0.0

    try:
        result = train(
            build(ctx),
            dataset,
            config,
            runtime,
            run_dir=Path(run_dir) if run_dir else None,
            resume=resume,
            validate=validate,
        )
    except InterruptedRunError:
        return {}
    finally:
        _loop.wrap = _runtime.wrap
    # numpy arrays travel between processes by value (tensors would go through shared memory)
    out = {"last": {k: v.detach().cpu().numpy() for k, v in result.last.items()}}
    if result.averaged is not None:
        out["average"] = {k: v.detach().cpu().numpy() for k, v in result.averaged.items()}
    return out


def _close(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> None:
    assert a.keys() == b.keys()
    for which in a:
        for key in a[which]:
            x, y = torch.from_numpy(a[which][key]), torch.from_numpy(b[which][key])
            torch.testing.assert_close(
                x, y, rtol=1e-4, atol=2e-5, msg=lambda m, k=key, w=which: f"{w}/{k}: {m}"
            )


METHODS = ("clipood", "lipsum", "ueo")


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    return {m: _run(0, 1, m, "single") for m in METHODS}


def _each(rank: int, world: int, methods: tuple[str, ...], strategy: str, mutate: bool) -> Any:
    """Several runs in one spawn of the ranks (process start-up and imports are the slow part)."""
    return {m: _run(rank, world, m, strategy, mutate) for m in methods}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(single: dict[str, Any], strategy: str) -> None:
    ranks = run_distributed(_each, world_size=2, args=(METHODS, strategy, False), timeout=300)
    for method in METHODS:
        _close(ranks[0][method], single[method])
        _close(ranks[1][method], single[method])


def test_dropping_gradient_sync_is_detected(single: dict[str, Any]) -> None:
    """The mutation: CLIPood's unwrapped ranks train apart (the equality test catches it); UEO's
    forward goes through robustft.clip, which refuses unsynchronised trained tensors outright."""
    ranks = run_distributed(_each, world_size=2, args=(("clipood",), "ddp", True), timeout=300)
    with pytest.raises(AssertionError):
        _close(ranks[0]["clipood"], single["clipood"])
    with pytest.raises(
        AssertionError,
        match=r"requires grad under a 2-rank process group, but nothing averages its gradient",
    ):
        run_distributed(_each, world_size=2, args=(("ueo",), "ddp", True), timeout=300)


def _kill_and_resume(rank: int, world: int, run_dir: str) -> Any:
    out = {}
    for method in ("clipood", "ueo"):
        folder = f"{run_dir}/{method}"
        killed = _run(rank, world, method, "fsdp", run_dir=folder, interrupt_at=3)
        assert killed == {}
        out[method] = _run(rank, world, method, "fsdp", run_dir=folder, resume=True)
    return out


def test_fsdp2_sharded_checkpoint_resume_equals_uninterrupted(
    single: dict[str, Any], tmp_path: Path
) -> None:
    for method in ("clipood", "ueo"):
        (tmp_path / method).mkdir()
    ranks = run_distributed(_kill_and_resume, world_size=2, args=(str(tmp_path),), timeout=300)
    for method in ("clipood", "ueo"):
        assert (tmp_path / method / "checkpoint.dcp").is_dir()
        _close(ranks[0][method], single[method])


def _ddp_kill_and_resume(rank: int, world: int, run_dir: str) -> Any:
    assert _run(rank, world, "lipsum", "ddp", run_dir=run_dir, interrupt_at=3) == {}
    return _run(rank, world, "lipsum", "ddp", run_dir=run_dir, resume=True)


def test_ddp_checkpoint_resume_equals_uninterrupted(single: dict[str, Any], tmp_path: Path) -> None:
    ranks = run_distributed(_ddp_kill_and_resume, world_size=2, args=(str(tmp_path),), timeout=180)
    assert (tmp_path / "checkpoint.pt").is_file()
    _close(ranks[1], single["lipsum"])


def _evaluate(rank: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    from robustft.recipes import Evaluator, Runtime

    _, ctx, dataset = _setup("ft")
    sub = torch.utils.data.Subset(dataset, list(range(13)))  # 13 = 2 x 3 x 2 + 1: uneven batches
    group = dist.group.WORLD if world > 1 else None
    runtime = Runtime(torch.device("cpu"), rank, world, "ddp" if world > 1 else "single", group)
    evaluator = Evaluator(ctx.model.visual, ctx.scale, runtime, batch_size=3)
    tree = {**{f"visual.{n}": p for n, p in ctx.model.visual.named_parameters()}, "head": ctx.head}
    return evaluator.run(tree, {"set": sub}, threshold=0.2)


def test_distributed_evaluation_equals_one_process() -> None:
    one = _evaluate(0, 1)
    ranks = run_distributed(_evaluate, world_size=2, timeout=120)
    assert one["set"]["num_known"] == 13
    for got in ranks:  # counts and rates exactly; sums of floats (NLL, ECE) to rounding
        assert got["set"].keys() == one["set"].keys()
        for name, value in one["set"].items():
            assert got["set"][name] == (
                value if name in EXACT or value is None else pytest.approx(value, rel=1e-6)
            ), name


EXACT = (
    "accuracy",
    "per_class_accuracy",
    "macro_f1",
    "num_known",
    "num_unknown",
    "threshold",
    "os_star",
    "unk",
    "hos",
    "auroc",
    "fpr95",
)


def test_l2sp_is_refused_under_fsdp2() -> None:
    """L2-SP reads the parameters outside the forward: FSDP2 would hand it shards."""
    from robustft.recipes import Runtime, build, train

    config, ctx, dataset = _setup("l2sp")
    runtime = Runtime(torch.device("cpu"), 0, 1, "fsdp", None)
    with pytest.raises(
        ValueError, match=r"--distributed fsdp: method 'l2sp' cannot run under FSDP2.*ddp"
    ):
        train(build(ctx), dataset, config, runtime)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_sharded_checkpoint_metadata_is_never_unpickled_unsafely(tmp_path: Path) -> None:
    """DCP's metadata file is a pickle: ours admits only an exact list of DCP's own classes (the
    crafted files of every kind are in test_recipes_checkpoint.py)."""
    import pickle

    from robustft.recipes._dcp import _safe_reader
    from robustft.recipes._runfolder import RunError

    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(RunError, match=r"refusing checkpoint metadata .*posix\.system"):
        _safe_reader(tmp_path).read_metadata()
    assert not marker.exists()
