"""A real Slurm (Debian's slurm-wlm and munge) with two slurmd nodes on this machine, started
by the fixture with its own ports, state and socket (./launcher/test installs the packages
when it runs as root): the sbatch script `shardtune slurm` renders brings Ray up on both
Slurm nodes, puts a worker on each and finishes the run; a job signalled the way Slurm warns
before its time limit leaves a checkpoint that a re-submitted job resumes from."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import write_recipe

pytestmark = pytest.mark.cluster
BIN = Path(sys.executable).parent
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm():
    missing = [b for b in NEEDED if shutil.which(b) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the test Slurm runs its daemons as root")
    root = Path(tempfile.mkdtemp(prefix="st-slurm-"))
    for sub in ("munge", "state", "spool/n1", "spool/n2", "log", "run"):
        (root / sub).mkdir(parents=True)
    (root / "munge").chmod(0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host = socket.gethostname()
    ctld, node_ports = _free_port(), (_free_port(), _free_port())
    (root / "slurm.conf").write_text("\n".join([
        "ClusterName=shardtune-test", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ctld}",
        "AuthType=auth/munge", f"AuthInfo=socket={root}/munge/munge.socket", "CredType=cred/munge",
        "SlurmUser=root", "SlurmdUser=root", f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid", f"SlurmdPidFile={root}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log", f"SlurmdLogFile={root}/log/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "SlurmdParameters=config_overrides", "KillWait=5", "MailProg=/bin/true",
        "ReturnToService=2",
        f"NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={node_ports[0]} CPUs=2 State=UNKNOWN",
        f"NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={node_ports[1]} CPUs=2 State=UNKNOWN",
        "PartitionName=test Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP", ""]))
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    subprocess.run(["munged", f"--key-file={key}", f"--socket={root}/munge/munge.socket",
                    f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log",
                    f"--seed-file={root}/munge/seed", "-f"], env=env, check=True)
    subprocess.run(["slurmctld"], env=env, check=True)
    for node in ("n1", "n2"):
        subprocess.run(["slurmd", "-N", node], env=env, check=True)
    deadline = time.time() + 60
    while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout:
        assert time.time() < deadline, (root / "log" / "slurmctld.log").read_text()[-2000:]
        time.sleep(1)
    try:
        yield {"env": env, "root": root}
    finally:
        for pid_file in ("slurmd-n1.pid", "slurmd-n2.pid", "slurmctld.pid", "munged.pid"):  # the order the notes say
            try:
                os.kill(int((root / "run" / pid_file).read_text().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
            time.sleep(1)
        shutil.rmtree(root, ignore_errors=True)


def _job_state(env, job_id) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True).stdout
    return out.strip()


def _wait_done(env, job_id, timeout=600):
    deadline = time.time() + timeout
    while _job_state(env, job_id):
        assert time.time() < deadline, f"job {job_id} still {_job_state(env, job_id)}"
        time.sleep(2)


def _recipe(tiny_bert, sentiment_data, root: Path, epochs: int) -> dict:
    return {
        "model": {"path": str(tiny_bert)},
        "adapter": {"target_modules": ["query", "value"]},
        "data": {"train": str(sentiment_data["train"]), "max_length": 32},
        "train": {"epochs": epochs, "micro_batch_size": 8, "learning_rate": 2e-2, "warmup_ratio": 0.0,
                  "log_every_steps": 5},
        "cluster": {"workers": 2, "cpus_per_worker": 1, "placement": "spread", "shared_storage": True},
        "output": {"dir": str(root / "run")},
        "slurm": {"nodes": 2, "cpus_per_node": 2, "time": "00:15:00", "output": str(root / "job-%j.out"),
                  "setup": [f"export PATH={BIN}:$PATH HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1",
                            'export SHARDTUNE_NODE_IPS="n1=127.0.0.2 n2=127.0.0.3"']},
    }


def _submit(slurm, recipe_path: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "shardtune.cli", "slurm", str(recipe_path), "--submit"],
                          env=slurm["env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_the_rendered_script_runs_ray_on_both_slurm_nodes(slurm, tiny_bert, sentiment_data, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_bert, sentiment_data, tmp_path, epochs=2))
    job = _submit(slurm, recipe)
    _wait_done(slurm["env"], job)
    log = (tmp_path / f"job-{job}.out").read_text()
    assert "shardtune: run finished with status 0" in log, log[-3000:]
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())["summary"]
    assert sorted(summary["worker_nodes"]) == ["127.0.0.2", "127.0.0.3"]


def test_the_time_limit_warning_leaves_a_checkpoint_that_the_next_job_resumes(slurm, tiny_bert, sentiment_data,
                                                                             tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(tiny_bert, sentiment_data, tmp_path, epochs=10))
    job = _submit(slurm, recipe)
    out = tmp_path / f"job-{job}.out"
    deadline = time.time() + 300
    while not (out.exists() and " step " in out.read_text()):
        assert time.time() < deadline, out.read_text()[-3000:] if out.exists() else "no job output"
        time.sleep(2)
    # What --signal=B:USR1@N does before the time limit: USR1 to the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm["env"], check=True)
    _wait_done(slurm["env"], job)
    log = out.read_text()
    assert "forwarding SIGTERM to the driver" in log and "run finished with status 3" in log, log[-3000:]
    assert (tmp_path / "run.partial" / "ray").is_dir() and not (tmp_path / "run").exists()

    again = _submit(slurm, recipe)  # the same script, submitted again: --resume continues
    _wait_done(slurm["env"], again)
    log = (tmp_path / f"job-{again}.out").read_text()
    assert "resuming the stopped run" in log and "run finished with status 0" in log, log[-3000:]
    assert "resumed from the checkpoint" in (tmp_path / "run" / "logs" / "train.log").read_text()
