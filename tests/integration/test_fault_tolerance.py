"""A worker killed mid-run: with cluster.max_failures the run resumes from its last epoch
checkpoint and ends exactly where an uninterrupted run ends; without, it fails cleanly."""

from __future__ import annotations

import copy
import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from shardtune.errors import RunError
from shardtune.orchestrate import run
from shardtune.recipe import validate_recipe

pytestmark = pytest.mark.integration


def kill_a_worker_after_first_checkpoint(staging: Path, killed: list, stop: threading.Event) -> None:
    """SIGKILL one Ray Train worker as soon as Ray has registered the first epoch checkpoint.

    The checkpoint folder appears while it is still being written; Ray's checkpoint
    manager snapshot lists it only once it is registered and would be resumed from.
    """
    snapshot = staging / "ray" / "checkpoint_manager_snapshot.json"
    while not stop.is_set():
        if snapshot.is_file() and "checkpoint_" in snapshot.read_text(errors="ignore"):
            # Only this test session's workers: they descend from this process (its
            # embedded Ray), while other Ray clusters on the host have workers of the same name.
            for proc in psutil.Process().children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(proc.cmdline()):
                        proc.send_signal(signal.SIGKILL)
                        killed.append(proc.pid)
                        return
                except psutil.NoSuchProcess:
                    continue
        time.sleep(0.01)


def run_with_fault(raw: dict) -> tuple[object, list]:
    staging = Path(raw["output"]["dir"] + ".partial")
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, args=(staging, killed, stop), daemon=True)
    killer.start()
    try:
        return run(validate_recipe(raw)), killed
    finally:
        stop.set()
        killer.join()


@pytest.fixture
def fault_recipe(tiny_recipe):
    raw = copy.deepcopy(tiny_recipe)
    # conftest's reference_run: 5 epochs leave time after the first checkpoint to kill a worker
    raw["train"].update(epochs=5, log_every_steps=5)
    return raw


@pytest.mark.parametrize("quantization", ["none", pytest.param("nf4", marks=pytest.mark.slow)])
def test_resume_after_a_killed_worker_matches_an_uninterrupted_run(reference_run, fault_recipe, tmp_path,
                                                                   quantization):
    # nf4: the checkpoint leaves the frozen 4-bit weights out and the resumed run reloads them
    # from the base checkpoint; the adapter, optimizer and schedule come back exactly.
    fault_recipe["quantization"] = {"mode": quantization}
    if quantization == "none":
        reference = reference_run
    else:
        reference_raw = copy.deepcopy(fault_recipe)
        reference_raw["output"]["dir"] = str(tmp_path / "reference")
        reference = run(validate_recipe(reference_raw)).output_dir

    faulty = copy.deepcopy(fault_recipe)
    faulty["cluster"]["max_failures"] = 1
    faulty["output"]["dir"] = str(tmp_path / "faulty")
    result, killed = run_with_fault(faulty)

    assert killed, "no worker was killed: the run finished before the fault"
    log = (result.output_dir / "logs" / "train.log").read_text()
    assert "resumed from the checkpoint after epoch" in log
    ours = json.loads((result.output_dir / "metrics.json").read_text())["history"]
    theirs = json.loads((reference / "metrics.json").read_text())["history"]
    assert [m["epoch"] for m in ours] == [m["epoch"] for m in theirs]
    np.testing.assert_allclose([m["loss"] for m in ours], [m["loss"] for m in theirs], rtol=1e-5)


def test_killed_worker_without_retries_keeps_the_checkpoint(ray_session, fault_recipe, tmp_path):
    fault_recipe["output"]["dir"] = str(tmp_path / "out")
    with pytest.raises(RunError, match="training failed; worker") as info:
        run_with_fault(fault_recipe)
    assert "the last checkpoint is kept in" in info.value.render() and "--resume" in info.value.render()
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial" / "ray").is_dir()
    result = run(validate_recipe(fault_recipe), resume=True)
    assert "resumed from the checkpoint" in (result.output_dir / "logs" / "train.log").read_text()

