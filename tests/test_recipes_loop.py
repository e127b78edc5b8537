"""robustft.recipes._loop: schedule, plan, the seeded step sampler, accumulation, averaging, and
that a short fine-tuning run of the tiny model learns."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy import stats
from test_recipes_cli import Tiny, make_tiny, metrics_lines, overrides, read_json, run
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from robustft.recipes import Method, Plan, load_model, lr_factor, plan, resolve, train
from robustft.recipes._loop import Seeded, StepSampler
from robustft.recipes._methods import unwrap
from robustft.recipes._runtime import Runtime


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.getbasetemp())


# --- lr_factor ---------------------------------------------------------------------------------


def test_lr_factor_cosine_without_warmup() -> None:
    assert lr_factor(0, 10, 0.0, "cosine") == 1.0
    assert lr_factor(5, 10, 0.0, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0.0, "cosine") == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)))
    assert lr_factor(0, 1, 0.0, "cosine") == 1.0


def test_lr_factor_warmup_then_cosine() -> None:
    # w = floor(0.2 · 10) = 2 warm-up steps: (t + 1) / w, then a cosine over the other 8
    got = [lr_factor(t, 10, 0.2, "cosine") for t in range(10)]
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert got == pytest.approx(expected, abs=1e-15)
    assert got[6] == pytest.approx(0.5)


def test_lr_factor_warmup_then_constant() -> None:
    got = [lr_factor(t, 10, 0.3, "constant") for t in range(10)]
    assert got == pytest.approx([1 / 3, 2 / 3] + [1.0] * 8)
    assert lr_factor(2, 10, 0.3, "constant") == 1.0


def test_lr_factor_warmup_shorter_than_a_step_is_none() -> None:
    assert lr_factor(0, 10, 0.05, "cosine") == 1.0  # floor(0.5) = 0 warm-up steps


# --- plan --------------------------------------------------------------------------------------


def _config(**values: Any) -> Any:
    return resolve({"train": "unused", **values})


def test_plan_from_steps_splits_the_global_batch() -> None:
    assert plan(_config(steps=7, batch_size=8), 60, 1) == Plan(7, 8, 8, 1, 7)
    assert plan(_config(steps=7, batch_size=8, accumulation=2), 60, 2) == Plan(7, 8, 2, 2, 7)
    assert plan(_config(steps=3, batch_size=12, accumulation=3), 50, 2) == Plan(3, 12, 2, 3, 4)


def test_plan_from_epochs() -> None:
    ueo = resolve({"train": "unused", "batch_size": 8}, method="ueo")  # 5 epochs, no steps
    assert plan(ueo, 60, 1) == Plan(35, 8, 8, 1, 7)  # 7 full batches per epoch
    half = resolve({"train": "unused", "batch_size": 8, "epochs": 0.5}, method="ueo")
    assert plan(half, 60, 1).steps == 4  # round(3.5)
    tiny = resolve({"train": "unused", "batch_size": 8, "epochs": 0.01}, method="ueo")
    assert plan(tiny, 60, 1).steps == 1  # at least one step


def test_plan_errors() -> None:
    with pytest.raises(
        ValueError,
        match=r"--batch-size \(batch_size in a config file\) must be a multiple of the number of "
        r"ranks x --accumulation = 3 x 1 = 3, got 8",
    ):
        plan(_config(steps=2, batch_size=8), 60, 3)
    with pytest.raises(ValueError, match=r"--accumulation = 4 x 2 = 8, got 12"):
        plan(_config(steps=2, batch_size=12, accumulation=2), 60, 4)
    with pytest.raises(ValueError, match=r"must be at most the training set's 7 samples, got 8"):
        plan(_config(steps=2, batch_size=8), 7, 1)


# --- StepSampler -------------------------------------------------------------------------------


def _batches(
    n: int, p: Plan, *, world: int = 1, rank: int = 0, start: int = 0, seed: int = 3
) -> list[Any]:
    return list(StepSampler(n, p, seed=seed, rank=rank, world=world, start=start))


@pytest.mark.parametrize(("world", "accumulation"), [(2, 1), (1, 4), (2, 2), (4, 1)])
def test_ranks_and_micro_steps_together_see_the_global_batch(world: int, accumulation: int) -> None:
    n, steps, batch = 27, 9, 8
    whole = _batches(n, Plan(steps, batch, batch, 1, n // batch))
    assert len(whole) == steps and all(len(b) == batch for b in whole)
    micro = batch // (world * accumulation)
    p = Plan(steps, batch, micro, accumulation, n // batch)
    per_rank = [_batches(n, p, world=world, rank=r) for r in range(world)]
    for r in range(world):
        assert (
            len(per_rank[r])
            == len(StepSampler(n, p, seed=3, rank=r, world=world, start=0))
            == steps * accumulation
        )
    for step in range(steps):
        # micro-step a of rank r is the (a·world + r)-th slice of the global batch
        joined = [
            x
            for a in range(accumulation)
            for r in range(world)
            for x in per_rank[r][step * accumulation + a]
        ]
        assert joined == whole[step]
        assert {s for _, _, s in joined} == {step}


def test_each_epoch_is_a_fresh_permutation() -> None:
    n = 24
    batches = _batches(n, Plan(9, 8, 8, 1, 3))
    epochs = [[i for b in batches[e * 3 : (e + 1) * 3] for i, _, _ in b] for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(n))
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != epochs[2]
    seeds = [s for b in batches for _, s, _ in b]
    assert len(set(seeds)) == len(seeds)  # every sample of the run has its own augmentation seed
    assert _batches(n, Plan(9, 8, 8, 1, 3), seed=4) != batches


def test_an_epoch_drops_the_incomplete_last_batch() -> None:
    batches = _batches(10, Plan(2, 4, 4, 1, 2))  # 10 // 4 = 2 steps per epoch: 8 distinct samples
    seen = [i for b in batches for i, _, _ in b]
    assert len(set(seen)) == 8


@pytest.mark.parametrize("start", [0, 1, 4, 7, 8])
def test_a_sampler_started_at_step_k_yields_the_tail(start: int) -> None:
    p = Plan(9, 8, 2, 2, 3)
    for rank in (0, 1):
        full = _batches(26, p, world=2, rank=rank)
        tail = _batches(26, p, world=2, rank=rank, start=start)
        assert tail == full[start * p.accumulation :]
        assert len(StepSampler(26, p, seed=3, rank=rank, world=2, start=start)) == len(tail)


# --- Seeded ------------------------------------------------------------------------------------


class _Noisy(Dataset[tuple[Tensor, int]]):
    """Item i: a draw from torch's global generator (like a random augmentation), label i % 3."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return torch.rand(4) + index, index % 3


