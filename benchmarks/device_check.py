"""The device check: the device tests and the headline GPU ratios in one bounded run (issue 22).

On a CUDA machine, with no network and in at most five minutes of wall time::

    make device-check OUT=$OUT          # or: python benchmarks/device_check.py --out DIR

1. runs the tests marked ``device`` (``pytest -m device tests``, in a subprocess with a time
   limit): the CUDA paths -- foreach fast paths, bf16 autocast, inductor, pinned memory, NCCL;
2. times, on an open_clip ViT-B-16 with random weights (nothing is downloaded), each kernel
   beside its baseline in interleaved pairs (median of the per-pair ratios, CUDA events, after a
   warm-up):

   - ``averaging``: EMA and BMA ``update_`` over the visual tower's parameters, as a fraction of
     the device-to-device copy bandwidth measured on the same bytes (``torch._foreach_copy_``),
     and against a bare ``torch._foreach_lerp_``;
   - ``steps``: one optimiser step of CLIPood, Lipsum-FT and UEO (1000 classes) against plain
     fine-tuning, in bf16 autocast at batch 128, each built by :func:`robustft.recipes.build` and
     stepped as :func:`robustft.recipes.train` steps it (loss, backward, optimiser, average),
     with the batch already on the device; and each step's peak memory;
   - ``evaluation``: :meth:`robustft.recipes.Evaluator.evaluate` in images/s against a bare
     forward loop over the same ``DataLoader``, and a forward pass over batches already on the
     device.

It writes ``device_check.json`` and ``device_check.md`` (device name, torch and CUDA versions,
date) under ``--out``, prints both, and exits with status 1 only if a device test fails (or the
device tests could not run to the end); a section that raises is recorded in the JSON with its
error and the run goes on. The JSON is rewritten after every section, so a run killed at its
time limit keeps what it measured. Each section is skipped once the time budget is spent.

``--cpu`` runs the same code on the CPU at tiny sizes in seconds (the device tests are then
skipped by their marker's condition): ``make test`` runs it that way, so the check cannot rot.
``docs/development.md`` ("Device check") says how to run it and read the table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import robustft
from robustft import averaging, clip
from robustft.recipes import Context, Evaluator, build, load_model, resolve
from robustft.recipes._loop import make_averager, make_optimizer
from robustft.recipes._methods import trained_tree
from robustft.recipes._nets import visual_tower
from robustft.recipes._runfolder import RunError, atomic_write
from robustft.recipes._runtime import Runtime, autocast, wrap

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "robustft-device-check/1"
JSON_NAME, MARKDOWN_NAME = "device_check.json", "device_check.md"
TESTS_XML, TESTS_LOG = "device_tests.xml", "device_tests.log"
SECTIONS = ("device_tests", "averaging", "steps", "evaluation")
METHODS = ("ft", "clipood", "lipsum", "ueo")
GIB = 2**30

TINY_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
"""The ``--cpu`` model: tests/recipes_fixtures.py's tiny open_clip ViT config."""


class Sizes(NamedTuple):
    """What one mode measures: the model, the batches and the number of timed pairs."""

    model: str  # an open_clip model name, or "tiny" (TINY_MODEL)
    image: int
    batch: int
    classes: int
    eval_images: int
    eval_batch: int
    warmup: int
    repeats: int  # timed (kernel, baseline) pairs of a training step
    kernel_repeats: int  # timed pairs of an averaging kernel
    budget: float  # seconds for the whole run
    test_timeout: float  # seconds for the device tests


GPU = Sizes("ViT-B-16", 224, 128, 1000, 1024, 256, 3, 10, 30, 290.0, 180.0)
CPU = Sizes("tiny", 32, 8, 16, 64, 32, 1, 3, 3, 120.0, 100.0)
DEVICE_MARK = re.compile(
    r"^\s*(?:@pytest\.mark\.device\b|pytestmark\s*=.*\bpytest\.mark\.device\b)", re.M
)
"""A line that marks a test (decorator) or a module (``pytestmark``) ``device``."""
NEED = {"averaging": 10.0, "steps": 45.0, "evaluation": 20.0}
"""Seconds a section needs at least on a GPU (a section starts only with that much left)."""


