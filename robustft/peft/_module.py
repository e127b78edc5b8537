"""The factors as parameters of the model itself: attach, train under DDP/FSDP2, fold back in."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft._checks import describe
from robustft.peft._spec import Spec, Target, is_factor
from robustft.peft._trees import _bias_name, _check_spec, _checked, _updates
from robustft.typing import Params

__all__ = ["attach_", "attached", "fold_"]

_STATE = "_robustft_peft"


class _Attachment:
    """What :func:`attach_` installed on a module, so :func:`fold_` can take it off again."""

    def __init__(self, spec: Spec, targets: list[Target]):
        self.spec = spec
        self.targets = targets
        self.handles: list[Any] = []
        self.forwards: list[nn.Module] = []  # modules whose forward was replaced (instance attr)


def attached(module: nn.Module) -> Spec | None:
    """The :class:`Spec` attached to ``module`` by :func:`attach_`, or ``None``.

    Example:
        >>> attached(torch.nn.Linear(2, 2)) is None
        True
    """
    state = getattr(module, _STATE, None)
    return state.spec if isinstance(state, _Attachment) else None


def _split_name(name: str) -> tuple[str, str]:
    owner, _, attr = name.rpartition(".")
    return owner, attr


def _hook_module(root: nn.Module, owner_path: str) -> tuple[str, nn.Module]:
    """The module whose forward reads the weight: its owner, or the attention module that owns
    an ``out_proj`` (``nn.MultiheadAttention`` passes ``out_proj.weight`` to a function and never
    calls ``out_proj``)."""
    parent_path, _, _ = owner_path.rpartition(".")
    if owner_path and isinstance(root.get_submodule(parent_path), nn.MultiheadAttention):
        return parent_path, root.get_submodule(parent_path)
    return owner_path, root.get_submodule(owner_path)


def _gates(spec: Spec, mod: nn.Module, targets: list[Target], like: Tensor) -> dict[str, Tensor]:
    """R-Adapter's adapter dropping: per target, gamma/(1-p), gamma ~ Bernoulli(1-p)."""
    keep = 1.0 - spec.drop
    return {
        t.weight: torch.empty((), device=like.device, dtype=torch.float32).bernoulli_(keep) / keep
        for t in targets
    }


Slots = dict[str, tuple[nn.Module, str]]
"""Where each tensor of some targets lives: ``{name: (owning module, attribute)}``."""


def _slots(root: nn.Module, targets: list[Target]) -> Slots:
    """The owners of ``targets``' weights, biases and factors, looked up once (FSDP2 swaps the
    tensors in and out of these modules, never the modules themselves)."""
    out: Slots = {}
    for t in targets:
        owner = root.get_submodule(_split_name(t.weight)[0])
        out[t.weight] = (owner, _split_name(t.weight)[1])
        if t.weight.endswith("weight"):
            bias = _bias_name(t.weight)
            if owner._parameters.get(_split_name(bias)[1]) is not None:
                out[bias] = (owner, _split_name(bias)[1])
        for key in t.keys.values():
            out[key] = (owner, _split_name(key)[1])
    return out


def _live(slots: Slots) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The current (possibly FSDP-unsharded) factor and base tensors of ``slots``."""
    factors: dict[str, Tensor] = {}
    base: dict[str, Tensor] = {}
    for name, (owner, attr) in slots.items():
        (factors if is_factor(name) else base)[name] = owner._parameters[attr]  # type: ignore[assignment]
    return factors, base


def _swap_hooks(root: nn.Module, spec: Spec, hook: nn.Module, targets: list[Target]) -> list[Any]:
    """Forward pre-/post-hooks that put :math:`W'` in place of :math:`W` during ``hook``'s forward."""
    saved: list[tuple[nn.Module, str, Any]] = []
    slots = _slots(root, targets)

    def pre(mod: nn.Module, args: Any) -> None:
        factors, base = _live(slots)
        gates = None
        if spec.drop > 0 and mod.training:
            gates = _gates(spec, mod, targets, next(iter(base.values())))
        updates = _updates(spec, targets, factors, base, gates)
        for name, d in updates.items():
            owner, attr = slots[name]
            saved.append((owner, attr, owner._parameters[attr]))
            owner._parameters[attr] = base[name] + d  # type: ignore[assignment]

    def post(mod: nn.Module, args: Any, output: Any) -> None:
        while saved:
            owner, attr, value = saved.pop()
            owner._parameters[attr] = value

    return [
        hook.register_forward_pre_hook(pre),
        hook.register_forward_hook(post, always_call=True),
    ]


