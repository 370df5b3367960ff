"""Generative judges (R1-Reward, LLaVA-Critic style): an LVLM that writes a verdict, configured by a YAML.

The YAML (``JudgeConfig.from_yaml``)::

    mode: pairwise                    # or pointwise
    template: "Question: {question}\\nAnswer 1: {response_a}\\nAnswer 2: {response_b}\\n..."
    parser: "<answer>(\\\\d)</answer>"  # a regex with one group; the LAST match in the output counts
    choices: ["1", "2"]               # pairwise: parsed values meaning response_a / response_b
    ties: ["0"]                       # pairwise: parsed values meaning a tie (optional)
    votes: 3                          # K sampled verdicts per prompt
    both_orders: true                 # pairwise: judge (a, b) and (b, a) to cancel position bias
    generation: {max_new_tokens: 256, do_sample: true, temperature: 0.7}
    # pointwise only: template with {question} and {response}; the parser's group is read as a number,
    # or the expected score from the logits of score tokens after ``answer_prefix``:
    score_tokens: {"1": 1, "2": 2, "3": 3}
    answer_prefix: "Score: "

Pairwise verdicts count votes for each response over both orders; a tie vote is counted as a tie and an output
the parser cannot read is counted as ``unparsed``, never as a preference. Pointwise scores are the mean of the
parsed votes (NaN when none parses: counted, and TRL gets ``None``, which it ignores).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import VLRMError
from ..models.loading import pretrained
from .inputs import Sample, make_sample
from .scorer import render_chat

__all__ = ["GenerativeJudge", "JudgeConfig", "JudgeConfigError", "PairVerdict", "Selection"]


class JudgeConfigError(VLRMError, ValueError):
    """A judge YAML or setting that cannot work; the message names the key (and the file)."""


@dataclass
class JudgeConfig:
    """What a generative judge is asked and how its answer is read (see the module docstring)."""

    mode: Literal["pairwise", "pointwise"]
    template: str
    parser: str = ""
    choices: tuple[str, str] = ("1", "2")
    ties: tuple[str, ...] = ()
    votes: int = 1
    both_orders: bool = True
    generation: dict[str, Any] = field(default_factory=dict)
    score_tokens: dict[str, float] | None = None
    answer_prefix: str = ""
    system: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("pairwise", "pointwise"):
            raise JudgeConfigError(f"mode must be pairwise or pointwise, not {self.mode!r}")
        fields = {"question", "response_a", "response_b"} if self.mode == "pairwise" else {"question", "response"}
        try:
            self.template.format(**{k: "x" for k in fields})
        except (KeyError, IndexError, ValueError) as e:
            raise JudgeConfigError(f"template: a {self.mode} template may use only "
                                   f"{', '.join('{' + k + '}' for k in sorted(fields))} ({e!r})") from None
        if self.votes < 1:
            raise JudgeConfigError(f"votes must be >= 1, got {self.votes}")
        if self.score_tokens is not None:
            if self.mode != "pointwise" or not self.score_tokens:
                raise JudgeConfigError("score_tokens: only for a pointwise judge, as a non-empty {token: value} map")
            self.score_tokens = {str(k): float(v) for k, v in self.score_tokens.items()}
        elif not self.parser:
            raise JudgeConfigError("parser: a regex with one group is required (or score_tokens, pointwise)")
        if self.parser:
            try:
                rx = re.compile(self.parser)
            except re.error as e:
                raise JudgeConfigError(f"parser: invalid regex {self.parser!r} ({e})") from None
            if rx.groups != 1:
                raise JudgeConfigError(f"parser: the regex needs exactly one group, {self.parser!r} has {rx.groups}")
        self.choices = tuple(str(c) for c in self.choices)  # type: ignore[assignment]
        if len(self.choices) != 2 or self.choices[0] == self.choices[1]:
            raise JudgeConfigError(f"choices: two distinct values, got {list(self.choices)}")
        self.ties = tuple(str(t) for t in self.ties)

    @classmethod
    def from_yaml(cls, path: str | Path) -> JudgeConfig:
        """Read a judge YAML; an unknown key, a bad value or an unreadable file is an error naming the file."""
        import yaml

        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise JudgeConfigError(f"{path}: cannot read judge config ({e})") from None
        if not isinstance(raw, dict):
            raise JudgeConfigError(f"{path}: expected a mapping of judge settings")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise JudgeConfigError(f"{path}: unknown key(s) {unknown} (known: {sorted(known)})")
        for key in ("mode", "template"):
            if key not in raw:
                raise JudgeConfigError(f"{path}: missing key {key!r}")
        try:
            return cls(**raw)
        except JudgeConfigError as e:
            raise JudgeConfigError(f"{path}: {e}") from None
        except (TypeError, ValueError) as e:
            raise JudgeConfigError(f"{path}: {e}") from None

    def parse(self, text: str) -> str | None:
        """The parser group of the last match in ``text`` (stripped), or None."""
        found = re.findall(self.parser, text)
        return str(found[-1]).strip() if found else None


@dataclass
class PairVerdict:
    """Votes of a pairwise judge on (a, b) over both orders: ``votes[0]`` for a, ``votes[1]`` for b."""

    votes: list[int]
    ties: int
    unparsed: int
    calls: int  # judge prompts run (each with K sampled outputs)
    outputs: list[str] = field(default_factory=list)

    @property
    def winner(self) -> int | None:
        """0 (a), 1 (b) or None (tied votes, or nothing parsed)."""
        a, b = self.votes
        return None if a == b else (0 if a > b else 1)

    def credit(self, index: int) -> float | None:
        """Share of the parsed votes won by response ``index`` (a tie vote counts half); None if none parsed."""
        n = sum(self.votes) + self.ties
        return None if n == 0 else (self.votes[index] + 0.5 * self.ties) / n


@dataclass
class Selection:
    """Best-of-n by a pairwise judge: the chosen index, each candidate's points and the judge prompts run."""

    best_index: int
    points: list[float]
    calls: int
    unparsed: int


