"""Merge engine: build a VLRM or a merged LVLM from Hugging Face checkpoints, streaming."""

from .engine import MergeError, MergePlan
from .executor import build
from .recipe import Recipe, RecipeError, parse_recipe

__all__ = ["MergeError", "MergePlan", "Recipe", "RecipeError", "build", "parse_recipe"]
