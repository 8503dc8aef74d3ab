"""What `shardtune eval`, `predict` and `report` score: a finished run (or a prompt
recipe, zero-shot), the rows of a file or of the run's own validation split, and the
model's outputs on them, on this machine's GPU when it has one (inference.py).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from shardtune.errors import DataError, RecipeError


def recorded_task_type(run_dir: Path) -> str | None:
    """The task type a run's recipe.yaml (or a recipe file) names, read as plain YAML (no
    model, no validation: commands refuse a wrong run before loading anything); None when
    there is no recipe."""
    from shardtune.recipe import load_raw

    recipe = run_dir if run_dir.is_file() else run_dir / "recipe.yaml"
    if not recipe.is_file():
        return None
    return (load_raw(recipe).get("task") or {}).get("type", "sequence_classification")


def recorded_kind_can(run_dir: Path, capability) -> bool:
    from shardtune.tasks import task_kinds

    kinds = {kind.type: kind for kind in task_kinds()}
    kind = kinds.get(recorded_task_type(run_dir))
    return kind is not None and kind.can(capability)


def generates(run_dir: Path) -> bool:
    """Whether the run (or recipe) is of a task whose predictions are generated text."""
    from shardtune.tasks import Can

    return recorded_kind_can(run_dir, Can.GENERATE)


def load(run_dir: Path, overrides: list[str]):
    """A finished run, or a prompt recipe's untrained model (zero-shot)."""
    from shardtune.inference import load_run, load_zero_shot
    from shardtune.recipe import load_recipe

    if run_dir.is_file() and run_dir.suffix in (".yaml", ".yml"):
        return load_zero_shot(load_recipe(run_dir, overrides))
    # A finished run's model and task are as trained; how the scored file is read may differ.
    other = [pair for pair in overrides if not pair.split("=", 1)[0].strip().startswith("data.")]
    if other:
        raise RecipeError(f"--set {other[0]}: a finished run is evaluated as it was trained; only data.* (how the "
                          "file is read: data.columns.ROLE=NAME, data.on_bad_row, data.max_length) may be set")
    return load_run(run_dir, overrides)


def load_rows(run_dir: Path, data: Optional[Path], fmt: Optional[str], with_targets: bool = False,
              overrides: Optional[list[str]] = None, say: Callable[[str], None] = print):
    """The file's rows; with the run's `data.on_bad_row: skip`, the bad ones left out and counted.
    No file: the run's (or recipe's) validation split."""
    from shardtune.data import read_rows

    if data is not None and not data.exists():
        raise DataError(f"data file '{data}' does not exist")
    loaded = load(run_dir, overrides or [])
    if data is None:
        return loaded, validation_rows(run_dir, loaded)
    source = loaded.recipe.data.train.model_copy(update={"path": str(data), "format": fmt})
    if fmt is None and source.resolved_format == "":
        source = source.model_copy(update={"format": loaded.recipe.data.train.resolved_format})
    if loaded.recipe.data.on_bad_row == "error":
        return loaded, read_rows(source, max_chars=loaded.recipe.data.max_chars)
    from shardtune.data.pipeline import drop_bad_rows

    bad: list[str] = []
    rows = drop_bad_rows(read_rows(source, bad, loaded.recipe.data.max_chars), loaded.task, loaded.tokenizer, bad,
                         str(data), with_targets)
    if bad:
        say(f"data.on_bad_row is skip: left out {len(bad)} bad rows of '{data}'; first: {bad[0]}")
    return loaded, rows


def validation_rows(run_dir: Path, loaded) -> list:
    """A recipe's validation split; for a finished run, its own, rebuilt from the recorded
    recipe and checked against the rows the run recorded (the data may have changed since)."""
    from shardtune.data.pipeline import load_data, rows_fingerprint

    # load_data fits labels on the training rows; a finished run keeps the labels it trained with.
    trained = None if run_dir.is_file() else loaded.task.state()
    try:
        rows = load_data(loaded.recipe, loaded.task, loaded.tokenizer, encode=False).val_rows
    except DataError as exc:
        raise DataError(f"cannot rebuild the validation split ({exc.render()}); give --data FILE") from None
    finally:
        if trained is not None:
            loaded.task.load_state(trained)
    if run_dir.is_file():
        return rows
    recorded = json.loads((run_dir / "metrics.json").read_text()).get("summary", {}).get("validation_rows_sha256")
    if recorded is None:
        raise DataError(f"'{run_dir}' did not record its validation rows (an older run); give --data FILE")
    if recorded != rows_fingerprint(rows):
        raise DataError(f"the data files (or the data.* settings) differ from when '{run_dir}' was trained, so its "
                        "validation split cannot be rebuilt as it was; give --data FILE to score a file")
    return rows


def infer(run_dir: Path, data: Optional[Path], fmt: Optional[str], batch_size: int, *, with_targets: bool,
          overrides: Optional[list[str]] = None, say: Callable[[str], None] = print):
    """(loaded run, rows, examples, outputs) of a forward pass over the rows, in batches,
    with a progress bar on a terminal."""
    loaded, rows = load_rows(run_dir, data, fmt, with_targets, overrides, say)  # a missing file: refused at once
    from shardtune.inference import forward_outputs

    examples = loaded.task.encode(rows, loaded.tokenizer, with_targets=with_targets)
    with batch_progress(f"scoring {len(examples)} examples on {loaded.device.type}") as progress:
        outputs = forward_outputs(loaded.model, loaded.task, loaded.tokenizer, examples, batch_size, loaded.device,
                                  progress=progress)
    return loaded, rows, examples, outputs


@contextmanager
def batch_progress(what: str):
    """A progress callback: a rich bar on stderr when it is a terminal, else nothing."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def report_tables(run_dir: Path, data: Optional[Path], fmt: Optional[str], batch_size: int, samples: int,
                  say: Callable[[str], None] = print) -> list:
    """The task's report tables on the run's validation split (or a file): prediction records
    of every row, or, for a task that generates, generations of the first `samples` rows."""
    from shardtune.tasks import Can, kind_of

    if generates(run_dir):
        loaded, rows = load_rows(run_dir, data, fmt, True, say=say)
        if not kind_of(loaded.recipe).can(Can.REPORT):
            return []
        records = loaded.task.generate(loaded.model, loaded.tokenizer, rows[:samples], batch_size=batch_size)
    else:
        loaded, rows, examples, outputs = infer(run_dir, data, fmt, batch_size, with_targets=True, say=say)
        if not kind_of(loaded.recipe).can(Can.REPORT):
            return []
        records = loaded.task.predictions(outputs, examples, rows)
    return loaded.task.report_tables(records)
