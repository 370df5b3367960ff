"""Best-of-N with a reward model: online (sample N from a policy, keep the best) and offline reranking.

``best_of_n`` samples N candidates per prompt from a policy LVLM, scores them with a ``VLRewardScorer``
(``score_candidates``: the images and the prompt are encoded once for all N) and keeps the argmax.

``rerank_records`` / ``bon_metrics`` evaluate a reward model as a best-of-N selector on the best-of-n format
published with the paper (arXiv 2502.13487): one JSON object per question with ``responses`` (N sampled
answers) and ``correctness`` (their graded accuracy). The paper reports Pass@1, Pass@N, Random and RM accuracy.

Ties: an argmax over tied scores is a coin flip that the paper's ``np.argmax`` silently resolved to the lowest
index, which biases RM accuracy towards Pass@1 for a reward model that gives many candidates the same score
(duplicate answers always do). Here a tie counts as the *expected* correctness of a uniformly random pick among
the tied candidates; ``tie_rate`` and ``rm_accuracy_first`` (the paper's convention) are reported beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .reward.inputs import InputError, confine_image_path, image_roots, load_image, make_sample
from .reward.records import RecordError

log = logging.getLogger(__name__)

__all__ = ["BestOfN", "RecordError", "best_of_n", "bon_metrics", "check_record", "find_row_image", "prompt_seed",
           "rerank_records", "score_bon_rows", "tied_indices"]

TieBreak = Literal["first", "random"]


@dataclass
class BestOfN:
    """The outcome for one prompt: the chosen candidate and everything needed to audit the choice.

    ``scores[i]`` is the reward of ``candidates[i]`` (``-inf`` for an empty candidate, which cannot be scored);
    ``tied`` lists every index whose score equals the best one (length > 1 means the choice was a tie-break).
    """

    best: str
    best_index: int
    candidates: list[str]
    scores: list[float]
    tied: list[int] = field(default_factory=list)
    judge_calls: int = 0  # pairwise judge prompts run for this choice (0 for a reward model)


def prompt_seed(seed: int, index: int) -> int:
    """A 63-bit seed for prompt ``index`` of a run seeded with ``seed``: stable across runs and platforms."""
    digest = hashlib.blake2b(f"vlrm-rlhf/bon/{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def tied_indices(scores: Sequence[float]) -> list[int]:
    """Indices of the maximal score (exact equality: identical texts get bit-identical scores here)."""
    if not scores:
        raise ValueError("no scores")
    best = max(scores)
    return [i for i, s in enumerate(scores) if s == best]


# ------------------------------------------------------------------------------------------------ online
def best_of_n(
    policy: Any,
    processor: Any,
    scorer: Any,
    conversations: Sequence[Any],
    images: Sequence[Any] | None = None,
    n: int = 8,
    *,
    seed: int | None = None,
    tie_break: TieBreak = "first",
    pairwise: Literal["knockout", "round_robin"] = "knockout",
    **generation_kwargs: Any,
) -> list[BestOfN]:
    """Sample ``n`` responses per prompt from ``policy``, score them with ``scorer`` and keep the best.

    ``conversations[i]`` is a prompt: a string or chat messages (TRL conversational format, image blocks may
    carry their image); ``images[i]`` its images (None, one image, or a list; PIL or paths). Each prompt is
    rendered with the processor's chat template (generation prompt added) and encoded once; ``generate`` is
    called with ``num_return_sequences=n`` so the image encoder runs once per prompt. Sampling defaults to
    ``do_sample=True`` and ``max_new_tokens=128``; ``generation_kwargs`` override. With ``seed``, prompt ``i`` is
    sampled under ``torch.manual_seed(prompt_seed(seed, i))`` inside a forked RNG (the global RNG is left
    untouched), so results are reproducible and do not depend on the other prompts (a hash, not ``seed + i``:
    consecutive seeds would otherwise replay each other's streams shifted by one prompt).

    Only the new tokens are decoded (special tokens skipped, whitespace stripped). Candidates are scored with
    ``scorer.score_candidates`` (shared image+prompt prefix encoded once); identical texts are scored once, so
    they tie exactly. An empty candidate cannot be scored and gets ``-inf``. Ties for the best score are broken
    by ``tie_break`` ("first": lowest index, deterministic; "random": uniformly, seeded by ``prompt_seed(seed, i)``) and
    reported in ``BestOfN.tied`` and one logged warning with the count of tied prompts. Without ``seed`` sampling
    uses (and advances) the global torch RNG.

    A pairwise generative judge (``reward.generative.GenerativeJudge`` with ``mode: pairwise``) as ``scorer``
    picks by ``pairwise`` = ``knockout`` (n - 1 matches) or ``round_robin`` (all pairs); ``scores`` are then each
    candidate's points and ``judge_calls`` the judge prompts run.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if tie_break not in ("first", "random"):
        raise ValueError(f"tie_break must be 'first' or 'random', not {tie_break!r}")
    if images is not None and len(images) != len(conversations):
        raise InputError(f"{len(images)} image entries for {len(conversations)} prompts")
    tok = getattr(processor, "tokenizer", processor)
    gen = {"do_sample": True, **generation_kwargs, "num_return_sequences": n}
    gcfg = getattr(policy, "generation_config", None)
    if "max_new_tokens" not in gen and "max_length" not in gen and getattr(gcfg, "max_new_tokens", None) is None:
        gen["max_new_tokens"] = 128
    if "pad_token_id" not in gen and getattr(gcfg, "pad_token_id", None) is None:
        gen["pad_token_id"] = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(policy.parameters()).device
    results: list[BestOfN] = []
    for i, conv in enumerate(conversations):
        sample = make_sample(conv, None, images[i] if images is not None else None, i)
        enc = _encode_prompt(processor, sample.messages, sample.images, device)
        prompt_len = int(enc["input_ids"].shape[1])
        # seeded: a private RNG stream per prompt (forked, so the caller's RNG is untouched); unseeded: the
        # global RNG, advanced as usual (forking there would replay the same samples on every call)
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if seed is not None \
            else contextlib.nullcontext()
        with rng, torch.no_grad():
            if seed is not None:
                torch.manual_seed(prompt_seed(seed, i))
            out = policy.generate(**enc, **gen)
        candidates = [t.strip() for t in tok.batch_decode(out[:, prompt_len:], skip_special_tokens=True)]
        config = getattr(scorer, "config", None)
        if getattr(config, "mode", None) == "pairwise":
            sel = scorer.select(sample.text_of("user"), candidates, sample.images, strategy=pairwise)
            tied = [j for j, p in enumerate(sel.points) if p == sel.points[sel.best_index]]
            results.append(BestOfN(candidates[sel.best_index], sel.best_index, candidates, sel.points,
                                   tied if pairwise == "round_robin" else [sel.best_index], sel.calls))
            continue
        scores = score_unique(scorer, sample.messages, candidates, sample.images)
        tied = tied_indices(scores)
        if tie_break == "first" or len(tied) == 1:
            pick = tied[0]
        else:
            pick = (random.Random(prompt_seed(seed, i)) if seed is not None else random).choice(tied)
        results.append(BestOfN(candidates[pick], pick, candidates, scores, tied))
    n_tied = sum(len(r.tied) > 1 for r in results)
    if n_tied:
        log.warning("best_of_n: %d of %d prompts had tied best scores; broken by tie_break=%r",
                    n_tied, len(results), tie_break)
    return results


def _encode_prompt(processor: Any, messages: list[dict], images: list, device: torch.device) -> dict[str, Any]:
    """Model inputs for one prompt with its generation prompt, rendered as the scorer renders (fixed date)."""
    from .reward.scorer import render_chat

    owner = processor if getattr(processor, "chat_template", None) is not None else getattr(processor, "tokenizer", processor)
    if getattr(owner, "chat_template", None) is not None:
        text = render_chat(owner, messages, generation_prompt=True)
        special = False  # the template writes BOS itself where the model wants one (as apply_chat_template does)
    else:
        text = "\n".join(" ".join(b["text"] for b in m["content"] if b.get("type") == "text") for m in messages)
        special = True
    if images:
        enc = processor(text=[text], images=[list(images)], return_tensors="pt", add_special_tokens=special)
    else:
        enc = getattr(processor, "tokenizer", processor)(text=[text], return_tensors="pt", add_special_tokens=special)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in dict(enc).items()}


