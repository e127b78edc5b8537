"""The training methods, each a short function of the benchmark returning its table rows.

Every method runs :func:`robustft.demo._finetune.fit` for the same number of steps with the same
optimiser and returns ``{row name: theta}``. The supervised ones train the visual tower and the
head (initialised to the zero-shot head) of ``bench.theta0`` on the clean known-class training
images and differ only in the term added to the cross-entropy -- each one a single call of a
:mod:`robustft.losses` function -- or in what they keep of the trajectory (an
:mod:`robustft.averaging` average). FLYP and UEO train through the text tower instead and end
with a head the text tower makes; UEO never sees a label.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from robustft import averaging, clip, losses, tree
from robustft.demo._data import CAPTIONS, CLASSNAMES, KNOWN, TEMPLATES, normalize
from robustft.demo._finetune import Bench, Tree, features, fit, visual, zero_shot_logits

__all__ = ["carft", "clipood", "featkd", "finetune", "flyp", "ft", "kd", "l2sp", "lipsum", "ueo"]

Regulariser = Callable[[Tree, Tensor, Tensor, Tensor], Tensor]
"""``(params, images, features, logits) -> penalty`` added to the cross-entropy."""

L2SP_WEIGHT = 0.1  # λ of ½λΣ‖θ - θ0‖² (the visual tower)
LIPSUM_TEXTS = 80  # M random texts per step (Lipsum-FT), λ = 1 in s² units (SPEC §4)
UEO_PROMPT = "a photo of a"  # the 4 context vectors UEO starts from (SPEC §3)


def finetune(
    bench: Bench,
    regulariser: Regulariser | None = None,
    *,
    seed: int = 0,
    lr: float | None = None,
    averagers: dict[str, averaging.Averager] | None = None,
) -> tuple[Tree, dict[str, Tree]]:
    """Cross-entropy fine-tuning of the visual tower and the head, plus an optional regulariser."""

    def loss(params: Tree, images: Tensor, labels: Tensor) -> Tensor:
        f = features(bench, params, images)
        z = bench.scale * f @ params["head"].T
        ce = F.cross_entropy(z, labels)
        return ce if regulariser is None else ce + regulariser(params, images, f, z)

    data = (bench.data.train_x, bench.data.train_y)
    return fit(bench, bench.theta0, loss, data, seed=seed, lr=lr, averagers=averagers)


def ft(bench: Bench) -> dict[str, Tree]:
    """FT, and the EMA of the same run (decay :math:`1 - 5/T`: :math:`\\theta_0` keeps ``e^-5``)."""
    decay = max(0.0, 1.0 - 5.0 / bench.budget.steps)
    theta, averages = finetune(bench, averagers={"ema": averaging.ema(decay)})
    return {"FT": theta, "FT + EMA": averages["ema"]}


def kd(bench: Bench) -> dict[str, Tree]:
    """KD: CE + KL(zero-shot teacher ‖ student), the teacher being the frozen zero-shot model."""

    def regulariser(params: Tree, images: Tensor, f: Tensor, z: Tensor) -> Tensor:
        _, teacher = zero_shot_logits(bench, images)
        return losses.distillation(z, teacher_logits=teacher)

    return {"KD": finetune(bench, regulariser)[0]}


def l2sp(bench: Bench) -> dict[str, Tree]:
    """L2-SP: CE + λ·½‖θ - θ0‖² over the visual tower (the head is free, as in the paper)."""
    anchor = visual(bench.theta0)

    def regulariser(params: Tree, images: Tensor, f: Tensor, z: Tensor) -> Tensor:
        return L2SP_WEIGHT * losses.l2sp(visual(params), anchor=anchor)

    return {"L2-SP": finetune(bench, regulariser)[0]}


def featkd(bench: Bench) -> dict[str, Tree]:
    """FeatKD: CE + ‖f - f0‖² to the zero-shot model's image features."""

    def regulariser(params: Tree, images: Tensor, f: Tensor, z: Tensor) -> Tensor:
        f0, _ = zero_shot_logits(bench, images)
        return losses.feature_distillation(f, reference_features=f0)

    return {"FeatKD": finetune(bench, regulariser)[0]}


def carft(bench: Bench) -> dict[str, Tree]:
    """CAR-FT: CE + KL of the context distribution (over every caption template) to θ0's."""
    contexts = clip.context_prototypes(
        bench.model, bench.tokenizer, CLASSNAMES[:KNOWN], CAPTIONS
    )  # [templates, dim]

    def regulariser(params: Tree, images: Tensor, f: Tensor, z: Tensor) -> Tensor:
        f0, _ = zero_shot_logits(bench, images)
        return losses.context_distillation(
            f, reference_features=f0, context_features=contexts, logit_scale=bench.scale
        )

    return {"CAR-FT": finetune(bench, regulariser)[0]}


