"""``--peft`` in the recipes: LoRA / adapter factors trained by the real loop, end to end.

- Data parallelism: two gloo ranks (DDP and FSDP2) equal one process for ``ft --peft lora``
  (q/k/v blocks), ``clip-lora`` (dropout 0), ``r-adapter`` (adapter dropping 0.2: its gates come
  from a ``(seed, step)``-seeded generator, the same on every rank), ``ueo --peft lora`` and
  ``flyp --peft lora`` (its frozen scale lets it run under FSDP2); a mutation that drops the
  gradient synchronisation makes the comparison fail.
- Resume: a run interrupted after a checkpoint and resumed equals the uninterrupted one (in one
  process, under DDP and under FSDP2's sharded checkpoint), the factors' EMA included; and a real
  ``python -m robustft finetune --method clip-lora`` process (branch dropout 0.25) SIGKILLed
  mid-run then ``--resume``\\ d ends with the files of an uninterrupted run.
- Run folder outputs: the classifier has no factor keys, the factor file loads with
  :func:`robustft.peft.load` and records the configuration, the folded whole model equals the
  pre-trained weights plus the (rescaled) update, written by hand here, and open_clip loads it.
- R-Adapter trains the adapters only; ``--peft-rescale 0`` exports the zero-shot model.
- Configuration errors of ``--peft`` and its settings, and L2-SP measured on the update.

The expensive runs happen once, in module-scoped fixtures; the tests read their results.
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _dist import run_distributed
from safetensors.torch import load_file
from test_recipes_cli import Tiny, argv, make_tiny, overrides, read_json, run
from test_recipes_distributed import _close, _run, _setup
from test_recipes_resume import (
    HANG_AT,
    STEPS,
    _steps_logged,
    _values,
    assert_same_run,
    hang_env,
)

from robustft import peft
from robustft.recipes import build, load_model, resolve
from robustft.recipes._cli import main

# --- the configurations ------------------------------------------------------------------------

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # LoRA on the image tower's fused in-projections, one pair of factors per q/k/v block
    "ft-lora": ("ft", {"peft": "lora", "peft_qkv": "q,k,v", "peft_rank": 2}),
    # CLIP-LoRA on both towers; branch dropout off (its masks are per element: a rank's batch
    # half cannot draw one process's masks)
    "clip-lora": ("clip-lora", {"peft_dropout": 0.0}),
    # R-Adapter: full-rank adapters on both towers, adapter dropping 0.2, EMA of the adapters
    "r-adapter": ("r-adapter", {"ema_decay": 0.5}),
    # UEO with LoRA on the image tower (its prompt context trains as usual)
    "ueo-lora": ("ueo", {"peft": "lora", "peft_rank": 4}),
    # FLYP with LoRA: its logit scale is frozen, so build() lets it run under FSDP2
    "flyp-lora": ("flyp", {"peft": "lora"}),
}
DROPOUT = ("clip-lora", {"peft_dropout": 0.25})  # CLIP-LoRA's own setting: the explicit attention


def _guarded(fn: Callable[[], Any]) -> Any:
    """``fn()``, or its traceback: one failing run must not hide the others' results."""
    try:
        return fn()
    except Exception:  # reported by the test that reads this result
        return {"error": traceback.format_exc()}


def _ok(result: Any) -> Any:
    if isinstance(result, dict) and "error" in result:
        pytest.fail(result["error"])
    return result


def _resumed(rank: int, world: int, method: str, strategy: str, folder: str, **over: Any) -> Any:
    """Interrupted after the step-2 checkpoint (at the step-3 validation), then resumed."""
    killed = _run(rank, world, method, strategy, run_dir=folder, interrupt_at=3, overrides=over)
    assert killed == {}
    return _run(rank, world, method, strategy, run_dir=folder, resume=True, overrides=over)


