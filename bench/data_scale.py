"""Data at scale: what a 1 M-row data set costs each worker, with and without the cache.

    python bench/data_scale.py                 # 10 k rows, then 1 M rows twice (cold, then cached)
    python bench/data_scale.py --rows 200000   # a smaller large run

Writes bench/results/data_scale.json (and prints it). Run from the project root with
../shared/data beside it, alone on the machine (two cores shared read 5-9x slow).

The data: SST-2 sentences (../shared/data/glue/sst2/train.tsv) drawn with replacement into
jsonl files of 10 k and N rows. The run: recipes/sst2.yaml (all-MiniLM-L6-v2, LoRA, 2
ZeRO-2 workers) on that file for 3 optimizer steps, 1 % held out (at most 256 scored), no
evaluation before training. Each configuration is a fresh `shardtune run` process with its
own empty SHARDTUNE_CACHE, except the second large run, which reuses the first's.

What is measured, per run: each worker's peak resident memory (the run summary's
peak_memory_mb_per_worker), the driver process tree's peak (GNU time's maximum resident
set of the shardtune process), the time from the command's start to the first optimizer
step (wall time minus the workers' time after their first step), and the wall time.
Targets (issue 14): the 1 M-row workers within 500 MB of the 10 k-row workers; the cached
1 M-row run's time to first step at most twice the 10 k-row run's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SST2 = ROOT.parent / "shared" / "data" / "glue" / "sst2" / "train.tsv"
RECIPE = ROOT / "recipes" / "sst2.yaml"


def write_rows(path: Path, n: int, seed: int = 0) -> Path:
    with open(SST2, newline="") as handle:
        source = [(label, sentence) for label, sentence in csv.reader(handle, delimiter="\t")]
    rng = random.Random(seed)
    with open(path, "w") as out:
        for _ in range(n):
            label, sentence = source[rng.randrange(len(source))]
            out.write(json.dumps({"sentence": sentence, "label": label}) + "\n")
    return path


def run(data: Path, out_dir: Path, cache_dir: Path) -> dict:
    overrides = [f"data.train={{path: {data}, format: jsonl}}", "data.validation_split=0.01",
                 "data.max_eval_examples=256", "train.max_steps=3", "train.warmup_steps=0",
                 "train.eval_before_training=false", "train.log_every_steps=1",
                 f"output.dir={out_dir}", "output.if_exists=overwrite"]
    env = {**os.environ, "SHARDTUNE_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    timing = out_dir.with_suffix(".time")
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(timing), sys.executable, "-m", "shardtune.cli",
                           "run", str(RECIPE), *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"shardtune run failed ({proc.returncode})")
    summary = json.loads((out_dir / "metrics.json").read_text())["summary"]
    after_first_step = summary["worker_seconds"] - summary["time_to_first_step_s"]
    return {"rows": sum(1 for _ in open(data)), "train_examples": summary["train_examples"],
            "peak_memory_mb_per_worker": summary["peak_memory_mb_per_worker"],
            "driver_peak_memory_mb": round(int(timing.read_text().split()[-1]) / 1024, 1),
            "time_to_first_step_s": round(wall - after_first_step, 1), "wall_seconds": round(wall, 1),
            "cache_entries": sorted(p.name for p in (cache_dir / "data").iterdir()) if (cache_dir / "data").is_dir() else []}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=10_000)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shardtune-data-scale-") as tmp:
        tmp = Path(tmp)
        small, large = write_rows(tmp / "small.jsonl", args.small), write_rows(tmp / "large.jsonl", args.rows)
        results = {"small": run(small, tmp / "run-small", tmp / "cache-small"),
                   "large_cold": run(large, tmp / "run-large-cold", tmp / "cache-large"),
                   "large_cached": run(large, tmp / "run-large-cached", tmp / "cache-large")}
    small_peak = max(results["small"]["peak_memory_mb_per_worker"])
    results["checks"] = {
        "worker_peak_over_small_mb": round(max(results["large_cached"]["peak_memory_mb_per_worker"]) - small_peak, 1),
        "worker_peak_target_mb": 500,
        "cached_time_to_first_step_ratio": round(results["large_cached"]["time_to_first_step_s"]
                                                 / results["small"]["time_to_first_step_s"], 2),
        "time_ratio_target": 2.0,
    }
    results["machine"] = {"cpus": os.cpu_count(), "note": "run alone on the machine"}
    (RESULTS / "data_scale.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
