"""The demo's scorers and their preference accuracy on the ShapesWorld benchmark splits.

Baselines: the text RM given the question only (``text_rm``), the text RM given the gold description (an
oracle upper bound, ``text_rm_oracle``), the LVLM as a likelihood judge (``lvlm_judge``: the sum of the response's
token log-probabilities; the mean ranks pairs identically, since both answers of a pair have the same length by
construction), and the cascade
(LVLM caption → text RM). Every merge is scored with the image, and the best merge also without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..eval.prefs import flat_accuracy
from ..reward.inputs import Sample
from ..worlds.text import DESCRIPTION_PREFIX


class OracleDescriptionScorer:
    """Text RM that reads the gold four-word description in place of each image (an upper bound, not a method)."""

    def __init__(self, text_rm, descriptions: dict[int, str]):
        self.rm = text_rm
        self.descriptions = descriptions  # id(PIL image) -> description

    def score_samples(self, samples: list[Sample]) -> list[float]:
        out = []
        for s in samples:
            it = iter(s.images)
            msgs = [{**m, "content": [{"type": "text", "text": DESCRIPTION_PREFIX + self.descriptions[id(next(it))]}
                                      if b.get("type") == "image" else b for b in m["content"]]} for m in s.messages]
            out.append(Sample(msgs, []))
        return self.rm.score_samples(out)


def descriptions_by_image(records: Sequence[Any], raw_rows: Sequence[dict]) -> dict[int, str]:
    """Map each record's decoded image (by identity) to the description stored in the benchmark row."""
    by_id = {r["id"]: r["description"] for r in raw_rows}
    return {id(im): by_id[rec.id] for rec in records for im in rec.images}


def evaluate_all(scorers: dict[str, Callable[[], Any]], splits: dict[str, Sequence[Any]],
                 progress: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {scorer name: accuracies}} for lazily built scorers (each loaded once, then dropped)."""
    from tqdm.auto import tqdm

    out: dict[str, dict[str, dict[str, float]]] = {s: {} for s in splits}
    for name, make in tqdm(list(scorers.items()), desc="evaluate scorers", disable=not progress, leave=False):
        scorer = make()
        for split, recs in splits.items():
            out[split][name] = flat_accuracy(scorer, recs)
        del scorer
    return out


def scorer_factories(dirs: dict[str, Path], merges: dict[str, Path], descriptions: dict[int, str]) -> dict:
    """Name → zero-argument constructor for every scorer the demo reports."""
    from ..eval.judge import LVLMJudge
    from ..reward.scorer import VLRewardScorer

    f: dict[str, Callable[[], Any]] = {
        "text_rm": lambda: VLRewardScorer.from_pretrained(dirs["rm"], mode="text_rm"),
        "text_rm_oracle": lambda: OracleDescriptionScorer(VLRewardScorer.from_pretrained(dirs["rm"], mode="text_rm"),
                                                          descriptions),
        "lvlm_judge": lambda: LVLMJudge.from_pretrained(dirs["lvlm"], kind="loglik_sum"),
        "cascade": lambda: VLRewardScorer.from_pretrained(dirs["rm"], mode="cascade", lvlm=dirs["lvlm"]),
    }
    for name, d in merges.items():
        f[name] = (lambda d=d: VLRewardScorer.from_pretrained(d, mode="vlrm"))
    return f
