"""Doctest namespace for ``pytest --doctest-modules robustft``."""

import pytest
import torch

from robustft import peft


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace: dict) -> None:
    doctest_namespace["torch"] = torch
    # robustft.peft's doctests build specs with its factories
    doctest_namespace.update(peft=peft, lora=peft.lora, adapter=peft.adapter)
    torch.manual_seed(0)
