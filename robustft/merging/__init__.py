"""Post-hoc combinations of finished runs in weight space: WiSE-FT and model soups.

Where a method goes (STYLE "One home per idea"): averages *along* one run live in
:mod:`robustft.averaging`, constraints *around* the pre-trained weights in
:mod:`robustft.projections`, and combinations *across* finished trees here -- :func:`wise`
interpolates the pre-trained and a fine-tuned tree (WiSE-FT), :func:`uniform_soup` and
:func:`greedy_soup` average fine-tuned candidates (model soups). The pre-trained side is always the
keyword-only ``anchor=``.
"""

from robustft.merging._soups import greedy_soup, uniform_soup
from robustft.merging._wise import wise

__all__ = ["greedy_soup", "uniform_soup", "wise"]
