"""Lazy, layout-independent view of one Hugging Face checkpoint directory.

A ``Checkpoint`` maps every on-disk tensor name to the name the loaded module uses (derived from the
model's own ``from_pretrained`` renaming rules on a meta-device model), finds the language model inside
it from the module tree, and reads tensors lazily (memory-mapped safetensors) one at a time.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open

from ..errors import VLRMError
from ..models.families import Family, get_family
from ..models.loading import RemoteCodeError, TokenizerLoadError, load_tokenizer, pretrained
from .schedules import split_layer

Role = Literal["base", "lvlm", "vlrm", "rm", "llm"]
WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE = "pytorch_model.bin"


class CheckpointError(VLRMError, ValueError):
    """A checkpoint that cannot be merged; the message names the file or tensor at fault."""


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: the shard file and its on-disk key."""

    file: Path
    key: str


def _module_path(root: torch.nn.Module, target: torch.nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, mod in root.named_modules():
        if mod is target:
            return name
    return None


def _model_class(config, role: Role, family: Family | None):
    """The transformers class whose module tree defines this checkpoint's tensor names."""
    import transformers

    if role == "vlrm" and _is_seq_cls(config):  # a trained VLRM saved as its family's sequence classifier
        from ..models.modeling import VLRM_CLASSES

        assert family is not None
        return VLRM_CLASSES[family.model_type]
    if role in ("lvlm", "vlrm"):  # vlrm: a causal VLM with a TRL value head beside its weights
        assert family is not None
        return getattr(transformers, family.lvlm_class)
    if role == "rm":
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification._model_mapping[type(config)]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)]


def _is_seq_cls(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or [])


