"""The configuration of a recipe run: one dataclass, per-method defaults from the papers (SPEC §7).

Every field is a command-line flag of the same name (``--batch-size`` for ``batch_size``) and a
key of the YAML/JSON file given with ``--config``; flags override the file, the file overrides
the method's defaults, and the method's defaults override the generic ones. The resolved
configuration is written to ``config.json`` in the run folder, and ``--resume RUN`` reads it back.

Every value, from a flag, a file or Python, passes the same check (one rule per field, in
``_RULES``): a boolean must be ``true``/``false`` (``'no'``, ``"yes"``, ``1`` are refused, never
read as truthy), an integer an integer (not ``2.5``, ``"3"`` or ``true``), a number a finite
number. A refused value gets one line that names the flag and the file key, what is allowed and
what was given::

    resolve: --batch-size (batch_size in a config file) must be an integer >= 1, got 0

The rules are in ``_config_rules``; config files (keys spelled with dashes too, YAML 1.2's
scalars) are read by ``_config_file``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from robustft._checks import describe
from robustft.recipes._config_file import load_config_file
from robustft.recipes._config_rules import Rule, _RuleError, _strengths, field_rules

__all__ = [
    "AVERAGES",
    "METHODS",
    "METHOD_DEFAULTS",
    "SCORES",
    "RunConfig",
    "flag_of",
    "load_config_file",
    "lp_strengths",
    "resolve",
]

SUPERVISED = (
    "ft", "lp-ft", "l2sp", "kd", "car-ft", "feature-kd", "flyp", "lipsum", "clipood", "r-adapter",
    "clip-lora", "tracer",
)  # fmt: skip
UNSUPERVISED = ("ueo", "entropy", "im")
METHODS = SUPERVISED + UNSUPERVISED
"""Every trainable method, supervised first (``robustft finetune``), then unsupervised
(``robustft ueo``)."""
AVERAGES = ("none", "ema", "bma", "uniform")
"""The trajectory averages of ``--average`` (:mod:`robustft.averaging`; ``none`` keeps none)."""
SCORES = ("msp", "mcm", "energy", "max_logit")
"""The OOD scores of ``--score`` (``mcm``: MSP of the cosines at scale 1, UEO's score)."""
PEFT = ("none", "lora", "adapter")
"""The parameter-efficient reparametrisations of ``--peft`` (:mod:`robustft.peft`)."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a training run; ``None`` means "the method's default".

    See :data:`METHOD_DEFAULTS` for the per-method values and ``robustft finetune --help`` for
    the meaning of each field (the help strings below).
    """

    # what
    method: str = _f("ft", "the method: " + ", ".join(METHODS), choices=METHODS)
    model: str = _f("ViT-B-16", "open_clip model name, or a path to an open_clip model config JSON")
    pretrained: str | None = _f(
        None,
        "open_clip pretrained tag (e.g. openai) or a local checkpoint file; none = random init",
    )
    # data
    train: str = _f("", "ImageFolder root of the training images (one folder per class)")
    val: str | None = _f(None, "ImageFolder root of the validation split; none = held out of train")
    val_fraction: float = _f(0.1, "fraction of each class held out of train when --val is absent")
    eval: dict[str, str] = dataclasses.field(
        default_factory=dict,
        metadata={
            "help": "evaluation set NAME=DIR (repeatable); folders outside the classes are "
            "unknown classes (open set)",
            "repeat": True,
        },
    )
    shift: dict[str, str] = dataclasses.field(
        default_factory=dict,
        metadata={
            "help": "evaluation set NAME=DIR that is a distribution shift of the training data "
            "(repeatable): evaluated like --eval, and summarised as the mean and worst accuracy "
            "over the shifts",
            "repeat": True,
        },
    )
    ood: dict[str, str] = dataclasses.field(
        default_factory=dict,
        metadata={
            "help": "pure out-of-distribution set NAME=DIR (repeatable): every image is unknown, "
            "whatever its folders; scored by AUROC/FPR@95 against --ood-reference's known images",
            "repeat": True,
        },
    )
    ood_reference: str | None = _f(
        None,
        "the in-distribution set the --ood sets are scored against: val or a --eval/--shift "
        "name (default: the validation split, else the first evaluation set)",
    )
    classnames: str | None = _f(
        None, "class names file: one class per line, 'folder' or 'folder<TAB>name'; or JSON"
    )
    eval_classes: str = _f(
        "all",
        "classes an evaluation set is scored over: all, or present (only those with a folder in "
        "the set, as ImageNet-R/-A score 200 of the 1000 classes)",
        choices=("all", "present"),
    )
    templates: str = _f(
        "openai",
        "zero-shot head prompts: openai (CLIP's 80 templates), simple (1), or a text file of "
        "templates, one per line, each with one {} for the class name",
    )
    descriptions: str | None = _f(
        None,
        "class descriptions, a JSON file {class: [description, ...]} (CuPL / DRM layout): the "
        "zero-shot head averages each class's descriptions instead of the templates",
    )
    descriptions_match: str = _f(
        "name",
        "how --descriptions' entries find their classes: name (keys are class names), index "
        "(keys '0'..'C-1') or order (the file's order, as DRM reads its files)",
        choices=("name", "index", "order"),
    )
    skip_bad_images: bool = _f(
        False,
        "skip images that cannot be decoded (reported with their count) instead of stopping",
    )
    # image preprocessing (default: the pretrained tag's, the model config's preprocess_cfg, or a
    # <checkpoint>.json sidecar next to a local checkpoint; else open_clip's OpenAI values)
    image_mean: list[float] | None = dataclasses.field(
        default=None, metadata={"help": "per-channel normalisation mean (3 numbers)"}
    )
    image_std: list[float] | None = dataclasses.field(
        default=None, metadata={"help": "per-channel normalisation std (3 numbers)"}
    )
    image_resize: str | None = _f(
        None,
        "resize mode of the eval transform: shortest, longest or squash",
        choices=("shortest", "longest", "squash"),
    )
    image_interpolation: str | None = _f(
        None, "resize interpolation: bicubic or bilinear", choices=("bicubic", "bilinear")
    )
    output: str = _f("runs/run", "run folder (created; config, metrics, results, weights)")
    # optimisation
    steps: int | None = _f(None, "optimiser steps (default: the method's, or from --epochs)")
    epochs: float | None = _f(None, "epochs instead of --steps (UEO's protocol: 5)")
    batch_size: int | None = _f(None, "global batch per optimiser step, over all ranks")
    accumulation: int = _f(1, "gradient-accumulation micro-steps per optimiser step")
    optimizer: str | None = _f(None, "adamw or sgd", choices=("adamw", "sgd"))
    lr: float | None = _f(None, "peak learning rate")
    weight_decay: float | None = _f(None, "decoupled (AdamW) or L2 (SGD) weight decay")
    momentum: float = _f(0.0, "SGD momentum (UEO uses none)")
    warmup: float | None = _f(None, "linear warm-up, as a fraction of the steps")
    schedule: str = _f(
        "cosine", "cosine or constant after the warm-up", choices=("cosine", "constant")
    )
    grad_clip: float | None = _f(None, "clip the global gradient norm to this value")
    average: str | None = _f(None, "trajectory average: " + ", ".join(AVERAGES), choices=AVERAGES)
    ema_decay: float = _f(0.999, "EMA decay per step")
    bma_beta: float = _f(0.5, "BMA's Beta(β, β) (CLIPood: 0.5; 0.1 for open classes)")
    # method hyper-parameters (the papers' units)
    margin: float = _f(
        0.3,
        "CLIPood: margin λ of the margin metric softmax; r-adapter: MPM-NCE's margin δ on the "
        "negatives' cosines (0.05)",
    )
    cross_norm: float = _f(
        0.0,
        "tracer: weight c of the Frobenius norm of the two towers' projections' product, "
        "c·||W_v W_t^T||_F (TRACER's scripts: 0.05)",
    )
    label_smoothing: float = _f(
        0.0, "r-adapter: MPM-NCE's label smoothing ε of the soft multi-positive targets"
    )
    reg_weight: float | None = _f(
        None, "weight of the regulariser: L2-SP, KD, CAR-FT, FeatKD or Lipsum-FT's λ"
    )
    temperature: float = _f(1.0, "KD temperature")
    lipsum_texts: int = _f(80, "Lipsum-FT: random texts per step (M)")
    lipsum_length: int = _f(8, "Lipsum-FT: tokens per random text (L)")
    lipsum_vocabulary: str | None = _f(
        None,
        "Lipsum-FT: a text file (one text per line) whose tokens form the random texts' "
        "vocabulary; default: the tokenizer's whole vocabulary, as the official code — CLIP has "
        "seen it all",
    )
    lipsum_rescale: bool = _f(
        True,
        "Lipsum-FT: multiply λ by (100/s)², which keeps the penalty's stiffness per unit cosine "
        "on a model whose logit scale s is not 100 — not its balance with the cross-entropy, "
        "whose gradient also scales with s (SPEC §4); off: λ as given",
    )
    trade_off: float = _f(1.0, "UEO/IM: weight γ of the marginal-entropy term")
    ueo_scale: float = _f(
        100.0,
        "UEO/IM/entropy: the logit scale of the training loss, logits = scale·cos (the official "
        "code's fixed 100); 0: the model's own logit scale s",
    )
    prompt: str = _f(
        "a photo of a",
        "UEO: the words the learned context starts from; clip-lora: its class prompts are "
        "'<prompt> <class>.'",
    )
    lp_c: str = _f("0.01,0.1,1,10,100", "LP-FT: logistic-regression strengths to pick on val")
    # parameter-efficient fine-tuning (robustft.peft): factors on the trained towers' weights
    peft: str = _f(
        "none",
        "train low-rank factors instead of the towers' weights: none, lora (W + s·BA) or "
        "adapter (R-Adapter's (I + W_adp)·W)",
        choices=PEFT,
    )
    peft_rank: int | None = _f(
        None, "rank r of the factors (default: lora 8; adapter full rank, 0 for full rank)"
    )
    peft_alpha: float | None = _f(
        None, "LoRA's α (default: the rank, so s = 1 with --peft-scaling rank)"
    )
    peft_scaling: str = _f(
        "rank",
        "LoRA's s: rank (α/r, LoRA and Hugging Face peft) or sqrt_rank (α/√r, rsLoRA, CLIP-LoRA)",
        choices=("rank", "sqrt_rank"),
    )
    peft_targets: str | None = _f(
        None,
        "comma-separated globs of the 2-d weights to reparametrise, matched against the open_clip "
        "model's names (default: lora *attn.in_proj_weight; adapter "
        "*attn.out_proj.weight,*mlp.c_proj.weight); only the towers the method trains",
    )
    peft_qkv: str | None = _f(
        None,
        "LoRA: give these blocks of a fused attention in_proj_weight their own factors, e.g. "
        "q,k,v (CLIP-LoRA) or q,v; default: the fused weight as one matrix",
    )
    peft_dropout: float = _f(0.0, "LoRA: dropout on the low-rank branch's input (CLIP-LoRA 0.25)")
    peft_drop: float = _f(0.0, "adapter: adapter-dropping probability p per step (R-Adapter 0.2)")
    peft_rescale: float = _f(
        1.0,
        "scale the learned update ΔW by this α when exporting (WiSE-FT on ΔW; R-Adapter 0.5); "
        "the saved factors are the trained ones",
    )
    # evaluation
    score: str | None = _f(None, "OOD score: msp, mcm (MSP at scale 1, UEO's), energy, max_logit")
    tpr: float = _f(0.95, "open-set threshold: accept this fraction of the validation knowns")
    eval_every: int = _f(0, "evaluate the validation split every N steps (0: at the end only)")
    select: str = _f(
        "last", "weights reported: last or best (on validation accuracy)", choices=("last", "best")
    )
    # runtime
    seed: int = _f(0, "seed of the data order, augmentation and random texts")
    precision: str = _f(
        "auto", "auto (bf16 autocast on GPU), fp32 or bf16", choices=("auto", "fp32", "bf16")
    )
    device: str | None = _f(None, "device (default: cuda if available, else cpu)")
    distributed: str = _f("ddp", "under torchrun: ddp or fsdp (FSDP2)", choices=("ddp", "fsdp"))
    workers: int = _f(4, "DataLoader worker processes per rank")
    log_every: int = _f(10, "steps between metrics.jsonl lines")
    save_every: int = _f(100, "steps between resumable checkpoints (0: only at the end)")
    progress: bool = _f(True, "show a tqdm progress bar on rank 0")
    collective_timeout: float = _f(
        600.0,
        "under torchrun: seconds a rank may wait in a collective (a stopped or hung peer) before "
        "the whole job fails",
    )
    nonfinite: str = _f(
        "stop",
        "on a non-finite loss: stop (at that step, naming it and the last good checkpoint) or "
        "skip (drop that step's update and count it)",
        choices=("stop", "skip"),
    )

    def to_json(self) -> dict[str, Any]:
        """The configuration as a JSON-able dict (every field)."""
        return dataclasses.asdict(self)


# FT as WiSE-FT / FLYP fine-tune CLIP: AdamW, weight decay 0.1, 10 % warm-up + cosine, batch 256
_FT: dict[str, Any] = dict(
    optimizer="adamw", lr=1e-5, weight_decay=0.1, warmup=0.1, batch_size=256, steps=5000,
    average="none",
)  # fmt: skip
# UEO (Liang et al. 2024, code): SGD lr 1e-4 without momentum, cosine per iteration, batch 64,
# 5 epochs, γ = 1, MSP at scale 1 as the OOD score; its baselines train the same way
_UEO: dict[str, Any] = dict(
    optimizer="sgd", lr=1e-4, weight_decay=0.0, warmup=0.0, batch_size=64, epochs=5.0,
    average="none", score="mcm",
)  # fmt: skip

METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "ft": _FT,
    "lp-ft": _FT,
    "l2sp": {**_FT, "weight_decay": 0.0, "reg_weight": 0.1},  # the penalty replaces the decay
    "kd": {**_FT, "reg_weight": 1.0},
    "car-ft": {**_FT, "reg_weight": 1.0},
    "feature-kd": {**_FT, "reg_weight": 1.0},
    "flyp": _FT,
    # Lipsum-FT (Nam et al. 2024, code): AdamW lr 1e-5, no weight decay, batch 256, 10 % warm-up
    # + cosine, M = 80, L = 8, λ = 1 at the paper's scale 100 (SPEC §4)
    "lipsum": {**_FT, "weight_decay": 0.0, "reg_weight": 1.0},
    # CLIPood (Shu et al. 2023, code): AdamW lr 1e-5, wd 0.1, cosine without warm-up, batch 36,
    # λ 0.3, BMA β 0.5
    "clipood": {**_FT, "warmup": 0.0, "batch_size": 36, "average": "bma"},
    # R-Adapter (Kim et al. 2024): full-rank adapters after every attention and MLP block of both
    # towers, adapter dropping 0.2, EMA 0.999 of the adapters, re-scaling 0.5, MPM-NCE (δ 0.05,
    # label smoothing), AdamW lr 5e-4 without weight decay, cosine with warm-up, 10 epochs
    "r-adapter": {
        **_FT,
        "lr": 5e-4,
        "weight_decay": 0.0,
        "average": "ema",
        "ema_decay": 0.999,
        "margin": 0.05,
        "label_smoothing": 0.1,
        "peft": "adapter",
        "peft_drop": 0.2,
        "peft_rescale": 0.5,
        "peft_targets": "*attn.out_proj.weight,*mlp.c_proj.weight",
    },
    # CLIP-LoRA (Zanella & Ben Ayed 2024, code): r 2, α 1 at α/√r, dropout 0.25 on q/k/v of both
    # towers, AdamW lr 2e-4, weight decay 0.01, batch 32, cosine without warm-up, 500 × shots
    # iterations (8000 for its 16 shots)
    "clip-lora": {
        **_FT,
        "lr": 2e-4,
        "weight_decay": 0.01,
        "warmup": 0.0,
        "batch_size": 32,
        "steps": 8000,
        "peft": "lora",
        "peft_rank": 2,
        "peft_alpha": 1.0,
        "peft_scaling": "sqrt_rank",
        "peft_dropout": 0.25,
        "peft_qkv": "q,k,v",
        "peft_targets": "*attn.in_proj_weight",
    },
    # TRACER (ICML'26, code HesamAsad/TRACER, example_scripts/tracer_beta.sh and src/args.py):
    # FLYP's loss on both towers + distil_coef 0.9 × the four views against the Beta(½, ½)
    # trajectory average updated every step; AdamW lr 1e-5, wd 0.1, batch 512, 500 warm-up steps
    # (2 % of its 10 ImageNet epochs), cosine, no gradient clipping, cross_fnorm 0.05
    "tracer": {
        **{k: v for k, v in _FT.items() if k != "steps"},
        "epochs": 10.0,
        "batch_size": 512,
        "warmup": 0.02,
        "average": "bma",
        "bma_beta": 0.5,
        "reg_weight": 0.9,
        "cross_norm": 0.05,
    },
    "ueo": _UEO,
    "entropy": {**_UEO, "trade_off": 0.0},  # entropy minimisation: no marginal term
    "im": _UEO,  # information maximisation: UEO's objective with uniform weights
}
"""Per-method defaults (SPEC §7); a value the user sets always wins."""


