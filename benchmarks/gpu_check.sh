#!/usr/bin/env bash
# One-GPU check of the GPU path (no network, ~8 min on one H100): builds its own tiny models, then
#   1. benchmarks/scoring.py on cuda in bf16: batched score() vs one forward per pair (target >= 5x);
#   2. benchmarks/sweep.py on cuda: in-memory re-merge + scoring vs merge-to-disk + load (target >= 10x);
#   3. a 3-step GRPO run (TRL GRPOTrainer) with VLRMReward on cuda in bf16, policy in bf16;
# and prints one table. Fails at once, saying so, when no CUDA device is visible.
# Run from the repository root:  bash benchmarks/gpu_check.sh [WORK_DIR]
set -euo pipefail
PY=${PYTHON:-python}
WORK=${1:-runs/gpu_check}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=${PYTHONPATH:-.}
mkdir -p "$WORK"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: FAIL: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1))." >&2
    echo "gpu_check: run it on a machine with a GPU and a CUDA build of torch." >&2
    exit 2
fi
"$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'

t0=$(date +%s)
timeout 240 "$PY" benchmarks/scoring.py --work-dir "$WORK/scoring" --device cuda --dtype bfloat16 \
    --pairs 64 --repeats 3 --json "$WORK/scoring.json" | tail -n 15
timeout 240 "$PY" benchmarks/sweep.py --work-dir "$WORK/sweep" --device cuda --quiet-wait 0 \
    --json "$WORK/sweep.json" | tail -n 15
timeout 180 "$PY" - "$WORK/grpo" <<'PYEOF'
"""3 GRPO steps on cuda in bf16 with a VLRM reward; writes grpo.json."""
import json, math, sys, time
from pathlib import Path

import torch
from datasets import Dataset
from PIL import Image
from trl import GRPOConfig, GRPOTrainer

from vlrm_rlhf.merge import build
from vlrm_rlhf.reward.trl import VLRMReward
from vlrm_rlhf.testing import zoo

work = Path(sys.argv[1]).resolve()
trio = zoo.build_trio("llava", work / "trio")
vlrm = build(zoo.write_quick_recipe(trio, work / "recipe.yaml"), work / "vlrm", force=True, progress=False)
reward = VLRMReward(vlrm, device="cuda", dtype="bfloat16")
assert next(reward.scorer.model.parameters()).dtype is torch.bfloat16
images = [Image.new("RGB", (32, 32), (40 * i, 90, 200 - 40 * i)) for i in range(4)]
rows = [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}], "image": im}
        for t, im in zip(["what color is the cat ?", "is there a dog ?", "describe the picture .",
                          "what is in the sky ?"], images)]
args = GRPOConfig(output_dir=str(work / "out"), report_to="none", max_completion_length=8, num_generations=2,
                  per_device_train_batch_size=2, max_steps=3, save_strategy="no", bf16=True, seed=0, logging_steps=1,
                  model_init_kwargs={"dtype": torch.bfloat16})
t = time.perf_counter()
trainer = GRPOTrainer(model=str(trio["lvlm"]), reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows))
trainer.train()
logs = [h for h in trainer.state.log_history if any(k.startswith("rewards/") and k.endswith("/mean") for k in h)]
means = [v for h in logs for k, v in h.items() if k.startswith("rewards/") and k.endswith("/mean")]
ok = trainer.state.global_step == 3 and len(means) >= 3 and all(math.isfinite(v) for v in means)
res = {"steps": trainer.state.global_step, "seconds": time.perf_counter() - t, "reward_means": means,
       "reward_device": str(reward.scorer.device), "pass": ok}
(work.parent / "grpo.json").write_text(json.dumps(res))
print(json.dumps(res))
PYEOF

"$PY" - "$WORK" <<'PYEOF'
"""One table from the three JSON results."""
import json, sys
from pathlib import Path

w = Path(sys.argv[1])
rows = []
sc = json.loads((w / "scoring.json").read_text())
sp = next(r for r in sc["results"] if "speedup" in r["measure"])
rows.append(("scoring: batched / one-per-forward", f"{sp['value']:.1f}x", ">= 5x", sp["value"] >= 5))
sw = json.loads((w / "sweep.json").read_text())
ratio = next(r["value"] for r in sw["results"] if r["measure"].startswith("per point, disk warm"))
rows.append(("sweep: disk (build+load) / in-memory", f"{ratio:.1f}x", ">= 10x", ratio >= 10))
g = json.loads((w / "grpo.json").read_text())
rows.append(("GRPO, VLRMReward on cuda bf16, 3 steps", f"{g['seconds']:.0f} s", "finite", g["pass"]))
print(f"\n{'check':<42} {'value':>10}  {'target':<8} result")
for name, v, t, ok in rows:
    print(f"{name:<42} {v:>10}  {t:<8} {'PASS' if ok else 'FAIL'}")
PYEOF
echo "gpu_check: done in $(( $(date +%s) - t0 )) s"
