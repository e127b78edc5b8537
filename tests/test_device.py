"""Device variants of the tests whose path or result depends on the device (issue 22).

Marked ``device`` and skipped without CUDA; ``make device-check`` runs them on a GPU machine
(docs/development.md, "Device check"). Each test runs a path that only a CUDA device takes, or
checks a result that the device can change, against the pure path and the CPU:

- the ``torch._foreach_*`` fast paths (tree arithmetic, the averages' ``update_``, L2-SP, SPD) on
  CUDA tensors, and the in-place updates' memory, read exactly from the allocator's statistics;
- float32 results under CUDA bf16 autocast (losses, scores, the energy-gap metric, the output
  ensemble);
- ``torch.compile`` with its default backend, inductor: the averages' ``update_``, a CLIPood
  step through the functional forward, a loss under autocast;
- the recipes' loop on the device (pinned-memory loader, bf16 autocast, loader workers) and the
  evaluator, against the same run on the CPU;
- a one-process NCCL group: :mod:`robustft.distributed`, the losses that take ``group=``,
  ``metrics.Evaluation``'s gather, and the loop under DDP and FSDP2.

``ROBUSTFT_DEVICE_TESTS=cpu`` runs them on the CPU instead (gloo for NCCL, the profiler for the
allocator), to check their logic before a GPU run; that says nothing about CUDA.
"""

# ruff: noqa: E402 -- the imports follow the module-level skip: collection without CUDA is quick
from __future__ import annotations

import os

import pytest
import torch

DRY = os.environ.get("ROBUSTFT_DEVICE_TESTS") == "cpu"
if not DRY and not torch.cuda.is_available():  # before the imports: collection stays quick
    pytest.skip("needs a CUDA device: make device-check on a GPU machine", allow_module_level=True)

import datetime
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist
import torch.nn.functional as F
from _dist import free_port
from _memory import peak_alloc_bytes
from clip_models import tiny_vit_clip
from test_averaging import FACTORIES, assert_trees_equal, counters, run
from test_losses_transforms import LOSSES, _inputs
from test_recipes_distributed import _setup
from torch import Tensor
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters as dynamo_counters

import robustft.distributed
import robustft.losses._contrastive
import robustft.losses._entropy
import robustft.losses._sigmoid
import robustft.metrics._evaluation
from robustft import averaging, clip, losses, merging, metrics, projections, scores, tree
from robustft._numerics import foreach_ok
from robustft.recipes import Evaluator, TrainResult, build, train
from robustft.recipes._nets import visual_tower
from robustft.recipes._runtime import Runtime

DEV = torch.device("cpu") if DRY else torch.device("cuda", 0)
BACKEND = "gloo" if DRY else "nccl"
CPU = torch.device("cpu")
pytestmark = pytest.mark.device


def to(tree_: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in tree_.items()}


def close(actual: Any, expected: Any, *, what: str, **tolerances: Any) -> None:
    """``torch.testing.assert_close`` whose message starts with ``what`` (and keeps its own)."""
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}", **tolerances)


def peak_increase(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated when it started.

    On CUDA the allocator's own statistics (exact); in the CPU dry run torch's profiler.
    """
    if DEV.type != "cuda":
        return peak_alloc_bytes(fn)
    torch.cuda.synchronize(DEV)
    torch.cuda.reset_peak_memory_stats(DEV)
    before = torch.cuda.memory_allocated(DEV)
    fn()
    torch.cuda.synchronize(DEV)
    return int(torch.cuda.max_memory_allocated(DEV)) - before


def _mixed(seed: int, device: torch.device) -> dict[str, Tensor]:
    """A tree of three dtype groups (float32, float64, bf16) on ``device``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(33, 17, generator=g).to(device),
        "b": torch.randn(17, generator=g).to(device),
        "d": torch.randn(5, generator=g, dtype=torch.float64).to(device),
        "h": torch.randn(9, 4, generator=g).bfloat16().to(device),
    }


