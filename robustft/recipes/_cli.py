"""The ``robustft`` command: ``robustft finetune|ueo|posthoc|evaluate ...`` (also ``python -m robustft``).

Every flag of ``finetune`` and ``ueo`` is a field of :class:`robustft.recipes.RunConfig`;
``--config FILE`` (YAML or JSON) sets fields too, and flags given on the command line win.
Under ``torchrun --nproc_per_node=N`` the same command runs on N ranks.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustft.recipes._config import SUPERVISED, UNSUPERVISED, RunConfig, load_config_file, resolve
from robustft.recipes._runfolder import RunError, read_json, read_record
from robustft.recipes._runtime import one_line

__all__ = ["main", "parser"]

_TYPES = {"str": str, "float": float, "int": int}

EPILOG = """\
examples:
  robustft finetune --method clipood --model ViT-B-16 --pretrained openai \\
      --train imagenet/train --classnames imagenet_classes.txt \\
      --eval imagenet-v2=imagenetv2 --eval imagenet-r=imagenet-r --output runs/clipood
  torchrun --nproc_per_node=8 -m robustft finetune --method lipsum ... --distributed fsdp
  robustft finetune --resume runs/clipood          # continue an interrupted run
  robustft ueo --method ueo --train office-home/Clipart --classnames known.txt \\
      --eval clipart=office-home/Clipart --output runs/ueo
  robustft posthoc wise --runs runs/ft --output runs/wise
  robustft evaluate --run runs/clipood --weights average --eval sketch=imagenet-sketch
  robustft tta --method tpt --model ViT-B-16 --pretrained openai \\
      --classnames imagenet_classes.txt --eval imagenet-a=imagenet-a --output runs/tpt
"""


def _add_config_flags(
    p: argparse.ArgumentParser, methods: Sequence[str], only: Sequence[str] | None = None
) -> None:
    for f in dataclasses.fields(RunConfig):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kind = str(f.type)
        if f.name == "method":
            p.add_argument(
                flag, choices=methods, default=None, help=f"the method ({', '.join(methods)})"
            )
        elif f.metadata.get("repeat"):
            p.add_argument(flag, action="append", default=None, metavar="NAME=DIR", help=help_text)
        elif kind.startswith("list[float]"):
            p.add_argument(flag, type=float, nargs=3, default=None, metavar="X", help=help_text)
        elif kind == "bool":
            p.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            base = kind.split("|")[0].strip()
            choices = f.metadata.get("choices")
            p.add_argument(
                flag,
                type=_TYPES.get(base, str),
                default=None,
                choices=choices,
                metavar=None if choices else base.upper(),
                help=help_text,
            )
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of fields (flags win)")
    p.add_argument("--resume", metavar="RUN", help="continue the interrupted run in this folder")
    _add_job_flags(p)


def _add_job_flags(p: argparse.ArgumentParser, *, run_paths: bool = True) -> None:
    """Flags every job has: --overwrite, --override (moved data) and --debug."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run (or results) already in --output; without it such a folder is "
        "refused",
    )
    if run_paths:
        p.add_argument(
            "--override",
            action="append",
            default=None,
            metavar="FIELD=PATH",
            help="with --resume/--run/--runs: a path recorded in the run's config.json that moved "
            "(e.g. train=/new/place/train); the data are checked against what the run recorded",
        )
    p.add_argument(
        "--debug", action="store_true", help="on an error, show the full Python traceback"
    )


