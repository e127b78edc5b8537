"""Shared machinery of the benchmark kernels: a kernel is always timed beside its baseline.

Each performance target is a test that asks for the ``compare`` fixture::

    def test_mms_vs_cross_entropy(compare):
        compare("margin_metric_softmax", kernel, "F.cross_entropy", baseline, target=1.3)

* ``make bench`` (part of ``make test``) runs with ``--benchmark-disable``: each function is called
  once as a smoke test, no timing, no assertion on speed.
* ``target=None`` marks an informational comparison (reported, not asserted), e.g. against a
  stricter baseline than the one a target is defined on.
* ``make bench-run`` times ``rounds`` interleaved (kernel, baseline) pairs after a warm-up, with
  the garbage collector off and a fixed intra-op thread count (each side of a pair the fastest of
  ``repeat`` back-to-back calls, default 1), reports the median of the per-pair ratios (robust to a noisy, shared machine, since both sides of a pair see the same load),
  records it in the pytest-benchmark JSON (``extra_info``) and fails if it is above ``target``.
  The printed table is what the docs and notes quote.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

# helpers shared with the tests (e.g. tests/_memory.py) are importable from the benchmarks
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

RESULTS: list[str] = []


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    """CPU kernels run on ``ROBUSTFT_BENCH_THREADS`` intra-op threads (default 1).

    On a shared or CPU-quota-limited machine a second OpenMP thread that gets descheduled stalls
    every parallel region: measured here, a [256, 512] x [512, 1000] cross-entropy step took
    7.6 ms on one thread and 80-190 ms on two. One thread times the kernels, not the scheduler.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("ROBUSTFT_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(threads)
    gc.collect()


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device | None, repeat: int = 1) -> float:
    """Seconds of one call of ``fn``: the fastest of ``repeat`` back-to-back calls.

    Interference from other processes only ever adds time, so the minimum of a few consecutive
    calls estimates the kernel's own cost; the median over pairs (in ``compare``) then removes
    what the minimum cannot.
    """
    best = math.inf
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.fixture
def compare(benchmark: Any, request: pytest.FixtureRequest) -> Callable[..., float | None]:
    disabled = bool(request.config.getoption("benchmark_disable", False))

    def run(
        name: str,
        kernel: Callable[[], Any],
        baseline_name: str,
        baseline: Callable[[], Any],
        *,
        target: float | None,
        rounds: int = 15,
        warmup: int = 3,
        repeat: int = 1,
        device: torch.device | None = None,
    ) -> float | None:
        if disabled:
            kernel()
            baseline()
            benchmark(kernel)  # registers the kernel; a single untimed call when disabled
            return None
        for _ in range(warmup):
            kernel()
            baseline()
        ratios, tk, tb = [], [], []
        # the garbage collector stays off while timing: a collection landing inside one side of
        # a pair (the Python-heavy side, typically) is noise, not a cost of either kernel
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for i in range(rounds):
                # alternate the order inside each pair so neither side always runs second
                if i % 2 == 0:
                    a = _time(kernel, device, repeat)
                    b = _time(baseline, device, repeat)
                else:
                    b = _time(baseline, device, repeat)
                    a = _time(kernel, device, repeat)
                tk.append(a)
                tb.append(b)
                ratios.append(a / b)
        finally:
            if gc_was_enabled:
                gc.enable()
        ratio = statistics.median(ratios)
        benchmark.extra_info.update(
            {
                "baseline": baseline_name,
                "ratio_median_of_pairs": ratio,
                "kernel_median_s": statistics.median(tk),
                "baseline_median_s": statistics.median(tb),
                "target": target,
            }
        )
        benchmark.pedantic(kernel, rounds=3, iterations=1)
        goal = "informational" if target is None else f"target <= {target}"
        line = (
            f"{name:<44} {statistics.median(tk) * 1e3:9.2f} ms   {baseline_name:<36} "
            f"{statistics.median(tb) * 1e3:9.2f} ms   ratio {ratio:5.2f} ({goal})"
        )
        RESULTS.append(line)
        if target is not None:
            assert ratio <= target, f"{name}: {ratio:.2f}x {baseline_name}, target <= {target}x"
        return ratio

    return run


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if RESULTS:
        terminalreporter.section("robustft kernel / baseline ratios (median of interleaved pairs)")
        for line in RESULTS:
            terminalreporter.write_line(line)
