"""The `shardtune` command: validate, plan, run, eval, predict, generate, chat, report, merge, recipes,
submit, jobs, slurm."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shardtune.errors import RecipeError, RunError, ShardtuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distributed, parameter-efficient fine-tuning from one YAML recipe.")
out = Console()
err = Console(stderr=True, soft_wrap=True)  # no wrapping: messages carry paths users grep for

def _say(text: str) -> None:
    err.print(text, markup=False, highlight=False)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"shardtune {version('shardtune')}")
        raise typer.Exit(0)


_LOUD = {"libraries": False}  # `shardtune --verbose CMD`: let the libraries print as they do


@app.callback()
def main(show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                           help="print shardtune's version and exit"),
         verbose: bool = typer.Option(False, "--verbose", help="let transformers, peft and torch print their load "
                                                               "reports, progress bars and warnings")) -> None:
    """Distributed, parameter-efficient fine-tuning from one YAML recipe."""
    _LOUD["libraries"] = verbose


def _quiet_libraries() -> None:
    """eval, predict, generate, chat, report and merge load a model in this process:
    transformers' load report, its loading bar and FutureWarnings would outnumber the
    answer. Set before transformers is imported (it reads these once); --verbose keeps them."""
    import os
    import warnings

    if _LOUD["libraries"]:
        return
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU build announces an optional kernel
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)


RecipeArg = typer.Argument(..., help="recipe YAML file", show_default=False)
OverridesArg = typer.Argument(None, help="overrides: section.key=value ...", show_default=False)


def _fail(exc: ShardtuneError) -> None:
    # Messages quote rows, paths and library errors: never read them as rich markup.
    err.print(f"[bold red]error:[/] {escape(exc.render())}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def _command(fn):
    """The one error handler of every command: a user error is printed without a traceback
    and exits non-zero; Ctrl-C outside training (which handles its own) exits 130; a full
    disk or a refused write names the path and errno."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ShardtuneError as exc:
            _fail(exc)
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/] (Ctrl-C); nothing was written", highlight=False)
            raise typer.Exit(130) from None
        except OSError as exc:
            from shardtune.rundir import describe_os_error

            _fail(RunError(describe_os_error(exc)))
    return wrapper


@app.command()
@_command
def validate(recipe: Path = RecipeArg, overrides: Optional[list[str]] = OverridesArg,
             rows: int = typer.Option(16, "--rows", min=0, help="data rows to read and encode as training will "
                                                                 "(0 or --no-rows: the schema and files only)"),
             no_rows: bool = typer.Option(False, "--no-rows", help="do not read the data or load the tokenizer")) -> None:
    """Check a recipe without starting anything: its fields, its files, and its data's first
    rows encoded with the model's tokenizer (a column typo fails here); print it as resolved."""
    rows = 0 if no_rows else rows
    from shardtune.recipe import load_recipe

    resolved = load_recipe(recipe, overrides or [])
    from shardtune.tasks import Can, get_task, task_kind

    if not rows:
        sys.stdout.write(resolved.to_yaml())
        err.print(f"[green]ok:[/] {escape(str(recipe))} is valid (the data's rows were not read: --no-rows)")
        return
    _say(f"reading the first {rows} rows of the data and encoding them with the tokenizer of "
         f"{resolved.model.path} (--no-rows skips this)")
    from shardtune.backbone import load_tokenizer
    from shardtune.data.pipeline import check_first_rows

    try:
        task, tokenizer = get_task(resolved), load_tokenizer(resolved)
    except OSError as exc:  # a hub id with no hub (offline), a folder without a tokenizer
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"model.path '{resolved.model.path}': its tokenizer cannot be loaded ({first}); name a local "
                          "model folder (or download it while online), or check the recipe without reading its data: "
                          "validate --no-rows") from None
    if task_kind(resolved.task.type).can(Can.CHECK_TOKENIZER):  # e.g. label words: they need the tokenizer
        task.check(tokenizer)
    checked = check_first_rows(resolved, task, tokenizer, limit=rows)
    sys.stdout.write(resolved.to_yaml())
    err.print(f"[green]ok:[/] {escape(str(recipe))} is valid ({checked} rows of its data read and encoded)")


