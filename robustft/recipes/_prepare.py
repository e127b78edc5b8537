"""What every job prepares before it trains or evaluates: data, model, zero-shot head, evaluator.

:func:`prepare` loads the open_clip model with the checkpoint's own preprocessing, reads the
image folders of a configuration (training, validation, evaluation, shift and out-of-distribution
sets), builds the zero-shot head from the templates and the evaluation replica, and gathers the
facts the run records (:mod:`robustft.recipes._runfolder`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset

from robustft import clip
from robustft.recipes import _runfolder as run
from robustft.recipes._config import NAMED_SETS, UNSUPERVISED, RunConfig
from robustft.recipes._config_file import text_lines
from robustft.recipes._data import FolderDataset, class_names, holdout
from robustft.recipes._evaluate import Evaluator
from robustft.recipes._loop import check_split
from robustft.recipes._methods import DDP_ONLY, lipsum_vocabulary
from robustft.recipes._model import ClipBundle, load_model
from robustft.recipes._nets import visual_tower
from robustft.recipes._runtime import Runtime, init

__all__ = [
    "Data",
    "Prepared",
    "check_runtime",
    "held_out_vocabulary",
    "load_data",
    "main_log",
    "prepare",
    "prompt_head",
    "runtime_of",
    "template_texts",
    "templates_of",
    "zero_shot_head",
    "zero_shot_tree",
]


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
    out = []
    for number, line in enumerate(text_lines(path, name, fn), start=1):
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
    for flag, folder_path in (("--train", config.train), ("--val", config.val)):
        if folder_path and not Path(folder_path).is_dir():
            raise FileNotFoundError(
                f"{flag} {folder_path!r} is not an existing directory (an image folder root: one "
                f"sub-folder per class)"
            )
    for field in NAMED_SETS:
        for set_name, set_path in getattr(config, field).items():
            if not Path(set_path).is_dir():
                raise FileNotFoundError(
                    f"--{field} {set_name}={set_path!r} is not an existing directory"
                )
    if config.classnames and not Path(config.classnames).is_file():
        raise FileNotFoundError(f"--classnames {config.classnames!r} is not an existing file")
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
    log = main_log(runtime)
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
    descriptions = descriptions_of(config, data.names)
    with torch.no_grad():
        if descriptions is None:
            head = clip.zero_shot_head(bundle.model, bundle.tokenizer, data.names, templates)
        else:
            head = clip.description_head(bundle.model, bundle.tokenizer, descriptions, data.names)
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
        **(
            {}
            if descriptions is None
            else {"descriptions": {k: list(v) for k, v in descriptions.items()}}
        ),
        "preprocess": bundle.preprocess,
        "data": data.facts,
    }
    prep = Prepared(runtime, bundle, data, templates, head, scale, evaluator, facts, {})
    prep.cache["descriptions"] = descriptions
    vocabulary = held_out_vocabulary(prep, config)  # read once, here: a bad file fails early
    if vocabulary is not None:  # recorded, so a resumed or evaluated run sees an edited file
        facts["lipsum_vocabulary"] = vocabulary.tolist()
    return prep


def descriptions_of(
    config: RunConfig, classnames: Sequence[str]
) -> dict[str, tuple[str, ...]] | None:
    """The class descriptions of ``--descriptions`` for ``classnames`` (``None`` without it).

    Raises:
        ValueError: a file that is not a JSON object of descriptions for every class; the message
            names the flag.
    """
    if config.descriptions is None:
        return None
    try:
        return clip.load_descriptions(
            Path(config.descriptions).expanduser(),
            list(classnames),
            match=cast(Literal["name", "index", "order"], config.descriptions_match),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"--descriptions {config.descriptions!r}: {err}") from None


def held_out_vocabulary(prep: Prepared, config: RunConfig) -> Tensor | None:
    """``[K]`` the token ids of ``--lipsum-vocabulary`` for the report's held-out random texts, or
    ``None`` (the whole vocabulary); read once per job and kept in ``prep.cache``.

    Raises:
        ValueError: a missing or empty file, or one without tokens (the message names the flag).
    """
    if "lipsum_vocabulary" not in prep.cache:
        prep.cache["lipsum_vocabulary"] = lipsum_vocabulary(config, prep.bundle.tokenizer)
    vocabulary: Tensor | None = prep.cache["lipsum_vocabulary"]
    return vocabulary


def zero_shot_tree(bundle: ClipBundle, head: Tensor) -> dict[str, Tensor]:
    return {
        **{
            f"visual.{n}": p.detach().clone()
            for n, p in visual_tower(bundle.model).named_parameters()
        },
        "head": head,
    }


def prompt_head(prep: Prepared, config: RunConfig) -> Tensor:
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
    return prompt_head(prep, config) if config.method in UNSUPERVISED else prep.head


def main_log(runtime: Runtime) -> Callable[[str], None]:
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