def score_unique(scorer: Any, prompt: Any, candidates: list[str], images: list) -> list[float]:
    """Scores of the candidates, each distinct non-empty text scored once (``-inf`` for empty ones)."""
    unique = list(dict.fromkeys(c for c in candidates if c))
    if not unique:
        return [-math.inf] * len(candidates)
    got = dict(zip(unique, scorer.score_candidates(prompt, unique, list(images) or None), strict=True))
    return [float(got[c]) if c else -math.inf for c in candidates]


# ----------------------------------------------------------------------------------------------- offline
def bon_metrics(correctness_lists: Sequence[Sequence[float]], score_lists: Sequence[Sequence[float]]) -> dict[str, Any]:
    """The paper's best-of-N metrics, in percent, for rows of candidate correctness and reward scores.

    * ``pass@1``: correctness of the first candidate (one sample from the policy);
    * ``pass@n``: best correctness among the N candidates (an oracle selector, the upper bound);
    * ``random``: mean correctness (a uniformly random pick, the expected value of a useless RM);
    * ``rm_accuracy``: correctness of the reward model's argmax. A tie in the argmax counts as the *expected*
      correctness over the tied set (mean of their correctness), i.e. a uniformly random tie-break, not the
      lowest index that the paper's ``np.argmax`` silently took; that convention is ``rm_accuracy_first``.

    Also: ``n`` (candidates per row, must be the same for every row), ``count`` (rows) and ``tie_rate``
    (percent of rows whose argmax is tied). NaN or infinite correctness, NaN scores, or rows of unequal length
    raise ``RecordError``.
    """
    if len(correctness_lists) != len(score_lists):
        raise RecordError(f"{len(correctness_lists)} correctness rows but {len(score_lists)} score rows")
    if not correctness_lists:
        raise RecordError("no rows to evaluate")
    ns = set()
    p1 = pn = rnd = acc = first = ties = 0.0
    for i, (c, s) in enumerate(zip(correctness_lists, score_lists, strict=True)):
        c, s = [float(x) for x in c], [float(x) for x in s]
        if not c or len(c) != len(s):
            raise RecordError(f"row {i}: {len(c)} correctness values for {len(s)} scores")
        if any(not math.isfinite(x) for x in c):
            raise RecordError(f"row {i}: non-finite correctness {c}")
        if any(math.isnan(x) for x in s):
            raise RecordError(f"row {i}: NaN score {s}")
        ns.add(len(c))
        tied = tied_indices(s)
        p1 += c[0]
        pn += max(c)
        rnd += sum(c) / len(c)
        acc += sum(c[j] for j in tied) / len(tied)
        first += c[tied[0]]
        ties += len(tied) > 1
    if len(ns) > 1:
        raise RecordError(f"rows have different numbers of candidates {sorted(ns)}: Pass@N needs one N "
                          "(evaluate the first n of each row)")
    k = len(correctness_lists)
    return {"pass@1": 100 * p1 / k, "pass@n": 100 * pn / k, "random": 100 * rnd / k, "rm_accuracy": 100 * acc / k,
            "rm_accuracy_first": 100 * first / k, "tie_rate": 100 * ties / k, "n": ns.pop(), "count": k}


