"""`shardtune sweep`: Ray Tune over a recipe's fields, every trial a whole shardtune run.

Each trial is what `shardtune run` does (its own Ray Train workers and ZeRO engine, its
own run directory under OUT/trials/), started from a Tune trial actor as Ray Train's
Tune integration intends: the trial drives a TorchTrainer, and Tune's callback forwards
every report (one per evaluation) to Tune, where ASHA compares trials at each rung and
stops the ones that trail. A trial that fails is recorded with its error and the sweep
goes on. Ctrl-C stops the sweep with its state saved (Tune's own handler); `--resume`
continues it: finished trials stand, interrupted ones resume from their last checkpoint
(shardtune's own resume), and the rest start.

OUT holds sweep.json (the recipe and space it was started with), tune/ (Tune's state),
trials/trial-NNNNN/ (the runs), results.csv, best.yaml and sweep.png.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import sys
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

from shardtune import raycluster, rundir
from shardtune.errors import RunError, RunStopped, ShardtuneError
from shardtune.recipe import Recipe, set_value, validate_recipe
from shardtune.reports import KIND_KEY, Kind
from shardtune.sweepspace import SweepSpace, check_space

SPEC, RESULTS, BEST, PLOT = "sweep.json", "results.csv", "best.yaml", "sweep.png"
TUNE_DIR, TRIALS, LOGS = "tune", "trials", "logs"
# A trial only drives its run (the run's workers ask for the CPUs and GPUs) but Tune
# places nothing with no resources; an embedded cluster has one logical CPU more for these.
TRIAL_DRIVER_CPU = 0.01


class TrialFailed(Exception):
    """A trial's own error (a shardtune message), as text: it crosses Ray's process
    boundaries intact, where a ShardtuneError's constructor would not unpickle."""


@dataclass
class TrialRow:
    name: str
    values: dict
    metric: float | None
    status: str  # finished / stopped early / failed
    seconds: float
    run_dir: str
    error: str = ""


@dataclass
class SweepResult:
    out: Path
    metric: str
    mode: str
    trial_raw: dict = field(default_factory=dict)  # the base recipe every trial starts from
    rows: list[TrialRow] = field(default_factory=list)
    best: TrialRow | None = None

    @property
    def keys(self) -> list[str]:
        """The swept fields, in the space's order."""
        return list(self.rows[0].values) if self.rows else []


