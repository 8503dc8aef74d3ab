"""Slurm: an sbatch script that brings Ray up across the job's nodes and runs `shardtune run`.

The script's body is one template (BODY). `shardtune slurm RECIPE` renders it with #SBATCH
lines from the recipe's `slurm:` section; slurm/shardtune-ray.sbatch is the same body with
generic #SBATCH lines, for `sbatch -N 2 slurm/shardtune-ray.sbatch RECIPE [KEY=VALUE ...]`
(a test keeps the two in step).

What the body does: Ray's head on the first node and one Ray node on each other node, each
started by `srun --overlap` as a job step; wait until every node has joined; run the driver
attached to that cluster with --resume (a requeued or re-submitted job continues from the
last checkpoint); forward SIGTERM/USR1 (Slurm's time-limit warning, `--signal=B:USR1@...`)
to the driver, which checkpoints and exits 3; then stop the Ray steps, workers first.
The dashboard stays off and Ray binds to the nodes' own addresses; token authentication
uses a fresh token per job, passed to every step in RAY_AUTH_TOKEN.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from shardtune.errors import RecipeError, RunError

BODY = r'''set -uo pipefail

# ---- which node is which. SHARDTUNE_NODE_IPS="n1=127.0.0.2 n2=127.0.0.3" names the address
# of each node when several Slurm nodes share one host (tests); otherwise each node's own.
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head_node=${nodes[0]}
node_ip() {
    local name=$1 pair
    for pair in ${SHARDTUNE_NODE_IPS:-}; do
        if [[ ${pair%%=*} == "$name" ]]; then echo "${pair#*=}"; return; fi
    done
    srun --overlap -N1 -n1 -w "$name" hostname -I | awk '{print $1}'
}
head_ip=$(node_ip "$head_node")
port=${SHARDTUNE_RAY_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
ray_tmp=${SHARDTUNE_RAY_TMP:-/tmp/ray-$SLURM_JOB_ID}
cpus=${SLURM_CPUS_PER_TASK:-1}
# GPUs per node: the recipe's (a rendered script sets it), else what Slurm allocated
# (SLURM_GPUS_ON_NODE, from --gpus-per-node or --gres=gpu:N), else Ray's own detection.
gpus=${SHARDTUNE_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
# A CPU login node's set-up exports DS_ACCELERATOR=cpu, and sbatch carries it to the GPU nodes.
if [[ -n $gpus && $gpus != 0 ]]; then unset DS_ACCELERATOR; fi
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(python -c 'import secrets; print(secrets.token_hex(32))')}
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0   # ray start --block exits at once on SIGTERM
ray_common=(--block --num-cpus "$cpus" ${gpus:+--num-gpus "$gpus"} --min-worker-port 0 --max-worker-port 0)

# ---- Ray: the head on the first node, one Ray node on each of the others (job steps).
ray_steps=()
srun --overlap -N1 -n1 -w "$head_node" ray start --head --port "$port" --node-ip-address "$head_ip" \
    --include-dashboard false --temp-dir "$ray_tmp/$head_node" "${ray_common[@]}" &
head_step=$!
for node in "${nodes[@]:1}"; do
    until ray status --address "$head_ip:$port" > /dev/null 2>&1; do sleep 2; done
    srun --overlap -N1 -n1 -w "$node" ray start --address "$head_ip:$port" --node-ip-address "$(node_ip "$node")" \
        --temp-dir "$ray_tmp/$node" "${ray_common[@]}" &
    ray_steps+=($!)
done
deadline=$((SECONDS + ${SHARDTUNE_RAY_STARTUP_S:-300}))
until [[ $(ray status --address "$head_ip:$port" 2>/dev/null | sed -n '/Active:/,/Pending:/p' | grep -c ' node_') \
        -ge ${#nodes[@]} ]]; do
    for step in $head_step "${ray_steps[@]}"; do
        kill -0 "$step" 2>/dev/null || { echo "shardtune: a Ray node failed to start (see above)" >&2; deadline=0; }
    done
    if (( SECONDS > deadline )); then
        echo "shardtune: Ray did not come up on ${#nodes[@]} nodes" >&2
        for step in "${ray_steps[@]}" $head_step; do kill -TERM "$step" 2>/dev/null; done
        wait
        exit 1
    fi
    sleep 2
done

# ---- the run. Signals go to the driver, which checkpoints and exits 3 (resumable).
shardtune run "${SHARDTUNE_RECIPE_ARGS[@]}" --address "$head_ip:$port" --resume &
driver=$!
trap 'echo "shardtune: forwarding SIGTERM to the driver"; kill -TERM $driver 2>/dev/null' TERM USR1
status=0
while kill -0 $driver 2>/dev/null; do
    wait $driver
    status=$?
done
trap - TERM USR1

# ---- stop Ray: workers first, then the head (srun forwards SIGTERM to its step).
for step in "${ray_steps[@]}" $head_step; do kill -TERM "$step" 2>/dev/null; done
wait
echo "shardtune: run finished with status $status"
exit $status
'''

GENERIC_HEADER = """#!/bin/bash
# Ray + shardtune on the nodes Slurm allocates. Usage:
#   sbatch -N 2 --cpus-per-task 16 --gpus-per-node 4 slurm/shardtune-ray.sbatch RECIPE [KEY=VALUE ...]
# (Ray gets each node's GPUs from Slurm's allocation; SHARDTUNE_GPUS_PER_NODE overrides it. Or
# render a script with the recipe's own resources: shardtune slurm RECIPE.) Generated from
# src/shardtune/slurm.py: edit it there.
#SBATCH --job-name=shardtune
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@300
#SBATCH --output=shardtune-%j.out
SHARDTUNE_RECIPE_ARGS=("$@")
"""


def generic_script() -> str:
    return GENERIC_HEADER + BODY


def render(recipe, recipe_path: str, overrides: list[str]) -> str:
    """The sbatch script for a recipe, from its `slurm:` section."""
    sl = recipe.slurm
    if sl is None:
        raise RecipeError("the recipe has no slurm: section; add one (partition, nodes, gpus_per_node, "
                          "cpus_per_node, memory, time, account, setup), or use slurm/shardtune-ray.sbatch")
    lines = ["#!/bin/bash", f"# Rendered by `shardtune slurm {recipe_path}`.",
             f"#SBATCH --job-name={sl.job_name or Path(recipe_path).stem}",
             f"#SBATCH --nodes={sl.nodes}", "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --cpus-per-task={sl.cpus_per_node}", f"#SBATCH --time={sl.time}",
             f"#SBATCH --signal=B:USR1@{sl.signal_seconds}", f"#SBATCH --output={sl.output}"]
    if sl.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={sl.gpus_per_node}")
    for flag, value in (("partition", sl.partition), ("account", sl.account), ("mem", sl.memory)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH {extra}" for extra in sl.sbatch_options]
    lines += sl.setup
    lines.append(f"export SHARDTUNE_GPUS_PER_NODE={sl.gpus_per_node}")
    args = [str(Path(recipe_path).resolve()), *overrides]
    lines.append("SHARDTUNE_RECIPE_ARGS=(" + " ".join(shlex.quote(a) for a in args) + ")")
    return "\n".join(lines) + "\n" + BODY


def submit(script: Path) -> str:
    """sbatch the script; returns the job id."""
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise RunError("sbatch is not on PATH: run this on a Slurm login node") from None
    if proc.returncode != 0:
        raise RunError(f"sbatch refused the script: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]