@pytest.fixture(autouse=True)
def _fresh_dynamo_and_no_tf32() -> Iterator[None]:
    """A fresh dynamo cache, and float32 matmuls and convolutions without TF32 (cuDNN allows it
    by default), so that a device result compares with the CPU's at float32 tolerances."""
    torch._dynamo.reset()
    dynamo_counters.clear()
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    torch._dynamo.reset()


# ---------------------------------------------------------------- foreach fast paths


@pytest.mark.parametrize("w", [0.3, 1.0, -0.5])
def test_tree_foreach_paths_equal_the_per_tensor_loop_and_the_cpu(w: float) -> None:
    a, b = _mixed(0, DEV), _mixed(1, DEV)
    assert foreach_ok(list(a.values()) + list(b.values()))  # the fast path is the one under test
    slow_a = {k: v.clone().requires_grad_(True) for k, v in a.items()}  # per-tensor path
    ca, cb = to(a, CPU), to(b, CPU)
    cases = [
        (tree.add(a, b), tree.add(slow_a, b), tree.add(ca, cb)),
        (tree.sub(a, b), tree.sub(slow_a, b), tree.sub(ca, cb)),
        (tree.scale(a, w), tree.scale(slow_a, w), tree.scale(ca, w)),
        (tree.lerp(a, b, w), tree.lerp(slow_a, b, w), tree.lerp(ca, cb, w)),
    ]
    for fast, slow, cpu in cases:
        for k in a:
            assert fast[k].device == DEV and fast[k].dtype == a[k].dtype, k
            # elementwise and correctly rounded on both paths: bit for bit
            assert torch.equal(fast[k], slow[k].detach()), k
            close(fast[k].cpu(), cpu[k], what=k)
    norms = tree.norm(a, per_tensor=True)
    slow_norms = tree.norm(slow_a, per_tensor=True)
    for k in a:
        assert norms[k].dtype == (torch.float64 if k == "d" else torch.float32), k
        close(norms[k], slow_norms[k].detach(), what=k)
    torch.testing.assert_close(tree.norm(a).cpu(), tree.norm(ca))
    torch.testing.assert_close(tree.dot(a, b).cpu(), tree.dot(ca, cb))
    acc = {k: v.clone() for k, v in a.items()}
    pointers = {k: v.data_ptr() for k, v in acc.items()}
    tree.lerp_(acc, b, w)
    for k in acc:
        assert acc[k].data_ptr() == pointers[k]  # in place
        assert torch.equal(acc[k], a[k].clone().lerp_(b[k], w)), k


def test_tree_lerp_and_copy_across_devices_and_dtypes() -> None:
    a, b = _mixed(0, DEV), _mixed(1, CPU)
    acc = {k: v.clone() for k, v in a.items()}
    tree.lerp_(acc, b, 0.25)  # the end on the CPU: converted tensor by tensor
    for k in acc:
        assert acc[k].device == DEV
        close(acc[k], torch.lerp(a[k], b[k].to(DEV), 0.25), what=k)
    wide = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in acc.items()}
    tree.lerp_(wide, to(b, DEV), 0.5)  # a bf16 end into a float32 start
    assert wide["h"].dtype == torch.float32
    tree.copy_(acc, b)  # a CPU source into device buffers
    for k in acc:
        assert acc[k].device == DEV and torch.equal(acc[k].cpu(), b[k]), k


def test_tree_lerp_converts_a_large_bf16_end_one_chunk_at_a_time() -> None:
    n = 2**25  # two of tree.lerp_'s 2**24-element conversion chunks on an accelerator
    g = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(n, generator=g).to(DEV)}
    end = {"w": torch.randn(n, generator=g).bfloat16().to(DEV)}
    want = torch.lerp(start["w"], end["w"].float(), 0.3)
    grew = peak_increase(lambda: tree.lerp_(start, end, 0.3))
    chunk = (2**20 if DRY else 2**24) * 4  # float32 bytes of one converted chunk
    assert 0 < grew <= chunk + 2**20, grew  # never the whole converted end (128 MiB)
    assert torch.equal(start["w"], want)