def lipsum(bench: Bench) -> dict[str, Tree]:
    """Lipsum-FT: CE + the energy gap on M random texts drawn from the pre-encoded bank."""
    g = torch.Generator().manual_seed(1)

    def regulariser(params: Tree, images: Tensor, f: Tensor, z: Tensor) -> Tensor:
        f0, _ = zero_shot_logits(bench, images)
        texts = bench.bank.sample(LIPSUM_TEXTS, generator=g, replacement=False)
        return losses.energy_gap(
            f, reference_features=f0, text_features=texts, logit_scale=bench.scale
        )

    return {"Lipsum-FT": finetune(bench, regulariser)[0]}


def clipood(bench: Bench) -> dict[str, Tree]:
    """CLIPood: margin metric softmax against the frozen class texts, then the Beta average.

    Only the visual tower trains (the head stays the zero-shot text features); the rows are the
    last iterate (MMS alone) and the Beta moving average of the run (MMS + BMA).
    """
    text = bench.theta0["head"]  # [classes, dim], frozen
    distances = losses.text_distances(text)  # once per head; a row gather per step

    def loss(params: Tree, images: Tensor, labels: Tensor) -> Tensor:
        return losses.margin_metric_softmax(
            features(bench, params, images),
            text,
            labels,
            margin=0.3,
            logit_scale=bench.scale,
            text_distances=distances,
        )

    bma = averaging.bma(bench.budget.steps, beta=0.5)
    data = (bench.data.train_x, bench.data.train_y)
    theta, averages = fit(bench, visual(bench.theta0), loss, data, averagers={"bma": bma})
    return {
        "CLIPood: MMS only": {**theta, "head": text},
        "CLIPood (MMS + BMA)": {**averages["bma"], "head": text},
    }


# --- Methods that train through the text tower: the head comes from the text tower at the end. ---


def flyp(bench: Bench) -> dict[str, Tree]:
    """FLYP: fine-tune both towers with the CLIP contrastive loss on (image, caption) pairs.

    The caption of a training image is one of the zero-shot templates filled with its class name
    (a random template per image and step). After training the head is the prompt ensemble of
    the fine-tuned text tower.
    """
    model, tokenizer = bench.model, bench.tokenizer
    names = CLASSNAMES[:KNOWN]
    captions = torch.stack([tokenizer([t.format(c) for c in names]) for t in TEMPLATES])
    text, _ = tree.partition(tree.from_module(model), clip.text_names(model))
    start = {**visual(bench.theta0), **tree.clone(text, detach=True)}
    g = torch.Generator().manual_seed(2)

    def loss(params: Tree, images: Tensor, labels: Tensor) -> Tensor:
        template = torch.randint(0, len(TEMPLATES), (len(labels),), generator=g)
        t = clip.text_features(model, params, captions[template, labels])
        return losses.clip_contrastive(features(bench, params, images), t, logit_scale=bench.scale)

    data = (bench.data.train_x, bench.data.train_y)
    theta, _ = fit(bench, start, loss, data)
    head = clip.zero_shot_head(model, tokenizer, names, TEMPLATES, params=theta)
    return {"FLYP": {**visual(theta), "head": head}}


def ueo(bench: Bench) -> dict[str, Tree]:
    """UEO: universal entropy optimisation on unlabelled images, known and unknown digits mixed.

    Trains a shared 4-vector CoOp context (initialised from "a photo of a") and the affine
    weights of the visual tower's LayerNorms; never sees a label. The confidence weights are the
    frozen zero-shot model's MCM scores (cosines at scale 1), computed once.
    """
    model, tokenizer = bench.model, bench.tokenizer
    names = CLASSNAMES[:KNOWN]
    images = torch.cat([bench.data.train_x, bench.data.unknown_train_x])  # labels dropped
    context = clip.init_context(model, tokenizer, UEO_PROMPT)
    with torch.no_grad():
        text0 = clip.encode_text_with_context(model, context, names, tokenizer)
        f0 = clip.frozen_copy_features(model, normalize(images))
        confidence = losses.ueo_confidence(f0 @ text0.T)  # [n], constant
    affines, _ = tree.partition(bench.theta0, clip.norm_affine_names(model, under="visual"))
    start = {"context": context, **affines}

    def loss(params: Tree, x: Tensor, weights: Tensor) -> Tensor:
        text = clip.encode_text_with_context(model, params["context"], names, tokenizer)
        return losses.ueo(bench.scale * features(bench, params, x) @ text.T, weights)

    theta, _ = fit(bench, start, loss, (images, confidence))
    with torch.no_grad():
        head = clip.encode_text_with_context(model, theta["context"], names, tokenizer)
    return {  # UEO's starting point (zero-shot with its one prompt), then UEO
        "zero-shot, UEO's prompt": {**bench.theta0, "head": text0},
        "UEO (no labels)": {**bench.theta0, **visual(theta), "head": head},
    }
