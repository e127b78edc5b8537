"""Every trainable method as one short builder over the public primitives.

A builder gets the pre-trained model and what the job prepared (zero-shot head, class names,
templates, configuration) and returns a :class:`Method`: the module to train (wrapped by the
runtime in DDP/FSDP2), the frozen teacher if the method has one, the per-batch loss, and how to
export the trained classifier. The loss is the paper's objective written with
:mod:`robustft.losses`; nothing here re-implements a formula.

Batches are ``(images, labels, indices)``: labels are ignored by the unsupervised methods,
indices (dataset positions) pick UEO's per-sample confidence and FLYP's caption template.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft import clip, losses, peft
from robustft.clip._common import check_templates, unwrap
from robustft.recipes import _peft
from robustft.recipes._config import RunConfig, flag_of
from robustft.recipes._config_file import text_lines
from robustft.recipes._nets import (
    ContrastiveCLIP,
    FrozenClassifier,
    ImageClassifier,
    PromptClassifier,
    TextClassifier,
    full,
    visual_tower,
)

__all__ = [
    "DDP_ONLY",
    "Context",
    "Method",
    "build",
    "fit_linear_head",
    "lipsum_strength",
    "lipsum_texts",
    "lipsum_vocabulary",
    "trained_tree",
    "unwrap",
]

DDP_ONLY = {
    "tracer": "its teacher runs the trajectory average through the module outside its forward, "
    "where FSDP2 holds only shards",
    "l2sp": "its penalty reads the parameters outside the module's forward, where FSDP2 holds "
    "only shards",
    "flyp": "it trains CLIP's 0-d logit scale, which fully_shard cannot shard",
}
"""The methods that run under DDP but not FSDP2, and why (:attr:`Method.ddp_only`)."""

Batch = tuple[Tensor, Tensor, Tensor]
Loss = Callable[[nn.Module, Batch, int], Tensor]
"""``(wrapped module, (images, labels, indices), step) -> loss`` of one micro-batch (its mean)."""


class Context(NamedTuple):
    """What every builder gets.

    Attributes:
        model: the pre-trained open_clip model (fp32, on the run's device).
        tokenizer: its tokenizer.
        classnames: the known classes' prompt names, in label order.
        templates: the prompt templates of the zero-shot head (callables or ``{}`` strings).
        head: ``[classes, dim]`` the starting head (zero-shot, or LP-FT's fitted one).
        scale: the pre-trained logit scale :math:`s`.
        config: the resolved run configuration.
        confidence: ``[train size]`` UEO's per-sample zero-shot confidence (unsupervised only).
        group: the process group of the run (``None`` on one process).
        descriptions: the class descriptions of ``--descriptions`` (``None``: the templates');
            a method that rebuilds its head from the text tower uses them too.
    """

    model: nn.Module
    tokenizer: Any
    classnames: list[str]
    templates: Sequence[Any]
    head: Tensor
    scale: float
    config: RunConfig
    confidence: Tensor | None = None
    group: Any = None
    descriptions: Mapping[str, Sequence[str]] | None = None


class Method(NamedTuple):
    """A built method.

    Attributes:
        module: the module whose ``requires_grad`` parameters train; the runtime wraps it.
        loss: the per-micro-batch loss (:data:`Loss`).
        export: ``(wrapped module) -> {"visual.*": ..., "head": ...}``, the classifier the
            trained parameters define (full tensors), for evaluation and saving.
        teacher: the frozen zero-shot model, if the loss uses it (the runtime places it).
        ddp_only: why the method cannot run under FSDP2 (:data:`DDP_ONLY`), or ``None``.
        on_average: called by the loop with the trajectory average's tree (keyed like the
            trained tree) once it exists and after every update: TRACER's teacher is that
            average (``--average bma``), so it is checkpointed and resumed with the run.
    """

    module: nn.Module
    loss: Loss
    export: Callable[[nn.Module], dict[str, Tensor]]
    teacher: nn.Module | None = None
    ddp_only: str | None = None
    on_average: Callable[[Mapping[str, Tensor]], None] | None = None


def trained_tree(module: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters of the (DDP-unwrapped) module, by name."""
    return {n: p for n, p in unwrap(module).named_parameters() if p.requires_grad}


def _visual_tree(visual: nn.Module) -> dict[str, Tensor]:
    return {f"visual.{n}": full(p) for n, p in visual.named_parameters()}


def _export_classifier(net: nn.Module) -> dict[str, Tensor]:
    inner = unwrap(net)
    return {**_visual_tree(visual_tower(inner)), "head": full(inner.get_parameter("head"))}


def _export_text_head(net: nn.Module) -> dict[str, Tensor]:
    """The classifier of a module whose ``forward(None)`` is its text head (UEO, CLIP-LoRA)."""
    with torch.no_grad():
        head = net(None)
    return {**_visual_tree(visual_tower(unwrap(net).get_submodule("model"))), "head": full(head)}


def _supervised(
    ctx: Context,
    penalty: Callable[[nn.Module, Tensor, Tensor, Batch, int], Tensor] | None,
    *,
    teacher: nn.Module | None = None,
) -> Method:
    """CE on the classifier's logits plus ``weight * penalty(net, f, z, batch, step)``."""
    module = ImageClassifier(visual_tower(ctx.model), ctx.head, ctx.scale)
    weight = ctx.config.reg_weight if ctx.config.reg_weight is not None else 0.0

    def loss(net: nn.Module, batch: Batch, step: int) -> Tensor:
        images, labels, _ = batch
        f, z = net(images)
        ce = F.cross_entropy(z.float(), labels)
        if penalty is None:
            return ce
        return ce + weight * penalty(net, f, z, batch, step)

    return Method(module, loss, _export_classifier, teacher)


def _ft(ctx: Context) -> Method:
    return _supervised(ctx, None)


def _l2sp(ctx: Context) -> Method:
    visual = visual_tower(ctx.model)
    pretrained = {n: p.detach().clone() for n, p in visual.named_parameters()}
    cache: dict[str, dict[str, Tensor]] = {}

    def penalty(net: nn.Module, f: Tensor, z: Tensor, batch: Batch, step: int) -> Tensor:
        tower = visual_tower(unwrap(net))
        params: dict[str, Tensor] = dict(tower.named_parameters())
        spec = peft.attached(tower)
        if spec is not None:  # --peft: measured on the update, ||W + ΔW - W0||² = ||ΔW||²
            factors, base = peft.split(params)
            params = peft.apply(spec, factors, base=base)
        if "anchor" not in cache:  # moved once, after the runtime placed the module
            cache["anchor"] = {n: pretrained[n].to(p.device) for n, p in params.items()}
        return losses.l2sp(params, anchor=cache["anchor"])

    return _supervised(ctx, penalty)


def _with_teacher(
    ctx: Context, term: Callable[[Tensor, Tensor, Tensor, Tensor, Batch, int], Tensor]
) -> Method:
    teacher = FrozenClassifier(visual_tower(ctx.model), ctx.head, ctx.scale)

    def penalty(net: nn.Module, f: Tensor, z: Tensor, batch: Batch, step: int) -> Tensor:
        f0, z0 = teacher(batch[0])  # the runtime moves (and under FSDP2 shards) it in place
        return term(f.float(), z.float(), f0.float(), z0.float(), batch, step)

    return _supervised(ctx, penalty, teacher=teacher)


def _kd(ctx: Context) -> Method:
    temperature = ctx.config.temperature
    return _with_teacher(
        ctx,
        lambda f, z, f0, z0, b, s: losses.distillation(
            z, teacher_logits=z0, temperature=temperature
        ),
    )


def _feature_kd(ctx: Context) -> Method:
    return _with_teacher(
        ctx, lambda f, z, f0, z0, b, s: losses.feature_distillation(f, reference_features=f0)
    )


def _car_ft(ctx: Context) -> Method:
    with torch.no_grad():
        contexts = clip.context_prototypes(ctx.model, ctx.tokenizer, ctx.classnames, ctx.templates)
    return _with_teacher(
        ctx,
        lambda f, z, f0, z0, b, s: losses.context_distillation(
            f, reference_features=f0, context_features=contexts, logit_scale=ctx.scale
        ),
    )


def lipsum_vocabulary(config: RunConfig, tokenizer: Any) -> Tensor | None:
    """``[K]`` the token ids of ``config.lipsum_vocabulary``'s texts, or ``None`` (every id).

    The file holds one text per line (blank lines are skipped); its texts' tokens, as
    ``tokenizer`` splits them, are the ids Lipsum-FT's random texts are drawn from
    (:func:`robustft.clip.token_vocabulary`). Read once per build: by the Lipsum-FT builder for
    training and by the report for its held-out energy-gap texts, so both draw from the same
    vocabulary.

    Raises:
        ValueError: the file is missing, unreadable as UTF-8 text, or holds no text or no token;
            the message names the flag (``--lipsum-vocabulary``).
    """
    name = config.lipsum_vocabulary
    if name is None:
        return None
    where = f"{flag_of('lipsum_vocabulary')}"
    path = Path(name).expanduser()
    if not path.is_file():
        raise ValueError(f"{where} must be an existing text file, got {name!r} (no such file)")
    texts = [line.strip() for line in text_lines(path, name, where) if line.strip()]
    if not texts:
        raise ValueError(
            f"{where}: {name!r} holds no text (one text per line, whose tokens form the random "
            "texts' vocabulary); give a file with text, or leave the flag out for the whole "
            "vocabulary"
        )
    try:
        return clip.token_vocabulary(texts, tokenizer)
    except ValueError as err:
        raise ValueError(f"{where}: {name!r}: {err}") from err


def lipsum_texts(
    model: nn.Module,
    tokenizer: Any,
    config: RunConfig,
    step: int,
    device: torch.device,
    *,
    vocabulary: Tensor | None = None,
) -> Tensor:
    """``[M, dim]`` features of step ``step``'s random texts (the same on every rank and on resume).

    ``vocabulary`` (:func:`lipsum_vocabulary`) restricts the body tokens to those ids; ``None``
    draws from the tokenizer's whole vocabulary, as the official code.
    """
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    tokens = clip.random_text_tokens(
        config.lipsum_texts,
        length=config.lipsum_length,
        context_length=getattr(model, "context_length", None),
        generator=g,
        tokenizer=tokenizer,
        vocabulary=vocabulary,
    ).to(device)
    with torch.no_grad():
        return clip.text_features(model, None, tokens)


def lipsum_strength(config: RunConfig, scale: float) -> float:
    """The factor Lipsum-FT's λ is multiplied by: :math:`(100/s)^2` with ``lipsum_rescale``, else 1."""
    return (100.0 / scale) ** 2 if config.lipsum_rescale else 1.0


def _lipsum(ctx: Context) -> Method:
    r"""Lipsum-FT: cross-entropy plus :math:`\lambda\,c\,R`, with :math:`R` the energy gap.

    :math:`R = \frac{1}{B}\sum_b \sum_m (v_{bm} - v^0_{bm})^2 / 2M` with
    :math:`v = s\,\hat f\,G^\top` (SPEC §4), that is :math:`R = s^2 \tilde R` where
    :math:`\tilde R` is the same gap measured in cosines. With ``lipsum_rescale`` (default)
    :math:`c = (100/s)^2`, so :math:`\lambda c R = \lambda\,100^2 \tilde R`: the penalty, as a
    function of the cosines, is the one the paper's λ gives on a model with :math:`s = 100`
    (its stiffness per unit cosine is preserved). What it does not preserve is the penalty's
    balance with the cross-entropy, whose gradient per unit cosine, :math:`s\,(p - y)`, also
    scales with :math:`s` (and :math:`p` itself depends on it): relative to the data term the
    penalty is :math:`100/s` times as stiff as in the paper (stiffer for :math:`s < 100`).
    Without it (``lipsum_rescale=False``) :math:`c = 1`, λ as given: the penalty is
    :math:`\lambda s^2 \tilde R`, relative to the data term :math:`s/100` times the paper's.
    Both are equal, and equal to the paper, for OpenAI/LAION CLIP (:math:`s = 100`); elsewhere
    put λ on the grid (SPEC §4).

    The random texts are drawn per step from ``lipsum_vocabulary``'s tokens when given
    (read once, here), else from the whole vocabulary.
    """
    model, tokenizer, config = ctx.model, ctx.tokenizer, ctx.config
    strength = lipsum_strength(config, ctx.scale)
    vocabulary = lipsum_vocabulary(config, tokenizer)

    def term(f: Tensor, z: Tensor, f0: Tensor, z0: Tensor, batch: Batch, step: int) -> Tensor:
        texts = lipsum_texts(model, tokenizer, config, step, f.device, vocabulary=vocabulary)
        gap = losses.energy_gap(
            f, reference_features=f0, text_features=texts, logit_scale=ctx.scale
        )
        return strength * gap

    return _with_teacher(ctx, term)


def _clipood(ctx: Context) -> Method:
    text = ctx.head.detach().clone()
    distances = losses.text_distances(text)
    module = ImageClassifier(visual_tower(ctx.model), text, ctx.scale, train_head=False)
    margin = ctx.config.margin

    def loss(net: nn.Module, batch: Batch, step: int) -> Tensor:
        images, labels, _ = batch
        f, _ = net(images)
        return losses.margin_metric_softmax(
            f.float(),
            text.to(f.device),
            labels,
            margin=margin,
            logit_scale=ctx.scale,
            text_distances=distances.to(f.device),
        )

    return Method(module, loss, _export_classifier)


def _captions(ctx: Context, name: str) -> Callable[[Batch, int], Tensor]:
    """``(batch, step) -> [batch, context]`` each image's caption token ids: its class name in a
    template picked per sample, a hash of (seed, step, sample): rank- and resume-independent."""
    templates = check_templates(name, ctx.templates)
    captions = torch.stack([ctx.tokenizer([t(c) for c in ctx.classnames]) for t in templates])
    seed = ctx.config.seed

    def tokens(batch: Batch, step: int) -> Tensor:
        images, labels, indices = batch
        which = (indices * 2654435761 + step * 40503 + seed) % len(templates)
        return captions.to(images.device)[which, labels]

    return tokens


def _contrastive_export(ctx: Context) -> Callable[[nn.Module], dict[str, Tensor]]:
    """The classifier of a :class:`ContrastiveCLIP`: its image tower and the head re-encoded by
    its text tower (from ``--descriptions`` if given, else the templates)."""

    def export(net: nn.Module) -> dict[str, Tensor]:
        text = _TextThrough(net)  # the text tower through the module's forward: FSDP2 unshards it
        with torch.no_grad():
            if ctx.descriptions is None:
                head = clip.zero_shot_head(text, ctx.tokenizer, ctx.classnames, ctx.templates)
            else:
                head = clip.description_head(text, ctx.tokenizer, ctx.descriptions, ctx.classnames)
        return {**_visual_tree(visual_tower(unwrap(net).get_submodule("model"))), "head": head}

    return export


def _contrastive(ctx: Context, *, multi_positive: bool) -> Method:
    r"""FLYP (``multi_positive=False``) or R-Adapter's MPM-NCE (``True``) on templated captions.

    Each image's caption is its class name in a template picked per sample (a hash of seed, step
    and sample: the same on every rank and on resume). FLYP's loss is CLIP's contrastive loss
    with the trained logit scale; R-Adapter's treats every same-class pair of the global batch
    as a positive (soft targets), smooths them by ``label_smoothing`` and adds ``margin`` to the
    negatives' cosines (:func:`robustft.losses.clip_contrastive` with ``labels=``), at the
    pre-trained scale (its adapters leave the scale frozen; :math:`1/\tau = 100` for OpenAI
    CLIP, the paper's :math:`\tau = 0.01`).
    """
    module = ContrastiveCLIP(ctx.model)
    captions = _captions(ctx, "r-adapter" if multi_positive else "flyp")
    group, config = ctx.group, ctx.config

    def loss(net: nn.Module, batch: Batch, step: int) -> Tensor:
        images, labels, _ = batch
        f, t, scale = net(images, captions(batch, step))
        if not multi_positive:
            return losses.clip_contrastive(f.float(), t.float(), logit_scale=scale, group=group)
        return losses.clip_contrastive(
            f.float(),
            t.float(),
            logit_scale=scale,
            labels=labels,
            smoothing=config.label_smoothing,
            margin=config.margin,
            group=group,
        )

    return Method(module, loss, _contrastive_export(ctx))


class _TextThrough(nn.Module):
    """A plain module whose ``encode_text`` runs a (DDP- or FSDP2-managed) :class:`ContrastiveCLIP`'s
    own forward, for :func:`robustft.clip.zero_shot_head` (which refuses FSDP-managed models)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def encode_text(self, tokens: Tensor) -> Tensor:
        text: Tensor = self.net(None, tokens)
        return text


def _flyp(ctx: Context) -> Method:
    return _contrastive(ctx, multi_positive=False)


def _r_adapter(ctx: Context) -> Method:
    return _contrastive(ctx, multi_positive=True)


TRACER_VIEWS = {"crd": 1.0, "fd": 2000.0, "icl": 1.0, "cross": 1.0}
"""TRACER's view weights (``alpha_crd``, ``alpha_fd``, ``alpha_icl``, ``alpha_cross_kd`` of its
ImageNet scripts, e.g. ``example_scripts/tracer_beta.sh``); ``fd`` multiplies the per-entry MSE
of the normalised features, :func:`robustft.losses.feature_distillation` / dim per tower."""


def _tracer(ctx: Context) -> Method:
    r"""TRACER: FLYP's contrastive loss plus self-distillation from the trajectory's BMA.

    .. math::

        L = L_{\text{CLIP}}(\hat f, \hat g; s) + \lambda\big(
            \alpha_{crd}\,\text{CRD} + \alpha_{fd}\,\text{FD} + \alpha_{icl}\,\text{ICL}
            + \alpha_{cross}\,\text{CrossKD}\big)

    with the teacher features :math:`\hat f^T, \hat g^T` and scale :math:`s^T` from the model
    under the Beta(½, ½) trajectory average (``--average bma --bma-beta 0.5``: the loop's own
    average, updated after every optimiser step, so the teacher at step :math:`t` averages
    :math:`\theta_0 \ldots \theta_t` as the authors' ``GeneralMovingAverage``), run without
    gradient on the same batch; :math:`\lambda` is ``reg_weight`` (their ``distil_coef``), the
    α's :data:`TRACER_VIEWS`; FD is :func:`robustft.losses.feature_distillation` of each tower
    divided by the feature dimension (their mean-squared error). With ``cross_norm`` > 0 the
    loss also has their :math:`c\,\lVert W_v W_t^\top\rVert_F` on the two projections.
    """
    if ctx.config.average != "bma":
        raise ValueError(
            f"build: method tracer's teacher is the trajectory's BMA: --average must be bma, got "
            f"{ctx.config.average}"
        )
    module = ContrastiveCLIP(ctx.model)
    captions = _captions(ctx, "tracer")
    group, config = ctx.group, ctx.config
    weight = config.reg_weight if config.reg_weight is not None else 0.0
    holder: dict[str, Mapping[str, Tensor]] = {}
    w = TRACER_VIEWS

    def on_average(average: Mapping[str, Tensor]) -> None:
        holder["average"] = average

    def loss(net: nn.Module, batch: Batch, step: int) -> Tensor:
        images = batch[0]
        tokens = captions(batch, step)
        f, t, scale = net(images, tokens)
        f, t = f.float(), t.float()
        total = losses.clip_contrastive(f, t, logit_scale=scale, group=group)
        inner = unwrap(net)
        if config.cross_norm:
            visual = visual_tower(inner.get_submodule("model"))
            proj = inner.get_parameter("model.text_projection")
            total = total + config.cross_norm * torch.linalg.matrix_norm(
                visual.get_parameter("proj").float() @ proj.float().T
            )
        if not weight or "average" not in holder:
            return total
        with torch.no_grad():  # the teacher: the module under the trajectory average
            f0, t0, scale0 = torch.func.functional_call(
                inner, dict(holder["average"]), (images, tokens), strict=False
            )
        teacher = {
            "teacher_image_features": f0.float(),
            "teacher_text_features": t0.float(),
        }
        dim = f.shape[-1]
        views = (
            w["crd"] * losses.contrastive_relational_distillation(
                f, t, **teacher, logit_scale=scale, teacher_logit_scale=scale0, group=group
            )
            + w["fd"] / dim * (
                losses.feature_distillation(f, reference_features=f0.float())
                + losses.feature_distillation(t, reference_features=t0.float())
            )
            + w["icl"] * losses.interaction_distillation(
                f, t, **teacher, logit_scale=scale, group=group
            )
            + w["cross"] * losses.cross_distillation(
                f, t, **teacher, logit_scale=scale, teacher_logit_scale=scale0, group=group
            )
        )  # fmt: skip
        return total + weight * views

    return Method(module, loss, _contrastive_export(ctx), on_average=on_average)


def _clip_lora(ctx: Context) -> Method:
    r"""CLIP-LoRA: cross-entropy on :math:`s\,\hat f\,\hat T^\top`, the class prompts
    (``"{prompt} {class}."``, one per class: its code's ``template[0]``) encoded through the
    adapted text tower on every step."""
    prompts = [f"{ctx.config.prompt} {c}." for c in ctx.classnames]
    module = TextClassifier(ctx.model, ctx.tokenizer(prompts), ctx.scale)

    def loss(net: nn.Module, batch: Batch, step: int) -> Tensor:
        images, labels, _ = batch
        return F.cross_entropy(net(images).float(), labels)

    return Method(module, loss, _export_text_head)


def _unsupervised(ctx: Context) -> Method:
    r"""UEO, IM or entropy minimisation on the logits :math:`z = \sigma\,\hat f\,\hat T^\top`.

    :math:`\sigma` is ``ueo_scale``: 100 by default, the official code's hard-coded scale
    (tim-learn/UEO ``demo.py``, ``logits = 100. * image_features @ text_features.T``), or, with
    ``ueo_scale=0``, the model's own logit scale :math:`s`. Equal for OpenAI/LAION CLIP
    (:math:`s = 100`), different for a model whose :math:`s` differs. Only the loss uses
    :math:`\sigma`: the exported head (the class texts through the context) and its evaluation
    are the same either way.
    """
    if ctx.confidence is None:
        raise ValueError(f"build: method {ctx.config.method!r} needs the zero-shot confidence")
    # the training logits' scale: the official code's fixed 100 (ueo_scale), or 0 -> the model's s
    scale = ctx.config.ueo_scale or None
    module = PromptClassifier(
        ctx.model, ctx.tokenizer, ctx.classnames, ctx.config.prompt, scale=scale
    )
    confidence = ctx.confidence
    if ctx.config.method != "ueo":  # entropy minimisation and IM weigh every sample alike
        confidence = torch.ones_like(confidence)
    trade_off, group = ctx.config.trade_off, ctx.group

    def loss(net: nn.Module, batch: Batch, step: int) -> Tensor:
        images, _, indices = batch
        logits = net(images)
        weights = confidence.to(logits.device)[indices]
        return losses.ueo(logits.float(), weights, trade_off=trade_off, group=group)

    return Method(module, loss, _export_text_head)


BUILDERS: dict[str, Callable[[Context], Method]] = {
    "ft": _ft,
    "lp-ft": _ft,  # from the head fitted by fit_linear_head
    "l2sp": _l2sp,
    "kd": _kd,
    "car-ft": _car_ft,
    "feature-kd": _feature_kd,
    "flyp": _flyp,
    "lipsum": _lipsum,
    "clipood": _clipood,
    "r-adapter": _r_adapter,
    "clip-lora": _clip_lora,
    "tracer": _tracer,
    "ueo": _unsupervised,
    "entropy": _unsupervised,
    "im": _unsupervised,
}


def build(ctx: Context) -> Method:
    """Build the method ``ctx.config.method`` (see :data:`robustft.recipes.METHODS`).

    The method trains a deep copy of ``ctx.model``: the caller's model stays the pre-trained one
    (several methods can be built from one loaded model).

    Raises:
        ValueError: on an unknown method, or an unsupervised one without ``ctx.confidence``.
    """
    name = ctx.config.method
    if name not in BUILDERS:
        raise ValueError(f"build: method must be one of {', '.join(BUILDERS)}, got {name!r}")
    method = BUILDERS[name](ctx._replace(model=copy.deepcopy(ctx.model)))
    method = method._replace(ddp_only=DDP_ONLY.get(name))
    if ctx.config.peft == "none":
        return method
    # --peft: factors on the trained towers (frozen, the logit scale included)
    _peft.attach(method.module, ctx.config)
    return method._replace(
        loss=_peft.seeded_loss(method.loss, ctx.config),
        export=_peft.export(method.export, ctx.config),
        ddp_only=None if name == "flyp" else method.ddp_only,  # flyp's scale is frozen now
    )


def _fit_probe(x: Tensor, y: Tensor, classes: int, c: float, max_iter: int) -> Tensor:
    """One L-BFGS fit of the L2-regularised logistic regression at inverse strength ``c``."""
    w = torch.zeros(classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        objective = F.cross_entropy(x @ w.T, y) + (w * w).sum() / (2 * c * len(y))
        objective.backward()
        return objective

    opt.step(closure)
    return w.detach()


def fit_linear_head(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    *,
    strengths: Sequence[float],
    scale: float,
    classes: int,
    max_iter: int = 200,
) -> tuple[Tensor, float, Mapping[float, float]]:
    r"""LP-FT's linear probe: L2-regularised logistic regression on frozen, normalised features.

    For each inverse strength :math:`C` (scikit-learn's convention) minimise
    :math:`\frac{1}{n}\sum_i \mathrm{CE}(s\,\hat f_i W^\top, y_i) + \frac{1}{2Cn}\lVert W\rVert^2`
    with L-BFGS from zero, keep the :math:`C` with the best *validation* accuracy (ties: the
    stronger regularisation), and return :math:`W` in the classifier's units (logits
    :math:`s\,\hat f W^\top`, no bias).

    Returns:
        ``(head [classes, dim], chosen C, {C: validation accuracy})``.

    References:
        Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
        Out-of-Distribution", ICLR 2022 (LP-FT). Code: https://github.com/AnanyaKumar/transfer_learning
    """
    x = F.normalize(train_features.double(), dim=-1) * scale
    xv = F.normalize(val_features.double(), dim=-1) * scale
    y, yv = train_labels, val_labels
    scores: dict[float, float] = {}
    best: tuple[float, float, Tensor] | None = None
    for c in sorted(strengths):
        w = _fit_probe(x, y, classes, c, max_iter)
        acc = float(((xv @ w.T).argmax(-1) == yv).double().mean())
        scores[c] = acc
        if best is None or acc > best[0]:
            best = (acc, c, w)
    assert best is not None
    return best[2].float(), best[1], scores
