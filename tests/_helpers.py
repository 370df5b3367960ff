"""Small helpers shared by the merge tests."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from vlrm_rlhf.merge.checkpoint import Checkpoint


def load_all(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def recipe(trio, method="linear", output="vlrm", lvlm=None, rm=None, llm=None, params=None, base=True, **extra):
    models = [{"model": str(trio["lvlm"]), "role": "lvlm", "parameters": lvlm or {"weight": 1.0}}]
    if output == "vlrm" or rm is not None:
        models.append({"model": str(trio["rm"]), "role": "rm", "parameters": rm or {"weight": 0.0}})
    if llm is not None:
        models.append({"model": str(trio["llm"]), "role": "llm", "parameters": llm})
    r = {"merge_method": method, "models": models, "output": output, "dtype": "float32",
         "parameters": params or {}, **extra}
    if base and method != "linear":  # linear has no base: mergekit would treat base_model as a weighted input
        r["base_model"] = str(trio["base"])
    return r


def lm_tensors(ckpt_dir: Path, role: str) -> dict[str, torch.Tensor]:
    """Canonical text-model tensors of a checkpoint (base-layer numbering)."""
    ck = Checkpoint(ckpt_dir, role)
    return {c: ck.get(k).clone() for c, k in ck.text.items()}