def test_seeded_draws_depend_on_the_key_only_and_leave_the_global_rng_alone() -> None:
    ds = Seeded(_Noisy())
    before = torch.get_rng_state()
    a, label, index = ds[(2, 1234, 0)]
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(10)  # whatever else happens to the global generator in between
    b, _, _ = ds[(2, 1234, 5)]
    assert torch.equal(a, b) and (label, index) == (2, 2)
    c, _, _ = ds[(2, 1235, 0)]
    assert not torch.equal(a, c)
    assert isinstance(label, int)


def test_seeded_open_clip_augmentation_is_reproducible(tiny: Tiny) -> None:
    from robustft.recipes import FolderDataset, class_names

    bundle = load_model(tiny.config)
    folders, _ = class_names(tiny.digits.train)
    ds = Seeded(FolderDataset(tiny.digits.train, folders, bundle.train_transform))
    first, label, _ = ds[(7, 99, 0)]
    assert torch.equal(first, ds[(7, 99, 3)][0]) and label == ds.dataset.targets[7]
    views = {tuple(ds[(7, seed, 0)][0].flatten()[:64].tolist()) for seed in range(6)}
    assert len(views) > 1  # the train transform is random, the seed picks the view


# --- the loop on a toy module: accumulation and averages by hand --------------------------------


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


def _toy(record: dict[int, dict[str, Tensor]] | None = None) -> Method:
    torch.manual_seed(0)
    module = _Linear()

    def loss(net: nn.Module, batch: Any, step: int) -> Tensor:
        x, y, _ = batch
        # θ_t, the parameters optimiser step t starts from
        if record is not None and step not in record:
            record[step] = {k: v.detach().clone() for k, v in unwrap(net).named_parameters()}
        return F.cross_entropy(net(x), y)

    def export(net: nn.Module) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in unwrap(net).named_parameters()}

    return Method(module, loss, export)


def _toy_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


CPU = Runtime(torch.device("cpu"))