def _branch(spec: Spec, x: Tensor, a: Tensor, b: Tensor, training: bool) -> Tensor:
    r""":math:`s\,B A\,\mathrm{drop}(x)` for row inputs: ``s * (drop(x) @ A.T) @ B.T``."""
    if training and spec.dropout > 0:
        x = F.dropout(x, spec.dropout, training=True)
    return (x.to(a.dtype) @ a.T @ b.T) * spec.scale


def _linear_hook(root: nn.Module, spec: Spec, hook: nn.Module, target: Target) -> list[Any]:
    """CLIP-LoRA's branch on an ``nn.Linear``: ``y = Wx + b + s B A drop(x)``."""
    slots = _slots(root, [target])

    def post(mod: nn.Module, args: Any, output: Tensor) -> Tensor:
        factors, _ = _live(slots)
        a, b = factors[target.keys["lora_A"]], factors[target.keys["lora_B"]]
        return output + _branch(spec, args[0], a, b, mod.training).to(output.dtype)

    return [hook.register_forward_hook(post)]


def _attention_forward(
    root: nn.Module, spec: Spec, mha: nn.MultiheadAttention, targets: list[Target]
) -> Any:
    """``nn.MultiheadAttention.forward`` computed explicitly, with LoRA branches (and their input
    dropout) on the q/k/v in-projection and ``out_proj``, as CLIP-LoRA's attention does."""
    in_target = next((t for t in targets if t.weight.endswith("in_proj_weight")), None)
    out_target = next((t for t in targets if t.weight.endswith("out_proj.weight")), None)
    in_slots = _slots(root, [in_target]) if in_target is not None else {}
    out_slots = _slots(root, [out_target]) if out_target is not None else {}

    def forward(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        training = mha.training
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif mha.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        length, n, e = query.shape
        source = key.shape[0]
        h = mha.num_heads
        hd = e // h
        w = mha.in_proj_weight
        bias = mha.in_proj_bias
        wq, wk, wv = w.chunk(3)
        bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
        q = F.linear(query, wq, bq)
        k = F.linear(key, wk, bk)
        v = F.linear(value, wv, bv)
        if in_target is not None:
            factors, _ = _live(in_slots)
            if in_target.blocks is None:
                a, b = factors[in_target.keys["lora_A"]], factors[in_target.keys["lora_B"]]
                bs = b.chunk(3)
                q = q + _branch(spec, query, a, bs[0], training).to(q.dtype)
                k = k + _branch(spec, key, a, bs[1], training).to(k.dtype)
                v = v + _branch(spec, value, a, bs[2], training).to(v.dtype)
            else:
                for blk in in_target.blocks:
                    a = factors[in_target.keys[f"lora_A_{blk}"]]
                    b = factors[in_target.keys[f"lora_B_{blk}"]]
                    if blk == "q":
                        q = q + _branch(spec, query, a, b, training).to(q.dtype)
                    elif blk == "k":
                        k = k + _branch(spec, key, a, b, training).to(k.dtype)
                    else:
                        v = v + _branch(spec, value, a, b, training).to(v.dtype)
        q = q.reshape(length, n * h, hd).transpose(0, 1).reshape(n, h, length, hd)
        k = k.reshape(source, n * h, hd).transpose(0, 1).reshape(n, h, source, hd)
        v = v.reshape(source, n * h, hd).transpose(0, 1).reshape(n, h, source, hd)
        mask = _additive_mask(attn_mask, key_padding_mask, n, h, length, source, q.dtype)
        if mask is None and is_causal:
            mask = torch.full((length, source), -math.inf, dtype=q.dtype, device=q.device).triu(1)
        p = mha.dropout if training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
            if mask is not None:
                scores = scores + mask
            probs = F.dropout(scores.softmax(-1), p, training=p > 0)  # returned after dropout,
            weights = probs.mean(1) if average_attn_weights else probs  # as nn.MultiheadAttention
            out = probs @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.permute(2, 0, 1, 3).reshape(length, n, e)
        proj = F.linear(out, mha.out_proj.weight, mha.out_proj.bias)
        if out_target is not None:
            factors, _ = _live(out_slots)
            a, b = factors[out_target.keys["lora_A"]], factors[out_target.keys["lora_B"]]
            proj = proj + _branch(spec, out, a, b, training).to(proj.dtype)
        if not batched:
            proj = proj.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        elif mha.batch_first:
            proj = proj.transpose(0, 1)
        return proj, weights

    return forward


def _additive_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    n: int,
    h: int,
    length: int,
    source: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """``nn.MultiheadAttention``'s masks as one additive ``[n, h, length, source]`` float mask
    (boolean ``True`` = not allowed to attend, as in ``nn.MultiheadAttention``)."""

    def additive(m: Tensor) -> Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, -math.inf)
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        m = additive(attn_mask)
        mask = m.reshape(n, h, length, source) if m.dim() == 3 else m.reshape(1, 1, length, source)
    if key_padding_mask is not None:
        kp = additive(key_padding_mask).reshape(n, 1, 1, source)
        mask = kp if mask is None else mask + kp
    return mask


