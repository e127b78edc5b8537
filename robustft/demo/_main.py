"""Entry point of ``make demo``: pre-train a tiny CLIP, run the three experiments, report.

``python -m robustft.demo [--quick] [--output DIR] [--docs PAGE]`` prints the tables and the
honest reading, and writes ``results.json``, ``results.md`` and the figures ``shift.png``,
``open.png``, ``universal.png`` under ``--output``; ``--docs docs/results.md`` writes the docs'
Results page instead of ``results.md`` (the command is :data:`DOCS_COMMAND`).
``python -m robustft.demo --save-model DIR`` instead writes the pre-trained tiny CLIP and the
digit image folders for the command line (:mod:`robustft.demo._quickstart`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import robustft
from robustft.demo._bench import FULL, QUICK, Bench, Preset, setup
from robustft.demo._data import describe
from robustft.demo._open import run_open
from robustft.demo._reading import CLAIMS, judge
from robustft.demo._report import figures, markdown, regime_section
from robustft.demo._shift import run_shift
from robustft.demo._universal import run_universal
from robustft.recipes import METHOD_DEFAULTS
from robustft.recipes._runtime import exit_status
from robustft.recipes._stopping import Interrupted

__all__ = ["main", "parse_args", "protocol_table", "run"]

DOCS_COMMAND = "python -m robustft.demo --output docs/demo_results --docs docs/results.md"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m robustft.demo",
        description="Embedded robust fine-tuning benchmark: pre-train a tiny open_clip CLIP on "
        "shifted digits, then run each paper's experiment in miniature -- domain shift, open "
        "classes (base -> new) and universal unsupervised fine-tuning -- with every method "
        "through robustft.recipes' training loop, several seeds, figures and an honest reading "
        "of which claims reproduce. Offline and deterministic.",
    )
    parser.add_argument("--quick", action="store_true", help="small budget: a smoke run")
    parser.add_argument("--seeds", type=int, help=f"seeds per trained row (default {FULL.seeds})")
    parser.add_argument("--steps", type=int, help=f"steps per supervised run ({FULL.steps})")
    parser.add_argument(
        "--pretrain-steps", type=int, help=f"pre-training steps ({FULL.pretrain_steps})"
    )
    parser.add_argument(
        "--learned-scale",
        action="store_true",
        help="pre-train with CLIP's learned logit scale instead of the schedule to 100 (to see "
        "why the demo does not: the scale it reaches is printed and recorded)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="processes (default 2: experiments 3 and 2 run in a second process beside "
        "experiment 1; 1: one after the other; more than 2 is 2; the numbers are the same)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--output", default="demo_output", help="folder for results and figures")
    parser.add_argument("--docs", help="also write the docs' Results page to this file")
    parser.add_argument(
        "--save-model",
        metavar="DIR",
        help="instead of the experiments: write the pre-trained tiny CLIP (model config, "
        "safetensors weights, normalisation sidecar) and the digit image folders (DIR/data) "
        "into the new folder DIR, for `robustft finetune`; prints the command (uses "
        "--pretrain-steps and --threads; the model is cached after the first call)",
    )
    args = parser.parse_args(argv)
    for name in ("seeds", "steps", "pretrain_steps", "threads", "jobs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return args


def protocol_table(results: dict[str, Any]) -> str:
    """Each method's configuration (the paper's, from :data:`robustft.recipes.METHOD_DEFAULTS`)."""
    p = results["preset"]
    lines = [
        "| method | optimiser | weight decay | warm-up | schedule | average | paper lr | batch, "
        "length | other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    other = {
        "ft": f"EMA decay {results['ema_decay']:.4f} (= 0.999 over 5,000 steps)",
        "l2sp": "λ 0.1 on the visual tower",
        "kd": "weight 1, T 1",
        "car-ft": "β 1, contexts = the prompt templates",
        "feature-kd": "weight 1",
        "lipsum": f"λ on the grid {{{', '.join(f'{w:g}' for w in p['lipsum_weights'])}}} (the "
        "paper's units at s = 100, no rescaling), M 80 fresh texts of L 8 per step from the "
        "pre-training vocabulary; best checkpoint on val",
        "clipood": "single prompt 'a photo of a {}.', margin λ 0.3, BMA β 0.5 (0.1 for open "
        "classes); plain row: a run without BMA, its best checkpoint on val",
        "lp-ft": "probe C ∈ {0.01 … 100} chosen on val",
        "flyp": "contrastive on templated captions, both towers",
        "ueo": "γ 1, confidence weights (oracle row: known 1.001, unknown 0.001), context + "
        "visual norm affines, 100·cos logits",
        "entropy": "γ 0, uniform weights, 100·cos logits",
        "im": "γ 1, uniform weights, 100·cos logits",
    }
    for name, why in other.items():
        d = METHOD_DEFAULTS[name]
        supervised = name not in ("ueo", "entropy", "im")
        length = (
            f"{p['batch_size']}, {p['steps']} steps"
            if supervised
            else f"64, {p['ueo_steps']} steps"
        )
        lines.append(
            f"| {name} | {d['optimizer']} | {d['weight_decay']:g} | {d['warmup']:g} | cosine "
            f"| {d['average']} | {d['lr']:g} | {length} | {why} |"
        )
    return "\n".join(lines)


def run(
    preset: Preset,
    log: Callable[[str], None] = print,
    *,
    learned_scale: bool = False,
    jobs: int = 2,
) -> dict[str, Any]:
    """Set up and run the three experiments; the results dict (``results.json``'s content).

    With ``jobs`` 2, experiments 3 and 2 run in a second process (spawned, one torch thread,
    deterministic algorithms, the pre-trained model from the cache) while this one runs
    experiment 1; experiment 2 starts as soon as experiment 1 has chosen its grid points. Every
    number is the same as with ``jobs`` 1, which runs them one after the other here.
    """
    tic = time.perf_counter()
    log(f"robustft {robustft.__version__} demo")
    bench = setup(preset, log=log, learned_scale=learned_scale)
    setup_s = time.perf_counter() - tic
    if jobs == 1:
        log("experiment 1, domain shift:")
        shift = run_shift(bench, log=log)
        log(f"  done in {shift['seconds']:.1f} s")
        universal, open_ = _universal_then_open(bench, lambda: _points(shift), log, "")
    else:
        shift, open_, universal = _two_processes(bench, preset, learned_scale, log)
    experiments = {"shift": shift, "open": open_, "universal": universal}
    results: dict[str, Any] = {
        "version": robustft.__version__,
        "preset": preset._asdict(),
        "jobs": jobs,
        "scale": bench.scale,
        "ema_decay": 0.999 ** (5000 / preset.steps),
        "data": describe(bench.data),
        "regime": regime(bench, experiments),
        **experiments,
        "claims": [
            judge(c, experiments, not_moved=experiments[c.experiment]["not_moved"]) for c in CLAIMS
        ],
        "seconds": {"setup": setup_s, "total": time.perf_counter() - tic},
    }
    return results


def _points(shift: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """Experiment 1's chosen grid points, row -> (lr, weight)."""
    return {row: (shift["lrs"][row], shift["weights"].get(row)) for row in shift["lrs"]}


def _universal_then_open(
    bench: Bench,
    points: Callable[[], dict[str, tuple[float, float | None]]],
    log: Callable[[str], None],
    where: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Experiment 3, then experiment 2 with experiment 1's chosen ``points()``."""
    log(f"experiment 3, universal unsupervised{where}:")
    universal = run_universal(bench, log=log)
    log(f"  done in {universal['seconds']:.1f} s")
    log(f"experiment 2, open classes{where}:")
    open_ = run_open(bench, points(), log=log)
    log(f"  done in {open_['seconds']:.1f} s")
    return universal, open_


def _second_process(preset: Preset, learned_scale: bool, points: Any, results: Any) -> None:
    """Experiments 3 and 2 in the second process, their results (or the error) put on ``results``.

    ``points`` is a queue of experiment 1's points. The process ignores SIGINT: a Ctrl-C is the
    first process's to handle (it stops this one).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    lines: list[str] = []
    try:
        bench = setup(preset, log=lambda _: None, learned_scale=learned_scale)
        universal, open_ = _universal_then_open(
            bench, points.get, lines.append, " (second process)"
        )
    except BaseException:
        results.put(("error", traceback.format_exc()))
        raise
    results.put(("done", (universal, open_, lines)))


def _two_processes(
    bench: Bench, preset: Preset, learned_scale: bool, log: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Experiment 1 here, experiments 3 then 2 in a spawned process (see :func:`run`).

    If experiment 1 fails or is interrupted, the second process is stopped at once; if the
    second process fails, its traceback is part of the error raised here.
    """
    context = multiprocessing.get_context("spawn")
    points, results = context.Queue(), context.Queue()
    second = context.Process(
        target=_second_process, args=(preset, learned_scale, points, results), daemon=True
    )
    second.start()
    try:
        log("experiment 1, domain shift:")
        shift = run_shift(bench, log=log, on_chosen=points.put)
        log(f"  done in {shift['seconds']:.1f} s")
        while True:
            try:
                status, payload = results.get(timeout=1.0)
                break
            except queue.Empty:
                if not second.is_alive():
                    raise RuntimeError(
                        f"the second process ended without results (exit code {second.exitcode})"
                    ) from None
    except BaseException:
        second.terminate()
        raise
    finally:
        second.join()
    if status == "error":
        raise RuntimeError(f"experiments 3 and 2 failed in the second process:\n{payload}")
    universal, open_, lines = payload
    for line in lines:
        log(line)
    return shift, open_, universal


def regime(bench: Bench, experiments: dict[str, Any]) -> dict[str, Any]:
    """The toy's regime against the papers' (``results.json``'s ``regime``), measured this run.

    Temperature (the logit scale), language (random texts from seen tokens, their participation
    ratio), headroom (zero-shot ID accuracy, FT's gain at its chosen rate, the shifts FT loses
    against zero-shot) and the unknowns' zero-shot MCM AUROC on the unlabelled pool; each with
    the threshold the issue sets and whether it holds.
    """
    rows = experiments["shift"]["rows"]

    def mean(row: str, metric: str) -> float:
        return sum(m[metric] for m in rows[row]) / len(rows[row])

    lost = [s for s in experiments["shift"]["shifts"] if mean("FT", s) < mean("zero-shot", s)]
    r = dict(bench.regime)
    measured = {
        "scale": (r["scale"], "≥ 50", r["scale"] >= 50),
        "random_texts_seen": (r["random_texts_seen"], "≥ 95 %", r["random_texts_seen"] >= 0.95),
        "participation_ratio": (
            r["participation_ratio"], f"≥ {r['dim'] / 4:g} (dim / 4)",
            r["participation_ratio"] >= r["dim"] / 4,
        ),
        "zero_shot_id": (mean("zero-shot", "id"), "≤ 85 %", mean("zero-shot", "id") <= 0.85),
        "ft_gain_id": (
            mean("FT", "id") - mean("zero-shot", "id"), "≥ +5 points",
            mean("FT", "id") - mean("zero-shot", "id") >= 0.05,
        ),
        "shifts_ft_loses": (len(lost), "≥ 2", len(lost) >= 2),
        "pool_mcm_auroc": (
            experiments["universal"]["confidence_auroc"], "≥ 70 %",
            experiments["universal"]["confidence_auroc"] >= 0.70,
        ),
    }  # fmt: skip
    return {
        **r,
        "lost_shifts": lost,
        "checks": {k: {"value": v, "target": t, "holds": h} for k, (v, t, h) in measured.items()},
    }


def docs_page(results: dict[str, Any], figure_dir: str) -> str:
    """The docs' Results page: the report of a full run, with its figures."""
    s = results["seconds"]
    head = [
        "# Results",
        "The embedded benchmark's full run (`make demo`), regenerated by one command:",
        f"```bash\n{DOCS_COMMAND}\n```",
        "Every number, figure and verdict below comes from that run; nothing is edited by hand. "
        "How the experiments are built and what they can and cannot show is in the "
        "[demo guide](guide/demo.md). It is a toy problem -- 32×32 rendered scenes and a 0.2 M-parameter "
        "vision tower -- so a verdict here says whether a claim holds *on this toy*, not at scale.",
        f"Run time of this run: {s['total']:.0f} s (pre-training {s['setup']:.0f} s), "
        + (
            "two processes of one torch thread each (`--jobs 2`, the default)."
            if results["jobs"] == 2
            else "one process of one torch thread (`--jobs 1`)."
        ),
        "## Protocols",
        protocol_table(results),
    ]
    return "\n\n".join(head) + "\n\n" + markdown(results, figure_dir) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the report, write results and figures; returns 0."""
    args = parse_args(argv)
    if args.save_model:
        return _save_model(Path(args.save_model), args.pretrain_steps or FULL.pretrain_steps, args)
    preset = QUICK if args.quick else FULL
    preset = preset._replace(
        seeds=args.seeds or preset.seeds,
        steps=args.steps or preset.steps,
        pretrain_steps=args.pretrain_steps or preset.pretrain_steps,
    )
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)  # tiny ops: a second thread buys little on 2 cores
    torch.use_deterministic_algorithms(True)
    try:
        results = run(
            preset,
            log=lambda line: print(line, flush=True),
            learned_scale=args.learned_scale,
            jobs=min(args.jobs, 2),
        )
    except (Interrupted, KeyboardInterrupt) as err:
        name = signal.Signals(err.signum).name if isinstance(err, Interrupted) else "SIGINT"
        print(f"python -m robustft.demo: stopped by {name}; nothing written", file=sys.stderr)
        return exit_status(err)
    finally:  # leave the process as it was (the tests call main in-process)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    report = markdown(results)
    print("\n" + protocol_table(results) + "\n\n" + report)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    written = [out / "results.json", *figures(results, out)]
    if not args.docs:  # with --docs the page is the report (a .md under docs/ would be a page)
        (out / "results.md").write_text(
            "# robustft demo results\n\n" + protocol_table(results) + "\n\n" + report + "\n",
            encoding="utf-8",
        )
        written.insert(0, out / "results.md")
    else:
        page = Path(args.docs)
        page.parent.mkdir(parents=True, exist_ok=True)
        rel = Path(os.path.relpath(out.resolve(), page.parent.resolve())).as_posix()
        page.write_text(docs_page(results, rel), encoding="utf-8")
        (out / "regime.md").write_text(regime_section(results) + "\n", encoding="utf-8")
        written += [page, out / "regime.md"]
    print(f"\ntotal {results['seconds']['total']:.1f} s; written: " + ", ".join(map(str, written)))
    return 0


def _save_model(directory: Path, steps: int, args: argparse.Namespace) -> int:
    """``--save-model DIR``: write the model and folders, print the next command; 0 or 1."""
    from robustft.demo._quickstart import next_command, save_demo
    from robustft.recipes._runfolder import RunError

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)  # the same weights as `make demo` pre-trains
    try:
        saved = save_demo(directory, steps=steps, log=lambda line: print(line, flush=True))
    except RunError as err:
        print(f"python -m robustft.demo: error: {err}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    print(f"written: {', '.join(str(p) for p in saved)} and {directory / 'data'}")
    print(f"next, fine-tune it offline:\n\n{next_command(directory)}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
