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
