"""Many recipes trained one after another in one 2-process torchrun group.

    python -m torch.distributed.run --nproc-per-node 2 tests/batch_runs.py RECIPES.json RESULTS.json

Each recipe is a real run of shardtune's worker loop through shardtune.torchrun.run_in_group
(DeepSpeed ZeRO, peft, bitsandbytes, from_pretrained), writing the same run directory as
`shardtune run`. Only the process group is shared: starting Ray's controller and two worker
processes, which import torch, transformers, peft and DeepSpeed, costs ~35 s a run on two
cores, against ~3 s for the training itself. The Ray path has its own tests
(test_training's stage runs, test_interrupts, test_fault_tolerance, tests/cluster).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def train_in_one_group(recipes: dict[str, dict], root: Path, timeout: float = 1500) -> dict[str, dict]:
    """Train every recipe in one torchrun group; returns name -> {"dir", "code", "seconds"} or
    {"error": traceback}. Fails with both ranks' output if the group itself dies."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipes.json").write_text(json.dumps(recipes))
    with socket.socket() as s:  # a free port for this process group only
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(Path(__file__).resolve()), str(root / "recipes.json"),
           str(root / "results.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    found = json.loads((root / "results.json").read_text()) if (root / "results.json").exists() else {}
    assert len(found) == len(recipes), proc.stdout[-3000:] + proc.stderr[-3000:]
    return found


def main(recipes_file: str, results_file: str) -> None:
    import torch.distributed as dist

    from shardtune.recipe import validate_recipe
    from shardtune.torchrun import run_in_group

    recipes = json.loads(Path(recipes_file).read_text())
    results = {}
    for name, raw in recipes.items():
        started = time.perf_counter()
        try:
            recipe = validate_recipe(raw)
            code = run_in_group(recipe, started)
            results[name] = {"dir": recipe.output.dir, "code": code, "seconds": round(time.perf_counter() - started, 2)}
        except Exception:  # a recipe that fails on both ranks; recorded, the next one goes on
            results[name] = {"error": traceback.format_exc()[-3000:]}
        if not dist.is_initialized() or dist.get_rank() == 0:
            Path(results_file).write_text(json.dumps(results, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main(sys.argv[1], sys.argv[2])