def _ranks_body(rank: int, world: int, folder: str) -> dict[str, Any]:
    """Every multi-rank run in one spawn of the ranks (process start-up is the slow part)."""
    out: dict[str, Any] = {}
    for strategy in ("ddp", "fsdp"):
        for case, (method, over) in CASES.items():
            out[f"{strategy}/{case}"] = _guarded(
                lambda m=method, s=strategy, o=over: _run(rank, world, m, s, overrides=o)
            )
    method, over = CASES["ft-lora"]
    out["mutated/ft-lora"] = _guarded(
        lambda: _run(rank, world, method, "ddp", mutate=True, overrides=over)
    )
    for strategy, case in (("fsdp", "clip-lora"), ("ddp", "r-adapter"), ("fsdp", "r-adapter")):
        method, over = CASES[case]
        path = f"{folder}/{strategy}-{case}"
        out[f"resumed/{strategy}/{case}"] = _guarded(
            lambda m=method, s=strategy, p=path, o=over: _resumed(rank, world, m, s, p, **o)
        )
    return out


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    """One process, the same global batches."""
    return {
        case: _run(0, 1, method, "single", overrides=over) for case, (method, over) in CASES.items()
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("peft-ranks")
    for name in ("fsdp-clip-lora", "ddp-r-adapter", "fsdp-r-adapter"):
        (folder / name).mkdir()
    return run_distributed(_ranks_body, world_size=2, args=(str(folder),), timeout=400)


def _factor_keys(result: dict[str, Any]) -> list[str]:
    return [k for k in result["last"] if peft.is_factor(k)]


# --- 1. two ranks equal one process ------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process(
    single: dict[str, Any], ranks: list[dict[str, Any]], strategy: str, case: str
) -> None:
    want = single[case]
    for got in ranks:
        _close(_ok(got[f"{strategy}/{case}"]), want)
    # the factors travel in the exported tree, and they trained away from their start (B = 0)
    keys = _factor_keys(want)
    assert keys
    moved = [k for k in keys if "_lora_B" in k or k.endswith("_adapter")]
    assert moved and all(float(abs(want["last"][k]).max()) > 1e-4 for k in moved)
    if case == "r-adapter":  # the EMA of the adapters is exported too, and is not the last iterate
        assert set(_factor_keys({"last": want["average"]})) == set(keys)
        assert any(float(abs(want["average"][k] - want["last"][k]).max()) > 1e-4 for k in moved)


def test_dropping_gradient_sync_is_detected(
    single: dict[str, Any], ranks: list[dict[str, Any]]
) -> None:
    """Unwrapped ranks train their own halves: the equality above is evidence of the sync."""
    for got in ranks:
        with pytest.raises(AssertionError):
            _close(_ok(got["mutated/ft-lora"]), single["ft-lora"])


def test_branch_dropout_is_deterministic_and_active() -> None:
    """CLIP-LoRA's branch dropout (the explicit attention path): two identical runs agree
    exactly, and the dropout changes the result."""
    method, over = DROPOUT
    first = _run(0, 1, method, "single", overrides=over)
    again = _run(0, 1, method, "single", overrides=over)
    for k in first["last"]:
        torch.testing.assert_close(
            torch.from_numpy(first["last"][k]), torch.from_numpy(again["last"][k]), rtol=0, atol=0
        )
    plain = _run(0, 1, method, "single", overrides=CASES["clip-lora"][1])
    diff = max(abs(first["last"][k] - plain["last"][k]).max() for k in first["last"])
    assert diff > 1e-4


def test_step_rng_depends_on_seed_step_and_sample_only() -> None:
    """The draws inside ``step_rng`` are a function of ``(seed, step, sample)``, whatever the
    caller's generator did before, and the caller's generator is left as it was."""
    from robustft.recipes._peft import step_rng

    cpu = torch.device("cpu")
    draws = {}
    for before in (0, 1):
        torch.manual_seed(before)  # another caller state
        state = torch.get_rng_state()
        with step_rng(7, 3, cpu):
            draws[before] = torch.rand(5)
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(draws[0], draws[1])
    with step_rng(7, 4, cpu):
        other_step = torch.rand(5)
    with step_rng(8, 3, cpu):
        other_seed = torch.rand(5)
    with step_rng(7, 3, cpu, 12):  # another micro-batch (its first sample's position) of the step
        other_batch = torch.rand(5)
    with step_rng(7, 3, cpu, 12):
        same_batch = torch.rand(5)
    assert not torch.equal(other_step, draws[0]) and not torch.equal(other_seed, draws[0])
    assert not torch.equal(other_batch, draws[0]) and torch.equal(other_batch, same_batch)


