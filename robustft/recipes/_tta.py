"""Test-time adaptation of the zero-shot model on evaluation sets: ``robustft tta`` (TPT, C-TPT, TDA).

The job loads the open_clip model and the evaluation sets as every job does
(:func:`robustft.recipes._prepare.prepare`), then runs each set as a stream of test images through
one test-time method built from :mod:`robustft.tta`:

- ``tpt`` (episodic): per image, a CoOp context initialised from ``--prompt``
  (:func:`robustft.clip.init_context`) is tuned by ``--tta-steps`` AdamW steps (lr ``--tta-lr``,
  TPT's 5e-3, torch's other defaults as TPT's code) on :func:`robustft.tta.tpt_loss` of the
  original image and ``--tta-views`` augmented views, run through the frozen image tower as one
  batch; the ``--tta-fraction`` most confident views are selected once, at the first step; the
  tuned context then classifies the original view. Context and optimiser are reset per image.
- ``ctpt``: the same with :func:`robustft.tta.ctpt_loss` (weight ``--ctpt-weight``, C-TPT's 50)
  on the tuned class texts.
- ``tda`` (online, training-free): the zero-shot head's logits plus the cache logits of
  :func:`robustft.tta.tda`, the caches carried along the stream; with views, the sample's
  feature is the mean of the confident views' normalised features and its CLIP logits the mean of
  their logits, as TDA's code does on ImageNet.
- ``zero-shot``: the baseline alone.

Every run reports the ``zero-shot`` row (the zero-shot head of ``--templates`` on the original
view, the ``evaluate`` command's zero-shot numbers) beside the method's row; ``tpt``/``ctpt`` add
``prompt`` (the untuned context: TPT's own baseline).

Views: the original is the model's evaluation transform; each augmented view is
``RandomResizedCrop(image size) + RandomHorizontalFlip`` on the decoded image (TPT's views for
the ImageNet variants), then ``torchvision.transforms.AugMix(severity=1, mixture_width=3,
chain_depth=-1, alpha=1.0)`` with ``--tta-augmix`` (the stock transform nearest to TPT's AugMix
for the fine-grained sets), then the model's normalisation. Sample ``i``'s views are drawn under a
generator seeded by ``(seed, i)``: the same on any worker, rank, order or resume.

Protocols: ``episodic`` resets the state per image (any order gives the same predictions, so the
samples are sharded across torchrun's ranks and gathered); ``online`` carries TDA's caches over the
stream in a fixed order (a permutation of the set seeded by ``--seed``) and runs on one process
only. Run folder: ``config.json``, ``run.json`` (with each set's image fingerprint),
``results.json`` and ``summary.md`` (every metric of :mod:`robustft.metrics` per row and set),
and ``checkpoint.pt`` (written every ``--save-every`` samples: the position, the predictions so
far and TDA's state) that ``--resume`` continues from with the results of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from robustft.recipes import _runfolder as run
from robustft.recipes._runfolder import RunError
from robustft.recipes._runtime import Runtime, autocast, failfast, on_rank0, quiet_worker
from robustft.recipes._tta_config import (
    CHECKPOINT,
    FLAG_FIELDS,
    FORMAT,
    PROTOCOLS,
    RESUMABLE,
    RUN_FIELDS,
    TTA_METHODS,
    TtaConfig,
    add_arguments,
    config_from,
    resolve_tta,
)

if TYPE_CHECKING:
    from robustft.recipes._prepare import Prepared
    from robustft.tta import TdaState

__all__ = [
    "FLAG_FIELDS",
    "PROTOCOLS",
    "RUN_FIELDS",
    "TTA_METHODS",
    "TtaConfig",
    "add_arguments",
    "config_from",
    "main_tta",
    "resolve_tta",
    "run_tta",
    "view_seed",
]


def main_tta(
    config: TtaConfig, *, resume: bool, overwrite: bool = False, debug: bool = False
) -> dict[str, Any]:
    """Entry point of ``robustft tta``: set up, run, end the process group."""
    from robustft.recipes._prepare import runtime_of

    runtime = runtime_of(config.run)
    with failfast(runtime, debug=debug):
        return run_tta(config, resume=resume, overwrite=overwrite, runtime=runtime)


# ---------------------------------------------------------------------------------------------
# views


def view_seed(seed: int, index: int) -> int:
    """The seed of sample ``index``'s views: a 63-bit hash of ``(seed, index)``."""
    from robustft.recipes._loop import _mix

    return _mix(seed, index)


