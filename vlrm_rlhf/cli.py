"""Command line: ``vlrm-rlhf merge|convert|families|demo|rerank|score|eval|sweep|analyze|study|serve``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from .analysis.cli import analyze_app
from .cli_common import (
    IMAGES_ROOT_HELP,
    TRUST_REMOTE_CODE_HELP,
    attn_option,
    check_mode,
    device_option,
    dtype_option,
    fail,
    handled,
    install_warning_hook,
    load_scorer,
    run_rerank,
)
from .eval.cli import eval_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Vision-language RLHF with merged rewards.")
app.add_typer(eval_app, name="eval")  # light: the eval commands import their dependencies when run
app.add_typer(analyze_app, name="analyze")  # light: the analyses import their dependencies when run


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="mergekit-style YAML recipe with a role per model."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    dtype: str = typer.Option(None, "--dtype", help="Dtype of merged tensors (float32|bfloat16|float16); overrides "
                              "the recipe's. Copied tensors keep theirs unless --out-dtype."),
    out_dtype: str = typer.Option(None, "--out-dtype", help="Cast every output tensor, copied ones too."),
    seed: int = typer.Option(None, "--seed", help="Seed for random methods (DARE, DELLA); overrides the recipe."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept .bin checkpoints (loaded weights_only)."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Largest output shard, e.g. 500MB, 5GB."),
    dry: bool = typer.Option(False, "--dry-run", help="Print the plan (inputs, tensor sources, vocabulary, warnings, "
                             "size, memory, disk) from configs and headers only; write nothing."),
) -> None:
    """Merge checkpoints into a VLRM (output: vlrm) or a merged LVLM (output: lvlm)."""
    from .merge import build

    install_warning_hook()
    with handled():
        if dry:
            from .merge.dryrun import dry_run

            typer.echo(dry_run(recipe, out, force=force, dtype=dtype, out_dtype=out_dtype, seed=seed,
                               allow_pickle=allow_pickle, max_shard_size=max_shard_size).text())
            return
        path = build(recipe, out, force=force, dtype=dtype, seed=seed, allow_pickle=allow_pickle,
                     max_shard_size=max_shard_size, out_dtype=out_dtype)
    typer.echo(f"wrote {path}")


@app.command()
def convert(
    src: Path = typer.Argument(..., help="A value-head VLRM: a causal VLM plus TRL's v_head.summary.* tensors."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically; never over SRC)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """Write a value-head VLRM as the family's XForSequenceClassification (score head with bias), same rewards."""
    from .models.value_head import convert_value_head

    install_warning_hook()
    with handled(OSError):
        path = convert_value_head(src, out, force=force)
    typer.echo(f"wrote {path}")


@app.command()
def families() -> None:
    """List the supported LVLM families."""
    from .models.families import FAMILIES

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

    install_warning_hook()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with handled():
        rep = run_demo(work_dir, seed=seed, quick=quick, with_reasoning=with_reasoning)
    acc, best = rep["accuracy"], rep["best_merge"]
    typer.echo(f"best merge {best}: {100 * acc[best]['overall']:.1f}% overall on held-out pairs; text RM "
               f"{100 * acc['text_rm']['overall']:.1f}%, LVLM judge {100 * acc['lvlm_judge']['overall']:.1f}%, "
               f"no image {100 * acc['no_image']['overall']:.1f}%  (report: {work_dir / 'report.md'})")


# ---- reward scoring of JSONL files: rerank (best-of-n evaluation) and score ---------------------------------
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
    images_root: list[Path] = typer.Option(None, "--images-root", help=IMAGES_ROOT_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    device: str = device_option(),
    dtype: str = dtype_option(),
    attn_implementation: str = attn_option(),
) -> None:
    """Score every response of a best-of-n file and report Pass@1, Pass@N, Random and RM accuracy.

    The last line of stdout is one JSON object with the metrics (percent), n and count.
    """
    import json

    metrics, dt = run_rerank(input, model, mode, lvlm, images_dir, image_key, out, force, batch_size, n, images_root,
                             dict(device=device, dtype=dtype, attn_implementation=attn_implementation,
                                  trust_remote_code=trust_remote_code))
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