NOTES = {
    "timing": "CUDA events (perf_counter on the CPU) around each call; interleaved (kernel, "
    "baseline) pairs after a warm-up, alternating which runs first; ms is the median call, a "
    "ratio the median of the per-pair ratios",
    "averaging": "gb_per_s counts the bytes an update must move (fp32: read the accumulator and "
    "the parameter, write the accumulator, 12 B per element; bf16 parameters 10 B), the copy 8 B "
    "per element (read + write); fraction_of_copy = gb_per_s / the copy's",
    "steps": "one optimiser step as robustft.recipes.train runs it (bf16 autocast, fp32 weights, "
    "batch already on the device); peak_gib is the allocator's peak during one step with this "
    "method and the pre-trained model resident (on the CPU: the profiler's peak above the start)",
    "evaluation": "images_per_s over the whole pass; bare_forward reads the same DataLoader; "
    "forward_on_device has the batches on the device already; peak_gib is the pass's peak above "
    "what was allocated before it",
}
"""What each number in the JSON means (written into it)."""


# ---------------------------------------------------------------------------------------------
# time, memory, budget


class Budget:
    """The run's wall-clock budget: ``left()`` seconds remain of ``seconds``."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.monotonic()

    def spent(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.spent()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``fn``: CUDA events around it on a GPU, ``perf_counter`` on CPU."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Pairs(NamedTuple):
    """Medians of interleaved (kernel, baseline) timings and of their per-pair ratios."""

    kernel_s: float
    baseline_s: float
    ratio: float
    pairs: int


def compare(
    kernel: Callable[[], Any],
    baseline: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    budget: Budget,
) -> Pairs:
    """Time ``repeats`` interleaved pairs after ``warmup`` calls of each, alternating which side
    runs first; fewer pairs (at least one) if the budget runs out."""
    for _ in range(warmup):
        kernel()
        baseline()
    _sync(device)
    ks: list[float] = []
    bs: list[float] = []
    for i in range(repeats):
        if i and budget.left() <= 0:
            break
        if i % 2:
            b = timed(baseline, device)
            k = timed(kernel, device)
        else:
            k = timed(kernel, device)
            b = timed(baseline, device)
        ks.append(k)
        bs.append(b)
    ratio = statistics.median(k / b for k, b in zip(ks, bs))
    return Pairs(statistics.median(ks), statistics.median(bs), ratio, len(ks))


def allocated(device: torch.device) -> int:
    """Bytes the CUDA caching allocator holds for tensors now (0 on the CPU, which has no count)."""
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else 0


def peak(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs.

    On a GPU the allocator's absolute peak (``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats``): everything resident counts. On the CPU, which has no such
    counter, the peak above the start from torch's profiler (a smoke value).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    sys.path.insert(0, str(ROOT / "tests"))  # the one home of the profiler-based measurement
    try:
        from _memory import peak_alloc_bytes
    finally:
        sys.path.remove(str(ROOT / "tests"))
    return int(peak_alloc_bytes(fn))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 4)


# ---------------------------------------------------------------------------------------------
# the model and the data


class Setup:
    """The pre-trained model (random weights), its head and batches, built once per run."""

    def __init__(self, sizes: Sizes, device: torch.device):
        self.sizes, self.device = sizes, device
        self.runtime = Runtime(device, amp_dtype=torch.bfloat16)
        torch.manual_seed(0)
        if sizes.model == "tiny":
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "device-check-tiny.json"
                path.write_text(json.dumps(TINY_MODEL), encoding="utf-8")
                bundle = load_model(path, device=device)
        else:
            bundle = load_model(sizes.model, device=device)  # random init: nothing downloaded
        self.model, self.tokenizer = bundle.model, bundle.tokenizer
        self.scale = float(clip.logit_scale(self.model).detach())
        self.dim = int(self.model.text_projection.shape[1])
        g = torch.Generator().manual_seed(1)
        self.head = F.normalize(torch.randn(sizes.classes, self.dim, generator=g), dim=-1).to(
            device
        )
        self.classnames = [f"class {i}" for i in range(sizes.classes)]
        size = (sizes.batch, 3, sizes.image, sizes.image)
        self.batch = (
            torch.randn(size, generator=g).to(device),
            torch.randint(0, sizes.classes, (sizes.batch,), generator=g).to(device),
            torch.arange(sizes.batch).to(device),
        )
        # UEO's per-sample zero-shot confidence, indexed by dataset position (the batch's indices)
        self.confidence = (0.05 + 0.95 * torch.rand(sizes.batch, generator=g)).to(device)
        self.model_bytes = sum(
            t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()]
        )


class Stepper:
    """One optimiser step of a recipe method, as :func:`robustft.recipes.train` runs it.

    The method is :func:`robustft.recipes.build`'s; the step is the loop's: the loss under the
    runtime's autocast, backward, the optimiser step, ``zero_grad(set_to_none=True)`` and the
    trajectory average's ``update_`` (CLIPood's BMA). The batch is already on the device and the
    learning rate stays at its peak: what is timed is the method, not the loader or the schedule.
    """

    def __init__(self, name: str, setup: Setup):
        self.runtime, self.batch = setup.runtime, setup.batch
        config = resolve(
            {
                "steps": 1_000_000,  # BMA's horizon: never reached here
                "batch_size": setup.sizes.batch,
                "workers": 0,
                "progress": False,
                "save_every": 0,
                "precision": "bf16",
                "device": str(setup.device),
            },
            method=name,
        )
        ctx = Context(
            setup.model,
            setup.tokenizer,
            setup.classnames,
            ["a photo of a {}."],
            setup.head,
            setup.scale,
            config,
            confidence=setup.confidence if name == "ueo" else None,
        )
        method = build(ctx)
        self.net, teacher = wrap(method.module, method.teacher, self.runtime)
        self.method = method._replace(module=self.net, teacher=teacher)
        self.optimizer = make_optimizer(self.net, config)
        self.averager = make_averager(config, config.steps or 1)
        self.trained = trained_tree(self.net)
        self.state = self.averager.init(self.trained) if self.averager is not None else None
        self.step = 0
        self.net.train()

    def __call__(self) -> None:
        with autocast(self.runtime):
            loss = self.method.loss(self.net, self.batch, self.step)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.averager is not None and self.state is not None:
            self.state = self.averager.update_(self.state, self.trained)
        self.step += 1


# ---------------------------------------------------------------------------------------------
# the sections


def device_test_files(root: Path = ROOT) -> list[str]:
    """The test files that mark tests ``device`` (only those are imported: a test module that
    fails to import on the GPU machine for another reason does not fail the device check)."""
    return sorted(
        str(path.relative_to(root))
        for path in (root / "tests").glob("test_*.py")
        if DEVICE_MARK.search(path.read_text(encoding="utf-8"))
    )


def section_device_tests(
    sizes: Sizes, out: Path, budget: Budget, paths: Sequence[str], *, require_run: bool
) -> dict:
    """Run ``pytest -m device`` on ``paths`` in a subprocess bounded by the budget.

    ``ok`` when pytest ran to the end with no failure and no error and, with ``require_run``
    (on a GPU), at least one test passed; ``failed``, ``timeout`` otherwise.
    """
    if not paths:
        return {"status": "failed", "error": "no test file under tests/ marks a test device"}
    xml, log = out / TESTS_XML, out / TESTS_LOG
    xml.unlink(missing_ok=True)
    timeout = max(5.0, min(sizes.test_timeout, budget.left()))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-v",
        "--durations=15",
        "-p",
        "no:randomly",
        "-m",
        "device",
        "--continue-on-collection-errors",
        f"--junitxml={xml}",
        *paths,
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("CI", "1")
    entry: dict[str, Any] = {"command": " ".join(["python", *cmd[1:]]), "timeout_s": timeout}
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            entry["returncode"] = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # pytest and every process it started
            proc.wait(timeout=30)
            entry["returncode"] = None
    tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
    print("\n".join(["--- device tests (last lines of " + TESTS_LOG + ") ---", *tail]))
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures: list[str] = []
    if xml.exists():
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            for key, attr in (("tests", "tests"), ("failed", "failures"), ("errors", "errors")):
                counts[key] += int(suite.get(attr, 0))
            counts["skipped"] += int(suite.get("skipped", 0))
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failures.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    entry.update(counts, failures=failures)
    rc = entry["returncode"]
    bad = counts["failed"] + counts["errors"]
    if rc is None:
        entry["status"] = "timeout"
        entry["error"] = f"the device tests did not finish within {timeout:.0f} s; see {TESTS_LOG}"
    elif bad or rc not in (0, 5):  # 5: nothing ran (every test skipped or deselected)
        entry["status"] = "failed"
        entry["error"] = f"pytest exit status {rc}, {bad} failed or errors; see {TESTS_LOG}"
    elif counts["passed"] == 0 and require_run:
        entry["status"] = "failed"
        entry["error"] = (
            f"no device test ran ({counts['skipped']} skipped, exit status {rc}): is the GPU "
            f"visible to pytest? see {TESTS_LOG}"
        )
    else:
        entry["status"] = "ok"  # on the CPU: every device test skipped, as it should be
    return entry


def section_averaging(setup: Setup, budget: Budget) -> dict:
    """EMA/BMA ``update_`` vs the device-to-device copy of the same bytes."""
    device, sizes = setup.device, setup.sizes
    params = {f"visual.{n}": p.detach() for n, p in visual_tower(setup.model).named_parameters()}
    params["head"] = setup.head
    values = list(params.values())
    elements = sum(v.numel() for v in values)
    fp32 = 4 * elements
    dst = [torch.empty_like(v) for v in values]
    acc = [v.clone() for v in values]
    half = {k: v.bfloat16() for k, v in params.items()}

    def copy_() -> None:
        torch._foreach_copy_(dst, values)

    def lerp_() -> None:
        torch._foreach_lerp_(acc, values, 0.001)

    def updater(avg: averaging.Averager, tree: Mapping[str, Tensor]) -> Callable[[], None]:
        cell = [avg.init(tree)]

        def update() -> None:
            cell[0] = avg.update_(cell[0], tree)

        return update

    kernels: dict[str, tuple[Callable[[], None], float]] = {
        # bytes moved per element: read the accumulator and the parameter, write the accumulator
        "foreach_lerp": (lerp_, 12.0),
        "ema_update_": (updater(averaging.ema(0.999), params), 12.0),
        "bma_update_": (updater(averaging.bma(1_000_000), params), 12.0),
        # bf16 parameters into float32 accumulators: read 4 + 2 bytes, write 4
        "bma_update_bf16_params": (updater(averaging.bma(1_000_000), half), 10.0),
    }
    entry: dict[str, Any] = {
        "tensors": len(values),
        "elements": elements,
        "fp32_bytes": fp32,
    }
    copy_s: list[float] = []
    lerp_s = math.nan
    for name, (fn, per_element) in kernels.items():
        r = compare(
            fn, copy_, device, warmup=sizes.warmup, repeats=sizes.kernel_repeats, budget=budget
        )
        copy_s.append(r.baseline_s)
        moved = per_element * elements
        fraction = (per_element / 8.0) / r.ratio  # the copy moves 8 bytes per element
        item = {
            "ms": ms(r.kernel_s),
            "gb_per_s": round(moved / r.kernel_s / 1e9, 3),
            "fraction_of_copy": round(fraction, 4),
            "pairs": r.pairs,
        }
        if name == "foreach_lerp":
            lerp_s = r.kernel_s
        else:
            item["ratio_to_foreach_lerp"] = round(r.kernel_s / lerp_s, 4)
        entry[name] = item
    copy_median = statistics.median(copy_s)
    entry["copy"] = {
        "ms": ms(copy_median),
        "gb_per_s": round(8.0 * elements / copy_median / 1e9, 3),
    }
    return entry


def section_steps(setup: Setup, budget: Budget) -> dict:
    """CLIPood, Lipsum-FT and UEO steps vs plain fine-tuning; each step's peak memory."""
    device, sizes = setup.device, setup.sizes
    entry: dict[str, Any] = {
        "batch": sizes.batch,
        "classes": sizes.classes,
        "image_size": sizes.image,
        "precision": "bf16 autocast, fp32 weights",
        "pretrained_model_gib": round(setup.model_bytes / GIB, 4),
    }
    free_memory(device)
    base = allocated(device)  # the pre-trained model and the batch
    ft = Stepper("ft", setup)
    for _ in range(max(2, sizes.warmup)):  # the optimiser's state exists after the first step
        ft()
    ft_peak = peak(ft, device)
    ft_resident = allocated(device) - base  # ft's weights and optimiser state, between steps
    ft_times: list[float] = []
    entry["ft"] = {"peak_gib": round(ft_peak / GIB, 4)}
    for name in METHODS[1:]:
        if budget.left() <= 0:
            entry[name] = {"status": "skipped", "reason": "time budget spent"}
            continue
        step: Stepper | None = None
        try:
            step = Stepper(name, setup)
            for _ in range(max(2, sizes.warmup)):
                step()
            # the absolute peak less what ft holds: this method beside the pre-trained model
            own = peak(step, device) - ft_resident
            r = compare(step, ft, device, warmup=1, repeats=sizes.repeats, budget=budget)
            ft_times.append(r.baseline_s)
            entry[name] = {
                "ms": ms(r.kernel_s),
                "ratio_to_ft": round(r.ratio, 4),
                "peak_gib": round(own / GIB, 4),
                "pairs": r.pairs,
            }
        except Exception as exc:  # one method's failure (an OOM, say) leaves the others
            entry[name] = {"status": "error", "error": one_line(exc)}
            print(traceback.format_exc(), file=sys.stderr)
        finally:
            del step  # its weights, optimiser state and activations go before the next method
            free_memory(device)
    if ft_times:
        entry["ft"]["ms"] = ms(statistics.median(ft_times))
    else:
        entry["ft"]["ms"] = ms(statistics.median(timed(ft, device) for _ in range(3)))
    return entry


