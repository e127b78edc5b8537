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

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset

from robustft import clip, distributed, losses, merging, metrics, projections
from robustft.recipes import _checkpoint as ckpt
from robustft.recipes import _runfolder as run
from robustft.recipes._config import SUPERVISED, UNSUPERVISED, RunConfig, lp_strengths
from robustft.recipes._data import FolderDataset, class_names, holdout
from robustft.recipes._evaluate import Evaluator, format_summary, threshold_at_tpr
from robustft.recipes._loop import TrainResult, check_split, plan, train
from robustft.recipes._methods import DDP_ONLY, Context, build, fit_linear_head
from robustft.recipes._model import ClipBundle, load_model
from robustft.recipes._nets import visual_tower
from robustft.recipes._runfolder import RunError
from robustft.recipes._runtime import Runtime, failfast, init

__all__ = ["Data", "Prepared", "evaluate_run", "finetune", "posthoc", "prepare", "templates_of"]


def templates_of(name: str) -> list[Any]:
    """The zero-shot prompt templates: ``"openai"`` (CLIP's 80 ImageNet templates), ``"simple"``,
    or the path of a text file with one template per line, each holding one ``{}`` for the class
    name (blank lines and lines starting with ``#`` are skipped).

    Raises:
        ValueError: an unknown name, or a file that holds no template or a line without exactly
            one ``{}`` (its number is given).
    """
    from open_clip import zero_shot_metadata as meta

    fn = "--templates"
    if name == "openai":
        return list(meta.OPENAI_IMAGENET_TEMPLATES)
    if name == "simple":
        return ["a photo of a {}."]
    path = Path(name).expanduser()
    if not path.is_file():
        raise ValueError(f"{fn}: must be openai, simple or a text file of templates, got {name!r}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{fn}: cannot read {name!r} as UTF-8 text: {err}") from err
    out = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if (
            text.count("{}") != 1
            or text.replace("{}", "").count("{")
            or "}" in text.replace("{}", "")
        ):
            raise ValueError(
                f"{fn}: line {number} of {name!r} must hold exactly one {{}} for the class name "
                f"(and no other braces), got {text!r}"
            )
        out.append(text)
    if not out:
        raise ValueError(f"{fn}: {name!r} holds no template (one per line, with {{}})")
    return out


def template_texts(templates: Sequence[Any]) -> list[str]:
    """The templates as strings (open_clip's callables applied to ``{}``), as a run records them."""
    return [t("{}") if callable(t) else str(t) for t in templates]


class Data(NamedTuple):
    """The datasets of a run: training (train transform), validation and evaluation sets (eval
    transform), the pure out-of-distribution sets, and what the run records about them."""

    train: Dataset[Any]
    val: Dataset[Any] | None
    evals: Mapping[str, Dataset[Any]]
    folders: list[str]
    names: list[str]
    ood: Mapping[str, Dataset[Any]]
    train_eval: Dataset[Any]
    facts: dict[str, dict[str, Any]]
    skipped: dict[str, int]


def _facts(ds: FolderDataset, root: str) -> dict[str, Any]:
    return {
        "root": str(Path(root).absolute()),
        "images": len(ds.samples),
        "fingerprint": run.fingerprint(ds.samples, ds.root),
    }