NAMED_SETS = ("eval", "shift", "ood")
"""The fields that hold named image folders (``NAME=DIR``); a name is used once over all three."""
_FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(RunConfig)}


def flag_of(name: str) -> str:
    """How a message names field ``name``: its flag, then its key in a config file.

    Args:
        name: a field of :class:`RunConfig`.

    Returns:
        ``"--flag-name (field_name in a config file)"``, the subject of every message of
        :func:`resolve` about that field.

    Example:
        >>> flag_of("batch_size")
        '--batch-size (batch_size in a config file)'
    """
    return f"--{name.replace('_', '-')} ({name} in a config file)"


_RULES: dict[str, Rule] = field_rules(_FIELDS, methods=METHODS, scores=SCORES)
"""Every field's check, one rule per field (``None`` is never checked: it means unset)."""


def _check_field(fn: str, name: str, value: Any) -> Any:
    """Field ``name``'s value as stored, or the one-line error naming its flag."""
    try:
        return _RULES[name](value)
    except _RuleError as bad:
        raise bad.kind(f"{fn}: {flag_of(name)} {bad.text}") from None


def lp_strengths(lp_c: Any) -> list[float]:
    """LP-FT's logistic-regression strengths (``RunConfig.lp_c``) as numbers.

    Args:
        lp_c: ``"0.01,0.1,1"``, a list of numbers or one number.

    Returns:
        The strengths, in the order given.

    Raises:
        TypeError: ``lp_c`` is neither text nor numbers.
        ValueError: an entry is not a finite number > 0, or there is none (``","``).

    Example:
        >>> lp_strengths("0.01,0.1, 1")
        [0.01, 0.1, 1.0]
    """
    try:
        return _strengths(lp_c)
    except _RuleError as bad:
        raise bad.kind(f"resolve: {flag_of('lp_c')} {bad.text}") from None