def section_evaluation(setup: Setup, budget: Budget) -> dict:
    """``Evaluator.evaluate`` vs a bare forward loop over the same loader, in images/s."""
    device, sizes, runtime = setup.device, setup.sizes, setup.runtime
    visual = visual_tower(setup.model)
    evaluator = Evaluator(visual, setup.scale, runtime, batch_size=sizes.eval_batch, workers=0)
    tree = {f"visual.{n}": p.detach() for n, p in visual.named_parameters()}
    evaluator.load({**tree, "head": setup.head})
    g = torch.Generator().manual_seed(3)
    n = sizes.eval_images
    images = torch.randn((n, 3, sizes.image, sizes.image), generator=g)
    labels = torch.randint(0, sizes.classes, (n,), generator=g)
    labels[: n // 10] = -1  # 10 % unknown: the open-set metrics run too
    dataset = TensorDataset(images, labels)
    replica, cuda = evaluator.replica, device.type == "cuda"
    on_device = [x.to(device) for x in images.split(sizes.eval_batch)]

    def evaluate() -> None:
        evaluator.evaluate(dataset)

    @torch.no_grad()
    def bare() -> None:
        for x, _ in DataLoader(dataset, batch_size=sizes.eval_batch, pin_memory=cuda):
            with autocast(runtime):
                replica(x.to(device, non_blocking=True))

    @torch.no_grad()
    def forward() -> None:
        for x in on_device:
            with autocast(runtime):
                replica(x)

    r = compare(evaluate, bare, device, warmup=1, repeats=max(3, sizes.repeats // 2), budget=budget)
    f = compare(forward, bare, device, warmup=1, repeats=3, budget=budget)
    resident = allocated(device)  # the models and the batches already on the device
    return {
        "images": n,
        "batch": sizes.eval_batch,
        "evaluate": {"ms": ms(r.kernel_s), "images_per_s": round(n / r.kernel_s, 2)},
        "bare_forward": {"ms": ms(r.baseline_s), "images_per_s": round(n / r.baseline_s, 2)},
        "forward_on_device": {"ms": ms(f.kernel_s), "images_per_s": round(n / f.kernel_s, 2)},
        "ratio_to_bare": round(r.ratio, 4),
        "peak_gib": round((peak(evaluate, device) - resident) / GIB, 4),
        "pairs": r.pairs,
    }


# ---------------------------------------------------------------------------------------------
# the report


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:500]}"


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    env: dict[str, Any] = {
        "device": "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "nccl": None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "robustft": robustft.__version__,
        "open_clip": None,
        "gpu_memory_gib": None,
        "git_commit": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / GIB, 2)
        env["cudnn"] = torch.backends.cudnn.version()
        try:
            nccl = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except Exception as exc:  # a build without NCCL: recorded, the device tests say more
            env["nccl"] = one_line(exc)
    try:
        import open_clip

        env["open_clip"] = open_clip.__version__
    except ImportError as exc:  # the GPU machine's image may lack it: docs/development.md
        env["open_clip"] = f"missing ({one_line(exc)}): carry the wheels (make device-wheels)"
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        env["git_commit"] = head.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def _fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return f"{value:.{digits}f}{unit}"
    return "–"


def markdown(report: Mapping[str, Any]) -> str:
    """The short table: one row per measured kernel, its baseline and the ratio."""
    env, s = report["environment"], report["sections"]
    date = report["date"][:10]
    cuda = f"CUDA {env['cuda']}" if env["cuda"] else "no CUDA"
    lines = [
        f"Device check, {report['mode']} mode: {env['device']}, torch {env['torch']}, {cuda}, "
        f"{date} (robustft {env['robustft']}, commit {str(env['git_commit'])[:10]}).",
        "",
    ]
    t = s.get("device_tests", {})
    if t.get("status") in ("ok", "failed", "timeout"):
        failed = f", failed: {', '.join(t['failures'])}" if t.get("failures") else ""
        lines.append(
            f"Device tests: {t['status']} — {t['passed']} passed, {t['failed']} failed, "
            f"{t['errors']} errors, {t['skipped']} skipped in {_fmt(t.get('seconds'), ' s', 0)}"
            f"{failed}."
        )
    else:
        why = t.get("error") or t.get("reason") or ""
        lines.append(f"Device tests: {t.get('status', 'not run')} {why}".rstrip())
    lines += ["", "| kernel | time | baseline | ratio |", "|---|---|---|---|"]
    a = s.get("averaging", {})
    if a.get("status") == "ok":
        copy_bw = _fmt(a["copy"]["gb_per_s"], " GB/s", 0)
        n = a["elements"] / 1e6
        for key, label in (
            ("ema_update_", "EMA update_"),
            ("bma_update_", "BMA update_"),
            ("bma_update_bf16_params", "BMA update_, bf16 params"),
            ("foreach_lerp", "bare _foreach_lerp_"),
        ):
            k = a[key]
            lines.append(
                f"| {label} ({n:.1f} M elements) | {_fmt(k['ms'], ' ms', 3)}, "
                f"{_fmt(k['gb_per_s'], ' GB/s', 0)} | copy {copy_bw} | "
                f"{_fmt(k['fraction_of_copy'])} of copy bandwidth |"
            )
    else:
        lines.append(_failed_row("averaging", a))
    st = s.get("steps", {})
    if st.get("status") == "ok":
        ft = st["ft"]
        base = f"FT {_fmt(ft.get('ms'), ' ms', 1)}, peak {_memory(ft.get('peak_gib'))}"
        for name, label in (("clipood", "CLIPood"), ("lipsum", "Lipsum-FT"), ("ueo", "UEO")):
            m = st.get(name, {})
            what = f"{label} step (batch {st['batch']}, {st['classes']} classes, bf16)"
            if "ms" in m:
                lines.append(
                    f"| {what} | {_fmt(m['ms'], ' ms', 1)}, peak {_memory(m['peak_gib'])} "
                    f"| {base} | {_fmt(m['ratio_to_ft'], '×', 3)} |"
                )
            else:
                lines.append(f"| {what} | {m.get('status')}: {m.get('error', '')} | | |")
    else:
        lines.append(_failed_row("steps", st))
    e = s.get("evaluation", {})
    if e.get("status") == "ok":
        lines.append(
            f"| Evaluator.evaluate ({e['images']} images, batch {e['batch']}) | "
            f"{_fmt(e['evaluate']['images_per_s'], ' img/s', 0)} | bare forward "
            f"{_fmt(e['bare_forward']['images_per_s'], ' img/s', 0)} (on device: "
            f"{_fmt(e['forward_on_device']['images_per_s'], ' img/s', 0)}) | "
            f"{_fmt(e['ratio_to_bare'], '×', 3)} time |"
        )
    else:
        lines.append(_failed_row("evaluation", e))
    return "\n".join(lines) + "\n"


def _memory(gib: Any) -> str:
    if isinstance(gib, (int, float)) and math.isfinite(gib) and gib < 0.1:
        return _fmt(gib * 1024, " MiB", 1)
    return _fmt(gib, " GiB")


def _failed_row(name: str, entry: Mapping[str, Any]) -> str:
    return f"| {name} | {entry.get('status', 'not run')}: {entry.get('error', '')} | | |"


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write(report: dict[str, Any], out: Path) -> None:
    atomic_write(out / JSON_NAME, json.dumps(finite(report), indent=2, allow_nan=False) + "\n")
    atomic_write(out / MARKDOWN_NAME, markdown(report))


# ---------------------------------------------------------------------------------------------
# the command


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="device_check",
        description="Device tests and headline GPU ratios in one bounded run (issue 22).",
    )
    p.add_argument(
        "--cpu", action="store_true", help="tiny sizes on the CPU (the smoke run of make test)"
    )
    p.add_argument("--out", default="device-check-out", help="folder for the JSON and markdown")
    p.add_argument("--budget", type=float, help="seconds for the whole run (default: 290 on GPU)")
    p.add_argument("--test-timeout", type=float, help="seconds for the device tests (default 180)")
    p.add_argument(
        "--tests",
        nargs="+",
        help="where pytest collects the device tests (default: the files under tests/ that mark "
        "tests with pytest.mark.device)",
    )
    p.add_argument(
        "--skip", action="append", default=[], choices=SECTIONS, help="a section to leave out"
    )
    args = p.parse_args(argv)
    for flag in ("budget", "test_timeout"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{flag.replace('_', '-')} must be a positive number of seconds, got {value}")
    if not args.cpu and not torch.cuda.is_available():
        p.error(
            "no CUDA device is visible to torch "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "run on a GPU machine, or add --cpu for the CPU smoke run"
        )
    return args


def run_section(
    report: dict[str, Any],
    name: str,
    out: Path,
    budget: Budget,
    need: float,
    body: Callable[[], dict],
) -> None:
    """Run one section: skipped without ``need`` seconds left, its error recorded, JSON rewritten."""
    if budget.left() < need:
        report["sections"][name] = {
            "status": "skipped",
            "reason": f"time budget spent ({budget.left():.0f} s left, {need:.0f} s needed)",
        }
        write(report, out)
        return
    print(f"[device_check] {name} ({budget.left():.0f} s of the budget left)", flush=True)
    t0 = time.monotonic()
    try:
        entry = body()
        entry.setdefault("status", "ok")
    except Exception as exc:
        print(traceback.format_exc(), file=sys.stderr)
        entry = {"status": "error", "error": one_line(exc)}
    entry["seconds"] = round(time.monotonic() - t0, 2)
    report["sections"][name] = entry
    report["seconds"] = round(budget.spent(), 2)
    write(report, out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; the exit status: 0, 1 if a device test failed, 2 on a usage or output error."""
    try:
        return _main(argv)
    except (RunError, OSError) as err:  # the output folder cannot be written: one line
        print(f"device_check: error: --out: {err}", file=sys.stderr)
        return 2


def _main(argv: Sequence[str] | None) -> int:
    args = parse(argv)
    sizes = CPU if args.cpu else GPU
    if args.budget is not None:
        sizes = sizes._replace(budget=args.budget)
    if args.test_timeout is not None:
        sizes = sizes._replace(test_timeout=args.test_timeout)
    device = torch.device("cpu" if args.cpu else "cuda")
    torch.set_num_threads(1 if args.cpu else max(1, min(8, os.cpu_count() or 1)))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(sizes.budget)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "sizes": sizes._asdict(),
        "budget_s": sizes.budget,
        "notes": NOTES,
        "seconds": 0.0,
        "sections": {name: {"status": "pending"} for name in SECTIONS},
        "exit_code": None,
    }
    for name in args.skip:
        report["sections"][name] = {"status": "skipped", "reason": "--skip"}
    write(report, out)
    paths = list(args.tests) if args.tests else device_test_files()
    if "device_tests" not in args.skip:
        run_section(
            report,
            "device_tests",
            out,
            budget,
            0.0,
            lambda: section_device_tests(
                sizes, out, budget, paths, require_run=device.type == "cuda"
            ),
        )
    setup_cell: list[Setup] = []

    def with_setup(fn: Callable[[Setup, Budget], dict]) -> Callable[[], dict]:
        def body() -> dict:
            if not setup_cell:
                setup_cell.append(Setup(sizes, device))
            return fn(setup_cell[0], budget)

        return body

    bodies = {
        "averaging": section_averaging,
        "steps": section_steps,
        "evaluation": section_evaluation,
    }
    for name, fn in bodies.items():
        if name in args.skip:
            continue
        need = NEED[name] if device.type == "cuda" else 0.0
        run_section(report, name, out, budget, need, with_setup(fn))
        free_memory(device)
    tests = report["sections"]["device_tests"]
    code = 0 if tests["status"] in ("ok", "skipped") else 1
    report["exit_code"] = code
    report["seconds"] = round(budget.spent(), 2)
    write(report, out)
    print((out / JSON_NAME).read_text(encoding="utf-8"))
    print((out / MARKDOWN_NAME).read_text(encoding="utf-8"))
    print(f"[device_check] wrote {out / JSON_NAME} and {out / MARKDOWN_NAME}; exit status {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
