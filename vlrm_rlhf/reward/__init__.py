"""Rewards: VLRM model classes (registered with the Auto classes on import)."""

from . import modeling  # noqa: F401
