"""Layer analysis of LVLMs, LLMs and merged models (``vlrm-rlhf analyze params|ablate|swap|schedule``).

Submodules: ``tasks`` (multiple-choice task sets and their log-likelihood scoring), ``params`` (task-vector norms
and cosines per layer and module), ``ablate`` (knock a layer's attention/MLP out, measure the drop), ``swap``
(layer-swap curves: the first k layers from the LVLM, the rest merged), ``plots`` (heatmaps and curves),
``outputs`` (atomic output folders) and ``cli``. Kept import-free so the CLI stays fast to start.
"""

from ..errors import VLRMError


class AnalysisError(VLRMError, ValueError):
    """Inputs an analysis cannot use; the message names the model, tensor, file or option."""
