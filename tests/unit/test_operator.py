"""The operator's commands that need no training: the recipe catalogue, --version, the
trackers' settings, the run report's tables and page, macro-F1 over the labels present."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from shardtune.cli import app
from shardtune.errors import RunError
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


# ------------------------------------------------------------------------ fast answers
FAST = """
import sys
from shardtune.cli import app
try:
    app(sys.argv[1:])
except SystemExit as exc:
    print("EXIT", exc.code, "torch" in sys.modules, "ray" in sys.modules)
"""


def _fast(args, cwd) -> tuple[str, str]:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FAST, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    return done.stdout.strip().splitlines()[-1], done.stderr


def test_refusals_on_the_arguments_come_before_the_heavy_imports(tmp_path):
    """A run into an existing run, generate or chat on a run of another task, eval of a file
    that is not there: refused without importing torch or Ray (seconds of imports)."""
    from shardtune.rundir import mark

    run = tmp_path / "runs" / "old"
    run.mkdir(parents=True)
    mark(run)
    (run / "recipe.yaml").write_text("task: {type: sequence_classification}\n")
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n')
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "bert"}')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": str(tmp_path / "model")}, "data": {"train": "train.jsonl"},
                                      "output": {"dir": str(run)}}))
    for args, fragment in [(["run", str(recipe)], "already holds a run"),
                           (["generate", str(run), "--prompt", "hi"], "generate needs a causal_lm"),
                           (["chat", str(run)], "chat needs a causal_lm"),
                           (["eval", str(run), "--data", "nothere.jsonl"], "does not exist")]:
        line, stderr = _fast(args, tmp_path)
        assert fragment in stderr, (args, stderr)
        assert line.startswith("EXIT ") and line.split()[1] != "0" and line.endswith("False False"), (args, line)


# --------------------------------------------------------- validation messages, rows
@pytest.mark.parametrize("override,expected", [
    ("adapter.target_modules=5", "adapter.target_modules: input should be a list of strings or 'all-linear' (got 5)"),
    ("adapter.target_modules=[1,2]", "adapter.target_modules: input should be a list of strings or 'all-linear'"),
    ("output.trackers=[wandb]", "output.trackers.0: input should be 'tensorboard' or 'mlflow' (got 'wandb')"),
])
def test_messages_never_name_pydantics_internal_types(tmp_path, override, expected):
    from shardtune.errors import RecipeError
    from shardtune.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_raw(tmp_path)))
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe, [override], check_files=False)
    text = caught.value.render()
    assert expected in text
    assert not any(tag in text for tag in ("list[str]", "literal[", "function-after", "lora.target"))


def test_validate_reads_the_first_rows_and_catches_a_column_typo(tiny_bert, tmp_path, monkeypatch):
    from tiny_models import sentiment_rows, write_jsonl

    monkeypatch.chdir(tmp_path)
    # sorted by label: the first rows alone hold one label, and validation must not say so
    rows = sorted(sentiment_rows(200, seed=3), key=lambda r: r["label"])
    write_jsonl(tmp_path / "train.jsonl", rows)
    raw = {"model": {"path": str(tiny_bert)}, "data": {"train": "train.jsonl", "max_length": 32},
           "output": {"dir": str(tmp_path / "runs" / "a")}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    ok = cli.invoke(app, ["validate", str(recipe)])
    assert ok.exit_code == 0, ok.output
    assert "16 rows of its data read and encoded" in ok.output and "reading the first 16 rows" in ok.output
    typo = cli.invoke(app, ["validate", str(recipe), "data.columns.text=txt"])
    assert typo.exit_code == 2 and "train.jsonl:1: " in typo.output and "'txt'" in typo.output
    assert cli.invoke(app, ["validate", str(recipe), "data.columns.text=txt", "--no-rows"]).exit_code == 0


# ------------------------------------------------------------- output.if_exists: new
def test_if_exists_new_gives_a_second_run_a_fresh_folder_and_resume_finds_its_checkpoint(tmp_path):
    from shardtune.rundir import RAY_DIR, choose_final_dir, mark, staging_of

    written = tmp_path / "runs" / "sst2"
    assert choose_final_dir(written, "new", resume=False) == written  # free: the folder itself
    written.mkdir(parents=True)
    mark(written)
    fresh = choose_final_dir(written, "new", resume=False)
    assert fresh.parent == written.parent and fresh.name.startswith("sst2-") and not fresh.exists()
    assert choose_final_dir(written, "error", resume=False) == written  # error/overwrite decide themselves
    # an interrupted second run: --resume continues it, not the finished first one
    staging = staging_of(fresh)
    (staging / RAY_DIR).mkdir(parents=True)
    (staging / RAY_DIR / "checkpoint_manager_snapshot.json").write_text('{"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-12-02_10-00-01", "metrics": {}}}')
    assert choose_final_dir(written, "new", resume=True) == fresh
    assert choose_final_dir(written, "new", resume=False) not in (written, fresh)


def test_a_committed_checkpoint_counts_though_rays_snapshot_never_named_it(tmp_path):
    """A driver killed between the workers' commit and the controller's next poll leaves a
    whole checkpoint the snapshot lacks: it is kept, and the furthest one is resumed."""
    import json

    from shardtune.rundir import COMMITTED, RAY_DIR, claim, has_checkpoint, mark, newest_committed

    final = tmp_path / "run"
    staging = tmp_path / "run.partial"
    (staging / RAY_DIR).mkdir(parents=True)
    mark(staging)
    (staging / RAY_DIR / "checkpoint_manager_snapshot.json").write_text('{"checkpoint_results": []}')
    half = staging / RAY_DIR / "checkpoint_2026-12-02_10-00-03"  # uploaded by some ranks only
    half.mkdir()
    (half / "trainstate.json").write_text(json.dumps({"epoch": 3}))
    assert not has_checkpoint(staging)
    for name, epoch, micro in (("checkpoint_2026-12-02_10-00-01", 1, 0), ("checkpoint_2026-12-02_10-00-02", 1, 7)):
        (staging / RAY_DIR / name).mkdir()
        (staging / RAY_DIR / name / "trainstate.json").write_text(json.dumps({"epoch": epoch,
                                                                             "micro_batches_done": micro}))
        (staging / RAY_DIR / name / COMMITTED).write_text("2\n")
    assert has_checkpoint(staging)
    assert newest_committed(staging / RAY_DIR).name == "checkpoint_2026-12-02_10-00-02"  # furthest, not newest
    with pytest.raises(RunError, match="continue it with --resume"):
        claim(final, "error", resume=False)
    assert claim(final, "error", resume=True) == (staging, True)


def test_shipped_recipes_keep_earlier_runs():
    for recipe in RECIPES.glob("*.yaml"):
        assert yaml.safe_load(recipe.read_text())["output"].get("if_exists") == "new", recipe.name


# ------------------------------------------------------------------------ the console
def test_run_console_shows_shardtunes_lines_and_files_the_rest(tmp_path):
    """On Ray's own dispatcher (what log_to_driver feeds): framework lines go to the file
    only, shardtune's to the console, and Ray's printer is back afterwards."""
    import io

    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    from rich.console import Console

    from shardtune.console import run_console

    before = list(dispatcher.handlers)
    screen = io.StringIO()
    batch = {"pid": 7, "ip": "127.0.0.1", "actor_name": "RayTrainWorker", "is_err": False,
             "lines": ["\x1b[1mBertForSequenceClassification LOAD REPORT\x1b[0m", "FutureWarning: x",
                       "[shardtune 10:00:00] epoch 0.5/2 step 10/40 loss 0.69 lr 1.5e-02 0.01s/step ~6,031 tok/s eta 0s"]}
    with run_console(tmp_path / "logs" / "framework.log", verbose=False, console=Console(file=screen)):
        assert [name for name, _ in dispatcher.handlers if name == "ray_print_logs"] == []
        dispatcher.emit(batch)
    assert screen.getvalue().splitlines() == [batch["lines"][2]]
    filed = (tmp_path / "logs" / "framework.log").read_text().splitlines()
    assert filed[0] == "(RayTrainWorker pid=7, 127.0.0.1) BertForSequenceClassification LOAD REPORT"  # uncoloured
    assert len(filed) == 3
    assert dispatcher.handlers == before
    with run_console(tmp_path / "other.log", verbose=True):  # --verbose: Ray prints as it always does
        assert dispatcher.handlers == before
    assert not (tmp_path / "other.log").exists()


def test_on_a_terminal_step_lines_drive_one_progress_bar(tmp_path):
    """A terminal gets a rich bar (step, epoch, loss, lr, tok/s, ETA) instead of step lines;
    shardtune's other lines still print above it."""
    import io

    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    from rich.console import Console

    from shardtune.console import run_console

    screen = io.StringIO()
    step = "[shardtune 10:00:0{}] epoch {}/2 step {}/40 loss 0.{} lr 1.5e-02 0.01s/step ~6,031 tok/s eta 0s"
    lines = [step.format(1, 0.5, 10, 69), "[shardtune 10:00:02] validation loss 0.6000 (epoch 1, step 20)",
             step.format(3, 1.5, 30, 42)]
    with run_console(tmp_path / "framework.log", verbose=False,
                     console=Console(file=screen, force_terminal=True, width=160)):
        for line in lines:
            dispatcher.emit({"pid": 7, "ip": "127.0.0.1", "actor_name": "RayTrainWorker", "lines": [line]})
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "validation loss 0.6000 (epoch 1, step 20)" in text
    assert "step 30/40" in text and "epoch 1.5/2 loss 0.42 lr 1.5e-02 6,031 tok/s" in text
    assert "step 10/40 loss" not in text  # the step lines became the bar, not printed lines