@app.command()
def score(
    input: Path = typer.Option(..., "--input", "-i", help="JSONL rows {image|images, prompt, response}."),
    model: Path = typer.Option(..., "--model", "-m", help="Reward model directory (a VLRM, or a text RM)."),
    out: Path = typer.Option(..., "--out", "-o", help="Write the rows back with 'reward' (JSONL, atomic)."),
    mode: str = typer.Option("vlrm", "--mode", help="vlrm | no_image | text_rm | cascade."),
    lvlm: Path = typer.Option(None, "--lvlm", help="Captioning LVLM directory (mode cascade)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Rows per scoring call."),
    images_root: list[Path] = typer.Option(None, "--images-root", help=IMAGES_ROOT_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    device: str = device_option(),
    dtype: str = dtype_option(),
    attn_implementation: str = attn_option(),
) -> None:
    """Reward of each (images, prompt, response) row; image paths are relative to the input file and must lie
    inside its folder (or an --images-root folder). A non-finite reward is an error naming the row."""
    from . import bon
    from .files import check_writable, read_jsonl, write_jsonl_atomic
    from .reward.records import row_image_paths, score_records

    install_warning_hook()
    check_mode(mode, lvlm)
    with handled(OSError):
        check_writable(out, force)
        lines = read_jsonl(input)
        records = [r for _, r in lines]
        names = [f"{input} line {ln}" for ln, _ in lines]
        paths = [[] if mode in bon.TEXT_MODES else row_image_paths(r, nm, input.parent, images_root or ())
                 for nm, r in zip(names, records, strict=True)]
    scorer = load_scorer(model, mode, lvlm, device=device, dtype=dtype, attn_implementation=attn_implementation,
                         trust_remote_code=trust_remote_code)
    with handled(OSError):
        rewards = score_records(scorer, records, paths, batch_size=batch_size, names=names)
        write_jsonl_atomic(({**r, "reward": v} for r, v in zip(records, rewards, strict=True)), out, force=force)
    typer.echo(f"wrote {out} ({len(rewards)} rows, mean reward {sum(rewards) / len(rewards):+.4f})")


@app.command()
def sweep(
    recipe: Path = typer.Argument(..., help="Merge recipe (YAML) whose parameters are swept."),
    grid: list[str] = typer.Option(..., "--grid", "-g", help=(
        "KEY=start:stop:step (stop included) or KEY=a,b,c; repeat for a product grid. KEY: lambda (alias weight: "
        "the weight of every non-base model), ROLE.PARAM (lvlm|vlrm|rm|llm), PARAM or parameters.PARAM (top level: "
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
    from .eval.sweep import check_metric, pref_metrics, sweep_prefs
    from .merge import parse_recipe
    from .merge.grid import check_grid, parse_grid

    install_warning_hook()
    with handled(OSError):
        r = parse_recipe(recipe)
        g = parse_grid(grid)
        check_grid(r, g)  # bad keys fail before the data and models load
        records = load_pref_records(data, images_dir=images_dir)
        check_metric(metric, pref_metrics(records))  # before any model loads
        rows = sweep_prefs(r, g, records, out_dir=out, metric=metric, save_best=save_best, seed=seed, force=force)
    best = max(rows, key=lambda row: row[metric])
    point = ", ".join(f"{k}={best[k]:g}" for k in g)
    typer.echo(f"{len(rows)} points on {len(records)} pairs; best {metric} {best[metric]:.4f} at {point}")
    typer.echo(f"wrote {out / 'sweep.csv'} and {out / 'sweep.png'}" + (f"; best merge in {save_best}" if save_best else ""))


# ---- vlrm-rlhf study ----------------------------------------------------------------------------------------
study_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Studies of RL with merged rewards, measured against ShapesWorld's gold judgement.")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


@study_app.command("rl")
def rl(
    work_dir: Path = typer.Option(Path("runs/study"), "--work-dir", help="Where runs, table and plots go."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated seeds."),
    algos: str = typer.Option("ppo,grpo", "--algos", help="Comma-separated: ppo, grpo."),
    sources: str = typer.Option("text_rm,lvlm_judge,cascade,vlrm,ensemble,gold", "--sources",
                                help="Comma-separated reward sources."),
    demo_dir: str = typer.Option(None, "--demo-dir",
                                 help="The demo's work dir per seed, with {seed} (default WORK/demo_s{seed}); "
                                      "the demo runs there first where its report.json is missing."),
    kl_coef: float = typer.Option(None, "--kl-coef", help="KL coefficient (PPO kl_coef, GRPO beta); default 0.1."),
    updates: int = typer.Option(None, "--updates", help="RL updates per run (default 40)."),
    combine: str = typer.Option(None, "--ensemble-combine", help="mean | min | mean_minus_std."),
    no_normalize: bool = typer.Option(False, "--no-normalize", help="Raw rewards (default: running whitening)."),
    clip: float = typer.Option(None, "--clip", help="Clip (whitened) rewards to [-c, c]."),
    no_bon: bool = typer.Option(False, "--no-bon", help="Skip best-of-n (e.g. for mitigation variants)."),
    quick: bool = typer.Option(False, "--quick", help="Tiny models and budget, one seed (CI)."),
    workers: int = typer.Option(None, "--workers", min=1,
                                help="Child processes for a seed's runs, one thread each (default: one per core, "
                                     "at most 4); results do not depend on it."),
) -> None:
    """Train the ShapesWorld LVLM with PPO and GRPO on each reward source; gold quality table and
    over-optimisation plots (results.json, table.md, overoptimization.png in WORK)."""
    from dataclasses import replace

    from .demo.run import run_demo
    from .study.rl import default_workers, run_study
    from .study.runs import StudySettings

    st = StudySettings.quick() if quick else StudySettings()
    over = {k: v for k, v in {"kl_coef": kl_coef, "updates": updates, "ensemble_combine": combine,
                              "clip": clip}.items() if v is not None}
    if no_normalize:
        over["normalize"] = False
    st = replace(st, **over)
    try:
        seed_list = [int(s) for s in _csv(seeds)]
    except ValueError:
        fail(f"--seeds must be comma-separated integers, got {seeds!r}")
    with handled(ValueError):
        run_study(work_dir, seeds=seed_list[:1] if quick and len(seed_list) > 1 and seeds == "0,1,2" else seed_list,
                  algos=_csv(algos), sources=_csv(sources), demo_dir=demo_dir, quick=quick, settings=st,
                  with_bon=not no_bon, make_demo=run_demo, workers=workers or default_workers())


app.add_typer(study_app, name="study")


@app.command()
def serve(
    model: Path = typer.Option(..., "--model", "-m", help="Reward model directory (a VLRM, or a text RM)."),
    mode: str = typer.Option("vlrm", "--mode", help="vlrm | no_image | text_rm | cascade."),
    lvlm: Path = typer.Option(None, "--lvlm", help="Captioning LVLM directory (mode cascade)."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="Copies of the model, spread over the Ray cluster."),
    gpus_per_replica: float = typer.Option(0.0, "--gpus-per-replica", min=0.0, help="GPUs each replica reserves "
                                           "(the model then loads on cuda unless --device says otherwise)."),
    cpus_per_replica: float = typer.Option(1.0, "--cpus-per-replica", min=0.0, help="CPUs each replica reserves "
                                           "(and its torch threads, at least 1)."),
    max_batch_size: int = typer.Option(16, "--max-batch-size", min=1, help="Most caller requests per batch."),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", min=0.0, help="How long a batch waits to fill up."),
    batching: str = typer.Option("exact", "--batching", help="exact: every reward equals in-process scoring bit "
                                 "for bit | throughput: one plan over all callers (float32 rounding may differ)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="HTTP port of Ray Serve's proxy."),
    route: str = typer.Option("vlrm", "--route", help="URL path of this model (several models can share a cluster)."),
    address: str = typer.Option(None, "--address", help="Ray cluster: auto (the one this node joined), "
                                "ray://HEAD:10001, or none: start a local Ray."),
    allowed_root: Path = typer.Option(None, "--allowed-root", help="Serve image PATHS under this folder (shared "
                                      "file system); without it only base64 images are accepted."),
    max_image_bytes: int = typer.Option(16 << 20, "--max-image-bytes", min=1, help="Largest image file accepted."),
    max_image_pixels: int = typer.Option(4096 * 4096, "--max-image-pixels", min=1, help="Largest image (w x h)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    device: str = device_option(),
    dtype: str = dtype_option(),
    attn_implementation: str = attn_option(),
) -> None:
    """Serve the reward model over HTTP on Ray Serve (batched across callers, replicated); prints the URL to
    pass to ``vlrm_rlhf.reward_funcs(URL)`` (or OpenRLHF's --remote_rm_url URL/openrlhf). Ctrl-C stops it."""
    install_warning_hook()
    check_mode(mode, lvlm)
    if batching not in ("exact", "throughput"):
        fail(f"unknown --batching {batching!r}: use exact or throughput")
    if not (model / "config.json").is_file():
        fail(f"no reward model at --model {model} (no config.json)")
    if allowed_root is not None and not allowed_root.is_dir():
        fail(f"--allowed-root {allowed_root} is not a folder")
    try:
        from .serve.app import ServeConfig
        from .serve.run import ServeError, serve_forever, start_server, stop_server
    except ImportError as e:
        fail(f"vlrm-rlhf serve needs Ray Serve: pip install 'vlrm-rlhf[serve]' ({e})")
    if gpus_per_replica and device is None:
        device = "cuda"  # Ray sets each replica's CUDA_VISIBLE_DEVICES to its own GPUs
    cfg = ServeConfig(model=str(model.resolve()), mode=mode, lvlm=str(lvlm.resolve()) if lvlm else None,
                      load={"device": device, "dtype": dtype, "attn_implementation": attn_implementation,
                            "trust_remote_code": trust_remote_code or None},
                      batching=batching, max_batch_size=max_batch_size, batch_wait_s=batch_wait_ms / 1000,
                      threads=max(1, int(cpus_per_replica)),
                      limits={"max_image_bytes": max_image_bytes, "max_image_pixels": max_image_pixels,
                              "allowed_root": str(allowed_root.resolve()) if allowed_root else None})
    with handled(ServeError):
        try:
            url = start_server(cfg, replicas=replicas, cpus_per_replica=cpus_per_replica,
                               gpus_per_replica=gpus_per_replica, host=host, port=port, route=route,
                               address=None if address in (None, "none") else address)
        except BaseException:
            stop_server()
            raise
    typer.echo(f"serving {model.name} (mode {mode}, {replicas} replica(s)) at {url}", err=True)
    typer.echo(f"OpenRLHF: --remote_rm_url {url}/openrlhf; health {url}/health; ready {url}/ready", err=True)
    typer.echo(url)
    sys.stdout.flush()
    serve_forever()


def main() -> None:
    """Entry point of the ``vlrm-rlhf`` script: warnings-level logging on stderr, then the Typer app."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
