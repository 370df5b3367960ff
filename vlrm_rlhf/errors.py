"""The package's common error base: every error a user can cause derives from ``VLRMError``.

The CLI catches this one class (and prints one line naming the culprit) instead of listing each module's errors.
"""

from __future__ import annotations


class VLRMError(Exception):
    """Base of every error the package raises for bad input, bad configuration or a refused operation."""
