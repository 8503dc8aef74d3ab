"""Fault trials: kills and signals at random steps, each run to the end, each adapter compared
bit for bit with an uninterrupted run's.

    python bench/faults.py                       # 10 worker kills, 3 each of Ctrl-C, SIGTERM, SIGKILL
    python bench/faults.py --workers-killed 2 --signals 1     # a quick pass
    python bench/faults.py --only-world                        # the world-size trials alone
    python bench/faults.py --no-world                          # all but them

Writes bench/results/faults.json. The model is the tests' tiny BERT (built here), LoRA,
2 ZeRO-2 workers, 5 epochs of 20 steps: what is measured is the recovery, not the model.

Trials (the step is drawn from a seeded generator, one per trial):
- worker: one Ray Train worker SIGKILLed at the step, `cluster.max_failures: 1`; the run must
  finish by itself (Ray restarts the workers from the last epoch checkpoint);
- ctrl-c / sigterm: sent to the run at the step (Ctrl-C to the whole process group, as a
  terminal does); the run checkpoints at the next step and exits 3; `--resume` finishes it;
- sigkill: the driver SIGKILLed at the step; `--resume` finishes from the last checkpoint;
- world (ZeRO 0-3 x fp32/bf16): 2 workers SIGTERMed at the step, resumed on 1 worker with
  `--resume cluster.workers=1` (the accumulation doubles to keep the global batch); compared
  with that stage's uninterrupted 2-worker run: optimizer steps, final validation loss, the
  largest adapter difference. The model has no dropout here: its masks are drawn per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TOTAL_STEPS = 100


def make_recipe(folder: Path, name: str, sharding: dict | None = None, dropout: bool = True, **cluster) -> Path:
    import tiny_models

    model = folder / ("tiny-bert" if dropout else "tiny-bert-no-dropout")
    if not model.exists():
        tiny_models.build_tiny_bert(model)
        if not dropout:
            config = json.loads((model / "config.json").read_text())
            config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            (model / "config.json").write_text(json.dumps(config))
    if not (folder / "train.jsonl").exists():
        tiny_models.write_jsonl(folder / "train.jsonl", tiny_models.sentiment_rows(400, seed=1))
    raw = {"model": {"path": str(model)},
           "adapter": {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"]},
           "data": {"train": str(folder / "train.jsonl"), "validation_split": 0.2, "max_length": 32},
           "train": {"epochs": 5, "micro_batch_size": 8, "learning_rate": 2e-2, "warmup_ratio": 0.0,
                     "log_every_steps": 1},
           "sharding": sharding or {"zero_stage": 2},
           "cluster": {"workers": 2, **cluster}, "output": {"dir": str(folder / name)}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start(recipe: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shardtune.cli", "run", str(recipe), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def wait_for_step(proc: subprocess.Popen, step: int) -> bool:
    for line in proc.stdout:
        if f" step {step}/{TOTAL_STEPS} " in line:
            return True
    return False


def finish(proc: subprocess.Popen) -> int:
    proc.stdout.read()
    return proc.wait(timeout=900)


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file  # numpy has no bfloat16: compared as float32 (exact)

    tensors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    return {key: value.float().numpy() for key, value in tensors.items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def trial(folder: Path, kind: str, index: int, step: int, reference: dict) -> dict:
    name = f"{kind}-{index}"
    recipe = make_recipe(folder, name, **({"max_failures": 1} if kind == "worker" else {}))
    started = time.perf_counter()
    proc = start(recipe)
    if not wait_for_step(proc, step):
        return {"kind": kind, "step": step, "ok": False, "error": "the run ended before the step"}
    if kind == "worker":
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "RayTrainWorker" in " ".join(p.cmdline())]
        random.Random(index).choice(workers).kill()
    elif kind == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    elif kind == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        proc.kill()
    code = finish(proc)
    resumed = None
    if kind != "worker":
        resumed = finish(start(recipe, "--resume"))
    run_dir = folder / name
    ok = (run_dir / "adapter").is_dir() and same(adapter(run_dir), reference)
    result = {"kind": kind, "step": step, "first_exit": code, "resume_exit": resumed, "ok": ok,
              "seconds": round(time.perf_counter() - started, 1)}
    shutil.rmtree(run_dir, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def world_trial(folder: Path, stage: int, precision: str, step: int) -> dict:
    """2 workers stopped at `step`, resumed on 1; against the same recipe run on 2 throughout."""
    sharding = {"zero_stage": stage, "precision": precision}
    name = f"world-{stage}-{precision}"
    reference_recipe = make_recipe(folder, f"{name}-reference", sharding, dropout=False)
    assert finish(start(reference_recipe)) == 0, f"the uninterrupted {name} run failed"
    recipe = make_recipe(folder, name, sharding, dropout=False)
    started = time.perf_counter()
    proc = start(recipe)
    if not wait_for_step(proc, step):
        return {"kind": "world", "zero_stage": stage, "precision": precision, "ok": False,
                "error": "the run ended before the step"}
    proc.send_signal(signal.SIGTERM)
    code = finish(proc)
    again = start(recipe, "--resume", "cluster.workers=1")
    output = again.stdout.read()
    resumed = again.wait(timeout=900)
    run_dir, reference_dir = folder / name, folder / f"{name}-reference"
    result = {"kind": "world", "zero_stage": stage, "precision": precision, "step": step, "first_exit": code,
              "resume_exit": resumed, "ok": False}
    if resumed != 0:
        result["error"] = output[-2000:]
    if resumed == 0:
        ours, theirs = metrics(run_dir), metrics(reference_dir)
        a, b = adapter(run_dir), adapter(reference_dir)
        final, reference = ours["history"][-1]["loss"], theirs["history"][-1]["loss"]
        result.update(steps=ours["summary"]["steps"], reference_steps=theirs["summary"]["steps"],
                      val_loss=final, reference_val_loss=reference,
                      val_loss_relative_difference=round(abs(final - reference) / reference, 6),
                      max_adapter_difference=max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a),
                      bitwise=same(a, b))
        result["ok"] = result["steps"] == result["reference_steps"] and result["val_loss_relative_difference"] <= 0.01
    result["seconds"] = round(time.perf_counter() - started, 1)
    for path in (run_dir, reference_dir):
        shutil.rmtree(path, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers-killed", type=int, default=10)
    parser.add_argument("--signals", type=int, default=3, help="trials of each of ctrl-c, sigterm, sigkill")
    parser.add_argument("--only-world", action="store_true", help="only the world-size trials")
    parser.add_argument("--no-world", action="store_true", help="no world-size trials (faults-world.json has them)")
    parser.add_argument("--zero-stages", default="0,1,2,3", help="the world-size trials' ZeRO stages")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="shardtune-faults-"))
    draw = random.Random(0)
    trials = []
    try:
        if not args.only_world:
            reference_recipe = make_recipe(folder, "reference")
            assert finish(start(reference_recipe)) == 0, "the uninterrupted run failed"
            reference = adapter(folder / "reference")
            plan = [("worker", i) for i in range(args.workers_killed)]
            plan += [(kind, i) for kind in ("ctrl-c", "sigterm", "sigkill") for i in range(args.signals)]
            trials += [trial(folder, kind, i, draw.randint(3, TOTAL_STEPS - 5), reference) for kind, i in plan]
        if not args.no_world:
            trials += [world_trial(folder, stage, precision, draw.randint(3, TOTAL_STEPS - 5))
                       for stage in map(int, args.zero_stages.split(",")) for precision in ("fp32", "bf16")]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    kinds = ("world",) if args.only_world else ("worker", "ctrl-c", "sigterm", "sigkill") + (
        () if args.no_world else ("world",))
    summary = {kind: f"{sum(t['ok'] for t in trials if t['kind'] == kind)}/{sum(t['kind'] == kind for t in trials)} "
                     + ("same steps, final validation loss within 1%" if kind == "world" else "bitwise equal")
               for kind in kinds}
    if "world" in kinds:
        world = [t for t in trials if t["kind"] == "world"]
        summary["world bitwise"] = f"{sum(bool(t.get('bitwise')) for t in world)}/{len(world)}"
    out = {"what": "tiny BERT, LoRA r=8, 2 workers on CPU (ZeRO-2 fp32 unless named), 100 steps; a fault at a "
                   "seeded random step; adapter compared with the uninterrupted run",
           "measured": time.strftime("%Y-%m-%d %H:%M"), "summary": summary, "trials": trials}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / ("faults-world.json" if args.only_world else "faults.json")).write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