class Checkpoint:
    """One input model: config, lazy tensors, and the split into language-model and other tensors.

    ``text`` maps canonical text keys (``layers.3.mlp.up_proj.weight``, ``embed_tokens.weight``,
    ``norm.weight``, ``lm_head.weight``) to the module key; for an LVLM, ``other`` holds the rest
    (vision tower, projector, Mllama cross-attention layers). A trained VLRM (role ``vlrm``) also has ``head``:
    ``{"weight": key, "bias": key}`` (bias optional), the module keys of its reward head (``score.*``, or TRL's
    ``v_head.summary.*`` in the shards or in ``value_head.safetensors``), readable with ``get``.
    """

    def __init__(self, path: str | Path, role: Role, *, allow_pickle: bool = False):
        from transformers import AutoConfig

        self.path = Path(path)
        self.role = role
        if not self.path.is_dir():
            raise CheckpointError(f"{role} model directory not found: {self.path}")
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{role} model {self.path} has no config.json")
        if role in ("lvlm", "vlrm"):  # before AutoConfig: an unknown family should say which ones are supported
            raw = json.loads((self.path / "config.json").read_text())
            get_family(raw.get("model_type", "?"), where=str(self.path))
        try:
            self.config = pretrained(AutoConfig, self.path)
        except RemoteCodeError as e:
            raise CheckpointError(f"{role} model {e}") from None
        except Exception as e:  # noqa: BLE001 - re-raised with the culprit named
            raise CheckpointError(f"cannot read config of {role} model {self.path}: {e}") from e
        self.family: Family | None = None
        self._check_role()
        self.refs: dict[str, TensorRef] = {}  # module key -> on-disk location
        self._pickle: dict[str, torch.Tensor] | None = None
        self._handles: dict[Path, object] = {}
        self._offsets: dict[Path, dict[str, tuple[int, int]]] = {}  # shard -> tensor -> data byte range
        self._open_weights(allow_pickle)
        self.head: dict[str, str] = {}
        self._open_value_head()
        self._derive_names()
        self._find_head()

    # ---- role checks -------------------------------------------------------------------------------
    def _check_role(self) -> None:
        archs = list(getattr(self.config, "architectures", None) or [])
        mt = self.config.model_type
        is_vlm = self.config.get_text_config() is not self.config
        if self.role in ("lvlm", "vlrm"):
            if not is_vlm:
                raise CheckpointError(
                    f"role {self.role} expects a vision-language checkpoint; {self.path} is a text model "
                    f"({mt}, {archs}). Did you mean role: {'llm' if self.role == 'lvlm' else 'rm'}?"
                )
            self.family = get_family(mt, where=str(self.path))
            if self.role == "lvlm" and _is_seq_cls(self.config):
                raise CheckpointError(f"role lvlm expects a generative LVLM; {self.path} is a reward model "
                                      f"({archs}): give it `role: vlrm` to merge into a trained VLRM")
        elif is_vlm:
            raise CheckpointError(
                f"role {self.role} expects a text-only checkpoint; {self.path} is a vision-language model "
                f"({mt}). Did you mean role: lvlm?"
            )
        if self.role == "rm" and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise CheckpointError(
                f"role rm expects a *ForSequenceClassification reward model; {self.path} has "
                f"architectures={archs}. Use role: llm for a causal LM, or give the reward model's directory."
            )
        if self.role == "rm" and getattr(self.config, "num_labels", 1) != 1:
            raise CheckpointError(f"reward model {self.path} has num_labels={self.config.num_labels}; expected 1")

    # ---- reward head of a trained VLRM ----------------------------------------------------------------------
    def _open_value_head(self) -> None:
        """Role vlrm: a separate ``value_head.safetensors`` joins the tensors (its keys stay TRL's)."""
        from ..models.value_head import VALUE_HEAD_FILE

        f = self.path / VALUE_HEAD_FILE
        if self.role != "vlrm" or not f.is_file():
            return
        self._open_safetensors(f)

    def _find_head(self) -> None:
        """Role vlrm: locate the reward head (``score.*`` or ``v_head.summary.*``) and check its width."""
        from ..models.value_head import HEAD_BIAS, HEAD_WEIGHT

        if self.role != "vlrm":
            return
        if _is_seq_cls(self.config):
            self.head = {k: f"score.{k}" for k in ("weight", "bias") if f"score.{k}" in self.ckpt_key}
            if getattr(self.config, "num_labels", 1) != 1:
                raise CheckpointError(f"trained VLRM {self.path} has num_labels={self.config.num_labels}; expected 1")
        else:
            for k, key in (("weight", HEAD_WEIGHT), ("bias", HEAD_BIAS)):
                if key in self.refs:
                    self.ckpt_key[key] = key
                    self.head[k] = key
            if "weight" not in self.head:
                raise CheckpointError(
                    f"role vlrm expects a trained VLRM; {self.path} has neither a score head "
                    f"(architectures={self.config.architectures}) nor a value head ({HEAD_WEIGHT} in the shards or "
                    "in value_head.safetensors). Use role: lvlm for a generative LVLM.")
        hidden = self.config.get_text_config().hidden_size
        w = self.shape(self.head["weight"])
        if len(w) != 2 or w[0] != 1 or w[1] != hidden:
            f = self.refs[self.ckpt_key[self.head["weight"]]].file
            raise CheckpointError(f"{f}: reward head {self.head['weight']} has shape {list(w)}; its width "
                                  f"{w[-1]} does not match the hidden size {hidden} of {self.path} (expected [1, {hidden}])")
        self.other = [k for k in self.other if k not in self.head.values()]

    # ---- weights ---------------------------------------------------------------------------------------
    def _open_weights(self, allow_pickle: bool) -> None:
        p = self.path
        if (p / WEIGHTS_INDEX).is_file():
            files = self._index_files(p / WEIGHTS_INDEX)
        elif (p / WEIGHTS).is_file():
            files = None
        elif (p / PICKLE).is_file() or (p / PICKLE_INDEX).is_file():
            if not allow_pickle:
                raise CheckpointError(
                    f"{p} holds only pickle (.bin) weights, which can execute code when loaded; "
                    "convert to safetensors or pass --allow-pickle (loaded with weights_only=True)."
                )
            self._load_pickle()
            return
        else:
            raise CheckpointError(f"no model.safetensors or {WEIGHTS_INDEX} in {p}")
        shard_files = sorted(set(files.values())) if files else [p / WEIGHTS]
        for f in shard_files:
            if not f.is_file():
                raise CheckpointError(f"shard {f} listed in {p / WEIGHTS_INDEX} is missing")
            self._open_safetensors(f)
        if files:
            missing = sorted(set(files) - set(self.refs))
            if missing:
                raise CheckpointError(f"{p / WEIGHTS_INDEX} lists {missing[:3]} but the shards lack them")

    def _open_safetensors(self, f: Path) -> None:
        """Open one safetensors file lazily and register its tensors (a corrupt header is named)."""
        try:
            h = safe_open(str(f), framework="pt")
        except SafetensorError as e:
            raise CheckpointError(f"cannot read {f}: truncated or corrupt safetensors file ({e})") from e
        self._handles[f] = h
        for k in h.keys():
            self.refs[k] = TensorRef(f, k)

    def _index_files(self, index: Path) -> dict[str, Path]:
        """Tensor name -> shard file of a ``*.index.json``; every shard must lie inside the model folder."""
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid index (a JSON object with a weight_map): {e}") from None
        root = self.path.resolve()
        files = {}
        for k, f in weight_map.items():
            shard = (self.path / f).resolve()
            if root not in shard.parents:
                raise CheckpointError(f"{index} points outside the model folder {self.path}: tensor {k} is in {f!r}; "
                                      "shards must be files of the model folder itself")
            files[k] = self.path / f
        return files

    def _load_pickle(self) -> None:
        import pickle

        p = self.path
        files = [p / PICKLE]
        if (p / PICKLE_INDEX).is_file():
            files = sorted(set(self._index_files(p / PICKLE_INDEX).values()))
        self._pickle = {}
        for f in files:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError:
                raise CheckpointError(
                    f"refused to load {f}: the pickle holds not only tensors (such objects can run code when "
                    "loaded); convert the checkpoint to safetensors with the code that wrote it") from None
            except (RuntimeError, OSError, EOFError) as e:
                raise CheckpointError(f"cannot read {f}: truncated or corrupt pickle checkpoint "
                                      f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise CheckpointError(f"{f} is not a state dict of tensors")
            self._pickle.update(sd)
            for k in sd:
                self.refs[k] = TensorRef(f, k)

    def shape(self, module_key: str) -> tuple[int, ...]:
        ref = self.refs[self.ckpt_key[module_key]]
        if self._pickle is not None:
            return tuple(self._pickle[ref.key].shape)
        return tuple(self._handles[ref.file].get_slice(ref.key).get_shape())

    def dtype(self, module_key: str) -> torch.dtype:
        ref = self.refs[self.ckpt_key[module_key]]
        if self._pickle is not None:
            return self._pickle[ref.key].dtype
        name = self._handles[ref.file].get_slice(ref.key).get_dtype()
        if name not in _SAFE_DTYPES:
            raise CheckpointError(f"tensor {ref.key} in {ref.file} has dtype {name}, which merging does not support")
        return _SAFE_DTYPES[name]

    def location(self, module_key: str) -> tuple[Path, int, int] | None:
        """Shard file and byte range ``[start, end)`` of a tensor's data (None for pickle weights): lets a reader
        ask for its pages without touching them."""
        ref = self.refs[self.ckpt_key[module_key]]
        if self._pickle is not None:
            return None
        if ref.file not in self._offsets:
            with open(ref.file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            self._offsets[ref.file] = {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
                                       for k, v in header.items() if k != "__metadata__"}
        start, end = self._offsets[ref.file][ref.key]
        return ref.file, start, end

    @property
    def mapped(self) -> bool:
        """True when ``get`` returns tensors memory-mapped from safetensors files (``pages.release`` may drop them)."""
        return self._pickle is None

    def get(self, module_key: str) -> torch.Tensor:
        """Read one tensor lazily (memory-mapped; pages are read as the merge touches them)."""
        ref = self.refs[self.ckpt_key[module_key]]
        if self._pickle is not None:
            return self._pickle[ref.key]
        try:
            return self._handles[ref.file].get_tensor(ref.key)
        except SafetensorError as e:
            raise CheckpointError(f"cannot read tensor {ref.key} from {ref.file}: {e}") from e

    # ---- names -----------------------------------------------------------------------------------------
    def _derive_names(self) -> None:
        """Rename on-disk keys with transformers' own rules and locate the language model."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        cls = _model_class(self.config, self.role, self.family)
        with torch.device("meta"):
            model = cls._from_config(self.config)
        meta_sd = model.state_dict()
        ignorable = _ignorable_on_load(model)
        self.ignored: list[str] = []  # on-disk keys transformers ignores when loading (stale buffers)
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
        self.ckpt_key: dict[str, str] = {}
        from ..models.value_head import HEAD_BIAS, HEAD_WEIGHT

        for key in self.refs:
            if self.role == "vlrm" and key in (HEAD_WEIGHT, HEAD_BIAS):
                continue  # TRL's value head: not part of the VLM's module tree (see _find_head)
            new, conv = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_sd)
            if conv is not None:
                raise CheckpointError(
                    f"{self.path}: tensor {key} needs a multi-tensor conversion ({conv}) that merging does not support"
                )
            if new not in meta_sd and ignorable(new):
                self.ignored.append(key)
                continue
            if new not in meta_sd:
                raise CheckpointError(
                    f"tensor {key} of {self.role} model {self.path} is not part of {cls.__name__} "
                    "(present in this model only?); is the config right for these weights?"
                )
            self.ckpt_key[new] = key
        for key in self.ignored:
            del self.refs[key]
        if self.ignored:
            warnings.warn(f"{self.role} model {self.path}: ignored {len(self.ignored)} tensor(s) that transformers "
                          f"ignores when loading {cls.__name__} (stale buffers): {', '.join(self.ignored[:4])}"
                          + (" ..." if len(self.ignored) > 4 else ""), stacklevel=4)
        text_cfg = self.config.get_text_config()
        self.tied = bool(getattr(text_cfg, "tie_word_embeddings", False) or getattr(self.config, "tie_word_embeddings", False))
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, model.base_model_prefix)
        lm_prefix = _module_path(model, decoder)
        embed = _module_path(model, model.get_input_embeddings())
        out_emb = _module_path(model, model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
        if lm_prefix is None or embed is None:
            raise CheckpointError(f"{self.path}: cannot locate the language model in {cls.__name__}")
        self.lm_prefix = lm_prefix + "." if lm_prefix else ""
        self.embed_key = embed + ".weight"
        self.lm_head_key = (out_emb + ".weight") if out_emb else None
        self.class_name = cls.__name__
        missing = [k for k in meta_sd if k not in self.ckpt_key and not (self.tied and k == self.lm_head_key)]
        if missing:
            raise CheckpointError(
                f"{self.role} model {self.path} lacks tensor {missing[0]} that {cls.__name__} has"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        self.text: dict[str, str] = {}
        self.other: list[str] = []
        for key in self.ckpt_key:
            canon = self._canonical(key, text_cfg)
            if canon is None:
                self.other.append(key)
            else:
                self.text[canon] = key
        del model

    def _canonical(self, module_key: str, text_cfg) -> str | None:
        """Text-model name of a module key, in base-LM layer numbering; None for non-LM tensors."""
        if module_key == self.lm_head_key:
            return "lm_head.weight"
        if not module_key.startswith(self.lm_prefix):
            return None
        rel = module_key[len(self.lm_prefix) :]
        split = split_layer(rel)
        if split and self.family is not None:
            j = self.family.text_layer_to_base(text_cfg, split[0])
            if j is None:
                return None
            rel = f"layers.{j}.{split[1]}"
        return rel

    def text_key(self, canon: str) -> str | None:
        """Module key of text tensor ``canon``; a tied model's ``lm_head.weight`` is its embedding matrix."""
        key = self.text.get(canon)
        if key is None and canon == "lm_head.weight" and self.tied and self.lm_head_key is not None:
            return self.embed_key
        return key

    def tokenizer(self):
        """The checkpoint's tokenizer, or None when it ships no tokenizer files; files that fail to load are a
        ``CheckpointError`` with the loader's reason (never mistaken for "no tokenizer")."""
        try:
            return load_tokenizer(self.path, where=f"{self.role} model {self.path}")
        except (TokenizerLoadError, RemoteCodeError) as e:
            raise CheckpointError(str(e) if isinstance(e, TokenizerLoadError) else f"{self.role} model {e}") from e

    def close(self) -> None:
        self._handles.clear()
        self._pickle = None


def _ignorable_on_load(model: torch.nn.Module):
    """Predicate on module keys that ``from_pretrained`` of ``model``'s class drops silently: its non-persistent
    buffers, its ``_keys_to_ignore_on_load_unexpected`` patterns and transformers' legacy ``rotary_emb.inv_freq`` /
    ``position_ids`` patterns (applied, as transformers does, when the model has such buffers)."""
    buffers = [n for n, _ in model.named_buffers()]
    non_persistent = set()
    for name in buffers:
        parent, _, leaf = name.rpartition(".")
        if leaf in model.get_submodule(parent)._non_persistent_buffers_set:
            non_persistent.add(name)
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(b.endswith("position_ids") for b in buffers):
        patterns.add(r"(^|\.)position_ids$")
    regex = re.compile("|".join(f"({p})" for p in patterns)) if patterns else None
    return lambda key: key in non_persistent or (regex is not None and regex.search(key) is not None)


_SAFE_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
