"""The library's own loop under data parallelism: trees of trained tensors outside the DDP module.

A parameter tree passed to robustft.clip's functional forwards (also alongside the DDP wrapper) is
not a parameter of the module DDP wraps, so DDP never averages its gradient (issue 17: two ranks
drifted apart over 3 steps in silence). Either ``robustft.distributed.replicate`` keeps it in sync,
or the first backward under a multi-rank process group refuses it. Checked with two gloo ranks:
without the helper every rank raises; with it the ranks stay identical over 3 steps on different
local batches and equal one process on the global batch.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _dist import run_distributed
from torch import Tensor, nn

from robustft import clip, distributed, losses, tree

NAMES = ["cat", "dog", "bird"]
LOCAL = 2  # images per rank per step; the global batch is 2 x LOCAL
STEPS = 3
REFUSED = r"requires grad under a 2-rank process group, but nothing averages its gradient"


def _batch(step: int, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's images, labels and UEO confidences of step ``step`` (different per rank)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    images = torch.randn(LOCAL, 3, 32, 32, generator=g)
    labels = torch.randint(0, len(NAMES), (LOCAL,), generator=g)
    confidence = 0.2 + 0.7 * torch.rand(LOCAL, generator=g)
    return images, labels, confidence


def _global_batch(step: int) -> tuple[Tensor, Tensor, Tensor]:
    parts = [_batch(step, r) for r in range(2)]
    return tuple(torch.cat([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def _head() -> Tensor:
    return F.normalize(
        torch.randn(len(NAMES), 16, generator=torch.Generator().manual_seed(5)), dim=-1
    )


def _affines(model: nn.Module) -> dict[str, Tensor]:
    """The visual norm affines as a tree of fresh leaf tensors (outside the module)."""
    trained, _ = tree.partition(
        dict(model.named_parameters()), clip.norm_affine_names(model, under="visual")
    )
    return {k: v.detach().clone().requires_grad_(True) for k, v in trained.items()}


# --- scenario A: a tree of visual norm affines passed with the DDP wrapper (FT-like) ----------


def _run_tree_with_ddp(model_fn: Any, *, ddp: bool, rank: int | None, use_replicate: bool) -> Any:
    """3 AdamW steps: the module trains visual.proj (through DDP), the tree the norm affines."""
    from torch.nn.parallel import DistributedDataParallel

    model = model_fn()
    model.requires_grad_(False)
    model.visual.proj.requires_grad_(True)
    wrapper = DistributedDataParallel(model) if ddp else model
    affines = _affines(model)
    handle = distributed.replicate(affines) if use_replicate else None
    optimizer = torch.optim.AdamW([model.visual.proj, *affines.values()], lr=1e-2)
    head = _head()
    for step in range(STEPS):
        images, labels, _ = _batch(step, rank) if rank is not None else _global_batch(step)
        features = clip.image_features(wrapper, affines, images)
        loss = F.cross_entropy(10.0 * features @ head.T, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if handle is not None:
        handle.remove()
    out = {k: v.detach().clone() for k, v in affines.items()}
    out["visual.proj"] = model.visual.proj.detach().clone()
    return out


# --- scenario B: a CoOp context and norm affines, no DDP at all, UEO over the global batch ----


def _run_context(
    model_fn: Any, tokenizer: Any, *, rank: int | None, use_replicate: bool
) -> dict[str, Tensor]:
    """3 SGD steps of UEO on a prompt context and the visual norm affines (UEO's trained set)."""
    import torch.distributed as dist

    model = model_fn().requires_grad_(False)
    context = clip.init_context(model, tokenizer)
    affines = _affines(model)
    trained = {"context": context, **affines}
    handle = distributed.replicate(trained) if use_replicate else None
    optimizer = torch.optim.SGD(list(trained.values()), lr=0.5, momentum=0.9)
    group = dist.group.WORLD if rank is not None else None
    for step in range(STEPS):
        images, _, confidence = _batch(step, rank) if rank is not None else _global_batch(step)
        text = clip.encode_text_with_context(model, context, NAMES, tokenizer, params=affines)
        features = clip.image_features(model, affines, images)
        loss = losses.ueo(10.0 * features @ text.T, confidence, group=group)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if handle is not None:
        handle.remove()
    return {k: v.detach().clone() for k, v in trained.items()}


# --- scenario D: the tensors live in the wrapped module, whose forward calls robustft.clip ----


class _Prompted(nn.Module):
    """Like the recipes' UEO model: the context is this module's parameter, DDP wraps it."""

    def __init__(self, model: nn.Module, tokenizer: Any):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.context = nn.Parameter(clip.init_context(model, tokenizer).detach().clone())
        self.tokenizer = tokenizer

    def forward(self, images: Tensor) -> Tensor:
        text = clip.encode_text_with_context(self.model, self.context, NAMES, self.tokenizer)
        return 10.0 * clip.image_features(self.model, None, images) @ text.T


def _body(rank: int, world_size: int) -> dict[str, Any]:
    import torch.distributed as dist
    from clip_models import tiny_vit_clip, tokenizer
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel

    out: dict[str, Any] = {}
    tok = tokenizer()

    # without the helper: every rank refuses on the first backward, naming the fix
    with pytest.raises(ValueError, match=REFUSED) as caught:
        _run_context(tiny_vit_clip, tok, rank=rank, use_replicate=False)
    assert "robustft.distributed.replicate(params)" in str(caught.value)
    assert re.match(r"(encode_text_with_context|image_features): ", str(caught.value))
    assert "\n" not in str(caught.value)
    # a plain module's own trained parameter, no DDP anywhere: refused too
    plain = tiny_vit_clip().requires_grad_(False)
    plain.visual.proj.requires_grad_(True)
    with pytest.raises(
        ValueError, match=r"image_features: model parameter 'visual.proj' " + REFUSED
    ):
        clip.image_features(plain, None, _batch(0, rank)[0]).sum().backward()
    # a forward with autograd on but no backward (e.g. a validation pass) is not refused
    clip.image_features(plain, None, _batch(1, rank)[0])

    # with the helper: identical ranks (returned and compared by the parent with one process)
    out["context"] = {
        k: v.tolist()
        for k, v in _run_context(tiny_vit_clip, tok, rank=rank, use_replicate=True).items()
    }
    out["tree"] = {
        k: v.tolist()
        for k, v in _run_tree_with_ddp(
            tiny_vit_clip, ddp=True, rank=rank, use_replicate=True
        ).items()
    }

    # tensors owned by the module DDP wraps, reached from inside its forward: not refused
    prompted = DistributedDataParallel(_Prompted(tiny_vit_clip(), tok))
    images, labels, _ = _batch(0, rank)
    F.cross_entropy(prompted(images), labels).backward()
    out["prompted_grad"] = prompted.module.context.grad.tolist()

    # replicate() between the forward and the backward still counts (checked at the backward)
    late_model = tiny_vit_clip().requires_grad_(False)
    late = {"visual.proj": late_model.visual.proj.detach().clone().requires_grad_(True)}
    features = clip.image_features(late_model, late, _batch(2, rank)[0])
    late_handle = distributed.replicate(late)
    features.sum().backward()
    out["late_grad"] = late["visual.proj"].grad.tolist()
    late_handle.remove()

    # replicate: rank 0's values are broadcast
    w = torch.full((3,), float(rank + 1), requires_grad=True)
    handle = distributed.replicate([w])
    assert w.tolist() == [1.0, 1.0, 1.0] and distributed.is_replicated(w)
    # no_sync: local gradients accumulate unsynchronised, the next backward averages the sum
    with handle.no_sync():
        (w * (rank + 1)).sum().backward()
    assert w.grad.tolist() == [float(rank + 1)] * 3
    (w * 10 * (rank + 1)).sum().backward()
    assert w.grad.tolist() == [(1 + 2) / 2 * 11] * 3  # mean over ranks of 11 * (rank + 1)
    handle.remove()
    assert not distributed.is_replicated(w)
    kept = torch.full((3,), float(rank), requires_grad=True)
    distributed.replicate([kept], init_sync=False).remove()
    assert kept.tolist() == [float(rank)] * 3

    # sync_gradients: a gradient missing on one rank counts as zero, one missing everywhere stays None
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(5, requires_grad=True)
    if rank == 0:
        a.grad = torch.tensor([4.0, 8.0])
    distributed.sync_gradients({"a": a, "b": b})
    assert a.grad.tolist() == [2.0, 4.0] and b.grad is None

    # every rank refuses together: different tensors, or one rank's tensors refused locally
    shape = 3 if rank == 0 else 4
    with pytest.raises(
        ValueError,
        match=r"replicate: params must be the same tensors .* rank 1: 1 tensors/4 elements",
    ):
        distributed.replicate([torch.zeros(shape, requires_grad=True)])
    if rank == 1:
        with pytest.raises(
            ValueError,
            match=r"replicate: params must hold at least one tensor that requires grad, got 1",
        ):
            distributed.replicate([torch.zeros(3)])
    else:
        with pytest.raises(ValueError, match=r"replicate: params were refused on rank\(s\) \[1\]"):
            distributed.replicate([torch.zeros(3, requires_grad=True)])
    # a sparse gradient cannot be averaged in a flat bucket
    s = torch.zeros(4, 2, requires_grad=True)
    s.grad = torch.sparse_coo_tensor([[0]], torch.ones(1, 2), (4, 2))
    with pytest.raises(
        TypeError, match=r"sync_gradients: gradients must be dense, got a torch.sparse_coo"
    ):
        distributed.sync_gradients([s])
    # DTensors belong to FSDP / tensor parallelism
    mesh = init_device_mesh("cpu", (world_size,))
    sharded = distribute_tensor(torch.zeros(4), mesh, [Replicate()]).requires_grad_(True)
    with pytest.raises(
        TypeError,
        match=r"replicate: params must be plain tensors, got sharded DTensors at \['params\[0\]'\]",
    ):
        distributed.replicate([sharded])

    # last, the DDP scenario without the helper: refused (DDP's own state is left mid-backward)
    with pytest.raises(ValueError, match=r"image_features: params\['visual\..*'\] " + REFUSED):
        _run_tree_with_ddp(tiny_vit_clip, ddp=True, rank=rank, use_replicate=False)
    dist.barrier()
    return out


@pytest.mark.distributed
def test_trees_outside_ddp_are_replicated_or_refused() -> None:
    from clip_models import tiny_vit_clip, tokenizer

    ranks = run_distributed(_body, world_size=2, timeout=240)
    # the ranks are identical (the same averaged gradients, the same steps) ...
    for key in ("context", "tree"):
        assert ranks[0][key] == ranks[1][key], key
    assert ranks[0]["prompted_grad"] == ranks[1]["prompted_grad"]
    assert ranks[0]["late_grad"] == ranks[1]["late_grad"]
    # ... and equal one process on the global batch
    single = {
        "context": _run_context(tiny_vit_clip, tokenizer(), rank=None, use_replicate=False),
        "tree": _run_tree_with_ddp(tiny_vit_clip, ddp=False, rank=None, use_replicate=False),
    }
    for key, expected in single.items():
        assert set(ranks[0][key]) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(
                torch.tensor(ranks[0][key][name]),
                value,
                rtol=1e-4,
                atol=1e-5,
                msg=lambda m, k=key, n=name: f"{k}/{n}: {m}",
            )
    # and training moved them (the comparison is not between untouched initial values)
    initial = _affines(tiny_vit_clip())
    moved = (
        torch.tensor(ranks[0]["tree"]["visual.ln_post.weight"]) - initial["visual.ln_post.weight"]
    )
    assert moved.abs().max() > 1e-3


# --- one process: nothing to synchronise, nothing installed -----------------------------------


def test_one_process_installs_no_hook() -> None:
    from clip_models import tiny_vit_clip

    model = tiny_vit_clip().requires_grad_(False)
    affines = _affines(model)
    clip.image_features(model, affines, torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(t._backward_hooks is None for t in affines.values())  # no refusal hook
    handle = distributed.replicate(affines)
    assert all(t._post_accumulate_grad_hooks is None for t in affines.values())  # no sync hook
    assert all(distributed.is_replicated(t) for t in affines.values())
    grads = {k: t.grad.clone() for k, t in affines.items()}
    distributed.sync_gradients(affines)  # a no-op
    assert all(torch.equal(grads[k], t.grad) for k, t in affines.items())
    assert repr(handle).startswith(f"Replica({len(affines)} tensors")
    handle.remove()
    assert not any(distributed.is_replicated(t) for t in affines.values())


def test_replicate_skips_frozen_and_duplicate_tensors() -> None:
    w, frozen = torch.zeros(2, requires_grad=True), torch.zeros(3)
    handle = distributed.replicate({"w": w, "again": w, "frozen": frozen})
    assert handle.tensors == (w,)
    assert not distributed.is_replicated(frozen)
    handle.remove()
    head = nn.Linear(2, 3)
    handle = distributed.replicate(head.parameters())  # any iterable of tensors
    assert handle.tensors == (head.weight, head.bias)
    handle.remove()


def test_replicate_and_sync_gradients_errors() -> None:
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(
        TypeError,
        match=r"replicate: params must be a parameter tree or a sequence of tensors, got a single Tensor\(shape=\(2,\)\); wrap it",
    ):
        distributed.replicate(w)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"replicate: params must hold only tensors, got 3 at position 1"
    ):
        distributed.replicate([w, 3])  # type: ignore[list-item]
    with pytest.raises(
        TypeError, match=r"sync_gradients: params must be a parameter tree .* got 'w'"
    ):
        distributed.sync_gradients("w")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"replicate: params must have torch.Tensor leaves"):
        distributed.replicate({"w": 1.0})  # type: ignore[dict-item]
    with pytest.raises(
        TypeError, match=r"replicate: group must be a torch.distributed ProcessGroup or None, got 0"
    ):
        distributed.replicate([w], group=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"sync_gradients: group must be"):
        distributed.sync_gradients([w], group="world")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"replicate: init_sync must be a bool, got 1"):
        distributed.replicate([w], init_sync=1)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"replicate: params must hold at least one tensor that requires grad, got 1 tensor\(s\)",
    ):
        distributed.replicate({"frozen": torch.zeros(2)})
    with pytest.raises(
        ValueError,
        match=r"replicate: params must be leaf tensors .* got computed tensors at \[\"params\['double'\]\"\]",
    ):
        distributed.replicate({"double": w * 2})
    handle = distributed.replicate([w])
    with pytest.raises(
        ValueError, match=r"replicate: params must not be replicated already, got \['params\[0\]'\]"
    ):
        distributed.replicate([w])
    handle.remove()
    with pytest.raises(TypeError, match=r"is_replicated: tensor must be"):
        distributed.is_replicated([w])  # type: ignore[arg-type]
