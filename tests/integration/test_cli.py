"""The `shardtune` command in-process: run, eval, predict, validate, and every refusal."""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from helpers import write_recipe
from shardtune.cli import app
from tiny_models import sentiment_rows, write_jsonl

pytestmark = pytest.mark.integration
cli = CliRunner()


@pytest.fixture(scope="module")
def trained_run(ray_session, tiny_bert, sentiment_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    raw = {
        "model": {"path": str(tiny_bert)},
        "adapter": {"target_modules": ["query", "value"]},
        "data": {"train": str(sentiment_data["train"]), "max_length": 32},
        # micro 4 x accumulation 2 x 2 workers: the same 16 examples per step as elsewhere
        "train": {"epochs": 3, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
                  "learning_rate": 2e-2, "warmup_ratio": 0.0, "eval_every_steps": 25},
        "sharding": {"zero_stage": 2},
        "cluster": {"workers": 2},
        "output": {"dir": str(folder / "run"), "trackers": ["tensorboard", "mlflow"]},
    }
    recipe = write_recipe(folder / "recipe.yaml", raw)
    result = cli.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    return {"dir": folder / "run", "recipe": recipe, "raw": raw, "output": result.output}


def test_run_prints_a_summary(trained_run):
    out = trained_run["output"]
    for fragment in ("validation accuracy", "before", "after", "trainable parameters:", "outputs:"):
        assert fragment in out


FRAMEWORK = re.compile(r"pid=|RayTrainWorker|TrainController|TrainingReport|LOAD REPORT|Warning|warnings\.warn|"
                       r"\bINFO\b|\bWARNING\b|DeepSpeed|\[transformers\]|Traceback|\x1b\[|autoscaler")


def test_the_console_shows_shardtunes_lines_and_the_framework_goes_to_the_log(trained_run):
    """By default a run's console is shardtune's: its progress lines and summary. Ray's,
    DeepSpeed's and transformers' output is in logs/framework.log (--verbose shows it)."""
    lines = trained_run["output"].splitlines()
    framework = [line for line in lines if FRAMEWORK.search(line)]
    assert len(framework) <= 5, framework
    assert sum("[shardtune " in line for line in lines) >= 5
    assert any("step 69/69" in line for line in lines)  # 23 steps an epoch: the last, short one shared out
    filed = (trained_run["dir"] / "logs" / "framework.log").read_text()
    assert "RayTrainWorker" in filed and "TrainController" in filed
    assert "Failed to query Ray Train Controller" not in filed  # the embedded cluster serves the state API


def test_accumulation_and_evaluation_every_n_steps(trained_run):
    metrics = json.loads((trained_run["dir"] / "metrics.json").read_text())
    # 360 rows -> 22 global batches of 2 workers x 2 micro-batches x 4, and the last 8 rows
    # shared out as one more step (2 workers x 2 micro-batches of 2): 23 steps an epoch
    assert metrics["summary"]["steps"] == 3 * 23
    assert [m["step"] for m in metrics["history"]] == [0, 23, 25, 46, 50, 69]
    assert metrics["final"]["accuracy"] >= 0.8


def test_eval_on_a_fresh_file(trained_run, sentiment_data):
    result = cli.invoke(app, ["eval", str(trained_run["dir"]), "--data", str(sentiment_data["test"])])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["examples"] == 60
    assert metrics["accuracy"] >= 0.8 and set(metrics) >= {"loss", "macro_f1", "mcc"}


def test_predict_writes_one_line_per_row(trained_run, tmp_path):
    rows = [{"text": r["text"]} for r in sentiment_rows(25, seed=3)]  # no labels needed
    data = write_jsonl(tmp_path / "inputs.jsonl", rows)
    out = tmp_path / "preds" / "out.jsonl"
    result = cli.invoke(app, ["predict", str(trained_run["dir"]), "--data", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 25
    assert all(r["prediction"] in ("neg", "pos") and abs(sum(r["probabilities"].values()) - 1) < 1e-4
               for r in records)
    assert [r["text"] for r in records] == [r["text"] for r in rows]


def test_predictions_agree_with_eval(trained_run, sentiment_data, tmp_path):
    out = tmp_path / "p.jsonl"
    cli.invoke(app, ["predict", str(trained_run["dir"]), "--data", str(sentiment_data["test"]), "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    accuracy = sum(r["prediction"] == r["label"] for r in records) / len(records)
    result = cli.invoke(app, ["eval", str(trained_run["dir"]), "--data", str(sentiment_data["test"])])
    assert json.loads(result.stdout)["accuracy"] == pytest.approx(accuracy)


def test_existing_output_is_refused_and_kept(trained_run):
    before = (trained_run["dir"] / "metrics.json").read_text()
    result = cli.invoke(app, ["run", str(trained_run["recipe"])])
    assert result.exit_code != 0
    assert "already holds a run" in result.output and "output.if_exists=overwrite" in result.output
    assert (trained_run["dir"] / "metrics.json").read_text() == before


def test_overwrite_replaces_an_earlier_run_only(trained_run, tmp_path):
    import shutil

    raw = copy.deepcopy(trained_run["raw"])
    raw["output"] = {"dir": str(tmp_path / "again"), "if_exists": "overwrite"}
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "mine.txt").write_text("not a run")
    result = cli.invoke(app, ["run", str(recipe), "train.epochs=1"])
    assert result.exit_code == 1 and "is not a shardtune run" in result.output
    assert (tmp_path / "again" / "mine.txt").read_text() == "not a run"

    shutil.rmtree(tmp_path / "again")
    shutil.copytree(trained_run["dir"], tmp_path / "again")  # an earlier run: it carries the marker
    (tmp_path / "again" / "stale.txt").write_text("old")
    result = cli.invoke(app, ["run", str(recipe), "train.epochs=1"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "again" / "stale.txt").exists()
    assert (tmp_path / "again" / "adapter").is_dir() and (tmp_path / "again" / ".shardtune-run").is_file()


@pytest.mark.parametrize("rows,fragment", [
    ([{"text": "good", "label": "pos"}, {"txt": "bad", "label": "neg"}], "train.jsonl:2: no column 'text'"),
    ([{"text": "good", "label": "pos"}, {"text": "bad"}], "train.jsonl:2: no label in column 'label'"),
    ([{"text": "good", "label": "pos"}, {"text": "", "label": "neg"}], "train.jsonl:2: column 'text' is empty"),
])
def test_bad_rows_fail_before_ray_and_write_nothing(trained_run, tmp_path, rows, fragment):
    raw = copy.deepcopy(trained_run["raw"])
    good = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}] * 6
    raw["data"]["train"] = str(write_jsonl(tmp_path / "train.jsonl", rows + good))
    raw["output"]["dir"] = str(tmp_path / "out")
    result = cli.invoke(app, ["run", str(write_recipe(tmp_path / "r.yaml", raw))])
    assert result.exit_code == 2
    assert fragment in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_skip_mode_trains_on_the_good_rows_and_reports_the_count(trained_run, tmp_path):
    raw = copy.deepcopy(trained_run["raw"])
    bad = [{"txt": "bad", "label": "neg"}, {"text": "bad"}, {"text": "", "label": "neg"}]
    good = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}] * 20
    raw["data"].update(train=str(write_jsonl(tmp_path / "train.jsonl", bad + good)), on_bad_row="skip",
                       validation=str(write_jsonl(tmp_path / "val.jsonl", good[:8] + [{"text": "x", "label": "?"}])))
    raw["task"] = {"type": "sequence_classification", "labels": ["neg", "pos"]}
    raw["train"].update(epochs=1, eval_every_steps=None)
    raw["output"]["dir"] = str(tmp_path / "out")
    result = cli.invoke(app, ["run", str(write_recipe(tmp_path / "r.yaml", raw))])
    assert result.exit_code == 0, result.output
    assert "leaving out 3 train and 1 validation rows" in result.output
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())["summary"]
    assert summary["skipped_rows"] == {"train": 3, "validation": 1}
    assert summary["train_examples"] == 40 and summary["validation_examples"] == 8
    assert "skipped bad rows" in (tmp_path / "out" / "logs" / "train.log").read_text()