def load_data(config: RunConfig, bundle: ClipBundle, *, supervised: bool) -> Data:
    """Image folders of the configuration; the validation split is held out of train if absent.

    Raises:
        ValueError: a supervised training folder with folders outside the classes, a validation
            or evaluation folder that holds no image of a known class (an evaluation set may be
            declared a pure out-of-distribution set with ``--ood``), an unknown
            ``--ood-reference``.
    """
    fn = config.method
    skip = config.skip_bad_images
    folders, names = class_names(config.train, config.classnames)

    def folder(root: str, name: str, transform: Any, **kw: Any) -> FolderDataset:
        return FolderDataset(root, folders, transform, name=name, skip_bad_images=skip, **kw)

    train_ds = folder(config.train, "train", bundle.train_transform)
    val: Dataset[Any] | None
    train_used: Dataset[Any]
    if supervised and not train_ds.known:
        raise ValueError(
            f"{fn}: --train {config.train!r} must hold only the classes of the class names for "
            f"supervised fine-tuning, got images in folders outside them: "
            f"{train_ds.unknown_folders[:5]}"
        )
    facts = {"train": _facts(train_ds, config.train)}
    skipped = {"train": len(train_ds.skipped)}
    plain = copy.copy(train_ds)  # the same images (read once) with the eval transform
    plain.transform = bundle.eval_transform
    if config.val:
        val_ds = folder(config.val, "val", bundle.eval_transform, require_known=True)
        facts["val"] = _facts(val_ds, config.val)
        skipped["val"] = len(val_ds.skipped)
        val, train_used = val_ds, train_ds
    elif supervised:
        keep, held = holdout(train_ds.targets, config.val_fraction, seed=config.seed)
        train_used = Subset(train_ds, keep)
        val = Subset(plain, held)
    else:  # unsupervised: no labels to validate on unless a --val folder is given
        train_used, val = train_ds, None
    evals: dict[str, Dataset[Any]] = {}
    for name, path in {**config.eval, **config.shift}.items():
        ds = folder(path, name, bundle.eval_transform, require_known=True)
        evals[name], skipped[name] = ds, len(ds.skipped)
    ood: dict[str, Dataset[Any]] = {}
    if config.ood:
        reference = config.ood_reference or ("val" if val is not None else next(iter(evals), None))
        base = val if reference == "val" else evals.get(reference or "")
        if base is None:
            raise ValueError(
                f"{fn}: --ood sets are scored against the known images of --ood-reference "
                f"(val or a --eval/--shift name), got {reference!r}; available: "
                f"{(['val'] if val is not None else []) + list(evals)}"
            )
        for name, path in config.ood.items():
            ds = folder(path, name, bundle.eval_transform, ood=True)
            skipped[name] = len(ds.skipped)
            ood[name] = ConcatDataset([base, ds])
    train_eval: Dataset[Any] = Subset(plain, keep) if isinstance(train_used, Subset) else plain
    return Data(train_used, val, evals, folders, names, ood, train_eval, facts, skipped)


HELDOUT_TEXT_SEED = 987_654_321
"""Seed of the held-out random texts of every run's energy gap. Lipsum-FT's training texts of step
``t`` are drawn with seed ``seed * 1_000_003 + t``, which never reaches it for seeds and steps
below ~987."""
HELDOUT_TEXTS = 1000
"""Random texts of the energy-gap diagnostic (length ``--lipsum-length``)."""
GAP_IMAGES = 512
"""Images of an evaluation set the energy gap is measured on when there is no validation split."""


class Prepared(NamedTuple):
    """Everything a job builds before training."""

    runtime: Runtime
    bundle: ClipBundle
    data: Data
    templates: list[Any]
    head: Tensor
    scale: float
    evaluator: Evaluator
    facts: dict[str, Any]
    cache: dict[str, Any]


def runtime_of(config: RunConfig) -> Runtime:
    """The runtime ``config`` asks for (torchrun's process group, device, precision)."""
    return init(
        device=config.device,
        precision=config.precision,
        distributed=config.distributed,
        timeout=config.collective_timeout,
    )


def prepare(
    config: RunConfig, *, supervised: bool = True, runtime: Runtime | None = None
) -> Prepared:
    """Runtime, model, data, zero-shot head, evaluator and the facts a run records."""
    runtime = runtime or runtime_of(config)
    with torch.random.fork_rng(devices=[]):  # a random init (no --pretrained) is seeded: every
        torch.manual_seed(config.seed)  # rank, and a resumed run, builds the same model
        bundle = load_model(
            config.model,
            pretrained=config.pretrained,
            device=runtime.device,
            image_mean=config.image_mean,
            image_std=config.image_std,
            image_resize=config.image_resize,
            image_interpolation=config.image_interpolation,
        )
    data = load_data(config, bundle, supervised=supervised)
    log = _log(runtime)
    for name, count in data.skipped.items():
        if count:
            log(
                f"{config.method}: skipped {count} unreadable image(s) of {name} (--skip-bad-images)"
            )
    if config.pretrained and bundle.preprocess.get("source") == "default":
        log(
            f"{config.method}: warning: no image normalisation is known for {config.pretrained!r} "
            f"(no pretrained tag, no preprocess_cfg, no sidecar); using open_clip's default "
            f"mean {bundle.preprocess['mean']} std {bundle.preprocess['std']} — set "
            f"--image-mean/--image-std to the checkpoint's own"
        )
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
    facts = {
        "classes": [[f, n] for f, n in zip(data.folders, data.names, strict=True)],
        "templates": template_texts(templates),
        "preprocess": bundle.preprocess,
        "data": data.facts,
    }
    return Prepared(runtime, bundle, data, templates, head, scale, evaluator, facts, {})


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
    if "prompt_head" not in prep.cache:
        bundle = prep.bundle
        with torch.no_grad():
            context = clip.init_context(bundle.model, bundle.tokenizer, config.prompt)
            prep.cache["prompt_head"] = clip.encode_text_with_context(
                bundle.model, context, prep.data.names, bundle.tokenizer
            )
    head: Tensor = prep.cache["prompt_head"]
    return head


