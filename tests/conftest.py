"""Shared pytest fixtures.

``zoo``: a session-scoped factory of tiny related checkpoints (see ``vlrm_rlhf.testing.zoo``),
``zoo(family, layout="transformers", **build_trio_kwargs) -> {"base", "lvlm", "rm", "llm"}``,
each distinct argument set built once per session.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Before any test module imports torch: tiny models run ~20x faster on 1 thread than on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, Path]]:
    """Build (once per argument set) and return the directories of a family's trio."""
    from vlrm_rlhf.testing.zoo import build_trio

    cache: dict[tuple, dict[str, Path]] = {}

    def get(family: str, layout: str = "transformers", **kw: Any) -> dict[str, Path]:
        key = (family, layout, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"zoo-{family}-{layout}")
            cache[key] = build_trio(family, out, layout=layout, **kw)
        return dict(cache[key])

    return get