def _trajectory(device: torch.device) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(3)
    big = 2**24 + 3  # above the accelerator's conversion chunk: the chunked bf16 -> fp32 path
    steps = [
        {
            "f32": torch.randn(4, 3, generator=g),
            "f64": torch.randn(5, generator=g, dtype=torch.float64),
            "bf16": torch.randn(3, 2, generator=g).bfloat16(),
            "big_bf16": torch.randn(big, generator=g).bfloat16(),
        }
        for _ in range(4)
    ]
    return [to(p, device) for p in steps]


@pytest.mark.parametrize("name", list(FACTORIES))
def test_average_update_in_place_equals_the_pure_path_and_the_cpu(name: str) -> None:
    avg = FACTORIES[name]()
    traj = _trajectory(DEV)
    pure, fast = run(avg, traj, in_place=False), run(avg, traj, in_place=True)
    assert counters(pure) == counters(fast)
    assert_trees_equal(pure.average, fast.average)
    assert all(v.device == DEV for v in fast.average.values())
    assert fast.step.device.type == "cpu"  # counters stay on the host: no device sync per step
    assert fast.average["big_bf16"].dtype == torch.float32
    on_cpu = run(avg, _trajectory(CPU), in_place=True)
    assert counters(on_cpu) == counters(fast)
    for k, v in on_cpu.average.items():
        close(fast.average[k].cpu(), v, rtol=1e-6, atol=1e-6, what=k)


def test_average_update_in_place_allocates_no_parameter_sized_temporary() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(512, 256), (256,), (256, 512), (512,), (1000, 64)]
    params = {f"t{i}": torch.randn(s, generator=g).to(DEV) for i, s in enumerate(shapes)}
    tree_bytes = sum(v.numel() * v.element_size() for v in params.values())
    for avg in (averaging.bma(10), averaging.ema(0.9), averaging.uniform()):
        cell = [avg.init(params)]
        cell[0] = avg.update_(cell[0], params)  # warm-up: the validation plan is cached

        def update(avg: averaging.Averager = avg, cell: list[Any] = cell) -> None:
            cell[0] = avg.update_(cell[0], params)

        assert peak_increase(update) <= 0.01 * tree_bytes
    avg = averaging.ema(0.9)
    state = avg.init(params)
    assert peak_increase(lambda: avg.update(state, params)) >= tree_bytes  # the check can fail


def test_averages_kept_on_another_device_than_the_parameters() -> None:
    traj = _trajectory(DEV)[:3]
    here = run(averaging.ema(0.7), traj, in_place=True)
    offloaded = run(averaging.ema(0.7, device="cpu"), traj, in_place=True)
    onto = run(averaging.ema(0.7, device=DEV), [to(p, CPU) for p in traj], in_place=True)
    for k, v in here.average.items():
        assert offloaded.average[k].device == CPU and onto.average[k].device == DEV
        close(offloaded.average[k], v.cpu(), rtol=1e-6, atol=1e-6, what=k)
        close(onto.average[k], v, rtol=1e-6, atol=1e-6, what=k)


def test_l2sp_fast_path_equals_the_per_tensor_path_with_gradients() -> None:
    anchor = _mixed(0, DEV)
    values = {k: v + 0.1 * torch.ones_like(v) for k, v in _mixed(1, DEV).items()}
    params = {k: v.clone().requires_grad_(True) for k, v in values.items()}
    fast = losses.l2sp(params, anchor=anchor)  # eager: the chunked foreach path
    fast.backward()
    grads, loop = torch.func.grad_and_value(lambda p: losses.l2sp(p, anchor=anchor))(values)
    torch.testing.assert_close(fast.detach(), loop)
    assert fast.dtype == torch.float64  # the widest leaf's dtype, at least float32
    for k in values:
        want = values[k] - anchor[k]
        close(params[k].grad, want, what=k)
        close(grads[k], want, what=k)
    cpu = losses.l2sp(to(values, CPU), anchor=to(anchor, CPU))
    torch.testing.assert_close(fast.detach().cpu(), cpu)