def _row_name(i: int, rec: Mapping[str, Any]) -> str:
    return f"row {i}" + (f" (id {rec['id']})" if isinstance(rec, Mapping) and "id" in rec else "")


def check_record(i: int, rec: Any, n: int | None = None, where: str | None = None) -> tuple[list[str], list[float]]:
    """The first ``n`` responses and correctness of a best-of-n record, validated.

    Errors name the row as ``where`` (default ``row i (id ...)``).
    """
    if not isinstance(rec, Mapping):
        raise RecordError(f"{where or f'row {i}'}: expected a JSON object, got {type(rec).__name__}")
    where = where or _row_name(i, rec)
    for key in ("responses", "correctness"):
        if not isinstance(rec.get(key), list):
            raise RecordError(f"{where}: missing list field {key!r}")
    resp, corr = rec["responses"], rec["correctness"]
    if len(resp) != len(corr):
        raise RecordError(f"{where}: {len(resp)} responses but {len(corr)} correctness values")
    if n is not None:
        if len(resp) < n:
            raise RecordError(f"{where}: {len(resp)} responses, fewer than n={n}")
        resp, corr = resp[:n], corr[:n]
    if not resp:
        raise RecordError(f"{where}: no responses")
    if not all(isinstance(r, str) for r in resp):
        raise RecordError(f"{where}: responses must be strings")
    try:
        corr = [float(x) for x in corr]
    except (TypeError, ValueError) as e:
        raise RecordError(f"{where}: correctness must be numbers ({e})") from None
    return list(resp), corr


