"""The jobs behind the command line: fine-tune (supervised or unsupervised), post hoc, evaluate.

Each job reads image folders, loads the open_clip model, runs the method through the one loop
(:func:`robustft.recipes._loop.train`) and writes the run folder:

- ``config.json``: the resolved configuration;
- ``metrics.jsonl``: one JSON line per log interval and per validation;
- ``results.json``: every metric of :mod:`robustft.metrics` per evaluation set, for the
  zero-shot model and each reported set of weights (``last``, ``average``, ``best``);
- ``summary.md``: the same as a markdown table;
- ``last.safetensors`` / ``average.safetensors`` / ``best.safetensors``: the exported
  classifiers (visual tower + head);
- ``checkpoint.pt`` (or ``checkpoint.dcp/`` under FSDP2): the state to ``--resume`` from.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from robustft import clip, distributed, losses, merging, projections
from robustft.recipes import _checkpoint as ckpt
from robustft.recipes._config import SUPERVISED, UNSUPERVISED, RunConfig
from robustft.recipes._data import FolderDataset, class_names, holdout
from robustft.recipes._evaluate import Evaluator, format_summary, threshold_at_tpr
from robustft.recipes._loop import TrainResult, check_split, train
from robustft.recipes._methods import DDP_ONLY, Context, build, fit_linear_head
from robustft.recipes._model import ClipBundle, load_model
from robustft.recipes._nets import visual_tower
from robustft.recipes._runtime import Runtime, init, shutdown

__all__ = ["Data", "Prepared", "evaluate_run", "finetune", "posthoc", "prepare", "templates_of"]


def templates_of(name: str) -> list[Any]:
    """The zero-shot prompt templates: ``"openai"`` (CLIP's 80 ImageNet templates) or ``"simple"``."""
    from open_clip import zero_shot_metadata as meta

    if name == "openai":
        return list(meta.OPENAI_IMAGENET_TEMPLATES)
    if name == "simple":
        return ["a photo of a {}."]
    raise ValueError(f"templates_of: name must be openai or simple, got {name!r}")


class Data(NamedTuple):
    """The datasets of a run: training (train transform), validation and evaluation sets (eval transform)."""

    train: Dataset[Any]
    val: Dataset[Any] | None
    evals: Mapping[str, Dataset[Any]]
    folders: list[str]
    names: list[str]


def load_data(config: RunConfig, bundle: ClipBundle, *, supervised: bool) -> Data:
    """Image folders of the configuration; the validation split is held out of train if absent."""
    fn = config.method
    folders, names = class_names(config.train, config.classnames)
    train_ds = FolderDataset(config.train, folders, bundle.train_transform)
    val: Dataset[Any] | None
    if supervised and not train_ds.known:
        raise ValueError(
            f"{fn}: the training folder {config.train!r} must hold only the classes of the class "
            f"names for supervised fine-tuning, got images in folders outside them"
        )
    if config.val:
        val = FolderDataset(config.val, folders, bundle.eval_transform)
        train_used: Dataset[Any] = train_ds
    elif supervised:
        keep, held = holdout(train_ds.targets, config.val_fraction, seed=config.seed)
        train_used = Subset(train_ds, keep)
        val = Subset(FolderDataset(config.train, folders, bundle.eval_transform), held)
    else:  # unsupervised: no labels to validate on unless a --val folder is given
        train_used, val = train_ds, None
    evals = {
        name: FolderDataset(path, folders, bundle.eval_transform)
        for name, path in config.eval.items()
    }
    return Data(train_used, val, evals, folders, names)


class Prepared(NamedTuple):
    """Everything a job builds before training."""

    runtime: Runtime
    bundle: ClipBundle
    data: Data
    templates: list[Any]
    head: Tensor
    scale: float
    evaluator: Evaluator


def runtime_of(config: RunConfig) -> Runtime:
    """The runtime ``config`` asks for (torchrun's process group, device, precision)."""
    return init(device=config.device, precision=config.precision, distributed=config.distributed)


def prepare(
    config: RunConfig, *, supervised: bool = True, runtime: Runtime | None = None
) -> Prepared:
    """Runtime, model, data, zero-shot head and evaluator of a configuration."""
    runtime = runtime or runtime_of(config)
    with torch.random.fork_rng(devices=[]):  # a random init (no --pretrained) is seeded: every
        torch.manual_seed(config.seed)  # rank, and a resumed run, builds the same model
        bundle = load_model(config.model, pretrained=config.pretrained, device=runtime.device)
    data = load_data(config, bundle, supervised=supervised)
    templates = templates_of(config.templates)
    with torch.no_grad():
        head = clip.zero_shot_head(bundle.model, bundle.tokenizer, data.names, templates)
    scale = float(clip.logit_scale(bundle.model).detach())
    score = config.score or "msp"
    evaluator = Evaluator(
        visual_tower(bundle.model),
        scale,
        runtime,
        batch_size=max(config.batch_size or 64, 64),
        workers=config.workers,
        score=score,
    )
    return Prepared(runtime, bundle, data, templates, head, scale, evaluator)


def _zero_shot_tree(bundle: ClipBundle, head: Tensor) -> dict[str, Tensor]:
    return {
        **{
            f"visual.{n}": p.detach().clone()
            for n, p in visual_tower(bundle.model).named_parameters()
        },
        "head": head,
    }


def _prompt_head(prep: Prepared, config: RunConfig) -> Tensor:
    """``[classes, dim]`` the class texts of UEO's initial prompt (its zero-shot head)."""
    bundle = prep.bundle
    with torch.no_grad():
        context = clip.init_context(bundle.model, bundle.tokenizer, config.prompt)
        return clip.encode_text_with_context(
            bundle.model, context, prep.data.names, bundle.tokenizer
        )


def _confidence(prep: Prepared, config: RunConfig, text: Tensor) -> Tensor:
    """UEO's per-sample confidence: MSP of the zero-shot cosines (scale 1) with the prompt's
    class texts ``text``.

    Computed once over the training pool with the eval transform, each rank its share and then
    gathered, so every rank holds the same ``[n]`` tensor.
    """
    rt = prep.runtime
    plain = _eval_view(prep, config)
    n = len(plain)  # type: ignore[arg-type]
    mine = list(range(rt.rank, n, rt.world))
    prep.evaluator.load(_zero_shot_tree(prep.bundle, text))
    logits, _ = prep.evaluator.logits_and_labels(Subset(plain, mine))
    conf = losses.ueo_confidence((logits / prep.scale).to(rt.device)).float()
    index = torch.tensor(mine, dtype=torch.long, device=rt.device)
    if rt.world > 1:
        conf = distributed.all_gather_cat(conf, rt.group)
        index = distributed.all_gather_cat(index, rt.group)
    out = torch.empty(n, device=rt.device)
    out[index] = conf
    return out.cpu()


def _log(runtime: Runtime) -> Callable[[str], None]:
    return print if runtime.main else (lambda _: None)


def check_runtime(config: RunConfig, runtime: Runtime) -> None:
    """Refuse, before anything is loaded, what cannot run on this runtime.

    Raises:
        ValueError: if the global batch does not split over the ranks and accumulation steps, or
            the method cannot run under FSDP2.
    """
    fn = config.method
    if config.batch_size is not None:
        check_split(fn, config.batch_size, runtime.world, config.accumulation)
    if runtime.strategy == "fsdp" and config.method in DDP_ONLY:
        raise ValueError(
            f"{fn}: method {config.method!r} cannot run under FSDP2 ({DDP_ONLY[config.method]}); "
            f"use --distributed ddp"
        )


def finetune(
    config: RunConfig, *, resume: bool = False, runtime: Runtime | None = None
) -> dict[str, Any]:
    """Run one training job (supervised or unsupervised) and write its run folder.

    Loads the model and the image folders of ``config``, evaluates the zero-shot model, trains
    ``config.method`` through :func:`robustft.recipes.train` (resuming from the run folder's
    checkpoint when ``resume``), then evaluates and saves every reported set of weights. The run
    folder ``config.output`` receives ``config.json``, ``metrics.jsonl``, ``results.json``,
    ``summary.md``, the ``*.safetensors`` classifiers and the checkpoint.

    Args:
        config: the resolved configuration (:func:`robustft.recipes.resolve`).
        resume: continue the run in ``config.output`` from its checkpoint.
        runtime: where to run; ``None`` sets it up from the environment (torchrun or one process).

    Returns:
        The content of ``results.json``: ``{"method", "steps", "train_seconds", "results":
        {weights: {set: metrics}}}`` (and the linear probe's choice for LP-FT).

    Raises:
        ValueError: on data or settings that cannot run (no classes, a supervised training folder
            with unknown classes, a batch that does not split over the ranks, ...).
        FileNotFoundError: if a folder or file of ``config`` does not exist, or ``resume`` finds
            no checkpoint.

    Example:
        >>> from robustft.recipes import resolve, finetune
        >>> config = resolve({"method": "clipood", "model": "ViT-B-16", "pretrained": "openai",
        ...                   "train": "data/train", "eval": ["v2=data/v2"],
        ...                   "output": "runs/clipood"})
        >>> results = finetune(config)  # doctest: +SKIP
    """
    supervised = config.method in SUPERVISED
    runtime = runtime or runtime_of(config)
    check_runtime(config, runtime)
    prep = prepare(config, supervised=supervised, runtime=runtime)
    rt, bundle, data = prep.runtime, prep.bundle, prep.data
    log = _log(rt)
    out = Path(config.output)
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(
            json.dumps(config.to_json(), indent=1) + "\n", encoding="utf-8"
        )
        if not resume:
            (out / "metrics.jsonl").write_text("", encoding="utf-8")
    if rt.world > 1:
        torch.distributed.barrier()
    head, extra = prep.head, dict[str, Any]()
    if config.method == "lp-ft":
        head, extra = _linear_probe(prep, config)
    confidence, zero_head = None, prep.head
    if config.method in UNSUPERVISED:  # UEO starts from its prompt's class texts
        zero_head = _prompt_head(prep, config)
        confidence = _confidence(prep, config, zero_head)
    # zero-shot results first (the weights are those of the model as loaded)
    sets = data.evals
    results: dict[str, dict[str, Any]] = {}
    results["zero-shot"] = _evaluate(prep, config, _zero_shot_tree(bundle, zero_head), sets)
    ctx = Context(
        bundle.model,
        bundle.tokenizer,
        data.names,
        prep.templates,
        head,
        prep.scale,
        config,
        confidence,
        rt.group,
    )
    method = build(ctx)
    validate = None
    if data.val is not None:
        val = data.val

        def validate(tree: Mapping[str, Tensor]) -> float:
            prep.evaluator.load(tree)
            return float(prep.evaluator.evaluate(val)["accuracy"])

    log(f"{config.method}: {len(data.train)} training images, {len(data.names)} classes")  # type: ignore[arg-type]
    result: TrainResult = train(
        method, data.train, config, rt, run_dir=out, resume=resume, validate=validate, log=log
    )
    weights = {"last": result.last, "average": result.averaged, "best": result.best}
    for name, tree in weights.items():
        if tree is None:
            continue
        if rt.main:
            ckpt.save_tree(out / f"{name}.safetensors", tree)
        results[name] = _evaluate(prep, config, tree, sets)
    payload = {
        "method": config.method,
        "steps": result.history[-1]["step"] if result.history else 0,
        "train_seconds": result.seconds,
        **extra,
        "results": results,
    }
    if rt.main:
        (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        (out / "summary.md").write_text(
            f"# {config.method}\n\n" + format_summary(results) + "\n", encoding="utf-8"
        )
        log(format_summary(results))
    return payload


def _evaluate(
    prep: Prepared, config: RunConfig, tree: Mapping[str, Tensor], sets: Mapping[str, Dataset[Any]]
) -> dict[str, Any]:
    """Metrics of ``tree`` on the validation split and every set; the open-set threshold accepts
    ``config.tpr`` of the validation knowns (no threshold without a labelled validation split)."""
    ev = prep.evaluator
    ev.load(tree)
    threshold = None
    out: dict[str, Any] = {}
    if prep.data.val is not None:  # one pass: the threshold and the split's own metrics
        logits, labels = ev.logits_and_labels(prep.data.val)
        threshold = threshold_at_tpr(ev.score(logits[labels >= 0]), config.tpr)
        out["val"] = ev.evaluate_logits(logits, labels, threshold=threshold)
    for name, ds in sets.items():
        out[name] = ev.evaluate(ds, threshold=threshold, classes=_present(config, ds))
    return out


def _present(config: RunConfig, dataset: Dataset[Any]) -> list[int] | None:
    """The class indices with a folder in an evaluation set, when ``eval_classes="present"``."""
    if config.eval_classes != "present":
        return None
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    return sorted({int(t) for t in targets if t >= 0})


def _linear_probe(prep: Prepared, config: RunConfig) -> tuple[Tensor, dict[str, Any]]:
    """LP-FT's first stage: the logistic-regression head on frozen features, C chosen on val."""
    if prep.data.val is None:
        raise ValueError("lp-ft: needs a validation split to choose the probe's regularisation")
    ev = prep.evaluator
    ev.load(_zero_shot_tree(prep.bundle, prep.head))  # the pre-trained tower's features
    x, y = ev.features_and_labels(_eval_view(prep, config))
    xv, yv = ev.features_and_labels(prep.data.val)
    strengths = [float(c) for c in str(config.lp_c).split(",") if c.strip()]
    head, c, scores = fit_linear_head(
        x, y, xv, yv, strengths=strengths, scale=prep.scale, classes=len(prep.data.names)
    )
    return head, {"linear_probe": {"C": c, "val_accuracy": scores}}


def _eval_view(prep: Prepared, config: RunConfig) -> Dataset[Any]:
    """The training images with the eval transform (same subset as the training split)."""
    plain = FolderDataset(config.train, prep.data.folders, prep.bundle.eval_transform)
    train = prep.data.train
    return Subset(plain, list(train.indices)) if isinstance(train, Subset) else plain


def evaluate_run(
    config: RunConfig, weights: Sequence[str], *, runtime: Runtime | None = None
) -> dict[str, Any]:
    """Evaluate saved classifiers on the configuration's validation split and evaluation sets.

    Args:
        config: the run's configuration (model, classes, data, score, open-set TPR).
        weights: ``.safetensors`` classifier files (``{"visual.*", "head"}`` as the runs write
            them), or ``"zero-shot"`` for the model as loaded with its zero-shot head.
        runtime: where to run; ``None`` sets it up from the environment.

    Returns:
        ``{"results": {weights name: {set: metrics}}}`` (the file's stem names it).

    Raises:
        FileNotFoundError: if a weights file does not exist.
        ValueError: if a file does not hold the model's visual tensors and a head.

    Example:
        >>> from robustft.recipes import resolve, evaluate_run
        >>> config = resolve({"model": "ViT-B-16", "train": "data/train", "eval": ["r=data/r"]})
        >>> evaluate_run(config, ["runs/ft/last.safetensors", "zero-shot"])  # doctest: +SKIP
    """
    prep = prepare(config, supervised=config.method in SUPERVISED, runtime=runtime)
    results = {}
    for w in weights:
        tree = (
            _zero_shot_tree(prep.bundle, prep.head)
            if w == "zero-shot"
            else ckpt.load_tree(Path(w), prep.runtime.device)
        )
        results[Path(w).stem if w != "zero-shot" else w] = _evaluate(
            prep, config, tree, prep.data.evals
        )
    return {"results": results}


def posthoc(
    config: RunConfig,
    runs: Sequence[str],
    *,
    kind: str,
    alphas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    tpgm_steps: int = 200,
    weights: str = "last",
    save_weights: bool = False,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Post-hoc robustness from saved runs: WiSE-FT sweep, TPGM, uniform or greedy soup.

    Args:
        config: the configuration of the data and model (that of the first run by default).
        runs: run folders (their ``<weights>.safetensors``) or ``.safetensors`` files.
        kind: ``"wise"``, ``"tpgm"``, ``"uniform-soup"`` or ``"greedy-soup"``.
        alphas: WiSE-FT's mixing coefficients.
        tpgm_steps: Adam steps on TPGM's radii.
        weights: which classifier of each run folder: ``"last"``, ``"average"`` or ``"best"``.
        save_weights: also write every WiSE-FT blend as ``wise-<alpha>.safetensors`` (the soups
            and TPGM are always written).
    """
    fn = "posthoc"
    kinds = ("wise", "tpgm", "uniform-soup", "greedy-soup")
    if kind not in kinds:
        raise ValueError(f"{fn}: kind must be one of {', '.join(kinds)}, got {kind!r}")
    if weights not in ("last", "average", "best"):
        raise ValueError(f"{fn}: weights must be last, average or best, got {weights!r}")
    files = [Path(r) / f"{weights}.safetensors" if Path(r).is_dir() else Path(r) for r in runs]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{fn}: runs must hold {weights}.safetensors, missing {missing}")
    prep = prepare(config, supervised=True, runtime=runtime)
    rt = prep.runtime
    dev = rt.device
    theta0 = _zero_shot_tree(prep.bundle, prep.head)
    trees = [ckpt.load_tree(f, dev) for f in files]
    val = prep.data.val
    extra_info: dict[str, Any] = {}
    results: dict[str, Any] = {"zero-shot": _evaluate(prep, config, theta0, prep.data.evals)}
    out = Path(config.output)
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
    if kind == "wise":
        for a in alphas:
            tree = merging.wise(trees[0], anchor=theta0, alpha=float(a))
            results[f"wise-{a:g}"] = _evaluate(prep, config, tree, prep.data.evals)
            if save_weights and rt.main:
                ckpt.save_tree(out / f"wise-{a:g}.safetensors", tree)
    elif kind == "uniform-soup":
        tree = merging.uniform_soup(trees)
        results["uniform-soup"] = _evaluate(prep, config, tree, prep.data.evals)
        if rt.main:
            ckpt.save_tree(out / "uniform-soup.safetensors", tree)
    elif kind == "greedy-soup":
        if val is None:
            raise ValueError(f"{fn}: greedy-soup needs a validation split")

        def score(t: Mapping[str, Tensor]) -> float:
            prep.evaluator.load(t)
            return float(prep.evaluator.evaluate(val)["accuracy"])

        tree, kept = merging.greedy_soup(trees, score)
        results["greedy-soup"] = _evaluate(prep, config, tree, prep.data.evals)
        extra_info = {"kept": [str(files[i]) for i in kept]}
        if rt.main:
            ckpt.save_tree(out / "greedy-soup.safetensors", tree)
    else:
        tree = _tpgm(prep, config, trees[0], theta0, tpgm_steps)
        results["tpgm"] = _evaluate(prep, config, tree, prep.data.evals)
        if rt.main:
            ckpt.save_tree(out / "tpgm.safetensors", tree)
    payload = {"posthoc": kind, "runs": [str(f) for f in files], **extra_info, "results": results}
    if rt.main:
        (out / "results.json").write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        (out / "summary.md").write_text(
            f"# {kind}\n\n" + format_summary(results) + "\n", encoding="utf-8"
        )
    return payload


def _tpgm(
    prep: Prepared,
    config: RunConfig,
    tree: dict[str, Tensor],
    theta0: dict[str, Tensor],
    steps: int,
) -> dict[str, Tensor]:
    """TPGM post hoc: radii learned by Adam on the validation loss of the projected classifier."""
    import torch.nn.functional as F

    if prep.data.val is None:
        raise ValueError("posthoc: tpgm needs a validation split")
    model = prep.bundle.model
    loader = torch.utils.data.DataLoader(
        prep.data.val,
        batch_size=max(config.batch_size or 64, 64),
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
    )
    batches = [(x.to(prep.runtime.device), y.to(prep.runtime.device)) for x, y in loader]
    counter = {"i": 0}

    def loss_fn(projected: dict[str, Tensor]) -> Tensor:
        x, y = batches[counter["i"] % len(batches)]
        counter["i"] += 1
        visual = {k: v for k, v in projected.items() if k.startswith("visual.")}
        f = clip.image_features(model, visual, x)
        return F.cross_entropy(prep.scale * f @ projected["head"].T, y)

    projected, _ = projections.tpgm(tree, loss_fn, anchor=theta0, steps=steps)
    return projected


def main_finetune(config: RunConfig, *, resume: bool) -> dict[str, Any]:
    """Entry point of ``robustft finetune``/``ueo``: set up, run, shut the process group down."""
    runtime = runtime_of(config)
    try:
        return finetune(config, resume=resume, runtime=runtime)
    finally:
        shutdown(runtime)