@app.command()
@_command
def run(recipe: Path = RecipeArg, overrides: Optional[list[str]] = OverridesArg,
        address: Optional[str] = typer.Option(None, help="Ray cluster address to attach to "
                                                         "(default: the recipe's, else an embedded cluster)"),
        resume: bool = typer.Option(False, "--resume", help="continue a run stopped by SIGTERM/SIGUSR1 "
                                                            "(Slurm's time limit) from its checkpoint; "
                                                            "starts afresh if there is none"),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="show Ray's, DeepSpeed's and transformers' output "
                                                                    "too (it always goes to the run's "
                                                                    "logs/framework.log)")) -> None:
    """Validate a recipe and train it on Ray + DeepSpeed."""
    from shardtune.recipe import load_recipe

    resolved = load_recipe(recipe, overrides or [])
    from shardtune import rundir

    # Before the heavy imports (Ray, torch: seconds): an answer that needs neither comes at once.
    final_dir = rundir.choose_final_dir(Path(resolved.output.dir).resolve(), resolved.output.if_exists, resume)
    problem = rundir.claim_problem(final_dir, resolved.output.if_exists, resume)
    if problem is not None:
        raise RunError(problem)
    from shardtune.orchestrate import run as run_recipe

    result = run_recipe(resolved, address=address, resume=resume, verbose=verbose)
    _print_summary(result)


@app.command()
@_command
def plan(recipe: Path = RecipeArg, overrides: Optional[list[str]] = OverridesArg,
         workers: Optional[int] = typer.Option(None, "--workers", min=1, help="workers (default: the recipe's)"),
         gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", min=1,
                                                     help="plan GPU workers, this many per node"),
         gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="memory per GPU, e.g. 80GB: which "
                                                                             "choices fit, and the cheapest"),
         as_json: bool = typer.Option(False, "--json", help="print the plan as JSON")) -> None:
    """Predict each worker's peak memory for the recipe and for every ZeRO stage, offload
    and checkpointing choice (nothing is loaded: the model is built on the meta device)."""
    from shardtune.plan import model_counts, parse_memory
    from shardtune.plan import plan as make_plan
    from shardtune.recipe import load_recipe

    extra = [] if gpus_per_node is None else ["cluster.gpus_per_worker=1"]
    resolved = load_recipe(recipe, [*(overrides or []), *extra])
    limit = parse_memory(gpu_memory) if gpu_memory else None
    result = make_plan(resolved, model_counts(resolved), workers=workers, gpu_memory_mb=limit)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"per-worker peak memory, {result['workers']} workers on {result['device']}")
    for column in ("choice", "MB", "weights", "optimizer+grads", "activations", "logits", "fits"):
        table.add_column(column)
    for row in [result["as_written"], *result["options"]]:
        parts = row["parts_mb"]
        table.add_row(row["choice"] + (" (as written)" if row is result["as_written"] else ""),
                      f"{row['predicted_peak_mb_per_worker']:,.0f}",
                      f"{parts['frozen_weights'] + parts['trainable_weights']:,.0f}",
                      f"{parts['optimizer'] + parts['gradients']:,.0f}", f"{parts['activations']:,.0f}",
                      f"{parts['logits']:,.0f}", "" if row["fits"] is None else ("yes" if row["fits"] else "no"))
    out.print(table)
    if limit is not None:
        out.print(f"recommended: {result['recommended'] or 'nothing fits; add workers or quantise the backbone'}")


