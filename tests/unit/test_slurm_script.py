"""`shardtune slurm`: the sbatch script rendered from a recipe's slurm: section, and the
generic script in slurm/ kept in step with the same template."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import write_recipe
from shardtune.cli import app

ROOT = Path(__file__).resolve().parents[2]
cli = CliRunner()


def test_the_generic_script_is_the_template():
    from shardtune.slurm import generic_script

    assert (ROOT / "slurm" / "shardtune-ray.sbatch").read_text() == generic_script(), \
        "slurm/shardtune-ray.sbatch is stale: regenerate it from shardtune.slurm.generic_script()"


def test_render_from_the_recipe(tiny_recipe, tmp_path):
    raw = copy.deepcopy(tiny_recipe)
    raw["slurm"] = {"nodes": 2, "gpus_per_node": 4, "cpus_per_node": 16, "memory": "64G", "time": "02:00:00",
                    "partition": "gpu", "account": "proj1", "sbatch_options": ["--qos=high"],
                    "setup": ["module load cuda", "source /opt/venv/bin/activate"]}
    raw["cluster"] = {"workers": 8, "gpus_per_worker": 1, "cpus_per_worker": 4}
    recipe = write_recipe(tmp_path / "my recipe.yaml", raw)
    result = cli.invoke(app, ["slurm", str(recipe), "train.epochs=1"])
    assert result.exit_code == 0, result.output
    script = result.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --cpus-per-task=16", "#SBATCH --mem=64G",
                 "#SBATCH --time=02:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=proj1",
                 "#SBATCH --qos=high", "#SBATCH --signal=B:USR1@300", "module load cuda",
                 "export SHARDTUNE_GPUS_PER_NODE=4"):
        assert line + "\n" in script, line
    assert f"SHARDTUNE_RECIPE_ARGS=('{tmp_path / 'my recipe.yaml'}' train.epochs=1)" in script
    assert script.index("module load cuda") < script.index("ray start --head")
    (tmp_path / "s.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "s.sbatch")]).returncode == 0


def test_a_recipe_without_a_slurm_section_is_told_what_to_add(tiny_recipe, tmp_path):
    result = cli.invoke(app, ["slurm", str(write_recipe(tmp_path / "r.yaml", tiny_recipe))])
    assert result.exit_code == 2 and "no slurm: section" in result.output


def test_submit_without_slurm_says_where_to_run_it(tiny_recipe, tmp_path, monkeypatch):
    raw = copy.deepcopy(tiny_recipe)
    raw["slurm"] = {"nodes": 1}
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    result = cli.invoke(app, ["slurm", str(write_recipe(tmp_path / "r.yaml", raw)), "--submit"])
    assert result.exit_code != 0 and "sbatch is not on PATH" in result.output


@pytest.mark.parametrize("bad,fragment", [({"nodes": 0}, "slurm.nodes: input should be greater than or equal to 1"),
                                          ({"gpus": 2}, "slurm.gpus: unknown key; keys of slurm: account")])
def test_bad_slurm_sections(tiny_recipe, tmp_path, bad, fragment):
    raw = copy.deepcopy(tiny_recipe)
    raw["slurm"] = bad
    result = cli.invoke(app, ["slurm", str(write_recipe(tmp_path / "r.yaml", raw))])
    assert result.exit_code == 2 and fragment in result.output, result.output


# The job's allocation and the recipe's workers must agree (it used to render a job holding
# 8 GPUs for 2 CPU workers, without a word).
MISMATCHES = [
    ("gpus-for-cpu-workers", {"nodes": 2, "gpus_per_node": 4}, {"workers": 2},
     "slurm asks for 8 GPUs (2 nodes x 4) but cluster.gpus_per_worker is 0"),
    ("too-few-workers", {"nodes": 2, "gpus_per_node": 4, "cpus_per_node": 16}, {"workers": 4, "gpus_per_worker": 1},
     "= 4 GPUs, but the Slurm job holds 8 (2 nodes x 4); set cluster.workers: 8"),
    ("gpu-workers-no-gpus", {"nodes": 2}, {"workers": 2, "gpus_per_worker": 1},
     "slurm.gpus_per_node is 0: the job would get no GPUs"),
    # A worker trains on one device: a worker given 2 GPUs would leave one idle, half of one is not a device.
    ("two-gpus-per-worker", {"nodes": 2, "gpus_per_node": 1, "cpus_per_node": 8},
     {"workers": 1, "gpus_per_worker": 2}, "cluster.gpus_per_worker: input should be 0 or 1 (got 2)"),
    ("half-a-gpu-per-worker", {"nodes": 1, "gpus_per_node": 1, "cpus_per_node": 8},
     {"workers": 2, "gpus_per_worker": 0.5}, "cluster.gpus_per_worker: input should be 0 or 1 (got 0.5)"),
    ("too-many-cpus", {"nodes": 2, "cpus_per_node": 2}, {"workers": 3, "cpus_per_worker": 2},
     "= 6 CPUs (2 each), but the Slurm job has 2 nodes x 2 CPUs"),
]


@pytest.mark.parametrize("case,slurm,cluster,fragment", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_a_job_that_does_not_match_the_workers_is_refused(tiny_recipe, tmp_path, case, slurm, cluster, fragment):
    raw = copy.deepcopy(tiny_recipe)
    raw["slurm"], raw["cluster"] = slurm, cluster
    result = cli.invoke(app, ["slurm", str(write_recipe(tmp_path / "r.yaml", raw))])
    assert result.exit_code == 2 and fragment in " ".join(result.output.split()), result.output


def test_the_shipped_slurm_recipe_renders(monkeypatch):
    monkeypatch.chdir(ROOT)
    result = cli.invoke(app, ["slurm", "recipes/sst2.yaml"])
    assert result.exit_code == 0, result.output
    assert "#SBATCH --nodes=2\n" in result.stdout
