"""The one way the package loads a config, tokenizer, processor or model: a checkpoint's own code never runs.

transformers asks "Do you wish to run the custom code? [y/N]" on a terminal when a config's ``auto_map``
points at Python files in the checkpoint and ``trust_remote_code`` is left unset; a ``y`` (or a pipe that
answers it) runs that code. ``pretrained`` always passes ``trust_remote_code`` explicitly (``False`` unless the
caller's own flag says otherwise), so there is never a prompt, and such a checkpoint is one clear error naming
the opt-in (``trust_remote_code=True`` / ``--trust-remote-code``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import VLRMError

__all__ = ["RemoteCodeError", "TokenizerLoadError", "has_tokenizer_files", "load_tokenizer", "pretrained",
           "remote_code_refusal"]

# files any transformers tokenizer is loaded from; a folder with none of them ships no tokenizer
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "merges.txt", "spiece.model", "sentencepiece.bpe.model", "special_tokens_map.json")


class RemoteCodeError(VLRMError, ValueError):
    """A checkpoint that can only be loaded by running its own Python code, which the package never does."""


class TokenizerLoadError(VLRMError, ValueError):
    """A checkpoint ships tokenizer files that fail to load (not the same as shipping no tokenizer)."""


def first_line(e: BaseException) -> str:
    """The first line of an error's message, or its class name when it has none."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def pretrained(loader: Any, path: str | Path, *, trust_remote_code: bool = False, **kw: Any) -> Any:
    """``loader.from_pretrained(path, trust_remote_code=..., **kw)``; a checkpoint that needs its own code to
    load raises ``RemoteCodeError`` naming it (unless the caller explicitly trusts it)."""
    try:
        return loader.from_pretrained(path, trust_remote_code=trust_remote_code, **kw)
    except ValueError as e:
        if trust_remote_code or "trust_remote_code" not in str(e):
            raise
        raise RemoteCodeError(remote_code_refusal(path)) from None


def remote_code_refusal(path: str | Path) -> str:
    """The refusal for a checkpoint that needs its own code, naming the opt-in flag."""
    return (f"{path}: loading it needs the checkpoint's own Python code (an auto_map for a model type transformers "
            "does not know); vlrm-rlhf runs a checkpoint's code only when asked: pass trust_remote_code=True "
            "(command line: --trust-remote-code) if you trust its author, or use a checkpoint of a built-in model type")


def has_tokenizer_files(path: str | Path) -> bool:
    """Whether a model folder holds any tokenizer file at all."""
    return any((Path(path) / f).is_file() for f in _TOKENIZER_FILES)


def load_tokenizer(path: str | Path, where: str | None = None, **kw: Any) -> Any:
    """The folder's tokenizer; None when it ships no tokenizer files. Files that fail to load raise
    ``TokenizerLoadError`` with the loader's reason (``where`` names the model; default: the path)."""
    from transformers import AutoTokenizer

    if not has_tokenizer_files(path):
        return None
    try:
        return pretrained(AutoTokenizer, path, **kw)
    except RemoteCodeError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure is reported with its reason
        raise TokenizerLoadError(f"{where or path}: its tokenizer failed to load: {first_line(e)}") from e
