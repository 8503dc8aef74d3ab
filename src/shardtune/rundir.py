"""The run directory: its names, its marker, and the rules for claiming and replacing it.

A run is built in `<dir>.partial` and renamed into place when it finished. Both carry a
marker file that only shardtune writes, and shardtune only ever deletes or replaces a
folder that carries it: `output.if_exists: overwrite` replaces an earlier *run*, never a
data folder, a home directory or a source tree that output.dir happened to name.

  adapter/       PEFT adapter (safetensors) with the task head, loadable by plain peft
  model/         the whole model instead, for full fine-tuning (adapter.method: none)
  tokenizer/     the HF tokenizer
  task.json      what rebuilds the task (label names)
  recipe.yaml    the recipe as resolved
  metrics.json   every evaluation, the final metrics and the run summary
  logs/          train.log, TensorBoard events, framework.log (Ray's, DeepSpeed's, transformers' output)
  report/        index.html and its plots (runreport.py; `shardtune report` adds tables)
  .shardtune-run the marker (JSON: what wrote it, and when)
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from shardtune.errors import RunError

MARKER = ".shardtune-run"
ADAPTER = "adapter"
MODEL = "model"
TOKENIZER = "tokenizer"
TASK_STATE = "task.json"
RECIPE = "recipe.yaml"
METRICS = "metrics.json"
HISTORY = "history.json"   # the workers' hand-over, turned into metrics.json by the driver
LOGS = "logs"
REPORT = "report"
STOP_FILE = "STOP"         # created by the launcher to ask the workers to checkpoint and stop
RAY_DIR = "ray"            # Ray Train's storage (its checkpoints) inside the staging folder
COMMITTED = "committed"    # in a checkpoint folder once every rank's files are in it (rayworker.py)
TRAIN_STATE = "trainstate.json"  # a checkpoint's progress (checkpoint.py writes it)
STAGING_SUFFIX = ".partial"


def staging_of(final_dir: Path) -> Path:
    return final_dir.with_name(final_dir.name + STAGING_SUFFIX)


def is_run(path: Path) -> bool:
    """A folder shardtune made: a run, a run being built, or a stopped run."""
    return (path / MARKER).is_file() and not (path / MARKER).is_symlink()


def mark(path: Path) -> None:
    (path / MARKER).write_text(json.dumps({"written_by": "shardtune", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                           "pid": os.getpid()}) + "\n")


# ------------------------------------------------------------------- what may be an output
def output_dir_problems(written: str, inputs: list[Path]) -> list[str]:
    """Folders output.dir may never name, whatever if_exists says: they hold things that
    are not runs. `written` is output.dir as the user wrote it; `inputs` are the recipe's
    local files (recipe, data, model), resolved."""
    if not written.strip():
        return ["output.dir is empty (an unset shell variable?); name a new folder for the run, "
                "e.g. output.dir=runs/my-task"]
    path = Path(written).expanduser().resolve()
    refuse = f"output.dir '{written}' resolves to {path}, which"
    home, cwd = Path.home().resolve(), Path.cwd().resolve()
    if path == Path(path.anchor):
        return [f"{refuse} is the root of the file system; name a new folder for the run, e.g. /scratch/runs/my-task"]
    if path == home or home.is_relative_to(path):
        return [f"{refuse} is (or holds) your home directory; name a new folder for the run, e.g. {home}/runs/my-task"]
    if path == cwd or cwd.is_relative_to(path):
        return [f"{refuse} is (or holds) the current directory; name a new folder for the run, e.g. runs/my-task"]
    for item in inputs:
        if item == path or item.is_relative_to(path):
            return [f"{refuse} holds the recipe's input {item}; a run's folder must hold nothing but the run, "
                    "so name a new folder, e.g. runs/my-task"]
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == path else f"is under {parent}, which is a file"
                return [f"{refuse} {where}; name a folder for the run"]
            break
    return []


def choose_final_dir(written: Path, if_exists: str, resume: bool) -> Path:
    """The folder this run gets. `if_exists: new`: output.dir while it holds no run, else a
    fresh sibling `<dir>-YYYYmmdd-HHMMSS`, so a second run never replaces the first; with
    --resume, the newest of them whose staging folder holds a checkpoint. Otherwise
    output.dir itself (error and overwrite decide what happens to an earlier run)."""
    if if_exists != "new":
        return written
    # The runs made this way, finished (<dir>-STAMP) or still in their staging folder.
    siblings = {p.with_name(p.name.removesuffix(STAGING_SUFFIX)) for p in written.parent.glob(f"{written.name}-*")
                if p.is_dir()}
    family = [written, *sorted(siblings)]
    if resume:
        for candidate in reversed(family):
            if has_checkpoint(staging_of(candidate)):
                return candidate
    if not (written.exists() and any(written.iterdir())) and not has_checkpoint(staging_of(written)):
        return written
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = written.with_name(f"{written.name}-{stamp}"), 2
    while candidate.exists() or staging_of(candidate).exists():
        candidate, n = written.with_name(f"{written.name}-{stamp}-{n}"), n + 1
    return candidate


def claim_problem(final_dir: Path, if_exists: str, resume: bool) -> str | None:
    """Why the run may not write to final_dir (and its staging folder), or None. No side effects,
    so it is asked before any slow work."""
    staging = staging_of(final_dir)
    if final_dir.exists() and any(final_dir.iterdir()):
        if not is_run(final_dir):
            return (f"output directory '{final_dir}' exists and is not a shardtune run (it has no {MARKER} marker); "
                    "shardtune replaces only its own runs, so choose a new output.dir (or move that folder away "
                    "yourself)")
        if if_exists == "error":
            return (f"output directory '{final_dir}' already holds a run; choose another output.dir or set "
                    "output.if_exists=overwrite to replace it when the new run has finished")
    if staging.exists() and not is_run(staging):
        return (f"'{staging}' exists and is not a shardtune folder (no {MARKER} marker); shardtune builds the run "
                "there, so move it away or choose another output.dir")
    if staging.exists() and not resume and has_checkpoint(staging):
        return (f"'{staging}' holds the checkpoint of an interrupted run; continue it with --resume, or delete "
                "that folder to start afresh")
    return None


def has_checkpoint(staging: Path) -> bool:
    """Whether an interrupted run left a checkpoint to resume from: one Ray's snapshot
    records, or a committed one its controller had not recorded yet when it was killed."""
    return bool(recorded_checkpoints(staging)) or newest_committed(staging / RAY_DIR) is not None


def recorded_checkpoints(staging: Path) -> list[str]:
    """The checkpoint folders Ray's controller recorded in its snapshot (written each time it
    registers one; Ray's _CheckpointManagerState)."""
    try:
        state = json.loads((staging / RAY_DIR / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(state, dict):
        return []
    results = [*(state.get("checkpoint_results") or []), state.get("latest_checkpoint_result")]
    return [r["checkpoint_dir_name"] for r in results if isinstance(r, dict) and r.get("checkpoint_dir_name")]


def newest_committed(ray_dir: Path) -> Path | None:
    """The committed checkpoint folder in Ray's storage that got furthest, or None."""
    try:
        found = [d for d in ray_dir.glob("checkpoint_*") if (d / COMMITTED).is_file()]
    except OSError:
        return None
    return max(found, key=progress, default=None)


def progress(checkpoint_dir: Path) -> tuple[int, int]:
    """(epochs done, micro-batches done in the next one): how far a checkpoint got."""
    try:
        state = json.loads((checkpoint_dir / TRAIN_STATE).read_text())
        return int(state["epoch"]), int(state.get("micro_batches_done", 0))
    except (OSError, ValueError, KeyError, TypeError):
        return -1, -1


def claim(final_dir: Path, if_exists: str, resume: bool) -> tuple[Path, bool]:
    """Create (or reopen, when resuming) the staging folder; returns it and whether it is resumed."""
    if (problem := claim_problem(final_dir, if_exists, resume)) is not None:
        raise RunError(problem)
    staging = staging_of(final_dir)
    if resume and has_checkpoint(staging):
        return staging, True
    if staging.exists():
        shutil.rmtree(staging)  # ours (marked) and holding no checkpoint: a failed earlier attempt
    try:
        staging.mkdir(parents=True)
        mark(staging)
    except OSError as exc:
        raise RunError(f"cannot create the run's folder '{staging}': {describe_os_error(exc)}; "
                       "choose an output.dir you can write to") from None
    return staging, False


def remove_staging(staging: Path) -> None:
    if is_run(staging):
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, final_dir: Path) -> None:
    """Swap the finished staging folder into place. An earlier run there (checked by claim to
    be one) is moved aside under a fresh name, so nothing but it is ever deleted."""
    if final_dir.exists():
        if any(final_dir.iterdir()) and not is_run(final_dir):  # appeared while the run trained
            raise RunError(f"'{final_dir}' appeared during the run and is not a shardtune run; the finished run "
                           f"is kept in '{staging}'")
        aside = final_dir.with_name(f".{final_dir.name}.replaced-{uuid.uuid4().hex[:8]}")
        final_dir.rename(aside)
        staging.rename(final_dir)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        staging.rename(final_dir)


def describe_os_error(exc: OSError) -> str:
    """An OSError with its errno name and path, e.g. 'No space left on device (ENOSPC) writing /x'."""
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    what = exc.strerror or str(exc)
    where = f" at {exc.filename}" if exc.filename else ""
    return f"{what}{f' ({name})' if name else ''}{where}"