def test_l2sp_step_adds_at_most_a_tenth_of_a_tree_of_peak_memory() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(24)]).to(DEV)
    params = dict(model.named_parameters())
    anchor = {k: v.detach() + 0.01 for k, v in params.items()}
    tree_bytes = sum(v.numel() * v.element_size() for v in params.values())
    x = torch.randn(256, 128, device=DEV)
    y = torch.randint(0, 128, (256,), device=DEV)

    def peak(body: Callable[[], Tensor]) -> int:
        model.zero_grad(set_to_none=True)
        body().backward()  # warm-up: the BLAS workspaces of both threads exist before measuring
        model.zero_grad(set_to_none=True)
        return peak_increase(lambda: body().backward())

    ft = peak(lambda: F.cross_entropy(model(x), y))
    lean = peak(lambda: F.cross_entropy(model(x), y) + 0.1 * losses.l2sp(params, anchor=anchor))
    naive = peak(
        lambda: (
            F.cross_entropy(model(x), y)
            + 0.05 * sum((p - anchor[k]).square().sum() for k, p in params.items())
        )
    )
    assert lean <= ft + 0.1 * tree_bytes, (lean / tree_bytes, ft / tree_bytes)
    assert naive > ft + 0.1 * tree_bytes  # the measurement can fail


def test_spd_in_place_equals_pure_and_the_cpu() -> None:
    anchor = _mixed(0, DEV)
    params = {k: v + 0.2 * torch.ones_like(v) for k, v in anchor.items()}
    grads = {k: 0.5 * (params[k] - anchor[k]) for k in params}  # opposes the progress: decays
    s = projections.spd(0.7)
    state = s.prepare(s.init(params, anchor=anchor), params, grads=grads)
    stepped = {k: params[k] + 0.3 * (params[k] - anchor[k]) for k in params}
    pure, _ = s.update(state, stepped)
    in_place = {k: v.clone() for k, v in stepped.items()}
    s.update_(state, in_place)
    cs = projections.spd(0.7)
    cstate = cs.prepare(
        cs.init(to(params, CPU), anchor=to(anchor, CPU)), to(params, CPU), grads=to(grads, CPU)
    )
    cpu, _ = cs.update(cstate, to(stepped, CPU))
    for k in params:
        assert torch.equal(in_place[k], pure[k]), k
        assert pure[k].dtype == params[k].dtype and pure[k].device == DEV, k
        close(pure[k].cpu(), cpu[k], what=k)
        assert not torch.equal(pure[k], stepped[k]), k  # the decay ran


# ---------------------------------------------------------------- bf16 autocast on the device


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_are_float32_under_bf16_autocast(name: str) -> None:
    loss, key = LOSSES[name].loss, LOSSES[name].key
    cpu_inputs = _inputs()
    inp = to(cpu_inputs, DEV)
    expected = loss(inp[key], inp)
    x = inp[key].clone().requires_grad_(True)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        out = loss(x, inp)
    assert out.dtype == torch.float32 and out.device == DEV
    torch.testing.assert_close(out, expected)  # autocast is off inside: the float32 value
    torch.testing.assert_close(out.cpu(), loss(cpu_inputs[key], cpu_inputs), rtol=1e-5, atol=1e-5)
    out.backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_scores_metrics_and_ensembles_are_float32_under_bf16_autocast() -> None:
    g = torch.Generator().manual_seed(0)
    z, image, text = (torch.randn(n, d, generator=g) for n, d in ((6, 5), (6, 8), (5, 8)))
    f, f0, texts = (torch.randn(6, 8, generator=g) for _ in range(3))
    z0 = torch.randn(6, 5, generator=g)
    calls: dict[str, Callable[[torch.device], Tensor]] = {
        "msp": lambda d: scores.msp(z.to(d), temperature=0.7),
        "max_logit": lambda d: scores.max_logit(z.to(d)),
        "energy": lambda d: scores.energy(z.to(d), temperature=2.0),
        "entropy_score": lambda d: scores.entropy_score(z.to(d)),
        "mcm": lambda d: scores.mcm(image.to(d), text.to(d), temperature=0.5),
        "metrics.energy_gap": lambda d: metrics.energy_gap(
            f.to(d), reference_features=f0.to(d), text_features=texts.to(d)
        ),
        "logit_ensemble": lambda d: merging.logit_ensemble(
            z.to(d), reference_logits=z0.to(d), alpha=torch.tensor(0.3), space="probs"
        ),
    }
    for name, call in calls.items():
        outside = call(DEV)
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            inside = call(DEV)
        assert inside.dtype == torch.float32 and inside.device == DEV, name
        close(inside, outside, what=name)
        close(inside.cpu(), call(CPU), rtol=1e-5, atol=1e-5, what=name)


