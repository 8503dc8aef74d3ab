"""A real 2-node Ray cluster on one machine (head on 127.0.0.2, a second node on 127.0.0.3,
own ports and temp dirs, token authentication as `ray start` sets it up): `ray job submit`
and `shardtune submit` run a tiny recipe with one worker on each node, the node-local storage
rule, and a node lost mid-run. Everything started here is stopped by process group; never
`ray stop`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import write_recipe
from test_attach import free_port

pytestmark = pytest.mark.cluster
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def _start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen([RAY, "start", "--block", *args], env=env, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _node_args(ip: str, temp: Path, cpus: int = 1) -> list[str]:
    return ["--node-ip-address", ip, "--num-cpus", str(cpus), "--memory", str(3 * 2**30),
            "--object-store-memory", str(128 * 2**20), "--temp-dir", str(temp),
            "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--min-worker-port", "0", "--max-worker-port", "0"]


def _alive_nodes(address: str, env: dict) -> int:
    """Nodes listed as active by `ray status` (0 while the head is not up)."""
    proc = subprocess.run([RAY, "status", "--address", address], env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 or "Active:" not in proc.stdout:
        return 0
    active = proc.stdout.split("Active:", 1)[1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if line.strip().startswith("1 node_"))


def _wait_for_nodes(address: str, env: dict, count: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while _alive_nodes(address, env) < count:
        assert time.time() < deadline, f"the cluster did not reach {count} nodes"
        time.sleep(2)


@pytest.fixture(scope="module")
def cluster():
    # Ray's socket paths must fit in 107 bytes: a short temp dir, not pytest's.
    root = Path(tempfile.mkdtemp(prefix="st-ray-"))
    env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_AUTH_MODE": "token",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}  # job drivers find `shardtune` here
    port, dashboard = free_port(), free_port()
    head = _start_node(["--head", "--port", str(port), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                        "--dashboard-port", str(dashboard), "--ray-client-server-port", str(free_port()),
                        "--dashboard-agent-listen-port", str(free_port()),
                        *_node_args("127.0.0.2", root / "head")], env, root / "head.log")
    address = f"127.0.0.2:{port}"
    nodes = [head]
    try:
        _wait_for_nodes(address, env, 1)
        nodes.append(_start_node(["--address", address, "--dashboard-agent-listen-port", str(free_port()),
                                  *_node_args("127.0.0.3", root / "node2")], env, root / "node2.log"))
        _wait_for_nodes(address, env, 2)
        yield {"address": address, "jobs": f"http://127.0.0.1:{dashboard}", "env": env, "root": root}
    finally:
        for proc in reversed(nodes):
            _stop(proc)
        if not os.environ.get("SHARDTUNE_KEEP_TEST_CLUSTER"):
            shutil.rmtree(root, ignore_errors=True)


def _recipe(tiny_recipe, tmp_path, **cluster) -> dict:
    """The tiny recipe as a project folder holds it (model and data beside the recipe):
    `shardtune submit` uploads only what is under the recipe's folder unless told more."""
    raw = json.loads(json.dumps(tiny_recipe))
    if not (tmp_path / "model").exists():
        shutil.copytree(raw["model"]["path"], tmp_path / "model")
        shutil.copy(raw["data"]["train"], tmp_path / "train.jsonl")
    raw["model"]["path"], raw["data"]["train"] = str(tmp_path / "model"), str(tmp_path / "train.jsonl")
    raw["cluster"] = {"workers": 2, "cpus_per_worker": 1, "placement": "spread", **cluster}
    raw["output"]["dir"] = str(tmp_path / "run")
    return raw


