"""What the CPU benchmarks of the large-model path share: a run of the worker loop under
torchrun (the loop of `shardtune run`, without Ray's start-up), offline, and the results
file it writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
       "TOKENIZERS_PARALLELISM": "false"}


def torchrun(recipe: str | Path, overrides: list[str], out: Path, *, env: dict | None = None,
             workers: int = 2) -> tuple[dict, float]:
    """Train `recipe` into a fresh `out` (torchrun would resume a run it finds there);
    returns its metrics.json and the wall time. A failed run stops the benchmark with its log."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(workers), "-m",
                           "shardtune.torchrun", str(recipe), *overrides, f"output.dir={out}"], cwd=ROOT,
                          env={**ENV, **(env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{recipe} failed ({proc.returncode})")
    return json.loads((out / "metrics.json").read_text()), time.perf_counter() - started


def shardtune(*args: str) -> str:
    """A `shardtune` command's standard output (it must succeed)."""
    proc = subprocess.run([sys.executable, "-m", "shardtune.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"shardtune {args[0]} failed ({proc.returncode})")
    return proc.stdout


def write_result(name: str, result: dict) -> None:
    result["measured"] = time.strftime("%Y-%m-%d %H:%M")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