def zero_shot_head(prep: Prepared, config: RunConfig) -> Tensor:
    """The zero-shot head a run reports and starts from: the templates' (supervised methods) or
    UEO's initial prompt's (unsupervised methods)."""
    return _prompt_head(prep, config) if config.method in UNSUPERVISED else prep.head


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
    if config.batch_size is not None:
        check_split(None, config.batch_size, runtime.world, config.accumulation)
    if runtime.strategy == "fsdp" and config.method in DDP_ONLY:
        raise ValueError(
            f"--distributed fsdp: method {config.method!r} cannot run under FSDP2 "
            f"({DDP_ONLY[config.method]}); use --distributed ddp"
        )


def _agree(runtime: Runtime, work: Callable[[], Any]) -> Any:
    """Run ``work`` on rank 0 and give its result, or its failure, to every rank.

    Every rank then raises the same error (so none is left waiting in a collective), and
    ``work``'s side effects (creating, clearing the run folder) happen once.
    """
    if runtime.world == 1:
        return work()
    box: list[Any] = [None]
    if runtime.main:
        try:
            box[0] = ("ok", work())
        except (RunError, ValueError, FileNotFoundError) as err:
            box[0] = ("error", type(err).__name__, str(err))
    torch.distributed.broadcast_object_list(box, src=0, group=runtime.group)
    if box[0][0] == "error":
        kinds = {"RunError": RunError, "ValueError": ValueError}
        raise kinds.get(box[0][1], FileNotFoundError)(box[0][2])
    return box[0][1]


def _weights_metadata(config: RunConfig, prep: Prepared, kind: str) -> dict[str, str]:
    """What every exported weight file records: its job, the classes and the preprocessing."""
    return {
        "robustft": json.dumps(
            {
                "kind": kind,
                "method": config.method,
                "model": config.model,
                "pretrained": config.pretrained,
                "classes": prep.facts["classes"],
                "preprocess": prep.facts["preprocess"],
            }
        )
    }


def _write_results(out: Path, title: str, payload: Mapping[str, Any]) -> str:
    """Write ``results.json`` and ``summary.md`` (atomically); return the summary's tables."""
    text = summary_tables(payload)
    run.write_json(out / "results.json", payload)
    run.atomic_write(out / "summary.md", f"# {title}\n\n{text}\n")
    return text


def _record(out: Path, prep: Prepared, config: RunConfig, *, command: str, status: str) -> None:
    import sys

    record = {
        "command": command,
        "status": status,
        "argv": sys.argv,
        "cwd": str(Path.cwd()),
        "versions": run.versions(),
        **prep.facts,
    }
    run.write_json(out / "run.json", record)


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
    out = _agree(
        runtime,
        lambda: run.claim(config.output, command=command, overwrite=overwrite, resume=resume),
    )
    recorded = run.read_record(out, option="--resume") if resume else {}
    if recorded.get("status") == "finished":
        log = _log(runtime)
        log(
            f"robustft: run {config.output!r} is already finished; nothing to do (evaluate it on "
            f"other sets with: robustft evaluate --run {config.output} --eval NAME=DIR)"
        )
        saved: dict[str, Any] = json.loads((out / "results.json").read_text(encoding="utf-8"))
        return saved
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
    log = _log(rt)
    # a batch the data cannot fill (a pool smaller than the ranks) is refused on every rank
    plan(config, len(data.train), rt.world)  # type: ignore[arg-type]
    if resume:
        run.check_record(
            recorded, prep.facts, where=f"--resume {config.output}", sets=("train", "val")
        )
    if rt.main:
        run.write_json(out / "config.json", config.to_json())
        _record(out, prep, config, command=command, status="running")
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
    report.add("zero-shot", _zero_shot_tree(bundle, zero_head))
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
    meta = _weights_metadata(config, prep, "finetune")
    for name, tree in weights.items():
        if tree is None:
            continue
        if rt.main:
            ckpt.save_tree(out / f"{name}.safetensors", tree, metadata=meta)
        report.add(name, tree)
    payload = {
        "method": config.method,
        "steps": result.history[-1]["step"] if result.history else 0,
        "train_seconds": result.seconds,
        **extra,
        **report.payload(),
    }
    if rt.main:
        log(_write_results(out, config.method, payload))
        _record(out, prep, config, command=command, status="finished")
    return payload


