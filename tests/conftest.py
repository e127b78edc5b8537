"""Test harness: fixed seeds, hypothesis profiles, warnings as errors (pyproject), one thread."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# ``ci`` is derandomised (the same examples every run) and used whenever CI is set;
# ``dev`` explores more examples with fresh randomness. Select with HYPOTHESIS_PROFILE=dev.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=30,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# one intra-op thread: the tensors here are tiny, and OpenMP spin-waits make small ops 100x
# slower when the two cores are shared with another process (measured on the CI machine)
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