def test_misnamed_target_module_is_refused_before_launch(trained_run, tmp_path):
    raw = copy.deepcopy(trained_run["raw"])
    raw["output"]["dir"] = str(tmp_path / "out")
    result = cli.invoke(app, ["run", str(write_recipe(tmp_path / "r.yaml", raw)), "adapter.target_modules=[qkv]"])
    assert result.exit_code == 2
    assert "no module named 'qkv'" in result.output and "query" in result.output


def test_too_little_data_is_refused_before_launch(trained_run, tmp_path):
    raw = copy.deepcopy(trained_run["raw"])
    raw["output"]["dir"] = str(tmp_path / "out")
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    # 5 rows a worker cannot fill its 8 micro-batches of an optimizer step
    result = cli.invoke(app, ["run", str(recipe), "data.max_train_examples=10", "train.micro_batch_size=8",
                              "train.gradient_accumulation_steps=8"])
    assert result.exit_code == 2, result.output
    assert "too few for one optimizer step" in result.output and "lower those" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_worker_side_error_surfaces_as_itself(trained_run, tmp_path):
    """An error raised inside the Ray workers reaches the user as the same message.
    (Driven through the Ray path directly: the CLI's preflight would catch this one first.)"""
    from shardtune.errors import DataError
    from shardtune.orchestrate import _fit
    from shardtune.recipe import validate_recipe

    raw = copy.deepcopy(trained_run["raw"])
    raw["data"]["max_train_examples"] = 10  # 5 per worker: not an example for each of 8 micro-batches
    raw["train"]["micro_batch_size"] = 8
    raw["train"]["gradient_accumulation_steps"] = 8
    raw["output"]["dir"] = str(tmp_path / "out")
    (tmp_path / "staging").mkdir()
    with pytest.raises(DataError, match="too few for one optimizer step"):
        _fit(validate_recipe(raw), tmp_path / "staging", None)