def _unknown_keys(fn: str, unknown: Sequence[Any]) -> str:
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key).replace("-", "_"), list(_FIELDS), n=2)
        parts.append(f"{key!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return (
        f"{fn}: unknown configuration key{'s' if len(unknown) > 1 else ''} {', '.join(parts)}; "
        "the keys are the names of the flags of robustft finetune --help, with _ for -"
    )


def resolve(overrides: Mapping[str, Any], *, method: str | None = None) -> RunConfig:
    """Build the resolved configuration: generic defaults < method defaults < ``overrides``.

    Every value is checked as its flag is (``_RULES``: booleans only ``True``/``False``,
    integers only integers, numbers finite), then the fields that depend on each other: a set
    name is used once over ``eval``, ``shift`` and ``ood``, ``ood_reference`` names ``val`` or an
    ``eval``/``shift`` set, ``batch_size`` splits into ``accumulation`` micro-steps, ``select``
    ``best`` needs ``eval_every``. The run's length is ``steps`` or ``epochs``: either one the
    user gives replaces the method's default length (UEO's 5 epochs, the supervised methods'
    5000 steps), and giving both is an error. ``resolve(config.to_json())`` gives ``config``
    back.

    Args:
        overrides: field values set by the user (flags and/or a file); ``None`` values are unset.
        method: the method, if not in ``overrides``.

    Returns:
        The :class:`RunConfig` with every per-method default filled in.

    Raises:
        ValueError: on an unknown field (with close matches), an unknown method or choice, an
            out-of-range value, or fields that contradict each other; the message names the
            flag, e.g. ``resolve: --lr (lr in a config file) must be a finite number > 0, got 0``.
        TypeError: on a value of the wrong type (``'no'`` for a boolean, ``2.5`` for an integer).

    Example:
        >>> config = resolve({"train": "data/train", "lr": 3e-5}, method="clipood")
        >>> config.optimizer, config.lr, config.weight_decay, config.average, config.batch_size
        ('adamw', 3e-05, 0.1, 'bma', 36)
    """
    fn = "resolve"
    if not isinstance(overrides, Mapping):
        raise TypeError(
            f"{fn}: overrides must be a mapping of field names to values, got {describe(overrides)}"
        )
    unknown = [k for k in overrides if k not in _FIELDS]
    if unknown:
        raise ValueError(_unknown_keys(fn, unknown))
    given = {k: v for k, v in overrides.items() if v is not None}
    name = _check_field(fn, "method", given.pop("method", method if method is not None else "ft"))
    defaults = dict(METHOD_DEFAULTS[name])
    if "epochs" in given or "steps" in given:  # a length the user gives replaces the default's
        defaults.pop("steps", None)
        defaults.pop("epochs", None)
    values: dict[str, Any] = {**dataclasses.asdict(RunConfig()), **defaults, **given}
    values["method"] = name
    checked: dict[str, Any] = {
        k: None if v is None else _check_field(fn, k, v) for k, v in values.items()
    }
    _check_together(fn, checked)
    return RunConfig(**checked)


