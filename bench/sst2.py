"""SST-2 benchmark: accuracy and cost of recipes/sst2.yaml, and shardtune's per-step
overhead against a plain single-process peft + torch loop.

    python bench/sst2.py                # full: 3 epochs on 2 workers + the 1-worker comparison
    python bench/sst2.py --quick        # 1 epoch, fewer comparison steps

Writes bench/results/sst2.json (and prints it). Run from the project root with
../shared/data beside it.

What is measured
- the recipe as shipped (2 workers, ZeRO-2): validation accuracy on its seeded split,
  wall time of `shardtune run` (Ray start to finished output), time to first step,
  peak resident memory per worker, steady-state step time;
- overhead: the same model, LoRA, data, batch and thread count, one worker, timed as
  steady-state seconds per optimizer step (median after warm-up) for `shardtune run
  cluster.workers=1` and for a plain loop (model(**batch).loss.backward(), clip, AdamW,
  scheduler). Target: shardtune within 10% of the plain loop.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RECIPE = ROOT / "recipes" / "sst2.yaml"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shardtune_run(out_dir: Path, overrides: list[str]) -> dict:
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "shardtune.cli", "run", str(RECIPE), f"output.dir={out_dir}",
           "output.if_exists=overwrite", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"shardtune run failed ({proc.returncode})")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    metrics["summary"]["cli_wall_seconds"] = round(time.perf_counter() - started, 1)
    return metrics


def plain_loop(steps: int, threads: int) -> dict:
    """The same work without Ray or DeepSpeed: what a hand-written peft script does."""
    import torch
    from transformers import get_scheduler

    from shardtune import backbone
    from shardtune.adapters import apply_adapter
    from shardtune.data.pipeline import epoch_micro_batches, load_data
    from shardtune.recipe import load_recipe
    from shardtune.tasks import get_task

    torch.set_num_threads(threads)
    recipe = load_recipe(RECIPE, ["cluster.workers=1"])
    tr = recipe.train
    torch.manual_seed(tr.seed)
    task = get_task(recipe)
    tokenizer = backbone.load_tokenizer(recipe)
    train_examples = load_data(recipe, task, tokenizer).train_examples
    model = apply_adapter(backbone.load_model(recipe, task, tokenizer), recipe, task)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tr.learning_rate, weight_decay=tr.weight_decay)
    scheduler = get_scheduler(tr.lr_scheduler, optimizer, num_warmup_steps=2, num_training_steps=steps)
    batches = epoch_micro_batches(len(train_examples), 1, 0, tr.micro_batch_size, 1, tr.seed, 0)[:steps]
    times = []
    for micro in batches:
        started = time.perf_counter()
        batch = task.collate([train_examples[i] for i in micro], tokenizer)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tr.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return {"steps": len(times), "steady_step_s": round(statistics.median(times[3:]), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch and 20 comparison steps")
    args = parser.parse_args()
    if not (ROOT.parent / "shared" / "data" / "glue" / "sst2" / "train.tsv").is_file():
        raise SystemExit("needs ../shared/data/glue/sst2/train.tsv beside the project")
    RESULTS.mkdir(parents=True, exist_ok=True)
    scratch = RESULTS / "tmp"
    compare_steps = 20 if args.quick else 40
    threads = 2

    full = shardtune_run(scratch / "sst2", ["train.epochs=1"] if args.quick else [])
    one_worker = shardtune_run(scratch / "sst2-1worker", [
        "cluster.workers=1", f"cluster.cpus_per_worker={threads}", f"train.max_steps={compare_steps}",
        "train.warmup_steps=2", "train.eval_before_training=false", "data.max_eval_examples=32"])
    plain = plain_loop(compare_steps, threads)

    ours = one_worker["summary"]["steady_step_s"]
    s = full["summary"]
    result = {
        "benchmark": "sst2", "recipe": "recipes/sst2.yaml", "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "device": "cpu"},
        "recipe_run": {
            "validation_accuracy_before": full["before"]["accuracy"],
            "validation_accuracy": full["final"]["accuracy"],
            "validation_examples": s["validation_examples"], "epochs": s["epochs"], "steps": s["steps"],
            "workers": s["workers"], "trainable_parameters": s["trainable_parameters"],
            "total_parameters": s["total_parameters"], "wall_seconds": s["cli_wall_seconds"],
            "time_to_first_step_s": s["time_to_first_step_s"], "steady_step_s": s["steady_step_s"],
            "peak_memory_mb_per_worker": s["peak_memory_mb_per_worker"],
        },
        "one_worker_overhead": {
            "steps": compare_steps, "threads": threads, "micro_batch_size": 16,
            "shardtune_steady_step_s": ours, "plain_loop_steady_step_s": plain["steady_step_s"],
            "ratio": round(ours / plain["steady_step_s"], 3),
            "target": "ratio <= 1.10",
            "met": ours / plain["steady_step_s"] <= 1.10,
        },
    }
    (RESULTS / "sst2.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
