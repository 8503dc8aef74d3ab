"""Nothing lost, no one in: what output.dir may name, what overwrite may replace, what a
checkpoint or a model folder may run, what `submit` may upload, and how errors print.
Each case here was a way to lose files or run someone else's code before it was fixed."""

from __future__ import annotations

import copy
import errno
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from helpers import write_recipe
from shardtune import rundir
from shardtune.cli import app
from shardtune.errors import RecipeError, RunError
from shardtune.recipe import validate_recipe

cli = CliRunner()


# ------------------------------------------------------------------ output.dir refusals
def _inputs_folder(tiny_recipe) -> str:
    return str(Path(tiny_recipe["data"]["train"]).parent)


OUTPUT_REFUSALS = [
    # (case, output.dir from the recipe -> value, fragment of the message)
    ("empty (an unset variable)", lambda r: "", "output.dir is empty"),
    ("blank", lambda r: "   ", "output.dir is empty"),
    ("root", lambda r: "/", "root of the file system"),
    ("home", lambda r: str(Path.home()), "home directory"),
    ("above home", lambda r: str(Path.home().parent), "home directory|root of the file system"),  # /root: /
    ("current directory", lambda r: ".", "current directory"),
    ("above the current directory", lambda r: "..", "current directory"),
    ("the data folder", _inputs_folder, "holds the recipe's input"),
    ("the model folder", lambda r: r["model"]["path"], "holds the recipe's input"),
    ("a data file", lambda r: r["data"]["train"], "holds the recipe's input"),
]


@pytest.mark.parametrize("case,value,fragment", OUTPUT_REFUSALS, ids=[c[0] for c in OUTPUT_REFUSALS])
def test_output_dir_that_holds_other_things_is_refused(tiny_recipe, case, value, fragment):
    raw = copy.deepcopy(tiny_recipe)
    raw["output"] = {"dir": value(raw), "if_exists": "overwrite"}
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw)
    message = info.value.render()
    assert re.search(fragment, message) and "output.if_exists" not in message, message  # never "turn overwrite on"


def test_output_dir_that_is_a_file_or_under_one_is_refused(tiny_recipe, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for value, fragment in ((tmp_path / "notes.txt", "is a file"), (tmp_path / "notes.txt" / "run", "which is a file")):
        raw = copy.deepcopy(tiny_recipe)
        raw["output"]["dir"] = str(value)
        with pytest.raises(RecipeError, match=fragment):
            validate_recipe(raw)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_recipe_folder_is_an_input(tiny_recipe, tmp_path):
    raw = copy.deepcopy(tiny_recipe)
    raw["output"]["dir"] = str(tmp_path)
    result = cli.invoke(app, ["validate", str(write_recipe(tmp_path / "r.yaml", raw))])
    assert result.exit_code == 2 and "holds the recipe's input" in result.output


# ------------------------------------------------------------- claiming and replacing
def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "train.tsv").write_text("label\tsentence\n1\tmine\n")
    return path


@pytest.mark.parametrize("if_exists", ["error", "overwrite"])
def test_a_folder_that_is_not_a_run_is_never_replaced(tmp_path, if_exists):
    folder = _user_folder(tmp_path / "data")
    with pytest.raises(RunError, match="is not a shardtune run"):
        rundir.claim(folder, if_exists, resume=False)
    assert (folder / "train.tsv").is_file() and not rundir.staging_of(folder).exists()


