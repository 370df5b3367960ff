"""ShapesWorld merge recipes (the demo's and the RL study's): every registered method with the usual (untuned)
parameters.

Each recipe is written as an ordinary YAML file the user can rerun with ``vlrm-rlhf merge``; the λ grid of
task arithmetic is explored separately by the in-memory sweep and chosen on the validation split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..files import write_text_atomic

# per method: (top-level parameters, lvlm parameters, rm parameters); weights 1 = the paper's task vectors
METHOD_PARAMS: dict[str, tuple[dict, dict, dict]] = {
    "linear": ({}, {"weight": 0.5}, {"weight": 0.5}),
    "task_arithmetic": ({}, {"weight": 1.0}, {"weight": 1.0}),
    "ties": ({}, {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}),
    "dare_linear": ({}, {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}),
    "dare_ties": ({}, {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}),
    "breadcrumbs": ({}, {"weight": 1.0, "density": 0.9, "gamma": 0.01}, {"weight": 1.0, "density": 0.9, "gamma": 0.01}),
    "breadcrumbs_ties": ({}, {"weight": 1.0, "density": 0.9, "gamma": 0.01},
                         {"weight": 1.0, "density": 0.9, "gamma": 0.01}),
    "della": ({}, {"weight": 1.0, "density": 0.5, "epsilon": 0.15}, {"weight": 1.0, "density": 0.5, "epsilon": 0.15}),
    "della_linear": ({}, {"weight": 1.0, "density": 0.5, "epsilon": 0.15},
                     {"weight": 1.0, "density": 0.5, "epsilon": 0.15}),
    "slerp": ({"t": 0.5}, {}, {}),
}


def method_recipe(method: str, dirs: dict[str, Path], seed: int) -> dict[str, Any]:
    """A VLRM recipe for ``method`` over the demo's base, LVLM and text RM directories."""
    top, lv, rm = METHOD_PARAMS[method]
    lvlm, rmd, base = (str(Path(dirs[k]).resolve()) for k in ("lvlm", "rm", "base"))
    r: dict[str, Any] = {"name": f"shapes-{method}", "merge_method": method, "output": "vlrm", "dtype": "float32",
                         "seed": seed}
    if method == "slerp":  # from the LVLM's LM (t=0) to the RM's (t=1): SLERP takes exactly two models
        r.update(base_model=lvlm, parameters=top,
                 models=[{"model": lvlm, "role": "lvlm"}, {"model": rmd, "role": "rm"}])
        return r
    r["models"] = [{"model": lvlm, "role": "lvlm", "parameters": lv}, {"model": rmd, "role": "rm", "parameters": rm}]
    if method != "linear":
        r["base_model"] = base
    if top:
        r["parameters"] = top
    return r


def write_recipes(dirs: dict[str, Path], out: Path, seed: int) -> dict[str, Path]:
    """Write one YAML recipe per method into ``out``; returns {method: path}."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for m in METHOD_PARAMS:
        p = out / f"{m}.yaml"
        write_text_atomic(f"# ShapesWorld VLRM: {m} (written by `vlrm-rlhf demo`)\n"
                          + yaml.safe_dump(method_recipe(m, dirs, seed), sort_keys=False), p, force=True)
        paths[m] = p
    return paths
