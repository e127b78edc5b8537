"""robustft.recipes benchmarks: the recipe's loop and evaluation pass vs minimal hand-written loops.

1. A recipe run of ``N`` optimiser steps, ``robustft.recipes.train(build(Context(...)), dataset,
   config, Runtime(cpu), run_dir=None)``, vs a minimal hand-written loop doing the same maths on
   its own copy of the same model, for ``ft``, ``clipood`` and ``lipsum``: the same batches (the
   recipe's seeded data order), the same loss (``F.cross_entropy`` on the head's logits; CLIPood's
   ``losses.margin_metric_softmax`` against the frozen class texts and a Beta moving average
   ``averaging.bma(...).update_`` after every step; Lipsum-FT's cross-entropy plus
   ``losses.energy_gap`` against a frozen teacher and the step's 80 random texts), the same
   optimiser (AdamW, weight decay on the >= 2-d tensors, warm-up + cosine learning rate). Each
   timed call is a whole run on both sides: the optimiser, the average and the ``DataLoader``
   (``num_workers=0``) are created inside both; the method (``build``, the hand side's teacher
   copy) is built once, outside. Before timing, one run of each side from the same initial
   weights must end with bitwise-equal trained weights (and, for CLIPood, the same average): the
   baseline is the recipe's maths, not a cheaper one (a changed weight decay, margin, BMA beta,
   Lipsum weight, seed or text count fails the check). Target: ratio <= 1.05.
2. ``Evaluator.evaluate(dataset)`` (every metric of ``robustft.metrics``, open-set included) vs a
   bare ``for x, y in DataLoader(dataset): model(x)`` forward loop under ``torch.no_grad`` with the
   same replica and batch size. Target: ratio <= 1.05.

Real run: an open_clip ViT CLIP built from a config (image 32, patch 8, visual width 128,
4 layers, 2 heads; text width 64, 2 layers, context 16; embed dim 64; random init, CPU), 10
classes, batch 32, N = 10 steps (one epoch of 320 images), learning rate 1e-3 (large enough that
the equality check sees every term; the cost does not depend on it); evaluation over 512 images
(10% of an unknown class) at batch 128. 21 interleaved pairs, each side the fastest of 2
back-to-back calls::

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q benchmarks/bench_recipes.py --benchmark-only

Measured on a shared 2-core VM, one thread (runs at load 1-6): ft 0.99-1.02, clipood 1.01-1.04,
lipsum 1.00-1.01, evaluate 1.02-1.03. A step takes 35-85 ms, depending on the load. The recipe's
bookkeeping costs about 0.5 ms per step: the sampler, the per-sample seeding, the trainable-tree
lookups and the final export. That is the ft ratio of 1.02 read from 20 quiet pairs. One run
with 15 pairs under load read ft 1.06 and clipood 1.05, so the file uses 21 pairs. The
evaluation's ~3% is ``metrics.Evaluation.update``/``compute`` and the index wrapper. The model is
tiny, so the forward pass over 512 images takes only ~140 ms.

Before the loop seeded each sample with ``torch.default_generator`` instead of
``torch.manual_seed``, the training ratios were 1.15-1.2. ``torch.manual_seed`` also queues a
seed, with a stack trace, for every accelerator backend: ~0.17 ms per sample.

Smoke run (``--benchmark-disable``): batch 8, N = 2 steps, 64 evaluation images; the
same-weights check runs in both modes.

CPU runs use ``ROBUSTFT_BENCH_THREADS`` intra-op threads (default 1; see benchmarks/conftest.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from robustft import averaging, clip, losses
from robustft.recipes import (
    Context,
    Evaluator,
    RunConfig,
    Runtime,
    build,
    lr_factor,
    resolve,
    train,
)
from robustft.recipes._loop import _mix

CPU = torch.device("cpu")
CLASSES = 10
CONTEXT = 16


class Size(NamedTuple):
    batch: int
    steps: int
    eval_images: int
    eval_batch: int


def size(request: pytest.FixtureRequest) -> Size:
    if request.config.getoption("benchmark_disable", False):
        return Size(batch=8, steps=2, eval_images=64, eval_batch=32)
    return Size(batch=32, steps=10, eval_images=512, eval_batch=128)


def tiny_clip() -> nn.Module:
    """The benchmark's open_clip model (random init, seed 0, fp32, CPU)."""
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=64,
        vision_cfg=open_clip.CLIPVisionCfg(
            image_size=32, patch_size=8, width=128, layers=4, head_width=64
        ),
        text_cfg=open_clip.CLIPTextCfg(
            context_length=CONTEXT, vocab_size=49408, width=64, heads=2, layers=2
        ),
    ).eval()


