"""How far each input model is from the base: the sampled ‖θ − θ_base‖ / ‖θ_base‖ of every weight matrix, the
check behind ``build``'s "the base does not look like the common ancestor" warning.

A sample is at most 64 evenly spaced runs of 1024 elements, so a memory-mapped input is read at ~64 pages per
tensor, not whole; a windowed reader cuts the same runs from its windows (``sample_spans``).
"""

from __future__ import annotations

import torch

__all__ = ["ANCESTOR_WARN_RATIO", "Ancestry", "sample", "sample_spans", "tracked"]

ANCESTOR_WARN_RATIO = 0.5  # ‖τ‖/‖θ_base‖ above this: the base is probably not the models' common ancestor


def tracked(canon: str, base: torch.Tensor | None) -> bool:
    """Whether text tensor ``canon`` counts: a weight matrix with a base (embeddings and heads excluded)."""
    return base is not None and base.dim() >= 2 and not canon.startswith(("embed_tokens", "lm_head"))


def sample_spans(n: int, runs: int = 64, run: int = 1024) -> list[tuple[int, int]]:
    """The element ranges a sample of an ``n``-element tensor takes: all of it when small, else ``runs`` evenly
    spaced runs of ``run``."""
    if n <= runs * run:
        return [(0, n)]
    step = (n - run) // (runs - 1)
    return [(i * step, i * step + run) for i in range(runs)]


def sample(t: torch.Tensor) -> torch.Tensor:
    """The elements of ``t`` at ``sample_spans`` in float32."""
    f = t.reshape(-1)
    return torch.cat([f[a:b] for a, b in sample_spans(f.numel())]).float()


class Ancestry:
    """The sampled relative task-vector sizes recorded so far, per model."""

    def __init__(self) -> None:
        self._ratios: dict[str, list[float]] = {}  # input name -> sampled ‖τ‖/‖θ_base‖ per weight matrix

    def record(self, base_sample: torch.Tensor, srcs, samples: list[torch.Tensor]) -> None:
        """Add ‖τ‖/‖θ_base‖ of one weight matrix, from same-position float32 samples, for each model in ``srcs``."""
        bn = float(base_sample.norm())
        for s, smp in zip(srcs, samples, strict=True):
            if bn > 0:
                self._ratios.setdefault(s.name, []).append(float((smp - base_sample).norm()) / bn)

    def report(self) -> dict[str, float]:
        """Median over the weight matrices recorded so far of ‖θ_i − θ_base‖ / ‖θ_base‖ per model."""
        return {n: float(torch.tensor(r).median()) for n, r in self._ratios.items() if r}
