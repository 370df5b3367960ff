"""``vlrm-rlhf eval prefs|bon``: preference accuracy (VL-RewardBench format) and best-of-n evaluation.

Registered on the main app as ``eval``. Heavy imports (torch, transformers) happen inside the commands, so
importing this module (and ``vlrm-rlhf --help``) stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..cli_common import (
    IMAGES_ROOT_HELP,
    TRUST_REMOTE_CODE_HELP,
    attn_option,
    check_mode,
    device_option,
    dtype_option,
    fail,
    first_line,
    install_warning_hook,
    load_scorer,
    run_rerank,
)
from ..errors import VLRMError

eval_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Evaluate reward models: preference accuracy (prefs) and best-of-n reranking (bon).")

PREF_MODES = ("vlrm", "no_image", "text_rm", "cascade", "judge", "genjudge")


def _outputs(out: Path | None, force: bool, suffixes: tuple[str, ...]) -> list[Path]:
    """``out`` and its siblings (``out`` with each suffix), all checked writable before any work is done."""
    if out is None:
        return []
    if out.suffix in suffixes:
        fail(f"--out is the JSON results file; {out.suffix} files are written next to it")
    paths = [out, *(out.with_suffix(s) for s in suffixes)]
    from ..files import check_writable

    for p in paths:
        try:
            check_writable(p, force)
        except OSError as e:
            fail(str(e))
    return paths


@eval_app.command("prefs")
def prefs(
    data: Path = typer.Argument(..., help="Preference pairs: .jsonl, .json, .parquet or a save_to_disk folder."),
    model: Path = typer.Option(None, "--model", "-m", help="Reward model directory (VLRM or text RM); the LVLM for --mode judge."),
    mode: str = typer.Option("vlrm", "--mode", help="vlrm | no_image | text_rm | cascade | judge | genjudge (--judge-config)."),
    lvlm: Path = typer.Option(None, "--lvlm", help="Captioning LVLM (mode cascade) or the judge LVLM (mode judge)."),
    judge_kind: str = typer.Option("loglik_sum", "--judge-kind", help="loglik_sum | loglik_mean | yes_no (mode judge)."),
    judge_template: str = typer.Option(None, "--judge-template", help="yes_no prompt with {question} and {answer}."),
    images_dir: Path = typer.Option(None, "--images-dir", help="Folder that relative image paths are looked up in first."),
    images_root: list[Path] = typer.Option(None, "--images-root", help=IMAGES_ROOT_HELP),
    split: str = typer.Option(None, "--split", help="Split of a save_to_disk DatasetDict (default: test, or the only one)."),
    out: Path = typer.Option(None, "--out", "-o", help="Results JSON; RESULTS.md and RESULTS.records.jsonl go next to it."),
    force: bool = typer.Option(False, "--force", help="Replace existing output files."),
    limit: int = typer.Option(None, "--limit", min=1, help="Evaluate only the first N rows."),
    tol: float = typer.Option(0.0, "--tol", min=0.0, help="Scores closer than this count as a tie (credit 0.5)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Preference pairs per scoring call."),
    ties: str = typer.Option("skip", "--human-ties", help="Records with tied human ranks: skip (counted) | error."),
    label: str = typer.Option(None, "--label", help="Row label in the table (default: mode and model name)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    fmt: str = typer.Option("auto", "--format", help="auto | vl-rewardbench | multimodal-rewardbench | mm-rlhf | rlaif-v."),
    judge_config: Path = typer.Option(None, "--judge-config", help="Generative judge YAML (mode genjudge)."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    attn_implementation: str = attn_option(),
) -> None:
    """Preference accuracy per category (micro and macro) with ties credited 0.5; prints a markdown table."""
    import time

    from ..files import write_json_atomic, write_jsonl_atomic, write_text_atomic
    from .prefs import evaluate_prefs
    from .records import load_pref_data
    from .report import markdown_table

    install_warning_hook()
    if mode not in PREF_MODES:
        fail(f"unknown --mode {mode!r}: use {', '.join(PREF_MODES)}")
    if ties not in ("skip", "error"):
        fail(f"--human-ties must be skip or error, not {ties!r}")
    if mode == "genjudge":
        if judge_config is None or (model is None) == (lvlm is None):
            fail("--mode genjudge needs --judge-config YAML and the judge LVLM as --model DIR (or --lvlm DIR)")
        scorer_dir = model or lvlm
    elif judge_config is not None:
        fail("--judge-config is only used with --mode genjudge")
    elif mode == "judge":
        from .judge import JUDGE_KINDS

        if judge_kind not in JUDGE_KINDS:
            fail(f"unknown --judge-kind {judge_kind!r}: use {', '.join(JUDGE_KINDS)}")
        if (model is None) == (lvlm is None):
            fail("--mode judge needs the judge LVLM as --model DIR (or --lvlm DIR), exactly one of them")
        scorer_dir = model or lvlm
    else:
        if judge_template is not None:
            fail("--judge-template is only used with --mode judge")
        check_mode(mode, lvlm)
        if model is None:
            fail(f"--mode {mode} needs --model DIR (the reward model)")
        scorer_dir = model
    paths = _outputs(out, force, (".md", ".records.jsonl"))
    try:
        loaded = load_pref_data(data, images_dir=images_dir, images_root=images_root or (),
                                limit=limit, split=split, ties=ties, fmt=fmt)  # type: ignore[arg-type]
    except VLRMError as e:  # PrefDataError: the file, row or field at fault
        fail(str(e))
    if mode == "genjudge":
        from ..reward.generative import GenerativeJudge

        try:
            scorer = GenerativeJudge.from_pretrained(scorer_dir, judge_config)
        except (VLRMError, OSError, ValueError) as e:
            fail(f"cannot load generative judge {scorer_dir} with {judge_config}: {first_line(e)}")
    elif mode == "judge":
        from .judge import DEFAULT_TEMPLATE, LVLMJudge

        try:
            scorer = LVLMJudge.from_pretrained(scorer_dir, kind=judge_kind,  # type: ignore[arg-type]
                                               template=judge_template or DEFAULT_TEMPLATE)
        except (VLRMError, OSError, ValueError) as e:
            fail(f"cannot load judge model {scorer_dir}: {first_line(e)}")
    else:
        scorer = load_scorer(scorer_dir, mode, lvlm, device=device, dtype=dtype,
                             attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    t0 = time.perf_counter()
    try:
        if mode == "genjudge":
            from .genjudge import evaluate_judge

            result = evaluate_judge(scorer, loaded.records)  # type: ignore[arg-type]
        else:
            result = evaluate_prefs(scorer, loaded.records, tol=tol, batch_size=batch_size)
    except (VLRMError, ValueError) as e:
        fail(str(e))
    dt = time.perf_counter() - t0
    label = label or f"{mode}{':' + judge_kind if mode == 'judge' else ''} ({Path(scorer_dir).name})"
    table = markdown_table({label: result.metrics})
    skipped = f", {len(loaded.skipped)} skipped as human ties" if loaded.skipped else ""
    if "unparsed" in result.metrics:
        skipped += (f"; judge: {result.metrics['judge_calls']} prompts, {result.metrics['unparsed']} unparsed "
                    f"outputs, {result.metrics['unparsed_records']} pairs without a verdict")
    head = f"preference accuracy on {data} ({result.metrics['n']} pairs{skipped}; {dt:.1f} s)"
    typer.echo(head)
    typer.echo(table, nl=False)
    if paths:
        out_json, out_md, out_rec = paths
        summary = {"data": str(data), "format": loaded.format, "mode": mode, "model": str(scorer_dir), "lvlm": str(lvlm) if lvlm else None,
                   "judge_kind": judge_kind if mode == "judge" else None,
                   "judge_config": str(judge_config) if judge_config else None, "label": label, "tol": tol, "limit": limit,
                   "skipped_human_ties": loaded.skipped, "seconds": round(dt, 3), "metrics": result.metrics,
                   "records_file": out_rec.name}
        try:  # the JSON last: its presence means the run is complete
            write_jsonl_atomic(result.rows, out_rec, force=force)
            write_text_atomic(f"# {head}\n\n{table}", out_md, force)
            write_json_atomic(summary, out_json, force)
        except (OSError, ValueError) as e:
            fail(str(e))
        typer.echo(f"wrote {out_json}, {out_md.name}, {out_rec.name}")


@eval_app.command("bon")
def bon(
    data: Path = typer.Argument(..., help="Best-of-n JSONL (id, input, responses, correctness)."),
    model: Path = typer.Option(..., "--model", "-m", help="Reward model directory (a VLRM, or a text RM)."),
    mode: str = typer.Option("vlrm", "--mode", help="vlrm | no_image | text_rm | cascade."),
    lvlm: Path = typer.Option(None, "--lvlm", help="Captioning LVLM directory (mode cascade)."),
    images_dir: Path = typer.Option(None, "--images-dir", help="Folder of images named {id}.jpg|.png."),
    image_key: str = typer.Option("id", "--image-key", help="Row field that names the image file."),
    out: Path = typer.Option(None, "--out", "-o", help="Metrics JSON; RESULTS.md goes next to it."),
    scores_out: Path = typer.Option(None, "--scores-out", help="Write the rows back with 'scores' (JSONL)."),
    force: bool = typer.Option(False, "--force", help="Replace existing output files."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Rows per scoring call for rows without images."),
    n: int = typer.Option(None, "--n", min=1, help="Evaluate only the first n responses of each row."),
    label: str = typer.Option(None, "--label", help="Row label in the table (default: mode and model name)."),
    images_root: list[Path] = typer.Option(None, "--images-root", help=IMAGES_ROOT_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    device: str = device_option(),
    dtype: str = dtype_option(),
    attn_implementation: str = attn_option(),
) -> None:
    """Best-of-n reranking: Pass@1, Pass@N, Random, RM accuracy and tie rate as a markdown table.

    The same scoring as ``vlrm-rlhf rerank``; the last line of stdout is the same metrics JSON.
    """
    import json

    from ..files import write_json_atomic, write_text_atomic
    from .report import bon_markdown_table

    install_warning_hook()
    paths = _outputs(out, force, (".md",))
    metrics, dt = run_rerank(data, model, mode, lvlm, images_dir, image_key, scores_out, force, batch_size, n,
                             images_root, dict(device=device, dtype=dtype, attn_implementation=attn_implementation,
                                               trust_remote_code=trust_remote_code))
    label = label or f"{mode} ({model.name})"
    table = bon_markdown_table({label: metrics})
    head = f"best-of-{metrics['n']} on {data} ({metrics['count']} rows; {dt:.1f} s)"
    typer.echo(head)
    typer.echo(table, nl=False)
    if paths:
        try:
            write_text_atomic(f"# {head}\n\n{table}", paths[1], force)
            write_json_atomic({"data": str(data), "mode": mode, "model": str(model), "label": label,
                               "seconds": round(dt, 3), "metrics": metrics}, paths[0], force)
        except (OSError, ValueError) as e:
            fail(str(e))
        typer.echo(f"wrote {paths[0]}, {paths[1].name}")
    typer.echo(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