# ---------------------------------------------------------------- torch.compile with inductor


@pytest.mark.parametrize("name", ["bma", "ema"])
def test_compiled_average_updates_with_inductor(name: str) -> None:
    avg = averaging.bma(25, beta=0.5) if name == "bma" else averaging.ema(0.8)
    counter = CompileCounterWithBackend("inductor")  # torch.compile's default backend, counted
    compiled = torch.compile(avg.update_, fullgraph=True, backend=counter)
    g = torch.Generator().manual_seed(0)
    traj = [
        to(
            {
                "w": torch.randn(64, 32, generator=g),
                "b": torch.randn(32, generator=g, dtype=torch.float64),
                "h": torch.randn(48, generator=g).bfloat16(),  # into a float32 accumulator
            },
            DEV,
        )
        for _ in range(21)
    ]
    state, eager = avg.init(traj[0]), avg.init(traj[0])
    frames = []
    for p in traj[1:]:
        before = state.average
        state, eager = compiled(state, p), avg.update_(eager, p)
        assert state.average is before  # in place, in the same buffers
        frames.append(counter.frame_count)
    # one graph for 20 steps (dynamo may restart its first analysis once: not a recompilation)
    assert frames[0] >= 1 and set(frames) == {frames[0]}, frames
    assert dynamo_counters["stats"]["unique_graphs"] == 1
    assert not dynamo_counters["recompiles"], dict(dynamo_counters["recompiles"])
    assert int(state.step) == int(eager.step) == 20
    for k, v in eager.average.items():
        assert state.average[k].dtype == v.dtype and state.average[k].device == DEV
        close(state.average[k], v, rtol=1e-6, atol=1e-6, what=k)


def test_compiled_clipood_step_with_inductor_under_bf16_autocast() -> None:
    model = tiny_vit_clip().to(DEV).train()
    visual, _ = tree.partition(dict(model.named_parameters()), clip.visual_names(model))
    params = {k: v.detach().clone().requires_grad_() for k, v in visual.items()}
    head = F.normalize(torch.randn(3, 16), dim=-1).to(DEV)
    distances = losses.text_distances(head)
    scale = clip.logit_scale(model).detach()

    def step(params: dict[str, Tensor], images: Tensor, labels: Tensor) -> Tensor:
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            f = clip.image_features(model, params, images, normalize=False)
            return losses.margin_metric_softmax(
                f, head, labels, margin=0.3, logit_scale=scale, text_distances=distances
            )

    compiled = torch.compile(step, fullgraph=True)  # the default backend: inductor
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        images = torch.randn(4, 3, 32, 32, generator=g).to(DEV)
        labels = torch.randint(0, 3, (4,), generator=g).to(DEV)
        loss = compiled(params, images, labels)
        got = torch.autograd.grad(loss, list(params.values()))
        want = step(params, images, labels)
        expected = torch.autograd.grad(want, list(params.values()))
        assert loss.dtype == torch.float32  # the loss documents float32 under autocast
        torch.testing.assert_close(loss, want, rtol=2e-2, atol=2e-2)
        for a, b in zip(got, expected):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * float(b.abs().max()))
    assert dynamo_counters["stats"]["unique_graphs"] == 1, dict(dynamo_counters["stats"])
    assert not dynamo_counters["graph_break"], dict(dynamo_counters["graph_break"])


