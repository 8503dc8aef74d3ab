"""Adapter methods compared on the same recipe: trainable parameters, peak memory per worker,
steady step time and the final metric, for LoRA, QLoRA (4-bit nf4), DoRA, IA3, prompt
tuning, prefix tuning and full fine-tuning.

    python bench/adapters.py                       # sst2 (encoder) and smollm2 (causal LM)
    python bench/adapters.py sst2 --methods lora qlora

Each method runs the shipped recipe with the overrides below and a budget that fits 2 CPU
cores (sst2: one epoch; smollm2: 60 steps on the instruction recipe), in one benchmark run,
so the methods are compared on the same split, order and budget. Learning rates are the
usual ones per method (prompt methods need far larger rates; full fine-tuning smaller).
Writes bench/results/adapters.json, merging with earlier results.
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

# recipe -> (shipped recipe, budget overrides, headline metric, higher is better)
RECIPES = {
    "sst2": ("sst2", ["train.epochs=1"], "accuracy", True),
    "smollm2": ("smollm2_sst2_instruct", ["train.max_steps=60", "data.max_eval_examples=100"], "loss", False),
}
# method -> overrides (an adapter override replaces the whole section)
METHODS = {
    "lora": [],
    "qlora": ["quantization={mode: nf4, double_quant: true}"],
    "dora": ["adapter.use_dora=true"],
    "ia3": ["adapter={method: ia3}", "train.learning_rate=5e-3"],
    "prompt_tuning": ["adapter={method: prompt_tuning, num_virtual_tokens: 20}", "train.learning_rate=3e-2"],
    "prefix_tuning": ["adapter={method: prefix_tuning, num_virtual_tokens: 20}", "train.learning_rate=1e-2"],
    "full": ["adapter={method: none}", "train.learning_rate=5e-5"],
}


def run_one(name: str, method: str) -> dict:
    recipe, budget, metric, _ = RECIPES[name]
    out = RESULTS / "tmp" / f"adapters-{name}-{method}"
    cmd = [sys.executable, "-m", "shardtune.cli", "run", str(ROOT / "recipes" / f"{recipe}.yaml"),
           f"output.dir={out}", "output.if_exists=overwrite", *budget, *METHODS[method]]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr)[-2000:]}
    metrics = json.loads((out / "metrics.json").read_text())
    summary = metrics["summary"]
    return {"metric": metric, "before": round(metrics["before"][metric], 4),
            "value": round(metrics["final"][metric], 4),
            "trainable_parameters": summary["trainable_parameters"], "total_parameters": summary["total_parameters"],
            "peak_memory_mb_per_worker": summary["peak_memory_mb_per_worker"],
            "steady_step_s": summary["steady_step_s"], "steps": summary["steps"],
            "seconds": round(time.perf_counter() - started, 1), "final": metrics["final"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    path = RESULTS / "adapters.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in args.recipes or list(RECIPES):
        for method in args.methods:
            print(f"running {name} / {method} ...", flush=True)
            results.setdefault(name, {})[method] = entry = run_one(name, method)
            path.write_text(json.dumps(results, indent=2) + "\n")  # keep what finished
            print(f"  {entry.get('metric')}: {entry.get('value')}, {entry.get('trainable_parameters')} trainable, "
                  f"{entry.get('steady_step_s')} s/step, peak {entry.get('peak_memory_mb_per_worker')} MB"
                  if "error" not in entry else f"  failed: {entry['error'][-400:]}", flush=True)


if __name__ == "__main__":
    main()
