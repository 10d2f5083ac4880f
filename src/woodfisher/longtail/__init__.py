"""What compression breaks: memorization, the long tail and the examples compressed models lose.

Dam et al. ("Understanding the Effect of the Long Tail on Neural Network Compression", arXiv
2306.06238) ask whether the inputs on which a compressed model disagrees with the full one are
the memorized examples of Feldman's long-tail theory. This subpackage measures it:

* :func:`memorization`: Feldman & Zhang's subsampled memorization and influence estimates
  (parallel, resumable);
* :func:`self_influence` and :func:`proxy_scores`: cheap proxies (ours: ``g_iᵀF⁻¹g_i`` with the
  WoodFisher inverse; the diagonal Fisher, the gradient norm, loss and margin) and
  :func:`rank_agreement` against the estimate;
* :func:`mismatch_analysis`: disagreement, compression-identified exemplars (Hooker et al.),
  memorization-binned mismatch rates, tests, a margin-controlled regression, a dense-reseed
  control and per-class recall changes;
* :mod:`woodfisher.longtail.report`: tables, JSON, plots and an image grid.
"""

from woodfisher.longtail.memorization import (
    MEMORIZATION_DEFAULTS,
    Memorization,
    estimate,
    memorization,
)
from woodfisher.longtail.mismatch import (
    MEMORIZATION_BINS,
    analyze_predictions,
    disagreement_frequency,
    exemplars,
    mismatch_analysis,
    modal,
    predict,
)
from woodfisher.longtail.proxies import (
    SELF_INFLUENCE_METHODS,
    margins,
    proxy_scores,
    rank_agreement,
    self_influence,
    self_influences,
)

__all__ = [
    # memorization estimate
    "MEMORIZATION_DEFAULTS",
    "Memorization",
    "estimate",
    "memorization",
    # proxies
    "SELF_INFLUENCE_METHODS",
    "margins",
    "proxy_scores",
    "rank_agreement",
    "self_influence",
    "self_influences",
    # mismatches
    "MEMORIZATION_BINS",
    "analyze_predictions",
    "disagreement_frequency",
    "exemplars",
    "mismatch_analysis",
    "modal",
    "predict",
]
