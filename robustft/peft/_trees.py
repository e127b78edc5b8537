"""LoRA and adapter updates as trees: initialise, apply, fold, take the update, re-factor, rescale."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from robustft._checks import check_number, check_tensor_tree, describe, fmt_keys
from robustft.peft._spec import BLOCKS, Spec, Target, factor_names, is_fused, resolve, targets_of
from robustft.typing import Params

__all__ = ["apply", "delta", "factorize", "fold", "init", "rescale", "size", "split"]


def _uniform(shape: tuple[int, int], fan_in: int, generator: torch.Generator | None) -> Tensor:
    """``nn.Linear``'s default weight draw (kaiming-uniform, a = sqrt(5)): U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / math.sqrt(fan_in)
    u = torch.rand(shape, generator=generator, dtype=torch.float32)
    return (2 * u - 1) * bound


def init(
    spec: Spec,
    params: Params,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    r"""The starting factor tree of ``spec`` over the target weights of ``params``.

    LoRA: :math:`B = 0` ``[rows, r]`` and :math:`A \sim U(-1/\sqrt{cols}, 1/\sqrt{cols})`
    ``[r, cols]`` (``nn.Linear``'s default draw, as Hugging Face peft and CLIP-LoRA; one pair per
    block with ``spec.qkv``). Full-rank adapter: :math:`W_{adp} = 0` ``[rows, rows]``; low-rank:
    :math:`B = 0` ``[rows, r]``, :math:`A \sim U(-1/\sqrt{rows}, \cdot)` ``[r, rows]``. So
    :func:`apply` of the result gives the weights unchanged. Keys are ``<weight>_lora_A``,
    ``<weight>_lora_B`` (``..._lora_A_q`` per block), ``<weight>_adapter`` or
    ``<weight>_adapter_A`` / ``_B`` — the names the tensors get as parameters after
    :func:`attach_`. Draws are made on the CPU in float32 (the same factors on every device and
    rank for one seed), in ``params`` order, then cast.

    Args:
        spec: from :func:`lora` or :func:`adapter`.
        params: the model's tree (``dict(model.named_parameters())``); only shapes, dtypes and
            devices are read.
        generator: a CPU ``torch.Generator`` for :math:`A`; ``None`` uses the global one.
        dtype: the factors' dtype; ``None`` keeps each weight's.

    Returns:
        A new tree of factors (leaf tensors, ``requires_grad=False``).

    Raises:
        TypeError: a bad ``spec``, ``params``, ``generator`` or ``dtype``.
        ValueError: targets that select nothing or a tensor that is not 2-d.

    Example:
        >>> spec = lora(rank=1, alpha=1, targets="w")
        >>> f = init(spec, {"w": torch.ones(2, 3)}, generator=torch.Generator().manual_seed(0))
        >>> {k: tuple(v.shape) for k, v in f.items()}
        {'w_lora_A': (1, 3), 'w_lora_B': (2, 1)}

    References:
        Hu et al., "LoRA", ICLR 2022; Kim et al., "R-Adapter", ECCV 2024.
    """
    fn = "init"
    _check_spec(fn, spec)
    tree = check_tensor_tree(fn, "params", params)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{fn}: generator must be a torch.Generator or None, got {describe(generator)}"
        )
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"{fn}: generator must be a CPU generator, got one on {generator.device}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{fn}: dtype must be a floating torch.dtype or None, got {dtype!r}")
    out: dict[str, Tensor] = {}
    r = spec.rank
    for name in resolve(fn, spec, tree):
        w = tree[name]
        rows, cols = w.shape
        dev, dt = w.device, dtype or w.dtype
        keys = factor_names(spec, name, tuple(w.shape))

        def draw(
            shape: tuple[int, int], fan_in: int, dev: torch.device = dev, dt: torch.dtype = dt
        ) -> Tensor:
            return _uniform(shape, fan_in, generator).to(device=dev, dtype=dt)

        def zeros(shape: tuple[int, int], dev: torch.device = dev, dt: torch.dtype = dt) -> Tensor:
            return torch.zeros(shape, device=dev, dtype=dt)

        if spec.kind == "adapter":
            if r is None:
                out[keys["adapter"]] = zeros((rows, rows))
            else:
                out[keys["adapter_A"]] = draw((r, rows), rows)
                out[keys["adapter_B"]] = zeros((rows, r))
            continue
        assert r is not None
        if "lora_A" in keys:
            out[keys["lora_A"]] = draw((r, cols), cols)
            out[keys["lora_B"]] = zeros((rows, r))
            continue
        for b in spec.qkv or ():
            out[keys[f"lora_A_{b}"]] = draw((r, cols), cols)
            out[keys[f"lora_B_{b}"]] = zeros((rows // 3, r))
    return out


def _check_spec(fn: str, spec: object) -> None:
    if not isinstance(spec, Spec):
        raise TypeError(
            f"{fn}: spec must be a robustft.peft.Spec (from peft.lora() or peft.adapter()), got "
            f"{describe(spec)}"
        )


def _bias_name(weight: str) -> str:
    return weight[: -len("weight")] + "bias"


def _checked(
    fn: str, spec: Spec, factors: Params, base: Params, *, where: str = "base"
) -> tuple[list[Target], Mapping[str, Tensor], Mapping[str, Tensor]]:
    _check_spec(fn, spec)
    f = check_tensor_tree(fn, "factors", factors)
    b = check_tensor_tree(fn, where, base)
    targets = targets_of(fn, spec, f)
    missing = [t.weight for t in targets if t.weight not in b]
    if missing:
        raise ValueError(
            f"{fn}: {where} must hold every weight the factors update, missing {fmt_keys(missing)}"
        )
    r = spec.rank
    for t in targets:
        w = b[t.weight]
        if w.ndim != 2:
            raise ValueError(f"{fn}: {where}[{t.weight!r}] must be 2-d, got shape {tuple(w.shape)}")
        rows, cols = w.shape
        fused = spec.kind == "lora" and spec.qkv is not None and is_fused(t.weight, (rows, cols))
        if fused != (t.blocks is not None):
            raise ValueError(
                f"{fn}: factors of {t.weight!r} must be "
                f"{'per q/k/v block' if fused else 'one pair for the whole weight'} for this spec "
                f"and a weight of shape {tuple(w.shape)}, got parts {sorted(t.keys)}"
            )
        for part, key in t.keys.items():
            shape = _factor_shape(spec, part, rows, cols, r)
            if tuple(f[key].shape) != shape:
                raise ValueError(
                    f"{fn}: factors[{key!r}] must have shape {shape} for {where}[{t.weight!r}] of "
                    f"shape {tuple(w.shape)} and rank {r}, got {tuple(f[key].shape)}"
                )
            if not f[key].is_floating_point():
                raise TypeError(
                    f"{fn}: factors[{key!r}] must be floating-point, got {f[key].dtype}"
                )
    return targets, f, b


def _factor_shape(spec: Spec, part: str, rows: int, cols: int, r: int | None) -> tuple[int, ...]:
    if part == "adapter":
        return (rows, rows)
    assert r is not None
    if part == "adapter_A":
        return (r, rows)
    if part == "adapter_B":
        return (rows, r)
    out = rows // 3 if part[-2:] in ("_q", "_k", "_v") else rows
    return (r, cols) if part.startswith("lora_A") else (out, r)


def _adapter_matrix(t: Target, f: Mapping[str, Tensor]) -> Tensor:
    if "adapter" in t.keys:
        return f[t.keys["adapter"]]
    return f[t.keys["adapter_B"]] @ f[t.keys["adapter_A"]]


def _updates(
    spec: Spec,
    targets: list[Target],
    f: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    gates: Mapping[str, Tensor | float] | None,
) -> dict[str, Tensor]:
    """ΔW (and Δb for adapters) per touched tensor, in each base tensor's dtype."""
    out: dict[str, Tensor] = {}
    for t in targets:
        w = b[t.weight]
        g = 1.0 if gates is None else gates.get(t.weight, 1.0)
        if spec.kind == "adapter":
            m = _adapter_matrix(t, f)
            if not isinstance(g, float) or g != 1.0:
                m = m * g
            out[t.weight] = (m @ w.to(m.dtype)).to(w.dtype)
            bias = _bias_name(t.weight)
            if bias in b:
                out[bias] = (m @ b[bias].to(m.dtype)).to(b[bias].dtype)
            continue
        s = spec.scale if (isinstance(g, float) and g == 1.0) else spec.scale * g
        if t.blocks is None:
            d = (f[t.keys["lora_B"]] @ f[t.keys["lora_A"]]) * s
        else:
            rows = w.shape[0] // 3
            parts = []
            for blk in BLOCKS:
                if blk in t.blocks:
                    parts.append(f[t.keys[f"lora_B_{blk}"]] @ f[t.keys[f"lora_A_{blk}"]])
                else:
                    a = f[t.keys[f"lora_A_{t.blocks[0]}"]]
                    parts.append(a.new_zeros(rows, w.shape[1]))
            d = torch.cat(parts) * s
        out[t.weight] = d.to(w.dtype)
    return out


def apply(
    spec: Spec,
    factors: Params,
    *,
    base: Params,
    gates: Mapping[str, Tensor | float] | None = None,
) -> dict[str, Tensor]:
    r"""The effective weights :math:`W' = W + \Delta W` of the targets, differentiable in the factors.

    .. math::

        \text{LoRA: } W' = W + s\,BA, \qquad
        \text{adapter: } W' = (I + W_{adp})\,W,\ b' = (I + W_{adp})\,b

    A partial tree of the touched tensors only, ready for :func:`torch.func.functional_call` or
    :func:`robustft.clip.image_features` (missing entries come from the module); gradients reach
    the factors (and the base, if it requires grad). ``gates`` multiplies a target's update by a
    number or 0-d tensor (R-Adapter's adapter dropping draws :math:`\gamma/(1-p)` per step;
    :func:`attach_` does this itself). The update is formed in the factors' dtype and added in
    the weight's.

    Args:
        spec: the factors' :class:`Spec`.
        factors: the factor tree (:func:`init`).
        base: :math:`W` (and biases), keyword-only: the frozen pre-trained tree (may be the whole
            model's tree).
        gates: ``{weight name: multiplier}`` for some targets, or ``None``.

    Returns:
        ``{weight: W', bias: b' (adapters)}``, new tensors.

    Raises:
        TypeError: a bad spec or tree.
        ValueError: factor keys that are not factors or miss a part, a weight missing from
            ``base``, or factor shapes that do not fit it.

    Example:
        >>> spec = lora(rank=1, alpha=1, targets="w")
        >>> f = {"w_lora_A": torch.tensor([[1.0, 2.0]]), "w_lora_B": torch.tensor([[1.0], [0.0]])}
        >>> apply(spec, f, base={"w": torch.zeros(2, 2)})["w"]
        tensor([[1., 2.],
                [0., 0.]])
    """
    fn = "apply"
    targets, f, b = _checked(fn, spec, factors, base)
    return {k: b[k] + d for k, d in _updates(spec, targets, f, b, gates).items()}


def delta(spec: Spec, factors: Params, *, base: Params) -> dict[str, Tensor]:
    r"""The update :math:`\Delta W = W' - W` as a tree over the touched tensors.

    LoRA: :math:`s\,BA` (base only supplies shapes and dtypes); adapter: :math:`W_{adp}W` and
    :math:`W_{adp}b`. This is the tree to give :func:`robustft.merging.task_arithmetic`,
    :func:`robustft.merging.ties` or :func:`robustft.merging.dare` (as ``base + delta``, anchored
    at ``base``) and the tree L2-SP or a ball measures. Averaging factors is *not* averaging
    updates: :math:`\tfrac12(B_1 + B_2)\tfrac12(A_1 + A_2) \neq \tfrac12(B_1A_1 + B_2A_2)`.

    Args:
        spec: the factors' :class:`Spec`.
        factors: the factor tree.
        base: the pre-trained tree, keyword-only.

    Returns:
        ``{weight: ΔW, bias: Δb (adapters)}`` in the base tensors' dtypes.

    Raises:
        TypeError, ValueError: as :func:`apply`.

    Example:
        >>> spec = lora(rank=1, alpha=2, targets="w")
        >>> f = {"w_lora_A": torch.tensor([[1.0, 2.0]]), "w_lora_B": torch.tensor([[1.0], [0.0]])}
        >>> delta(spec, f, base={"w": torch.zeros(2, 2)})["w"]
        tensor([[2., 4.],
                [0., 0.]])
    """
    targets, f, b = _checked("delta", spec, factors, base)
    return _updates(spec, targets, f, b, None)


def fold(spec: Spec, factors: Params, *, base: Params) -> dict[str, Tensor]:
    r"""The whole tree with the updates folded in: ``base`` with :math:`W'` in place of :math:`W`.

    Plain weights, no factor keys: what ``open_clip.create_model(..., pretrained=FILE)`` or
    ``model.load_state_dict`` takes, and what runs at zero extra cost. Computed under
    :func:`torch.no_grad`; tensors not touched are the base's own (not copied).

    Args:
        spec: the factors' :class:`Spec`.
        factors: the factor tree.
        base: the pre-trained tree, keyword-only.

    Returns:
        A new dict with ``base``'s keys.

    Raises:
        TypeError, ValueError: as :func:`apply`.

    Example:
        >>> spec = adapter(targets="l.weight")
        >>> f = {"l.weight_adapter": torch.tensor([[1.0]])}
        >>> fold(spec, f, base={"l.weight": torch.tensor([[3.0]]), "l.bias": torch.tensor([1.0])})
        {'l.weight': tensor([[6.]]), 'l.bias': tensor([2.])}
    """
    targets, f, b = _checked("fold", spec, factors, base)
    with torch.no_grad():
        updates = _updates(spec, targets, f, b, None)
        return {k: (v + updates[k] if k in updates else v) for k, v in b.items()}


def rescale(spec: Spec, factors: Params, weight: float) -> dict[str, Tensor]:
    r"""Factors whose update is :math:`\alpha\,\Delta W`: WiSE-FT on the update, in factor form.

    .. math::

        W + \alpha\,\Delta W = (1-\alpha)\,W + \alpha\,W'

    — WiSE-FT's interpolation between the pre-trained and the fine-tuned weights — obtained
    exactly by scaling one factor: :math:`B` for LoRA (:math:`s(\alpha B)A`), :math:`W_{adp}` (or
    its :math:`B`) for an adapter (:math:`(I + \alpha W_{adp})W`, R-Adapter's re-scaling). The
    result is as small as the factors and folds like them; ``fold(rescale(f, a))`` equals
    :func:`robustft.merging.wise` of the base and ``fold(f)`` at ``a``.

    Args:
        spec: the factors' :class:`Spec`.
        factors: the factor tree.
        weight: :math:`\alpha`, a finite number (0 gives the base, 1 the fine-tuned weights).

    Returns:
        A new factor tree (the :math:`A` factors are the input's own tensors).

    Raises:
        TypeError, ValueError: a bad spec or tree, or a non-finite ``weight``.

    Example:
        >>> spec = adapter(targets="w")
        >>> rescale(spec, {"w_adapter": torch.tensor([[2.0]])}, 0.5)
        {'w_adapter': tensor([[1.]])}
    """
    fn = "rescale"
    _check_spec(fn, spec)
    f = check_tensor_tree(fn, "factors", factors)
    targets_of(fn, spec, f)
    alpha = check_number(fn, "weight", weight)
    out: dict[str, Tensor] = {}
    for k, v in f.items():
        scaled = k.endswith(("_adapter", "_adapter_B")) or "_lora_B" in k
        out[k] = v * alpha if scaled else v
    return out


def factorize(spec: Spec, updates: Params, *, base: Params | None = None) -> dict[str, Tensor]:
    r"""LoRA factors of rank ``spec.rank`` whose update best approximates ``updates`` (truncated SVD).

    For each :math:`\Delta W` (each q/k/v block separately with ``spec.qkv``), with
    :math:`\Delta W / s = U\Sigma V^\top`: :math:`B = U_r\Sigma_r^{1/2}`,
    :math:`A = \Sigma_r^{1/2}V_r^\top` — the best rank-:math:`r` approximation in Frobenius norm
    (Eckart–Young), exact when :math:`\operatorname{rank}\Delta W \le r`. Compresses a full
    fine-tune's task vector into a LoRA (``updates = task_vector(theta, anchor=theta0)`` restricted
    to the targets), or turns an average or a merge of several LoRAs' updates back into factors.
    Computed in float64 under :func:`torch.no_grad`; the factors take each update's dtype.

    Args:
        spec: a LoRA :class:`Spec` (its rank, scale and ``qkv``).
        updates: ``{weight: ΔW}``, 2-d tensors.
        base: unused by LoRA's maths; accepted so the call mirrors :func:`delta`.

    Returns:
        A factor tree (:func:`init`'s keys).

    Raises:
        TypeError: a bad spec or tree.
        ValueError: an adapter spec (a multiplicative update has no closed-form factoring), a
            non-2-d update. A weight named ``...in_proj_weight`` whose rows are not a multiple
            of 3 is not a fused in-projection: it is factored as one matrix, as :func:`init` does.

    Example:
        >>> spec = lora(rank=1, alpha=1, targets="w")
        >>> u = torch.tensor([[1.0, 2.0], [2.0, 4.0]])
        >>> f = factorize(spec, {"w": u})
        >>> torch.allclose(delta(spec, f, base={"w": torch.zeros(2, 2)})["w"], u)
        True
    """
    fn = "factorize"
    _check_spec(fn, spec)
    if spec.kind != "lora":
        raise ValueError(
            f"{fn}: spec must be a LoRA spec (peft.lora); an adapter's update W_adp·W is "
            f"multiplicative, got kind {spec.kind!r}"
        )
    u = check_tensor_tree(fn, "updates", updates)
    if base is not None:
        check_tensor_tree(fn, "base", base)
    assert spec.rank is not None
    r, s = spec.rank, spec.scale
    out: dict[str, Tensor] = {}

    def pair(m: Tensor) -> tuple[Tensor, Tensor]:
        uu, sv, vh = torch.linalg.svd(m.double() / s, full_matrices=False)
        k = min(r, sv.shape[0])
        root = sv[:k].sqrt()
        b = torch.zeros(m.shape[0], r, dtype=torch.float64, device=m.device)
        a = torch.zeros(r, m.shape[1], dtype=torch.float64, device=m.device)
        b[:, :k] = uu[:, :k] * root
        a[:k] = root[:, None] * vh[:k]
        return b.to(m.dtype), a.to(m.dtype)

    with torch.no_grad():
        for name, m in u.items():
            if m.ndim != 2 or not m.is_floating_point():
                raise ValueError(
                    f"{fn}: updates[{name!r}] must be a 2-d floating tensor, got {describe(m)}"
                )
            keys = factor_names(spec, name, tuple(m.shape))
            if "lora_A" in keys:
                out[keys["lora_B"]], out[keys["lora_A"]] = pair(m)
                continue
            blocks = m.chunk(3)
            for blk in spec.qkv or ():
                out[keys[f"lora_B_{blk}"]], out[keys[f"lora_A_{blk}"]] = pair(
                    blocks[BLOCKS.index(blk)]
                )
    return out


def split(tree: Params) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(factors, rest)``: a module's tree after :func:`attach_`, split into factors and the rest.

    Example:
        >>> f, rest = split({"w": torch.zeros(1, 1), "w_lora_A": torch.ones(1, 1)})
        >>> list(f), list(rest)
        (['w_lora_A'], ['w'])
    """
    from robustft.peft._spec import is_factor

    t = check_tensor_tree("split", "tree", tree)
    factors = {k: v for k, v in t.items() if is_factor(k)}
    return factors, {k: v for k, v in t.items() if not is_factor(k)}


def size(factors: Params) -> int:
    """The number of elements of a factor tree (what an average of the factors stores).

    Example:
        >>> size({"w_lora_A": torch.ones(2, 8), "w_lora_B": torch.zeros(8, 2)})
        32
    """
    t = check_tensor_tree("size", "factors", factors)
    return sum(v.numel() for v in t.values())