def test_compiled_energy_gap_with_inductor_under_bf16_autocast() -> None:
    inp = to(_inputs(), DEV)

    def fn(f: Tensor) -> Tensor:
        return losses.energy_gap(f, reference_features=inp["f0"], text_features=inp["rand_text"])

    compiled = torch.compile(fn, fullgraph=True)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        out = compiled(inp["f"])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fn(inp["f"]))


# ---------------------------------------------------------------- the recipes' loop


def _recipe(method: str, runtime: Runtime, **overrides: Any) -> TrainResult:
    """tests/test_recipes_distributed.py's run: same model, data and settings on every device."""
    config, ctx, dataset = _setup(method, **overrides)
    ctx = ctx._replace(model=ctx.model.to(runtime.device), group=runtime.group)
    return train(build(ctx), dataset, config, runtime, log=lambda _: None)


def _assert_runs_close(a: TrainResult, b: TrainResult, *, rtol: float, atol: float) -> None:
    pairs = [(a.last, b.last)] + ([(a.averaged, b.averaged)] if a.averaged is not None else [])
    for x, y in pairs:
        assert y is not None and x.keys() == y.keys()
        for k in x:
            close(x[k].cpu(), y[k].cpu(), rtol=rtol, atol=atol, what=k)
    want = [h["loss"] for h in b.history]
    assert [h["loss"] for h in a.history] == pytest.approx(want, rel=rtol, abs=atol)


def _moved(result: TrainResult, method: str) -> float:
    _, ctx, _ = _setup(method)
    built = build(ctx)
    start = built.export(built.module)
    return max(float((result.last[k].cpu() - v).abs().max()) for k, v in start.items())


@pytest.mark.parametrize("method", ["ft", "clipood", "lipsum", "ueo"])
def test_recipe_loop_on_the_device_matches_the_cpu(method: str) -> None:
    here = _recipe(method, Runtime(DEV))  # fp32: pinned loader, the device's kernels
    cpu = _recipe(method, Runtime(CPU))
    assert all(v.device == DEV for v in here.last.values())
    _assert_runs_close(here, cpu, rtol=1e-3, atol=1e-4)
    assert _moved(cpu, method) > 1e-3  # the runs trained: the comparison is not of the init


@pytest.mark.parametrize("method", ["ft", "clipood", "ueo"])
def test_recipe_loop_in_bf16_with_pinned_memory_and_workers(method: str) -> None:
    bf16 = _recipe(method, Runtime(DEV, amp_dtype=torch.bfloat16), workers=2)
    fp32 = _recipe(method, Runtime(DEV))
    losses_bf16 = [h["loss"] for h in bf16.history]
    assert all(map(torch.isfinite, map(torch.tensor, losses_bf16)))
    # bf16 autocast computes the same objective: the first step's loss within bf16 rounding
    assert losses_bf16[0] == pytest.approx(fp32.history[0]["loss"], rel=3e-2, abs=3e-2)
    for tree_ in [bf16.last] + ([bf16.averaged] if bf16.averaged is not None else []):
        for k, v in tree_.items():
            assert v.dtype == torch.float32 and v.device == DEV and torch.isfinite(v).all(), k
    assert _moved(bf16, method) > 1e-3