def test_an_earlier_run_is_replaced_only_when_asked(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rundir.mark(run)
    (run / "metrics.json").write_text("{}")
    with pytest.raises(RunError, match="already holds a run; .*output.if_exists=overwrite"):
        rundir.claim(run, "error", resume=False)
    staging, resuming = rundir.claim(run, "overwrite", resume=False)
    assert not resuming and rundir.is_run(staging)
    (staging / "adapter").mkdir()
    user_old = _user_folder(tmp_path / "run.old")  # a name the old code deleted without asking
    rundir.publish(staging, run)
    assert (run / "adapter").is_dir() and not (run / "metrics.json").exists()
    assert (user_old / "train.tsv").is_file() and not staging.exists()
    assert not [p for p in tmp_path.iterdir() if "replaced" in p.name]


def test_a_staging_folder_that_is_not_ours_is_not_deleted(tmp_path):
    staging = _user_folder(tmp_path / "run.partial")
    with pytest.raises(RunError, match="not a shardtune folder"):
        rundir.claim(tmp_path / "run", "overwrite", resume=False)
    rundir.remove_staging(staging)
    assert (staging / "train.tsv").is_file()


def test_an_interrupted_runs_checkpoint_is_not_thrown_away(tmp_path):
    staging = tmp_path / "run.partial"
    staging.mkdir()
    rundir.mark(staging)
    (staging / "ray").mkdir()
    (staging / "ray" / "checkpoint_manager_snapshot.json").write_text('{"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-12-02_10-00-01", "metrics": {}}}')
    with pytest.raises(RunError, match="holds the checkpoint of an interrupted run; continue it with --resume"):
        rundir.claim(tmp_path / "run", "overwrite", resume=False)
    assert rundir.claim(tmp_path / "run", "overwrite", resume=True) == (staging, True)


def test_an_unwritable_output_dir_names_the_path(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only folders")
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o500)
    with pytest.raises(RunError, match="cannot create the run's folder .* Permission denied"):
        rundir.claim(parent / "run", "error", resume=False)


def test_os_errors_keep_their_errno_and_path():
    text = rundir.describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/scratch/run/adapter"))
    assert text == "No space left on device (ENOSPC) at /scratch/run/adapter"


# ------------------------------------------------------------- the CLI's error handler
def _app_raising(exc: BaseException) -> typer.Typer:
    from shardtune.cli import _command

    demo = typer.Typer()

    @demo.command()
    @_command
    def go() -> None:
        raise exc

    return demo


@pytest.mark.parametrize("exc,exit_code,expected", [
    (RunError("row 'x [/b] y' and [bold]kept[/bold] and [errno 28] too"), 1,
     "row 'x [/b] y' and [bold]kept[/bold] and [errno 28] too"),
    (OSError(errno.ENOSPC, "No space left on device", "/scratch/x.bin"), 1,
     "No space left on device (ENOSPC) at /scratch/x.bin"),
    (KeyboardInterrupt(), 130, "interrupted (Ctrl-C); nothing was written"),
], ids=["rich markup in a message", "disk full", "Ctrl-C"])
def test_errors_print_verbatim_and_exit_non_zero(exc, exit_code, expected):
    result = cli.invoke(_app_raising(exc), [])
    assert result.exit_code == exit_code
    assert expected in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- pickles in checkpoints
class _Planted:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PLANTED_MARK']}",))


def test_a_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path, monkeypatch):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from shardtune.checkpoint import _weights_only

    mark = tmp_path / "ran"
    monkeypatch.setenv("PLANTED_MARK", str(mark))
    evil = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    evil.write_bytes(pickle.dumps({"optimizer_state_dict": _Planted()}))
    engine = _weights_only(TorchCheckpointEngine())
    with pytest.raises(Exception, match="Weights only load failed"):
        engine.load(str(evil))
    assert not mark.exists()
    import torch

    fine = tmp_path / "ok.pt"
    torch.save({"loss_scaler": LossScaler(1.0), "x": torch.ones(2)}, fine)
    assert engine.load(str(fine))["x"].sum() == 2  # DeepSpeed's own plain-data classes still load


