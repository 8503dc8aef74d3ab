"""`shardtune run --address`: attach to a real Ray cluster started with `ray start`.

The cluster gets its own node address (127.0.0.2), ports and temp dir, and is stopped
by signalling the process group of its `ray start --block` (never `ray stop`, which
would kill every Ray process on the host).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import write_recipe

pytestmark = pytest.mark.cluster
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    temp = tmp_path_factory.mktemp("rayhead")
    port = free_port()
    env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_AUTH_MODE": "token"}
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.2", "--port", str(port),
           "--num-cpus", "2", "--memory", str(6 * 2**30), "--object-store-memory", str(256 * 2**20),
           "--include-dashboard", "false", "--temp-dir", str(temp),
           "--ray-client-server-port", str(free_port()), "--node-manager-port", str(free_port()),
           "--object-manager-port", str(free_port()), "--min-worker-port", "31000", "--max-worker-port", "31999"]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    address = f"127.0.0.2:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        status = subprocess.run([RAY, "status", "--address", address], env=env, capture_output=True, text=True)
        if status.returncode == 0:
            break
        if head.poll() is not None:
            pytest.fail("ray start exited: " + head.stdout.read()[-3000:])
        time.sleep(2)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail("the Ray head did not come up in 90 s")
    yield {"address": address, "env": env}
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def shardtune(args, env, timeout=400):
    return subprocess.run([sys.executable, "-m", "shardtune.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_run_on_an_existing_cluster(ray_head, tiny_recipe, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe)
    proc = shardtune(["run", str(recipe), "train.epochs=2", "--address", ray_head["address"]], ray_head["env"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["summary"]["workers"] == 2 and metrics["final"]["loss"] < metrics["before"]["loss"]


def test_client_without_token_mode_is_told_how_to_fix_it(ray_head, tiny_recipe, tmp_path):
    env = {k: v for k, v in ray_head["env"].items() if k != "RAY_AUTH_MODE"}
    env["RAY_AUTH_MODE"] = "disabled"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe)
    proc = shardtune(["run", str(recipe), "--address", ray_head["address"]], env, timeout=200)
    assert proc.returncode != 0
    assert "token authentication" in proc.stderr and "RAY_AUTH_MODE=token" in proc.stderr, proc.stderr[-1500:]
    assert not (tmp_path / "run").exists()