def images(n: int, seed: int, *, unknown: float = 0.0) -> TensorDataset:
    """``n`` random 32x32 RGB images with labels in ``[0, CLASSES)`` (a fraction ``-1``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    y[: int(unknown * n)] = -1
    return TensorDataset(x, y)


def run_config(method: str, s: Size) -> RunConfig:
    return resolve(
        {
            "steps": s.steps,
            "batch_size": s.batch,
            "lr": 1e-3,  # large enough that a short run moves every weight well past rounding
            "workers": 0,
            "progress": False,
            "log_every": s.steps,
            "save_every": 0,
            "precision": "fp32",
            "device": "cpu",
        },
        method=method,
    )


def recipe_order(n: int, seed: int, steps: int, batch: int) -> list[int]:
    """The dataset indices of the recipe's first ``steps`` batches (its ``StepSampler`` order)."""
    per_epoch = n // batch
    order: list[int] = []
    for epoch in range(-(-steps // per_epoch)):
        g = torch.Generator().manual_seed(_mix(seed, epoch))
        order += torch.randperm(n, generator=g)[: per_epoch * batch].tolist()
    return order[: steps * batch]


class HandLoop:
    """A minimal training loop of ``method`` on its own copy of the model (the baseline)."""

    def __init__(
        self,
        method: str,
        model: nn.Module,
        head: Tensor,
        scale: float,
        config: RunConfig,
        tokenizer: Any,
    ):
        self.method, self.config, self.tokenizer = method, config, tokenizer
        self.model: Any = model  # open_clip's CLIP (for encode_text)
        self.visual = cast(nn.Module, model.visual)
        self.scale = scale
        self.text = head.detach().clone()  # CLIPood's frozen class texts
        self.head = nn.Parameter(head.detach().clone(), requires_grad=method != "clipood")
        self.distances = losses.text_distances(self.text)
        self.teacher: nn.Module = copy.deepcopy(self.visual).requires_grad_(False).eval()
        self.average: dict[str, Tensor] | None = None  # CLIPood's BMA after the last run

    def params(self) -> dict[str, Tensor]:
        tree: dict[str, Tensor] = {f"visual.{n}": p for n, p in self.visual.named_parameters()}
        if self.head.requires_grad:
            tree["head"] = self.head
        return tree

    def __call__(self, dataset: TensorDataset) -> None:
        c, method = self.config, self.method
        visual, head, scale = self.visual, self.head, self.scale
        lr, steps = c.lr or 0.0, c.steps or 1
        tree = self.params()
        decay = [p for p in tree.values() if p.ndim >= 2]
        rest = [p for p in tree.values() if p.ndim < 2]
        groups: list[dict[str, Any]] = [
            {"params": decay, "weight_decay": c.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=lr)
        avg = averaging.bma(steps, beta=c.bma_beta) if method == "clipood" else None
        state = avg.init(tree) if avg is not None else None
        order = recipe_order(len(dataset), c.seed, steps, c.batch_size or 1)
        loader = DataLoader(dataset, batch_size=c.batch_size, sampler=order)
        visual.train()
        for step, (x, y) in enumerate(loader):
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(step, steps, c.warmup or 0.0, c.schedule)
            f = F.normalize(visual(x), dim=-1)
            if method == "clipood":
                loss = losses.margin_metric_softmax(
                    f,
                    self.text,
                    y,
                    margin=c.margin,
                    logit_scale=scale,
                    text_distances=self.distances,
                )
            else:
                loss = F.cross_entropy(scale * f @ head.T, y)
            if method == "lipsum":
                with torch.no_grad():
                    f0 = F.normalize(self.teacher(x), dim=-1)
                    g = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
                    tokens = clip.random_text_tokens(
                        c.lipsum_texts,
                        length=c.lipsum_length,
                        context_length=CONTEXT,
                        generator=g,
                        tokenizer=self.tokenizer,
                    )
                    texts = F.normalize(self.model.encode_text(tokens), dim=-1)
                gap = losses.energy_gap(
                    f, reference_features=f0, text_features=texts, logit_scale=scale
                )
                loss = loss + (c.reg_weight or 0.0) * ((100.0 / scale) ** 2 * gap)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if avg is not None and state is not None:
                state = avg.update_(state, tree)
        visual.eval()
        self.average = dict(state.average) if state is not None else None


def start(method: str, s: Size) -> tuple[Callable[[], Any], Callable[[], Any], Callable[[], None]]:
    """``(recipe run, hand run, check)``: two copies of one model; ``check`` runs each once from
    the same weights and asserts the same trained weights."""
    model = tiny_clip()
    tokenizer = open_clip.SimpleTokenizer(context_length=CONTEXT)
    scale = float(clip.logit_scale(model).detach())
    head = F.normalize(torch.randn(CLASSES, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    config = run_config(method, s)
    dataset = images(s.batch * s.steps, seed=2)
    hand = HandLoop(method, copy.deepcopy(model), head, scale, config, tokenizer)
    initial = {n: p.detach().clone() for n, p in hand.params().items()}
    ctx = Context(
        model,
        tokenizer,
        [f"class {i}" for i in range(CLASSES)],
        ["a photo of a {}."],
        head,
        scale,
        config,
    )
    recipe = build(ctx)
    runtime = Runtime(CPU)

    def recipe_run() -> Any:
        return train(recipe, dataset, config, runtime, run_dir=None, log=lambda _: None)

    def hand_run() -> None:
        hand(dataset)

    def check() -> None:
        result = recipe_run()
        hand_run()
        mine = hand.params()
        assert mine.keys() <= result.last.keys()
        pairs = [(result.last, mine, "")]
        if hand.average is not None:
            assert result.averaged is not None
            pairs.append((result.averaged, hand.average, " (average)"))
        for recipe_tree, hand_tree, what in pairs:
            for name, value in hand_tree.items():
                # the same operations in the same order: bitwise equal
                assert torch.equal(recipe_tree[name], value.detach()), (
                    f"{method}: {name}{what} differs"
                )
        moved = max(float((mine[n].detach() - p).abs().max()) for n, p in initial.items())
        assert moved > 0.0  # the runs trained (the check compares trained weights, not the init)

    return recipe_run, hand_run, check


@pytest.mark.parametrize("method", ["ft", "clipood", "lipsum"])
def test_recipe_step_vs_hand_loop(
    compare: Any, request: pytest.FixtureRequest, method: str
) -> None:
    s = size(request)
    recipe_run, hand_run, check = start(method, s)
    check()
    compare(
        f"recipes.train {method} ({s.steps} steps, batch {s.batch})",
        recipe_run,
        f"hand-written loop ({method})",
        hand_run,
        target=1.05,
        rounds=21,
        warmup=2,
        repeat=2,
    )


def test_evaluate_vs_bare_forward_loop(compare: Any, request: pytest.FixtureRequest) -> None:
    s = size(request)
    model = tiny_clip()
    scale = float(clip.logit_scale(model).detach())
    head = F.normalize(torch.randn(CLASSES, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    visual = cast(nn.Module, model.visual)
    evaluator = Evaluator(visual, scale, Runtime(CPU), batch_size=s.eval_batch, workers=0)
    evaluator.load({**{f"visual.{n}": p for n, p in visual.named_parameters()}, "head": head})
    dataset = images(s.eval_images, seed=3, unknown=0.1)
    replica = evaluator.replica

    def bare() -> Tensor:
        zs = []
        with torch.no_grad():
            for x, _ in DataLoader(dataset, batch_size=s.eval_batch):
                zs.append(replica(x)[1])
        return torch.cat(zs)

    result = evaluator.evaluate(dataset)
    z = bare()
    known = dataset.tensors[1] >= 0
    accuracy = float((z[known].argmax(-1) == dataset.tensors[1][known]).float().mean())
    assert result["accuracy"] == pytest.approx(accuracy)  # the same forward pass
    assert result["num_unknown"] == int((~known).sum()) > 0
    compare(
        f"Evaluator.evaluate ({s.eval_images} images, batch {s.eval_batch})",
        lambda: evaluator.evaluate(dataset),
        "bare forward loop, same DataLoader",
        bare,
        target=1.05,
        rounds=21,
        warmup=2,
        repeat=2,
    )
