"""What every command line shares: failure printing, the warning hook, mode checks, scorer loading.

Every error a user can cause derives from ``VLRMError``; ``handled()`` turns it (and the OS errors a command
names) into one ``error:`` line and exit status 2, so no command lists the package's error classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import typer

from .errors import VLRMError

MODES = ("vlrm", "no_image", "text_rm", "cascade")  # scoring modes of VLRewardScorer


def fail(msg: str) -> NoReturn:
    """Print ``error: msg`` in red on stderr and exit with status 2."""
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` replacement: one yellow ``warning:`` line, no source location."""
    typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


def install_warning_hook() -> None:
    """Print Python warnings as one-line ``warning:`` messages for the rest of the command."""
    warnings.showwarning = show_warning


@contextmanager
def handled(*extra: type[BaseException]) -> Iterator[None]:
    """Exit 2 with the message of a ``VLRMError`` (or of one of the ``extra`` classes) raised in the block."""
    try:
        yield
    except (VLRMError, *extra) as e:
        fail(str(e))


def first_line(e: BaseException) -> str:
    """The first line of an error's message, or its class name when it has none."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def check_mode(mode: str, lvlm: Path | None) -> None:
    """Exit 2 unless --mode is known and --mode and --lvlm go together."""
    if mode not in MODES:
        fail(f"unknown --mode {mode!r}: use {', '.join(MODES)}")
    if lvlm is not None and mode != "cascade":
        fail("--lvlm is only used with --mode cascade")
    if mode == "cascade" and lvlm is None:
        fail("--mode cascade needs --lvlm DIR (the LVLM that captions the images)")


TRUST_REMOTE_CODE_HELP = ("Run the reward model's own Python code (a checkpoint with an auto_map, e.g. a get_score API). "
                          "Only for checkpoints whose author you trust; never done without this flag.")


def load_scorer(model: Path, mode: str, lvlm: Path | None, **load: Any) -> Any:
    """The scorer for --model/--mode/--lvlm (``load``: --device, --dtype, --attn-implementation,
    --trust-remote-code), or exit 2 with the reason. ``--device auto`` spreads the model over the visible GPUs
    (``device_map="auto"``)."""
    from .reward.scorer import VLRewardScorer

    load = {k: v for k, v in load.items() if v is not None}
    if load.get("device") == "auto":
        load["device_map"] = load.pop("device")
    try:
        return VLRewardScorer.from_pretrained(model, mode=mode, lvlm=lvlm, **load)
    except (VLRMError, OSError, ValueError) as e:
        fail(f"cannot load reward model {model} (mode {mode}): {first_line(e)}")


def device_option() -> Any:
    """``--device``: where the reward model loads (cpu, cuda, cuda:1; ``auto`` spreads it over the GPUs)."""
    return typer.Option(None, "--device", help="Load the reward model on this device (cpu, cuda, cuda:1); "
                        "auto spreads it over all GPUs (device_map=auto). Default: cpu.")


def dtype_option() -> Any:
    """``--dtype``: the dtype the reward model's weights load in (no fp32 copy first)."""
    return typer.Option(None, "--dtype", help="Load the reward model's weights in this dtype (bfloat16, float16, "
                        "float32, auto = as stored).")


def attn_option() -> Any:
    """``--attn-implementation``: passed to transformers when loading the reward model."""
    return typer.Option(None, "--attn-implementation", help="Attention kernel: sdpa, flash_attention_2, eager.")


IMAGES_ROOT_HELP = ("Also allow images under this folder (repeatable). By default image paths must resolve, after "
                    "symlinks, inside the data file's folder (or --images-dir).")


def run_rerank(input: Path, model: Path, mode: str, lvlm: Path | None, images_dir: Path | None, image_key: str,
           out: Path | None, force: bool, batch_size: int, n: int | None,
           images_root: list[Path] | None = None, load: dict[str, Any] | None = None) -> tuple[dict, float]:
    """``rerank_file`` with the command line's checks and messages (shared by ``rerank`` and ``eval bon``);
    ``load`` holds ``load_scorer``'s device, dtype, attn_implementation and trust_remote_code."""
    from .rerank import rerank_file

    install_warning_hook()
    check_mode(mode, lvlm)
    with handled(OSError):
        return rerank_file(input, lambda: load_scorer(model, mode, lvlm, **(load or {})), mode=mode, images_dir=images_dir,
                           image_key=image_key, out=out, force=force, batch_size=batch_size, n=n,
                           images_root=images_root or ())
