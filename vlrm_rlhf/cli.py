"""Command line: ``vlrm-rlhf merge|families|demo|rerank|score|eval|sweep|analyze``."""

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
    work_dir: Path = typer.Option(Path("runs/demo"), "--work-dir", help="Where models, benchmark and report go."),
    seed: int = typer.Option(0, "--seed", help="Seed of the world, the training runs and the merges."),
    quick: bool = typer.Option(False, "--quick", help="Tiny models and few steps (under a minute; for CI)."),
    with_reasoning: bool = typer.Option(False, "--with-reasoning",
                                        help="Also merge a text reasoning LLM into the LVLM and run the layer analyses."),
) -> None:
    """ShapesWorld end to end: train base/LVLM/text RM, merge, evaluate, sweep λ, best-of-n, PPO, report."""
    from .demo.run import run_demo

    warnings.showwarning = _show_warning
    logging.getLogger("transformers").setLevel(logging.ERROR)
    rep = run_demo(work_dir, seed=seed, quick=quick, with_reasoning=with_reasoning)
    acc, best = rep["accuracy"], rep["best_merge"]
    typer.echo(f"best merge {best}: {100 * acc[best]['overall']:.1f}% overall on held-out pairs; text RM "
               f"{100 * acc['text_rm']['overall']:.1f}%, LVLM judge {100 * acc['lvlm_judge']['overall']:.1f}%, "
               f"no image {100 * acc['no_image']['overall']:.1f}%  (report: {work_dir / 'report.md'})")


# ---- reward scoring of JSONL files: rerank (best-of-n evaluation) and score ---------------------------------
_MODES = ("vlrm", "no_image", "text_rm", "cascade")


def _check_mode(mode: str, lvlm: Path | None) -> None:
    """Exit 2 unless --mode and --lvlm go together."""
    if mode not in _MODES:
        _fail(f"unknown --mode {mode!r}: use {', '.join(_MODES)}")
    if lvlm is not None and mode != "cascade":
        _fail("--lvlm is only used with --mode cascade")
    if mode == "cascade" and lvlm is None:
        _fail("--mode cascade needs --lvlm DIR (the LVLM that captions the images)")