# ----------------------------------------------------------------------------- setup
def prepare(raw: dict, base: Recipe, space: SweepSpace, out: Path, where: str, resume: bool) -> dict:
    """Check the space against the recipe and claim OUT; returns the trials' raw recipe
    (the base recipe, its paths pinned: trial actors run in their own folders)."""
    check_space(space, raw, where)
    problems = rundir.output_dir_problems(str(out), [Path(where).resolve()])
    if problems:
        raise RunError([p.replace("output.dir", "--out") for p in problems])
    trial_raw = _pinned(raw, base)
    spec = json.loads(json.dumps({"recipe": trial_raw, "space": space.model_dump(mode="json")}))
    saved = out / SPEC
    if resume:
        if not saved.is_file():
            raise RunError(f"--resume: {out} holds no sweep to continue (no {SPEC}); leave out --resume to start one")
        before = json.loads(saved.read_text())
        if before != spec:
            changed = sorted(k for k in ("recipe", "space") if before.get(k) != spec[k])
            raise RunError(f"--resume: the {' and the '.join(changed)} differ from the ones the sweep in {out} was "
                           "started with; resume with the same recipe, overrides and space, or start a new sweep "
                           "with another --out")
        return trial_raw
    if saved.is_file():
        raise RunError(f"{out} holds a sweep already; continue it with --resume, or choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"--out {out} exists and is not an empty folder; a sweep writes its trials there, so name a "
                       "new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(spec, indent=1) + "\n")
    return trial_raw


def _pinned(raw: dict, base: Recipe) -> dict:
    """The raw recipe with its local paths absolute, as validate_recipe resolved them."""
    raw = copy.deepcopy(raw)
    pins = [(["model"], base.model.path), (["data", "train"], base.data.train.path)]
    if base.data.validation is not None:
        pins.append((["data", "validation"], base.data.validation.path))
    for path, value in pins:
        node = raw
        for part in path[:-1]:
            node = node[part]
        if isinstance(node.get(path[-1]), dict):
            node[path[-1]]["path"] = value
        else:
            node[path[-1]] = value if path != ["model"] else {"path": value}
    return raw


def trial_recipe(raw: dict, values: dict, run_dir: Path, where: str, if_exists: str | None = "error") -> Recipe:
    """The base recipe with one trial's values, writing to `run_dir` (a trial's own run
    directory, never replaced; None keeps the base recipe's if_exists)."""
    raw = copy.deepcopy(raw)
    for key, value in values.items():
        set_value(raw, key.split("."), value)
    raw.setdefault("output", {})["dir"] = str(run_dir)
    if if_exists is not None:
        raw["output"]["if_exists"] = if_exists
    return validate_recipe(raw, where=where)


# ----------------------------------------------------------------------------- trial
def _trial(config: dict, *, raw: dict, out: str, address: str | None, embedded: bool) -> None:
    """One trial, in its Tune actor: a shardtune run whose reports go to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from shardtune.orchestrate import run

    name = Path(tune.get_context().get_trial_dir()).name
    final = Path(out) / TRIALS / name
    raycluster.mark_embedded(embedded)
    try:
        recipe = trial_recipe(raw, config, final, where=name)
        if rundir.is_run(final) and (final / rundir.METRICS).is_file():  # done before an interruption
            metrics = json.loads((final / rundir.METRICS).read_text())
            tune.report({**metrics["final"], KIND_KEY: Kind.FINAL.value})
            return
        resume = rundir.staging_of(final).exists()  # an interrupted trial goes on from its checkpoint
        run(recipe, address=address, resume=resume, callbacks=[TuneReportCallback()])
    except ShardtuneError as exc:
        raise TrialFailed(exc.render()) from None


def _is_final(result: dict) -> bool:
    """Whether a trial's last result is its run's final report (the run finished)."""
    return result.get(KIND_KEY) == Kind.FINAL.value


def _trial_name(trial) -> str:
    return "trial-" + trial.trial_id.rsplit("_", 1)[-1]


# ----------------------------------------------------------------------------- main
def sweep(raw: dict, base: Recipe, space: SweepSpace, out: Path, *, where: str, address: str | None = None,
          resume: bool = False, verbose: bool = False, say=print) -> SweepResult:
    """Run (or continue) the sweep; returns its rows once every trial has ended."""
    out = out.expanduser().resolve()
    trial_raw = prepare(raw, base, space, out, where, resume)
    metric, mode = space.metric_and_mode(raw)
    address = address or base.cluster.address or os.environ.get("RAY_ADDRESS")
    if address is None:
        from shardtune.orchestrate import check_fits_this_machine

        check_fits_this_machine(base)
    import ray

    from shardtune.console import run_console

    started = time.monotonic()
    started_here = raycluster.connect(base, address, extra_cpus=1)
    # After ray.init (which installs Ray's printer), and around the shutdown too: trials
    # stopped by Ctrl-C print their tracebacks as they go, and those belong in the log.
    with run_console(out / LOGS / "framework.log", verbose=verbose, show=False):
        try:
            _fit(trial_raw, base, space, out, metric, mode, address, resume, verbose, say)
        finally:
            if started_here:
                ray.shutdown()
    result = collect(out, space, metric, mode)
    result.trial_raw = trial_raw
    unfinished = [r.name for r in result.rows if r.status == "unfinished"]
    missing = space.size() - len(result.rows)  # trials Tune had not made yet
    if space.time_budget_s is not None and time.monotonic() - started >= space.time_budget_s:
        if unfinished or missing:
            say(f"the time budget ({space.time_budget_s:g} s) ran out: {len(unfinished) + missing} trial(s) did not "
                "run to the end")
    elif unfinished or missing:  # Ctrl-C: Tune stopped the trials and saved its state
        raise RunStopped(f"the sweep was interrupted with {len(unfinished) + missing} of {space.size()} trials "
                         f"unfinished; its state is kept in {out}: run the same command with --resume to continue")
    return result


def _fit(trial_raw: dict, base: Recipe, space: SweepSpace, out: Path, metric: str, mode: str,
         address: str | None, resume: bool, verbose: bool, say):
    from functools import partial

    from ray import tune

    # A trial whose result lacks the metric is recorded as such (collect says which
    # metrics the task reports) instead of Tune ending the whole sweep.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    trainable = tune.with_resources(
        partial(_trial, raw=trial_raw, out=str(out), address=address, embedded=raycluster.is_embedded()),
        {"CPU": TRIAL_DRIVER_CPU})
    progress = _console_callback(metric, say)
    run_config = tune.RunConfig(name=TUNE_DIR, storage_path=str(out), verbose=0, callbacks=[progress])
    if resume and tune.Tuner.can_restore(str(out / TUNE_DIR)):
        say(f"continuing the sweep in {out}")
        tuner = tune.Tuner.restore(str(out / TUNE_DIR), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        # Restore brings back the pickled run config, whose callback is the last session's
        # instance; this session's counts what this one sees.
        tuner._local_tuner.get_run_config().callbacks = [progress]
    else:
        tuner = tune.Tuner(trainable, param_space=_param_space(space), run_config=run_config,
                           tune_config=_tune_config(space, base, metric, mode))
    with _tune_output_to(out / LOGS / "tune.log", verbose):
        tuner.fit()


@contextmanager
def _tune_output_to(path: Path, verbose: bool):
    """Tune's driver-side lines (its trial reports are print()s, its errors log records
    with tracebacks) go to the sweep's logs/; the console keeps a line per trial event."""
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("ray.tune", "ray.train", "ray.air")]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    with open(path, "a", buffering=1) as handle, redirect_stdout(handle):
        file_handler = logging.StreamHandler(handle)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for lg in loggers:
            lg.handlers, lg.propagate = [file_handler], False
        try:
            yield
        finally:
            for lg, handlers, propagate in saved:
                lg.handlers, lg.propagate = handlers, propagate