def test_evaluator_on_the_device_matches_the_cpu() -> None:
    _, ctx, dataset = _setup("ft")
    images, labels = dataset.tensors
    labels = labels.clone()
    labels[:4] = -1  # unknown-class samples: the open-set metrics run too
    data = torch.utils.data.TensorDataset(images, labels)
    classifier = {
        **{f"visual.{n}": p.detach() for n, p in visual_tower(ctx.model).named_parameters()},
        "head": ctx.head,
    }
    results = {}
    for name, runtime in (
        ("cpu", Runtime(CPU)),
        ("fp32", Runtime(DEV)),
        ("bf16", Runtime(DEV, amp_dtype=torch.bfloat16)),
    ):
        evaluator = Evaluator(visual_tower(ctx.model), ctx.scale, runtime, batch_size=16)
        evaluator.load(classifier)
        z, y = evaluator.logits_and_labels(data)
        assert z.dtype == torch.float32 and z.device == CPU
        results[name] = (z, y, evaluator.evaluate(data))
    z_cpu, y_cpu, m_cpu = results["cpu"]
    z32, y32, m32 = results["fp32"]
    torch.testing.assert_close(z32, z_cpu, rtol=1e-4, atol=1e-4)
    assert torch.equal(y32, y_cpu)
    assert m32["num_unknown"] == m_cpu["num_unknown"] == 4
    assert m32["accuracy"] == pytest.approx(m_cpu["accuracy"])
    assert m32["auroc"] == pytest.approx(m_cpu["auroc"], abs=1e-6)
    z16, _, m16 = results["bf16"]
    torch.testing.assert_close(z16, z_cpu, rtol=0, atol=0.05 * ctx.scale)  # bf16 rounding only
    assert m16["num_known"] == m_cpu["num_known"]


# ---------------------------------------------------------------- a one-process NCCL group


