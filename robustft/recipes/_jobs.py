"""The jobs behind the command line: fine-tune (supervised or unsupervised), post hoc, evaluate.

Each job reads image folders, loads the open_clip model, runs the method through the one loop
(:func:`robustft.recipes._loop.train`) and writes the run folder (what it prepares is in
:mod:`robustft.recipes._prepare`, what it reports in :mod:`robustft.recipes._report`):

- ``config.json``: the resolved configuration (absolute paths);
- ``run.json``: the classes, templates, image preprocessing and data fingerprints the run saw,
  versions, working directory, command line and status (:mod:`robustft.recipes._runfolder`);
- ``metrics.jsonl``: one JSON line per log interval and per validation;
- ``results.json``: every metric of :mod:`robustft.metrics` per evaluation set, for the
  zero-shot model and each reported set of weights (``last``, ``average``, ``best``);
- ``summary.md``: the same as markdown tables, with the shift summary and the energy gap;
- ``last.safetensors`` / ``average.safetensors`` / ``best.safetensors``: the exported
  classifiers (visual tower + head);
- ``checkpoint.pt`` (or ``checkpoint.dcp/`` under FSDP2): the state to ``--resume`` from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Subset

from robustft import clip, distributed, losses, merging, projections
from robustft.recipes import _checkpoint as ckpt
from robustft.recipes import _peft
from robustft.recipes import _runfolder as run
from robustft.recipes._config import SUPERVISED, UNSUPERVISED, RunConfig, lp_strengths
from robustft.recipes._loop import TrainResult, plan, train
from robustft.recipes._methods import Context, build, fit_linear_head
from robustft.recipes._prepare import (
    Prepared,
    check_runtime,
    main_log,
    prepare,
    runtime_of,
    zero_shot_head,
    zero_shot_tree,
)
from robustft.recipes._report import (
    Report,
    load_weights,
    summary_tables,
    weights_metadata,
    write_results,
)
from robustft.recipes._runfolder import RunError
from robustft.recipes._runtime import Runtime, failfast, on_rank0

__all__ = ["evaluate_run", "finetune", "main_evaluate", "main_finetune", "main_posthoc", "posthoc"]


def finetune(
    config: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Run one training job (supervised or unsupervised) and write its run folder.

    Loads the model and the image folders of ``config``, evaluates the zero-shot model, trains
    ``config.method`` through :func:`robustft.recipes.train` (resuming from the run folder's
    checkpoint when ``resume``), then evaluates and saves every reported set of weights. The run
    folder ``config.output`` receives ``config.json`` (absolute paths), ``run.json`` (the classes,
    templates, image preprocessing and data fingerprints the run saw, versions, status),
    ``metrics.jsonl``, ``results.json``, ``summary.md``, the ``*.safetensors`` classifiers and
    the checkpoint. The folder is locked while the job writes it.

    Args:
        config: the resolved configuration (:func:`robustft.recipes.resolve`).
        resume: continue the run in ``config.output`` from its checkpoint; a finished run is left
            as it is (its results are returned).
        overwrite: replace a run already in ``config.output`` (otherwise refused).
        runtime: where to run; ``None`` sets it up from the environment (torchrun or one process).

    Returns:
        The content of ``results.json``: ``{"method", "steps", "train_seconds", "results":
        {weights: {set: metrics}}, "summary": {weights: {...}}}`` (and the linear probe's choice
        for LP-FT).

    Raises:
        RunError: the output folder holds a run (without ``resume``/``overwrite``) or another
            process writes it; ``resume`` of data or settings that changed since the run;
            a file that cannot be written.
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
    command = "finetune" if supervised else "ueo"
    config = run.absolute(config)
    runtime = runtime or runtime_of(config)
    check_runtime(config, runtime)
    out = on_rank0(
        runtime,
        lambda: run.claim(config.output, command=command, overwrite=overwrite, resume=resume),
        f"claim --output {config.output}",
    )
    recorded = run.read_record(out, option="--resume") if resume else {}
    if recorded.get("status") == "finished":
        log = main_log(runtime)
        log(
            f"robustft: run {config.output!r} is already finished; nothing to do (evaluate it on "
            f"other sets with: robustft evaluate --run {config.output} --eval NAME=DIR)"
        )
        return run.read_json(out / "results.json", option="--resume")
    with run.locked(out, active=runtime.main):
        return _finetune(config, out, runtime, resume, recorded, command)


def _finetune(
    config: RunConfig,
    out: Path,
    runtime: Runtime,
    resume: bool,
    recorded: Mapping[str, Any],
    command: str,
) -> dict[str, Any]:
    supervised = config.method in SUPERVISED
    prep = prepare(config, supervised=supervised, runtime=runtime)
    rt, bundle, data = prep.runtime, prep.bundle, prep.data
    log = main_log(rt)
    # a batch the data cannot fill (a pool smaller than the ranks) is refused on every rank
    plan(config, len(data.train), rt.world)  # type: ignore[arg-type]
    if resume:
        run.check_record(
            recorded, prep.facts, where=f"--resume {config.output}", sets=("train", "val")
        )
    if rt.main:
        run.write_json(out / "config.json", config.to_json())
        run.write_record(out, command=command, status="running", **prep.facts)
        if not resume:
            run.atomic_write(out / "metrics.jsonl", "")
    if rt.world > 1:
        torch.distributed.barrier()
    head, extra = prep.head, dict[str, Any]()
    if config.method == "lp-ft":
        head, extra = _linear_probe(prep, config)
    confidence, zero_head = None, zero_shot_head(prep, config)
    if config.method in UNSUPERVISED:  # UEO starts from its prompt's class texts
        confidence = _confidence(prep, config, zero_head)
    # zero-shot results first (the weights are those of the model as loaded)
    report = Report(prep, config)
    report.add("zero-shot", zero_shot_tree(bundle, zero_head))
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
        prep.cache["descriptions"],
    )
    method = build(ctx)
    validate = None
    if data.val is not None:
        val = data.val

        def validate(tree: Mapping[str, Tensor]) -> float:
            prep.evaluator.load(_peft.classifier(dict(tree)))
            return float(prep.evaluator.evaluate(val)["accuracy"])

    log(f"{config.method}: {len(data.train)} training images, {len(data.names)} classes")  # type: ignore[arg-type]
    result: TrainResult = train(
        method, data.train, config, rt, run_dir=out, resume=resume, validate=validate, log=log
    )
    weights = {"last": result.last, "average": result.averaged, "best": result.best}
    meta = weights_metadata(config, prep, "finetune")
    for name, tree in weights.items():
        if tree is None:
            continue
        classifier = _peft.classifier(tree)
        if rt.main:
            ckpt.save_tree(out / f"{name}.safetensors", classifier, metadata=meta)
            if config.peft != "none":
                _peft.save_outputs(out, name, tree, config, bundle, meta)
        report.add(name, classifier)
    payload = {
        "method": config.method,
        "steps": result.history[-1]["step"] if result.history else 0,
        "train_seconds": result.seconds,
        **extra,
        **report.payload(),
    }
    if rt.main:
        log(write_results(out, config.method, payload))
        run.write_record(out, command=command, status="finished", **prep.facts)
    return payload


def _confidence(prep: Prepared, config: RunConfig, text: Tensor) -> Tensor:
    """UEO's per-sample confidence: MSP of the zero-shot cosines (scale 1) with the prompt's
    class texts ``text``.

    Computed once over the training pool with the eval transform, each rank its share and then
    gathered, so every rank holds the same ``[n]`` tensor.
    """
    rt = prep.runtime
    plain = prep.data.train_eval
    n = len(plain)  # type: ignore[arg-type]
    mine = list(range(rt.rank, n, rt.world))
    prep.evaluator.load(zero_shot_tree(prep.bundle, text))
    logits, _ = prep.evaluator.logits_and_labels(Subset(plain, mine))
    conf = losses.ueo_confidence((logits / prep.scale).to(rt.device)).float()
    index = torch.tensor(mine, dtype=torch.long, device=rt.device)
    if rt.world > 1:
        conf = distributed.all_gather_cat(conf, rt.group)
        index = distributed.all_gather_cat(index, rt.group)
    out = torch.empty(n, device=rt.device)
    out[index] = conf
    return out.cpu()


def _linear_probe(prep: Prepared, config: RunConfig) -> tuple[Tensor, dict[str, Any]]:
    """LP-FT's first stage: the logistic-regression head on frozen features, C chosen on val."""
    if prep.data.val is None:
        raise ValueError("lp-ft: needs a validation split to choose the probe's regularisation")
    ev = prep.evaluator
    ev.load(zero_shot_tree(prep.bundle, prep.head))  # the pre-trained tower's features
    x, y = ev.features_and_labels(prep.data.train_eval)
    xv, yv = ev.features_and_labels(prep.data.val)
    strengths = lp_strengths(config.lp_c)
    head, c, scores = fit_linear_head(
        x, y, xv, yv, strengths=strengths, scale=prep.scale, classes=len(prep.data.names)
    )
    return head, {"linear_probe": {"C": c, "val_accuracy": scores}}


