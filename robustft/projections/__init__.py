"""Post-hoc moves in weight space between the pre-trained and the fine-tuned model.

:func:`wise` interpolates (WiSE-FT); :func:`l2_ball` and :func:`mars_ball` project every tensor
onto a ball around the pre-trained weights; :func:`tpgm` learns those balls' radii on held-out
data (TPGM). All take and return parameter trees (``dict(model.named_parameters())``), never
mutate their inputs, are branch-free and differentiable, and work on sharded (FSDP2 ``DTensor``)
trees with global norms.
"""

from robustft.projections._balls import l2_ball, mars_ball
from robustft.projections._tpgm import tpgm
from robustft.projections._wise import wise

__all__ = ["l2_ball", "mars_ball", "tpgm", "wise"]
