"""``torchrun --nproc_per_node=2 -m robustft finetune ...`` on CPU (gloo) equals one process.

The real command line under PyTorch's own launcher: torchrun's environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, rendezvous) is all the recipes read, and the weights of a DDP and an
FSDP2 run equal those of a one-process run with the same global batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from recipes_fixtures import write_digits, write_tiny_config

TIMEOUT = 240


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("torchrun")
    data = write_digits(root / "data", per_class=8)
    config = write_tiny_config(root / "tiny.json")
    args = [
        "finetune", "--method", "clipood", "--model", str(config), "--train", str(data.train),
        "--val", str(data.val), "--classnames", str(data.names_file), "--eval",
        f"open={data.open}", "--templates", "simple", "--steps", "3", "--batch-size", "8",
        "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--workers", "0",
        "--no-progress", "--log-every", "1",
    ]  # fmt: skip
    return root, args


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("WORLD_SIZE", None)
    return env


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {
        **load_file(str(run / "last.safetensors")),
        **{f"avg/{k}": v for k, v in load_file(str(run / "average.safetensors")).items()},
    }


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_processes_equal_one(setup: tuple[Path, list[str]], strategy: str) -> None:
    root, args = setup
    one = root / "one"
    if not one.exists():
        subprocess.run(
            [sys.executable, "-m", "robustft", *args, "--output", str(one)],
            check=True,
            env=_env(),
            timeout=TIMEOUT,
            capture_output=True,
        )
    two = root / f"two-{strategy}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*launcher, "-m", "robustft", *args, "--distributed", strategy, "--output", str(two)],
        env=_env(),
        timeout=TIMEOUT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(
            b[key], a[key], rtol=1e-4, atol=2e-5, msg=lambda m, k=key: f"{k}: {m}"
        )
    import json

    results = json.loads((two / "results.json").read_text())
    single = json.loads((one / "results.json").read_text())
    assert (
        results["results"]["last"]["open"]["num_unknown"]
        == single["results"]["last"]["open"]["num_unknown"]
        > 0
    )
    assert results["results"]["last"]["open"]["accuracy"] == pytest.approx(
        single["results"]["last"]["open"]["accuracy"]
    )