@pytest.fixture(scope="class")
def group() -> Iterator[Any]:
    """A one-process group of the device's backend (NCCL on CUDA) on a free loopback port."""
    if not DRY:
        assert dist.is_nccl_available(), "this torch build has no NCCL"
        torch.cuda.set_device(DEV)
    dist.init_process_group(
        BACKEND,
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
        device_id=None if DRY else DEV,  # NCCL binds the device now: no guessing, no warning
    )
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.fixture
def forced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count the one-rank group as distributed, so every collective runs through the backend.

    Two ranks cannot share one GPU under NCCL; a one-rank group is otherwise short-circuited
    (``is_distributed`` is False), and the collectives would never reach NCCL.
    """
    for module in (
        robustft.distributed,
        robustft.losses._entropy,
        robustft.losses._contrastive,
        robustft.losses._sigmoid,
        robustft.metrics._evaluation,
    ):
        monkeypatch.setattr(module, "is_distributed", lambda group=None: True)


@pytest.mark.usefixtures("group")
class TestOneProcessGroup:
    def test_a_one_rank_group_is_local(self, group: Any) -> None:
        assert dist.get_backend(group) == BACKEND
        assert not robustft.distributed.is_distributed(group)
        assert robustft.distributed.world_size(group) == 1
        x = torch.randn(3, device=DEV)
        assert robustft.distributed.all_reduce_sum(x, group) is x

    def test_collectives_run_through_the_backend(self, group: Any, forced: None) -> None:
        from robustft.distributed import all_gather_cat, all_reduce_sum, rank_offset

        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(3, 4, device=DEV, dtype=dtype, requires_grad=True)
            total = all_reduce_sum(x, group)
            assert total is not x and torch.equal(total, x)  # the sum over one rank
            (total * 2).sum().backward()
            assert x.grad is not None and torch.equal(x.grad, torch.full_like(x, 2))
            y = torch.randn(5, 2, device=DEV, dtype=dtype, requires_grad=True)
            gathered = all_gather_cat(y, group)
            assert torch.equal(gathered, y)
            gathered.sum().backward()
            assert y.grad is not None and torch.equal(y.grad, torch.ones_like(y))
        empty = all_gather_cat(torch.zeros(0, 4, device=DEV), group)
        assert empty.shape == (0, 4) and empty.device == DEV
        assert rank_offset(5, group, device=DEV) == 0

    def test_gradient_sync_and_replicas_run_through_the_backend(
        self, group: Any, forced: None
    ) -> None:
        from robustft.distributed import replicate, sync_gradients

        w = torch.randn(3, 4, device=DEV, requires_grad=True)
        b = torch.randn(4, device=DEV, requires_grad=True)
        h = torch.randn(5, device=DEV, dtype=torch.bfloat16, requires_grad=True)  # its own bucket
        (2 * w.sum() + h.float().sum()).backward()  # b gets no gradient on any rank
        assert w.grad is not None and h.grad is not None
        want_w, want_h = w.grad.clone(), h.grad.clone()
        sync_gradients({"w": w, "b": b, "h": h}, group)  # the average over one rank
        assert torch.equal(w.grad, want_w) and torch.equal(h.grad, want_h) and b.grad is None
        handle = replicate({"w": w, "h": h}, group=group)  # broadcast, then a hook per backward
        try:
            w.grad = h.grad = None
            (w.square().sum() + 3 * h.float().sum()).backward()
            assert torch.equal(w.grad, 2 * w.detach())
            assert torch.equal(h.grad, torch.full_like(h, 3))
        finally:
            handle.remove()
        # a refusal is agreed through the backend first (a bookkeeping collective on the device)
        with pytest.raises(ValueError, match=r"replicate: params must hold at least one tensor"):
            replicate([torch.zeros(2, device=DEV)], group=group)

    def test_losses_with_group_equal_the_local_loss(self, group: Any, forced: None) -> None:
        g = torch.Generator().manual_seed(0)
        f, t = torch.randn(6, 8, generator=g).to(DEV), torch.randn(6, 8, generator=g).to(DEV)
        z = torch.randn(6, 5, generator=g).to(DEV)
        w = (0.1 + 0.9 * torch.rand(6, generator=g)).to(DEV)
        calls: dict[str, Callable[[Tensor, Any], Tensor]] = {
            "ueo": lambda x, grp: losses.ueo(x, w, group=grp),
            "clip_contrastive": lambda x, grp: losses.clip_contrastive(x, t, group=grp),
            "sigmoid_contrastive": lambda x, grp: losses.sigmoid_contrastive(
                x, t, logit_scale=10.0, logit_bias=-10.0, group=grp
            ),
        }
        for name, call in calls.items():
            x0 = z if name == "ueo" else f
            for amp in (False, True):
                with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=amp):
                    xa, xb = (x0.clone().requires_grad_(True) for _ in range(2))
                    shared, local = call(xa, group), call(xb, None)
                assert shared.dtype == torch.float32, name
                close(shared, local, what=name)
                shared.backward()
                local.backward()
                assert xa.grad is not None and xb.grad is not None
                close(xa.grad, xb.grad, what=name)

    def test_evaluation_gathers_through_the_backend(self, group: Any, forced: None) -> None:
        g = torch.Generator().manual_seed(0)
        z = torch.randn(20, 4, generator=g)
        y = torch.randint(-1, 4, (20,), generator=g)
        shared = metrics.Evaluation(device="cpu", group=group)
        local = metrics.Evaluation(device="cpu")
        for part in range(2):
            rows = slice(10 * part, 10 * part + 10)
            idx = torch.arange(20)[rows]
            shared.update(z[rows], y[rows], indices=idx)
            local.update(z[rows], y[rows], indices=idx)
        a, b = shared.compute(), local.compute()
        for field in a._fields:
            x, want = getattr(a, field), getattr(b, field)
            if isinstance(x, Tensor):
                close(x, want, what=field)
            else:
                assert x == want, field

    @pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
    def test_recipe_loop_under_one_rank_data_parallelism(self, group: Any, strategy: str) -> None:
        device = DEV
        for method in ("clipood", "ueo"):
            wrapped = _recipe(
                method, Runtime(device, 0, 1, strategy, group, amp_dtype=torch.bfloat16)
            )
            single = _recipe(method, Runtime(device, amp_dtype=torch.bfloat16))
            _assert_runs_close(wrapped, single, rtol=1e-3, atol=1e-4)