@app.command()
@_command
def sweep(recipe: Path = RecipeArg, overrides: Optional[list[str]] = OverridesArg,
          space: Optional[Path] = typer.Option(None, "--space", help="the search space and budget (YAML; see "
                                                                     "recipes/sweeps/)"),
          grid: Optional[list[str]] = typer.Option(None, "--grid", help="KEY=[a,b]: try each value (repeatable)"),
          out_dir: Path = typer.Option(..., "--out", help="the sweep's folder: trials, results.csv, best.yaml"),
          trials: Optional[int] = typer.Option(None, "--trials", min=1, help="samples of the space"),
          max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", min=1, help="trials at once"),
          time_budget: Optional[float] = typer.Option(None, "--time-budget", help="seconds for the whole sweep"),
          address: Optional[str] = typer.Option(None, help="Ray cluster address (default: an embedded cluster)"),
          resume: bool = typer.Option(False, "--resume", help="continue an interrupted sweep in --out"),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="show the trials' output too")) -> None:
    """Sweep a recipe's fields on Ray Tune (ASHA early stopping); every trial is a full run."""
    from shardtune.recipe import apply_overrides, load_raw, validate_recipe
    from shardtune.sweepspace import load_space

    raw = apply_overrides(load_raw(recipe), overrides or [])
    base = validate_recipe(raw, where=str(recipe))
    chosen = load_space(space, grid or [], trials=trials, max_concurrent=max_concurrent, time_budget_s=time_budget)
    from shardtune import sweep as sweeping

    result = sweeping.sweep(raw, base, chosen, out_dir, where=str(recipe), address=address, resume=resume,
                            verbose=verbose, say=_say)
    sweeping.write_outputs(result, base.output.dir)
    out.print(sweeping.table(result))
    sweeping.check_reported(result)
    if result.best is None:
        raise RunError(f"no trial finished with a {result.metric}; see {result.out / sweeping.RESULTS}")
    _say(f"best: {result.best.name} ({result.metric} {result.best.metric:.4f}); its recipe is "
         f"{result.out / sweeping.BEST}, the table {result.out / sweeping.RESULTS}, the plot "
         f"{result.out / sweeping.PLOT}")


SET_HELP = ("KEY=VALUE: any recipe field for a zero-shot recipe; data.* only for a finished run (e.g. "
            "data.columns.text=review for a file whose columns are named differently)")
RunOrRecipeArg = typer.Argument(..., help="a finished run's output directory, or (zero-shot) a "
                                           "prompt_classification recipe")


@app.command("eval")
@_command
def evaluate(run_dir: Path = RunOrRecipeArg,
             data: Optional[Path] = typer.Option(None, help="file in the same format and columns as the training "
                                                           "data; default: the run's (or recipe's) validation split"),
             format: Optional[str] = typer.Option(None, help="override the data format (jsonl, json, csv, tsv, textdir)"),
             overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
             batch_size: int = typer.Option(32, min=1)) -> None:
    """Score a trained run, or a prompt recipe zero-shot, on a file; print the metrics as JSON."""
    _quiet_libraries()
    from shardtune import scoring

    loaded, rows, examples, outputs = scoring.infer(run_dir, data, format, batch_size, with_targets=True,
                                                    overrides=overrides or [], say=_say)
    metrics = loaded.task.metrics(outputs, examples)
    print(json.dumps({"data": str(data or "validation split"), "examples": len(examples), **metrics,
                      **_absent_labels(loaded, examples)}, indent=2))


def _absent_labels(loaded, examples) -> dict:
    """Labels the run knows that the scored rows never carry: macro-F1 leaves them out."""
    from shardtune.tasks import Can, kind_of

    if not kind_of(loaded.recipe).can(Can.CLASS_LABELS):
        return {}
    present = {e.target for e in examples}
    absent = [label for i, label in enumerate(loaded.task.labels) if i not in present]
    return {"labels_absent_from_data": absent} if absent else {}


