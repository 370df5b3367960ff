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
    min_rows: int = 0,
) -> RowPlan:
    """Plan one vocab tensor given each source's row count (``rows``; absent = source lacks the tensor).

    ``min_rows``: the output has at least this many rows (a config's ``vocab_size`` grown to hold appended ids)."""
    owner_rows = rows.get(owner, 0)
    if out.by_index:
        k = min(rows[s] for s in [base, *merge_sources])
        ar = torch.arange(k)
        copies = []
        if owner in rows and owner_rows > k:
            extra = torch.arange(k, owner_rows)
            copies.append((owner, extra, extra))
        return RowPlan(max(owner_rows, k), ar, {s: ar for s in merge_sources + [base]}, copies)
    n_out = max(owner_rows, 1 + max((out.ids[t] for t, _ in out.appended), default=-1), min_rows)
    # vectorised over output rows (a 128k vocabulary plans in milliseconds): each source's id of each row's token
    toks = [out.tokens.get(r) for r in range(n_out)]

    cache: dict[str, torch.Tensor] = {}

    def ids_in(name: str) -> torch.Tensor:
        if name not in cache:
            get = (vocabs[name].ids or {}).get
            cache[name] = torch.tensor([-1 if t is None else get(t, -1) for t in toks], dtype=torch.long)
        return cache[name]

    def valid(i: torch.Tensor, name: str) -> torch.Tensor:
        return (i >= 0) & (i < rows.get(name, 0))

    b = ids_in(base)
    merged = valid(b, base)
    merge_out = merged.nonzero().flatten()
    merge_src: dict[str, torch.Tensor] = {}
    for s in dict.fromkeys([base, *merge_sources]):
        i = (b if s == base else ids_in(s))[merge_out]
        # a source missing this row contributes the base row, i.e. a zero task vector
        merge_src[s] = torch.where(valid(i, s), i, -1 - b[merge_out])
    has_tok = torch.tensor([t is not None for t in toks], dtype=torch.bool)
    r = torch.arange(n_out)
    todo = ~merged
    found: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    untokened = todo & ~has_tok & (r < owner_rows)  # padding rows without a token: the owner's, by index
    if bool(untokened.any()):
        found.append((owner, r[untokened], r[untokened]))
    todo &= has_tok
    for s in [owner, *[n for n in vocabs if n not in (owner, base)]]:
        if s not in rows or not vocabs[s].ids or not bool(todo.any()):
            continue
        i = ids_in(s)
        take = todo & valid(i, s)
        if bool(take.any()):
            found.append((s, r[take], i[take]))
            todo &= ~take
    copies: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for s, o, i in found:
        copies.setdefault(s, ([], []))
        copies[s][0].append(o)
        copies[s][1].append(i)
    packed = []
    for s, (os_, is_) in copies.items():
        o, i = torch.cat(os_), torch.cat(is_)
        order = o.argsort()
        packed.append((s, o[order], i[order]))
    packed.sort(key=lambda c: int(c[1][0]))  # sources in order of their first output row
    return RowPlan(n_out, merge_out, merge_src, packed)


def gather_rows(tensor: torch.Tensor, rows: torch.Tensor, base_tensor: torch.Tensor) -> torch.Tensor:
    """Rows of ``tensor``; a negative entry ``-1 - b`` takes row ``b`` of the base instead.

    Inputs of different floating dtypes (an fp16 LVLM, a bf16 RM) give their common type (float32): exact."""
    if bool((rows >= 0).all()):
        return tensor.index_select(0, rows)
    dtype = torch.promote_types(tensor.dtype, base_tensor.dtype)
    out = base_tensor.index_select(0, torch.where(rows < 0, -1 - rows, 0)).to(dtype)
    have = rows >= 0
    out[have] = tensor.index_select(0, rows[have]).to(dtype)
    return out
