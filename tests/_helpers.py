"""Small helpers shared by the tests (merge checks; a tiny remote-code reward model)."""

from __future__ import annotations

import json
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


_REMOTE_CONFIG_PY = '''
from transformers import PretrainedConfig


class TinyScoreConfig(PretrainedConfig):
    model_type = "MODEL_TYPE"
'''
_REMOTE_MODEL_PY = '''
import torch
from transformers import PreTrainedModel

from .configuration_tiny import TinyScoreConfig


class TinyScoreModel(PreTrainedModel):
    config_class = TinyScoreConfig

    def __init__(self, config):
        super().__init__(config)
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.post_init()

    def _init_weights(self, module):
        pass

    def get_score(self, chat, images):
        answer = [m["content"] for m in chat if m["role"] == "assistant"][-1]
        return float(self.scale) * (len(answer) + 100 * len(images))
'''


def write_remote_rm(out: Path, model_type: str) -> Path:
    """A reward model that ships its own code (auto_map) and a get_score(chat, images) API:
    0.5 * (len(answer) + 100 * n_images). ``model_type`` must be unique per test module (transformers registers it)."""
    from safetensors.torch import save_file

    out.mkdir()
    (out / "configuration_tiny.py").write_text(_REMOTE_CONFIG_PY.replace("MODEL_TYPE", model_type))
    (out / "modeling_tiny.py").write_text(_REMOTE_MODEL_PY)
    (out / "config.json").write_text(json.dumps({
        "model_type": model_type, "architectures": ["TinyScoreModel"],
        "auto_map": {"AutoConfig": "configuration_tiny.TinyScoreConfig", "AutoModel": "modeling_tiny.TinyScoreModel"}}))
    save_file({"scale": torch.tensor([0.5])}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
