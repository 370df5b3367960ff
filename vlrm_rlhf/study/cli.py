"""``vlrm-rlhf study rl``: the reward-source RL study from the command line."""

from __future__ import annotations

from pathlib import Path

import typer

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
) -> None:
    """Train the ShapesWorld LVLM with PPO and GRPO on each reward source; gold quality table and
    over-optimisation plots (results.json, table.md, overoptimization.png in WORK)."""
    from dataclasses import replace

    from .rl import StudySettings, run_study

    st = StudySettings.quick() if quick else StudySettings()
    over = {k: v for k, v in {"kl_coef": kl_coef, "updates": updates, "ensemble_combine": combine,
                              "clip": clip}.items() if v is not None}
    if no_normalize:
        over["normalize"] = False
    st = replace(st, **over)
    try:
        seed_list = [int(s) for s in _csv(seeds)]
    except ValueError:
        typer.secho(f"error: --seeds must be comma-separated integers, got {seeds!r}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    try:
        run_study(work_dir, seeds=seed_list[:1] if quick and len(seed_list) > 1 and seeds == "0,1,2" else seed_list,
                  algos=_csv(algos), sources=_csv(sources), demo_dir=demo_dir, quick=quick, settings=st,
                  with_bon=not no_bon)
    except ValueError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