def view_transforms(preprocess: Mapping[str, Any], *, augmix: bool) -> Callable[[Any], Tensor]:
    """The augmented view of a decoded image: random resized crop and flip (and AugMix), tensor,
    the model's normalisation (``preprocess``: a :class:`~robustft.recipes.ClipBundle`'s)."""
    from torchvision import transforms as T

    size = preprocess["image_size"]
    size = tuple(size) if isinstance(size, list) else size
    ops: list[Any] = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    if augmix:
        ops.append(T.AugMix(severity=1, mixture_width=3, chain_depth=-1, alpha=1.0))
    ops += [T.ToTensor(), T.Normalize(preprocess["mean"], preprocess["std"])]
    return T.Compose(ops)


class Views(Dataset[tuple[Tensor, int, int]]):
    """Item ``i``: ``([1 + n, 3, H, W]`` views, label, ``i)``: the original (``original``) then
    ``n`` views of ``augment``, drawn under torch's CPU generator seeded by
    :func:`view_seed` ``(seed, i)`` (the caller's generator state is restored).

    Args:
        dataset: items ``(decoded image, label)`` (a dataset without transform).
        original: the evaluation transform.
        augment: one random view, or ``None`` when ``n`` is 0.
        n: the number of augmented views.
        seed: the run's seed.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        original: Callable[[Any], Tensor],
        augment: Callable[[Any], Tensor] | None,
        n: int,
        seed: int,
    ):
        self.dataset, self.original, self.augment, self.n, self.seed = (
            dataset,
            original,
            augment,
            n,
            seed,
        )

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        from robustft import tta

        image, label = self.dataset[index]
        g = torch.default_generator
        state = g.get_state()
        g.manual_seed(view_seed(self.seed, index))
        try:
            if self.n and self.augment is not None:
                x = tta.views(image, self.n, self.augment, original=self.original)
            else:
                x = self.original(image)[None]
        finally:
            g.set_state(state)
        return x, int(label), index


def _raw(dataset: Dataset[Any]) -> Dataset[Any]:
    """The same samples without transform (decoded images)."""
    import copy

    if isinstance(dataset, ConcatDataset):
        return ConcatDataset([_raw(d) for d in dataset.datasets])
    if isinstance(dataset, Subset):
        return Subset(_raw(dataset.dataset), dataset.indices)
    plain = copy.copy(dataset)
    plain.transform = None  # type: ignore[attr-defined]
    return plain


def _samples(dataset: Dataset[Any]) -> list[str]:
    """``relative path<TAB>label`` of every sample, in order (for the fingerprint)."""
    import os

    if isinstance(dataset, ConcatDataset):
        return [s for d in dataset.datasets for s in _samples(d)]
    if isinstance(dataset, Subset):
        inner = _samples(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    root = str(getattr(dataset, "root", ""))
    return [f"{os.path.relpath(p, root)}\t{y}" for p, y in getattr(dataset, "samples", [])]


def _set_facts(dataset: Dataset[Any]) -> dict[str, Any]:
    import hashlib

    lines = _samples(dataset)
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    return {"images": len(lines), "fingerprint": digest}


# ---------------------------------------------------------------------------------------------
# the methods, one test image at a time


class _Adapter:
    """The per-image computation of the run's method: ``{row: [classes] logits}``."""

    def __init__(self, prep: Prepared, config: TtaConfig):
        from robustft import clip, tta
        from robustft.recipes._nets import visual_tower

        self.c, self.rt = config, prep.runtime
        bundle = prep.bundle
        self.model = bundle.model.requires_grad_(False).eval()
        self.visual = visual_tower(self.model)
        self.tokenizer, self.names = bundle.tokenizer, list(prep.data.names)
        self.scale = prep.scale
        self.head = prep.head.detach().to(self.rt.device).float()
        self.cache = tta.tda(
            shots_pos=config.tda_shots_pos,
            shots_neg=config.tda_shots_neg,
            alpha_pos=config.tda_alpha_pos,
            beta_pos=config.tda_beta_pos,
            alpha_neg=config.tda_alpha_neg,
            beta_neg=config.tda_beta_neg,
        )
        if config.method in ("tpt", "ctpt"):
            with torch.no_grad():
                self.context = clip.init_context(self.model, self.tokenizer, config.run.prompt)
                self.context = self.context.detach()
                self.prompt_head = self._text(self.context).detach()

    @property
    def rows(self) -> tuple[str, ...]:
        """The rows this method reports, baseline first."""
        m = self.c.method
        if m in ("tpt", "ctpt"):
            return ("zero-shot", "prompt", m)
        return ("zero-shot", "tda") if m == "tda" else ("zero-shot",)

    def _text(self, context: Tensor) -> Tensor:
        from robustft import clip

        with autocast(self.rt):
            text = clip.encode_text_with_context(self.model, context, self.names, self.tokenizer)
        return text.float()

    def features(self, views: Tensor) -> Tensor:
        """``[V, dim]`` normalised image features of the views (one batch, no gradient)."""
        with torch.no_grad(), autocast(self.rt):
            f = self.visual(views.to(self.rt.device, non_blocking=True))
        return F.normalize(f.float(), dim=-1)

    def init(self) -> TdaState:
        return self.cache.init(self.head.shape[0], self.head.shape[1], device=self.rt.device)

    def __call__(self, views: Tensor, state: TdaState | None) -> tuple[dict[str, Tensor], Any]:
        from robustft import tta

        c = self.c
        f = self.features(views)
        z = self.scale * f @ self.head.T  # [V, classes]
        out = {"zero-shot": z[0]}
        if c.method in ("tpt", "ctpt"):
            out["prompt"] = (self.scale * f[:1] @ self.prompt_head.T)[0]
            context = self.context.clone().requires_grad_(True)
            optimiser = torch.optim.AdamW([context], lr=c.tta_lr)
            indices = None
            for _ in range(c.tta_steps):
                text = self._text(context)
                logits = self.scale * f @ text.T
                if indices is None:
                    indices = tta.confident_views(logits, fraction=c.tta_fraction)
                if c.method == "tpt":
                    loss = tta.tpt_loss(logits, fraction=c.tta_fraction, indices=indices)
                else:
                    loss = tta.ctpt_loss(
                        logits,
                        text_features=text,
                        fraction=c.tta_fraction,
                        weight=c.ctpt_weight,
                        indices=indices,
                    )
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            with torch.no_grad():
                out[c.method] = (self.scale * f[:1] @ self._text(context).T)[0]
        elif c.method == "tda":
            if c.tta_protocol == "episodic" or state is None:
                state = self.init()
            if f.shape[0] > 1:
                idx = tta.confident_views(z, fraction=c.tta_fraction)
                feature, chosen = f[idx].mean(0), z[idx]
                base = chosen.mean(0)
            else:
                feature, chosen, base = f[0], z[0], z[0]
            state = self.cache.update(state, feature, chosen)
            out["tda"] = base + self.cache.logits(state, feature)
        return {k: v.detach().float().cpu() for k, v in out.items()}, state


