"""Per-sample out-of-distribution scores: **higher = more likely in-distribution** (a known class).

From logits: :func:`msp`, :func:`max_logit`, :func:`energy` (the negative energy),
:func:`entropy_score` (the negative entropy). From CLIP features: :func:`mcm`. Each reduces the
class axis, ``[batch, classes]`` → ``[batch]``, works under ``torch.func`` and ``torch.compile``,
and feeds :func:`robustft.metrics.auroc`, :func:`robustft.metrics.fpr_at_tpr` and
:func:`robustft.metrics.open_set`.
"""

from robustft.scores._logit_scores import energy, entropy_score, max_logit, msp
from robustft.scores._mcm import mcm

__all__ = ["energy", "entropy_score", "max_logit", "mcm", "msp"]
