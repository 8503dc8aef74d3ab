"""Where a run's progress goes: its log lines (stdout and logs/train.log) and its scalars
(the trackers named in `output.trackers`). Rank 0 only; the other ranks log nothing.

Trackers register here by name, so the recipe's choices and the docs come from one table:
  tensorboard  events in the run's logs/tensorboard (the default)
  mlflow       an MLflow run in `output.mlflow.tracking_uri` (default: a local SQLite store
               beside the run's folder), with the recipe as parameters; a resumed run
               continues the MLflow run it started
Scalars are filed under `train/` (per logged step: loss, lr, tokens_per_s; per epoch:
epoch_loss) and `validation/` (every evaluation's metrics).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Protocol


class Tracker(Protocol):
    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None: ...

    def close(self, status: str) -> None:
        """status: finished, stopped or failed."""


# name -> factory(recipe, logs_dir, log) -> Tracker
TRACKERS: dict[str, Callable] = {}


def register_tracker(name: str):
    def add(factory):
        TRACKERS[name] = factory
        return factory
    return add


class RunLog:
    """Progress lines to stdout and logs/train.log, and scalars to the recipe's trackers."""

    def __init__(self, directory: Path, enabled: bool, recipe=None):
        self.enabled = enabled
        self.file = None
        self.trackers: list[Tracker] = []
        if not enabled:
            return
        directory.mkdir(parents=True, exist_ok=True)
        self.file = open(directory / "train.log", "a", buffering=1)
        for name in (recipe.output.trackers if recipe is not None else ["tensorboard"]):
            tracker = TRACKERS[name](recipe, directory, self)
            if tracker is not None:
                self.trackers.append(tracker)

    def __call__(self, message: str) -> None:
        if self.enabled and self.file is not None:
            line = f"[shardtune {time.strftime('%H:%M:%S')}] {message}"
            # sys.stdout directly: Ray Train patches print() and would emit every line twice.
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            self.file.write(line + "\n")

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        numbers = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step")}
        for tracker in self.trackers:
            tracker.scalars(prefix, numbers, step)

    def close(self, status: str = "finished") -> None:
        for tracker in self.trackers:
            tracker.close(status)
        if self.file is not None:
            self.file.close()
        self.file, self.trackers = None, []


@register_tracker("tensorboard")
def _tensorboard(recipe, directory: Path, log) -> Tracker | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # a bare GPU image without tensorboard (bench/gpu): the log still has it all
        log("tensorboard is not installed: scalars go to logs/train.log only (pip install tensorboard)")
        return None
    return _TensorBoard(SummaryWriter(str(directory / "tensorboard")))


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self, status: str) -> None:
        self.writer.close()


MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
OUTPUT_DIR_TAG = "shardtune.output_dir"


@register_tracker("mlflow")
def _mlflow(recipe, directory: Path, log) -> Tracker:
    from mlflow import MlflowClient

    settings = recipe.output.mlflow
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(settings.experiment)
    output_dir = str(Path(recipe.output.dir).expanduser().resolve())
    # A resumed run (after a stop or a lost worker) goes on in the MLflow run it started.
    unfinished = client.search_runs([experiment_id], filter_string=f"tags.`{OUTPUT_DIR_TAG}` = '{_quote(output_dir)}' "
                                                                    "and attributes.status != 'FINISHED'",
                                    order_by=["attributes.start_time DESC"], max_results=1)
    if unfinished:
        run_id = unfinished[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        log(f"mlflow: continuing run {run_id} in {settings.tracking_uri}")
    else:
        run_id = client.create_run(experiment_id, run_name=Path(output_dir).name,
                                   tags={OUTPUT_DIR_TAG: output_dir, "shardtune.task": recipe.task.type,
                                         "shardtune.adapter": recipe.adapter.method}).info.run_id
        client.log_batch(run_id, params=_params(recipe.model_dump(mode="json")))
        log(f"mlflow: run {run_id} in {settings.tracking_uri} (experiment {settings.experiment})")
    return _MLflow(client, run_id)


class _MLflow:
    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{prefix}/{k}", v, now, step) for k, v in values.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, MLFLOW_STATUS[status])


def _params(recipe: dict) -> list:
    """The recipe as MLflow parameters, one per field (section.key), values shortened to
    MLflow's limit."""
    from mlflow.entities import Param

    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = str(value)[:500]
    walk("", recipe)
    return [Param(k, v) for k, v in sorted(flat.items())]


def _quote(text: str) -> str:
    return text.replace("'", "\\'")
