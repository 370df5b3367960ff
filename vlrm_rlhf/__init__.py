"""vlrm-rlhf: vision-language RLHF with merged rewards (a TRL add-on).

Importing the package registers the VLRM classes with ``AutoModelForSequenceClassification``.
``reward_funcs`` / ``VLRMReward`` (TRL reward functions) load lazily, so importing the package does not
import TRL.
"""

from typing import Any

from .merge import build, parse_recipe
from .models import modeling  # noqa: F401  (registers VLRM classes)

__version__ = "0.1.0"
__all__ = ["VLRMReward", "build", "parse_recipe", "reward_funcs", "__version__"]


def __getattr__(name: str) -> Any:
    """Lazy exports: ``reward_funcs`` and ``VLRMReward`` live in ``vlrm_rlhf.reward.trl``."""
    if name in ("reward_funcs", "VLRMReward"):
        from .reward import trl

        return getattr(trl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
