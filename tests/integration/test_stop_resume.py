"""SIGTERM (or Slurm's SIGUSR1 warning) reaching `shardtune run`: the workers checkpoint at
the next step, the command exits 3 keeping `<dir>.partial`, and `shardtune run --resume`
continues from that step to the same result as an uninterrupted run."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import write_recipe
from shardtune.orchestrate import run
from shardtune.recipe import validate_recipe

pytestmark = pytest.mark.integration


def _start(recipe_path, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "shardtune.cli", "run", str(recipe_path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _signal_after(proc, fragment: str, signum: int, timeout: float = 300) -> str:
    """Read the run's output until `fragment` appears, then send the signal; return all output."""
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if fragment in line:
            proc.send_signal(signum)
            break
        assert time.monotonic() < deadline, "".join(seen[-50:])
    seen.append(proc.stdout.read())
    proc.wait(timeout=timeout)
    return "".join(seen)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signalled_run_checkpoints_and_resumes_to_the_same_result(ray_session, tiny_recipe, tmp_path, signum):
    raw = copy.deepcopy(tiny_recipe)
    raw["train"].update(epochs=5, log_every_steps=5)  # 100 steps: the signal lands mid-run
    reference_raw = copy.deepcopy(raw)
    reference_raw["output"]["dir"] = str(tmp_path / "reference")
    reference = run(validate_recipe(reference_raw))

    out = tmp_path / "stopped"
    raw["output"]["dir"] = str(out)
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    output = _signal_after(_start(recipe), "step 5/100", signum)
    assert "asking the workers to checkpoint and stop" in output, output[-3000:]
    assert "stopped at step" in output and "--resume" in output, output[-3000:]
    assert not out.exists() and (tmp_path / "stopped.partial" / "ray").is_dir()

    resumed = _start(recipe, "--resume")
    text = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, text[-3000:]
    assert "resuming the stopped run" in text
    log = (out / "logs" / "train.log").read_text()
    assert "resumed from the checkpoint after epoch" in log and "micro-batches" in log  # mid-epoch
    ours = json.loads((out / "metrics.json").read_text())["history"]
    theirs = json.loads((reference.output_dir / "metrics.json").read_text())["history"]
    assert [m["step"] for m in ours] == [m["step"] for m in theirs]
    np.testing.assert_allclose([m["loss"] for m in ours], [m["loss"] for m in theirs], rtol=1e-5)
    assert not (tmp_path / "stopped.partial").exists()


def test_resume_without_a_stopped_run_starts_afresh(ray_session, tiny_recipe, tmp_path):
    raw = copy.deepcopy(tiny_recipe)
    raw["train"]["epochs"] = 1
    raw["output"]["dir"] = str(tmp_path / "fresh")
    proc = _start(write_recipe(tmp_path / "r.yaml", raw), "--resume")
    text = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, text[-3000:]
    assert "resuming" not in text and (tmp_path / "fresh" / "metrics.json").exists()
