"""Multiple-choice task sets for layer analysis, and their scoring by log-likelihood.

A task file is JSONL, one record per line::

    {"image": "img/0.png", "question": "What colour is the square?", "choices": ["red", "blue"], "answer": 0,
     "kind": "perception"}

``image`` is a path relative to the task file (or absolute, or null for a text-only question), ``answer`` the
index of the correct choice, ``kind`` ``perception`` or ``reasoning``. A model scores a record by the
log-likelihood of each choice as the assistant's response to ``user: [image, question]`` under its chat template
(``eval.judge.LVLMJudge``, kind ``loglik_sum``: end-of-turn tokens are not scored); the prediction is the argmax.
Metrics per kind: ``accuracy`` and ``logprob``, the mean log-probability of the correct choice among the choices
(``ll[answer] - logsumexp(ll)``), which moves smoothly where accuracy on a small set does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import VLRMError
from ..files import FileFormatError, read_jsonl

KINDS = ("perception", "reasoning")
METRICS = ("accuracy", "logprob")


class TaskError(VLRMError, ValueError):
    """A task file or record that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Task:
    """One multiple-choice question; ``image`` is an absolute path or None."""

    question: str
    choices: tuple[str, ...]
    answer: int
    kind: str
    image: Path | None = None
    where: str = ""


def parse_task(rec: object, where: str, base_dir: Path) -> Task:
    """Validate one record; image paths resolve against ``base_dir`` and must exist."""
    if not isinstance(rec, dict):
        raise TaskError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    unknown = set(rec) - {"image", "question", "choices", "answer", "kind", "id", "meta"}
    if unknown:
        raise TaskError(f"{where}: unknown key(s) {sorted(unknown)}; keys: image, question, choices, answer, kind, id, "
                        "meta (free-form)")
    q, choices, answer, kind = rec.get("question"), rec.get("choices"), rec.get("answer"), rec.get("kind")
    if not isinstance(q, str) or not q.strip():
        raise TaskError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise TaskError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
    if len(set(choices)) != len(choices):
        raise TaskError(f"{where}: 'choices' has duplicates: {choices}")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise TaskError(f"{where}: 'answer' must be the index of the correct choice (0..{len(choices) - 1}), got {answer!r}")
    if kind not in KINDS:
        raise TaskError(f"{where}: 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    image = rec.get("image")
    path = None
    if image is not None:
        if not isinstance(image, str):
            raise TaskError(f"{where}: 'image' must be a path string or null")
        path = Path(image) if Path(image).is_absolute() else base_dir / image
        if not path.is_file():
            raise TaskError(f"{where}: image file not found: {path}")
    return Task(q, tuple(choices), answer, kind, path, where)


def load_tasks(path: str | Path) -> list[Task]:
    """Read and validate a task JSONL file (blank lines skipped); errors name the line."""
    path = Path(path)
    try:
        lines = read_jsonl(path, what="task file")
    except FileFormatError as e:
        raise TaskError(str(e)) from None
    return [parse_task(rec, f"{path} line {n}", path.parent) for n, rec in lines]


@dataclass
class TaskScores:
    """Per-record, per-choice log-likelihoods and the per-kind metrics derived from them."""

    loglik: list[list[float]]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> {accuracy, logprob, n}


def metrics_of(tasks: Sequence[Task], loglik: Sequence[Sequence[float]]) -> dict[str, dict[str, float]]:
    """Accuracy (argmax, first index on ties) and mean log p(correct | choices) per kind, plus the count."""
    out: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        rows = [(t, ll) for t, ll in zip(tasks, loglik, strict=True) if t.kind == kind]
        if not rows:
            continue
        acc = sum(max(range(len(ll)), key=lambda j, ll=ll: ll[j]) == t.answer for t, ll in rows) / len(rows)
        lp = sum(ll[t.answer] - _logsumexp(ll) for t, ll in rows) / len(rows)
        out[kind] = {"accuracy": acc, "logprob": lp, "n": len(rows)}
    return out


def _logsumexp(xs: Sequence[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


class TaskScorer:
    """Scores task sets with an in-memory LVLM; reuses the judge's log-likelihood code."""

    def __init__(self, model, processor, *, batch_size: int = 16):
        from ..eval.judge import LVLMJudge

        self.judge = LVLMJudge(model, processor, kind="loglik_sum", batch_size=batch_size)
        self._images: dict[Path, Image.Image] = {}

    def _image(self, path: Path) -> Image.Image:
        if path not in self._images:
            with Image.open(path) as im:
                self._images[path] = im.convert("RGB")
        return self._images[path]

    def samples(self, tasks: Sequence[Task]) -> list:
        """One judge Sample per (task, choice), task-major."""
        from ..reward.inputs import Sample

        out = []
        for t in tasks:
            images = [self._image(t.image)] if t.image is not None else []
            user = [{"type": "image"}] * len(images) + [{"type": "text", "text": t.question}]
            for c in t.choices:
                msgs = [{"role": "user", "content": list(user)}, {"role": "assistant", "content": [{"type": "text", "text": c}]}]
                out.append(Sample(msgs, images))
        return out

    def score(self, tasks: Sequence[Task]) -> TaskScores:
        """Log-likelihood of every choice of every task, and the per-kind metrics."""
        lps = self.judge.response_logprobs(self.samples(tasks))
        it = iter(float(lp.sum()) for lp in lps)
        loglik = [[next(it) for _ in t.choices] for t in tasks]
        return TaskScores(loglik, metrics_of(tasks, loglik))
