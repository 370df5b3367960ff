"""Vocabulary-aware merging of embedding rows (``embed_tokens``, ``lm_head``): rows are matched by token string.

Rows whose token the base vocabulary has are merged by the method; rows only the LVLM has (image tokens,
padding rows) come from the LVLM; rows only a donor (RM/LLM) has come from that donor and are appended to
the output vocabulary. Pure index bookkeeping: no tensor I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import VLRMError

MIN_COVERAGE = 0.9


class VocabularyError(VLRMError, ValueError):
    """Tokenizers that cannot be merged row by row."""


@dataclass
class Vocab:
    """A model's token → id map (``None`` when the checkpoint ships no tokenizer)."""

    name: str
    ids: dict[str, int] | None

    @classmethod
    def from_tokenizer(cls, name: str, tok) -> Vocab:
        return cls(name, dict(tok.get_vocab()) if tok is not None else None)


@dataclass
class OutputVocab:
    """The merged model's vocabulary: the owner's (LVLM's) tokens plus tokens appended from donors."""

    tokens: dict[int, str]  # output id -> token string
    ids: dict[str, int]
    appended: list[tuple[str, str]] = field(default_factory=list)  # (token, donor name)
    by_index: bool = False  # no tokenizers: rows aligned by index


def build_output_vocab(owner: Vocab, base: Vocab, donors: list[Vocab]) -> OutputVocab:
    """Check compatibility and build the output vocabulary (owner's ids, donor-only tokens appended)."""
    allv = [owner, base, *donors]
    if any(v.ids is None for v in allv):
        return OutputVocab({}, {}, by_index=True)
    base_set = set(base.ids)
    for v in [owner, *donors]:
        cover = len(base_set & set(v.ids)) / max(1, len(base_set))
        if cover < MIN_COVERAGE:
            raise VocabularyError(
                f"tokenizer of {v.name} is incompatible with the base {base.name}: only {cover:.0%} of the base "
                "vocabulary appears in it (different tokenizer families?). Models must share the base's tokenizer."
            )
    ids = dict(owner.ids)
    appended = []
    next_id = max(ids.values(), default=-1) + 1
    for d in donors:
        for tok, _ in sorted(d.ids.items(), key=lambda kv: kv[1]):
            if tok not in ids:
                ids[tok] = next_id
                appended.append((tok, d.name))
                next_id += 1
    return OutputVocab({i: t for t, i in ids.items()}, ids, appended)


@dataclass
class RowPlan:
    """How each output row of one vocab tensor is made.

    ``merge_out`` rows are merged from ``merge_src[name]`` rows of each source; ``copies`` lists
    (source name, output rows, source rows) taken verbatim; rows in neither are zero.
    """

    out_rows: int
    merge_out: torch.Tensor
    merge_src: dict[str, torch.Tensor]
    copies: list[tuple[str, torch.Tensor, torch.Tensor]]

    def contiguous(self) -> bool:
        """True when merged rows are ``0..k-1`` in the output and in every source (views, no gathers)."""
        k = len(self.merge_out)
        ar = torch.arange(k)
        return all(torch.equal(r, ar) for r in [self.merge_out, *self.merge_src.values()])


def plan_rows(
    out: OutputVocab,
    rows: dict[str, int],
    vocabs: dict[str, Vocab],
    base: str,
    owner: str,
    merge_sources: list[str],
) -> RowPlan:
    """Plan one vocab tensor given each source's row count (``rows``; absent = source lacks the tensor)."""
    owner_rows = rows.get(owner, 0)
    if out.by_index:
        k = min(rows[s] for s in [base, *merge_sources])
        ar = torch.arange(k)
        copies = []
        if owner in rows and owner_rows > k:
            extra = torch.arange(k, owner_rows)
            copies.append((owner, extra, extra))
        return RowPlan(max(owner_rows, k), ar, {s: ar for s in merge_sources + [base]}, copies)
    n_out = max(owner_rows, 1 + max((out.ids[t] for t, _ in out.appended), default=-1))
    merge_out: list[int] = []
    merge_src: dict[str, list[int]] = {s: [] for s in dict.fromkeys([base, *merge_sources])}
    copies: dict[str, tuple[list[int], list[int]]] = {}
    base_ids = vocabs[base].ids or {}
    for r in range(n_out):
        tok = out.tokens.get(r)
        b = base_ids.get(tok) if tok is not None else None
        if b is not None and b < rows[base]:
            merge_out.append(r)
            for s in merge_src:
                i = vocabs[s].ids.get(tok)
                # a source missing this row contributes the base row, i.e. a zero task vector
                merge_src[s].append(i if i is not None and i < rows.get(s, 0) else -1 - b)
            continue
        src = None
        if tok is None:
            if r < owner_rows:
                src = (owner, r)
        else:
            for s in [owner, *[n for n in vocabs if n not in (owner, base)]]:
                i = vocabs[s].ids.get(tok) if vocabs[s].ids else None
                if s in rows and i is not None and i < rows[s]:
                    src = (s, i)
                    break
        if src is not None:
            copies.setdefault(src[0], ([], []))
            copies[src[0]][0].append(r)
            copies[src[0]][1].append(src[1])
    return RowPlan(
        n_out,
        torch.tensor(merge_out, dtype=torch.long),
        {s: torch.tensor(v, dtype=torch.long) for s, v in merge_src.items()},
        [(s, torch.tensor(o, dtype=torch.long), torch.tensor(i, dtype=torch.long)) for s, (o, i) in copies.items()],
    )


def gather_rows(tensor: torch.Tensor, rows: torch.Tensor, base_tensor: torch.Tensor) -> torch.Tensor:
    """Rows of ``tensor``; a negative entry ``-1 - b`` takes row ``b`` of the base instead."""
    if bool((rows >= 0).all()):
        return tensor.index_select(0, rows)
    out = base_tensor.index_select(0, torch.where(rows < 0, -1 - rows, 0))
    have = rows >= 0
    out[have] = tensor.index_select(0, rows[have])
    return out
