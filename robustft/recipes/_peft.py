"""``--peft``: a built method's towers trained through LoRA or adapter factors (robustft.peft).

The factors are attached to the towers the method trains (:func:`robustft.peft.attach_`): they
become parameters of the module the runtime wraps (DDP synchronises them, FSDP2 shards them with
their transformer block, the optimiser, the trajectory average and the checkpoint see exactly
them and whatever else the method trains: a head, a prompt context). The towers' own weights are
frozen. The export folds the update (scaled by ``--peft-rescale``) into plain weights, so
evaluation, the saved classifiers and every later command see an ordinary model; the trained
factors travel beside it under their own keys (:func:`robustft.peft.is_factor`), to be saved in
a small factor file.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustft import peft
from robustft.clip._common import unwrap
from robustft.recipes._config import RunConfig
from robustft.recipes._model import ClipBundle, save_model
from robustft.recipes._nets import (
    ContrastiveCLIP,
    ImageClassifier,
    PromptClassifier,
    TextClassifier,
    full,
    visual_tower,
)
from robustft.recipes._weights import load_tree, save_tree

__all__ = ["DEFAULT_TARGETS", "attach", "classifier", "factors_of", "spec_of"]

DEFAULT_TARGETS = {
    "lora": "*attn.in_proj_weight",
    "adapter": "*attn.out_proj.weight,*mlp.c_proj.weight",
}
"""``--peft-targets``' default per kind (open_clip names)."""


def spec_of(config: RunConfig) -> peft.Spec | None:
    """The :class:`robustft.peft.Spec` of a run, ``None`` without ``--peft``.

    Its targets are the ``--peft-targets`` globs matched against the open_clip model's parameter
    names; :func:`attach` restricts them to the towers the method trains.
    """
    if config.peft == "none":
        return None
    globs = tuple((config.peft_targets or DEFAULT_TARGETS[config.peft]).split(","))
    if config.peft == "adapter":
        rank = config.peft_rank or None  # 0 or unset: full rank
        return peft.adapter(targets=globs, rank=rank, drop=config.peft_drop)
    rank = config.peft_rank or 8
    alpha = config.peft_alpha if config.peft_alpha is not None else float(rank)
    qkv = tuple(config.peft_qkv.split(",")) if config.peft_qkv else None
    return peft.lora(
        rank=rank,
        alpha=alpha,
        targets=globs,
        scaling=config.peft_scaling,
        qkv=qkv,
        dropout=config.peft_dropout,
    )


def _root(module: nn.Module) -> tuple[nn.Module, str]:
    """The submodule the factors attach to, and its prefix in the open_clip model's names."""
    if isinstance(module, ImageClassifier):
        return module.visual, "visual."
    if isinstance(module, PromptClassifier):
        return visual_tower(module.model), "visual."  # UEO adapts the image tower only
    if isinstance(module, (ContrastiveCLIP, TextClassifier)):
        return module.model, ""  # both towers
    raise TypeError(f"--peft: cannot attach factors to a {type(module).__name__}")


def _select(globs: tuple[str, ...], prefix: str) -> Callable[[str], bool]:
    return lambda name: any(fnmatch.fnmatchcase(prefix + name, g) for g in globs)


def attach(module: nn.Module, config: RunConfig) -> nn.Module:
    """Attach ``config``'s factors (seeded by ``--seed``: the same on every rank) in place."""
    spec = spec_of(config)
    assert spec is not None
    root, prefix = _root(module)
    globs = tuple((config.peft_targets or DEFAULT_TARGETS[config.peft]).split(","))
    spec = peft.Spec(**{**spec.__dict__, "targets": _select(globs, prefix)})
    params = dict(root.named_parameters())
    try:
        factors = peft.init(spec, params, generator=torch.Generator().manual_seed(config.seed))
    except ValueError as err:
        raise ValueError(
            f"--peft-targets {config.peft_targets or DEFAULT_TARGETS[config.peft]!r} must "
            f"select 2-d weights of the towers {config.method} trains ({prefix or 'both'}"
            f"{'*' if prefix else ''}): {err}"
        ) from None
    peft.attach_(root, spec, factors)
    if isinstance(module, PromptClassifier):  # UEO keeps its own trained set: the norm affines
        for name in module.affines:
            module.model.get_parameter(name).requires_grad_(True)
    return module


def factors_of(net: nn.Module) -> dict[str, Tensor]:
    """The trained factors of a (wrapped) module, keyed by the open_clip model's names, full
    tensors (FSDP2's shards gathered), detached copies."""
    root, prefix = _root(unwrap(net))
    return {prefix + n: full(p) for n, p in root.named_parameters() if peft.is_factor(n)}