def _load_scorer(model: Path, mode: str, lvlm: Path | None):
    """The scorer for --model/--mode/--lvlm, or exit 2 with the reason."""
    from .reward.scorer import ScorerError, VLRewardScorer

    try:
        return VLRewardScorer.from_pretrained(model, mode=mode, lvlm=lvlm)
    except (ScorerError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _fail(f"cannot load reward model {model} (mode {mode}): {reason}")


@app.command()
def rerank(
    input: Path = typer.Option(..., "--input", "-i", help="Best-of-n JSONL (id, input, responses, correctness)."),
    model: Path = typer.Option(..., "--model", "-m", help="Reward model directory (a VLRM, or a text RM)."),
    mode: str = typer.Option("vlrm", "--mode", help="vlrm | no_image | text_rm | cascade."),
    lvlm: Path = typer.Option(None, "--lvlm", help="Captioning LVLM directory (mode cascade)."),
    images_dir: Path = typer.Option(None, "--images-dir", help="Folder of images named {id}.jpg|.png."),
    image_key: str = typer.Option("id", "--image-key", help="Row field that names the image file."),
    out: Path = typer.Option(None, "--out", "-o", help="Write the rows back with 'scores' (JSONL, atomic)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Rows per scoring call for rows without images."),
    n: int = typer.Option(None, "--n", min=1, help="Evaluate only the first n responses of each row."),
) -> None:
    """Score every response of a best-of-n file and report Pass@1, Pass@N, Random and RM accuracy.

    The last line of stdout is one JSON object with the metrics (percent), n and count.
    """
    import json

    metrics, dt = _rerank_file(input, model, mode, lvlm, images_dir, image_key, out, force, batch_size, n)
    k = metrics["n"]
    typer.echo(f"best-of-{k} over {metrics['count']} rows, mode {mode}, model {model} "
               f"({metrics['count'] * k} responses scored in {dt:.1f} s)")
    for label, key in (("Pass@1", "pass@1"), (f"Pass@{k}", "pass@n"), ("Random", "random"),
                       ("RM accuracy", "rm_accuracy"), ("  ties->first", "rm_accuracy_first"),
                       ("tie rate", "tie_rate")):
        typer.echo(f"  {label:14s} {metrics[key]:7.2f} %")
    if out is not None:
        typer.echo(f"wrote {out}")
    typer.echo(json.dumps({k_: round(v, 4) if isinstance(v, float) else v for k_, v in metrics.items()}))


def _rerank_file(input: Path, model: Path, mode: str, lvlm: Path | None, images_dir: Path | None, image_key: str,
                 out: Path | None, force: bool, batch_size: int, n: int | None) -> tuple[dict, float]:
    """Validate a best-of-n JSONL file, score it, write the scored rows to ``out`` (if given) and return the
    metrics and the scoring time; exit 2 with the reason on bad input (shared by rerank and eval bon)."""
    import time

    from . import bon
    from .atomic import check_writable, write_jsonl_atomic
    from .bon import RecordError

    warnings.showwarning = _show_warning
    _check_mode(mode, lvlm)
    try:
        if out is not None:
            check_writable(out, force)
        if images_dir is not None and not images_dir.is_dir():
            raise RecordError(f"--images-dir {images_dir} is not a folder")
        lines = bon.read_jsonl(input)
        records = [r for _, r in lines]
        names = [f"{input} line {ln}" + (f" (id {r['id']})" if "id" in r else "") for ln, r in lines]
        paths = []
        for i, (name, rec) in enumerate(zip(names, records, strict=True)):
            bon.check_record(i, rec, n, where=name)
            path = None if mode in bon.TEXT_MODES else bon.find_row_image(rec, name, input.parent, images_dir, image_key)
            if path is None and mode not in bon.TEXT_MODES:
                raise RecordError(f"{name}: no image, and --mode {mode} needs one per row: give --images-dir "
                                  f"(files named {{{image_key}}}.jpg|.png) or an 'image' path in each row, "
                                  "or score text only with --mode text_rm|no_image")
            paths.append(path)
    except (RecordError, OSError) as e:
        _fail(str(e))
    scorer = _load_scorer(model, mode, lvlm)
    t0 = time.perf_counter()
    try:
        scores = bon.score_bon_rows(scorer, records, paths, n=n, batch_size=batch_size, names=names)
        it = iter(scores)  # rerank_records asks for the rows' scores in order: hand over the precomputed ones
        rows, metrics = bon.rerank_records(records, lambda rec, resp: next(it), n=n)
        if out is not None:
            write_jsonl_atomic(rows, out, force=force)
    except (RecordError, OSError) as e:
        _fail(str(e))
    return metrics, time.perf_counter() - t0


@app.command()
def score(
    input: Path = typer.Option(..., "--input", "-i", help="JSONL rows {image|images, prompt, response}."),
    model: Path = typer.Option(..., "--model", "-m", help="Reward model directory (a VLRM, or a text RM)."),
    out: Path = typer.Option(..., "--out", "-o", help="Write the rows back with 'reward' (JSONL, atomic)."),
    mode: str = typer.Option("vlrm", "--mode", help="vlrm | no_image | text_rm | cascade."),
    lvlm: Path = typer.Option(None, "--lvlm", help="Captioning LVLM directory (mode cascade)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Rows per scoring call."),
) -> None:
    """Reward of each (images, prompt, response) row; image paths are relative to the input file."""
    from . import bon
    from .atomic import check_writable, write_jsonl_atomic
    from .bon import RecordError

    warnings.showwarning = _show_warning
    _check_mode(mode, lvlm)
    try:
        check_writable(out, force)
        lines = bon.read_jsonl(input)
        records = [r for _, r in lines]
        names = [f"{input} line {ln}" for ln, _ in lines]
        paths = [[] if mode in bon.TEXT_MODES else bon.row_image_paths(r, nm, input.parent)
                 for nm, r in zip(names, records, strict=True)]
    except (RecordError, OSError) as e:
        _fail(str(e))
    scorer = _load_scorer(model, mode, lvlm)
    try:
        rewards = bon.score_records(scorer, records, paths, batch_size=batch_size, names=names)
        write_jsonl_atomic(({**r, "reward": v} for r, v in zip(records, rewards, strict=True)), out, force=force)
    except (RecordError, OSError) as e:
        _fail(str(e))
    typer.echo(f"wrote {out} ({len(rewards)} rows, mean reward {sum(rewards) / len(rewards):+.4f})")


@app.command()
def sweep(
    recipe: Path = typer.Argument(..., help="Merge recipe (YAML) whose parameters are swept."),
    grid: list[str] = typer.Option(..., "--grid", "-g", help=(
        "KEY=start:stop:step (stop included) or KEY=a,b,c; repeat for a product grid. KEY: lambda (alias weight: "
        "the weight of every non-base model), ROLE.PARAM (lvlm|rm|llm), PARAM or parameters.PARAM (top level: "
        "density, epsilon, gamma, t; parameters.lambda is the method's own scaling).")),
    data: Path = typer.Option(..., "--data", help="Validation preference pairs (VL-RewardBench format)."),
    images_dir: Path = typer.Option(None, "--images-dir", help="Folder the records' image paths are relative to."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for sweep.csv and sweep.png."),
    metric: str = typer.Option("overall", "--metric", help="Metric that picks the best point (overall, macro, "
                               "or a category such as hallucination)."),
    save_best: Path = typer.Option(None, "--save-best", help="Build the best point's merge into this directory."),
    seed: int = typer.Option(None, "--seed", help="Seed for random methods (DARE, DELLA); overrides the recipe."),
    force: bool = typer.Option(False, "--force", help="Replace existing sweep outputs and --save-best directory."),
) -> None:
    """Merge every grid point in memory, score preference accuracy on --data, write a CSV and a plot."""
    from .eval.records import load_pref_records
    from .eval.sweep import SweepError, check_grid, parse_grid, sweep_prefs
    from .merge import MergeError, RecipeError, parse_recipe
    from .merge.checkpoint import CheckpointError
    from .merge.embeddings import VocabularyError
    from .merge.families import UnknownFamilyError
    from .merge.writer import OutputExistsError
    from .reward.inputs import InputError
    from .reward.scorer import ScorerError

    warnings.showwarning = _show_warning
    try:
        r = parse_recipe(recipe)
        g = parse_grid(grid)
        check_grid(r, g)  # bad keys fail before the data and models load
        records = load_pref_records(data, images_dir=images_dir)
        rows = sweep_prefs(r, g, records, out_dir=out, metric=metric, save_best=save_best, seed=seed, force=force)
    except (SweepError, RecipeError, MergeError, CheckpointError, VocabularyError, UnknownFamilyError,
            OutputExistsError, InputError, ScorerError, OSError) as e:
        _fail(str(e))
    best = max(rows, key=lambda row: row[metric])
    point = ", ".join(f"{k}={best[k]:g}" for k in g)
    typer.echo(f"{len(rows)} points on {len(records)} pairs; best {metric} {best[metric]:.4f} at {point}")
    typer.echo(f"wrote {out / 'sweep.csv'} and {out / 'sweep.png'}" + (f"; best merge in {save_best}" if save_best else ""))


from .eval.cli import eval_app  # noqa: E402  (light: the eval commands import their dependencies when run)

app.add_typer(eval_app, name="eval")
from .analysis.cli import analyze_app  # noqa: E402  (light: the analyses import their dependencies when run)

app.add_typer(analyze_app, name="analyze")
from .study.cli import study_app  # noqa: E402

app.add_typer(study_app, name="study")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