_PEFT_OF = {"r-adapter": "adapter", "clip-lora": "lora"}
_PEFT_DEFAULTS = {
    "peft_rank": None, "peft_alpha": None, "peft_scaling": "rank", "peft_targets": None,
    "peft_qkv": None, "peft_dropout": 0.0, "peft_drop": 0.0, "peft_rescale": 1.0,
}  # fmt: skip
_LORA_ONLY = ("peft_alpha", "peft_scaling", "peft_qkv", "peft_dropout")


def _check_peft(fn: str, c: Mapping[str, Any]) -> None:
    """``--peft`` and its settings agree: no setting without it, none of the other kind's."""
    kind, method = c["peft"], c["method"]
    if method in _PEFT_OF and kind != _PEFT_OF[method]:
        raise ValueError(
            f"{fn}: {flag_of('peft')} must be {_PEFT_OF[method]} for method {method} (its "
            f"paper's update), got {kind}; use another method for other updates"
        )
    changed = [k for k, d in _PEFT_DEFAULTS.items() if c[k] != d]
    if kind == "none" and changed:
        raise ValueError(
            f"{fn}: {', '.join(flag_of(k) for k in changed)} set(s) factors that are not "
            f"trained: {flag_of('peft')} is none; add --peft lora or --peft adapter"
        )
    if kind == "adapter":
        lora_only = [k for k in _LORA_ONLY if c[k] != _PEFT_DEFAULTS[k]]
        if lora_only:
            raise ValueError(
                f"{fn}: {', '.join(flag_of(k) for k in lora_only)} apply to --peft lora only, "
                "got --peft adapter"
            )
    if kind == "lora":
        if c["peft_drop"]:
            raise ValueError(
                f"{fn}: {flag_of('peft_drop')} (adapter dropping) applies to --peft adapter "
                f"only, got --peft lora and {c['peft_drop']:g}; LoRA's is --peft-dropout"
            )
        if c["peft_rank"] == 0:
            raise ValueError(
                f"{fn}: {flag_of('peft_rank')} must be >= 1 for --peft lora (0 means full rank, "
                "for adapters), got 0"
            )