def test_dropout_masks_differ_between_micro_batches_and_gates_do_not() -> None:
    """With --accumulation, LoRA's dropout is seeded per micro-batch (its first sample) and
    R-Adapter's gates per step: ``seeded_loss`` passes the sample only for a dropout spec."""
    from robustft.recipes import _peft, resolve

    seen: list[tuple[int, ...]] = []

    def loss(net: Any, batch: Any, step: int) -> torch.Tensor:
        seen.append(tuple(torch.randint(0, 2**30, (3,)).tolist()))
        return torch.zeros(())

    batches = [(torch.zeros(2, 1), torch.zeros(2), torch.tensor([4, 9])),
               (torch.zeros(2, 1), torch.zeros(2), torch.tensor([1, 7]))]  # fmt: skip
    for config, distinct in (
        (resolve({"method": "clip-lora"}), True),  # dropout 0.25
        (resolve({"method": "r-adapter"}), False),  # adapter dropping 0.2
    ):
        seen.clear()
        wrapped = _peft.seeded_loss(loss, config)
        for batch in batches:
            wrapped(None, batch, 5)
        assert (seen[0] != seen[1]) is distinct


def test_adapter_dropping_draws_gates() -> None:
    """R-Adapter's dropping is active: p = 0 trains otherwise (so the ranks' equality above
    covers the gates)."""
    method, over = CASES["r-adapter"]
    kept = _run(0, 1, method, "single", overrides={**over, "peft_drop": 0.0})
    dropped = _run(0, 1, method, "single", overrides=over)
    diff = max(abs(kept["last"][k] - dropped["last"][k]).max() for k in kept["last"])
    assert diff > 1e-4


# --- 2. resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [DROPOUT, CASES["r-adapter"]], ids=["clip-lora", "r-adapter"])
def test_interrupted_and_resumed_equals_uninterrupted(
    tmp_path: Path, case: tuple[str, dict[str, Any]]
) -> None:
    """One process: the resumed run redraws the branch-dropout masks / adapter gates of the
    uninterrupted one (``(seed, step)``-seeded), and restores the factors' EMA."""
    method, over = case
    reference = _run(0, 1, method, "single", overrides=over)
    killed = _run(0, 1, method, "single", run_dir=str(tmp_path), interrupt_at=3, overrides=over)
    assert killed == {}
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert int(saved["loop"]["step"]) == 2
    # the checkpoint holds the factors (and their EMA) only
    assert saved["module"] and all(peft.is_factor(k) for k in saved["module"])
    if method == "r-adapter":
        assert saved["average"].keys() == saved["module"].keys()
    got = _run(0, 1, method, "single", run_dir=str(tmp_path), resume=True, overrides=over)
    assert got.keys() == ({"last", "average"} if method == "r-adapter" else {"last"})
    _close(got, reference)
    # the comparison can fail: the factors moved well past its tolerance after the checkpoint
    final = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert int(final["loop"]["step"]) == 4
    assert (
        max(float((final["module"][k] - v).abs().max()) for k, v in saved["module"].items()) > 1e-3
    )


