"""Ray Train: run the worker loop in a TorchTrainer on a cluster (raycluster.py), collect the run.

With raycluster.py the only modules that import Ray for training (jobs.py uses its Jobs
API). The output directory is written atomically: the run builds `<dir>.partial` and
renames it into place only when it finished, so a failed run never leaves something that
looks like a finished one (and never destroys an earlier run: with `if_exists: overwrite`
the old one is replaced only at the end; see rundir.py). Stops and failures keep the last
checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shardtune import raycluster, rundir, runreport
from shardtune.console import FRAMEWORK_LOG, run_console
from shardtune.export import write_metrics
from shardtune.errors import RecipeError, RunError, RunStopped, ShardtuneError
from shardtune.reports import Kind, Report
from shardtune.rayworker import ray_worker
from shardtune.recipe import Recipe

# Environment every worker needs: no hub access attempts when offline, quiet tokenizers.
_WORKER_ENV_PASSTHROUGH = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME",
                           "TORCH_EXTENSIONS_DIR", "PYTHONPATH",
                           "SHARDTUNE_CACHE")  # workers map the data cache the driver wrote


@dataclass
class RunResult:
    output_dir: Path
    metrics: dict
    seconds: float


def run(recipe: Recipe, *, address: str | None = None, resume: bool = False, verbose: bool = False,
        callbacks: list | None = None) -> RunResult:
    """Train a recipe on Ray; returns when the run's output directory is complete.

    SIGTERM, SIGUSR1 (what Slurm sends at the time limit, or before it with --signal) or a
    first Ctrl-C ask the workers to checkpoint at the next step; the run then raises
    RunStopped and keeps `<dir>.partial`, which `resume=True` continues from. A second
    Ctrl-C stops at once and keeps the last checkpoint. A run that fails after a
    checkpoint keeps it too, so nothing trained is ever deleted. The console shows
    shardtune's lines and the framework's output goes to logs/framework.log, unless
    `verbose` (console.py). `callbacks`: Ray Train callbacks (a sweep's trial passes
    Tune's, which forwards every report to Tune).
    """
    started = time.perf_counter()
    written = Path(recipe.output.dir).resolve()
    final_dir = rundir.choose_final_dir(written, recipe.output.if_exists, resume)
    if final_dir != written:  # if_exists: new; the saved recipe and the trackers name the real folder
        recipe = recipe.model_copy(update={"output": recipe.output.model_copy(update={"dir": str(final_dir)})})
        if not resume:
            print(f"'{written}' holds a run; this one goes to {final_dir} (output.if_exists: new)", file=sys.stderr)
    # RAY_ADDRESS: set by `ray job submit` for the job's driver (and by users who export it).
    address = address or recipe.cluster.address or os.environ.get("RAY_ADDRESS")
    if (problem := rundir.claim_problem(final_dir, recipe.output.if_exists, resume)) is not None:
        raise RunError(problem)  # before the slow checks: the answer needs no model or data
    if address is None:
        check_fits_this_machine(recipe)
    preflight(recipe)
    staging, resuming = rundir.claim(final_dir, recipe.output.if_exists, resume)
    if resuming:
        recipe = check_resumable(staging, recipe)
        print(f"resuming the stopped run in {staging}", file=sys.stderr)
    stopped = False
    signalled: list[int] = []  # filled by _stop_on_signals
    try:
        recipe = _stage_job_inputs(recipe, staging)
        (staging / rundir.STOP_FILE).unlink(missing_ok=True)
        (staging / rundir.RECIPE).write_text(recipe.to_yaml())
        report = _fit(recipe, staging, address, signalled, verbose, callbacks)
        if report.kind is Kind.STOPPED:
            stopped = True
            raise RunStopped(f"stopped at step {report.metrics['step']} of {report.metrics['total_steps']} on "
                             f"request; the checkpoint is in {staging}; run the same command with --resume to "
                             "continue")
        _finish(staging, final_dir, recipe, report.metrics, started)
    except BaseException as exc:
        raise _after_failure(exc, staging, recipe, stopped, signalled) from None
    return RunResult(final_dir, report.metrics, time.perf_counter() - started)


def _after_failure(exc: BaseException, staging: Path, recipe: Recipe, stopped: bool, signalled: list[int]):
    """What a run that did not finish leaves behind, and the error that says so. Nothing
    half-written keeps the run's name; a checkpoint is never thrown away."""
    if stopped:
        return exc
    if rundir.has_checkpoint(staging):
        how = "run the same command with --resume to continue from it"
        if signalled:
            name = signal.Signals(signalled[-1]).name
            return RunStopped(f"interrupted by {name}; the last checkpoint the workers saved is kept in {staging}; "
                              f"{how}")
        if isinstance(exc, ShardtuneError):
            if "start afresh" not in exc.render():  # a checkpoint refused as unsafe says so itself
                exc.problems[-1] += f" (the last checkpoint is kept in {staging}; {how})"
            return exc
        if isinstance(exc, KeyboardInterrupt):
            return RunStopped(f"interrupted; the last checkpoint is kept in {staging}; {how}")
        exc.add_note(f"shardtune: the last checkpoint is kept in {staging}; {how}")  # a bug: keep its traceback
        return exc
    if not recipe.output.keep_checkpoints:
        rundir.remove_staging(staging)
    if isinstance(exc, KeyboardInterrupt) or signalled:
        return RunStopped("interrupted before the first checkpoint; nothing was kept. Run the command again to "
                          "start afresh")
    return exc


def check_fits_this_machine(recipe: Recipe) -> None:
    """An embedded cluster is this machine: it cannot have more CPUs or GPUs than it has."""
    import torch

    cl, cpus = recipe.cluster, os.cpu_count() or 1
    if cl.workers * cl.cpus_per_worker > cpus:
        raise RecipeError(f"cluster.workers {cl.workers} x cluster.cpus_per_worker {cl.cpus_per_worker:g} needs "
                          f"{cl.workers * cl.cpus_per_worker:g} CPUs, and the embedded cluster runs on this machine's "
                          f"{cpus}; lower them, or attach to a cluster with --address")
    if cl.gpus_per_worker > 0:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if cl.workers * cl.gpus_per_worker > have:
            raise RecipeError(f"cluster.workers {cl.workers} x cluster.gpus_per_worker {cl.gpus_per_worker:g} needs "
                              f"{cl.workers * cl.gpus_per_worker:g} GPUs, and this machine has {have} that torch can "
                              "use; set cluster.gpus_per_worker: 0 to train on CPU, or attach to a GPU cluster "
                              "with --address")


def check_resumable(staging: Path, recipe: Recipe) -> Recipe:
    """A resume continues the stopped run only with a recipe that computes the same thing.
    On another number of workers the accumulation changes to keep the global batch (the
    recipe returned), and the workers load the checkpoint's portable state."""
    import yaml

    from shardtune.checkpoint import recipe_differences

    try:
        before = yaml.safe_load((staging / rundir.RECIPE).read_text())
    except (OSError, yaml.YAMLError):
        return recipe  # no record (killed before it was written): the workers' fingerprint check decides
    if not isinstance(before, dict):
        return recipe
    recipe = keep_global_batch(before, recipe)
    now = _stage_job_inputs(recipe, staging).model_dump(mode="json")
    changes = recipe_differences(before, now)
    if changes:
        raise RunError(["--resume: the recipe differs from the stopped run's in what it computes, so resuming "
                        "would not give the run either recipe describes; use the stopped run's values, or start "
                        f"afresh by deleting {staging}. Differences:", *changes])
    return recipe


def keep_global_batch(before: dict, recipe: Recipe) -> Recipe:
    """The stopped run's global batch on this recipe's workers, by its gradient accumulation."""
    try:
        workers, accumulation = int(before["cluster"]["workers"]), int(before["train"]["gradient_accumulation_steps"])
    except (KeyError, TypeError, ValueError):
        return recipe
    now = recipe.cluster.workers
    if now == workers:
        return recipe
    per_worker, left = divmod(workers * accumulation, now)
    if left:
        fits = [n for n in range(1, workers * accumulation + 1) if workers * accumulation % n == 0]
        raise RunError(f"--resume on {now} workers: the stopped run's global batch is {workers} workers x "
                       f"{accumulation} accumulation steps x micro_batch_size {before['train']['micro_batch_size']}"
                       f", and {now} workers cannot keep it (the accumulation would be {workers * accumulation}/"
                       f"{now}); resume on " + ", ".join(map(str, fits)) + " workers")
    if per_worker != recipe.train.gradient_accumulation_steps:
        print(f"resuming on {now} workers (the stopped run had {workers}): gradient_accumulation_steps "
              f"{recipe.train.gradient_accumulation_steps} -> {per_worker} keeps the global batch", file=sys.stderr)
    return recipe.model_copy(update={"train": recipe.train.model_copy(
        update={"gradient_accumulation_steps": per_worker})})


def preflight(recipe: Recipe) -> None:
    """Checks that need the model's files or the data, done on the driver so that a bad
    row or a misnamed module fails in seconds, before Ray starts any worker."""
    from shardtune.adapters import check_module_names
    from shardtune.compat import check_prequantized
    from shardtune.backbone import load_tokenizer
    from shardtune.data.pipeline import load_data, optimizer_steps_per_epoch
    from shardtune.tasks import Can, get_task, kind_of

    task = get_task(recipe)
    tokenizer = load_tokenizer(recipe)
    if kind_of(recipe).can(Can.CHECK_TOKENIZER):  # e.g. prompt tasks' label words
        task.check(tokenizer)
    data = load_data(recipe, task, tokenizer)
    if sum(data.skipped.values()):
        print(f"data.on_bad_row is skip: leaving out {data.skipped['train']} train and "
              f"{data.skipped['validation']} validation rows; first: " + " | ".join(data.problems), file=sys.stderr)
    optimizer_steps_per_epoch(len(data.train_examples), recipe.cluster.workers, recipe.train)
    check_module_names(recipe, task)
    check_prequantized(recipe)


def _stage_job_inputs(recipe: Recipe, staging: Path) -> Recipe:
    """In a Ray job with a working_dir, copy the files the recipe takes from it (what
    `shardtune submit` packs) into the run's storage, which every node sees: the
    working_dir is unpacked at a different path on each node."""
    if not ray_job_working_dir():
        return recipe
    job_dir, inputs = Path.cwd().resolve(), staging / "inputs"
    recipe = recipe.model_copy(deep=True)
    holders = [(recipe.model, "path"), (recipe.data.train, "path")]
    if recipe.data.validation is not None:
        holders.append((recipe.data.validation, "path"))
    for holder, field in holders:
        path = Path(getattr(holder, field))
        if path.is_absolute() and path.exists() and path.is_relative_to(job_dir):
            target = inputs / path.relative_to(job_dir)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if path.is_dir() else shutil.copy2)(path, target)
            setattr(holder, field, str(target))
    return recipe