# ---------------------------------------------------------------------------------------------
# the job


def check_protocol(config: TtaConfig, runtime: Runtime) -> None:
    """Refuse online adaptation under several ranks.

    Raises:
        ValueError: ``config.tta_protocol`` is ``online`` and ``runtime.world > 1``.
    """
    if config.tta_protocol == "online" and runtime.world > 1:
        raise ValueError(
            f"--tta-protocol online adapts one stream in order (each prediction depends on every "
            f"image before it), so it runs on one process; got {runtime.world} ranks under "
            "torchrun — run it without torchrun (tda is training-free: one forward per image), or "
            "use --tta-protocol episodic, which shards the images over the ranks"
        )


def _empty(classes: int, rows: Sequence[str]) -> dict[str, Any]:
    return {
        "indices": torch.empty(0, dtype=torch.long),
        "labels": torch.empty(0, dtype=torch.long),
        "logits": {r: torch.empty(0, classes) for r in rows},
        "position": 0,
        "state": None,
        "finished": False,
    }


def _cat(done: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    return {
        **done,
        "indices": torch.cat([done["indices"], part["indices"]]),
        "labels": torch.cat([done["labels"], part["labels"]]),
        "logits": {r: torch.cat([z, part["logits"][r]]) for r, z in done["logits"].items()},
    }


class _Local:
    """This rank's predictions since the last gather."""

    def __init__(self, classes: int, rows: Sequence[str]):
        self.classes, self.rows = classes, tuple(rows)
        self.clear()

    def clear(self) -> None:
        self.indices: list[int] = []
        self.labels: list[int] = []
        self.logits: dict[str, list[Tensor]] = {r: [] for r in self.rows}

    def add(self, index: int, label: int, out: Mapping[str, Tensor]) -> None:
        self.indices.append(index)
        self.labels.append(label)
        for r in self.rows:
            self.logits[r].append(out[r])

    def gathered(self, rt: Runtime) -> dict[str, Any]:
        """Every rank's predictions (a collective under several ranks), then cleared."""
        from robustft import distributed

        def stack(rows: list[Tensor]) -> Tensor:
            return torch.stack(rows) if rows else torch.empty(0, self.classes)

        def everyone(t: Tensor) -> Tensor:
            if rt.world == 1:
                return t
            return distributed.all_gather_cat(t.to(rt.device), rt.group).cpu()

        part = {
            "indices": everyone(torch.tensor(self.indices, dtype=torch.long)),
            "labels": everyone(torch.tensor(self.labels, dtype=torch.long)),
            "logits": {r: everyone(stack(v)) for r, v in self.logits.items()},
        }
        self.clear()
        return part


def run_tta(
    config: TtaConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Run test-time adaptation on every evaluation set and write the run folder.

    Each ``--eval``/``--shift`` set, then each ``--ood`` set (its reference's images and the
    out-of-distribution ones), is one stream; the method's predictions and the zero-shot ones are
    scored by :meth:`robustft.recipes.Evaluator.evaluate_logits` (every metric of
    :mod:`robustft.metrics`: accuracy, ECE, NLL, OOD AUROC with ``--score``, ...). The folder
    ``config.run.output`` receives ``config.json``, ``run.json``, ``results.json``, ``summary.md``
    and ``checkpoint.pt``; it is locked while the job writes it.

    Args:
        config: the resolved configuration (:func:`resolve_tta`).
        resume: continue the run in the output folder from its checkpoint; a finished run is left
            as it is (its results are returned).
        overwrite: replace a tta run already in the output folder (otherwise refused).
        runtime: where to run; ``None`` sets it up from the environment.

    Returns:
        The content of ``results.json``: ``{"method", "protocol", "results": {row: {set:
        metrics}}, "summary": {...}}`` with rows ``zero-shot``, the method's and (tpt/ctpt)
        ``prompt``.

    Raises:
        ValueError: online under several ranks (:func:`check_protocol`); data that cannot run.
        RunError: the output folder holds another run, or (``resume``) images, classes or
            settings that changed since the run; a file that cannot be written.
        FileNotFoundError: a folder or file of ``config`` that does not exist.

    Example:
        >>> from robustft.recipes import resolve_tta, run_tta
        >>> config = resolve_tta({"method": "tpt", "model": "ViT-B-16", "pretrained": "openai",
        ...                       "eval": ["r=data/imagenet-r"], "output": "runs/tpt"})
        >>> results = run_tta(config)  # doctest: +SKIP
    """
    from robustft.recipes._prepare import main_log, runtime_of

    config = dataclasses.replace(config, run=run.absolute(config.run))
    rc = config.run
    runtime = runtime or runtime_of(rc)
    check_protocol(config, runtime)
    out = on_rank0(
        runtime,
        lambda: run.claim(rc.output, command="tta", overwrite=overwrite, resume=resume),
        f"claim --output {rc.output}",
    )
    recorded = run.read_record(out, option="--resume") if resume else {}
    if resume and recorded.get("command") != "tta":
        raise RunError(
            f"--resume {rc.output!r} holds a robustft {recorded.get('command', 'finetune')} run, "
            "not a tta run; choose the tta run's folder"
        )
    if recorded.get("status") == "finished":
        main_log(runtime)(f"robustft: run {rc.output!r} is already finished; nothing to do")
        return run.read_json(out / "results.json", option="--resume")
    with run.locked(out, active=runtime.main):
        return _run(config, out, runtime, resume, recorded)


def _run(
    config: TtaConfig, out: Path, rt: Runtime, resume: bool, recorded: Mapping[str, Any]
) -> dict[str, Any]:
    from robustft.recipes._prepare import main_log, prepare
    from robustft.recipes._report import summarise, write_results

    rc = config.run
    prep = prepare(dataclasses.replace(rc, method=config.method), supervised=False, runtime=rt)
    log = main_log(rt)
    sets: dict[str, Dataset[Any]] = {**prep.data.evals}
    sets.update({f"ood:{n}": ds for n, ds in prep.data.ood.items()})
    facts = {**prep.facts, "tta_sets": {n: _set_facts(ds) for n, ds in sets.items()}}
    settings = {k: v for k, v in config.to_json().items() if k not in RESUMABLE}
    progress: dict[str, Any] = {}
    if resume:
        where = f"--resume {rc.output}"
        run.check_record(recorded, prep.facts, where=where, sets=())
        changed = [
            n for n, f in facts["tta_sets"].items() if recorded.get("tta_sets", {}).get(n) != f
        ]
        if changed:
            raise RunError(
                f"{where}: the images of {changed} changed since the run (count or fingerprint) — "
                "the predictions saved would not match them; restore the data, or start a new run"
            )
        progress = _load(out / CHECKPOINT, settings, rt)
    if rt.main:
        run.write_json(out / "config.json", config.to_json())
        run.write_record(out, command="tta", status="running", **facts)
    if rt.world > 1:
        torch.distributed.barrier()
    adapter = _Adapter(prep, config)
    rows = adapter.rows
    classes = adapter.head.shape[0]
    augment = view_transforms(prep.bundle.preprocess, augmix=config.tta_augmix)
    n_views = 0 if config.method == "zero-shot" else config.tta_views

    def save(current: Mapping[str, Any]) -> None:
        from robustft.recipes._runtime import fail_together

        error = None
        if rt.main:
            try:
                blob = {"format": FORMAT, "settings": settings, "sets": dict(current)}
                run.atomic_write(out / CHECKPOINT, lambda p: torch.save(blob, p))
            except Exception as err:  # every rank must reach the collective below
                error = err
        fail_together(error, rt, f"rank 0 could not write {out / CHECKPOINT} (see its error)")

    results: dict[str, dict[str, Any]] = {}
    for name, dataset in sets.items():
        views = Views(_raw(dataset), prep.bundle.eval_transform, augment, n_views, rc.seed)
        done = progress.get(name) or _empty(classes, rows)
        if not done["finished"]:
            start = time.perf_counter()
            stream = _online if config.tta_protocol == "online" else _episodic

            def save_set(part: dict[str, Any], name: str = name) -> None:
                save({**progress, name: part})

            done = stream(adapter, views, done, config, rt, save_set)
            done["finished"] = True
            progress[name] = done
            log(
                f"tta {config.method}: {name}: {len(views)} images, {config.tta_protocol}, "
                f"{time.perf_counter() - start:.1f} s"
            )
            save(progress)
        order = torch.argsort(done["indices"])
        labels = done["labels"][order]
        for row in rows:
            logits = done["logits"][row][order]
            results.setdefault(row, {})[name] = prep.evaluator.evaluate_logits(logits, labels)
    payload = {
        "method": config.method,
        "protocol": config.tta_protocol,
        "results": results,
        "summary": summarise(results, {}, rc),
    }
    if rt.main:
        log(write_results(out, f"tta {config.method}", payload))
        run.write_record(out, command="tta", status="finished", **facts)
    return payload


def _loader(views: Views, indices: Sequence[int], workers: int, rt: Runtime) -> Any:
    return DataLoader(
        Subset(views, list(indices)),
        batch_size=None,
        num_workers=workers,
        pin_memory=rt.device.type == "cuda",
        worker_init_fn=quiet_worker if workers else None,
    )


def _episodic(
    adapter: _Adapter,
    views: Views,
    done: dict[str, Any],
    config: TtaConfig,
    rt: Runtime,
    save: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Every sample not yet done, rank ``r`` taking ``r, r + W, ...`` of them; gathered."""
    have = set(done["indices"].tolist())
    todo = [i for i in range(len(views)) if i not in have]
    mine = todo[rt.rank :: rt.world]
    rounds = -(-len(todo) // rt.world)
    local = _Local(adapter.head.shape[0], adapter.rows)
    batches = iter(_loader(views, mine, config.run.workers, rt))
    every = config.save_every
    for r in range(rounds):
        if r < len(mine):
            x, label, index = next(batches)
            predictions, _ = adapter(x, None)
            local.add(int(index), int(label), predictions)
        if every and (r + 1) % every == 0 and r + 1 < rounds:
            done = _cat(done, local.gathered(rt))
            save(done)
    return _cat(done, local.gathered(rt))


def _online(
    adapter: _Adapter,
    views: Views,
    done: dict[str, Any],
    config: TtaConfig,
    rt: Runtime,
    save: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """The stream in its seeded order from the saved position, the caches carried along."""
    n = len(views)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.run.seed)).tolist()
    position = int(done["position"])
    state = done["state"] if done["state"] is not None else adapter.init()
    local = _Local(adapter.head.shape[0], adapter.rows)
    every = config.save_every
    for x, label, index in _loader(views, order[position:], config.run.workers, rt):
        predictions, state = adapter(x, state)
        local.add(int(index), int(label), predictions)
        position += 1
        if every and position % every == 0 and position < n:
            done = {**_cat(done, local.gathered(rt)), "position": position, "state": state}
            save(done)
    return {**_cat(done, local.gathered(rt)), "position": position, "state": state}


def _load(path: Path, settings: Mapping[str, Any], rt: Runtime) -> dict[str, Any]:
    """The sets' progress saved in ``checkpoint.pt`` (``{}`` when none was written yet).

    Raises:
        RunError: a damaged checkpoint, or one written by other settings.
    """
    import robustft.tta  # noqa: F401  # registers TdaState for weights_only loading

    if not path.is_file():
        return {}
    try:
        blob = torch.load(path, map_location=rt.device, weights_only=True)
    except Exception as err:
        raise RunError(
            f"--resume: {str(path)!r} is damaged ({type(err).__name__}); remove it to start the "
            "sets again, or start a new run"
        ) from err
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise RunError(f"--resume: {str(path)!r} is not a robustft tta checkpoint")
    if blob.get("settings") != dict(settings):
        raise RunError(
            f"--resume: {str(path)!r} was written with other settings than config.json's; the run "
            "folder was edited — start a new run"
        )
    sets: dict[str, Any] = blob["sets"]
    for part in sets.values():
        for key in ("indices", "labels"):
            part[key] = part[key].cpu()
        part["logits"] = {r: z.cpu() for r, z in part["logits"].items()}
    return sets
