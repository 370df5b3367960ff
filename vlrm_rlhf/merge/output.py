"""Everything in a merged directory besides the weights: config, tokenizer/processor, recipe and model card."""

from __future__ import annotations

import platform
import shutil
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml
from pydantic_core import to_jsonable_python
from transformers import AutoConfig

from ..models.loading import load_tokenizer, pretrained

_SKIP = {"config.json", "README.md", "merge_recipe.yaml", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
_LIBS = ("vlrm-rlhf", "torch", "transformers", "safetensors", "huggingface_hub")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in _LIBS:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = "not installed"
    return out


def finalize_output(plan, out: Path, ancestry: Mapping[str, float] | None = None) -> None:
    """Write config, tokenizer/processor files (LVLM's, plus donor-only tokens), recipe and model card.

    ``ancestry``: ``MergeExecutor.ancestor_report()`` of the merge, for the model card (None: not measured)."""
    lv = plan.lvlm
    for f in sorted(Path(lv.name).iterdir()):
        if f.is_file() and f.name not in _SKIP and not f.name.endswith((".safetensors", ".bin")):
            if plan.recipe.output == "vlrm" and f.name == "generation_config.json":
                continue
            shutil.copy2(f, out / f.name)
    config = pretrained(AutoConfig, lv.name)
    text_cfg = config.get_text_config()
    text_cfg.vocab_size = plan.vocab_size  # grown so that appended ids and the pad id stay below it
    config.dtype = str(plan.out_dtype).removeprefix("torch.")

    tok = None
    if plan.out_vocab.appended or plan.recipe.output == "vlrm":
        tok = load_tokenizer(out, where=f"lvlm {lv.name}")  # None: the LVLM ships no tokenizer
    if tok is not None and plan.out_vocab.appended:
        added = tok.add_tokens([t for t, _ in plan.out_vocab.appended])
        if added != len(plan.out_vocab.appended) or any(
            tok.convert_tokens_to_ids(t) != plan.out_vocab.ids[t] for t, _ in plan.out_vocab.appended
        ):
            raise RuntimeError("appending donor-only tokens to the LVLM tokenizer gave unexpected ids")

    if plan.recipe.output == "vlrm":
        pad_str, pad_id = plan.pad_token, plan.pad_id  # the plan warned already when there is none
        if tok is not None and pad_str is not None and tok.pad_token != pad_str:
            tok.pad_token = pad_str
        config.architectures = [lv.ckpt.family.seq_cls]
        config.num_labels = 1
        if "score.bias" in plan.producers:  # a trained VLRM's biased head (kept or mixed)
            config.score_bias = True
        elif hasattr(config, "score_bias"):
            del config.score_bias
        text_cfg.pad_token_id = pad_id
        if text_cfg is not config:
            config.pad_token_id = pad_id
    else:
        config.architectures = [lv.ckpt.family.lvlm_class]
    if tok is not None:
        tok.save_pretrained(out)
    config.save_pretrained(out)
    (out / "merge_recipe.yaml").write_text(yaml.safe_dump(_recipe_dict(plan), sort_keys=False))
    (out / "README.md").write_text(model_card(plan, ancestry))


def cast_note(plan) -> str:
    """One line for the model card: which copied tensors (vision tower, projector, score head) were cast."""
    done = plan.casts()
    if not done:
        return "copied tensors keep their source dtype (bit-identical copies)"
    return "cast by `out_dtype`: " + ", ".join(f"{n} copied tensor(s) {a} → {b}" for (a, b), n in sorted(done.items()))


def _recipe_dict(plan) -> dict:
    d = plan.recipe.model_dump(exclude_none=True)
    d["seed"] = plan.seed
    return d


def model_card(plan, ancestry: Mapping[str, float] | None = None) -> str:
    """A Hugging Face model card: what went in, how it was merged, and with which library versions."""
    r = plan.recipe
    kind = "vision-language reward model (VLRM)" if r.output == "vlrm" else "merged vision-language model"
    rows = "\n".join(
        f"| {s.role if s is not plan.base else 'base'} | `{s.name}` | {s.ckpt.class_name} | "
        f"{yaml.safe_dump(to_jsonable_python(s.params), default_flow_style=True).strip() if s.params else '-'} |"
        for s in plan.sources
    )
    anc = "\n".join(f"- `{n}`: {v:.3f}" for n, v in (ancestry or {}).items()) or "- (no base)"
    vers = "\n".join(f"- {k}: {v}" for k, v in _versions().items())
    appended = ", ".join(f"`{t}` (from {Path(d).name})" for t, d in plan.out_vocab.appended) or "none"
    usage = (
        "```python\nimport vlrm_rlhf  # registers the VLRM classes\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"model = AutoModelForSequenceClassification.from_pretrained(\"{'path/to/this/dir'}\")\n```"
        if r.output == "vlrm"
        else "```python\nfrom transformers import AutoModelForImageTextToText\n"
        "model = AutoModelForImageTextToText.from_pretrained(\"path/to/this/dir\")\n```"
    )
    heads = {None: "the text reward model's", "rm": "the text reward model's", "keep": "the trained VLRM's",
             "mix": "a mix of the trained VLRM's and the text reward model's"}
    head = f", and {heads[plan.head_mode]} score head" if r.output == "vlrm" else ""
    return f"""---
library_name: vlrm-rlhf
tags: [merge, vlrm-rlhf, {'reward-model' if r.output == 'vlrm' else 'vision-language'}]
---
# {r.name or 'Merged ' + kind}

A {kind} built by [vlrm-rlhf](https://pypi.org/project/vlrm-rlhf/) without training: the vision encoder and
projector of the LVLM, a merged language model{head}.

## Inputs
| role | model | class | parameters |
|---|---|---|---|
{rows}

## Merge
- method: `{r.merge_method}`
- recipe parameters: `{to_jsonable_python(r.parameters or {})}`
- seed: {plan.seed}
- merged tensors: {str(plan.out_dtype).removeprefix('torch.')} (computed in {str(plan.compute_dtype).removeprefix('torch.')})
- {cast_note(plan)}
- tokens appended to the LVLM's vocabulary: {appended}
- the full recipe is in `merge_recipe.yaml`

Sampled relative task-vector size ‖θ − θ_base‖ / ‖θ_base‖ (language model):
{anc}

## Usage
{usage}

## Library versions
{vers}
"""