def test_validate_prints_the_resolved_recipe(trained_run):
    result = cli.invoke(app, ["validate", str(trained_run["recipe"]), "train.epochs=7"])
    assert result.exit_code == 0
    assert "epochs: 7" in result.stdout and "zero_stage: 2" in result.stdout


def test_eval_of_a_folder_that_is_not_a_run(tmp_path, sentiment_data):
    result = cli.invoke(app, ["eval", str(tmp_path), "--data", str(sentiment_data["test"])])
    assert result.exit_code == 1 and "not a finished shardtune run" in result.output


def test_eval_with_missing_data_file(trained_run, tmp_path):
    result = cli.invoke(app, ["eval", str(trained_run["dir"]), "--data", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_eval_with_unknown_labels_names_the_row(trained_run, tmp_path):
    data = write_jsonl(tmp_path / "odd.jsonl", [{"text": "good good", "label": "pos"}, {"text": "x", "label": "meh"}])
    result = cli.invoke(app, ["eval", str(trained_run["dir"]), "--data", str(data)])
    assert result.exit_code == 2 and "odd.jsonl:2: label 'meh'" in result.output


def test_eval_follows_the_runs_skip_setting(trained_run, tmp_path):
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(trained_run["dir"], run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["data"]["on_bad_row"] = "skip"
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    good = [{"text": "good good", "label": "pos"}, {"text": "bad bad", "label": "neg"}] * 3
    data = write_jsonl(tmp_path / "odd.jsonl", good + [{"text": "x", "label": "meh"}])
    result = cli.invoke(app, ["eval", str(run), "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert "left out 1 bad rows" in result.output and "odd.jsonl:7: label 'meh'" in result.output
    assert json.loads(result.stdout[result.stdout.index("{"):])["examples"] == 6


def test_eval_and_predict_map_the_columns_of_a_differently_named_file(trained_run, sentiment_data, tmp_path):
    rows = [json.loads(line) for line in sentiment_data["test"].read_text().splitlines()]
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"review": r["text"], "gold": r["label"]} for r in rows])
    run_dir = str(trained_run["dir"])
    result = cli.invoke(app, ["eval", run_dir, "--data", str(renamed)])
    assert result.exit_code == 2 and "data.columns" in result.output  # the message names the fix ...
    mapped = cli.invoke(app, ["eval", run_dir, "--data", str(renamed), "--set", "data.columns.text=review",
                              "--set", "data.columns.label=gold"])
    assert mapped.exit_code == 0, mapped.output  # ... and the fix is accepted
    original = cli.invoke(app, ["eval", run_dir, "--data", str(sentiment_data["test"])])
    same = {k: v for k, v in json.loads(mapped.stdout).items() if k != "data"}
    assert same == {k: v for k, v in json.loads(original.stdout).items() if k != "data"}
    out = tmp_path / "p.jsonl"
    predicted = cli.invoke(app, ["predict", run_dir, "--data", str(renamed), "--out", str(out),
                                 "--set", "data.columns.text=review"])
    assert predicted.exit_code == 0 and len(out.read_text().splitlines()) == len(rows), predicted.output

    refused = cli.invoke(app, ["eval", run_dir, "--data", str(renamed), "--set", "train.learning_rate=1"])
    assert refused.exit_code == 2 and "evaluated as it was trained; only data.*" in refused.output


def test_eval_without_data_scores_the_runs_own_validation_split(trained_run):
    run_dir = trained_run["dir"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = cli.invoke(app, ["eval", str(run_dir)])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert scored["examples"] == metrics["summary"]["validation_examples"]
    assert scored["loss"] == pytest.approx(metrics["final"]["loss"], rel=1e-4)  # the rows the run scored last
    assert scored["accuracy"] == pytest.approx(metrics["final"]["accuracy"])
    other = cli.invoke(app, ["eval", str(run_dir), "--set", "data.validation_split=0.3"])
    assert other.exit_code == 2 and "validation split cannot be rebuilt as it was" in other.output


# ------------------------------------------------------------ trackers, report, merge card
def test_mlflow_and_tensorboard_record_the_run(trained_run):
    """A real MLflow local store (SQLite beside the run) and TensorBoard's events: the
    training loss per logged step under train/, the epochs' loss as train/epoch_loss (never
    under validation/), every evaluation under validation/, the recipe as parameters."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = json.loads((trained_run["dir"] / "metrics.json").read_text())
    logged = [s["step"] for s in metrics["steps"]]
    assert logged and logged == sorted(logged) and logged[-1] == metrics["summary"]["steps"]
    client = MlflowClient(tracking_uri=f"sqlite:///{trained_run['dir'].parent / 'mlflow.db'}")
    (record,) = client.search_runs([client.get_experiment_by_name("shardtune").experiment_id])
    assert record.info.status == "FINISHED"
    assert record.data.params["model.path"] == trained_run["raw"]["model"]["path"]
    assert [m.step for m in client.get_metric_history(record.info.run_id, "train/loss")] == logged
    accuracy = client.get_metric_history(record.info.run_id, "validation/accuracy")
    assert [m.value for m in accuracy] == pytest.approx([h["accuracy"] for h in metrics["history"]])
    assert "validation/train_loss" not in record.data.metrics and "train/epoch_loss" in record.data.metrics

    events = EventAccumulator(str(trained_run["dir"] / "logs" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/epoch_loss", "validation/accuracy"} <= set(tags)
    assert "validation/train_loss" not in tags


def test_the_run_has_a_report_and_report_adds_the_tables(trained_run, tmp_path):
    """Every finished run gets report/index.html (plots from its files); `shardtune report`
    scores the validation split for the per-class table and confusion matrix. The page is
    rendered in a real headless Chromium and its screenshot checked."""
    import shutil
    import subprocess

    from PIL import Image

    report = trained_run["dir"] / "report"
    assert {"index.html", "loss.png", "validation.png", "throughput.png"} <= {p.name for p in report.iterdir()}
    assert "report:" in trained_run["output"] and "not scored" in (report / "index.html").read_text().lower()

    result = cli.invoke(app, ["report", str(trained_run["dir"])])
    assert result.exit_code == 0, result.output
    page = (report / "index.html").read_text()
    assert "per-class scores" in page and "confusion matrix" in page
    for label in ("neg", "pos"):
        assert f"<td>{label}</td>" in page
    assert not (trained_run["dir"] / ".report.partial").exists()

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (./launcher/test installs it when run as root)")
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,2000", f"--screenshot={shot}", (report / "index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 2000)
    low, high = image.getextrema()
    assert high - low > 200  # text and plots drawn, not a blank page
    assert len(set(image.resize((64, 100)).getdata())) > 20


def test_report_of_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    result = cli.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "not a finished shardtune run" in result.output
    assert not (tmp_path / "report").exists()


def test_merged_model_card_and_a_plain_pipeline_predict_what_predict_does(trained_run, sentiment_data, tmp_path):
    from transformers import pipeline

    merged = tmp_path / "merged"
    assert cli.invoke(app, ["merge", str(trained_run["dir"]), "--out", str(merged)]).exit_code == 0
    card = (merged / "README.md").read_text()
    final = json.loads((trained_run["dir"] / "metrics.json").read_text())["final"]
    assert f"| accuracy | {final['accuracy']:.4f} |" in card and "method: lora" in card and "tags:" in card
    assert json.loads((merged / "tokenizer_config.json").read_text())["model_max_length"] == 32

    rows = [json.loads(line) for line in sentiment_data["test"].read_text().splitlines()][:20]
    rows[0]["text"] = " ".join([rows[0]["text"]] * 30)  # longer than the training length: truncated alike
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "p.jsonl"
    assert cli.invoke(app, ["predict", str(trained_run["dir"]), "--data", str(data), "--out", str(out)]).exit_code == 0
    predicted = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    piped = pipeline("text-classification", model=str(merged), truncation=True)([r["text"] for r in rows])
    assert [p["label"] for p in piped] == predicted


def test_eval_names_the_labels_the_file_lacks(trained_run, sentiment_data, tmp_path):
    rows = [r for r in map(json.loads, sentiment_data["test"].read_text().splitlines()) if r["label"] == "pos"]
    data = write_jsonl(tmp_path / "pos.jsonl", rows)
    result = cli.invoke(app, ["eval", str(trained_run["dir"]), "--data", str(data)])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert scored["labels_absent_from_data"] == ["neg"]


def test_if_exists_new_keeps_the_earlier_run(trained_run, tmp_path):
    first = trained_run["dir"]
    before = (first / "metrics.json").read_bytes()
    result = cli.invoke(app, ["run", str(trained_run["recipe"]), "output.if_exists=new", "train.epochs=1",
                              "output.trackers=[]"])
    assert result.exit_code == 0, result.output
    siblings = sorted(p for p in first.parent.iterdir() if p.name.startswith(first.name + "-"))
    assert len(siblings) == 1 and (siblings[0] / "adapter").is_dir()
    assert f"this one goes to {siblings[0]}" in result.output
    assert (first / "metrics.json").read_bytes() == before
    assert yaml.safe_load((siblings[0] / "recipe.yaml").read_text())["output"]["dir"] == str(siblings[0])


def test_eval_prints_its_answer_and_not_the_libraries(trained_run, sentiment_data):
    """In a fresh process (transformers reads its verbosity once, at import): the metrics,
    without transformers' load report, its loading bar, FutureWarnings or bitsandbytes' notes."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "shardtune.cli", "eval", str(trained_run["dir"]), "--data",
                           str(sentiment_data["test"])], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["examples"] == 60
    noise = [line for line in (done.stdout + done.stderr).splitlines() if FRAMEWORK.search(line)
             or "Loading weights" in line or "kernels" in line]
    assert noise == [], noise
