"""A generative judge as a GRPO/RLOO reward function (TRL's ``reward_funcs`` protocol).

Pointwise judge: the reward is the judge's score of (prompt + images, completion). Pairwise judge: the reward
is the share of votes the completion wins against the dataset's reference answer (``reference_column``; a tie
vote counts half), in [0, 1]. A completion whose judge output never parses gets ``None`` (TRL ignores it) and
is counted in ``unparsed`` (and logged as ``<name>/unparsed`` when TRL passes ``log_metric``).

The judge runs where its model is, in each process on its own completions: no lockstep across ranks, so do not
shard it with DeepSpeed ZeRO-3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .generative import GenerativeJudge, JudgeConfigError
from .inputs import InputError, Sample, make_sample

__all__ = ["JudgeReward"]


class JudgeReward:
    """``f(prompts=, completions=, **columns) -> list[float | None]`` backed by a ``GenerativeJudge``."""

    def __init__(self, judge: GenerativeJudge, *, name: str | None = None, reference_column: str | None = None):
        mode = judge.config.mode
        if mode == "pairwise" and not reference_column:
            raise JudgeConfigError("a pairwise judge as a reward needs reference_column= (the dataset's reference answer)")
        if mode == "pointwise" and reference_column:
            raise JudgeConfigError("reference_column= is only used with a pairwise judge")
        self.judge, self.reference_column = judge, reference_column
        self.__name__ = name or f"judge_{mode}"
        self.unparsed = 0
        self.calls = 0

    @classmethod
    def from_pretrained(cls, path: str | Path, config: Any, *, name: str | None = None,
                        reference_column: str | None = None, **judge_kw: Any) -> JudgeReward:
        """A reward from a generative LVLM directory and a judge YAML (or ``JudgeConfig``)."""
        return cls(GenerativeJudge.from_pretrained(path, config, **judge_kw), name=name,
                   reference_column=reference_column)

    def __repr__(self) -> str:
        return f"JudgeReward({self.__name__!r}, mode={self.judge.config.mode!r})"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                 trainer_state: Any = None, log_extra: Any = None,
                 log_metric: Callable[[str, float], None] | None = None, **columns: Any) -> list[float | None]:
        """One reward per completion; ``None`` where the judge's output never parsed."""
        if len(prompts) != len(completions):
            raise InputError(f"{len(prompts)} prompts for {len(completions)} completions")
        before = dict(self.judge.stats)
        samples = [self._sample(i, p, c, columns) for i, (p, c) in enumerate(zip(prompts, completions))]
        if self.reference_column is None:
            raw = self.judge.score_samples(samples)
        else:
            refs = columns.get(self.reference_column)
            if not isinstance(refs, list | tuple) or len(refs) != len(samples):
                raise InputError(f"{self.__name__}: the dataset needs a {self.reference_column!r} column "
                                 f"(one reference answer per prompt)")
            raw = []
            for s, ref in zip(samples, refs):
                v = self.judge.compare(s.text_of("user"), s.text_of("assistant"), str(ref), s.images)
                share = v.credit(0)
                raw.append(math.nan if share is None else share)
        out: list[float | None] = [x if math.isfinite(x) else None for x in raw]
        bad = sum(x is None for x in out)
        self.unparsed += bad
        self.calls += self.judge.stats["calls"] - before["calls"]
        if log_metric is not None:
            log_metric(f"{self.__name__}/unparsed", float(bad))
        return out

    def _sample(self, i: int, prompt: Any, completion: Any, columns: dict[str, Any]) -> Sample:
        """Sample i: prompt + completion with its images (inline image blocks win over the image column)."""
        def msgs(x: Any, role: str) -> Any:
            if isinstance(x, str):
                return [{"role": role, "content": x}]
            return [{**m, "content": [{k: v for k, v in b.items() if v is not None} if isinstance(b, dict) else b
                                      for b in m["content"]] if isinstance(m.get("content"), list) else m.get("content")}
                    for m in ([x] if isinstance(x, dict) else x)]
        messages = msgs(prompt, "user") + msgs(completion, "assistant")
        inline = any(isinstance(b, dict) and b.get("type") == "image" and b.get("image") is not None
                     for m in messages if isinstance(m.get("content"), list) for b in m["content"])
        images = None
        for key in ("images", "image"):
            col = columns.get(key)
            if not inline and isinstance(col, list | tuple) and i < len(col) and col[i] is not None:
                images = col[i]
                break
        return make_sample(messages, None, images, i)
