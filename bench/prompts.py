"""Prompt learning on SmolLM2-135M-Instruct: zero-shot, few-shot prompt vs head, soft
prompts vs LoRA, and a template ensemble, on SST-2 and MRPC.

    python bench/prompts.py                        # every experiment
    python bench/prompts.py zero_shot few_shot     # some of them

Experiments (each a real `shardtune eval` / `shardtune run`, 2 workers, 2 CPU cores):
  zero_shot  each hand-written template of recipes/smollm2_sst2_prompt.yaml alone, their
             uniform ensemble, and the ensemble with weights learned on the validation
             split; MRPC's template, calibrated. No training.
  few_shot   16 examples per class (the same 32, seeded): prompt-based LoRA (the template
             and verbalizer, loss on the label words) against head-based LoRA (a new
             classification head on the same backbone), same LoRA, learning rate, epochs.
  soft       soft prompt tuning (20 virtual tokens, frozen model) against LoRA, both
             prompt-based, on 1,000 training sentences (the whole 60 K split is days on
             2 cores), one epoch.
Targets (issue 4): zero-shot SST-2 accuracy >= 0.65; few-shot prompt-based >= 5 points
above head-based. Writes bench/results/prompts.json, merging with earlier results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from shardtune.recipe import load_raw

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SST2, MRPC = ROOT / "recipes" / "smollm2_sst2_prompt.yaml", ROOT / "recipes" / "smollm2_mrpc_prompt.yaml"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
EVAL_EXAMPLES = "data.max_eval_examples=300"


def shardtune(*args: str) -> tuple[dict | None, float, str]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "shardtune.cli", *args], cwd=ROOT, capture_output=True, text=True)
    seconds = round(time.perf_counter() - started, 1)
    if proc.returncode != 0:
        return None, seconds, (proc.stdout + proc.stderr)[-2000:]
    return (json.loads(proc.stdout) if args[0] == "eval" else {}), seconds, ""


def zero_shot(recipe: Path, templates: list[str], extra: list[str]) -> dict:
    results = {}
    for i, template in enumerate(templates):
        scored, seconds, error = shardtune("eval", str(recipe), "--set", EVAL_EXAMPLES, "--set",
                                           "task.templates=" + json.dumps([template]), *sum(
                                               (["--set", e] for e in extra), []))
        results[f"template_{i}"] = {"template": template, "error": error} if error else {
            "template": template, "accuracy": round(scored["accuracy"], 4), "f1": round(scored.get("f1", 0), 4),
            "seconds": seconds}
    if len(templates) > 1:
        for weights in ("uniform", "learned"):
            scored, seconds, error = shardtune("eval", str(recipe), "--set", EVAL_EXAMPLES, "--set",
                                               f"task.template_weights={weights}")
            results[f"ensemble_{weights}"] = {"error": error} if error else {
                "accuracy": round(scored["accuracy"], 4), "seconds": seconds}
    return results


def train(name: str, recipe: Path, overrides: list[str]) -> dict:
    out = RESULTS / "tmp" / f"prompts-{name}"
    _, seconds, error = shardtune("run", str(recipe), f"output.dir={out}", "output.if_exists=overwrite",
                                  EVAL_EXAMPLES, *overrides)
    if error:
        return {"error": error}
    metrics = json.loads((out / "metrics.json").read_text())
    final, summary = metrics["final"], metrics["summary"]
    best = max(metrics["history"], key=lambda h: h["accuracy"])
    return {"accuracy_before": round(metrics["before"]["accuracy"], 4), "accuracy": round(final["accuracy"], 4),
            "f1": round(final.get("f1", 0.0), 4), "best_epoch_accuracy": round(best["accuracy"], 4),
            "train_examples": summary["train_examples"], "trainable_parameters": summary["trainable_parameters"],
            "steps": summary["steps"], "steady_step_s": summary["steady_step_s"], "seconds": seconds}


def head_based(recipe: Path, text_columns: dict) -> list[str]:
    """The same backbone, LoRA and data with a classification head instead of the prompt.
    The GGUF checkpoint's safetensors cache is a plain transformers folder."""
    from shardtune.backbone import model_location
    from shardtune.recipe import load_recipe

    folder = model_location(load_recipe(recipe))
    return [f"model={{path: {folder}}}", "task={type: sequence_classification}",
            "data.columns=" + json.dumps(text_columns)]


def few_shot() -> dict:
    first = json.dumps(load_raw(SST2)["task"]["templates"][:1])  # the recipe's first template alone
    return {
        "sst2_prompt_lora": train("fewshot-sst2-prompt", SST2, [f"task.templates={first}"]),
        "sst2_head_lora": train("fewshot-sst2-head", SST2, head_based(SST2, {"text": "sentence"})),
        "mrpc_prompt_lora": train("fewshot-mrpc-prompt", MRPC, []),
        "mrpc_head_lora": train("fewshot-mrpc-head", MRPC,
                                head_based(MRPC, {"text": "sentence1", "text_b": "sentence2"})),
    }


def soft() -> dict:
    first = json.dumps(load_raw(SST2)["task"]["templates"][:1])  # the recipe's first template alone
    budget = [f"task.templates={first}", "data.few_shot_per_class=null", "data.max_train_examples=1000",
              "train.epochs=1", "train.micro_batch_size=8", "train.log_every_steps=10"]
    return {
        "prompt_tuning": train("soft-prompt-tuning", SST2, [*budget, "adapter={method: prompt_tuning, "
                               "num_virtual_tokens: 20}", "train.learning_rate=3e-2"]),
        "lora": train("soft-lora", SST2, budget),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiments", nargs="*", default=["zero_shot", "few_shot", "soft"])
    args = parser.parse_args()
    path = RESULTS / "prompts.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for experiment in args.experiments:
        print(f"running {experiment} ...", flush=True)
        if experiment == "zero_shot":
            results["zero_shot"] = {"sst2": zero_shot(SST2, load_raw(SST2)["task"]["templates"], []),
                                    "mrpc": zero_shot(MRPC, load_raw(MRPC)["task"]["templates"], [])}
        elif experiment == "few_shot":
            results["few_shot"] = few_shot()
        elif experiment == "soft":
            results["soft_prompt_vs_lora"] = soft()
        print(json.dumps(results.get(experiment if experiment != "soft" else "soft_prompt_vs_lora"), indent=1),
              flush=True)
        path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
