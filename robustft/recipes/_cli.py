"""The ``robustft`` command: ``robustft finetune|ueo|posthoc|evaluate ...`` (also ``python -m robustft``).

Every flag of ``finetune`` and ``ueo`` is a field of :class:`robustft.recipes.RunConfig`;
``--config FILE`` (YAML or JSON) sets fields too, and flags given on the command line win.
Under ``torchrun --nproc_per_node=N`` the same command runs on N ranks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustft.recipes._config import SUPERVISED, UNSUPERVISED, RunConfig, load_config_file, resolve

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
"""


def _add_config_flags(p: argparse.ArgumentParser, methods: Sequence[str]) -> None:
    for f in dataclasses.fields(RunConfig):
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
    post.add_argument("--output", required=True, help="folder for results.json and the weights")
    post.add_argument("--eval", action="append", metavar="NAME=DIR", help="evaluation sets")
    post.add_argument("--device", help="device (default: cuda if available)")
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
        "--eval", action="append", metavar="NAME=DIR", help="evaluation sets (default: the run's)"
    )
    ev.add_argument("--output", help="write results.json here (default: print only)")
    ev.add_argument("--device", help="device (default: cuda if available)")
    return top


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
    }
)


def _run_config(fn: str, option: str, run: str) -> dict[str, Any]:
    """The ``config.json`` of a run folder, or a clear error naming the option."""
    saved = Path(run) / "config.json"
    if not saved.is_file():
        raise ValueError(
            f"{fn}: {option} must be a run folder holding config.json (written by robustft "
            f"finetune/ueo), got {run!r}"
        )
    data: dict[str, Any] = json.loads(saved.read_text(encoding="utf-8"))
    return data


def _config_from(args: argparse.Namespace, family: Sequence[str]) -> tuple[RunConfig, bool]:
    values: dict[str, Any] = {}
    resume = False
    if args.resume:
        values.update(_run_config(args.command, "--resume", args.resume))
        resume = True
    if args.config:
        values.update(load_config_file(args.config))
    for f in dataclasses.fields(RunConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    if args.resume:
        values["output"] = args.resume
        saved = _run_config(args.command, "--resume", args.resume)
        changed = sorted(k for k in values if k not in RESUMABLE and values[k] != saved.get(k))
        if changed:
            raise ValueError(
                f"{args.command}: --resume continues the run as configured; it may change only "
                f"{', '.join(sorted(RESUMABLE))}, got new values for {changed}"
            )
    method = values.get("method") or family[0]
    if method not in family:
        raise SystemExit(
            f"robustft: --method must be one of {', '.join(family)} here, got {method!r}"
        )
    config = resolve(values, method=method)
    if not config.train:
        raise SystemExit("robustft: --train is required (an ImageFolder root)")
    return config, resume


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``robustft`` command; returns the exit status."""
    args = parser().parse_args(argv)
    from robustft.recipes import _jobs

    try:
        if args.command in ("finetune", "ueo"):
            family = SUPERVISED if args.command == "finetune" else UNSUPERVISED
            config, resume = _config_from(args, family)
            _jobs.main_finetune(config, resume=resume)
            return 0
        if args.command == "posthoc":
            base = _run_config("posthoc", "--runs (the first)", args.runs[0])
            base.update({"output": args.output, "progress": False})
            if args.eval:
                base["eval"] = args.eval
            if args.device:
                base["device"] = args.device
            config = resolve(base)
            alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
            _jobs.posthoc(
                config,
                args.runs,
                kind=args.kind,
                alphas=alphas,
                tpgm_steps=args.tpgm_steps,
                weights=args.weights,
                save_weights=args.save_weights,
            )
            return 0
        run = Path(args.run)
        base = _run_config("evaluate", "--run", args.run)
        if args.eval:
            base["eval"] = args.eval
        if args.device:
            base["device"] = args.device
        config = resolve(base)
        files = [
            w if w == "zero-shot" or w.endswith(".safetensors") else str(run / f"{w}.safetensors")
            for w in args.weights
        ]
        payload = _jobs.evaluate_run(config, files)
        text = json.dumps(payload, indent=1)
        if args.output:
            Path(args.output).mkdir(parents=True, exist_ok=True)
            (Path(args.output) / "results.json").write_text(text + "\n", encoding="utf-8")
        print(text)
        return 0
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"robustft: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