@contextlib.contextmanager
def rescaled(net: nn.Module, weight: float) -> Iterator[None]:
    """The module's factors scaled to ``weight``·ΔW (:func:`robustft.peft.rescale`) for a while."""
    root, _ = _root(unwrap(net))
    spec = peft.attached(root)
    if spec is None or weight == 1.0:
        yield
        return
    factors = {n: p for n, p in root.named_parameters() if peft.is_factor(n)}
    saved = {n: p.detach().clone() for n, p in factors.items()}
    scaled = peft.rescale(spec, {n: p.detach() for n, p in factors.items()}, weight)
    with torch.no_grad():
        for n, p in factors.items():
            p.copy_(scaled[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in factors.items():
                p.copy_(saved[n])


def export(
    base: Callable[[nn.Module], dict[str, Tensor]], config: RunConfig
) -> Callable[[nn.Module], dict[str, Tensor]]:
    """The method's export with the update folded in (scaled by ``--peft-rescale``), plus the
    trained factors under their own keys."""
    weight = config.peft_rescale

    def run(net: nn.Module) -> dict[str, Tensor]:
        root, _ = _root(unwrap(net))
        spec = peft.attached(root)
        assert spec is not None
        with rescaled(net, weight):
            tree = base(net)  # a head computed through the text tower sees the scaled update
            factors, rest = peft.split(tree)
            folded = peft.fold(spec, factors, base=rest) if factors else rest
        return {**folded, **factors_of(net)}

    return run


def classifier(tree: dict[str, Tensor]) -> dict[str, Tensor]:
    """An exported tree without the factors: the classifier to evaluate and save."""
    return {k: v for k, v in tree.items() if not peft.is_factor(k)}


def save_best(run_dir: Path, tree: dict[str, Tensor], config: RunConfig) -> None:
    """Write the best weights so far as a run writes its final ones: the classifier in
    ``best.safetensors``, and with ``--peft`` the factors in ``best.peft.safetensors``."""
    save_tree(run_dir / "best.safetensors", classifier(tree))
    spec = spec_of(config)
    if spec is not None:
        factors = {k: v for k, v in tree.items() if peft.is_factor(k)}
        save_tree(run_dir / "best.peft.safetensors", factors, metadata=peft.header(spec, factors))


def load_best(run_dir: Path, config: RunConfig) -> dict[str, Tensor]:
    """What :func:`save_best` wrote, as one exported tree again (classifier and factors)."""
    tree = load_tree(run_dir / "best.safetensors")
    if spec_of(config) is not None:
        tree.update(load_tree(run_dir / "best.peft.safetensors"))
    return tree


def save_outputs(
    out: Path,
    name: str,
    tree: dict[str, Tensor],
    config: RunConfig,
    bundle: ClipBundle,
    metadata: dict[str, str],
) -> None:
    """Write a ``--peft`` run's two extra files for the weights ``name`` (``last``, ...).

    - ``<name>.peft.safetensors``: the trained factors alone (unscaled), keyed by the open_clip
      model's names, with :func:`robustft.peft.header`'s metadata (kind, rank, α, scaling, q/k/v
      blocks, targets): ``robustft.peft.load`` reads it back;
    - ``<name>-model.json`` / ``.safetensors`` / ``.safetensors.json``: the whole open_clip model
      with the update (scaled by ``--peft-rescale``) folded in and the image tower as exported
      (UEO's trained norm affines included), saved by
      :func:`robustft.recipes.save_model` — ``open_clip.create_model(..., pretrained=FILE)`` and
      ``robustft ... --model <name>-model.json --pretrained <name>-model.safetensors`` load it.
    """
    spec = spec_of(config)
    assert spec is not None
    factors = {k: v for k, v in tree.items() if peft.is_factor(k)}
    save_tree(
        out / f"{name}.peft.safetensors",
        factors,
        metadata={**metadata, **peft.header(spec, factors)},
    )
    pretrained = {k: v.detach().to("cpu") for k, v in bundle.model.state_dict().items()}
    scaled = peft.rescale(spec, factors, config.peft_rescale)
    folded = peft.fold(spec, scaled, base=pretrained)
    # the exported image tower is the authority on it: folded, and with any other tensor the
    # method trains there (UEO's norm affines)
    folded.update({k: v for k, v in tree.items() if k.startswith("visual.") and k in folded})
    model = copy.deepcopy(bundle.model).to("cpu")
    model.load_state_dict(folded)
    save_model(bundle._replace(model=model), out, name=f"{name}-model", overwrite=True)


def _mix(seed: int, step: int, sample: int = 0) -> int:
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + sample * 0x94D049BB133111EB) % (
        2**63 - 1
    )


@contextlib.contextmanager
def step_rng(seed: int, step: int, device: torch.device, sample: int = 0) -> Iterator[None]:
    """The global generators (CPU and ``device``'s) seeded by ``(seed, step, sample)`` for a while.

    The draws of CLIP-LoRA's branch dropout and R-Adapter's adapter dropping then depend on the
    run's position only, so a resumed run draws what the uninterrupted one did; the callers'
    generators are left as they were.
    """
    cpu = torch.default_generator
    cpu_state = cpu.get_state()
    dev_state = None
    if device.type == "cuda":
        dev_state = torch.cuda.get_rng_state(device)
    value = _mix(seed, step, sample)
    cpu.manual_seed(value)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(value)
    try:
        yield
    finally:
        cpu.set_state(cpu_state)
        if dev_state is not None:
            torch.cuda.set_rng_state(dev_state, device)


def seeded_loss(loss: Any, config: RunConfig) -> Any:
    """``loss`` run under :func:`step_rng` when the factors draw random numbers in training.

    R-Adapter's adapter gates are drawn per step, ``(seed, step)``: every micro-batch and every
    rank draws the same gates, so a step's gates are one process's, whatever the number of ranks
    and micro-steps. CLIP-LoRA's dropout masks are per element, so they are drawn per
    micro-batch, ``(seed, step, position of its first sample)``: distinct micro-batches and ranks
    draw distinct masks (never the same mask on different samples), and a resumed run the same
    ones. (A LoRA has no gates and an adapter no dropout: the two never share a spec.)
    """
    spec = spec_of(config)
    if spec is None or (spec.dropout == 0 and spec.drop == 0):
        return loss
    seed, per_batch = config.seed, spec.dropout > 0

    def run(net: nn.Module, batch: Any, step: int) -> Tensor:
        indices = batch[2]
        sample = int(indices[0]) + 1 if per_batch and len(indices) else 0
        with step_rng(seed, step, batch[0].device, sample):
            out: Tensor = loss(net, batch, step)
            return out

    return run