class Report:
    """The results of a job: every set of weights it evaluates, then the summary."""

    def __init__(self, prep: Prepared, config: RunConfig):
        self.prep, self.config = prep, config
        self.results: dict[str, dict[str, Any]] = {}
        self.gaps: dict[str, dict[str, Any] | None] = {}

    def add(self, name: str, tree: Mapping[str, Tensor]) -> None:
        """Evaluate ``tree`` on every set (and its energy gap) under ``name``."""
        self.results[name], self.gaps[name] = _evaluate(self.prep, self.config, tree)

    def payload(self) -> dict[str, Any]:
        """``{"results": {weights: {set: metrics}}, "summary": {weights: {...}}}``."""
        return {
            "results": self.results,
            "summary": summarise(self.results, self.gaps, self.config),
        }


def summarise(
    results: Mapping[str, Mapping[str, Any]],
    gaps: Mapping[str, Mapping[str, Any] | None],
    config: RunConfig,
) -> dict[str, dict[str, Any]]:
    """Per set of weights: mean and worst accuracy over the ``--shift`` sets (the numbers CLIPood
    and Lipsum-FT tabulate) and the energy gap to the zero-shot model on held-out random texts."""
    out: dict[str, dict[str, Any]] = {}
    for weights, sets in results.items():
        gap = gaps.get(weights)
        row: dict[str, Any] = {
            "energy_gap": None if gap is None else gap["value"],
            "energy_gap_set": None if gap is None else gap["set"],
        }
        accs = {
            n: sets[n]["accuracy"]
            for n in config.shift
            if sets.get(n, {}).get("accuracy") is not None
        }
        if accs:
            worst = min(accs, key=accs.__getitem__)
            row.update(
                shift_mean_accuracy=sum(accs.values()) / len(accs),
                shift_worst_accuracy=accs[worst],
                shift_worst_set=worst,
            )
        out[weights] = row
    return out


def summary_tables(payload: Mapping[str, Any]) -> str:
    """The markdown of ``summary.md``: every metric per (weights, set), then the shift summary
    and the energy gap per set of weights."""
    text = format_summary(payload["results"])
    summary = payload.get("summary") or {}
    if summary:
        lines = [
            "",
            "| weights | shift mean acc | shift worst acc (set) | energy gap |",
            "|---|---|---|---|",
        ]
        for w, row in summary.items():
            mean, worst = row.get("shift_mean_accuracy"), row.get("shift_worst_accuracy")
            gap = row.get("energy_gap")
            mean_text = "–" if mean is None else f"{100 * mean:.1f}"
            worst_text = "–" if worst is None else f"{100 * worst:.1f} ({row['shift_worst_set']})"
            gap_text = "–" if gap is None else f"{gap:.4g}"
            lines.append(f"| {w} | {mean_text} | {worst_text} | {gap_text} |")
        text += "\n" + "\n".join(lines)
    return text


def _bank(prep: Prepared, config: RunConfig) -> Tensor:
    """``[texts, dim]`` the held-out random texts of the energy gap (encoded once per job)."""
    if "bank" not in prep.cache:
        g = torch.Generator().manual_seed(HELDOUT_TEXT_SEED)
        bank = clip.RandomTextBank.from_model(
            prep.bundle.model,
            HELDOUT_TEXTS,
            length=config.lipsum_length,
            tokenizer=prep.bundle.tokenizer,
            generator=g,
            device=prep.runtime.device,
        )
        prep.cache["bank"] = bank.features.float().cpu()
    bank_features: Tensor = prep.cache["bank"]
    return bank_features


def _gap_set(prep: Prepared) -> tuple[str, Dataset[Any]] | None:
    """The images the energy gap is measured on: the validation split, else the first
    ``GAP_IMAGES`` of the first evaluation set."""
    if prep.data.val is not None:
        return "val", prep.data.val
    for name, ds in prep.data.evals.items():
        return name, Subset(ds, list(range(min(GAP_IMAGES, len(ds)))))  # type: ignore[arg-type]
    return None