def ray_job_working_dir() -> bool:
    """True in the driver of a Ray job submitted with a working_dir (`ray job submit
    --working-dir`, `shardtune submit`)."""
    import json

    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    except ValueError:
        return False
    return bool((config.get("runtime_env") or {}).get("working_dir"))


@contextmanager
def _stop_on_signals(stop_file: Path, signalled: list[int]):
    """While training, SIGTERM/SIGUSR1 and a first Ctrl-C create the stop file the workers
    poll each step (it lives in the run's storage, which every node sees). A second Ctrl-C
    raises KeyboardInterrupt: stop now, keeping the last checkpoint."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in signalled:
            signalled.append(signum)
            print("\nCtrl-C again: stopping now; the last checkpoint is kept", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        signalled.append(signum)
        stop_file.touch()
        if signum == signal.SIGINT:
            print("\nCtrl-C: asking the workers to checkpoint at the next step and stop (resume with --resume); "
                  "press Ctrl-C again to stop now, keeping the last checkpoint", file=sys.stderr, flush=True)
        else:
            print(f"{signal.Signals(signum).name}: asking the workers to checkpoint and stop", file=sys.stderr,
                  flush=True)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fit(recipe: Recipe, staging: Path, address: str | None, signalled: list[int] | None = None,
         verbose: bool = False, callbacks: list | None = None) -> Report:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started_here = raycluster.connect(recipe, address)
    try:
        cl = recipe.cluster
        raycluster.check_storage_is_shared(recipe, staging, raycluster.alive_nodes())
        use_gpu = cl.gpus_per_worker > 0
        resources = {"CPU": cl.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = cl.gpus_per_worker
        env = {k: os.environ[k] for k in _WORKER_ENV_PASSTHROUGH if k in os.environ}
        env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        if not use_gpu:
            env["DS_ACCELERATOR"] = "cpu"
        trainer = _trainer_class(TorchTrainer, embedded=raycluster.is_embedded())(
            train_loop_per_worker=ray_worker,
            train_loop_config={"recipe": recipe.model_dump(mode="json"), "stop_file": str(staging / rundir.STOP_FILE)},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cl.workers, use_gpu=use_gpu, resources_per_worker=resources,
                                         placement_strategy=cl.placement.upper()),
            run_config=RunConfig(
                name="ray", storage_path=str(staging),
                checkpoint_config=checkpoint_config(recipe),
                # Ray retries a worker group that cannot be placed forever by default; an
                # embedded cluster never grows, and an attached one gets ~10 minutes to scale.
                failure_config=FailureConfig(max_failures=cl.max_failures,
                                             controller_failure_limit=10 if address else 1),
                worker_runtime_env={"env_vars": env}, callbacks=callbacks or []),
        )
        try:
            # After ray.init, which installs its own SIGTERM handler for drivers.
            with _stop_on_signals(staging / rundir.STOP_FILE, signalled if signalled is not None else []), \
                    run_console(staging / rundir.LOGS / FRAMEWORK_LOG, verbose=verbose):
                result = trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise _explain_failure(exc) from None
        except KeyboardInterrupt:
            trainer.kill_controller()  # a second Ctrl-C: stop the workers now
            raise
        report = Report.from_metrics(result.metrics)
        if report is not None and report.kind is Kind.STOPPED:
            return report
        if result.checkpoint is None or report is None or report.kind is not Kind.FINAL:
            raise RunError("the workers finished without reporting the final checkpoint; see the log above")
        with result.checkpoint.as_directory() as checkpoint:
            for item in Path(checkpoint).iterdir():
                if item.is_dir() and (staging / item.name).is_dir():  # logs/: framework.log is there already
                    shutil.copytree(item, staging / item.name, dirs_exist_ok=True)
                else:
                    shutil.move(str(item), staging / item.name)
        return report
    finally:
        if started_here:
            ray.shutdown()


def checkpoint_config(recipe: Recipe):
    """Retention: the last N checkpoints, or the best N by a validation metric. Ray always
    keeps the latest one as well, which is what a failure or --resume continues from."""
    from ray.train import CheckpointConfig

    out = recipe.output
    if out.keep_best_by is None:
        return CheckpointConfig(num_to_keep=out.checkpoints_to_keep)
    mode = out.keep_best_mode or ("min" if "loss" in out.keep_best_by else "max")
    return CheckpointConfig(num_to_keep=out.checkpoints_to_keep, checkpoint_score_attribute=out.keep_best_by,
                            checkpoint_score_order=mode)


def _trainer_class(base, embedded: bool = False):
    """Ray Train's trainer, without its own Ctrl-C handler, and on an embedded cluster
    without its PlacementGroupCleaner.

    Ray's handler (registered inside fit) aborts the run on the first Ctrl-C and throws
    away the chance to checkpoint; shardtune's (_stop_on_signals) checkpoints first. The
    cleaner is a detached actor that removes the run's placement group if the controller
    dies while the cluster lives on; it asks Ray's state API (the dashboard) once a second
    whether the controller is alive. An embedded cluster has no dashboard, so every poll
    failed with a logged warning (298 in the quick-start), and it ends with its driver, the
    placement group with it: there is nothing for the cleaner to do."""
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class Trainer(base):
        _controller = None

        def _register_sigint_handler(self, controller):
            self._controller = controller

        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if embedded:
                callbacks = [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]
            return callbacks

        def kill_controller(self) -> None:
            import ray

            if self._controller is not None:
                try:
                    ray.kill(self._controller)
                except Exception:  # already gone with the cluster
                    pass

    return Trainer


def _explain_failure(exc: Exception) -> ShardtuneError:
    """Surface a user error raised inside a worker as itself; anything else as a RunError."""
    if "worker group startup timed out" in str(exc):
        return RunError("the cluster cannot place the workers: it lacks the CPUs/GPUs that cluster.workers x "
                        "cluster.cpus_per_worker / gpus_per_worker ask for (or they are held by another run); "
                        f"lower them or add nodes. Ray: {str(exc).splitlines()[-1][:300]}")
    failures = getattr(exc, "worker_failures", {}) or {}
    for rank, failure in sorted(failures.items()):
        cause = failure
        while cause is not None:
            if isinstance(cause, ShardtuneError):
                return cause
            cause = getattr(cause, "cause", None) or cause.__cause__
    first = next(iter(sorted(failures.items())), None)
    detail = f"worker {first[0]} failed: {first[1]}" if first else str(exc)
    lost = re.search(r"node_ip='([^']+)'", detail)
    node_id = re.search(r"node_id='([0-9a-f]+)'", detail)
    if lost and node_id and not raycluster.node_alive(node_id.group(1)):
        return RunError(f"training failed: the node {lost.group(1)} running worker {first[0]} was lost (its "
                        "process or machine died); set cluster.max_failures to resume from the last checkpoint on "
                        f"the remaining nodes. Ray's report: {detail[:600]}")
    return RunError(f"training failed; {detail}")


def _finish(staging: Path, final_dir: Path, recipe: Recipe, final: dict, started: float) -> None:
    """metrics.json, then swap the staging folder into place."""
    final.update(write_metrics(staging, recipe, time.perf_counter() - started)["summary"])
    runreport.write_at_finish(staging, published=final_dir)  # `shardtune report` adds the task's tables
    if not recipe.output.keep_checkpoints:
        shutil.rmtree(staging / rundir.RAY_DIR, ignore_errors=True)
    rundir.publish(staging, final_dir)
