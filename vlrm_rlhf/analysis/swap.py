"""Layer-swap curves: the merged LVLM with its first k layers taken from the LVLM, for k = 0 .. L, in memory.

The recipe's merge is computed once (``MergeExecutor.produce``, tensor by tensor) into the LVLM loaded in memory;
the merged language-model tensors are kept, the LVLM's are re-read (memory-mapped) when swapped in, so each k
only copies the tensors that change. k = 0 is the plain merge; at k = L the language model is the LVLM's,
bit for bit. With ``embeddings`` (default) ``embed_tokens`` comes from the LVLM whenever k >= 1 (it feeds the
first layer); the final norm and ``lm_head`` come from it at k = L only. ``part`` swaps only the attention
(``self_attn``) or MLP (``mlp``) tensors of the first k layers. Layers are base-model indices; Mllama's
cross-attention layers stay the LVLM's throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..merge.schedules import LayerSwap, swap_keeps
from . import AnalysisError
from .tasks import Task, TaskScorer

PARTS = {"layer": None, "attention": "self_attn", "mlp": "mlp"}


class LayerSwapper:
    """An ``output: lvlm`` recipe's merged model in memory; ``set_k(k)`` puts the LVLM's tensors in layers < k."""

    def __init__(self, recipe, *, dtype: str | None = None, part: str = "layer", embeddings: bool = True,
                 progress: bool = False):
        from tqdm.auto import tqdm

        from ..merge.engine import MergePlan
        from ..merge.executor import MergeExecutor
        from ..merge.recipe import Recipe, parse_recipe
        from .ablate import load_lvlm

        if part not in PARTS:
            raise AnalysisError(f"unknown part {part!r}; use {', '.join(PARTS)}")
        if not isinstance(recipe, Recipe):
            recipe = parse_recipe(recipe if not isinstance(recipe, str) else Path(recipe))
        if recipe.output != "lvlm":
            raise AnalysisError("swap curves need an `output: lvlm` recipe (a generative merged LVLM to run the tasks)")
        self.recipe = recipe.model_copy(update={"layer_swap": None})  # the curve sets the swap itself
        self.plan = plan = MergePlan(self.recipe, dtype=dtype)
        executor = MergeExecutor(plan, track_ancestry=False)
        if plan.out_vocab.appended:
            raise AnalysisError(f"the merge appends {len(plan.out_vocab.appended)} donor-only token(s) to the LVLM's "
                                "vocabulary; swap curves need models sharing the LVLM's vocabulary")
        self.part, self.embeddings, self.n_layers = part, embeddings, plan.n_layers
        self.model, self.processor, _ = load_lvlm(plan.lvlm.name, dtype=plan.out_dtype)
        named = dict(self.model.named_parameters(remove_duplicate=False)) | dict(self.model.named_buffers())
        self._targets: dict[str, torch.Tensor] = {}
        self._merged: dict[str, torch.Tensor] = {}
        self.canon: dict[str, str] = {}  # output tensor name -> canonical text key, for merged tensors
        for name, p in tqdm(list(plan.producers.items()), desc="swap: merge", disable=not progress):
            if name not in named:
                raise AnalysisError(f"merged tensor {name} is not a parameter of the loaded {type(self.model).__name__}")
            t, dst = executor.produce(name), named[name]
            if tuple(t.shape) != tuple(dst.shape) or t.dtype != dst.dtype:
                raise AnalysisError(f"merged tensor {name}: {tuple(t.shape)} {t.dtype}, model {tuple(dst.shape)} {dst.dtype}")
            with torch.no_grad():
                dst.copy_(t)
            if p.kind in ("merge", "vocab"):
                self._targets[name], self._merged[name], self.canon[name] = dst, t.clone(), p.key
        self._from_lvlm = dict.fromkeys(self.canon, False)
        self.k = 0

    def swap_for(self, k: int) -> LayerSwap:
        """The ``layer_swap`` that point k of the curve stands for."""
        if not 0 <= k <= self.n_layers:
            raise AnalysisError(f"k = {k} is out of range 0..{self.n_layers}")
        return LayerSwap(k=k, embeddings=self.embeddings and k >= 1, final=k == self.n_layers and self.part == "layer",
                         filter=PARTS[self.part])

    def set_k(self, k: int) -> None:
        """Make the model's language model the LVLM's in layers < k (see ``swap_for``), the merge elsewhere."""
        swap, lv = self.swap_for(k), self.plan.lvlm.ckpt
        with torch.no_grad():
            for name, canon in self.canon.items():
                want = swap_keeps(swap, canon)
                if want != self._from_lvlm[name]:
                    dst = self._targets[name]
                    dst.copy_(lv.get(lv.text[canon]).to(dst.dtype) if want else self._merged[name])
                    self._from_lvlm[name] = want
        self.k = k


def swap_curve(swapper: LayerSwapper, tasks: Sequence[Task], *, scorer: TaskScorer | None = None,
               ks: Sequence[int] | None = None, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Task metrics for every k (default 0 .. L): one CSV row per k."""
    scorer = scorer or TaskScorer(swapper.model, swapper.processor)
    rows = []
    for k in ks if ks is not None else range(swapper.n_layers + 1):
        swapper.set_k(k)
        s = swapper.swap_for(k)
        row: dict = {"k": k, "part": swapper.part, "embeddings_from_lvlm": s.embeddings, "final_from_lvlm": s.final}
        for kind, m in scorer.score(tasks).metrics.items():
            row[f"{kind}_accuracy"], row[f"{kind}_logprob"] = m["accuracy"], m["logprob"]
        rows.append(row)
        if progress is not None:
            progress(f"k = {k}: " + ", ".join(f"{c} {v:.3f}" for c, v in row.items() if c.endswith("accuracy")))
    return rows


def write_swap(out: Path, rows: Sequence[dict], recipe_name: str) -> list[Path]:
    """``swap.csv`` and ``swap.png``: accuracy and log p(correct) vs k, one line per task kind."""
    from ..files import write_csv_atomic
    from .plots import curves

    files = [write_csv_atomic(rows, out / "swap.csv")]
    kinds = [c.removesuffix("_accuracy") for c in rows[0] if c.endswith("_accuracy")] if rows else []
    ks = [r["k"] for r in rows]
    panels = {"accuracy": {kind: [r[f"{kind}_accuracy"] for r in rows] for kind in kinds},
              "mean log p(correct choice)": {kind: [r[f"{kind}_logprob"] for r in rows] for kind in kinds}}
    part = rows[0]["part"] if rows else "layer"
    what = "layers" if part == "layer" else f"layers' {part} tensors"
    files.append(curves(out / "swap.png", ks, panels, xlabel=f"k: first k {what} from the LVLM (0 = plain merge)",
                        title=f"Layer swap: {recipe_name}", ylims={"accuracy": (-0.02, 1.02)}))
    return files
