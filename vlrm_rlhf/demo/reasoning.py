"""``vlrm-rlhf demo --with-reasoning``: merge a text "reasoning LLM" into the LVLM and look at the layers.

Trains the reasoning LLM (cached), writes perception / reasoning multiple-choice task files over test images (and
their text twins, the image replaced by its description, for the LLM), builds merged LVLMs (task arithmetic, a
depth ramp, a layer swap), scores them, and runs the three analyses (``params``; ``ablate`` for the LVLM, the LLM
and the merge; ``swap``) whose CSVs and heatmaps land in ``reasoning/``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

KINDS = ("perception", "reasoning")


def reasoning_recipes(dirs: dict[str, Path], n_layers: int, seed: int) -> dict[str, dict]:
    """Merged-LVLM recipes: plain task arithmetic, a linear λ_LLM ramp over depth, and TA with a layer swap."""
    dirs = {k: Path(v).resolve() for k, v in dirs.items()}

    def recipe(name: str, llm_weight: Any, **extra: Any) -> dict:
        return {"name": name, "merge_method": "task_arithmetic", "output": "lvlm", "dtype": "float32", "seed": seed,
                "base_model": str(dirs["base"]), **extra,
                "models": [{"model": str(dirs["lvlm"]), "role": "lvlm", "parameters": {"weight": 1.0}},
                           {"model": str(dirs["llm"]), "role": "llm", "parameters": {"weight": llm_weight}}]}

    half = n_layers // 2
    return {
        "ta": recipe("lvlm+llm task arithmetic", 1.0),
        "ta_ramp": recipe("lvlm+llm, λ_LLM ramp 0→1 over depth", {"schedule": "linear", "start": 0.0, "end": 1.0}),
        f"ta_swap{half}": recipe(f"lvlm+llm, first {half} layers from the LVLM", 1.0, layer_swap={"k": half}),
    }


def _scores(model, processor, tasks) -> dict[str, float]:
    from ..analysis.tasks import TaskScorer

    m = TaskScorer(model, processor).score(tasks).metrics
    return {k: m[k]["accuracy"] for k in KINDS if k in m}


def _main_finding(tables: dict[str, list[dict]]) -> dict[str, Any]:
    """Per model and task kind: the layer whose ablation (whole layer → base) hurts accuracy most, and the mean
    drop in the first vs the second half of the layers."""
    out: dict[str, Any] = {}
    for name, rows in tables.items():
        layer_rows = [r for r in rows if r["module"] == "layer"]
        n = len(layer_rows)
        out[name] = {}
        for kind in KINDS:
            col = f"{kind}_accuracy_drop"
            if not layer_rows or col not in layer_rows[0]:
                continue
            drops = [float(r[col]) for r in layer_rows]
            worst = max(range(n), key=lambda i: drops[i])
            out[name][kind] = {"worst_layer": int(layer_rows[worst]["layer"]), "worst_drop": drops[worst],
                               "early_mean_drop": sum(drops[: n // 2]) / max(1, n // 2),
                               "late_mean_drop": sum(drops[n // 2:]) / max(1, n - n // 2)}
    return out


def reasoning_stage(world, dirs: dict[str, Path], work: Path, *, seed: int, quick: bool, steps: int,
                    n_per_kind: int, progress: bool = True) -> dict[str, Any]:
    """Train the LLM, merge it into the LVLM, score everything, run the layer analyses; returns the numbers."""
    from ..analysis.ablate import ablate, ablation_table, load_lvlm, text_parameters, write_ablation
    from ..analysis.outputs import analysis_dir
    from ..analysis.params import params_for_recipe, write_params
    from ..analysis.swap import LayerSwapper, swap_curve, write_swap
    from ..analysis.tasks import TaskScorer, load_tasks
    from ..merge import build, parse_recipe
    from ..merge.checkpoint import Checkpoint
    from ..worlds.reasoning import train_llm, write_tasks
    from ..worlds.training_utils import cached_log, mark_trained

    out = work / "reasoning"
    out.mkdir(parents=True, exist_ok=True)
    llm = work / "models" / "llm"
    stamp = json.dumps({"seed": seed, "steps": steps, "base": (dirs["base"] / "shapes_train.json").read_text()})
    t0 = time.perf_counter()
    log = cached_log(llm, stamp)
    if log is None:
        log = train_llm(world, dirs["base"], llm, seed, steps=steps, progress=progress)
        mark_trained(llm, stamp, log)
    dirs = {**dirs, "llm": llm}
    task_path, text_task_path = write_tasks(world, out / "tasks", n_per_kind, seed)
    tasks, text_tasks = load_tasks(task_path), load_tasks(text_task_path)
    question_only = [dataclasses.replace(t, image=None) for t in tasks]
    models = {name: load_lvlm(d) for name, d in (("lvlm", dirs["lvlm"]), ("llm", llm), ("base", dirs["base"]))}
    acc: dict[str, dict[str, float]] = {
        "llm (text, gold description)": _scores(*models["llm"][:2], text_tasks),
        "llm (text, question only)": _scores(*models["llm"][:2], question_only),
        "base (text, gold description)": _scores(*models.pop("base")[:2], text_tasks),
        "lvlm": _scores(*models["lvlm"][:2], tasks),
    }
    n_layers = models["lvlm"][0].config.get_text_config().num_hidden_layers
    recipes = reasoning_recipes(dirs, n_layers, seed)
    merged: dict[str, Path] = {}
    for key, r in recipes.items():
        merged[key] = build(r, out / "merges" / key, force=True, progress=False)
        m, p, ck = load_lvlm(merged[key])
        acc[f"merged: {r['name']}"] = _scores(m, p, tasks)
        if key == "ta":
            models["merged_ta"] = (m, p, ck)

    # parameter view: task vectors of LVLM and LLM per layer/module, and the merged model's
    rows_p, names = params_for_recipe(parse_recipe(recipes["ta"]), other_role="llm")
    with analysis_dir(out / "params", force=True) as d:
        write_params(d, rows_p, names)
    # functional view: every (layer, module group) replaced by the base's, for the LVLM and the merged model
    base_ck = Checkpoint(dirs["base"], "base")
    tables = {}
    for name, ts in (("lvlm", tasks), ("llm", text_tasks), ("merged_ta", tasks)):
        model, proc, ck = models[name]  # the LLM answers the same questions from the gold description
        intact, arows = ablate(TaskScorer(model, proc), text_parameters(model, ck), ts, mode="base", base=base_ck)
        tables[name] = ablation_table(intact, arows, "base")
        with analysis_dir(out / f"ablate_{name}", force=True) as d:
            write_ablation(d, tables[name], "base", name)
    # layer-swap curve for the plain merge
    swapper = LayerSwapper(parse_recipe(recipes["ta"]))
    swap_rows = swap_curve(swapper, tasks)
    with analysis_dir(out / "swap", force=True) as d:
        write_swap(d, swap_rows, recipes["ta"]["name"])
    return {"accuracy": acc, "llm_training": log, "n_tasks": {k: sum(t.kind == k for t in tasks) for k in KINDS},
            "finding": _main_finding(tables), "swap": swap_rows, "seconds": round(time.perf_counter() - t0, 1)}
