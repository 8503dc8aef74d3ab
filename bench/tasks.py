"""Quality benchmark for the encoder recipes: LoRA (as shipped) against full fine-tuning of
the same backbone on the same seeded split, and against the Hugging Face Trainer + peft
training the same LoRA set-up in one process (bench/hf_trainer.py).

    python bench/tasks.py                       # every encoder recipe (hours on 2 CPU cores)
    python bench/tasks.py stsb squad            # some of them
    python bench/tasks.py stsb --methods lora   # LoRA only (methods: lora full hf)
    python bench/tasks.py cola --methods lora --set adapter.r=16 train.learning_rate=1e-3 \
        --as lora_r16_lr1e-3                    # a variant, stored under its own name

Writes bench/results/tasks.json, merging with earlier results (one entry per recipe and
method), and prints the table. Floors (issue 6): SST-2 accuracy 0.87, MRPC F1 0.80,
STS-B Pearson 0.80, CoNLL-2003 entity F1 0.85, CoLA MCC 0.25, SQuAD F1 50.
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

# recipe -> (headline metric, floor)
RECIPES = {
    "sst2": ("accuracy", 0.87), "cola": ("mcc", 0.25), "mrpc": ("f1", 0.80),
    "stsb": ("pearson", 0.80), "conll2003": ("entity_f1", 0.85), "wikiann": ("entity_f1", None),
    "squad": ("f1", 50.0),
}
# Full fine-tuning trains every weight: a smaller learning rate, as in the BERT paper.
METHODS = {"lora": [], "full": ["adapter={method: none}", "train.learning_rate=5e-5"], "hf": []}


def run_one(name: str, method: str, overrides: list[str], label: str) -> dict:
    out = RESULTS / "tmp" / f"{name}-{label}"
    recipe = str(ROOT / "recipes" / f"{name}.yaml")
    if method == "hf":
        cmd = [sys.executable, str(ROOT / "bench" / "hf_trainer.py"), recipe, *overrides,
               "--out", str(out / "metrics.json")]
    else:
        cmd = [sys.executable, "-m", "shardtune.cli", "run", recipe, f"output.dir={out}",
               "output.if_exists=overwrite", *METHODS[method], *overrides]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr)[-2000:]}
    metrics = json.loads((out / "metrics.json").read_text())
    if method == "hf":
        metrics["summary"] = {"trainable_parameters": metrics["trainable_parameters"], "steps": metrics["steps"]}
        metrics["history"] = []
    metric, floor = RECIPES[name]
    value = metrics["final"][metric]
    return {"metric": metric, "value": round(value, 4), "before": round(metrics["before"][metric], 4),
            "floor": floor, "meets_floor": None if floor is None else value >= floor,
            "seconds": round(time.perf_counter() - started, 1),
            "trainable_parameters": metrics["summary"]["trainable_parameters"],
            "steps": metrics["summary"]["steps"], "final": metrics["final"], "history": metrics["history"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES) + [[]])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="recipe overrides for a variant (store it with --as)")
    parser.add_argument("--as", dest="label", help="store the result under this name instead of the method's")
    args = parser.parse_args()
    if args.label and len(args.methods) != 1:
        parser.error("--as names one method's result: give exactly one --methods")
    if args.overrides and (not args.label or args.label in METHODS):
        # Stored under a method's name, a variant would replace the shipped recipe's cell
        # (and the lora_minus_* comparisons made from it).
        parser.error("--set makes a variant of the recipe: name its result with --as NAME, "
                     f"a name other than {', '.join(METHODS)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "tasks.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in args.recipes or list(RECIPES):
        for method in args.methods:
            label = args.label or method
            print(f"running {name} / {label} ...", flush=True)
            entry = run_one(name, method, args.overrides, label)
            if args.overrides:
                entry["overrides"] = args.overrides
            results.setdefault(name, {})[label] = entry
            path.write_text(json.dumps(results, indent=2) + "\n")  # keep what finished
            print(f"  {entry.get('metric')}: {entry.get('value')} in {entry.get('seconds')} s"
                  if "error" not in entry else f"  failed: {entry['error'][-300:]}", flush=True)
    for name, by_method in results.items():
        lora = by_method.get("lora", {})
        for other in ("full", "hf"):
            if "value" in lora and "value" in by_method.get(other, {}):
                by_method[f"lora_minus_{other}"] = round(lora["value"] - by_method[other]["value"], 4)
    path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
