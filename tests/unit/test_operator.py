"""The operator's commands that need no training: the recipe catalogue, --version, the
trackers' settings, the run report's tables and page, macro-F1 over the labels present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from shardtune.cli import app
from shardtune.recipe import validate_recipe

cli = CliRunner()
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


# ------------------------------------------------------------------ the recipe catalogue
def test_recipes_lists_every_shipped_recipe():
    result = cli.invoke(app, ["recipes"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    listed = [line.split()[0] for line in result.stdout.splitlines()[1:] if line.strip()]
    assert listed == sorted(p.stem for p in RECIPES.glob("*.yaml"))
    assert "sequence_classification" in result.stdout and "lora on nf4" in result.stdout


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_opens_with_the_command_that_runs_it(recipe):
    header = []
    for line in recipe.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert f"shardtune run recipes/{recipe.name}" in "\n".join(header)


def test_recipes_cp_copies_and_never_overwrites(tmp_path):
    result = cli.invoke(app, ["recipes", "cp", "sst2", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sst2.yaml").read_bytes() == (RECIPES / "sst2.yaml").read_bytes()
    again = cli.invoke(app, ["recipes", "cp", "sst2", str(tmp_path / "sst2.yaml")])
    assert again.exit_code == 2 and "already exists" in again.output


@pytest.mark.parametrize("name,dest,fragment", [
    ("sst3", "x.yaml", "did you mean 'sst2'"),
    ("sst2", "notes.txt", "a recipe is a .yaml file"),
    ("sst2", "missing/x.yaml", "is not a folder"),
])
def test_recipes_cp_refusals(tmp_path, name, dest, fragment):
    result = cli.invoke(app, ["recipes", "cp", name, str(tmp_path / dest)])
    assert result.exit_code == 2 and fragment in result.output
    assert not (tmp_path / dest).exists()


def test_version():
    from importlib.metadata import version

    result = cli.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"shardtune {version('shardtune')}"


# ------------------------------------------------------------------------- trackers
def _raw(tmp_path, **output):
    return {"model": {"path": "m"}, "data": {"train": "t.jsonl"},
            "output": {"dir": str(tmp_path / "runs" / "a"), **output}}


def test_mlflow_defaults_to_a_local_store_beside_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = validate_recipe(_raw(tmp_path, trackers=["mlflow"]), check_files=False)
    assert recipe.output.mlflow.tracking_uri == f"sqlite:///{(tmp_path / 'runs').resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert validate_recipe(_raw(tmp_path, trackers=["mlflow"]), check_files=False).output.mlflow.tracking_uri == \
        "http://tracker:5000"
    assert validate_recipe(_raw(tmp_path), check_files=False).output.trackers == ["tensorboard"]


def test_an_unknown_tracker_is_refused(tmp_path):
    from shardtune.errors import RecipeError

    with pytest.raises(RecipeError, match="trackers") as caught:
        validate_recipe(_raw(tmp_path, trackers=["wandb"]), check_files=False)
    assert "tensorboard" in caught.value.render() and "mlflow" in caught.value.render()


# ----------------------------------------------------------------- the report's tables
def test_classification_tables_by_hand():
    from shardtune.tasks.tables import classification

    records = [{"label": g, "prediction": p} for g, p in
               [("a", "a"), ("a", "b"), ("b", "b"), ("b", "b"), ("a", "a")]]
    per_class, confusion = classification(["a", "b", "c"], records)
    assert per_class.rows[0] == ["a", 1.0, round(2 / 3, 4), 0.8, 3]
    assert per_class.rows[1] == ["b", round(2 / 3, 4), 1.0, 0.8, 2]
    assert per_class.rows[2][-1] == 0 and "c" in per_class.note
    assert confusion.rows == [["a", 2, 1, 0], ["b", 0, 2, 0], ["c", 0, 0, 0]]


def test_tagging_and_question_answering_tables_by_hand():
    from shardtune.tasks.tables import question_answering, tagging

    (entities,) = tagging([{"tags": ["B-PER", "O", "B-LOC"], "prediction": ["B-PER", "O", "O"]}])
    scores = {row[0]: row[1:] for row in entities.rows}
    assert scores["PER"] == [1.0, 1.0, 1.0, 1] and scores["LOC"] == [0.0, 0.0, 0.0, 1]
    (qa,) = question_answering([{"answers": ["the cat"], "prediction": "cat"},
                                {"answers": ["a dog"], "prediction": "a bird"},
                                {"answers": [], "prediction": ""}, {"answers": [], "prediction": "x"}])
    by_kind = {row[0]: row[1:] for row in qa.rows}
    assert by_kind["answerable"] == [2, 50.0, 50.0]
    assert by_kind["unanswerable"] == [2, 50.0, 50.0]
    assert by_kind["all"][0] == 4


def _fake_run(folder: Path) -> Path:
    from shardtune.rundir import mark

    folder.mkdir()
    mark(folder)
    history = [{"epoch": 0, "step": 0, "loss": 0.7, "accuracy": 0.5},
               {"epoch": 1.0, "step": 10, "loss": 0.4, "accuracy": 0.8, "train_loss": 0.5}]
    metrics = {"before": history[0], "final": history[-1], "history": history,
               "steps": [{"step": s, "epoch": s / 10, "loss": 1 / s, "lr": 1e-3, "tokens_per_s": 100.0 * s,
                          "step_s": 0.1} for s in range(2, 11, 2)],
               "summary": {"workers": 2, "steps": 10, "peak_memory_mb_per_worker": [500.0, 480.0],
                           "load_peak_memory_mb_per_worker": [400.0, 390.0], "mfu": None, "wall_seconds": 12.0}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"model": {"path": "m<script>"}, "task": {"type": "t"}}))
    return folder


def test_report_page_and_plots_from_the_runs_files(tmp_path):
    from shardtune.runreport import write_report
    from shardtune.tasks.base import ReportTable

    run = _fake_run(tmp_path / "run")
    index = write_report(run, [ReportTable("per-class scores", ["label", "F1"], [["<b>x</b>", 0.5]], note="n")],
                         scored_on=None)
    assert index == run / "report" / "index.html"
    page = index.read_text()
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page  # every text escaped
    assert "m&lt;script&gt;" in page and "<script" not in page
    for name in ("loss.png", "validation.png", "throughput.png"):
        assert (run / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"src='{name}'" in page
    write_report(run)  # replaced in place, without tables
    assert "Not scored" in index.read_text() and not (run / ".report.partial").exists()


def test_macro_f1_is_over_the_labels_present():
    from shardtune.metrics import classification_metrics

    logits = np.array([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [0, 5.0, 0]])
    targets = np.array([0, 1, 0, 0])
    # label 2 is known to the run but absent from gold and predictions: not a 0 in the mean
    f1_0, f1_1 = 2 * 1 * (2 / 3) / (1 + 2 / 3), 2 * 0.5 * 1 / 1.5
    assert classification_metrics(logits, targets)["macro_f1"] == pytest.approx((f1_0 + f1_1) / 2)
