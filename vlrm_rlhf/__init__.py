"""vlrm-rlhf: vision-language RLHF with merged rewards (a TRL add-on).

Importing the package registers the VLRM classes with ``AutoModelForSequenceClassification``.
"""

from . import reward  # noqa: F401  (registers VLRM classes)
from .merge import build, parse_recipe

__version__ = "0.1.0"
__all__ = ["build", "parse_recipe", "__version__"]