def test_resume_refuses_a_recipe_that_computes_something_else(tiny_recipe, tmp_path):
    from shardtune.checkpoint import fingerprint, recipe_differences

    before = validate_recipe(copy.deepcopy(tiny_recipe)).model_dump(mode="json")
    changed = copy.deepcopy(before)
    changed["train"]["learning_rate"] = 0.5
    changed["train"]["log_every_steps"] = 1  # does not change the result
    changed["cluster"]["max_failures"] = 3
    changed["output"]["dir"] = "/elsewhere"
    assert recipe_differences(before, changed) == ["train.learning_rate: 0.02 -> 0.5"]
    assert fingerprint(before) != fingerprint(changed)
    changed["train"]["learning_rate"] = before["train"]["learning_rate"]
    assert fingerprint(before) == fingerprint(changed)


def test_the_split_of_the_global_batch_does_not_change_the_fingerprint(tiny_recipe):
    from shardtune.checkpoint import fingerprint, recipe_differences

    before = validate_recipe(copy.deepcopy(tiny_recipe)).model_dump(mode="json")  # 2 workers x 1 x 8
    split = copy.deepcopy(before)
    split["cluster"]["workers"], split["train"]["gradient_accumulation_steps"] = 1, 2
    assert fingerprint(before) == fingerprint(split) and recipe_differences(before, split) == []
    split["train"]["gradient_accumulation_steps"] = 1
    assert recipe_differences(before, split) == ["global_batch: 16 -> 8"]


@pytest.mark.parametrize("workers,accumulation,expected", [(1, 1, 2), (2, 1, 1), (4, 5, "4 workers cannot keep it"),
                                                           (3, 1, r"3 workers cannot keep it .*resume on 1, 2 workers")])
def test_a_resume_on_other_workers_keeps_the_global_batch(tiny_recipe, workers, accumulation, expected):
    """Stopped on 2 workers x 1; resumed on `workers`: the accumulation that keeps 16, or a refusal."""
    from shardtune.orchestrate import keep_global_batch

    before = validate_recipe(copy.deepcopy(tiny_recipe)).model_dump(mode="json")
    raw = copy.deepcopy(tiny_recipe)
    raw["cluster"]["workers"], raw["train"]["gradient_accumulation_steps"] = workers, accumulation
    recipe = validate_recipe(raw)
    if isinstance(expected, str):
        with pytest.raises(RunError, match=expected):
            keep_global_batch(before, recipe)
    else:
        assert keep_global_batch(before, recipe).train.gradient_accumulation_steps == expected


# ------------------------------------------------------------------- custom model code
def _plant_custom_code(folder: Path, config_name: str, mark: Path) -> None:
    config = json.loads((folder / config_name).read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoTokenizer": ["custom.CustomTokenizer", None],
                          "AutoModelForSequenceClassification": "custom.CustomModel"}
    # Classes transformers does not know, so only the folder's own code could load them
    # (with a known class, transformers loads it natively and ignores auto_map).
    if config_name == "config.json":
        config["model_type"] = "custombert"
    else:
        config["tokenizer_class"] = "CustomTokenizer"
    (folder / config_name).write_text(json.dumps(config))
    (folder / "custom.py").write_text(f"open({str(mark)!r}, 'w').write('ran')\n")