def attach_(module: nn.Module, spec: Spec, factors: Params) -> nn.Module:
    r"""Make ``factors`` parameters of ``module`` and run its forward with the updated weights.

    In place: every parameter of ``module`` is frozen (``requires_grad=False``), each factor
    becomes a trainable ``nn.Parameter`` (a copy) of the submodule owning its weight, under the
    factor's own key — so ``dict(module.named_parameters())`` holds the factor tree next to the
    untouched base weights, an optimiser over the ``requires_grad`` parameters trains exactly the
    factors, ``DistributedDataParallel`` synchronises them and FSDP2's ``fully_shard`` shards them
    with their transformer block. No submodule is replaced: open_clip's fused
    ``nn.MultiheadAttention`` keeps its own forward and kernels.

    The forward of the submodule that reads a target weight (the owner, or the attention module
    for its ``out_proj``) sees :math:`W' = W + \Delta W` (:func:`apply`) for the duration of that
    call, through a forward pre-hook and a post-hook that puts :math:`W` back (also on an
    exception), so gradients reach the factors only. Two training-time extras follow the papers:

    - ``spec.drop`` (adapter dropping, R-Adapter): in training mode each adapter's update is
      multiplied by :math:`\gamma/(1-p)`, :math:`\gamma \sim \mathrm{Bernoulli}(1-p)` drawn per
      forward from the global generator of the weight's device;
    - ``spec.dropout`` (CLIP-LoRA): the low-rank branch is computed on its own,
      :math:`y = Wx + b + s\,BA\,\mathrm{drop}(x)`, which no weight update can express. Supported
      for ``nn.Linear`` weights and for the in- and out-projections of ``nn.MultiheadAttention``,
      whose forward is then computed explicitly (q/k/v projections, scaled dot-product attention,
      output projection — equal to PyTorch's to float tolerance, tested), as CLIP-LoRA's
      re-implemented attention does. In eval mode (and with ``dropout=0``) the branch equals the
      weight update.

    Use :func:`robustft.peft.split` on ``dict(module.named_parameters())`` to get the factors
    back, :func:`fold` to export plain weights, or :func:`fold_` to fold them into the module.

    Args:
        module: the model (or any module holding the target weights).
        spec: the factors' :class:`Spec`.
        factors: the factor tree, keyed by the module's weight names (:func:`init`).

    Returns:
        ``module`` itself.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, or a bad spec or tree.
        ValueError: ``module`` already has factors attached, a factor does not fit its weight,
            or ``spec.dropout > 0`` on a weight that is neither an ``nn.Linear``'s nor an
            attention projection (its input is not reachable).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> spec = lora(rank=1, alpha=1, targets="0.weight")
        >>> _ = attach_(net, spec, peft.init(spec, dict(net.named_parameters())))
        >>> sorted(n for n, p in net.named_parameters() if p.requires_grad)
        ['0.weight_lora_A', '0.weight_lora_B']

    References:
        Hu et al., "LoRA", ICLR 2022; Zanella and Ben Ayed, "Low-Rank Few-Shot Adaptation of
        Vision-Language Models" (CLIP-LoRA), CVPRW 2024, https://github.com/MaxZanella/CLIP-LoRA;
        Kim et al., "R-Adapter", ECCV 2024.
    """
    fn = "attach_"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{fn}: module must be a torch.nn.Module, got {describe(module)}")
    _check_spec(fn, spec)
    if attached(module) is not None:
        raise ValueError(
            f"{fn}: module already has factors attached ({attached(module)!r}); fold_ them or "
            "use a fresh copy of the model"
        )
    base = dict(module.named_parameters())
    targets, f, _ = _checked(fn, spec, factors, base, where="module")
    groups: dict[str, tuple[nn.Module, list[Target]]] = {}
    for t in targets:
        owner_path, _ = _split_name(t.weight)
        path, hook = _hook_module(module, owner_path)
        groups.setdefault(path, (hook, []))[1].append(t)
    if spec.dropout > 0:
        for path, (hook, ts) in groups.items():
            ok = isinstance(hook, nn.MultiheadAttention) and all(
                t.weight.endswith(("in_proj_weight", "out_proj.weight")) for t in ts
            )
            ok = ok or (
                isinstance(hook, nn.Linear) and all(t.weight.endswith("weight") for t in ts)
            )
            if not ok:
                raise ValueError(
                    f"{fn}: spec.dropout > 0 needs the input of each target's layer (nn.Linear "
                    f"weights, nn.MultiheadAttention in_proj_weight / out_proj.weight), got "
                    f"{[t.weight for t in ts]} read by {type(hook).__name__} {path!r}; use "
                    "dropout=0 for these weights"
                )
            if isinstance(hook, nn.MultiheadAttention) and not hook._qkv_same_embed_dim:
                raise ValueError(
                    f"{fn}: {path!r} has separate q/k/v weights; only the fused "
                    "in_proj_weight layout is supported with dropout"
                )
            if isinstance(hook, nn.MultiheadAttention) and (
                hook.bias_k is not None or hook.add_zero_attn
            ):
                raise ValueError(
                    f"{fn}: {path!r} uses add_bias_kv / add_zero_attn, which the explicit "
                    "attention does not compute; use dropout=0"
                )
    module.requires_grad_(False)
    for t in targets:
        owner_path, _ = _split_name(t.weight)
        owner = module.get_submodule(owner_path)
        for key in t.keys.values():
            _, attr = _split_name(key)
            owner.register_parameter(attr, nn.Parameter(f[key].detach().clone()))
    state = _Attachment(spec, targets)
    for hook, ts in groups.values():
        if spec.dropout > 0 and isinstance(hook, nn.MultiheadAttention):
            hook.forward = _attention_forward(module, spec, hook, ts)  # type: ignore[method-assign]
            state.forwards.append(hook)
        elif spec.dropout > 0:
            state.handles += _linear_hook(module, spec, hook, ts[0])
        else:
            state.handles += _swap_hooks(module, spec, hook, ts)
    setattr(module, _STATE, state)
    return module