def test_resumed_dropout_needs_the_step_seeded_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mutation: without ``step_rng`` the masks come from the global generator, and the
    resumed run draws other masks than the uninterrupted one (the equality above is evidence)."""
    from robustft.recipes import _peft

    monkeypatch.setattr(_peft, "step_rng", lambda *args: contextlib.nullcontext())
    method, over = DROPOUT
    reference = _run(0, 1, method, "single", overrides=over)
    got = _resumed(0, 1, method, "single", str(tmp_path), **over)
    with pytest.raises(AssertionError):
        _close(got, reference)


@pytest.mark.parametrize(
    ("strategy", "case"), [("fsdp", "clip-lora"), ("ddp", "r-adapter"), ("fsdp", "r-adapter")]
)
def test_distributed_resume_equals_one_uninterrupted_process(
    single: dict[str, Any], ranks: list[dict[str, Any]], strategy: str, case: str
) -> None:
    for got in ranks:
        _close(_ok(got[f"resumed/{strategy}/{case}"]), single[case])


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return make_tiny(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def killed(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real ``python -m robustft finetune --method clip-lora`` (dropout 0.25), SIGKILLed once it
    has checkpointed step 4 and logged step 5 (test_recipes_resume's hook); its run folder."""
    base = tmp_path_factory.mktemp("peft-killed")
    env = hang_env(base)
    out = base / "clip-lora"
    cmd = [sys.executable, "-m", "robustft", *argv(_values(tiny, out, "clip-lora", lr=1e-3))]
    proc = subprocess.Popen(
        cmd, cwd=base, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"exited with {proc.returncode}: {proc.communicate()[1]}")
            if (out / "checkpoint.pt").exists() and max(_steps_logged(out), default=0) >= HANG_AT:
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(timeout=60) == -signal.SIGKILL
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for step {HANG_AT}")
            time.sleep(0.05)
        yield out
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        if proc.stderr is not None:
            proc.stderr.close()