def _evaluate(
    prep: Prepared, config: RunConfig, tree: Mapping[str, Tensor]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Metrics of ``tree`` on the validation split, every evaluation set and every OOD set, and
    its energy gap; the open-set threshold accepts ``config.tpr`` of the validation knowns (no
    threshold without a labelled validation split)."""
    ev = prep.evaluator
    gap_set = _gap_set(prep)
    if gap_set is not None and "f0" not in prep.cache:  # the pre-trained tower's features
        ev.load(_zero_shot_tree(prep.bundle, prep.head))
        prep.cache["f0"] = ev.features_and_labels(gap_set[1])[0]
    ev.load(tree)
    threshold = None
    out: dict[str, Any] = {}
    features = None
    if prep.data.val is not None:  # one pass: the threshold, the split's metrics, the gap
        features, logits, labels = ev._pass(prep.data.val)
        threshold = threshold_at_tpr(ev.score(logits[labels >= 0]), config.tpr)
        out["val"] = ev.evaluate_logits(logits, labels, threshold=threshold)
    for name, ds in prep.data.evals.items():
        out[name] = ev.evaluate(ds, threshold=threshold, classes=_present(config, ds))
    for name, ds in prep.data.ood.items():
        out[f"ood:{name}"] = ev.evaluate(ds, threshold=threshold)
    if gap_set is not None:
        if features is None:
            features = ev.features_and_labels(gap_set[1])[0]
        gap = metrics.energy_gap(
            features,
            reference_features=prep.cache["f0"],
            text_features=_bank(prep, config),
            logit_scale=prep.scale,
        )
        return out, {"value": float(gap), "set": gap_set[0], "texts": HELDOUT_TEXTS}
    return out, None


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
    x, y = ev.features_and_labels(prep.data.train_eval)
    xv, yv = ev.features_and_labels(prep.data.val)
    strengths = lp_strengths(config.lp_c)
    head, c, scores = fit_linear_head(
        x, y, xv, yv, strengths=strengths, scale=prep.scale, classes=len(prep.data.names)
    )
    return head, {"linear_probe": {"C": c, "val_accuracy": scores}}


def _load_weights(prep: Prepared, config: RunConfig, path: Path) -> dict[str, Tensor]:
    """A classifier file, checked against the run: the model's shapes and, when the file records
    them, the run's classes and preprocessing."""
    like = _zero_shot_tree(prep.bundle, prep.head)
    meta = ckpt.read_metadata(path).get("robustft")
    if meta:
        saved = json.loads(meta)
        change = run.classes_change(
            saved.get("classes", prep.facts["classes"]), prep.facts["classes"]
        )
        if change:
            raise RunError(
                f"weights {str(path)!r} were trained on other classes than this run's: {change}"
            )
    return ckpt.load_tree(path, prep.runtime.device, like=like)


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
            _zero_shot_tree(prep.bundle, zero_shot_head(prep, config))
            if w == "zero-shot"
            else _load_weights(prep, config, Path(w))
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
    out = _agree(
        runtime,
        lambda: run.claim(config.output, command="posthoc", overwrite=overwrite, resume=False),
    )
    prep = prepare(config, supervised=True, runtime=runtime)
    _check_mixed(runs, prep, allow_mixed)
    with run.locked(out, active=runtime.main):
        return _posthoc(prep, config, files, out, kind, alphas, tpgm_steps, save_weights)


def _check_mixed(runs: Sequence[str], prep: Prepared, allow_mixed: bool) -> None:
    """Refuse to combine run folders whose classes (always), method, model or splits differ."""
    records = {r: run.read_record(Path(r), option="--runs") for r in runs if Path(r).is_dir()}
    base_name, base = next(iter(records.items()), ("", {}))
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
        cfg_a = json.loads((Path(base_name) / "config.json").read_text(encoding="utf-8"))
        cfg_b = json.loads((Path(name) / "config.json").read_text(encoding="utf-8"))
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
    theta0 = _zero_shot_tree(prep.bundle, prep.head)
    trees = [_load_weights(prep, config, f) for f in files]
    val = prep.data.val
    meta = _weights_metadata(config, prep, kind)
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
        _log(rt)(_write_results(out, kind, payload))
        _record(out, prep, config, command="posthoc", status="finished")
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
            out = _agree(
                runtime,
                lambda: run.claim(output, command="evaluate", overwrite=overwrite, resume=False),
            )
        payload = evaluate_run(config, weights, recorded=recorded, runtime=runtime)
        if runtime.main:
            if out is not None:
                with run.locked(out):
                    print(_write_results(out, "evaluate", payload))
                    record = {
                        "command": "evaluate",
                        "status": "finished",
                        "weights": list(weights),
                        "cwd": str(Path.cwd()),
                        "versions": run.versions(),
                    }
                    run.write_json(out / "run.json", record)
            else:
                print(summary_tables(payload))
        return payload