def fold_(module: nn.Module) -> dict[str, Tensor]:
    """Fold the attached factors into ``module``'s weights and take them off (in place).

    Afterwards the module is a plain model again (no hooks, no factor parameters, its own
    forward), with :math:`W'` in place of :math:`W` — what :func:`fold` returns as a tree. The
    base parameters' ``requires_grad`` flags stay ``False``.

    Returns:
        The factor tree that was attached (detached copies).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ValueError: no factors are attached.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> spec = lora(rank=1, alpha=1, targets="0.weight")
        >>> _ = attach_(net, spec, peft.init(spec, dict(net.named_parameters())))
        >>> sorted(fold_(net))
        ['0.weight_lora_A', '0.weight_lora_B']
        >>> attached(net) is None
        True
    """
    fn = "fold_"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{fn}: module must be a torch.nn.Module, got {describe(module)}")
    state = getattr(module, _STATE, None)
    if not isinstance(state, _Attachment):
        raise ValueError(f"{fn}: module has no factors attached (see attach_)")
    for h in state.handles:
        h.remove()
    for m in state.forwards:
        del m.forward
    slots = _slots(module, state.targets)
    factors, base = _live(slots)
    with torch.no_grad():
        updates = _updates(state.spec, state.targets, factors, base, None)
        for name, d in updates.items():
            base[name].add_(d)
    out = {k: v.detach().clone() for k, v in factors.items()}
    for key in factors:
        owner, attr = slots[key]
        delattr(owner, attr)
    delattr(module, _STATE)
    return out