def _toy_config(**values: Any) -> Any:
    base = {
        "steps": 6,
        "batch_size": 8,
        "lr": 0.5,
        "optimizer": "sgd",
        "weight_decay": 0.0,
        "warmup": 0.0,
        "workers": 0,
        "progress": False,
        "log_every": 1,
    }
    return _config(**{**base, **values})


def test_gradient_accumulation_equals_the_full_batch_on_a_toy() -> None:
    whole = train(_toy(), _toy_data(), _toy_config(), CPU, log=lambda _: None)
    split = train(_toy(), _toy_data(), _toy_config(accumulation=4), CPU, log=lambda _: None)
    for k in whole.last:
        torch.testing.assert_close(split.last[k], whole.last[k], rtol=1e-5, atol=1e-6)
    assert [h["loss"] for h in split.history] == pytest.approx(
        [h["loss"] for h in whole.history], rel=1e-5
    )
    assert [h["step"] for h in whole.history] == [1, 2, 3, 4, 5, 6]
    moved = max(
        float((whole.last[k] - _toy().module.state_dict()[k]).abs().max()) for k in whole.last
    )
    assert moved > 1e-2  # the comparison is not between two untrained models


def _trajectory(average: str, **values: Any) -> tuple[list[dict[str, Tensor]], Any]:
    record: dict[int, dict[str, Tensor]] = {}
    result = train(
        _toy(record), _toy_data(), _toy_config(average=average, **values), CPU, log=lambda _: None
    )
    thetas = [record[t] for t in sorted(record)] + [result.last]
    assert len(thetas) == 7
    return thetas, result


def test_uniform_average_is_the_mean_of_the_trajectory() -> None:
    thetas, result = _trajectory("uniform")
    for k in result.last:
        torch.testing.assert_close(result.averaged[k], torch.stack([t[k] for t in thetas]).mean(0))
        assert not torch.allclose(result.averaged[k], result.last[k])


def test_ema_average_by_hand() -> None:
    d = 0.7
    thetas, result = _trajectory("ema", ema_decay=d)
    for k in result.last:
        expected = thetas[0][k]
        for theta in thetas[1:]:
            expected = d * expected + (1 - d) * theta[k]
        torch.testing.assert_close(result.averaged[k], expected)


def test_bma_average_by_hand() -> None:
    beta = 0.5
    thetas, result = _trajectory("bma", bma_beta=beta)
    steps = len(thetas) - 1
    alphas = [float(stats.beta.pdf((t + 0.5) / (steps + 1), beta, beta)) for t in range(steps + 1)]
    for k in result.last:
        expected = sum(a * t[k] for a, t in zip(alphas, thetas, strict=True)) / sum(alphas)
        torch.testing.assert_close(result.averaged[k], expected)


def test_no_average_and_the_train_result() -> None:
    result = train(_toy(), _toy_data(), _toy_config(log_every=4), CPU, log=lambda _: None)
    assert result.averaged is None and result.best is None and result.seconds > 0
    assert [h["step"] for h in result.history] == [4, 6]  # every 4 steps and the last
    assert all(set(h) == {"step", "loss", "lr", "seconds"} for h in result.history)


def test_select_best_on_validation() -> None:
    scores = iter([0.2, 0.9, 0.5])
    seen: list[dict[str, Tensor]] = []

    def validate(tree: Any) -> float:
        seen.append({k: v.clone() for k, v in tree.items()})
        return next(scores)

    config = _toy_config(eval_every=2, select="best")
    result = train(_toy(), _toy_data(), config, CPU, validate=validate, log=lambda _: None)
    assert len(seen) == 3 and result.best is not None
    for k in result.best:
        torch.testing.assert_close(result.best[k], seen[1][k])  # the step-4 weights scored 0.9
    assert [h["val_accuracy"] for h in result.history if "val_accuracy" in h] == [0.2, 0.9, 0.5]


# --- the loop on the tiny CLIP through the command ---------------------------------------------


