"""vlrm-rlhf: vision-language RLHF with merged rewards (a TRL add-on).

Importing the package registers the VLRM classes with ``AutoModelForSequenceClassification``.
``reward_funcs`` / ``VLRMReward`` / ``EnsembleReward`` / ``ensemble_from_recipe`` (TRL reward functions) load
lazily, so importing the package does not import TRL.
"""

from typing import Any

from . import reward  # noqa: F401  (registers VLRM classes)
from .merge import build, parse_recipe

__version__ = "0.1.0"
__all__ = ["EnsembleReward", "VLRMReward", "build", "ensemble_from_recipe", "parse_recipe", "reward_funcs",
           "__version__"]


def __getattr__(name: str) -> Any:
    """Lazy exports: ``reward_funcs``/``VLRMReward`` (``reward.trl``), ``EnsembleReward`` (``reward.ensemble``),
    ``ensemble_from_recipe`` (``reward.ensemble_recipe``)."""
    if name in ("reward_funcs", "VLRMReward"):
        from .reward import trl as _trl

        return getattr(_trl, name)
    if name == "EnsembleReward":
        from .reward.ensemble import EnsembleReward

        return EnsembleReward
    if name == "ensemble_from_recipe":
        from .reward.ensemble_recipe import ensemble_from_recipe

        return ensemble_from_recipe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
