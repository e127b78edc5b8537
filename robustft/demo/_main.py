"""Entry point of ``make demo``: pre-train a tiny CLIP, fine-tune it every way, print the table."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

import robustft
from robustft import clip, tree
from robustft.demo import _methods as methods
from robustft.demo import _posthoc as posthoc
from robustft.demo._data import CLASSNAMES, KNOWN, SHIFTS, TEMPLATES, load_splits
from robustft.demo._eval import Result, evaluate, format_shift_table, format_sweep, format_table
from robustft.demo._finetune import Bench, Budget, Tree, visual
from robustft.demo._model import build_model, build_tokenizer, pretrain

__all__ = ["FULL", "METHODS", "QUICK", "Preset", "Report", "main", "run", "setup"]

TRAINED: dict[str, Callable[[Bench], dict[str, Tree]]] = {
    "ft": methods.ft,  # rows FT and FT + EMA
    "kd": methods.kd,
    "l2sp": methods.l2sp,
    "featkd": methods.featkd,
    "carft": methods.carft,
    "flyp": methods.flyp,
    "lipsum": methods.lipsum,
    "clipood": methods.clipood,  # rows MMS only and MMS + BMA
    "ueo": methods.ueo,  # rows UEO's zero-shot start and UEO
}
POST_HOC: dict[str, Callable[[Bench, Tree], dict[str, Tree]]] = {
    "wise": posthoc.wise_ft,
    "tpgm": posthoc.tpgm,
    "soups": posthoc.soups,
}
METHODS = (
    *("zero-shot", "ft", "kd", "l2sp", "featkd", "carft", "flyp", "lipsum", "clipood"),
    *("wise", "tpgm", "soups", "ueo"),
)
"""The keys of ``--methods``, in run and table order (FT runs before the post-hoc methods)."""


class Preset(NamedTuple):
    """Pre-training steps and fine-tuning budget of a run."""

    pretrain_steps: int
    budget: Budget


FULL = Preset(pretrain_steps=600, budget=Budget())
QUICK = Preset(150, Budget(steps=8, batch_size=32, tpgm_steps=4, soup_size=2, bank_size=100))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; ``args.keys`` are the selected methods in run order."""
    parser = argparse.ArgumentParser(
        prog="python -m robustft.demo",
        description="Embedded robust fine-tuning benchmark: pre-train a tiny open_clip CLIP on "
        "shifted digits, fine-tune it on clean digits 0-7 with every method, and print ID and "
        "shifted accuracy, ECE and open-set detection of the digits 8-9. Offline, deterministic, "
        "about 2 minutes on one CPU core.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny budget: a ~20 s smoke run")
    parser.add_argument("--steps", type=int, help="fine-tuning steps per run (default 150)")
    parser.add_argument("--pretrain-steps", type=int, help="pre-training steps (default 600)")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (wise, tpgm and soups imply ft)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and the model")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--output", default="demo_output", help="folder for results.md/.json")
    args = parser.parse_args(argv)
    for name in ("steps", "pretrain_steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    keys = {k.strip() for k in args.methods.split(",") if k.strip()}
    if not keys or not keys <= set(METHODS):
        parser.error(f"--methods must be a subset of {','.join(METHODS)}, got {args.methods!r}")
    if keys & set(POST_HOC):
        keys.add("ft")
    args.keys = [k for k in METHODS if k in keys]
    return args


def setup(preset: Preset, *, seed: int = 0) -> Bench:
    """Load the digits, pre-train the tiny CLIP, build the zero-shot tree and the text bank."""
    data = load_splits(seed=seed)
    tokenizer = build_tokenizer()
    model = build_model(seed=seed)
    pretrain(
        model, tokenizer, data.pretrain_x, data.pretrain_y, steps=preset.pretrain_steps, seed=seed
    )
    model.requires_grad_(False)  # from here on the module is θ0, the frozen zero-shot model
    head = clip.zero_shot_head(model, tokenizer, CLASSNAMES[:KNOWN], TEMPLATES)
    theta0 = {**tree.clone(visual(tree.from_module(model)), detach=True), "head": head}
    g = torch.Generator().manual_seed(seed)
    bank = clip.RandomTextBank.from_model(
        model, preset.budget.bank_size, tokenizer=tokenizer, generator=g
    )
    shifted = {name: shift(data.test_x) for name, shift in SHIFTS.items()}
    scale = float(clip.logit_scale(model))
    return Bench(model, tokenizer, data, shifted, theta0, scale, bank, preset.budget)


class Report(NamedTuple):
    """What a run produced: the markdown report and the metrics of every table row."""

    markdown: str
    results: dict[str, Result]


def run(preset: Preset, keys: Sequence[str], *, seed: int = 0) -> Report:
    """Set up, run and evaluate the methods ``keys`` (printing progress), build the report."""
    post_hoc = [i for i, k in enumerate(keys) if k in POST_HOC]
    if not set(keys) <= set(METHODS) or (post_hoc and "ft" not in keys[: post_hoc[0]]):
        raise ValueError(
            f"run: keys must be names of {METHODS} with 'ft' before any of {tuple(POST_HOC)}, "
            f"got {list(keys)}"
        )
    start = time.perf_counter()
    print(f"robustft {robustft.__version__} demo: pre-training ({preset.pretrain_steps} steps)")
    bench = setup(preset, seed=seed)
    setup_s = time.perf_counter() - start
    print(f"  {'set-up and pre-training':<26} {setup_s:6.1f} s")
    print(f"fine-tuning ({bench.budget.steps} steps per run), seconds per method:")
    results: dict[str, Result] = {}
    seconds: dict[str, float] = {}
    sweep: dict[float, Result] = {}
    ft_theta: Tree = bench.theta0
    for key in keys:
        tic = time.perf_counter()
        if key in TRAINED:
            rows = TRAINED[key](bench)
        elif key in POST_HOC:
            rows = POST_HOC[key](bench, ft_theta)
        else:
            rows = {"zero-shot": bench.theta0}
        elapsed = time.perf_counter() - tic
        ft_theta = rows.get("FT", ft_theta)
        for name, theta in rows.items():
            results[name], seconds[name] = evaluate(bench, theta), elapsed
            print(f"  {name:<26} {elapsed:6.1f} s", flush=True)
        if key == "wise":
            sweep = {a: evaluate(bench, t) for a, t in posthoc.wise_sweep(bench, ft_theta).items()}
    total = time.perf_counter() - start
    d, b = bench.data, bench.budget
    about = (
        f"Known digits 0-{KNOWN - 1}, unknown 8-9. Pre-training: {preset.pretrain_steps} steps "
        f"on {len(d.pretrain_y)} images under random shifts. Fine-tuning: {b.steps} steps, batch "
        f"{b.batch_size}, AdamW lr {b.lr:g}, on {len(d.train_y)} clean images. Test: "
        f"{len(d.test_y)} known images (clean and {len(SHIFTS)} shifts) and "
        f"{len(d.unknown_test_x)} unknown. Logit scale {bench.scale:.1f}, seed {seed}. "
        "Percentages, except the energy gap and the seconds of the method's own training."
    )
    parts = ["# robustft demo results", about, format_table(results, seconds)]
    parts += ["Accuracy (%) on each test set:", format_shift_table(results, list(SHIFTS))]
    if sweep:
        parts += ["WiSE-FT sweep (α = 0 is zero-shot, α = 1 is FT):", format_sweep(sweep)]
    parts.append(f"Total wall time {total:.1f} s (set-up and pre-training {setup_s:.1f} s).")
    return Report("\n\n".join(parts), results)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the report and write it under ``--output``; returns 0."""
    args = parse_args(argv)
    preset = QUICK if args.quick else FULL
    preset = Preset(
        args.pretrain_steps or preset.pretrain_steps,
        preset.budget._replace(steps=args.steps or preset.budget.steps),
    )
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)  # 1: tiny ops, and 2 threads crawl on a shared machine
    torch.use_deterministic_algorithms(True)
    try:
        report = run(preset, args.keys, seed=args.seed)
    finally:  # leave the process as it was (the tests call main in-process)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    print("\n" + report.markdown)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(report.markdown + "\n", encoding="utf-8")
    table = {name: r._asdict() for name, r in report.results.items()}
    (out / "results.json").write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    print(f"\nwritten: {out / 'results.md'}, {out / 'results.json'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