def test_fine_tuning_learns_the_digits(tiny: Tiny, tmp_path: Path) -> None:
    # the random-init tiny model is at chance zero-shot; 30 AdamW steps at lr 1e-3 must beat it
    d = tiny.digits
    values = overrides(
        tiny,
        tmp_path / "run",
        "ft",
        steps=30,
        batch_size=16,
        lr=1e-3,
        warmup=0.0,
        eval={"seen": str(d.train)},  # "train" and "val" name the run's own splits
    )
    out = run(values)
    results = read_json(out / "results.json")["results"]
    zero, last = results["zero-shot"], results["last"]
    assert zero["seen"]["accuracy"] <= 0.3 and zero["val"]["accuracy"] <= 0.3
    assert last["seen"]["accuracy"] >= zero["seen"]["accuracy"] + 0.15
    assert last["val"]["accuracy"] > zero["val"]["accuracy"]
    assert last["seen"]["nll"] < zero["seen"]["nll"]
    losses = [line["loss"] for line in metrics_lines(out)]
    assert sum(losses[-10:]) < sum(losses[:10])


def _weights(out: Path, name: str = "last") -> dict[str, Tensor]:
    return load_file(str(out / f"{name}.safetensors"))


def test_gradient_accumulation_2x4_equals_batch_8(tiny: Tiny, tmp_path: Path) -> None:
    # SGD: Adam would turn the rounding noise of exactly-zero gradients (attention key biases)
    # into full-size steps of either sign, so its runs differ by O(lr) in those tensors
    common = {"steps": 4, "lr": 0.5, "warmup": 0.0, "optimizer": "sgd", "weight_decay": 0.0}
    whole = _weights(run(overrides(tiny, tmp_path / "whole", "ft", batch_size=8, **common)))
    split = _weights(
        run(overrides(tiny, tmp_path / "split", "ft", batch_size=8, accumulation=2, **common))
    )
    start = _weights(
        run(overrides(tiny, tmp_path / "start", "ft", batch_size=8, **{**common, "lr": 1e-12}))
    )
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-5, atol=1e-6)
    assert max(float((whole[k] - start[k]).abs().max()) for k in whole) > 1e-3


def test_dataloader_workers_do_not_change_the_run(tiny: Tiny, tmp_path: Path) -> None:
    common = {"steps": 3, "lr": 1e-3}
    serial = run(overrides(tiny, tmp_path / "serial", "clipood", **common))
    parallel = run(overrides(tiny, tmp_path / "parallel", "clipood", workers=2, **common))
    for name in ("last", "average"):
        a, b = _weights(serial, name), _weights(parallel, name)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    assert [x["loss"] for x in metrics_lines(serial)] == [
        x["loss"] for x in metrics_lines(parallel)
    ]


@pytest.mark.parametrize("average", ["ema", "bma", "uniform"])
def test_trajectory_averages_are_saved_and_differ_from_the_last_iterate(
    tiny: Tiny, tmp_path: Path, average: str
) -> None:
    out = run(
        overrides(tiny, tmp_path / average, "ft", steps=3, lr=1e-3, average=average, ema_decay=0.5)
    )
    last, averaged = _weights(out), _weights(out, "average")
    assert last.keys() == averaged.keys()
    assert max(float((last[k] - averaged[k]).abs().max()) for k in last) > 1e-4
    assert set(read_json(out / "results.json")["results"]) == {"zero-shot", "last", "average"}


def test_a_log_line_is_the_mean_loss_of_its_steps(tmp_path: Path) -> None:
    """Lines every 4 steps (and the last, after 2) average exactly the steps since the line
    before, also right after a resume from a checkpoint that is not on a line."""
    per_step = [h["loss"] for h in train(_toy(), _toy_data(), _toy_config(steps=10), CPU).history]
    lines = train(_toy(), _toy_data(), _toy_config(steps=10, log_every=4), CPU).history
    assert [h["step"] for h in lines] == [4, 8, 10]
    assert [h["loss"] for h in lines] == pytest.approx(
        [sum(per_step[0:4]) / 4, sum(per_step[4:8]) / 4, sum(per_step[8:10]) / 2], rel=1e-6
    )
    # stopped after the step-6 checkpoint, resumed: the step-8 line averages steps 7 and 8
    config = _toy_config(steps=10, log_every=4, save_every=6, eval_every=7)

    def stop(tree: Any) -> float:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_toy(), _toy_data(), config, CPU, run_dir=tmp_path, validate=stop)
    resumed = train(
        _toy(), _toy_data(), config, CPU, run_dir=tmp_path, resume=True, validate=lambda t: 0.0
    )
    losses = {h["step"]: h["loss"] for h in resumed.history if "loss" in h}
    assert losses[8] == pytest.approx(sum(per_step[6:8]) / 2, rel=1e-6)
    assert losses[10] == pytest.approx(sum(per_step[8:10]) / 2, rel=1e-6)