def evaluate_run(
    config: RunConfig,
    weights: Sequence[str],
    *,
    recorded: Mapping[str, Any] | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Evaluate saved classifiers on the configuration's validation split and evaluation sets.

    Args:
        config: the run's configuration (model, classes, data, score, open-set TPR).
        weights: ``.safetensors`` classifier files (``{"visual.*", "head"}`` as the runs write
            them), or ``"zero-shot"`` for the model as loaded with its zero-shot head (UEO's
            initial prompt for the unsupervised methods, as the run's own zero-shot row).
        recorded: the run's ``run.json``; the classes, templates, preprocessing and validation
            images are checked against it.
        runtime: where to run; ``None`` sets it up from the environment.

    Returns:
        ``{"results": {weights name: {set: metrics}}, "summary": {...}}`` (the file's stem
        names it).

    Raises:
        FileNotFoundError: if a weights file does not exist.
        RunError: the data or the weights differ from what the run recorded (named), or a file
            is damaged.

    Example:
        >>> from robustft.recipes import resolve, evaluate_run
        >>> config = resolve({"model": "ViT-B-16", "train": "data/train", "eval": ["r=data/r"]})
        >>> evaluate_run(config, ["runs/ft/last.safetensors", "zero-shot"])  # doctest: +SKIP
    """
    missing = [w for w in weights if w != "zero-shot" and not Path(w).is_file()]
    if missing:
        raise FileNotFoundError(f"evaluate: --weights files not found: {missing}")
    prep = prepare(config, supervised=config.method in SUPERVISED, runtime=runtime)
    if recorded:
        run.check_record(recorded, prep.facts, where="evaluate", sets=("train", "val"))
    report = Report(prep, config)
    for w in weights:
        tree = (
            zero_shot_tree(prep.bundle, zero_shot_head(prep, config))
            if w == "zero-shot"
            else load_weights(prep, config, Path(w))
        )
        report.add(Path(w).stem if w != "zero-shot" else w, tree)
    return report.payload()


def posthoc(
    config: RunConfig,
    runs: Sequence[str],
    *,
    kind: str,
    alphas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    tpgm_steps: int = 200,
    weights: str = "last",
    save_weights: bool = False,
    allow_mixed: bool = False,
    overwrite: bool = False,
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
        allow_mixed: combine runs of different methods, models or data splits (refused
            otherwise; runs of different classes are always refused).
        overwrite: replace earlier post-hoc results in ``config.output``.

    Raises:
        RunError: the runs differ in classes (always) or in method, model or splits (unless
            ``allow_mixed``); ``config.output`` holds a run or other results.
    """
    fn = "posthoc"
    kinds = ("wise", "tpgm", "uniform-soup", "greedy-soup")
    if kind not in kinds:
        raise ValueError(f"{fn}: kind must be one of {', '.join(kinds)}, got {kind!r}")
    if weights not in ("last", "average", "best"):
        raise ValueError(f"{fn}: --weights must be last, average or best, got {weights!r}")
    files = [Path(r) / f"{weights}.safetensors" if Path(r).is_dir() else Path(r) for r in runs]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{fn}: --runs must hold {weights}.safetensors, missing {missing}")
    config = run.absolute(config)
    runtime = runtime or runtime_of(config)
    out = on_rank0(
        runtime,
        lambda: run.claim(config.output, command="posthoc", overwrite=overwrite, resume=False),
        f"claim --output {config.output}",
    )
    prep = prepare(config, supervised=True, runtime=runtime)
    _check_mixed(runs, prep, allow_mixed)
    with run.locked(out, active=runtime.main):
        return _posthoc(prep, config, files, out, kind, alphas, tpgm_steps, save_weights)


def _check_mixed(runs: Sequence[str], prep: Prepared, allow_mixed: bool) -> None:
    """Refuse to combine run folders whose classes (always), method, model or splits differ."""
    records = {r: run.read_record(Path(r), option="--runs") for r in runs if Path(r).is_dir()}
    base_name, base = next(iter(records.items()), ("", {}))
    cfg_a = run.read_json(Path(base_name) / "config.json", option="--runs") if records else {}
    for name, rec in records.items():
        change = run.classes_change(
            rec.get("classes", prep.facts["classes"]), prep.facts["classes"]
        )
        if change:
            raise RunError(
                f"posthoc: --runs {name!r} has other classes than {base_name!r}: {change}"
            )
        if allow_mixed or name == base_name:
            continue
        cfg_b = run.read_json(Path(name) / "config.json", option="--runs")
        keys = ["method", "model", "pretrained", "train", "val", "classnames"]
        if cfg_a.get("val") is None and cfg_b.get("val") is None:  # split held out of train
            keys += ["val_fraction", "seed"]
        diff = [k for k in keys if cfg_a.get(k) != cfg_b.get(k)]
        data_a, data_b = base.get("data", {}), rec.get("data", {})
        if data_a and data_b and data_a != data_b:
            diff.append("data fingerprints")
        if diff:
            raise RunError(
                f"posthoc: --runs {base_name!r} and {name!r} differ in {diff}; combining them "
                f"mixes different methods or splits — add --allow-mixed if that is intended"
            )


def _posthoc(
    prep: Prepared,
    config: RunConfig,
    files: Sequence[Path],
    out: Path,
    kind: str,
    alphas: Sequence[float],
    tpgm_steps: int,
    save_weights: bool,
) -> dict[str, Any]:
    rt = prep.runtime
    dev = rt.device
    theta0 = zero_shot_tree(prep.bundle, prep.head)
    trees = [load_weights(prep, config, f) for f in files]
    val = prep.data.val
    meta = weights_metadata(config, prep, kind)
    extra_info: dict[str, Any] = {}
    report = Report(prep, config)
    report.add("zero-shot", theta0)

    def save(name: str, tree: Mapping[str, Tensor]) -> None:
        if rt.main:
            ckpt.save_tree(out / f"{name}.safetensors", tree, metadata=meta)

    if kind == "wise":
        for a in alphas:
            tree = merging.wise(trees[0], anchor=theta0, alpha=float(a))
            report.add(f"wise-{a:g}", tree)
            if save_weights:
                save(f"wise-{a:g}", tree)
    elif kind == "uniform-soup":
        tree = merging.uniform_soup(trees)
        report.add("uniform-soup", tree)
        save("uniform-soup", tree)
    elif kind == "greedy-soup":
        if val is None:
            raise ValueError("posthoc: greedy-soup needs a validation split")

        def score(t: Mapping[str, Tensor]) -> float:
            prep.evaluator.load(t)
            return float(prep.evaluator.evaluate(val)["accuracy"])

        tree, kept = merging.greedy_soup(trees, score)
        report.add("greedy-soup", tree)
        extra_info = {"kept": [str(files[i]) for i in kept]}
        save("greedy-soup", tree)
    else:
        tree = _tpgm(prep, config, trees[0], theta0, tpgm_steps)
        report.add("tpgm", tree)
        save("tpgm", tree)
    del dev
    payload = {
        "posthoc": kind,
        "runs": [str(f) for f in files],
        **extra_info,
        **report.payload(),
    }
    if rt.main:
        main_log(rt)(write_results(out, kind, payload))
        run.write_record(out, command="posthoc", status="finished", **prep.facts)
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


def main_finetune(
    config: RunConfig, *, resume: bool, overwrite: bool = False, debug: bool = False
) -> dict[str, Any]:
    """Entry point of ``robustft finetune``/``ueo``: set up, run, end the process group (every
    rank stops at once if one fails)."""
    runtime = runtime_of(config)
    with failfast(runtime, debug=debug):
        return finetune(config, resume=resume, overwrite=overwrite, runtime=runtime)


def main_posthoc(
    config: RunConfig, runs: Sequence[str], *, debug: bool = False, **options: Any
) -> dict[str, Any]:
    """Entry point of ``robustft posthoc``."""
    runtime = runtime_of(config)
    with failfast(runtime, debug=debug):
        return posthoc(config, runs, runtime=runtime, **options)


def main_evaluate(
    config: RunConfig,
    weights: Sequence[str],
    *,
    recorded: Mapping[str, Any],
    output: str | None,
    overwrite: bool,
    debug: bool = False,
) -> dict[str, Any]:
    """Entry point of ``robustft evaluate``: print the tables; with ``output``, also write
    ``results.json`` and ``summary.md`` there (a new folder, never a run folder)."""
    runtime = runtime_of(config)
    with failfast(runtime, debug=debug):
        out = None
        if output is not None:
            out = on_rank0(
                runtime,
                lambda: run.claim(output, command="evaluate", overwrite=overwrite, resume=False),
                f"claim --output {output}",
            )
        payload = evaluate_run(config, weights, recorded=recorded, runtime=runtime)
        if runtime.main:
            if out is not None:
                with run.locked(out):
                    print(write_results(out, "evaluate", payload))
                    run.write_record(
                        out, command="evaluate", status="finished", weights=list(weights)
                    )
            else:
                print(summary_tables(payload))
        return payload
