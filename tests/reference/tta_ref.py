"""Plain transcriptions of the TPT, TDA and C-TPT functions robustft.tta reproduces.

Written from reading the authors' code (TPT: azshue/TPT ``tpt_classification.py``; TDA:
kdiAAA/TDA ``tda_runner.py`` and ``utils.py``) and C-TPT's paper, in our own words: the same
operations in the same order, on dict-of-lists caches, with the CUDA/half-precision casts left out
(everything stays in the input dtype) and one documented change -- the selection sorts stably,
where the authors' ``torch.argsort`` leaves ties unspecified.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def select_confident_samples(logits: Tensor, top: float) -> tuple[Tensor, Tensor]:
    """TPT: keep the ``int(N * top)`` views of lowest softmax entropy."""
    ent = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    idx = torch.argsort(ent, descending=False, stable=True)[: int(ent.size()[0] * top)]
    return logits[idx], idx


def avg_entropy(outputs: Tensor) -> Tensor:
    """TPT: entropy of the mean softmax over views, through log-mean-exp of log-probabilities."""
    logp = outputs - outputs.logsumexp(dim=-1, keepdim=True)
    avg = logp.logsumexp(dim=0) - math.log(logp.shape[0])
    avg = torch.clamp(avg, min=torch.finfo(avg.dtype).min)
    return -(avg * torch.exp(avg)).sum(dim=-1)


def softmax_entropy(x: Tensor) -> Tensor:
    """TDA ``utils.softmax_entropy``: per-row entropy."""
    return -(x.softmax(1) * x.log_softmax(1)).sum(1)


def summarise(logits: Tensor) -> tuple[Tensor, Tensor, int]:
    """TDA ``get_clip_logits`` after the features: (loss, prob_map, pred) of one sample.

    ``logits`` are ``[views, classes]`` (already the selected views) or ``[1, classes]``.
    """
    if logits.size(0) > 1:
        loss = avg_entropy(logits)
        prob_map = logits.softmax(1).mean(0).unsqueeze(0)
        pred = int(logits.mean(0).argmax())
    else:
        loss = softmax_entropy(logits)
        prob_map = logits.softmax(1)
        pred = int(logits.argmax())
    return loss, prob_map, pred


def get_entropy(loss: Tensor, num_classes: int) -> float:
    """TDA ``utils.get_entropy``: nats divided by log2 of the class count."""
    return float(loss / math.log2(num_classes))


def update_cache(cache: dict, pred: int, item: list, shot_capacity: int) -> None:
    """TDA ``update_cache``: append while there is room, else overwrite the worst entry if its
    loss is strictly larger; keep each class's list sorted (stably) by loss."""
    if pred in cache:
        if len(cache[pred]) < shot_capacity:
            cache[pred].append(item)
        elif item[1] < cache[pred][-1][1]:
            cache[pred][-1] = item
        cache[pred] = sorted(cache[pred], key=lambda entry: entry[1])
    else:
        cache[pred] = [item]


def compute_cache_logits(
    image_features: Tensor,
    cache: dict,
    alpha: float,
    beta: float,
    num_classes: int,
    neg_mask_thresholds: tuple[float, float] | None = None,
) -> Tensor:
    """TDA ``compute_cache_logits``: affinity-weighted class (or negative-mask) values."""
    keys, values = [], []
    for class_index in sorted(cache.keys()):
        for item in cache[class_index]:
            keys.append(item[0])
            values.append(item[2] if neg_mask_thresholds else class_index)
    cache_keys = torch.cat(keys, dim=0).permute(1, 0)
    if neg_mask_thresholds:
        vals = torch.cat(values, dim=0)
        lo, hi = neg_mask_thresholds
        cache_values = ((vals > lo) & (vals < hi)).to(image_features.dtype)
    else:
        idx = torch.tensor(values, dtype=torch.int64)
        cache_values = F.one_hot(idx, num_classes=num_classes).to(image_features.dtype)
    affinity = image_features @ cache_keys
    return alpha * (((-1) * (beta - beta * affinity)).exp() @ cache_values)


def tda_step(
    pos_cache: dict,
    neg_cache: dict,
    features: Tensor,
    logits: Tensor,
    cfg: dict,
) -> None:
    """One sample of TDA's ``run_test_tda``: update the positive then the negative cache.

    ``features`` ``[1, dim]``; ``logits`` ``[views, classes]``; ``cfg`` holds the settings.
    """
    num_classes = logits.shape[1]
    loss, prob_map, pred = summarise(logits)
    prop_entropy = get_entropy(loss, num_classes)
    if cfg["shots_pos"] > 0:
        update_cache(pos_cache, pred, [features, loss], cfg["shots_pos"])
    lo, hi = cfg["entropy_bounds"]
    if cfg["shots_neg"] > 0 and lo < prop_entropy < hi:
        update_cache(neg_cache, pred, [features, loss, prob_map], cfg["shots_neg"])


def tda_logits(pos_cache: dict, neg_cache: dict, features: Tensor, cfg: dict, c: int) -> Tensor:
    """TDA's adjustment to CLIP's logits: positive cache logits minus negative cache logits."""
    out = torch.zeros(features.shape[0], c, dtype=features.dtype)
    if pos_cache:
        out = out + compute_cache_logits(features, pos_cache, cfg["alpha_pos"], cfg["beta_pos"], c)
    if neg_cache:
        out = out - compute_cache_logits(
            features, neg_cache, cfg["alpha_neg"], cfg["beta_neg"], c, cfg["mask_bounds"]
        )
    return out


def text_dispersion(text_features: Tensor) -> float:
    """C-TPT's ATFD from the paper: mean L2 distance of the normalised class features to their
    centroid, with explicit loops."""
    rows = [t / math.sqrt(float((t * t).sum())) for t in text_features]
    centroid = sum(rows) / len(rows)
    return sum(math.sqrt(float(((r - centroid) ** 2).sum())) for r in rows) / len(rows)