def _param_space(space: SweepSpace) -> dict:
    from ray import tune

    kinds = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda b: tune.uniform(*b),
             "loguniform": lambda b: tune.loguniform(*b)}
    return {key: kinds[p.kind](getattr(p, p.kind)) for key, p in space.parameters.items()}


def _tune_config(space: SweepSpace, base: Recipe, metric: str, mode: str):
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    scheduler = FIFOScheduler()
    if space.scheduler == "asha":
        epochs = space.parameters.get("train.epochs")
        longest = max([base.train.epochs, *((epochs.choice or epochs.grid or []) if epochs else [])])
        # time_attr "epoch": shardtune reports fractional epochs done with every evaluation.
        # max_t past the last epoch: ASHA stops any trial that reaches max_t, and a trial
        # must report its final result (its run directory) after its last evaluation.
        scheduler = ASHAScheduler(time_attr="epoch", max_t=max(longest, space.grace_period) + 1,
                                  grace_period=space.grace_period, reduction_factor=space.reduction_factor)
    cl, have = base.cluster, ray.cluster_resources()
    spare = 1 if raycluster.is_embedded() else 0  # the trial drivers' logical CPU (connect)
    fits = (have.get("CPU", 0) - spare) // max(cl.workers * cl.cpus_per_worker, 1e-9)
    if cl.gpus_per_worker:
        fits = min(fits, have.get("GPU", 0) // (cl.workers * cl.gpus_per_worker))
    # Tune leaves a search_alg it is given to limit itself: the limit goes to it.
    at_once = space.max_concurrent or max(1, int(fits))
    return tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler, num_samples=space.trials,
                           time_budget_s=space.time_budget_s, trial_dirname_creator=_trial_name,
                           search_alg=BasicVariantGenerator(random_state=space.seed, max_concurrent=at_once))