def rerank_records(
    records: Iterable[Mapping[str, Any]],
    scorer_fn: Callable[[Mapping[str, Any], list[str]], Sequence[float]],
    n: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score every record's responses and compute the best-of-N metrics (see ``bon_metrics``).

    ``scorer_fn(record, responses)`` returns one reward per response (``responses``: the record's first ``n``,
    or all of them). Returns copies of the records with ``"scores"`` added (covering the first ``n`` responses;
    other fields untouched) and the metrics. Scorer ``InputError``s are re-raised naming the row.
    """
    rows: list[dict[str, Any]] = []
    corr_lists, score_lists = [], []
    for i, rec in enumerate(records):
        resp, corr = check_record(i, rec, n)
        try:
            scores = [float(x) for x in scorer_fn(rec, resp)]
        except RecordError:
            raise
        except InputError as e:
            raise RecordError(f"{_row_name(i, rec)}: {e}") from e
        if len(scores) != len(resp):
            raise RecordError(f"{_row_name(i, rec)}: the scorer returned {len(scores)} scores for {len(resp)} responses")
        rows.append({**rec, "scores": scores})
        corr_lists.append(corr)
        score_lists.append(scores)
    return rows, bon_metrics(corr_lists, score_lists)


# ------------------------------------------------------------------------------------------ files (CLI)
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")
TEXT_MODES = ("text_rm", "no_image")  # modes that never look at the images


def find_row_image(rec: Mapping[str, Any], where: str, base_dir: Path, images_dir: Path | None,
                   image_key: str = "id", images_root: Sequence[Path] = ()) -> Path | None:
    """A best-of-n row's image file: its ``image`` path (relative to ``base_dir``, the input file's folder),
    else ``{images_dir}/{rec[image_key]}`` with a .jpg/.png/.jpeg suffix; None when neither applies.

    The file must resolve (after symlinks) inside ``base_dir``, ``images_dir`` or an ``images_root`` folder."""
    roots = image_roots(base_dir, images_dir, extra=images_root)

    def confined(p: Path, shown: Any) -> Path:
        try:
            return confine_image_path(p, shown, roots)
        except InputError as e:
            raise RecordError(f"{where}: {e}") from None

    if rec.get("image"):
        p = Path(rec["image"])
        p = confined(p if p.is_absolute() else base_dir / p, rec["image"])
        if not p.is_file():
            raise RecordError(f"{where}: image file not found: {p}")
        return p
    if images_dir is None:
        return None
    if rec.get(image_key) is None:
        raise RecordError(f"{where}: no {image_key!r} field to find its image in {images_dir} (see --image-key)")
    tried = [confined(images_dir / f"{rec[image_key]}{s}", f"{images_dir / str(rec[image_key])}{s}")
             for s in IMAGE_SUFFIXES]
    for p in tried:
        if p.is_file():
            return p
    raise RecordError(f"{where}: image file not found: {tried[0]} (also tried {', '.join(p.suffix for p in tried[1:])})")


def score_bon_rows(
    scorer: Any,
    records: Sequence[Mapping[str, Any]],
    image_paths: Sequence[Path | None],
    *,
    n: int | None = None,
    batch_size: int = 8,
    names: Sequence[str] | None = None,
) -> list[list[float]]:
    """Rewards of every row's (first ``n``) responses to its ``input`` with its image, if any.

    A row with an image is scored alone with ``scorer.score_candidates`` (image + prompt encoded once for its
    candidates). Rows without an image are scored ``batch_size`` rows per ``scorer.score`` call (the scorer
    micro-batches under its token budget). Within a row each distinct response is scored once, so duplicates
    tie exactly. ``InputError``s are re-raised naming the row (``names[i]``, default ``row i``).
    """
    names = list(names) if names is not None else [_row_name(i, r) for i, r in enumerate(records)]
    out: list[list[float] | None] = [None] * len(records)
    pending: list[int] = []

    def prompt_of(i: int) -> Any:
        p = records[i].get("input")
        if not isinstance(p, str | list) or not p:
            raise RecordError(f"{names[i]}: missing prompt field 'input'")
        return p

    def flush() -> None:
        if not pending:
            return
        uniq = {i: list(dict.fromkeys(check_record(i, records[i], n, names[i])[0])) for i in pending}
        prompts = [prompt_of(i) for i in pending for _ in uniq[i]]
        responses = [r for i in pending for r in uniq[i]]
        try:
            flat = scorer.score(prompts=prompts, responses=responses)
        except InputError as e:  # re-run row by row to name the culprit
            for i in pending:
                try:
                    scorer.score(prompts=[prompt_of(i)] * len(uniq[i]), responses=uniq[i])
                except InputError as e2:
                    raise RecordError(f"{names[i]}: {e2}") from e2
            raise RecordError(str(e)) from e
        it = iter(flat)
        for i in pending:
            got = {r: float(next(it)) for r in uniq[i]}
            out[i] = [got[r] for r in check_record(i, records[i], n, names[i])[0]]
        pending.clear()

    for i, (rec, path) in enumerate(zip(records, image_paths, strict=True)):
        resp = check_record(i, rec, n, names[i])[0]
        if path is None:
            pending.append(i)
            if len(pending) >= batch_size:
                flush()
            continue
        uniq = list(dict.fromkeys(resp))
        try:
            image = load_image(path)
            got = dict(zip(uniq, scorer.score_candidates(prompt_of(i), uniq, [image]), strict=True))
        except RecordError:
            raise
        except InputError as e:
            raise RecordError(f"{names[i]}: {e}") from e
        out[i] = [float(got[r]) for r in resp]
    flush()
    assert all(s is not None for s in out)
    return out  # type: ignore[return-value]
