r"""TDA's training-free dynamic adapter as a functional state: fixed-capacity positive/negative caches."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from robustft._checks import (
    check_device,
    check_dtype,
    check_floating,
    check_int,
    check_number,
    describe,
)
from robustft._numerics import compute_dtype, full_precision
from robustft.tta._tpt import _marginal
from robustft.typing import Device

__all__ = ["Tda", "TdaState", "tda"]

Settings = dict[str, object]


class TdaState(NamedTuple):
    r"""State of :func:`tda`: two fixed-capacity caches of (feature, entropy) per predicted class.

    Entries of each class are sorted by increasing entropy (ties: the older entry first, as the
    authors' stable ``sorted``); slots past a class's count are empty (zero features, entropy
    ``+inf``, zero probabilities) and contribute nothing. Every field is a tensor except
    ``settings``, so ``torch.save(state, f)``/``torch.load(f)`` (``weights_only=True``; importing
    :mod:`robustft.tta` registers the class) resume an online run exactly.

    Attributes:
        pos_keys: ``[classes, shots_pos, dim]`` cached features of the positive cache.
        pos_entropy: ``[classes, shots_pos]`` their prediction entropies (nats).
        pos_count: ``[classes]`` int64 fill counts, at most ``shots_pos``.
        neg_keys: ``[classes, shots_neg, dim]`` cached features of the negative cache.
        neg_entropy: ``[classes, shots_neg]`` their entropies.
        neg_probs: ``[classes, shots_neg, classes]`` their predicted probabilities (the
            authors' ``prob_map``), masked into negative pseudo-labels when read.
        neg_count: ``[classes]`` int64 fill counts, at most ``shots_neg``.
        settings: the settings of the :func:`tda` that made the state; another :func:`tda`
            refuses it.

    >>> state = tda().init(4, 8)
    >>> tuple(state.pos_keys.shape), tuple(state.neg_probs.shape), int(state.pos_count.sum())
    ((4, 3, 8), (4, 2, 4), 0)
    """

    pos_keys: Tensor
    pos_entropy: Tensor
    pos_count: Tensor
    neg_keys: Tensor
    neg_entropy: Tensor
    neg_probs: Tensor
    neg_count: Tensor
    settings: dict[str, object]


torch.serialization.add_safe_globals([TdaState])


class Tda(NamedTuple):
    """TDA as three functions over a :class:`TdaState` and no hidden state (see :func:`tda`).

    Attributes:
        init: ``(classes, dim, *, dtype=torch.float32, device=None) -> state``, empty caches.
        update: ``(state, features, logits) -> state``, pure: fold in one test sample.
        logits: ``(state, features) -> [batch, classes]``, the cache logits to add to CLIP's.
    """

    init: Callable[..., TdaState]
    update: Callable[[TdaState, Tensor, Tensor], TdaState]
    logits: Callable[[TdaState, Tensor], Tensor]


def _describe(settings: object) -> str:
    if not isinstance(settings, dict) or settings.get("kind") != "tda":
        return f"unknown settings {describe(settings)}"
    return "tda(" + ", ".join(f"{k}={v!r}" for k, v in settings.items() if k != "kind") + ")"


def _bounds(fn: str, name: str, value: Any, low: float | None = None) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{fn}: {name} must be a (lower, upper) pair, got {describe(value)}")
    lo = check_number(fn, f"{name}[0]", value[0], low=low, finite=False)
    hi = check_number(fn, f"{name}[1]", value[1], low=low, finite=False)
    if not lo < hi:
        raise ValueError(f"{fn}: {name} must have lower < upper, got {tuple(value)!r}")
    return lo, hi


def _check_state(fn: str, state: Any, settings: Settings) -> TdaState:
    if not isinstance(state, TdaState):
        raise TypeError(
            f"{fn}: state must be the TdaState returned by init or a previous update, got "
            f"{type(state).__name__}"
        )
    if state.settings != settings:
        raise ValueError(
            f"{fn}: state was made by {_describe(state.settings)}, but this cache is "
            f"{_describe(settings)}; resume with the settings the state was made with"
        )
    k, c = state.pos_keys, state.neg_probs
    ok = all(isinstance(t, Tensor) for t in state[:7]) and k.ndim == 3 and c.ndim == 3
    if ok:
        n, sp, d = k.shape
        sn = c.shape[1]
        want = [
            (state.pos_entropy, (n, sp)),
            (state.pos_count, (n,)),
            (state.neg_keys, (n, sn, d)),
            (state.neg_entropy, (n, sn)),
            (state.neg_probs, (n, sn, n)),
            (state.neg_count, (n,)),
        ]
        ok = all(tuple(t.shape) == s for t, s in want)
        ok = ok and sp == settings["shots_pos"] and sn == settings["shots_neg"]
        ok = ok and state.pos_count.dtype == state.neg_count.dtype == torch.int64
    if not ok:
        raise TypeError(
            f"{fn}: state must be the TdaState returned by init or a previous update, got "
            "fields of inconsistent shapes or dtypes"
        )
    return state


def _insert(
    keys: Tensor,
    entropy: Tensor,
    count: Tensor,
    feature: Tensor,
    h: Tensor,
    k: Tensor,
    gate: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Branch-free insertion of ``(feature, h)`` into class ``k``'s sorted row, if ``gate``.

    The authors append (or, when full, overwrite the worst entry if strictly better) and then sort
    stably by entropy; that is inserting at ``j`` = the number of entries with entropy ``<= h``
    and dropping what falls past the capacity (``j = shots``: no change).
    """
    shots = entropy.shape[1]
    pos = torch.arange(shots, device=entropy.device)
    index = k.reshape(1)
    row_e, n = entropy.index_select(0, index)[0], count.index_select(0, index)[0]
    j = ((row_e <= h) & (pos < n)).sum()
    j = torch.where(gate, j, shots)
    src = (pos - (pos > j).long()).clamp_min(0)
    at = pos == j
    new_e = torch.where(at, h.to(entropy.dtype), row_e[src])
    new_k = torch.where(at[:, None], feature, keys.index_select(0, index)[0][src])
    new_n = torch.where(gate & (j < shots), (n + 1).clamp_max(shots), n)
    return (
        keys.index_copy(0, index, new_k[None]),
        entropy.index_copy(0, index, new_e[None]),
        count.index_copy(0, index, new_n.reshape(1)),
    )


def _cache_weights(features: Tensor, keys: Tensor, beta: float) -> Tensor:
    """``exp(-(β - β A))`` for the affinities ``A = f · k`` of every cache slot, ``[b, C, S]``."""
    affinity = torch.einsum("bd,csd->bcs", features, keys)
    return ((-1) * (beta - beta * affinity)).exp()


def tda(
    *,
    shots_pos: int = 3,
    shots_neg: int = 2,
    alpha_pos: float = 2.0,
    beta_pos: float = 5.0,
    alpha_neg: float = 0.117,
    beta_neg: float = 1.0,
    entropy_bounds: tuple[float, float] = (0.2, 0.5),
    mask_bounds: tuple[float, float] = (0.03, 1.0),
) -> Tda:
    r"""TDA: a training-free dynamic adapter of positive and negative feature caches (functional).

    For a test feature :math:`f` (``[dim]``, as the driver computes it) the cache logits are

    .. math::

        \Delta(f) = \alpha_+\, \exp\!\big(-(\beta_+ - \beta_+ f K_+^\top)\big)\, Y_+
        \;-\; \alpha_-\, \exp\!\big(-(\beta_- - \beta_- f K_-^\top)\big)\, Y_-,

    added to CLIP's logits (:math:`\text{final} = z + \Delta(f)`). :math:`K_\pm` are the cached
    features, :math:`Y_+` the one-hot of the class each positive entry is cached under, and
    :math:`Y_-` the negative pseudo-labels :math:`[\ell < p_{jk} < u]` of the cached
    probabilities :math:`p_j` (``mask_bounds`` :math:`(\ell, u)`). Both caches key entries by the
    predicted class :math:`\hat y = \arg\max_k \bar z_k` and keep, per class, the ``shots``
    entries of lowest prediction entropy :math:`H` (nats): a new sample enters while the class
    has room, and otherwise replaces the worst entry only if its entropy is strictly lower. The
    negative cache takes only samples with
    :math:`\text{lower} < H / \log_2 C < \text{upper}` (``entropy_bounds``; the authors divide
    nats by :math:`\log_2 C`, so this ratio lies in :math:`[0, \ln 2]`).

    ``update(state, features, logits)`` folds in **one** test sample: ``features`` ``[dim]`` and
    its ``logits`` ``[classes]``, or ``[views, classes]`` for the selected views of an augmented
    sample (then :math:`H` is their :func:`marginal_entropy`, the probabilities their mean
    softmax and :math:`\hat y` the argmax of their mean logits, as the authors' ImageNet path).
    Features are used as given, not normalised: the authors pass L2-normalised image features,
    and for augmented samples the *mean* of the selected views' normalised features, which they
    do not renormalise. Per sample the cost is O(cache) (the pure update copies the caches), with
    no host synchronisation and no Python branch on values. ``logits(state, features)`` reads the
    caches for ``[dim]`` or ``[batch, dim]`` features. The authors' loop per test sample:
    update the positive, then the negative cache, then read the logits (the sample itself
    included). Empty caches give :math:`\Delta = 0`. Ties for the argmax go to the lowest class
    index (the authors' ``topk`` leaves them unspecified). ``shots = 0`` disables a cache.

    Defaults are the authors' ImageNet configuration (``configs/imagenet.yaml``: positive
    ``shot_capacity 3, alpha 2.0, beta 5.0``; negative ``shot_capacity 2, alpha 0.117,
    beta 1.0, entropy_threshold (0.2, 0.5), mask_threshold (0.03, 1.0)``); the per-data-set files
    change mostly ``alpha_pos``/``beta_pos``.

    Args:
        shots_pos: positive cache capacity per class, an int >= 0.
        shots_neg: negative cache capacity per class, an int >= 0.
        alpha_pos: :math:`\alpha_+ \ge 0`, finite.
        beta_pos: :math:`\beta_+ \ge 0`, finite.
        alpha_neg: :math:`\alpha_- \ge 0`, finite.
        beta_neg: :math:`\beta_- \ge 0`, finite.
        entropy_bounds: ``(lower, upper)`` open interval of :math:`H/\log_2 C` admitted to the
            negative cache, ``lower < upper`` (infinite ends allowed).
        mask_bounds: ``(lower, upper)`` open interval of probabilities that count as negative
            pseudo-labels, ``lower < upper`` (infinite ends allowed).

    Returns:
        A :class:`Tda` ``(init, update, logits)``. ``init(classes, dim, *, dtype=torch.float32,
        device=None)`` needs ``classes >= 2`` and ``dim >= 1``; the caches are kept in ``dtype``
        (the stored features and entropies are rounded to it). ``logits`` returns
        ``[batch, classes]`` (``[classes]`` for ``[dim]`` features) in ``compute_dtype(features,
        state)``.

    Raises:
        TypeError: bad argument types here, at ``init`` (``classes``/``dim`` not ints, ``dtype``
            not floating) and at ``update``/``logits`` (non-floating tensors, a foreign or
            malformed state).
        ValueError: negative shots or weights, non-finite numbers, bounds with lower >= upper,
            ``classes < 2`` or ``dim < 1`` at ``init``; at ``update``/``logits`` a state made
            by another :func:`tda`, or features and logits whose sizes do not match the state.

    Example:
        >>> cache = tda(shots_pos=1, shots_neg=0, alpha_pos=1.0, beta_pos=0.0)
        >>> state = cache.init(2, 2, dtype=torch.float64)
        >>> state = cache.update(state, torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0]))
        >>> cache.logits(state, torch.tensor([0.0, 1.0]))  # β = 0: weight exp(0) on class 0
        tensor([1., 0.], dtype=torch.float64)

    References:
        Karmanov et al., "Efficient Test-Time Adaptation of Vision-Language Models", CVPR 2024.
        Code: https://github.com/kdiAAA/TDA (``tda_runner.py``: ``update_cache``,
        ``compute_cache_logits``, ``run_test_tda``; ``utils.py``: ``get_clip_logits``)
    """
    fn = "tda"
    sp = check_int(fn, "shots_pos", shots_pos, low=0)
    sn = check_int(fn, "shots_neg", shots_neg, low=0)
    ap = check_number(fn, "alpha_pos", alpha_pos, low=0.0)
    bp = check_number(fn, "beta_pos", beta_pos, low=0.0)
    an = check_number(fn, "alpha_neg", alpha_neg, low=0.0)
    bn = check_number(fn, "beta_neg", beta_neg, low=0.0)
    e_lo, e_hi = _bounds(fn, "entropy_bounds", entropy_bounds)
    m_lo, m_hi = _bounds(fn, "mask_bounds", mask_bounds)
    settings: Settings = {
        "kind": "tda",
        "shots_pos": sp,
        "shots_neg": sn,
        "alpha_pos": ap,
        "beta_pos": bp,
        "alpha_neg": an,
        "beta_neg": bn,
        "entropy_bounds": (e_lo, e_hi),
        "mask_bounds": (m_lo, m_hi),
    }

    def init(
        classes: int, dim: int, *, dtype: torch.dtype = torch.float32, device: Device = None
    ) -> TdaState:
        f = "tda.init"
        c = check_int(f, "classes", classes, low=2)
        d = check_int(f, "dim", dim, low=1)
        dt = check_dtype(f, "dtype", dtype)
        dev = check_device(f, "device", device)

        def zeros(*shape: int, fill: float = 0.0, dtype: torch.dtype = dt) -> Tensor:
            return torch.full(shape, fill, dtype=dtype, device=dev)

        return TdaState(
            zeros(c, sp, d),
            zeros(c, sp, fill=math.inf),
            zeros(c, dtype=torch.int64),
            zeros(c, sn, d),
            zeros(c, sn, fill=math.inf),
            zeros(c, sn, c),
            zeros(c, dtype=torch.int64),
            dict(settings),
        )

    def update(state: TdaState, features: Tensor, logits: Tensor) -> TdaState:
        f = "tda.update"
        _check_state(f, state, settings)
        c, _, d = state.pos_keys.shape
        check_floating(f, "features", features, ndim=1)
        check_floating(f, "logits", logits, ndim=(1, 2))
        if features.shape[0] != d:
            raise ValueError(
                f"{f}: features must have shape [dim] = [{d}] (the state's), got shape "
                f"{tuple(features.shape)}"
            )
        if logits.shape[-1] != c or logits.shape[0] == 0:
            raise ValueError(
                f"{f}: logits must have shape [classes] or [views, classes] with classes = {c} "
                f"(the state's) and at least one view, got shape {tuple(logits.shape)}"
            )
        dt = state.pos_keys.dtype
        with torch.no_grad(), full_precision(logits):
            z = logits.detach().to(compute_dtype(logits)).reshape(-1, c)  # [views, classes]
            h = _marginal(z)
            probs = torch.softmax(z, dim=-1).mean(0)
            k = torch.argmax(z.mean(0))
            feature = features.detach().to(dt)
            always = torch.ones((), dtype=torch.bool, device=h.device)
            pk, pe, pc = _insert(
                state.pos_keys, state.pos_entropy, state.pos_count, feature, h, k, always
            )
            ratio = h / math.log2(c)
            gate = (e_lo < ratio) & (ratio < e_hi)
            nk, ne, nc = _insert(
                state.neg_keys, state.neg_entropy, state.neg_count, feature, h, k, gate
            )
            # the probabilities move with their keys: the same insertion, as keys of width C
            npr, _, _ = _insert(
                state.neg_probs, state.neg_entropy, state.neg_count, probs.to(dt), h, k, gate
            )
        return TdaState(pk, pe, pc, nk, ne, npr, nc, state.settings)

    def read(state: TdaState, features: Tensor) -> Tensor:
        f = "tda.logits"
        _check_state(f, state, settings)
        check_floating(f, "features", features, ndim=(1, 2))
        d = state.pos_keys.shape[2]
        if features.shape[-1] != d:
            raise ValueError(
                f"{f}: features must have shape [dim] or [batch, dim] with dim = {d} (the "
                f"state's), got shape {tuple(features.shape)}"
            )
        dtype = compute_dtype(features, state.pos_keys)
        with torch.no_grad(), full_precision(features, state.pos_keys):
            x = features.detach().to(dtype).reshape(-1, d)
            c = state.pos_keys.shape[0]
            filled_p = torch.arange(sp, device=x.device) < state.pos_count[:, None]
            w_pos = _cache_weights(x, state.pos_keys.to(dtype), bp) * filled_p
            pos = ap * w_pos.sum(-1)  # the one-hot values of class-keyed entries
            filled_n = torch.arange(sn, device=x.device) < state.neg_count[:, None]
            w_neg = _cache_weights(x, state.neg_keys.to(dtype), bn).reshape(x.shape[0], c * sn)
            probs = state.neg_probs.to(dtype)
            mask = (probs > m_lo) & (probs < m_hi) & filled_n[:, :, None]
            neg = an * (w_neg @ mask.to(dtype).reshape(c * sn, c))
            out = pos - neg
        return out if features.ndim == 2 else out[0]

    return Tda(init, update, read)