@app.command()
@_command
def predict(run_dir: Path = RunOrRecipeArg,
            data: Path = typer.Option(..., help="file of inputs in the run's data format (labels optional)"),
            out_file: Path = typer.Option(..., "--out", help="where to write one JSON prediction per line"),
            format: Optional[str] = typer.Option(None, help="override the data format"),
            overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
            batch_size: int = typer.Option(32, min=1)) -> None:
    """Write one prediction per input row as JSON lines."""
    _quiet_libraries()
    from shardtune import scoring

    if scoring.generates(run_dir):  # language models: predict means generate
        loaded, rows = scoring.load_rows(run_dir, data, format, overrides=overrides or [], say=_say)
        records = loaded.task.generate(loaded.model, loaded.tokenizer, rows, batch_size=batch_size)
    else:
        loaded, rows, examples, outputs = scoring.infer(run_dir, data, format, batch_size, with_targets=False,
                                                        overrides=overrides or [], say=_say)
        records = loaded.task.predictions(outputs, examples, rows)
    # Write to a temporary name first: an interrupted predict leaves no truncated file.
    partial = out_file.with_name(out_file.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    partial.replace(out_file)
    err.print(f"wrote {len(records)} predictions to {out_file}", markup=False)


@app.command()
@_command
def generate(run_dir: Path = typer.Argument(..., help="a finished causal-LM run's output directory"),
             prompt: Optional[list[str]] = typer.Option(
                 None, help="a prompt, where predict reads it from a file: the instruction, or its input when the "
                            "recipe sets task.instruction; a user message for chat (repeat for several)"),
             max_new_tokens: Optional[int] = typer.Option(None, min=1, help="default: the recipe's task.max_new_tokens")) -> None:
    """Generate responses from a tuned causal LM (for files of prompts use predict)."""
    _quiet_libraries()
    if not prompt:
        raise RunError("give at least one --prompt")
    from shardtune.tasks import Can

    _needs(run_dir, Can.GENERATE, "generate")  # before the model loads: a wrong run is refused at once
    from shardtune.inference import load_run

    loaded = load_run(run_dir)
    rows = [loaded.task.prompt_row(p, f"--prompt {i + 1}") for i, p in enumerate(prompt)]
    records = loaded.task.generate(loaded.model, loaded.tokenizer, rows, max_new_tokens=max_new_tokens)
    for record in records:
        print(json.dumps({"prompt": record["prompt"], "response": record["prediction"]}))


@app.command()
@_command
def merge(run_dir: Path = typer.Argument(..., help="a finished run's output directory"),
          out_dir: Path = typer.Option(..., "--out", help="new folder for the merged model")) -> None:
    """Merge the run's adapter into the full-precision base and write a standalone model."""
    _quiet_libraries()
    from shardtune.export import merge_run

    written = merge_run(run_dir, out_dir)
    err.print(f"wrote the merged model to {written} (load it with from_pretrained; pass a "
              "BitsAndBytesConfig to quantise it again)", markup=False)


@app.command()
@_command
def chat(run_dir: Path = typer.Argument(..., help="a finished causal-LM run's output directory"),
         max_new_tokens: Optional[int] = typer.Option(None, min=1, help="default: the recipe's task.max_new_tokens")) -> None:
    """Talk to a tuned causal LM: one message per line, with the chat template when the run
    used one (the conversation so far goes with each message); an empty line or Ctrl-D ends."""
    _quiet_libraries()
    from shardtune.tasks import Can

    _needs(run_dir, Can.CHAT, "chat")
    from shardtune.inference import load_run

    loaded = load_run(run_dir)
    conversation: list[dict] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            err.print("[bold]you>[/] ", end="")
        line = sys.stdin.readline()
        if not line or not line.strip():
            return
        answer, conversation = loaded.task.reply(loaded.model, loaded.tokenizer, conversation, line.strip(),
                                                 max_new_tokens=max_new_tokens)
        print(answer if not interactive else f"model> {answer}", flush=True)


@app.command()
@_command
def report(run_dir: Path = typer.Argument(..., help="a finished run's output directory"),
           data: Optional[Path] = typer.Option(None, help="score this file for the tables (default: the run's own "
                                                          "validation split)"),
           format: Optional[str] = typer.Option(None, help="override the data format"),
           plots_only: bool = typer.Option(False, "--plots-only", help="only what the run's files hold (plots, "
                                                                        "metrics, recipe): load no model"),
           samples: int = typer.Option(8, min=1, help="rows generated for the report of a task that generates"),
           batch_size: int = typer.Option(32, min=1)) -> None:
    """Write RUN_DIR/report/index.html: plots of loss, learning rate, validation metrics,
    throughput and memory; the hardware and time; the recipe; and the task's tables
    (per-class scores, confusion matrix, per-entity F1, EM/F1, sample generations)."""
    _quiet_libraries()
    from shardtune import rundir, scoring
    from shardtune.runreport import write_report

    if not (run_dir / rundir.METRICS).is_file() or not rundir.is_run(run_dir):
        raise RunError(f"'{run_dir}' is not a finished shardtune run ({rundir.METRICS} is missing); give the "
                       "output.dir of a run that completed")
    tables = None
    if not plots_only:
        _say("scoring the run's validation split for the tables (--plots-only skips it)" if data is None
             else f"scoring {data} for the tables")
        tables = scoring.report_tables(run_dir, data, format, batch_size, samples, say=_say)
    path = write_report(run_dir, tables, scored_on=None if data is None else str(data))
    _say(f"wrote {path}")


recipes_app = typer.Typer(help="The shipped recipes: list them, copy one to edit.", invoke_without_command=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
@_command
def recipes_list(ctx: typer.Context) -> None:
    """List the shipped recipes, a line each (task, model, adapter, data)."""
    if ctx.invoked_subcommand is not None:
        return
    from shardtune.catalogue import entries

    table = Table(box=None, pad_edge=False)
    for column in ("recipe", "task", "model", "adapter", "data", "about"):
        table.add_column(column, no_wrap=True, overflow="ellipsis", max_width=None if column == "recipe" else 34)
    for e in entries():
        table.add_row(*(escape(v) for v in (e.name, e.task, e.model, e.adapter, e.data, e.about)))
    out.print(table)
    _say("copy one to edit: shardtune recipes cp NAME my.yaml; run it: shardtune run my.yaml")


@recipes_app.command("cp")
@_command
def recipes_cp(name: str = typer.Argument(..., help="a recipe's name, as `shardtune recipes` lists it"),
               destination: Path = typer.Argument(..., help="a new .yaml file, or a folder to copy it into")) -> None:
    """Copy a shipped recipe to edit (never overwrites)."""
    from shardtune.catalogue import copy

    target = copy(name, destination)
    _say(f"wrote {target}; relative paths in it are read from the directory you run shardtune in")


AddressOpt = typer.Option(..., "--address", envvar="RAY_JOBS_ADDRESS",
                          help="the cluster's Ray Jobs API, e.g. http://head:8265 (or an SSH tunnel's local end)")


@app.command()
@_command
def submit(recipe: Path = RecipeArg, overrides: Optional[list[str]] = OverridesArg, address: str = AddressOpt,
           follow: bool = typer.Option(False, "--follow", help="stream the logs; exit with the job's status"),
           include: Optional[list[Path]] = typer.Option(None, "--include", help="a folder outside the recipe's folder "
                                                        "and the current directory whose files may be uploaded"),
           dry_run: bool = typer.Option(False, "--dry-run", help="list what would be uploaded; submit nothing")) -> None:
    """Submit a recipe to a Ray cluster as a job (packs the recipe and its local files)."""
    from shardtune import jobs

    job_id = jobs.submit(recipe, overrides or [], address, includes=include or [], dry_run=dry_run,
                         announce=lambda text: err.print(text, markup=False, highlight=False))
    if job_id is None:
        return
    print(job_id, flush=True)
    if follow:
        final = jobs.follow(address, job_id)
        err.print(f"job {job_id}: {final}", markup=False)
        raise typer.Exit(0 if final == "SUCCEEDED" else 1)


@app.command()
@_command
def slurm(recipe: Path = RecipeArg, overrides: Optional[list[str]] = OverridesArg,
          out_file: Optional[Path] = typer.Option(None, "--out", help="write the script here (default: stdout)"),
          do_submit: bool = typer.Option(False, "--submit", help="sbatch it and print the job id")) -> None:
    """Render an sbatch script for the recipe (from its slurm: section); --submit submits it."""
    import tempfile

    from shardtune import slurm as slurm_script
    from shardtune.recipe import load_recipe

    resolved = load_recipe(recipe, overrides or [])
    text = slurm_script.render(resolved, str(recipe), overrides or [])
    if out_file is None and not do_submit:
        print(text, end="")
        return
    target = out_file or Path(tempfile.mkdtemp(prefix="shardtune-slurm-")) / f"{recipe.stem}.sbatch"
    target.write_text(text)
    if do_submit:
        print(slurm_script.submit(target))
    else:
        err.print(f"wrote {target}", markup=False)


jobs_app = typer.Typer(help="shardtune's jobs on a Ray cluster: list, status, logs, stop.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("list")
@_command
def jobs_list(address: str = AddressOpt) -> None:
    """The shardtune jobs on the cluster, oldest first."""
    from shardtune import jobs

    rows = jobs.listing(address)
    table = Table("job id", "status", "recipe", "output")
    for row in rows:
        table.add_row(*(escape(str(row[k])) for k in ("id", "status", "recipe", "output_dir")))
    out.print(table)


@jobs_app.command("status")
@_command
def jobs_status(job_id: str, address: str = AddressOpt) -> None:
    """Print a job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    from shardtune import jobs

    print(jobs.status(address, job_id))


@jobs_app.command("logs")
@_command
def jobs_logs(job_id: str, address: str = AddressOpt,
              follow: bool = typer.Option(False, "--follow", help="stream until the job ends")) -> None:
    """Print a job's logs."""
    from shardtune import jobs

    if follow:
        jobs.follow(address, job_id)
    else:
        print(jobs.logs(address, job_id), end="")


@jobs_app.command("stop")
@_command
def jobs_stop(job_id: str, address: str = AddressOpt) -> None:
    """Stop a job. Ray sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (set on the
    cluster); given the time, the run checkpoints at its next step and can be resumed."""
    from shardtune import jobs

    stopped = jobs.stop(address, job_id)
    err.print(f"job {job_id}: {'stop requested' if stopped else 'already finished'}", markup=False)


# ---------------------------------------------------------------------------- helpers
def _needs(run_dir: Path, capability, command: str) -> None:
    """Refuse a run whose task cannot do what the command asks, from its recipe.yaml alone."""
    from shardtune.scoring import recorded_kind_can, recorded_task_type
    from shardtune.tasks import task_kinds

    task_type = recorded_task_type(run_dir) if run_dir.is_dir() else None
    if task_type is None:
        raise RunError(f"'{run_dir}' is not a finished shardtune run: recipe.yaml is missing (give the output.dir "
                       "of a run that completed)")
    if not recorded_kind_can(run_dir, capability):
        able = " or ".join(kind.type for kind in task_kinds() if kind.can(capability))
        raise RunError(f"'{run_dir}' is a {task_type} run; {command} needs a {able} run")


def _print_summary(result) -> None:
    import json as _json

    metrics = _json.loads((result.output_dir / "metrics.json").read_text())
    before, final, summary = metrics["before"], metrics["final"], metrics["summary"]
    table = Table(title="shardtune run", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key, value in final.items():
        if key in ("epoch", "step"):
            continue
        was = before.get(key) if before else None
        name = key.replace("_", " ") if key == "train_loss" else f"validation {key}"
        table.add_row(name, "" if was is None else f"{was:.4f}", f"{value:.4f}")
    out.print(table)
    trainable, total = summary["trainable_parameters"], summary["total_parameters"]
    out.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    out.print(f"steps: {summary['steps']} on {summary['workers']} workers; "
              f"time: {summary['wall_seconds']:.0f}s (first step after {summary['time_to_first_step_s']:.0f}s, "
              f"{summary['steady_step_s']}s/step)")
    out.print(f"outputs: {result.output_dir}  (adapter/, tokenizer/, metrics.json, logs/)", markup=False)
    framework = result.output_dir / "logs" / "framework.log"
    if framework.is_file():
        out.print(f"framework output (Ray, DeepSpeed, transformers): {framework}  (--verbose shows it)", markup=False)
    from shardtune.runreport import index_of

    report = index_of(result.output_dir)
    if report.is_file():
        out.print(f"report: {report.as_uri()}  (`shardtune report {result.output_dir}` adds the per-task tables)",
                  markup=False)


if __name__ == "__main__":
    app()
