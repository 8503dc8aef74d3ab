"""Causal-LM benchmark on SmolLM2-135M-Instruct: perplexity and a task score before and
after tuning.

    python bench/causal_lm.py                          # both SmolLM2 recipes
    python bench/causal_lm.py smollm2_sst2_instruct    # one

For each recipe: run it (shardtune run), read validation perplexity before and after
from metrics.json; for the instruction recipe also generate answers for the same
seeded validation split with the untuned base model and with the tuned run, and score
exact match of the first word against the expected response. Writes
bench/results/causal_lm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
RECIPES = ["smollm2_sst2_instruct", "smollm2_bbc_text"]


def first_word(text: str) -> str:
    words = text.strip().lower().replace(".", " ").split()
    return words[0] if words else ""


def exact_match(records: list[dict]) -> float:
    return sum(first_word(r["prediction"]) == first_word(r["response"]) for r in records) / len(records)


def task_scores(run_dir: Path, recipe_path: Path, limit: int) -> dict:
    """Exact match of generated answers on the run's validation split, untuned vs tuned."""
    import torch

    from shardtune import backbone
    from shardtune.data import read_rows, sample, split_train_validation
    from shardtune.inference import load_run
    from shardtune.recipe import load_recipe
    from shardtune.tasks import get_task

    torch.set_num_threads(2)
    recipe = load_recipe(recipe_path)
    rows = read_rows(recipe.data.train)
    _, validation = split_train_validation(rows, recipe.data.validation_split, recipe.train.seed)
    validation = sample(validation, limit, recipe.train.seed)
    task = get_task(recipe)
    tokenizer = backbone.load_tokenizer(recipe)
    base = backbone.load_model(recipe, task, tokenizer)
    started = time.perf_counter()
    untuned = task.generate(base, tokenizer, validation, batch_size=16)
    tuned_run = load_run(run_dir)
    tuned = tuned_run.task.generate(tuned_run.model, tuned_run.tokenizer, validation, batch_size=16)
    return {"examples": len(validation), "exact_match_untuned": round(exact_match(untuned), 4),
            "exact_match_tuned": round(exact_match(tuned), 4),
            "generation_seconds": round(time.perf_counter() - started, 1),
            "samples": [{"prompt_tail": u["prompt"][-80:], "untuned": u["prediction"], "tuned": t["prediction"],
                         "expected": t["response"]} for u, t in list(zip(untuned, tuned))[:5]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipes", nargs="*", default=RECIPES, choices=RECIPES + [[]])
    parser.add_argument("--eval-limit", type=int, default=200, help="validation rows to generate for")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "causal_lm.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in args.recipes or RECIPES:
        recipe = ROOT / "recipes" / f"{name}.yaml"
        out = RESULTS / "tmp" / name
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "shardtune.cli", "run", str(recipe), f"output.dir={out}",
                               "output.if_exists=overwrite"], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            results[name] = {"error": (proc.stdout + proc.stderr)[-2000:]}
            continue
        metrics = json.loads((out / "metrics.json").read_text())
        entry = {"perplexity_untuned": round(metrics["before"]["perplexity"], 3),
                 "perplexity_tuned": round(metrics["final"]["perplexity"], 3),
                 "run_seconds": round(time.perf_counter() - started, 1),
                 "steps": metrics["summary"]["steps"],
                 "trainable_parameters": metrics["summary"]["trainable_parameters"],
                 "steady_step_s": metrics["summary"]["steady_step_s"]}
        if "instruct" in name:
            entry.update(task_scores(out, recipe, args.eval_limit))
        results[name] = entry
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(name, json.dumps(entry, indent=2), flush=True)


if __name__ == "__main__":
    main()
