"""What a parameter-efficient update is: the :class:`Spec`, its factories and the factor names."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from robustft._checks import check_choice, check_int, check_number, describe
from robustft.tree import Where, select

__all__ = [
    "BLOCKS",
    "Spec",
    "Target",
    "adapter",
    "factor_names",
    "is_factor",
    "lora",
    "parse",
    "targets_of",
]

BLOCKS = ("q", "k", "v")
"""The row blocks of a fused attention in-projection ``[3d, d]``, in order (open_clip's
``nn.MultiheadAttention.in_proj_weight``: query rows, then key rows, then value rows)."""

SCALINGS = ("rank", "sqrt_rank")
_FACTOR = re.compile(
    r"^(?P<weight>.+)_(?P<part>lora_A|lora_B|adapter|adapter_A|adapter_B)(?:_(?P<block>[qkv]))?$"
)


@dataclass(frozen=True)
class Spec:
    r"""A parameter-efficient reparametrisation of some 2-d weights of a tree: LoRA or an adapter.

    Made by :func:`lora` or :func:`adapter`; every other :mod:`robustft.peft` function takes it
    first. It holds the hyper-parameters only; which weights carry factors is read from the
    factor tree itself (its keys name the weights, :func:`factor_names`), so one spec serves any
    model. Frozen and comparable: a resumed run or a loaded factor file is checked against it.

    Attributes:
        kind: ``"lora"`` (:math:`W + s\,BA`) or ``"adapter"`` (:math:`(I + W_{adp})\,W`).
        rank: :math:`r`, the inner dimension of the factors; ``None`` for a full-rank adapter.
        alpha: LoRA's :math:`\alpha` (the update is :math:`s\,BA` with :math:`s` from
            ``scaling``); 1 for adapters (rescale one with :func:`robustft.peft.rescale`).
        scaling: ``"rank"`` (:math:`s = \alpha/r`, Hu et al. and Hugging Face peft) or
            ``"sqrt_rank"`` (:math:`s = \alpha/\sqrt r`, rsLoRA and CLIP-LoRA's code).
        targets: the weights to reparametrise, in :data:`robustft.tree.Where` grammar (names,
            globs, a regex or a predicate), resolved against a tree by :func:`init`.
        qkv: for LoRA, the blocks of a fused attention in-projection (a weight whose name ends in
            ``in_proj_weight``) that get their own factors, as CLIP-LoRA's separate q/k/v
            ``Linear`` layers do; ``None`` factors the fused ``[3d, d]`` weight as one matrix.
        dropout: LoRA's dropout on the low-rank branch's input (CLIP-LoRA), applied by
            :func:`attach_` in training mode only; the tree functions ignore it.
        drop: the adapter-dropping probability :math:`p` (R-Adapter), applied by :func:`attach_`
            in training mode only; the tree functions ignore it.

    Example:
        >>> spec = lora(rank=4, alpha=8, targets="*attn.in_proj_weight", qkv=("q", "v"))
        >>> spec.kind, spec.scale, spec.qkv
        ('lora', 2.0, ('q', 'v'))
    """

    kind: str
    rank: int | None
    alpha: float
    scaling: str
    targets: Where
    qkv: tuple[str, ...] | None = None
    dropout: float = 0.0
    drop: float = 0.0

    @property
    def scale(self) -> float:
        r"""The factor :math:`s` of LoRA's update :math:`s\,BA` (1 for an adapter)."""
        if self.kind != "lora" or self.rank is None:
            return 1.0
        root = self.rank if self.scaling == "rank" else math.sqrt(self.rank)
        return self.alpha / root

    def metadata(self) -> dict[str, Any]:
        """The hyper-parameters as JSON-ready values (the targets are recorded separately, as the
        resolved weight names, since a pattern or predicate need not be serialisable)."""
        return {
            "kind": self.kind,
            "rank": self.rank,
            "alpha": self.alpha,
            "scaling": self.scaling,
            "qkv": list(self.qkv) if self.qkv is not None else None,
            "dropout": self.dropout,
            "drop": self.drop,
        }


def _check_targets(fn: str, targets: Any) -> Any:
    if targets is None or (isinstance(targets, (str, bytes)) and not targets):
        raise ValueError(
            f"{fn}: targets must name the weights to reparametrise (a name, a glob such as "
            f"'visual.*attn.in_proj_weight', a list of them, a regex or a predicate), got "
            f"{targets!r}"
        )
    return tuple(targets) if isinstance(targets, (list, set, frozenset)) else targets


def lora(
    *,
    rank: int,
    alpha: float,
    targets: Where,
    scaling: str = "rank",
    qkv: tuple[str, ...] | list[str] | None = None,
    dropout: float = 0.0,
) -> Spec:
    r"""LoRA: :math:`W' = W + s\,B A` on each target weight, :math:`B` ``[rows, r]``, :math:`A`
    ``[r, cols]``.

    .. math::

        W' = W + s\,BA, \qquad s = \alpha / r \ (\text{scaling="rank"}) \ \text{or}\
        \alpha/\sqrt r \ (\text{"sqrt\_rank"}),

    with :math:`B` zero-initialised (so :math:`W' = W` at the start) and :math:`A` drawn like a
    ``nn.Linear`` weight (:func:`init`). The update is layout-agnostic: it has the weight's shape,
    whichever of its axes is the input. With ``qkv`` a fused attention in-projection (a weight named
    ``...in_proj_weight`` with ``3d`` rows, open_clip's ``nn.MultiheadAttention``) gets one pair of
    factors per listed block — the update is ``cat([s B_q A_q, s B_k A_k, s B_v A_v])`` with zero
    blocks for the unlisted ones — which is CLIP-LoRA's q/k/v LoRA without replacing the attention
    module (Hugging Face peft cannot target this weight by name: its experimental
    ``nn.MultiheadAttention`` layer wraps the whole module, huggingface/peft#761).

    Args:
        rank: :math:`r \geq 1`.
        alpha: :math:`\alpha > 0`, finite.
        targets: the weights, in :data:`robustft.tree.Where` grammar; each must be 2-d.
        scaling: ``"rank"`` (the LoRA paper and Hugging Face peft) or ``"sqrt_rank"`` (rsLoRA;
            CLIP-LoRA's code uses it: ``scaling = lora_alpha / sqrt(r)``).
        qkv: a non-empty subset of ``("q", "k", "v")`` (CLIP-LoRA's default is all three), or
            ``None``.
        dropout: the branch-input dropout :math:`p \in [0, 1)` (CLIP-LoRA: 0.25); only
            :func:`attach_` applies it.

    Returns:
        The :class:`Spec`.

    Raises:
        TypeError: a non-int ``rank`` or a non-number ``alpha`` / ``dropout``.
        ValueError: ``rank < 1``, ``alpha`` not finite and > 0, an unknown ``scaling``, a bad
            ``qkv`` entry, ``dropout`` outside ``[0, 1)`` or no ``targets``.

    Example:
        >>> spec = lora(rank=4, alpha=8, targets="*.weight")
        >>> spec.scale
        2.0
        >>> lora(rank=4, alpha=8, targets="*.weight", scaling="sqrt_rank").scale
        4.0

    References:
        Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022
        (code: https://github.com/microsoft/LoRA); Kalajdzievski, "A Rank Stabilization Scaling
        Factor for Fine-Tuning with LoRA", 2023; Zanella and Ben Ayed, "Low-Rank Few-Shot
        Adaptation of Vision-Language Models", CVPRW 2024. Code:
        https://github.com/MaxZanella/CLIP-LoRA
    """
    fn = "lora"
    rank = check_int(fn, "rank", rank, low=1)
    alpha = check_number(fn, "alpha", alpha, low=0, low_inclusive=False)
    if not isinstance(scaling, str):
        raise TypeError(
            f"{fn}: scaling must be one of 'rank', 'sqrt_rank', got {describe(scaling)}"
        )
    check_choice(fn, "scaling", scaling, SCALINGS)
    blocks: tuple[str, ...] | None = None
    if qkv is not None:
        if isinstance(qkv, str) or not isinstance(qkv, (tuple, list)) or not qkv:
            raise ValueError(
                f"{fn}: qkv must be a non-empty tuple of blocks from ('q', 'k', 'v') or None, "
                f"got {qkv!r}"
            )
        bad = [b for b in qkv if b not in BLOCKS]
        if bad or len(set(qkv)) != len(qkv):
            raise ValueError(
                f"{fn}: qkv must list distinct blocks from ('q', 'k', 'v'), got {tuple(qkv)!r}"
            )
        blocks = tuple(b for b in BLOCKS if b in qkv)
    dropout = check_number(fn, "dropout", dropout, low=0, high=1, high_inclusive=False)
    return Spec("lora", rank, alpha, scaling, _check_targets(fn, targets), blocks, dropout, 0.0)


def adapter(*, targets: Where, rank: int | None = None, drop: float = 0.0) -> Spec:
    r"""R-Adapter's linear adapter after a layer, folded into it: :math:`W' = (I + W_{adp})\,W`.

    The adapter :math:`h(y) = y + W_{adp}\,y` on a layer's output :math:`y = Wx + b` has no
    nonlinearity, so it folds into the layer (re-parametrisation):

    .. math::

        W' = (I + W_{adp})\,W, \qquad b' = (I + W_{adp})\,b,

    :math:`W_{adp}` ``[rows, rows]`` zero-initialised (full rank, ``rank=None``, the paper's
    setting for full data) or :math:`W_{adp} = BA` with :math:`B` ``[rows, r]`` zero and :math:`A`
    ``[r, rows]`` drawn like a ``nn.Linear`` weight (the paper's few-shot variant). The paper
    writes it for row vectors, :math:`W_{org}(W_{adp} + I)`; targets here are weights in
    PyTorch's ``[out, in]`` layout (``nn.Linear``, ``out_proj``), whose bias — the tensor named
    like the weight with ``weight`` replaced by ``bias`` — is transformed too when the tree has it.
    R-Adapter places one after every attention block and every MLP of both towers, i.e. on
    ``attn.out_proj.weight`` and ``mlp.c_proj.weight``. The update is linear in
    :math:`W_{adp}`, so re-scaling it (:func:`rescale`) is exactly the paper's weight-space
    ensemble :math:`W_{org}(\alpha\tilde W_{adp} + I)`.

    Args:
        targets: the ``[out, in]`` weights, in :data:`robustft.tree.Where` grammar.
        rank: ``None`` (full-rank :math:`W_{adp}`) or :math:`r \geq 1`.
        drop: the adapter-dropping probability :math:`p \in [0, 1)` (R-Adapter: 0.2): in
            training each adapter is kept with probability :math:`1 - p` per forward and scaled by
            :math:`1/(1-p)`; only :func:`attach_` applies it.

    Returns:
        The :class:`Spec`.

    Raises:
        TypeError: a non-int ``rank`` or a non-number ``drop``.
        ValueError: ``rank < 1``, ``drop`` outside ``[0, 1)`` or no ``targets``.

    Example:
        >>> adapter(targets="*.c_proj.weight").rank is None
        True

    References:
        Kim et al., "Efficient and Versatile Robust Fine-Tuning of Zero-shot Models" (R-Adapter),
        ECCV 2024. Code: https://cvlab.postech.ac.kr/research/R-Adapter/
    """
    fn = "adapter"
    if rank is not None:
        rank = check_int(fn, "rank", rank, low=1)
    drop = check_number(fn, "drop", drop, low=0, high=1, high_inclusive=False)
    return Spec("adapter", rank, 1.0, "rank", _check_targets(fn, targets), None, 0.0, drop)


class Target:
    """One reparametrised weight of a factor tree: its name and its factor keys."""

    __slots__ = ("blocks", "keys", "weight")

    def __init__(self, weight: str, keys: dict[str, str], blocks: tuple[str, ...] | None):
        self.weight = weight
        self.keys = keys  # part (e.g. "lora_A", "lora_B_q", "adapter") -> factor key
        self.blocks = blocks


def is_factor(name: str) -> bool:
    """Whether ``name`` is a factor key (``<weight>_lora_A``, ``<weight>_adapter``, ...).

    Example:
        >>> is_factor("visual.transformer.resblocks.0.attn.in_proj_weight_lora_B_q")
        True
        >>> is_factor("visual.proj")
        False
    """
    return isinstance(name, str) and _FACTOR.match(name) is not None


def parse(name: str) -> tuple[str, str, str | None]:
    """``(weight, part, block)`` of a factor key; ``ValueError`` if it is not one."""
    m = _FACTOR.match(name)
    if m is None:
        raise ValueError(f"not a factor key: {name!r}")
    return m["weight"], m["part"], m["block"]


def _expected_parts(spec: Spec, fused: bool) -> list[str]:
    if spec.kind == "adapter":
        return ["adapter"] if spec.rank is None else ["adapter_A", "adapter_B"]
    if spec.qkv is not None and fused:
        return [f"lora_{x}_{b}" for b in spec.qkv for x in "AB"]
    return ["lora_A", "lora_B"]


def is_fused(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a weight is a fused attention in-projection (``...in_proj_weight``, ``3d`` rows)."""
    return name.endswith("in_proj_weight") and len(shape) == 2 and shape[0] % 3 == 0


def factor_names(spec: Spec, weight: str, shape: tuple[int, ...]) -> dict[str, str]:
    """The factor keys ``spec`` gives the weight ``weight`` of shape ``shape``, by part.

    Example:
        >>> sorted(factor_names(lora(rank=1, alpha=1, targets="w"), "w", (2, 3)).values())
        ['w_lora_A', 'w_lora_B']
    """
    fused = is_fused(weight, shape)
    return {part: f"{weight}_{part}" for part in _expected_parts(spec, fused)}


def resolve(fn: str, spec: Spec, params: Mapping[str, Tensor]) -> list[str]:
    """The target weight names of ``spec`` in ``params`` (every one 2-d and not a factor)."""
    try:
        chosen = list(select(params, spec.targets))
    except (TypeError, ValueError) as err:  # select's message, under this function's name
        raise type(err)(f"{fn}: spec.targets " + str(err).split(": where ", 1)[-1]) from None
    chosen = [k for k in chosen if not is_factor(k)]
    if not chosen:
        raise ValueError(
            f"{fn}: spec.targets must select at least one weight of params, got "
            f"{spec.targets!r}, which selects none of its {len(params)} tensor(s)"
        )
    bad = [k for k in chosen if params[k].ndim != 2]
    if bad:
        shapes = ", ".join(f"{k} {tuple(params[k].shape)}" for k in bad[:5])
        raise ValueError(
            f"{fn}: spec.targets must select 2-d weights only, got {len(bad)} other tensor(s): "
            f"{shapes}; narrow the pattern (e.g. '*.weight' also matches norm and bias vectors "
            "of some models; use '*attn.in_proj_weight' or '*mlp.c_fc.weight')"
        )
    if spec.kind == "adapter":
        square = [k for k in chosen if not k.endswith("weight")]
        if square:
            raise ValueError(
                f"{fn}: adapter targets must be [out, in] layer weights named '...weight' (their "
                f"bias is '...bias'), got {square[:5]}"
            )
    return chosen


def targets_of(fn: str, spec: Spec, factors: Mapping[str, Tensor]) -> list[Target]:
    """Group a factor tree's keys by weight, checking each weight has exactly its parts."""
    if not isinstance(spec, Spec):
        raise TypeError(
            f"{fn}: spec must be a robustft.peft.Spec (from lora() or adapter()), "
            f"got {describe(spec)}"
        )
    grouped: dict[str, dict[str, str]] = {}
    for key in factors:
        m = _FACTOR.match(key) if isinstance(key, str) else None
        if m is None:
            raise ValueError(
                f"{fn}: factors must hold factor tensors only (keys '<weight>_lora_A', "
                f"'<weight>_lora_B', '<weight>_adapter', ...), got key {key!r}"
            )
        part = m["part"] + (f"_{m['block']}" if m["block"] else "")
        grouped.setdefault(m["weight"], {})[part] = key
    if not grouped:
        raise ValueError(f"{fn}: factors must not be empty")
    out: list[Target] = []
    for weight, parts in grouped.items():
        blocks = tuple(b for b in BLOCKS if f"lora_A_{b}" in parts)
        fused = bool(blocks)
        want = _expected_parts(spec, fused)
        if sorted(parts) != sorted(want):
            raise ValueError(
                f"{fn}: factors of {weight!r} must be {sorted(want)} for a {spec.kind} spec "
                f"(rank {spec.rank}, qkv {spec.qkv}), got {sorted(parts)}"
            )
        out.append(Target(weight, parts, blocks or None))
    return out