def parser() -> argparse.ArgumentParser:
    """The argument parser of the ``robustft`` command."""
    top = argparse.ArgumentParser(
        prog="robustft",
        description="Robust fine-tuning of open_clip models on image folders: CLIPood, Lipsum-FT, "
        "UEO and their baselines, on one device or under torchrun (DDP or FSDP2).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(dest="command", required=True)
    ft = sub.add_parser(
        "finetune",
        help="supervised fine-tuning (" + ", ".join(SUPERVISED) + ")",
        description="Supervised fine-tuning with the papers' defaults per method.",
    )
    _add_config_flags(ft, SUPERVISED)
    ueo = sub.add_parser(
        "ueo",
        help="unsupervised fine-tuning on unlabeled images with unknown "
        "classes (" + ", ".join(UNSUPERVISED) + ")",
        description="Universal unsupervised fine-tuning (UEO and its baselines).",
    )
    _add_config_flags(ueo, UNSUPERVISED)
    post = sub.add_parser(
        "posthoc",
        help="WiSE-FT sweep, TPGM or model soups over saved runs",
        description="Post-hoc robustness from saved runs; data and model come "
        "from the first run's config.json unless given.",
    )
    post.add_argument("kind", choices=("wise", "tpgm", "uniform-soup", "greedy-soup"))
    post.add_argument(
        "--runs",
        nargs="+",
        required=True,
        metavar="RUN",
        help="run folders (their last.safetensors) or .safetensors files; the first must be a "
        "run folder, whose config.json gives the model, the classes and the data",
    )
    post.add_argument(
        "--alphas",
        default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
        help="WiSE-FT mixing coefficients",
    )
    post.add_argument("--tpgm-steps", type=int, default=200, help="Adam steps on TPGM's radii")
    post.add_argument(
        "--weights",
        choices=("last", "average", "best"),
        default="last",
        help="which classifier of each run folder to combine (default: last)",
    )
    post.add_argument(
        "--save-weights",
        action="store_true",
        help="also write each WiSE-FT blend as wise-<alpha>.safetensors (wise-0 is zero-shot)",
    )
    post.add_argument(
        "--allow-mixed",
        action="store_true",
        help="combine runs of different methods, models or data splits (refused otherwise)",
    )
    post.add_argument("--output", required=True, help="folder for results.json and the weights")
    _add_eval_flags(post)
    _add_job_flags(post)
    ev = sub.add_parser(
        "evaluate",
        help="evaluate saved weights (or the zero-shot model) on image folders",
        description="Evaluate a run's weights on evaluation sets.",
    )
    ev.add_argument(
        "--run", required=True, help="a run folder (its config.json gives model and classes)"
    )
    ev.add_argument(
        "--weights",
        nargs="+",
        default=["last"],
        help="last, average, best, zero-shot or .safetensors files",
    )
    ev.add_argument(
        "--output",
        help="a new folder for results.json and summary.md (default: print only); never the run "
        "folder itself",
    )
    _add_eval_flags(ev)
    _add_job_flags(ev)
    from robustft.recipes import _tta

    tta = sub.add_parser(
        "tta",
        help="test-time adaptation of the zero-shot model on evaluation sets ("
        + ", ".join(_tta.TTA_METHODS)
        + ")",
        description="Test-time adaptation (TPT, C-TPT, TDA) of the zero-shot model, episodic or "
        "online, with the zero-shot baseline; results as every job writes them.",
    )
    _add_config_flags(tta, _tta.TTA_METHODS, only=_tta.FLAG_FIELDS)
    _tta.add_arguments(tta)
    return top


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    """The evaluation sets and the device of posthoc/evaluate (default: the run's)."""
    for flag, what in (
        ("--eval", "evaluation"),
        ("--shift", "distribution-shift"),
        ("--ood", "pure out-of-distribution"),
    ):
        p.add_argument(
            flag, action="append", metavar="NAME=DIR", help=f"{what} sets (default: the run's)"
        )
    p.add_argument("--ood-reference", help="the set --ood sets are scored against (val or a name)")
    p.add_argument("--device", help="device (default: cuda if available)")
    p.add_argument("--workers", type=int, help="DataLoader worker processes (default: the run's)")


# what --resume may change: where and how the run is watched, never what it computes
RESUMABLE = frozenset(
    {
        "output",
        "workers",
        "progress",
        "log_every",
        "save_every",
        "device",
        "eval",
        "shift",
        "ood",
        "ood_reference",
        "eval_classes",
        "collective_timeout",
        "nonfinite",
    }
)


MOVABLE = (
    "train", "val", "classnames", "model", "pretrained", "templates", "lipsum_vocabulary"
)  # fmt: skip
"""The recorded paths ``--override FIELD=PATH`` may point elsewhere (moved data and weights)."""


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _run_config(option: str, run: str) -> dict[str, Any]:
    """The ``config.json`` of a run folder, or a clear error naming the option."""
    saved = Path(run) / "config.json"
    if not saved.is_file():
        raise ValueError(
            f"{option} {run!r} must be a run folder holding config.json (written by robustft "
            f"finetune/ueo)"
        )
    config = read_json(saved, option=option)
    # a run recorded before --ueo-scale existed trained on s·cos: it resumes as it started
    config.setdefault("ueo_scale", 0.0)
    return config


def _relocate(values: dict[str, Any], overrides: Sequence[str] | None, run: str) -> None:
    """Apply ``--override FIELD=PATH`` and check that every recorded path still exists."""
    for spec in overrides or []:
        field, eq, path = spec.partition("=")
        field = field.strip().replace("-", "_")
        if not eq or field not in MOVABLE or not path:
            raise ValueError(
                f"--override must be FIELD=PATH with FIELD one of {', '.join(MOVABLE)}, got {spec!r}"
            )
        values[field] = str(Path(path).expanduser().absolute())
    saved = str(Path(run) / "config.json")
    for field in MOVABLE:  # model, pretrained, templates may be names (ViT-B-16, openai): not paths
        value = values.get(field)
        is_path = field in ("train", "val", "classnames") or Path(value or "").is_absolute()
        if value and is_path and not Path(value).exists():
            raise RunError(
                f"{_flag(field)} {value!r}, recorded in {saved!r}, no longer exists — move it "
                f"back, or point to its new place with --override {field}=PATH"
            )
    from robustft.recipes._config import NAMED_SETS

    for field in NAMED_SETS:
        recorded = values.get(field)
        if not isinstance(recorded, dict):  # given on this command line: checked when read
            continue
        for name, path in recorded.items():
            if not Path(path).exists():
                raise RunError(
                    f"{_flag(field)} {name}={path!r}, recorded in {saved!r}, no longer exists — "
                    f"give the sets again with {_flag(field)} NAME=DIR"
                )


def _config_from(args: argparse.Namespace, family: Sequence[str]) -> tuple[RunConfig, bool]:
    values: dict[str, Any] = {}
    resume = False
    saved: dict[str, Any] = {}
    if args.resume:
        saved = _run_config("--resume", args.resume)
        values.update(saved)
        resume = True
    elif args.override:
        raise ValueError("--override moves a recorded path; use it with --resume RUN")
    if args.config:
        values.update(load_config_file(args.config))
    for f in dataclasses.fields(RunConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    for flag, other in (("steps", "epochs"), ("epochs", "steps")):  # a length flag wins
        if getattr(args, flag, None) is not None and getattr(args, other, None) is None:
            values.pop(other, None)
    if args.resume:
        values["output"] = str(Path(args.resume).absolute())
        _relocate(values, args.override, args.resume)
        given = resolve(values, method=values.get("method"))
        then = resolve(saved, method=saved.get("method"))
        changed = [
            f.name
            for f in dataclasses.fields(RunConfig)
            if f.name not in RESUMABLE
            and f.name not in MOVABLE
            and getattr(given, f.name) != getattr(then, f.name)
        ]
        if changed:
            raise ValueError(
                f"--resume continues the run as it was configured; it may change only "
                f"{', '.join(_flag(k) for k in sorted(RESUMABLE - {'output'}))} (and moved paths "
                f"with --override), got new values for {', '.join(_flag(k) for k in changed)}"
            )
    method = values.get("method") or family[0]
    if method not in family:
        raise ValueError(f"--method must be one of {', '.join(family)} here, got {method!r}")
    config = resolve(values, method=method)
    if not config.train:
        raise ValueError("--train is required (an image folder root: one sub-folder per class)")
    return config, resume


def _saved_run(args: argparse.Namespace, option: str, run: str) -> dict[str, Any]:
    """The configuration of a saved run for posthoc/evaluate, with the sets and device given."""
    base = _run_config(option, run)
    if args.eval or args.shift or args.ood:  # the sets given replace the run's
        for field in ("eval", "shift", "ood"):
            base[field] = getattr(args, field) or []
    _relocate(base, args.override, run)
    for field in ("ood_reference", "device", "workers"):
        value = getattr(args, field, None)
        if value is not None:
            base[field] = value
    base["progress"] = False
    return base


def _run(args: argparse.Namespace) -> int:
    from robustft.recipes import _jobs

    if args.command in ("finetune", "ueo"):
        family = SUPERVISED if args.command == "finetune" else UNSUPERVISED
        config, resume = _config_from(args, family)
        _jobs.main_finetune(config, resume=resume, overwrite=args.overwrite, debug=args.debug)
        return 0
    if args.command == "tta":
        from robustft.recipes import _tta

        tta_config, resume = _tta.config_from(args)
        _tta.main_tta(tta_config, resume=resume, overwrite=args.overwrite, debug=args.debug)
        return 0
    if args.command == "posthoc":
        config = resolve(_saved_run(args, "--runs", args.runs[0]) | {"output": args.output})
        alphas = _floats("--alphas", args.alphas)
        _jobs.main_posthoc(
            config,
            args.runs,
            kind=args.kind,
            alphas=alphas,
            tpgm_steps=args.tpgm_steps,
            weights=args.weights,
            save_weights=args.save_weights,
            allow_mixed=args.allow_mixed,
            overwrite=args.overwrite,
            debug=args.debug,
        )
        return 0
    run = Path(args.run)
    base = _saved_run(args, "--run", args.run)
    config = resolve(base)
    files = [
        w if w == "zero-shot" or w.endswith(".safetensors") else str(run / f"{w}.safetensors")
        for w in args.weights
    ]
    recorded = read_record(run, option="--run")
    _jobs.main_evaluate(
        config,
        files,
        recorded=recorded,
        output=args.output,
        overwrite=args.overwrite,
        debug=args.debug,
    )
    return 0


def _floats(option: str, text: str) -> list[float]:
    try:
        values = [float(a) for a in text.split(",") if a.strip()]
    except ValueError as err:
        raise ValueError(f"{option} must be comma-separated numbers, got {text!r}") from err
    if not values:
        raise ValueError(f"{option} must hold at least one number, got {text!r}")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``robustft`` command; returns the exit status.

    Exit status: 0 on success; 2 for a bad command line, setting or input (``ValueError``,
    ``TypeError``, ``FileNotFoundError``); 1 for a failure while running (:class:`RunError`: a
    run folder that may not be written, data that changed since the run, a damaged file, a full
    disk) and for a non-finite loss; 128 + the signal's number when SIGINT (130) or SIGTERM (143)
    stopped a run at a step boundary. Errors are one line, ``robustft: error: <message>``; the
    full traceback only with ``--debug``.
    """
    args = parser().parse_args(argv)
    from robustft.recipes._stopping import Interrupted

    try:
        return _run(args)
    except Interrupted as stop:
        where = f"; saved {stop.checkpoint}" if stop.checkpoint else ""
        command = "ueo" if args.command == "ueo" else "finetune"
        run_dir = Path(stop.checkpoint).parent if stop.checkpoint else None
        how = f" — continue with: robustft {command} --resume {run_dir}" if run_dir else ""
        print(
            f"robustft: stopped by {signal.Signals(stop.signum).name} at step {stop.step}{where}{how}",
            file=sys.stderr,
        )
        return 128 + int(stop.signum)
    except KeyboardInterrupt:
        print(
            "robustft: interrupted; the last checkpoint saved, if any, is intact", file=sys.stderr
        )
        return 130
    except (ValueError, TypeError, FileNotFoundError) as error:
        if args.debug:
            raise
        _report(error)
        return 2
    except (RunError, OSError, RuntimeError) as error:
        if args.debug:
            raise
        _report(error)
        return 1


def _report(error: BaseException) -> None:
    print(f"robustft: error: {one_line(error)}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