def test_clip_lora_resume_after_sigkill_equals_an_uninterrupted_run(
    tiny: Tiny, killed: Path, tmp_path: Path
) -> None:
    out = killed
    assert _steps_logged(out) == list(range(1, HANG_AT + 1))
    assert not (out / "last.safetensors").exists() and not (out / "last.peft.safetensors").exists()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert int(saved["loop"]["step"]) == HANG_AT - 1
    assert read_json(out / "config.json")["peft_dropout"] == 0.25  # the branch dropout draws

    assert main(["finetune", "--resume", str(out)]) == 0
    reference = run(_values(tiny, tmp_path / "uninterrupted", "clip-lora", lr=1e-3))
    assert_same_run(out, reference)
    assert _steps_logged(out) == list(range(1, STEPS + 1))
    for name in ("last.peft.safetensors", "last-model.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(reference / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k, n=name: f"{n} {k}: {m}")
    # the comparison can fail: the factors moved well past the tolerance after the checkpoint
    final = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (
        max(float((final["module"][k] - saved["module"][k]).abs().max()) for k in saved["module"])
        > 1e-3
    )


# --- 3. and 4. run folder outputs through the command line -------------------------------------

LAYERS = (0, 1)
IN_PROJ = [
    f"{t}transformer.resblocks.{i}.attn.in_proj_weight" for t in ("visual.", "") for i in LAYERS
]
ADAPTED = [
    f"{t}transformer.resblocks.{i}.{w}"
    for t in ("visual.", "")
    for i in LAYERS
    for w in ("attn.out_proj.weight", "mlp.c_proj.weight")
]
# the run, its extra flags, and the spec the factor file must record (hand values: the tiny
# model has 2 blocks per tower)
RUNS: dict[str, dict[str, Any]] = {
    "clip-lora": {
        "flags": {"lr": 1e-2, "peft_rescale": 0.75},
        "spec": dict(kind="lora", rank=2, alpha=1.0, scaling="sqrt_rank", qkv=("q", "k", "v"),
                     dropout=0.25, drop=0.0, targets=tuple(IN_PROJ)),
    },
    "ft": {
        "flags": {"lr": 1e-2, "peft": "lora", "peft_rank": 3, "peft_alpha": 6.0, "peft_qkv": "q,v",
                  "peft_rescale": 0.5},
        "spec": dict(kind="lora", rank=3, alpha=6.0, scaling="rank", qkv=("q", "v"), dropout=0.0,
                     drop=0.0, targets=tuple(IN_PROJ[:2])),
    },
    "r-adapter": {
        "flags": {"lr": 1e-2, "ema_decay": 0.5},
        "spec": dict(kind="adapter", rank=None, alpha=1.0, scaling="rank", qkv=None, dropout=0.0,
                     drop=0.2, targets=tuple(ADAPTED)),
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("peft-runs")
    done = {m: run(overrides(tiny, base / m, m, **r["flags"])) for m, r in RUNS.items()}
    done["r-adapter-0"] = run(
        overrides(tiny, base / "r-adapter-0", "r-adapter", lr=1e-2, peft_rescale=0.0)
    )
    return done


def _pretrained(tiny: Tiny) -> dict[str, torch.Tensor]:
    return load_file(str(tiny.weights))


def _folded_by_hand(
    method: str, base: dict[str, torch.Tensor], factors: dict[str, torch.Tensor], weight: float
) -> dict[str, torch.Tensor]:
    """W + weight·ΔW written out: LoRA ``s·cat(B_q A_q, 0, B_v A_v)`` per block, adapters
    ``W_adp W`` and ``W_adp b``."""
    spec = RUNS[method]["spec"]
    out = dict(base)
    for w in spec["targets"]:
        if spec["kind"] == "adapter":
            m = factors[f"{w}_adapter"].double()
            out[w] = (base[w].double() + weight * m @ base[w].double()).float()
            b = w[: -len("weight")] + "bias"
            out[b] = (base[b].double() + weight * m @ base[b].double()).float()
            continue
        s = spec["alpha"] / (
            math.sqrt(spec["rank"]) if spec["scaling"] == "sqrt_rank" else spec["rank"]
        )
        d = base[w].shape[1]
        blocks = []
        for blk in "qkv":
            if blk in spec["qkv"]:
                bb, aa = (
                    factors[f"{w}_lora_B_{blk}"].double(),
                    factors[f"{w}_lora_A_{blk}"].double(),
                )
                blocks.append(s * bb @ aa)
            else:
                blocks.append(torch.zeros(d, d, dtype=torch.float64))
        out[w] = (base[w].double() + weight * torch.cat(blocks)).float()
    return out


@pytest.mark.parametrize("method", list(RUNS))
def test_run_folder_outputs(tiny: Tiny, runs: dict[str, Path], method: str) -> None:
    import open_clip

    out, want = runs[method], RUNS[method]
    weight = want["flags"].get("peft_rescale", 0.5 if method == "r-adapter" else 1.0)
    names = ["last"] + (["average"] if method == "r-adapter" else [])
    for name in names:
        # the classifier: visual tower and head, no factor keys
        classifier = load_file(str(out / f"{name}.safetensors"))
        assert classifier and not any(peft.is_factor(k) for k in classifier)
        assert set(classifier) == {"head"} | {
            k for k in _pretrained(tiny) if k.startswith("visual.")
        }

        # the factor file: the configuration's spec, targets = the weight names
        spec, factors = peft.load(out / f"{name}.peft.safetensors")
        assert spec == peft.Spec(**want["spec"])
        assert factors and all(peft.is_factor(k) for k in factors)
        weights = {re.sub(r"_(lora_[AB](_[qkv])?|adapter)$", "", k) for k in factors}
        assert weights == set(want["spec"]["targets"])

        # the folded model: the pre-trained weights plus the rescaled update, written by hand
        base = _pretrained(tiny)
        model = load_file(str(out / f"{name}-model.safetensors"))
        assert model.keys() == base.keys()
        hand = _folded_by_hand(method, base, factors, weight)
        for k in model:
            torch.testing.assert_close(
                model[k], hand[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
            )
        moved = max(float((model[k] - base[k]).abs().max()) for k in want["spec"]["targets"])
        assert moved > 1e-5  # the update is not empty: the equality above checks the factors
        # the classifier's image tower is the folded model's (the head is separate)
        for k, v in classifier.items():
            if k != "head":
                torch.testing.assert_close(v, model[k], rtol=0, atol=0)

    # open_clip loads the folded weights, and they compute what the attached factors do
    spec, factors = peft.load(out / "last.peft.safetensors")
    open_clip.add_model_config(out / "last-model.json")
    loaded = open_clip.create_model("last-model", pretrained=str(out / "last-model.safetensors"))
    loaded.eval()
    bundle = load_model(out / "last-model.json", pretrained=out / "last-model.safetensors")
    reference = load_model(tiny.config, pretrained=tiny.weights).model.eval()
    peft.attach_(reference, spec, peft.rescale(spec, factors, weight))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want_features = reference.encode_image(images)
        torch.testing.assert_close(loaded.encode_image(images), want_features, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            bundle.model.encode_image(images), want_features, rtol=1e-4, atol=1e-5
        )
        plain = load_model(tiny.config, pretrained=tiny.weights).model.eval().encode_image(images)
    assert float((plain - want_features).abs().max()) > 1e-5


def test_r_adapter_trains_the_adapters_only(tiny: Tiny, runs: dict[str, Path]) -> None:
    out = runs["r-adapter"]
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    trained = saved["module"]
    assert trained and all(peft.is_factor(k) for k in trained)  # no logit_scale, no head
    _, factors = peft.load(out / "last.peft.safetensors")
    assert {k.removeprefix("model.") for k in trained} == set(factors)
    for k, v in trained.items():  # the checkpoint's iterate is the last one, unscaled
        torch.testing.assert_close(v, factors[k.removeprefix("model.")], rtol=0, atol=0)
    # the EMA holds the factors' size, not the model's
    average = saved["average"]
    assert sum(v.numel() for v in average.values()) == peft.size(factors)
    # full-rank [rows, rows] adapters on 2 blocks x (out_proj, c_proj): widths 64 and 32
    assert peft.size(factors) == 2 * 2 * 64 * 64 + 2 * 2 * 32 * 32
    _, averaged = peft.load(out / "average.peft.safetensors")
    for k, v in average.items():
        torch.testing.assert_close(v, averaged[k.removeprefix("model.")], rtol=0, atol=0)


def test_r_adapter_rescale_zero_exports_the_zero_shot_model(
    tiny: Tiny, runs: dict[str, Path]
) -> None:
    out = runs["r-adapter-0"]
    base = _pretrained(tiny)
    _, factors = peft.load(out / "last.peft.safetensors")
    assert max(float(v.abs().max()) for v in factors.values()) > 1e-4  # trained, but scaled by 0
    for name in ("last", "average"):
        tree = load_file(str(out / f"{name}.safetensors"))
        for k, v in tree.items():
            if k != "head":
                torch.testing.assert_close(v, base[k], rtol=0, atol=0)
        model = load_file(str(out / f"{name}-model.safetensors"))
        for k, v in model.items():
            torch.testing.assert_close(v, base[k], rtol=0, atol=0)
    results = read_json(out / "results.json")["results"]
    assert results["last"]["val"] == results["zero-shot"]["val"]


# --- 5. configuration errors and L2-SP on the update ---------------------------------------------


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')} \\({name} in a config file\\)"


@pytest.mark.parametrize(
    ("method", "values", "message"),
    [
        ("ft", {"peft_rank": 4}, rf"{_flag('peft_rank')} set\(s\) factors that are not trained: "
         rf"{_flag('peft')} is none; add --peft lora or --peft adapter"),
        ("ft", {"peft_rescale": 0.5, "peft_targets": "*c_fc.weight"},
         rf"{_flag('peft_targets')}, {_flag('peft_rescale')} set\(s\) factors that are not "
         "trained"),
        ("r-adapter", {"peft": "lora"}, rf"{_flag('peft')} must be adapter for method r-adapter "
         r"\(its paper's update\), got lora"),
        ("r-adapter", {"peft": "none"}, r"must be adapter for method r-adapter .*got none"),
        ("clip-lora", {"peft": "adapter"}, rf"{_flag('peft')} must be lora for method clip-lora "
         r"\(its paper's update\), got adapter"),
        ("ft", {"peft": "adapter", "peft_alpha": 2.0},
         rf"{_flag('peft_alpha')} apply to --peft lora only, got --peft adapter"),
        ("ft", {"peft": "adapter", "peft_scaling": "sqrt_rank"},
         rf"{_flag('peft_scaling')} apply to --peft lora only"),
        ("ft", {"peft": "adapter", "peft_qkv": "q"}, rf"{_flag('peft_qkv')} apply to --peft lora"),
        ("r-adapter", {"peft_dropout": 0.1, "peft_qkv": "v"},
         rf"{_flag('peft_qkv')}, {_flag('peft_dropout')} apply to --peft lora only"),
        ("ft", {"peft": "lora", "peft_drop": 0.2}, rf"{_flag('peft_drop')} \(adapter dropping\) "
         r"applies to --peft adapter only, got --peft lora and 0.2; LoRA's is --peft-dropout"),
        ("clip-lora", {"peft_drop": 0.1},
         r"applies to --peft adapter only, got --peft lora and 0.1"),
        ("ft", {"peft": "lora", "peft_rank": 0}, rf"{_flag('peft_rank')} must be >= 1 for --peft "
         r"lora \(0 means full rank, for adapters\), got 0"),
        ("ft", {"peft": "lora", "peft_targets": "*in_proj_weight,,*c_fc.weight"},
         rf"{_flag('peft_targets')} must be comma-separated weight-name globs.*\(no empty entry\)"),
        ("ft", {"peft": "lora", "peft_targets": " "}, r"\(no empty entry\), got ' '"),
        ("ft", {"peft": "lora", "peft_qkv": "q,x"},
         rf"{_flag('peft_qkv')} must be comma-separated distinct blocks among q, k, v"),
        ("ft", {"peft": "lora", "peft_qkv": "q,q"}, r"distinct blocks among q, k, v.*got 'q,q'"),
        ("ft", {"peft": "lora", "peft_qkv": ""}, r"distinct blocks among q, k, v.*got ''"),
        ("ft", {"peft": "lora", "peft_dropout": 1.0}, rf"{_flag('peft_dropout')} must be"),
        ("ft", {"peft": "lora", "peft_rescale": -0.5}, rf"{_flag('peft_rescale')} must be"),
        ("ft", {"peft": "loha"}, rf"{_flag('peft')} must be"),
    ],
)  # fmt: skip
def test_peft_configuration_errors(method: str, values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        resolve(values, method=method)
    assert str(info.value).startswith("resolve: --")


@pytest.mark.parametrize(
    ("field", "value"), [("peft_targets", ["*in_proj_weight"]), ("peft_qkv", ("q", "v"))]
)
def test_peft_text_settings_refuse_other_types(field: str, value: Any) -> None:
    with pytest.raises(TypeError, match=rf"^resolve: {_flag(field)} must be comma-separated"):
        resolve({"peft": "lora", field: value}, method="ft")


def test_peft_settings_resolve() -> None:
    """Defaults per kind, spaces and block order normalised, a method's own defaults kept."""
    config = resolve({"peft": "lora", "peft_qkv": "v, q", "peft_targets": " *a , *b"}, method="ft")
    assert (config.peft_qkv, config.peft_targets) == ("q,v", "*a,*b")
    lora = resolve({}, method="clip-lora")
    assert (lora.peft, lora.peft_rank, lora.peft_alpha, lora.peft_scaling) == (
        "lora",
        2,
        1.0,
        "sqrt_rank",
    )
    adapter = resolve({"peft_rank": 0}, method="r-adapter")
    assert (adapter.peft, adapter.peft_rank, adapter.peft_drop, adapter.peft_rescale) == (
        "adapter",
        0,
        0.2,
        0.5,
    )


@pytest.mark.parametrize(
    ("method", "targets", "tower", "why"),
    [
        # the text tower's in-projections: ft trains the image tower only
        ("ft", "transformer.resblocks.*.attn.in_proj_weight", r"visual\.\*",
         "must select at least one weight"),
        ("ueo", "transformer.resblocks.*.attn.in_proj_weight", r"visual\.\*",
         "must select at least one weight"),
        # 1-d norm weights
        ("ft", "*ln_1.weight", r"visual\.\*", "must select 2-d weights only"),
        ("clip-lora", "*ln_2.weight", "both", "must select 2-d weights only"),
    ],
)  # fmt: skip
def test_peft_targets_that_select_no_2d_weight_fail_at_build(
    method: str, targets: str, tower: str, why: str
) -> None:
    over = (
        {"peft_targets": targets}
        if method == "clip-lora"
        else {"peft": "lora", "peft_targets": targets}
    )
    _, ctx, _ = _setup(method, **over)
    with pytest.raises(
        ValueError,
        match=rf"^--peft-targets '{targets.replace('*', '[*]')}' must select 2-d weights of the "
        rf"towers {method} trains \({tower}\): init: .*{why}",
    ):
        build(ctx)


def test_l2sp_with_lora_measures_the_update() -> None:
    """L2-SP's penalty is ½·Σ‖ΔW‖² (robustft.losses.l2sp: half the squared distance): 0 at
    the start (B = 0), the hand value for random factors, its gradient reaching the factors
    only."""
    config, ctx, dataset = _setup("l2sp", peft="lora", peft_qkv="q,v", peft_rank=2, reg_weight=0.3)
    assert config.reg_weight == 0.3 and config.peft_alpha is None  # s = α/r = 1
    method = build(ctx)
    net = method.module
    images, labels = dataset.tensors[0][:8], dataset.tensors[1][:8]
    batch = (images, labels, torch.arange(8))

    def ce() -> torch.Tensor:
        return F.cross_entropy(net(images)[1].float(), labels)

    with torch.no_grad():
        torch.testing.assert_close(method.loss(net, batch, 0), ce(), rtol=0, atol=0)
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    factors = {n: p for n, p in net.named_parameters() if peft.is_factor(n)}
    assert factors and trained == {"head", *factors}  # the tower's own weights are frozen
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in factors.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    by_hand = 0.0
    for i in LAYERS:
        w = f"visual.transformer.resblocks.{i}.attn.in_proj_weight"
        for blk in "qv":
            b = factors[f"{w}_lora_B_{blk}"].detach()
            a = factors[f"{w}_lora_A_{blk}"].detach()
            by_hand += 0.5 * float(((b.double() @ a.double()) ** 2).sum())
    assert by_hand > 1e-3
    loss = method.loss(net, batch, 0)
    torch.testing.assert_close(loss - ce(), torch.tensor(0.3 * by_hand), rtol=1e-4, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in factors.values())
    assert all(p.grad is None for n, p in net.named_parameters() if n not in trained)


def test_ueo_with_peft_keeps_its_trained_set_and_adds_the_factors() -> None:
    """UEO --peft trains its context and the image tower's norm affines, plus the factors; the
    tower's other weights and the whole text tower stay frozen."""
    from robustft import clip
    from robustft.recipes._methods import trained_tree

    _, ctx, _ = _setup("ueo", peft="lora", peft_rank=2)
    method = build(ctx)
    trained = set(trained_tree(method.module))
    affines = {f"model.{n}" for n in clip.norm_affine_names(ctx.model, under="visual")}
    factors = {n for n in trained if peft.is_factor(n)}
    assert factors and all(n.startswith("model.visual.") for n in factors)
    assert trained == {"context"} | affines | factors


def test_best_weights_are_saved_mid_run_as_at_the_end(tiny: Tiny, tmp_path: Path) -> None:
    """--select best with --peft: best.safetensors is a classifier (no factor key) while the run
    trains too, the factors sit in best.peft.safetensors, and resume reads both back."""
    from robustft.recipes import _peft

    out = tmp_path / "best"
    run(overrides(tiny, out, "ft", peft="lora", peft_rank=2, select="best", eval_every=1))
    classifier = load_file(str(out / "best.safetensors"))
    assert classifier and not any(peft.is_factor(k) for k in classifier)
    spec, factors = peft.load(out / "best.peft.safetensors")
    assert spec.kind == "lora" and spec.rank == 2 and factors
    config = resolve({"method": "ft", "peft": "lora", "peft_rank": 2})
    tree = _peft.load_best(out, config)
    assert set(tree) == set(classifier) | set(factors)
    # the mid-run writer gives the same two files
    again = tmp_path / "again"
    again.mkdir()
    _peft.save_best(again, tree, config)
    assert set(load_file(str(again / "best.safetensors"))) == set(classifier)
    assert peft.load(again / "best.peft.safetensors")[0] == spec
