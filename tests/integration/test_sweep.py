"""`shardtune sweep` on Ray Tune, for real: every trial a 2-worker DeepSpeed run of the tiny
BERT, ASHA stopping the trial that trails at its first rung, a failing trial recorded
while the sweep goes on, the best recipe reproducing its trial, and a Ctrl-C'd sweep
continued with --resume."""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
import yaml
from typer.testing import CliRunner

from helpers import write_recipe
from shardtune.cli import app
from shardtune.orchestrate import run
from shardtune.recipe import load_recipe

pytestmark = pytest.mark.integration
cli = CliRunner()


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def swept(ray_session, tiny_bert, sentiment_data, tmp_path_factory):
    """lr 0.02 learns; lr 0.5 trails at epoch 1 (ASHA stops it); target 'nope' fails."""
    from helpers import make_tiny_recipe

    folder = tmp_path_factory.mktemp("sweep")
    raw = make_tiny_recipe(tiny_bert, sentiment_data, folder / "base-run")
    raw["train"].update(epochs=2)
    recipe = write_recipe(folder / "r.yaml", raw)
    out = folder / "out"
    result = cli.invoke(app, ["sweep", str(recipe), "--grid", "train.learning_rate=[0.02, 0.5]",
                              "--grid", "adapter.target_modules=[[query, value], [nope]]",
                              "--out", str(out), "--max-concurrent", "1"], env={"COLUMNS": "200"})
    return out, result


def test_every_trial_runs_asha_stops_the_trailing_one_and_a_failure_does_not_stop_the_sweep(swept):
    out, result = swept
    assert result.exit_code == 0, result.output
    rows = {r["trial"]: r for r in _rows(out)}
    assert [(rows[n]["train.learning_rate"], rows[n]["adapter.target_modules"], rows[n]["status"]) for n in sorted(rows)] == [
        ("0.02", '["query", "value"]', "finished"), ("0.02", '["nope"]', "failed"),
        ("0.5", '["query", "value"]', "stopped early"), ("0.5", '["nope"]', "failed")]
    assert "no module named 'nope'" in rows["trial-00001"]["error"]  # the trial's own message
    finished = Path(rows["trial-00000"]["run_dir"])
    assert finished == out / "trials" / "trial-00000" and (finished / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((finished / "metrics.json").read_text())["final"]["loss"] == pytest.approx(
        float(rows["trial-00000"]["loss"]))
    assert rows["trial-00002"]["run_dir"].endswith("trial-00002.partial")  # stopped: resumable, not a finished run
    assert float(rows["trial-00002"]["loss"]) > float(rows["trial-00000"]["loss"])
    # the console: a line per trial event and the table, not Tune's or Ray's output
    assert "trial-00002 stopped early (ASHA)" in result.output and "trial-00001 failed" in result.output
    assert "best: trial-00000" in result.output and "Traceback" not in result.output
    assert (out / "logs" / "tune.log").stat().st_size > 0


def test_the_plot_has_a_panel_per_swept_field(swept):
    out, _ = swept
    image = matplotlib.image.imread(out / "sweep.png")
    height, width = image.shape[:2]
    assert width > 1.8 * height  # two panels side by side
    assert image[..., :3].std() > 0.05  # not blank


def test_the_best_recipe_validates_and_reproduces_its_trial(swept, tmp_path):
    out, _ = swept
    best = out / "best.yaml"
    assert best.read_text().startswith("# The best trial of the sweep")
    recipe = load_recipe(best, [f"output.dir={tmp_path / 'again'}"])
    assert recipe.train.learning_rate == 0.02 and recipe.adapter.target_modules == ["query", "value"]
    assert yaml.safe_load(best.read_text())["output"]["dir"].endswith("base-run")  # where the base recipe writes
    again = run(recipe).metrics
    trial = json.loads((out / "trials" / "trial-00000" / "metrics.json").read_text())["final"]
    assert again["loss"] == pytest.approx(trial["loss"], abs=1e-6)


def test_an_interrupted_sweep_continues_with_resume(tiny_recipe, tmp_path):
    raw = copy.deepcopy(tiny_recipe)
    raw["train"].update(epochs=1)
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "shardtune.cli", "sweep", str(recipe), "--grid",
               "train.learning_rate=[0.02, 0.03]", "--out", str(out), "--max-concurrent", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             start_new_session=True)
    seen, deadline = [], time.monotonic() + 400
    for line in first.stdout:
        seen.append(line)
        if "trial-00001 started" in line:
            break
        assert time.monotonic() < deadline, "".join(seen)
    time.sleep(8)  # into the second trial's run
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C at a terminal: the whole process group
    seen.append(first.communicate(timeout=300)[0])
    text = "".join(seen)
    assert first.returncode != 0 and "--resume to continue" in text, text
    done = out / "trials" / "trial-00000" / "metrics.json"
    before = done.stat().st_mtime_ns
    second = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "continuing the sweep" in second.stderr
    rows = {r["trial"]: r for r in _rows(out)}
    assert sorted(rows) == ["trial-00000", "trial-00001"]
    assert {r["status"] for r in rows.values()} == {"finished"}
    assert done.stat().st_mtime_ns == before  # the finished trial was not trained again
