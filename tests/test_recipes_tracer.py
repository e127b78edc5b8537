"""The ``tracer`` recipe: FLYP's loss plus TRACER's four distillation views against the
trajectory's Beta(½, ½) average, which is the loop's own ``--average bma`` state.

Checked: one step's loss equals a hand computation from the public losses with the teacher run
under the average; the teacher is really the average (a different average changes the loss);
two DDP ranks equal one process (the views use the global batch); an interrupted and resumed
run equals an uninterrupted one (the teacher is checkpointed with the average); FSDP2 and a
non-BMA average are refused.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist import run_distributed
from test_recipes_distributed import _close, _run, _setup

from robustft import losses
from robustft.recipes import build, resolve
from robustft.recipes._methods import TRACER_VIEWS, trained_tree


def _batch(ctx: Any, n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    images = torch.randn(n, 3, 32, 32, generator=g)
    labels = torch.arange(n) % len(ctx.classnames)
    return images, labels, torch.arange(n)


def test_one_step_equals_the_hand_computation() -> None:
    config, ctx, _ = _setup("tracer", cross_norm=0.05, reg_weight=0.9)
    method = build(ctx)
    net = method.module
    # a teacher that differs from the student: the student's weights, perturbed
    g = torch.Generator().manual_seed(0)
    average = {
        k: (v.detach() + 0.05 * torch.randn(v.shape, generator=g)).requires_grad_(False)
        for k, v in trained_tree(net).items()
    }
    assert method.on_average is not None
    method.on_average(average)
    batch = _batch(ctx)
    step = 3
    got = method.loss(net, batch, step)
    # by hand: the same captions, the student and the teacher (module under the average)
    images, labels, indices = batch
    templates = [lambda c: f"a photo of a {c}."]
    captions = torch.stack([ctx.tokenizer([t(c) for c in ctx.classnames]) for t in templates])
    which = (indices * 2654435761 + step * 40503 + config.seed) % len(templates)
    tokens = captions[which, labels]
    f, t, s = net(images, tokens)
    teacher = copy.deepcopy(net)
    teacher.load_state_dict(average, strict=False)
    with torch.no_grad():
        f0, t0, s0 = teacher(images, tokens)
    model = net.model
    want = losses.clip_contrastive(f, t, logit_scale=s) + 0.05 * torch.linalg.matrix_norm(
        model.visual.proj @ model.text_projection.T
    )
    kw = {"teacher_image_features": f0, "teacher_text_features": t0}
    w = TRACER_VIEWS
    views = (
        w["crd"] * losses.contrastive_relational_distillation(
            f, t, **kw, logit_scale=s, teacher_logit_scale=s0
        )
        + w["fd"] / f.shape[-1] * (
            losses.feature_distillation(f, reference_features=f0)
            + losses.feature_distillation(t, reference_features=t0)
        )
        + w["icl"] * losses.interaction_distillation(f, t, **kw, logit_scale=s)
        + w["cross"] * losses.cross_distillation(f, t, **kw, logit_scale=s, teacher_logit_scale=s0)
    )  # fmt: skip
    want = want + 0.9 * views
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(views.detach()) > 1e-4  # the views see the difference between student and teacher
    # the teacher is the average given: with the student itself as the average, CRD, FD and
    # Cross KD vanish and ICL is CLIP's loss (student images against its own texts)
    method.on_average({k: v.detach().clone() for k, v in trained_tree(net).items()})
    same = method.loss(net, batch, step)
    icl = losses.clip_contrastive(f, t, logit_scale=s)
    torch.testing.assert_close(
        same, want - 0.9 * views + 0.9 * w["icl"] * icl, rtol=1e-5, atol=1e-5
    )


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    return _run(0, 1, "tracer", "single")


def _ddp(rank: int, world: int) -> Any:
    return _run(rank, world, "tracer", "ddp")


def test_two_ddp_ranks_equal_one_process(single: dict[str, Any]) -> None:
    assert "average" in single
    ranks = run_distributed(_ddp, world_size=2, timeout=240)
    _close(ranks[0], single)
    _close(ranks[1], single)


def test_interrupted_and_resumed_equals_uninterrupted(
    single: dict[str, Any], tmp_path: Path
) -> None:
    """The teacher is the loop's BMA state, checkpointed with the run: resuming restores it."""
    assert _run(0, 1, "tracer", "single", run_dir=str(tmp_path), interrupt_at=3) == {}
    assert (tmp_path / "checkpoint.pt").is_file()
    resumed = _run(0, 1, "tracer", "single", run_dir=str(tmp_path), resume=True)
    _close(resumed, single)


def test_refusals() -> None:
    with pytest.raises(ValueError, match=r"tracer's teacher is the trajectory's Beta average"):
        resolve({"method": "tracer", "average": "ema"})
    with pytest.raises(ValueError, match=r"--cross-norm .* is TRACER's projection penalty"):
        resolve({"method": "ft", "cross_norm": 0.1})
    config = resolve({"method": "tracer"})
    assert (config.average, config.bma_beta, config.reg_weight, config.cross_norm) == (
        "bma", 0.5, 0.9, 0.05,
    )  # fmt: skip
    _, ctx, dataset = _setup("tracer")
    from robustft.recipes import Runtime, train

    runtime = Runtime(torch.device("cpu"), 0, 2, "fsdp", None)
    with pytest.raises(ValueError, match=r"method 'tracer' cannot run under FSDP2"):
        train(build(ctx), dataset, ctx.config, runtime, run_dir=None)
