"""``vlrm-rlhf analyze params|ablate|swap|schedule``: layer analysis from the command line.

Each analysis writes a CSV and PNGs into ``--out DIR`` atomically (the folder appears when complete); an existing
non-empty folder is refused without ``--force``. Bad inputs exit with status 2 and a message naming the culprit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ..cli_common import handled, install_warning_hook

analyze_app = typer.Typer(add_completion=False, no_args_is_help=True,
                          help="Layer analysis: task vectors, ablations, layer-swap curves, schedules.")


def _run(fn: Callable[[], Any]) -> Any:
    """Call ``fn``; the package's errors and OS errors exit 2 with their message, warnings print in yellow."""
    install_warning_hook()
    with handled(OSError):
        return fn()


def _check_out(out: Path, force: bool, inputs: list[tuple[str, Path | str | None]]) -> None:
    """``--out`` may not overlap an input (even with --force), nor replace a non-empty folder without --force."""
    from ..files import check_not_overlapping
    from . import AnalysisError

    check_not_overlapping(out, inputs)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise AnalysisError(f"output folder {out} exists and is not empty; pass --force to replace it")


def _recipe_inputs(recipe: Path) -> list[tuple[str, Path | str | None]]:
    """The recipe file and the model folders it names (what an analysis output must not touch)."""
    from ..merge.recipe import parse_recipe

    return [("recipe", recipe), *parse_recipe(recipe).input_paths()]


def _wrote(out: Path, files: list[Path]) -> None:
    typer.echo(f"wrote {out}: " + ", ".join(f.name for f in files))


_RECIPE = typer.Option(..., "--recipe", "-r", help="Merge recipe (YAML) naming the lvlm, llm or rm, and base.")
_OUT = typer.Option(..., "--out", "-o", help="Output folder (written atomically).")
_FORCE = typer.Option(False, "--force", help="Replace an existing non-empty output folder.")
_TASKS = typer.Option(..., "--tasks", "-t", help="Task JSONL: {image, question, choices, answer, kind} per line.")


@analyze_app.command()
def schedule(recipe: Path = typer.Argument(..., help="Merge recipe (YAML).")) -> None:
    """Print the per-layer parameter values a recipe resolves to (base-layer indices), and what layer_swap keeps."""
    from ..merge.engine import MergePlan
    from ..merge.recipe import parse_recipe
    from ..merge.schedules import resolved_table

    def go() -> list[dict]:
        return resolved_table(MergePlan(parse_recipe(recipe)))

    rows = _run(go)
    cols = list(dict.fromkeys(c for r in rows for c in r))
    text = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    typer.echo("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for t in text:
        typer.echo("  ".join(v.rjust(w) for v, w in zip(t, widths, strict=True)))
    typer.echo("layer: base-model layer index; outside: embed_tokens, final norm, lm_head; "
               "source lvlm: copied from the LVLM by layer_swap")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@analyze_app.command()
def params(
    recipe: Path = _RECIPE,
    out: Path = _OUT,
    other: str = typer.Option(None, "--other", help="Compare the LVLM with this role: llm or rm (default: llm if present)."),
    merged: bool = typer.Option(True, "--merged/--no-merged", help="Also the recipe's merged model (merged in memory)."),
    force: bool = _FORCE,
) -> None:
    """Task-vector norms (absolute, relative) and cosines per layer and module: params.csv + one heatmap per quantity."""
    from .outputs import analysis_dir
    from .params import params_for_recipe, write_params

    def go() -> list[Path]:
        _check_out(out, force, _recipe_inputs(recipe))
        rows, names = params_for_recipe(recipe, other_role=other, merged=merged, progress=True)
        with analysis_dir(out, force=force) as tmp:
            files = write_params(tmp, rows, names)
        return files

    _wrote(out, _run(go))


@analyze_app.command()
def ablate(
    model: Path = typer.Option(..., "--model", "-m", help="LVLM or merged-LVLM directory."),
    tasks: Path = _TASKS,
    out: Path = _OUT,
    base: Path = typer.Option(None, "--base", "-b", help="Base LM directory (needed by --mode base)."),
    mode: str = typer.Option("base", "--mode", help="base: weights replaced by the base's | zero: residual output zeroed."),
    groups: str = typer.Option("attention,mlp,layer", "--groups", help="Comma-separated module groups to ablate."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="(question, choice) pairs per forward."),
    force: bool = _FORCE,
) -> None:
    """Per layer and module group, ablate and measure the drop on perception and reasoning tasks: ablate.csv + PNGs."""
    from ..merge.checkpoint import Checkpoint
    from . import AnalysisError
    from .ablate import GROUPS, MODES, ablation_table, load_lvlm, text_parameters, write_ablation
    from .ablate import ablate as run_ablation
    from .outputs import analysis_dir
    from .tasks import TaskScorer, load_tasks

    def go() -> list[Path]:
        if mode not in MODES:
            raise AnalysisError(f"unknown --mode {mode!r}: use {', '.join(MODES)}")
        gs = [g.strip() for g in groups.split(",") if g.strip()]
        bad = [g for g in gs if g not in GROUPS]
        if bad or not gs:
            raise AnalysisError(f"--groups {groups!r}: use a comma-separated subset of {', '.join(GROUPS)}")
        if mode == "base" and base is None:
            raise AnalysisError("--mode base needs --base DIR (the base LM the model grew from)")
        _check_out(out, force, [("model", model), ("base model", base), ("tasks", tasks)])
        ts = load_tasks(tasks)
        base_ck = Checkpoint(base, "base") if mode == "base" else None
        m, proc, ck = load_lvlm(model)
        intact, rows = run_ablation(TaskScorer(m, proc, batch_size=batch_size), text_parameters(m, ck), ts, mode=mode,
                                    base=base_ck, groups=gs, progress=typer.echo)
        typer.echo("intact: " + ", ".join(f"{k} accuracy {v['accuracy']:.3f}" for k, v in intact.metrics.items()))
        with analysis_dir(out, force=force) as tmp:
            files = write_ablation(tmp, ablation_table(intact, rows, mode), mode, model.name)
        return files

    _wrote(out, _run(go))


@analyze_app.command()
def swap(
    recipe: Path = _RECIPE,
    tasks: Path = _TASKS,
    out: Path = _OUT,
    part: str = typer.Option("layer", "--part", help="Swap whole layers, or only their attention or mlp tensors."),
    embeddings: bool = typer.Option(True, "--embeddings/--no-embeddings",
                                    help="embed_tokens from the LVLM whenever k >= 1."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="(question, choice) pairs per forward."),
    force: bool = _FORCE,
) -> None:
    """Layer-swap curve: task metrics of the merge with its first k layers from the LVLM, k = 0..L: swap.csv + PNG."""
    from .outputs import analysis_dir
    from .swap import LayerSwapper, swap_curve, write_swap
    from .tasks import TaskScorer, load_tasks

    def go() -> list[Path]:
        _check_out(out, force, [("tasks", tasks), *_recipe_inputs(recipe)])
        ts = load_tasks(tasks)
        sw = LayerSwapper(recipe, part=part, embeddings=embeddings, progress=True)
        rows = swap_curve(sw, ts, scorer=TaskScorer(sw.model, sw.processor, batch_size=batch_size), progress=typer.echo)
        with analysis_dir(out, force=force) as tmp:
            files = write_swap(tmp, rows, sw.recipe.name or recipe.name)
        return files

    _wrote(out, _run(go))
