"""Training checkpoints: which ones are complete, which one to resume from, and whether an output folder is in use.

A run killed while saving leaves a half-written ``checkpoint-N`` (no ``trainer_state.json``, optimizer or even
weights); ``transformers.trainer_utils.get_last_checkpoint`` still returns it and resuming crashes. Here a
checkpoint is *complete* when its ``trainer_state.json`` (the Trainer writes it last) parses, its weights
(full, sharded, adapter or DeepSpeed) are all there and, unless the run saves the model only, its optimizer and
scheduler states are too. ``resolve_resume`` turns ``--resume_from_checkpoint`` (``true``/``1``/a path, as the
command line's string or the YAML's bool) into the checkpoint to load.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

from .errors import VLRMError

__all__ = ["CheckpointError", "OutputInUseError", "checkpoint_problem", "checkpoints", "clear_checkpoints",
           "last_complete_checkpoint", "previous_run", "resolve_resume", "resume_requested"]

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRUE = ("true", "yes", "1", "on")
FALSE = ("", "false", "no", "0", "off", "none")


class CheckpointError(VLRMError, ValueError):
    """No complete checkpoint to resume from, or the one named is incomplete; the message names it."""


class OutputInUseError(VLRMError, FileExistsError):
    """The output folder holds an earlier run's checkpoints and neither resuming nor overwriting was asked."""


def checkpoints(folder: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders directly inside ``folder``, newest (largest N) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def _weights_problem(folder: Path) -> str | None:
    """Why ``folder`` holds no complete set of weights, or ``None`` when it does."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                shards = set(json.loads((folder / index).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError) as e:
                return f"unreadable {index} ({type(e).__name__})"
            missing = sorted(s for s in shards if not (folder / s).is_file())
            return f"missing weight shard(s) {', '.join(missing[:3])}" if missing else None
    if any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors",
                                            "adapter_model.bin")):
        return None
    if _deepspeed(folder):
        return None
    return "no model weights"


def _deepspeed(folder: Path) -> bool:
    """Whether ``folder`` holds a DeepSpeed checkpoint (a ``latest`` file naming an existing ``global_step*``)."""
    try:
        tag = (folder / "latest").read_text().strip()
    except OSError:
        return False
    return bool(tag) and (folder / tag).is_dir()


def checkpoint_problem(path: str | Path, *, optimizer: bool = True) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from (``None``: it is complete).

    ``optimizer``: the run saves optimizer and scheduler states (``save_only_model`` off), so they must be there.
    """
    path = Path(path)
    if not path.is_dir():
        return "not a folder"
    try:
        json.loads((path / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "no trainer_state.json (the save was interrupted)"
    except (OSError, ValueError) as e:
        return f"unreadable trainer_state.json ({type(e).__name__}: {e})"
    problem = _weights_problem(path)
    if problem:
        return problem
    if optimizer and not _deepspeed(path):
        missing = [f for f in ("optimizer.pt", "scheduler.pt") if not (path / f).is_file()]
        if missing:
            return f"no {' or '.join(missing)}"
    return None


def last_complete_checkpoint(folder: str | Path, *, optimizer: bool = True) -> Path | None:
    """The newest complete checkpoint in ``folder`` (``None``: none); newer incomplete ones are skipped with a
    warning naming each and what it lacks."""
    for ckpt in checkpoints(folder):
        problem = checkpoint_problem(ckpt, optimizer=optimizer)
        if problem is None:
            return ckpt
        warnings.warn(f"skipping incomplete checkpoint {ckpt}: {problem}", stacklevel=2)
    return None


def resume_requested(value: str | bool | None) -> str | bool:
    """``--resume_from_checkpoint`` as given: ``True`` (``true``/``yes``/``1``/``on``, any case), ``False``
    (unset, ``false``, ``0``, ...) or a checkpoint path."""
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip()
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    return text


def resolve_resume(value: str | bool | None, output_dir: str | Path, *, optimizer: bool = True) -> str | None:
    """The checkpoint folder to resume from (``None``: start fresh).

    ``True`` (or its strings, see ``resume_requested``) means the newest complete checkpoint in ``output_dir``;
    a path must be a complete checkpoint. Raises ``CheckpointError`` naming the folder and what is missing.
    """
    asked = resume_requested(value)
    if asked is False:
        return None
    if asked is True:
        found = last_complete_checkpoint(output_dir, optimizer=optimizer)
        if found is None:
            seen = checkpoints(output_dir)
            detail = f" ({len(seen)} incomplete: {', '.join(p.name for p in seen[:3])})" if seen else ""
            raise CheckpointError(f"--resume_from_checkpoint true: no complete checkpoint in {output_dir}{detail}; "
                                  "drop --resume_from_checkpoint to start a new run")
        return str(found)
    problem = checkpoint_problem(asked, optimizer=optimizer)
    if problem:
        newest = last_complete_checkpoint(Path(asked).parent, optimizer=optimizer) if Path(asked).parent.is_dir() \
            else None
        hint = f"; the newest complete one there is {newest}" if newest else ""
        raise CheckpointError(f"--resume_from_checkpoint {asked}: not a complete checkpoint: {problem}{hint}")
    return str(asked)


def previous_run(output_dir: str | Path) -> list[str]:
    """What in ``output_dir`` shows an earlier run: its ``checkpoint-N`` folders (also one level down, e.g.
    per-round folders) and a finished run's ``trainer_state.json``; ``[]`` for a new or unrelated folder."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p.name for p in checkpoints(folder)]
    found += [f"{sub.name}/{p.name}" for sub in sorted(folder.iterdir()) if sub.is_dir() and not _CHECKPOINT.match(sub.name)
              for p in checkpoints(sub)]
    if (folder / "trainer_state.json").is_file():
        found.append("trainer_state.json")
    return found


def clear_checkpoints(output_dir: str | Path) -> list[str]:
    """Delete the earlier run's ``checkpoint-N`` folders (``--overwrite_output_dir``); returns their names."""
    folder = Path(output_dir)
    gone = [p for p in checkpoints(folder)]
    gone += [p for sub in (folder.iterdir() if folder.is_dir() else []) if sub.is_dir() and not _CHECKPOINT.match(sub.name)
             for p in checkpoints(sub)]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    (folder / "trainer_state.json").unlink(missing_ok=True)
    return [str(p.relative_to(folder)) for p in gone]
