"""It learns: PPO (``VLPPOTrainer``) on a tiny LLaVA policy with a rule reward whose optimum is known.

Task: images of one dominant colour (red, green or blue: the colour words of the zoo tokenizer's vocabulary),
a shade of it as background plus a small rectangle of another colour; prompt "what color is the image ?".
Reward: 1 if the completion names the image's colour and no other colour, else 0, minus 0.02 per generated word
(so the optimum, about 0.98, is the right colour word alone and then eos). A random policy names the right colour
by chance a few percent of the time (65-token vocabulary). The policy must read the pixels: a colour chosen
without the image scores 1/3 at best.

The policy is the zoo's tiny LLaVA (random vision tower and projector, hidden size ``--hidden``); the value
model is a VLRM merged from the same zoo (what ``launch/ppo.py`` uses by default). Everything runs on CPU, one
thread. Writes ``curve.csv`` (update, mean reward, KL, policy/value loss) and ``curve.png`` to ``--out`` and
prints the mean reward of the first 10 vs the last 10 updates.

Usage: OMP_NUM_THREADS=1 python benchmarks/learning_curve.py [--updates 400] [--out runs/learning_curve]
"""

from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path
from typing import Any

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 50, 220)}
PROMPT = "what color is the image ?"


def colour_images(size: tuple[int, int], per_colour: int, seed: int) -> list[tuple[Any, str]]:
    """``per_colour`` images of each colour: a jittered shade of it, with a small rectangle of another colour."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for name, rgb in COLOURS.items():
        for _ in range(per_colour):
            shade = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in rgb)
            img = Image.new("RGB", size, shade)
            other = COLOURS[rng.choice([c for c in COLOURS if c != name])]
            x, y = rng.randint(0, size[0] // 2), rng.randint(0, size[1] // 2)
            ImageDraw.Draw(img).rectangle((x, y, x + size[0] // 4, y + size[1] // 4), fill=other)
            out.append((img, name))
    return out


def colour_reward(completions: list[Any], colour: list[str], **_: Any) -> list[float]:
    """GRPO-protocol rule reward: 1 for naming the right colour and no other, else 0; minus 0.02 per word."""
    rewards = []
    for completion, want in zip(completions, colour, strict=True):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        words = re.findall(r"[a-z]+", text.lower())
        named = {w for w in words if w in COLOURS}
        rewards.append((1.0 if named == {want} else 0.0) - 0.02 * len(words))
    return rewards


def build(work: Path, hidden: int) -> dict[str, Path]:
    """The zoo LLaVA trio (hidden size ``hidden``) and a VLRM merged from it (the value model)."""
    from vlrm_rlhf.merge import build as merge
    from vlrm_rlhf.testing.zoo import build_trio

    trio = build_trio("llava", work / "zoo", hidden_size=hidden)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(trio["base"]), "output": "vlrm",
              "dtype": "float32", "parameters": {},
              "models": [{"model": str(trio["lvlm"]), "role": "lvlm", "parameters": {"weight": 0.5}},
                         {"model": str(trio["rm"]), "role": "rm", "parameters": {"weight": 1.0}}]}
    merge(recipe, work / "vlrm", progress=False)
    return {**trio, "vlrm": work / "vlrm"}


def plot(rows: list[dict[str, float]], path: Path, title: str) -> None:
    """Mean reward per update (and a 10-update moving average) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["update"] for r in rows]
    y = [r["mean_reward"] for r in rows]
    smooth = [sum(y[max(0, i - 9):i + 1]) / len(y[max(0, i - 9):i + 1]) for i in range(len(y))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(x, y, color="tab:blue", alpha=0.35, lw=1, label="mean reward per update")
    ax.plot(x, smooth, color="tab:blue", lw=2, label="10-update moving average")
    ax.axhline(0.98, color="tab:green", ls="--", lw=1, label="optimum (right colour, 1 word)")
    ax.set(xlabel="PPO update", ylabel="mean reward (objective/scores)", title=title, ylim=(-0.15, 1.05))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    """Build the task, train, write the curve, print first-10 vs last-10 mean reward."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=400)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="prompts per PPO update")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/learning_curve"))
    a = p.parse_args()

    import json

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from vlrm_rlhf.files import write_csv_atomic
    from vlrm_rlhf.trainers import VLPPOConfig, VLPPOTrainer

    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    dirs = build(a.out / "models", a.hidden)
    h, w = json.loads((dirs["lvlm"] / "zoo.json").read_text())["image_size"]
    pairs = colour_images((w, h), per_colour=16, seed=a.seed)
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    ds = Dataset.from_list([{"prompt": prompt, "image": img, "colour": c} for img, c in pairs])
    args = VLPPOConfig(
        output_dir=str(a.out / "train"), per_device_train_batch_size=a.batch // 2, gradient_accumulation_steps=2,
        num_mini_batches=2, num_ppo_epochs=2, total_episodes=a.updates * a.batch, response_length=3,
        stop_token="eos", temperature=1.0, kl_coef=0.02, learning_rate=a.lr, lr_scheduler_type="constant",
        local_rollout_forward_batch_size=a.batch, value_model_path=str(dirs["vlrm"]), use_cpu=True,
        logging_steps=1, report_to="none", save_strategy="no", seed=a.seed, disable_tqdm=True)
    rows: list[dict[str, float]] = []

    class Record(TrainerCallback):
        """Keep the per-update metrics."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            if logs and "objective/scores" in logs:
                rows.append({"update": state.global_step, "mean_reward": logs["objective/scores"],
                             "kl": logs["objective/kl"], "loss_policy": logs["loss/policy_avg"],
                             "loss_value": logs["loss/value_avg"]})

    trainer = VLPPOTrainer(model=str(dirs["lvlm"]), reward_funcs=colour_reward, args=args, train_dataset=ds,
                           callbacks=[Record()])
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    write_csv_atomic(rows, a.out / "curve.csv", force=True)
    first = sum(r["mean_reward"] for r in rows[:10]) / 10
    last = sum(r["mean_reward"] for r in rows[-10:]) / 10
    plot(rows, a.out / "curve.png", f"VLPPOTrainer, tiny LLaVA (hidden {a.hidden}): name the image's colour\n"
                                    f"{len(rows)} updates x {a.batch} prompts, CPU 1 thread, {seconds / 60:.1f} min")
    print(f"updates {len(rows)} in {seconds:.0f} s ({seconds / len(rows):.2f} s/update)")
    print(f"mean reward: first 10 updates {first:.3f}, last 10 updates {last:.3f} (optimum ~0.98)")
    print(f"wrote {a.out / 'curve.csv'} and {a.out / 'curve.png'}")


if __name__ == "__main__":
    main()