def _shardtune(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "shardtune.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_ray_job_submit_runs_one_worker_on_each_node(cluster, tiny_recipe, tmp_path):
    raw = _recipe(tiny_recipe, tmp_path, shared_storage=True)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    write_recipe(job_dir / "recipe.yaml", raw)
    proc = subprocess.run([RAY, "job", "submit", "--address", cluster["jobs"], "--working-dir", str(job_dir), "--",
                           "shardtune", "run", "recipe.yaml", "train.epochs=1"],
                          env=cluster["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())["summary"]
    assert sorted(summary["worker_nodes"]) == ["127.0.0.2", "127.0.0.3"]


def test_shardtune_submit_follow_and_jobs(cluster, tiny_recipe, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_recipe, tmp_path, shared_storage=True))
    proc = _shardtune(["submit", str(recipe), "train.epochs=1", "--address", cluster["jobs"], "--follow"],
                      cluster["env"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = proc.stdout.splitlines()[0].strip()
    assert job_id.startswith("shardtune-r-") and "done:" in proc.stdout
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())["summary"]
    assert sorted(summary["worker_nodes"]) == ["127.0.0.2", "127.0.0.3"]
    listed = _shardtune(["jobs", "list", "--address", cluster["jobs"]], cluster["env"])
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout, listed.stdout + listed.stderr
    status = _shardtune(["jobs", "status", job_id, "--address", cluster["jobs"]], cluster["env"])
    assert status.stdout.strip() == "SUCCEEDED"
    assert "done:" in _shardtune(["jobs", "logs", job_id, "--address", cluster["jobs"]], cluster["env"]).stdout
    unknown = _shardtune(["jobs", "status", "no-such-job", "--address", cluster["jobs"]], cluster["env"])
    assert unknown.returncode != 0 and "no job 'no-such-job'" in unknown.stderr


def test_jobs_stop_stops_a_running_job(cluster, tiny_recipe, tmp_path):
    raw = _recipe(tiny_recipe, tmp_path, shared_storage=True)
    raw["train"]["epochs"] = 200
    job_id = _shardtune(["submit", str(write_recipe(tmp_path / "r.yaml", raw)), "--address", cluster["jobs"]],
                        cluster["env"]).stdout.strip()
    deadline = time.time() + 300
    while "step " not in _shardtune(["jobs", "logs", job_id, "--address", cluster["jobs"]], cluster["env"]).stdout:
        assert time.time() < deadline, "the job never started training"
        time.sleep(3)
    stop = _shardtune(["jobs", "stop", job_id, "--address", cluster["jobs"]], cluster["env"])
    assert stop.returncode == 0 and "stop requested" in stop.stderr
    deadline = time.time() + 120
    while (status := _shardtune(["jobs", "status", job_id, "--address", cluster["jobs"]],
                                cluster["env"]).stdout.strip()) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.time() < deadline, status
        time.sleep(2)
    assert status == "STOPPED" and not (tmp_path / "run").exists()


def test_node_local_storage_is_refused_on_a_multi_node_cluster(cluster, tiny_recipe, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_recipe, tmp_path))
    proc = _shardtune(["submit", str(recipe), "--address", cluster["jobs"], "--follow"], cluster["env"])
    assert proc.returncode == 1
    assert "the cluster has 2 nodes" in proc.stdout and "node-local file system" in proc.stdout, proc.stdout[-3000:]
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_submit_refuses_a_relative_output_dir_before_contacting_the_cluster(tiny_recipe, tmp_path):
    raw = _recipe(tiny_recipe, tmp_path)
    raw["output"]["dir"] = "runs/relative"
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    proc = _shardtune(["submit", str(recipe), "--address", "http://127.0.0.1:9"], os.environ)
    assert proc.returncode == 2 and "output.dir must be an absolute path" in proc.stderr


@pytest.mark.slow  # ~4 minutes (Ray notices the node's death by heartbeat); the retry test below loses one too
def test_a_lost_node_ends_the_run_with_an_error_naming_it(cluster, tiny_recipe, tmp_path):
    third = _start_node(["--address", cluster["address"], "--dashboard-agent-listen-port", str(free_port()),
                         *_node_args("127.0.0.4", cluster["root"] / "node3")], cluster["env"],
                        cluster["root"] / "node3.log")
    try:
        _wait_for_nodes(cluster["address"], cluster["env"], 3)
        raw = _recipe(tiny_recipe, tmp_path, shared_storage=True, placement="strict_spread", workers=3)
        raw["train"]["epochs"] = 200  # long enough to lose the node mid-run
        recipe = write_recipe(tmp_path / "r.yaml", raw)
        job = _shardtune(["submit", str(recipe), "--address", cluster["jobs"]], cluster["env"])
        job_id = job.stdout.strip()
        deadline = time.time() + 300
        while "step " not in _shardtune(["jobs", "logs", job_id, "--address", cluster["jobs"]], cluster["env"]).stdout:
            assert time.time() < deadline, "the job never started training"
            time.sleep(3)
        os.killpg(third.pid, signal.SIGKILL)  # the node's raylet and its workers die at once
        follow = _shardtune(["jobs", "logs", job_id, "--follow", "--address", cluster["jobs"]], cluster["env"])
        status = _shardtune(["jobs", "status", job_id, "--address", cluster["jobs"]], cluster["env"]).stdout.strip()
        assert status == "FAILED", follow.stdout[-3000:]
        assert "the node 127.0.0.4 running worker" in follow.stdout and "was lost" in follow.stdout, \
            follow.stdout[-3000:]
    finally:
        _stop(third)


def test_with_retries_a_lost_node_is_replaced_and_the_run_resumes(tiny_recipe, tmp_path):
    """Its own cluster: a head without CPUs (driver only) and two 1-CPU nodes, so the two
    workers land one on each; one node is killed and a replacement joins; with
    cluster.max_failures the run resumes from its last checkpoint on the new node."""
    root = Path(tempfile.mkdtemp(prefix="st-ray-"))
    env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_AUTH_MODE": "token",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    port, dashboard = free_port(), free_port()
    nodes = [_start_node(["--head", "--port", str(port), "--include-dashboard", "true", "--dashboard-host",
                          "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port", str(free_port()),
                          "--dashboard-agent-listen-port", str(free_port()),
                          *_node_args("127.0.0.5", root / "head", cpus=0)], env, root / "head.log")]
    address, jobs = f"127.0.0.5:{port}", f"http://127.0.0.1:{dashboard}"

    def join(ip, name):
        nodes.append(_start_node(["--address", address, "--dashboard-agent-listen-port", str(free_port()),
                                  *_node_args(ip, root / name)], env, root / f"{name}.log"))
        return nodes[-1]

    try:
        _wait_for_nodes(address, env, 1)
        join("127.0.0.6", "a")
        doomed = join("127.0.0.7", "b")
        _wait_for_nodes(address, env, 3)
        raw = _recipe(tiny_recipe, tmp_path, shared_storage=True, max_failures=1)
        raw["train"]["epochs"] = 8  # the resumed run trains the rest: short, but longer than the kill takes
        recipe = write_recipe(tmp_path / "r.yaml", raw)
        job_id = _shardtune(["submit", str(recipe), "--address", jobs], env).stdout.strip()
        deadline = time.time() + 300
        # after the first epoch checkpoint, so that there is something to resume from
        # (a step line past epoch 1.0: the first epoch's checkpoint is written before it)
        while not re.search(r"epoch (1\.\d+|[2-8](\.\d+)?)/8 step",
                            _shardtune(["jobs", "logs", job_id, "--address", jobs], env).stdout):
            assert time.time() < deadline, "the job never reached its second epoch"
            time.sleep(3)
        os.killpg(doomed.pid, signal.SIGKILL)
        join("127.0.0.8", "c")  # the replacement
        follow = _shardtune(["jobs", "logs", job_id, "--follow", "--address", jobs], env, timeout=900)
        status = _shardtune(["jobs", "status", job_id, "--address", jobs], env).stdout.strip()
        assert status == "SUCCEEDED", follow.stdout[-3000:]
        log = (tmp_path / "run" / "logs" / "train.log").read_text()
        assert "resumed from the checkpoint after epoch" in log
        summary = json.loads((tmp_path / "run" / "metrics.json").read_text())["summary"]
        assert sorted(summary["worker_nodes"]) == ["127.0.0.6", "127.0.0.8"]
    finally:
        for proc in reversed(nodes):
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)
