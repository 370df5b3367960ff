"""The package's common error base: every error a user can cause derives from ``VLRMError``.

The CLI catches this one class (and prints one line naming the culprit) instead of listing each module's errors.
"""

from __future__ import annotations

from collections.abc import Iterable


class VLRMError(Exception):
    """Base of every error the package raises for bad input, bad configuration or a refused operation."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to a mistyped ``word``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
