"""Augmentation in a small-data setting: SST-2 with 500 training sentences, with and
without data.augment, over several seeds (each seed also draws its own split).

    python bench/augment.py [--seeds 3]

Writes bench/results/augment.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
SMALL = ["data.max_train_examples=500", "train.epochs=5", "train.log_every_steps=100"]
AUGMENT = ["data.augment.probability=0.5", "data.augment.synonym_replace=0.15", "data.augment.random_swap=0.1",
           "data.augment.random_delete=0.1"]


def accuracy(seed: int, augment: bool) -> float:
    out = RESULTS / "tmp" / f"augment-{seed}-{int(augment)}"
    cmd = [sys.executable, "-m", "shardtune.cli", "run", str(ROOT / "recipes" / "sst2.yaml"), *SMALL,
           f"train.seed={seed}", f"output.dir={out}", "output.if_exists=overwrite", *(AUGMENT if augment else [])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit((proc.stdout + proc.stderr)[-3000:])
    return json.loads((out / "metrics.json").read_text())["final"]["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = {"plain": [], "augmented": []}
    for seed in range(args.seeds):
        runs["plain"].append(accuracy(seed, False))
        runs["augmented"].append(accuracy(seed, True))
    result = {"setting": "sst2, 500 training sentences, 5 epochs, LoRA as recipes/sst2.yaml",
              "augment": AUGMENT, "accuracy": runs,
              "mean": {k: round(statistics.mean(v), 4) for k, v in runs.items()}}
    result["mean_gain"] = round(result["mean"]["augmented"] - result["mean"]["plain"], 4)
    (RESULTS / "augment.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