def _console_callback(metric: str, say):
    """A line per trial event on the console (the trials' own lines go to their logs)."""
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self, say):  # an argument, not a closure: the class is pickled by value
            self.say = say

        def __getstate__(self):  # Tune pickles its run config (tuner.pkl); a console is no state
            return {k: v for k, v in self.__dict__.items() if k != "say"}

        def __setstate__(self, state):
            self.__dict__.update(state, say=print)

        def on_trial_start(self, iteration, trials, trial, **info):
            values = ", ".join(f"{k}={v}" for k, v in trial.config.items())
            self.say(f"{_trial_name(trial)} started: {values}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get(KIND_KEY) == Kind.EVALUATION.value and metric in result:
                self.say(f"{_trial_name(trial)} epoch {result.get('epoch')}: {metric} {result[metric]:.4f}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            how = "finished" if _is_final(last) else "stopped early (ASHA)"
            value = f": {metric} {last[metric]:.4f}" if isinstance(last.get(metric), (int, float)) else ""
            self.say(f"{_trial_name(trial)} {how}{value}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.say(f"{_trial_name(trial)} failed; the sweep goes on (its error is in {RESULTS})")

    return Progress(say)


# ----------------------------------------------------------------------------- results
def collect(out: Path, space: SweepSpace, metric: str, mode: str) -> SweepResult:
    """The rows of results.csv, from Tune's saved state, so that a resumed sweep lists
    the trials of every session."""
    from ray import tune

    grid = tune.ExperimentAnalysis(str(out / TUNE_DIR))
    result = SweepResult(out, metric, mode)
    for trial in sorted(grid.trials, key=_trial_name):
        name, last = _trial_name(trial), trial.last_result or {}
        if trial.status == "ERROR":
            status, error = "failed", _error_text(trial)
        elif _is_final(last):
            status, error = "finished", ""
        else:
            status, error = ("stopped early" if trial.status == "TERMINATED" else "unfinished"), ""
        value = last.get(metric) if isinstance(last.get(metric), (int, float)) else None
        final = out / TRIALS / name  # a stopped trial's run is a stopped run: resumable, in <name>.partial
        run_dir = next((p for p in (final, rundir.staging_of(final)) if p.is_dir()), None)
        result.rows.append(TrialRow(name, {k: trial.config.get(k) for k in space.parameters}, value, status,
                                    round(float(last.get("time_total_s", 0.0)), 1),
                                    str(run_dir) if run_dir else "", error))
    scored = [r for r in result.rows if r.metric is not None and r.status == "finished"] or \
             [r for r in result.rows if r.metric is not None]
    if scored:
        result.best = (min if mode == "min" else max)(scored, key=lambda r: r.metric)
    return result


def _error_text(trial) -> str:
    """The trial's own message (TrialFailed's), else the last line of Ray's report."""
    name = trial.run_metadata.error_filename
    try:
        text = Path(trial.path, name).read_text(errors="replace") if name else ""
    except OSError:
        text = ""
    marker = f"{TrialFailed.__name__}: "
    if marker in text:
        return text[text.rindex(marker) + len(marker):].strip()
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "failed (Ray recorded no error text)"


def write_outputs(result: SweepResult, base_output_dir: str) -> None:
    """results.csv, best.yaml (the best trial's recipe, writing where the base recipe
    writes) and sweep.png."""
    keys = result.keys
    with open(result.out / RESULTS, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", *keys, result.metric, "status", "seconds", "run_dir", "error"])
        for r in result.rows:
            writer.writerow([r.name, *(_cell(r.values[k]) for k in keys), "" if r.metric is None else r.metric,
                             r.status, r.seconds, r.run_dir, r.error])
    if result.best is not None:
        recipe = trial_recipe(result.trial_raw, result.best.values, Path(base_output_dir), where=BEST,
                              if_exists=None)
        head = (f"# The best trial of the sweep in {result.out}: {result.best.name}, {result.metric} "
                f"{result.best.metric:.4f} ({result.mode}).\n# Run it with: shardtune run {result.out / BEST}\n")
        (result.out / BEST).write_text(head + recipe.to_yaml())
    plot(result)


def _cell(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def plot(result: SweepResult) -> None:
    """The metric against each swept value, one panel per parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r.metric is not None]
    keys = result.keys
    if not rows or not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    colours = {"finished": "tab:blue", "stopped early": "tab:orange"}
    for ax, key in zip(axes[0], keys):
        xs = [r.values[key] for r in rows]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if not numeric:
            labels = sorted({_cell(x) for x in xs})
            xs = [labels.index(_cell(x)) for x in xs]
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        elif min(xs) > 0 and max(xs) / min(xs) >= 100:
            ax.set_xscale("log")
        ax.scatter(xs, [r.metric for r in rows], c=[colours.get(r.status, "tab:gray") for r in rows])
        ax.set_xlabel(key)
        ax.set_ylabel(result.metric)
    fig.suptitle(f"{result.metric} per trial (blue: finished, orange: stopped early)", fontsize=10)
    fig.tight_layout()
    fig.savefig(result.out / PLOT, dpi=110)
    plt.close(fig)


def table(result: SweepResult):
    """The printed table: a row per trial, the best one marked."""
    from rich.table import Table

    keys = result.keys
    view = Table(title=f"sweep: {result.metric} ({result.mode}), {len(result.rows)} trials")
    for column in ("trial", *keys, result.metric, "status", "s"):
        view.add_column(column)
    for r in result.rows:
        mark = " *" if r is result.best else ""
        view.add_row(r.name + mark, *(_cell(r.values[k]) for k in keys),
                     "" if r.metric is None else f"{r.metric:.4f}", r.status + (f": {r.error[:80]}" if r.error else ""),
                     f"{r.seconds:g}")
    return view


def check_reported(result: SweepResult) -> None:
    """A metric no trial reported is a typo in the space (or the recipe's keep_best_by)."""
    if result.rows and all(r.metric is None for r in result.rows) and any(r.status != "failed" for r in result.rows):
        print(f"warning: no trial reported the metric '{result.metric}'; set metric: in the space to one the task "
              "reports (see a trial's metrics.json)", file=sys.stderr)
