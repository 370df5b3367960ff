"""Command line: ``vlrm-rlhf merge|families|demo``."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Vision-language RLHF with merged rewards.")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="mergekit-style YAML recipe with a role per model."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    dtype: str = typer.Option(None, "--dtype", help="Output dtype (float32|bfloat16|float16); overrides the recipe."),
    seed: int = typer.Option(None, "--seed", help="Seed for random methods (DARE, DELLA); overrides the recipe."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept .bin checkpoints (loaded weights_only)."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Largest output shard, e.g. 500MB, 5GB."),
) -> None:
    """Merge checkpoints into a VLRM (output: vlrm) or a merged LVLM (output: lvlm)."""
    from .merge import MergeError, RecipeError, build
    from .merge.checkpoint import CheckpointError
    from .merge.embeddings import VocabularyError
    from .merge.families import UnknownFamilyError
    from .merge.writer import OutputExistsError

    warnings.showwarning = _show_warning
    try:
        path = build(recipe, out, force=force, dtype=dtype, seed=seed, allow_pickle=allow_pickle,
                     max_shard_size=max_shard_size)
    except (MergeError, RecipeError, CheckpointError, VocabularyError, UnknownFamilyError, OutputExistsError) as e:
        _fail(str(e))
    typer.echo(f"wrote {path}")


@app.command()
def families() -> None:
    """List the supported LVLM families."""
    from .merge.families import FAMILIES

    for f in FAMILIES.values():
        typer.echo(f"{f.model_type:12s} {f.display:28s} {f.lvlm_class} / {f.seq_cls}")


@app.command()
def demo(
    work_dir: Path = typer.Option(Path("runs/demo"), "--work-dir", help="Where models and outputs go."),
    family: str = typer.Option("llava", "--family", help="LVLM family of the tiny models."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Build tiny local base/LVLM/RM models, merge them into a VLRM, and score text and image inputs."""
    from .quickstart import run_quickstart

    warnings.showwarning = _show_warning
    run_quickstart(work_dir, family=family, seed=seed)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
