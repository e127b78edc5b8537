"""Post-hoc combinations of finished runs in weight space: WiSE-FT, soups, task-vector merges.

Where a method goes (STYLE "One home per idea"): averages *along* one run live in
:mod:`robustft.averaging`, constraints *around* the pre-trained weights in
:mod:`robustft.projections`, and combinations *across* finished trees here -- :func:`wise`
interpolates the pre-trained and a fine-tuned tree (WiSE-FT), :func:`uniform_soup` and
:func:`greedy_soup` average fine-tuned candidates (model soups), :func:`task_arithmetic`,
:func:`ties` and :func:`model_stock` merge task vectors (:func:`task_vector`, :func:`dare`),
:func:`depth_schedule` builds LiNeS per-tensor coefficients, :func:`fisher_merge` weights every entry by
its diagonal Fisher (:func:`fisher_diagonal`), and :func:`logit_ensemble` combines two models in
output space instead. The pre-trained side is always the
keyword-only ``anchor=``. Merges stream their ``candidates`` (a list, a generator or
:func:`lazy`), holding one candidate at a time.
"""

from robustft._checks import keyword_hints
from robustft.merging._dare import dare
from robustft.merging._depth import depth_schedule
from robustft.merging._ensemble import logit_ensemble
from robustft.merging._fisher import fisher_diagonal, fisher_merge
from robustft.merging._model_stock import model_stock
from robustft.merging._soups import greedy_soup, uniform_soup
from robustft.merging._stream import lazy
from robustft.merging._task_vectors import task_arithmetic, task_vector
from robustft.merging._ties import ties
from robustft.merging._wise import wise

__all__ = [
    "dare",
    "depth_schedule",
    "fisher_diagonal",
    "fisher_merge",
    "greedy_soup",
    "lazy",
    "logit_ensemble",
    "model_stock",
    "task_arithmetic",
    "task_vector",
    "ties",
    "uniform_soup",
    "wise",
]

keyword_hints(
    globals(),
    [
        "fisher_merge",
        "logit_ensemble",
        "model_stock",
        "task_arithmetic",
        "task_vector",
        "ties",
        "wise",
    ],
)