def test_a_model_that_needs_its_own_code_is_refused_without_running_it(tiny_recipe, tiny_bert, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    mark = tmp_path / "ran"
    _plant_custom_code(model, "config.json", mark)
    raw = copy.deepcopy(tiny_recipe)
    raw["model"]["path"] = str(model)
    raw["output"]["dir"] = str(tmp_path / "out")
    result = cli.invoke(app, ["run", str(write_recipe(tmp_path / "r.yaml", raw))], input="y\ny\n")
    assert result.exit_code == 2, result.output
    assert "needs custom Python code" in result.output and "never runs code" in result.output
    assert not mark.exists() and not (tmp_path / "out.partial").exists()


def test_a_run_folders_tokenizer_code_never_runs(tiny_recipe, tiny_bert, tmp_path):
    """`shardtune eval RUN` reads RUN/tokenizer; a planted auto_map there must not run (with
    trust_remote_code=False transformers loads the tokenizer natively or refuses)."""
    run = tmp_path / "run"
    run.mkdir()
    rundir.mark(run)
    recipe = validate_recipe(copy.deepcopy(tiny_recipe))
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    (run / "task.json").write_text(json.dumps({"labels": ["neg", "pos"]}))
    shutil.copytree(tiny_bert, run / "tokenizer")
    mark = tmp_path / "ran"
    _plant_custom_code(run / "tokenizer", "tokenizer_config.json", mark)
    _plant_custom_code(run / "tokenizer", "config.json", mark)
    result = cli.invoke(app, ["eval", str(run), "--data", tiny_recipe["data"]["train"]], input="y\ny\n")
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert not mark.exists()


# --------------------------------------------------------------------- submit's upload
def _submit_recipe(tiny_recipe, folder: Path, **data) -> tuple[Path, dict]:
    raw = copy.deepcopy(tiny_recipe)
    raw["output"]["dir"] = "/shared/runs/x"
    raw["data"] = {**raw["data"], **data}
    return write_recipe(folder / "r.yaml", raw), raw


def _dry_run(recipe: Path, *extra: str):
    return cli.invoke(app, ["submit", str(recipe), "--address", "http://127.0.0.1:1", "--dry-run", *extra])


def test_submit_lists_what_it_uploads(tiny_recipe, tiny_bert, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(tiny_recipe["data"]["train"], project / "train.jsonl")
    shutil.copytree(tiny_bert, project / "model")
    recipe, raw = _submit_recipe(tiny_recipe, project, train=str(project / "train.jsonl"))
    raw["model"]["path"] = str(project / "model")
    write_recipe(recipe, raw)
    result = _dry_run(recipe)
    assert result.exit_code == 0, result.output
    size = (project / "train.jsonl").stat().st_size
    assert "data/train/train.jsonl" in result.output and f"{size / 1024:.1f} KB" in result.output
    assert "model/config.json" in result.output and "recipe.yaml" in result.output


def test_submit_never_uploads_files_from_outside_unless_told(tiny_recipe, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    recipe, _ = _submit_recipe(tiny_recipe, project, train={"path": "/etc/passwd", "format": "csv",
                                                             "column_names": ["label", "text"]})
    result = _dry_run(recipe)
    assert result.exit_code == 2 and "data.train.path: /etc/passwd is outside the recipe's folder" in result.output
    assert "--include /etc" in result.output
    outside = Path(tiny_recipe["data"]["train"])
    recipe, _ = _submit_recipe(tiny_recipe, project, train=str(outside))
    assert _dry_run(recipe).exit_code == 2
    model_folder = str(Path(tiny_recipe["model"]["path"]).parent)
    result = _dry_run(recipe, "--include", str(outside.parent), "--include", model_folder)
    assert result.exit_code == 0, result.output


def test_submit_refuses_a_symlink_out_of_an_uploaded_folder(tiny_recipe, tiny_bert, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(tiny_bert, project / "model")
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    (project / "model" / "extra.bin").symlink_to(secret)
    shutil.copy(tiny_recipe["data"]["train"], project / "train.jsonl")
    recipe, raw = _submit_recipe(tiny_recipe, project, train=str(project / "train.jsonl"))
    raw["model"]["path"] = str(project / "model")
    write_recipe(recipe, raw)
    result = _dry_run(recipe)
    assert result.exit_code == 2 and "extra.bin is a symlink to" in result.output and "PRIVATE" not in result.output


# ---------------------------------------------------------------------- scratch folders
def test_a_killed_workers_scratch_folder_is_swept_by_the_next_worker(tmp_path, monkeypatch):
    import tempfile

    from shardtune.engine import scratch_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f"shardtune-rank0-pid{dead}-abc"
    (stale / "checkpoint-1").mkdir(parents=True)
    alive = tmp_path / f"shardtune-rank1-pid{os.getppid()}-def"
    alive.mkdir()
    mine = scratch_dir(0)
    assert not stale.exists() and alive.exists() and mine.is_dir() and f"pid{os.getpid()}" in mine.name
