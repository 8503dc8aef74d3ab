"""Every way a person or a scheduler stops `shardtune run` keeps what was done.

SIGTERM, SIGUSR1 (Slurm's warning) and a first Ctrl-C make the workers checkpoint at the
next step; the command exits 3 keeping `<dir>.partial`, and `--resume` continues to the
same adapter, bit for bit, as an uninterrupted run. A second Ctrl-C stops at once and keeps
the last checkpoint; SIGKILL of the driver keeps it too and takes the cluster's processes
with it. No worker scratch folder survives, and a planted pickle in a checkpoint is refused.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.torch import load_file

from helpers import write_recipe

pytestmark = pytest.mark.integration


@pytest.fixture
def stop_recipe(tiny_recipe):
    raw = copy.deepcopy(tiny_recipe)
    raw["train"].update(epochs=5, log_every_steps=5)  # 100 steps: a signal lands mid-run
    return raw


def _start(recipe_path, *extra, env: dict | None = None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    # Its own session, as a terminal gives a job its own process group: Ctrl-C goes to all of it.
    return subprocess.Popen([sys.executable, "-m", "shardtune.cli", "run", str(recipe_path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def _read_until(proc, fragment: str, seen: list, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if fragment in line:
            return
        assert time.monotonic() < deadline, "".join(seen[-50:])
    raise AssertionError(f"'{fragment}' never appeared:\n" + "".join(seen[-50:]))


def _finish(proc, seen: list, timeout: float = 300) -> str:
    seen.append(proc.stdout.read())
    proc.wait(timeout=timeout)
    return "".join(seen)


def _scratch_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("shardtune-rank*")}


def _resume(recipe) -> str:
    proc = _start(recipe, "--resume")
    text = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, text[-3000:]
    assert "resuming the stopped run" in text
    return text


def assert_same_adapter(ours: Path, reference: Path) -> None:
    """Bit for bit on CPU: the same weights, the same evaluations."""
    a = load_file(ours / "adapter" / "adapter_model.safetensors")
    b = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key].numpy(), b[key].numpy()), key
    mine = json.loads((ours / "metrics.json").read_text())["history"]
    theirs = json.loads((reference / "metrics.json").read_text())["history"]
    assert [m["step"] for m in mine] == [m["step"] for m in theirs]
    assert [m["loss"] for m in mine] == [m["loss"] for m in theirs]


# SIGUSR1 takes SIGTERM's path (one handler); the Slurm test sends it through sbatch.
# SIGTERM's stop is slow-marked: it is the same handler, and the refusal test below and the
# Slurm time-limit test (SIGTERM forwarded by the batch script) stop runs with it too.
STOPS = [pytest.param("SIGTERM", signal.SIGTERM, False, id="SIGTERM", marks=pytest.mark.slow),
         pytest.param("Ctrl-C", signal.SIGINT, True, id="Ctrl-C")]


@pytest.mark.parametrize("name,signum,to_group", STOPS)
def test_a_stopped_run_checkpoints_and_resumes_to_the_same_adapter(reference_run, stop_recipe, tmp_path, name, signum,
                                                                   to_group):
    before = _scratch_folders()
    out = tmp_path / "stopped"
    stop_recipe["output"]["dir"] = str(out)
    recipe = write_recipe(tmp_path / "r.yaml", stop_recipe)
    proc, seen = _start(recipe), []
    _read_until(proc, "step 5/100", seen)
    (os.killpg if to_group else os.kill)(proc.pid, signum)
    output = _finish(proc, seen)
    assert proc.returncode == 3, output[-3000:]
    assert ("Ctrl-C: asking the workers to checkpoint" if to_group else "asking the workers to checkpoint") in output
    assert "stopped at step" in output and "--resume" in output, output[-3000:]
    assert not out.exists() and (tmp_path / "stopped.partial" / "ray").is_dir()
    assert _scratch_folders() <= before  # the stop path used to leak one per worker

    _resume(recipe)
    log = (out / "logs" / "train.log").read_text()
    assert "resumed from the checkpoint after epoch" in log and "micro-batches" in log  # mid-epoch
    assert_same_adapter(out, reference_run)
    assert not (tmp_path / "stopped.partial").exists() and _scratch_folders() <= before


def test_ctrl_c_twice_stops_at_once_and_keeps_the_last_checkpoint(ray_session, stop_recipe, tmp_path):
    """The hardest moment for it: Ray's controller has not yet polled the checkpoint the
    workers committed (it takes one report every 2 s; here it is made to wait 10 minutes),
    so its snapshot names none. The committed one is kept all the same, and resumed."""
    # Slow steps (8 micro-batches each), so the second Ctrl-C lands before the stop checkpoint.
    # No baseline evaluation: its report would fill Ray's one-report queue, and the workers
    # would then wait out the controller's ten-minute poll at the first checkpoint.
    stop_recipe["train"].update(micro_batch_size=1, gradient_accumulation_steps=8, epochs=3,
                                eval_before_training=False)
    stop_recipe["output"]["dir"] = str(tmp_path / "run")
    recipe = write_recipe(tmp_path / "r.yaml", stop_recipe)
    proc, seen = _start(recipe, env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "600"}), []
    _read_until(proc, "step 25/60", seen)  # after the first epoch's checkpoint (step 20)
    os.killpg(proc.pid, signal.SIGINT)
    _read_until(proc, "Ctrl-C: asking the workers", seen)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    output = _finish(proc, seen)
    assert proc.returncode == 3, output[-3000:]
    assert "Ctrl-C again: stopping now" in output and "the last checkpoint the workers saved is kept" in output
    snapshot = tmp_path / "run.partial" / "ray" / "checkpoint_manager_snapshot.json"
    assert not snapshot.exists() or "checkpoint_dir_name" not in snapshot.read_text()  # the race did happen
    text = _resume(recipe)
    assert "resumed from the checkpoint after epoch" in (tmp_path / "run" / "logs" / "train.log").read_text(), text
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["summary"]["steps"] == 60


def test_sigkill_of_the_driver_keeps_the_checkpoint_and_leaves_no_processes(reference_run, stop_recipe, tmp_path):
    out = tmp_path / "killed"
    stop_recipe["output"]["dir"] = str(out)
    recipe = write_recipe(tmp_path / "r.yaml", stop_recipe)
    proc, seen = _start(recipe), []
    _read_until(proc, "step 45/100", seen)  # after two epoch checkpoints
    cluster = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    _finish(proc, seen)
    gone, alive = psutil.wait_procs(cluster, timeout=20)
    assert not alive, [p.info if hasattr(p, "info") else p.pid for p in alive]  # Ray's agents used to linger
    assert (tmp_path / "killed.partial" / "ray").is_dir()
    _resume(recipe)
    assert_same_adapter(out, reference_run)


def _stopped_run(stop_recipe: dict, tmp_path: Path) -> Path:
    """A run stopped by SIGTERM at step 5, leaving run.partial to resume; returns its recipe."""
    stop_recipe["output"]["dir"] = str(tmp_path / "run")
    recipe = write_recipe(tmp_path / "r.yaml", stop_recipe)
    proc, seen = _start(recipe), []
    _read_until(proc, "step 5/100", seen)
    proc.send_signal(signal.SIGTERM)
    assert "stopped at step" in _finish(proc, seen)
    return recipe


def test_a_resume_with_a_different_recipe_or_a_planted_pickle_is_refused(ray_session, stop_recipe, tmp_path):
    recipe = _stopped_run(stop_recipe, tmp_path)
    again = _start(recipe, "--resume", "train.learning_rate=0.001")
    text = again.communicate(timeout=600)[0]
    assert again.returncode == 1 and "train.learning_rate: 0.02 -> 0.001" in text, text[-3000:]
    fresh = _start(recipe)  # without --resume the checkpoint is not thrown away either
    text = fresh.communicate(timeout=600)[0]
    assert fresh.returncode == 1 and "continue it with --resume" in text, text[-3000:]
    assert (tmp_path / "run.partial" / "ray").is_dir()

    # The same recipe, but the checkpoint's optimizer state replaced by a pickle that runs code.
    mark = tmp_path / "code-ran"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {mark}",))

    planted = list((tmp_path / "run.partial" / "ray").glob("checkpoint_*/state/*optim_states.pt"))
    assert planted
    for path in planted:
        path.write_bytes(pickle.dumps({"optimizer_state_dict": Planted()}))
    resumed = _start(recipe, "--resume")
    text = resumed.communicate(timeout=600)[0]
    assert resumed.returncode != 0 and "refused to load the checkpoint" in text, text[-3000:]
    assert not mark.exists()


def test_resume_without_a_stopped_run_starts_afresh(ray_session, tiny_recipe, tmp_path):
    raw = copy.deepcopy(tiny_recipe)
    raw["train"]["epochs"] = 1
    raw["output"]["dir"] = str(tmp_path / "fresh")
    proc = _start(write_recipe(tmp_path / "r.yaml", raw), "--resume")
    text = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, text[-3000:]
    assert "resuming" not in text and (tmp_path / "fresh" / "metrics.json").exists()
    assert (tmp_path / "fresh" / ".shardtune-run").is_file()


def test_a_run_stopped_on_two_workers_resumes_on_one(ray_session, stop_recipe, tiny_bert, tmp_path):
    """The portable state: 2 workers stopped mid-epoch, resumed on 1 with the accumulation
    doubled. The data order follows the global batch, so every step trains on the same
    examples as an uninterrupted 2-worker run. Without dropout (whose masks are drawn per
    rank) the gradients are the same sums, so the adapters must be equal: a wrong moment,
    step count or schedule in the portable state would not be."""
    from shardtune.orchestrate import run
    from shardtune.recipe import validate_recipe

    model = tmp_path / "no-dropout"
    shutil.copytree(tiny_bert, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    stop_recipe["model"]["path"] = str(model)
    reference = copy.deepcopy(stop_recipe)
    reference["output"]["dir"] = str(tmp_path / "reference")
    reference_dir = run(validate_recipe(reference)).output_dir

    recipe = _stopped_run(stop_recipe, tmp_path)
    proc = _start(recipe, "--resume", "cluster.workers=1")
    text = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, text[-3000:]
    assert "gradient_accumulation_steps 1 -> 2 keeps the global batch" in text, text[-3000:]
    out = tmp_path / "run"
    log = (out / "logs" / "train.log").read_text()
    assert "written by 2 workers x 1 accumulation steps; continuing on 1 x 2" in log, log[-3000:]
    mine = json.loads((out / "metrics.json").read_text())
    theirs = json.loads((reference_dir / "metrics.json").read_text())
    assert mine["summary"]["steps"] == theirs["summary"]["steps"] == 100
    assert [m["step"] for m in mine["history"]] == [m["step"] for m in theirs["history"]]
    for ours, reference_eval in zip(mine["history"], theirs["history"]):
        assert abs(ours["loss"] - reference_eval["loss"]) <= 0.01 * reference_eval["loss"], (ours, reference_eval)
    a = load_file(out / "adapter" / "adapter_model.safetensors")
    b = load_file(reference_dir / "adapter" / "adapter_model.safetensors")
    for key in a:  # bit for bit on CPU: halving a sum once or each term is exact in floats
        assert np.array_equal(a[key].numpy(), b[key].numpy()), key