def _check_together(fn: str, c: Mapping[str, Any]) -> None:
    """The checks of fields that depend on each other (each field alone is already valid)."""
    if c["steps"] is not None and c["epochs"] is not None:  # a method's defaults set one at most
        raise ValueError(
            f"{fn}: {flag_of('steps')} and {flag_of('epochs')} both set the run's length, got "
            f"steps {c['steps']} and epochs {c['epochs']:g}; give one of them"
        )
    if c["select"] == "best" and not c["eval_every"]:
        raise ValueError(
            f"{fn}: {flag_of('select')} is best, which picks the weights on the validation split "
            f"every --eval-every steps; set --eval-every >= 1, got {c['eval_every']}"
        )
    if c["batch_size"] is not None and c["batch_size"] % c["accumulation"]:
        raise ValueError(
            f"{fn}: {flag_of('batch_size')} must be a multiple of --accumulation, got "
            f"{c['batch_size']} and --accumulation {c['accumulation']}"
        )
    _check_peft(fn, c)
    if c["method"] == "tracer" and c["average"] != "bma":
        raise ValueError(
            f"{fn}: method tracer's teacher is the trajectory's Beta average: {flag_of('average')} "
            f"must be bma, got {c['average']}"
        )
    if c["cross_norm"] and c["method"] != "tracer":
        raise ValueError(
            f"{fn}: {flag_of('cross_norm')} is TRACER's projection penalty, got "
            f"{c['cross_norm']:g} for method {c['method']}; leave it out"
        )
    if c["descriptions"] is not None and c["method"] in UNSUPERVISED:
        raise ValueError(
            f"{fn}: {flag_of('descriptions')} builds a head from class descriptions, but "
            f"{c['method']}'s head is its learned prompt's (UEO); leave the flag out"
        )
    if c["descriptions"] is None and c["descriptions_match"] != "name":
        raise ValueError(
            f"{fn}: {flag_of('descriptions_match')} is {c['descriptions_match']}, but no "
            "--descriptions file is given; add it or leave the flag out"
        )
    owner: dict[str, str] = {}
    for key in NAMED_SETS:
        for name in c[key]:
            if name in owner:
                raise ValueError(
                    f"{fn}: {flag_of(key)} name {name!r} is already the name of a --{owner[name]} "
                    "set; give every evaluation set its own name"
                )
            owner[name] = key
    ref = c["ood_reference"]
    known = [*c["eval"], *c["shift"]]
    has_val = bool(c["val"]) or c["method"] in SUPERVISED  # supervised runs hold one out
    if ref is not None and ref != "val" and ref not in known:
        why = " (an --ood set has no known images)" if ref in c["ood"] else ""
        raise ValueError(
            f"{fn}: {flag_of('ood_reference')} must be val or the name of an --eval or --shift "
            f"set ({', '.join(known) or 'none given'}), got {ref!r}{why}"
        )
    if c["ood"] and (ref == "val" or (ref is None and not known)) and not has_val:
        raise ValueError(
            f"{fn}: {flag_of('ood')} sets are scored against the known images of "
            f"--ood-reference ({ref or 'val'} by default here), but {c['method']} has no "
            "validation split without --val; give --val DIR, or an --eval/--shift set and name "
            "it with --ood-reference"
        )
