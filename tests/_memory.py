"""Peak bytes allocated by torch's CPU allocator while a function runs (profiler memory events).

Shared by the averaging tests and the averaging benchmark. It reads the profiler's event tree
(`kineto_results.experimental_event_tree`), a private API that may change with a torch upgrade.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def peak_alloc_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the bytes allocated (net of frees) by torch's CPU allocator while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []

    def walk(node: Any) -> None:
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return peak
