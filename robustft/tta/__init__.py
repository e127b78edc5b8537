"""Test-time adaptation primitives: TPT and C-TPT objectives, view stacks, TDA's caches.

Pure functions and one functional state, called from your own test-time loop; no open_clip here.

- TPT (episodic prompt tuning on one image): stack the original and the augmented views of an
  image with :func:`views`, run them through the model as **one** batch, and minimise
  :func:`tpt_loss` (the :func:`marginal_entropy` of the :func:`confident_views`) on the prompt;
  reset the prompt and optimiser before the next image.
- C-TPT: :func:`ctpt_loss` adds :math:`-\\lambda` times the :func:`text_dispersion` of the class
  text features (a signed objective: the dispersion is maximised).
- TDA (online, training-free): :func:`tda` returns ``(init, update, logits)`` over a
  :class:`TdaState` of fixed-capacity tensors (a checkpointable tree); ``init`` again is an
  episodic reset.
"""

from robustft.tta._tda import Tda, TdaState, tda
from robustft.tta._tpt import (
    confident_views,
    ctpt_loss,
    marginal_entropy,
    text_dispersion,
    tpt_loss,
    views,
)

__all__ = [
    "Tda",
    "TdaState",
    "confident_views",
    "ctpt_loss",
    "marginal_entropy",
    "tda",
    "text_dispersion",
    "tpt_loss",
    "views",
]