class GenerativeJudge:
    """An LVLM judge driven by a ``JudgeConfig``: pairwise verdicts, pointwise scores, best-of-n selection.

    ``generate`` is the only method that samples; everything else is parsing and counting, so tests may replace
    it. ``stats`` counts judge prompts (``calls``), outputs (``outputs``) and unparsed outputs (``unparsed``).
    """

    def __init__(self, model, processor, config: JudgeConfig, *, device: str | torch.device | None = None):
        self.config = config
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self._owner = processor if getattr(processor, "chat_template", None) is not None else self.tokenizer
        if getattr(self._owner, "chat_template", None) is None:
            raise JudgeConfigError(f"the judge's processor ({type(processor).__name__}) has no chat template")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.stats = {"calls": 0, "outputs": 0, "unparsed": 0}
        self.score_ids: list[int] = []
        if config.score_tokens is not None:
            for t in config.score_tokens:
                ids = self.tokenizer(t, add_special_tokens=False)["input_ids"]
                if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
                    raise JudgeConfigError(f"score_tokens: {t!r} is not one known token for this tokenizer "
                                           f"({self.tokenizer.convert_ids_to_tokens(ids)})")
                self.score_ids.append(ids[0])

    @classmethod
    def from_pretrained(cls, path: str | Path, config: JudgeConfig | str | Path, *, device: str | None = None,
                        dtype: torch.dtype | None = None) -> GenerativeJudge:
        """Load a generative LVLM directory and a judge config (a ``JudgeConfig`` or a YAML path)."""
        from transformers import AutoModelForImageTextToText

        from ..models.processing import load_processor

        cfg = config if isinstance(config, JudgeConfig) else JudgeConfig.from_yaml(config)
        path = Path(path)
        if not (path / "config.json").is_file():
            raise JudgeConfigError(f"no config.json in judge model directory {path}")
        model = pretrained(AutoModelForImageTextToText, path, **({"dtype": dtype} if dtype else {}))
        return cls(model, load_processor(path), cfg, device=device)

    # ---- the model ------------------------------------------------------------------------------------
    def _messages(self, text: str, n_images: int) -> list[dict]:
        user = {"role": "user", "content": [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]}
        return ([{"role": "system", "content": [{"type": "text", "text": self.config.system}]}]
                if self.config.system else []) + [user]

    def _encode(self, text: str, images: list) -> dict[str, Any]:
        rendered = render_chat(self._owner, self._messages(text, len(images)), generation_prompt=True)
        rendered += self.config.answer_prefix
        kw = {"return_tensors": "pt", "add_special_tokens": False}
        enc = self.processor(text=[rendered], images=[list(images)], **kw) if images else self.tokenizer([rendered], **kw)
        dtype = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) if torch.is_tensor(v)
                else v for k, v in dict(enc).items()}

    @torch.no_grad()
    def generate(self, text: str, images: list) -> list[str]:
        """``votes`` sampled outputs of the judge for one prompt text (+ images), new tokens only."""
        enc = self._encode(text, images)
        gen = {"max_new_tokens": 256, **self.config.generation, "num_return_sequences": self.config.votes}
        if self.config.votes > 1:
            gen.setdefault("do_sample", True)
        gen.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        out = self.model.generate(**enc, **gen)
        n = int(enc["input_ids"].shape[1])
        return self.tokenizer.batch_decode(out[:, n:], skip_special_tokens=True)

    def _ask(self, text: str, images: list) -> list[str]:
        outs = list(self.generate(text, images))
        self.stats["calls"] += 1
        self.stats["outputs"] += len(outs)
        return outs

    # ---- pairwise -------------------------------------------------------------------------------------
    def compare(self, question: str, a: str, b: str, images: Sequence[Any] = ()) -> PairVerdict:
        """Votes for a vs b, from the order (a, b) and, with ``both_orders``, (b, a)."""
        cfg = self.config
        if cfg.mode != "pairwise":
            raise JudgeConfigError("compare needs a pairwise judge (mode: pairwise)")
        votes, ties, unparsed, calls, outputs = [0, 0], 0, 0, 0, []
        for swap in ((False, True) if cfg.both_orders else (False,)):
            first, second = (b, a) if swap else (a, b)
            texts = self._ask(cfg.template.format(question=question, response_a=first, response_b=second), list(images))
            calls += 1
            for t in texts:
                outputs.append(t)
                got = cfg.parse(t)
                if got is not None and got in cfg.ties:
                    ties += 1
                elif got is not None and got in cfg.choices:
                    k = cfg.choices.index(got)
                    votes[1 - k if swap else k] += 1
                else:
                    unparsed += 1
        self.stats["unparsed"] += unparsed
        return PairVerdict(votes, ties, unparsed, calls, outputs)

    def select(self, question: str, candidates: Sequence[str], images: Sequence[Any] = (),
               strategy: Literal["knockout", "round_robin"] = "knockout") -> Selection:
        """Best-of-n by pairwise verdicts. ``knockout``: neighbours meet, winners advance (n - 1 matches; a tied
        or unparsed match advances the lower index); ``round_robin``: every pair meets, points = share of votes
        won, the most points wins (lowest index on ties). ``calls``: judge prompts run."""
        if strategy not in ("knockout", "round_robin"):
            raise JudgeConfigError(f"strategy must be knockout or round_robin, not {strategy!r}")
        n = len(candidates)
        if n == 0:
            raise JudgeConfigError("select needs at least one candidate")
        points, calls, unparsed = [0.0] * n, 0, 0
        if strategy == "round_robin":
            for i in range(n):
                for j in range(i + 1, n):
                    v = self.compare(question, candidates[i], candidates[j], images)
                    calls, unparsed = calls + v.calls, unparsed + v.unparsed
                    share = v.credit(0)
                    points[i] += 0.5 if share is None else share
                    points[j] += 0.5 if share is None else 1 - share
            best = max(range(n), key=lambda i: (points[i], -i))
            return Selection(best, points, calls, unparsed)
        alive = list(range(n))
        while len(alive) > 1:
            nxt = []
            for k in range(0, len(alive) - 1, 2):
                i, j = alive[k], alive[k + 1]
                v = self.compare(question, candidates[i], candidates[j], images)
                calls, unparsed = calls + v.calls, unparsed + v.unparsed
                w = j if v.winner == 1 else i
                points[w] += 1
                nxt.append(w)
            if len(alive) % 2:
                nxt.append(alive[-1])
            alive = nxt
        return Selection(alive[0], points, calls, unparsed)

    # ---- pointwise ------------------------------------------------------------------------------------
    def score_samples(self, samples: list[Sample]) -> list[float]:
        """Pointwise scores of Samples (prompt + one assistant response): mean parsed vote, NaN if none parses,
        or the expected value of ``score_tokens`` under the next-token distribution."""
        cfg = self.config
        if cfg.mode != "pointwise":
            raise JudgeConfigError("score_samples needs a pointwise judge (mode: pointwise)")
        out = []
        for s in samples:
            text = cfg.template.format(question=s.text_of("user"), response=s.text_of("assistant"))
            out.append(self._expected(text, s.images) if cfg.score_tokens is not None else self._parsed(text, s.images))
        return out

    def score_candidates(self, prompt: Any, responses: Sequence[Any], images: Any = None) -> list[float]:
        """Pointwise scores of several responses to one prompt (best-of-n's scorer API)."""
        return self.score_samples([make_sample(prompt, r, images, i) for i, r in enumerate(responses)])

    def _parsed(self, text: str, images: list) -> float:
        values = []
        for t in self._ask(text, images):
            got = self.config.parse(t)
            try:
                v = float(got) if got is not None else math.nan
            except ValueError:
                v = math.nan
            if math.isfinite(v):
                values.append(v)
            else:
                self.stats["unparsed"] += 1
        return sum(values) / len(values) if values else math.nan

    @torch.no_grad()
    def _expected(self, text: str, images: list) -> float:
        enc = self._encode(text, images)
        self.stats["calls"] += 1
        logits = self.model(**enc, use_cache=False).logits[0, -1].float()
        p = logits[self.score_ids].softmax(-1)
        values = torch.tensor(list(self.config.score_tokens.values()), dtype=p.dtype, device=p.device)  # type: ignore[union-attr]
        return float((p * values).sum())
