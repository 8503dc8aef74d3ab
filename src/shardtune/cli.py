"""The `shardtune` command: validate, plan, run, eval, predict, generate, merge, submit, jobs, slurm."""

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

from shardtune.errors import RunError, ShardtuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distributed, parameter-efficient fine-tuning from one YAML recipe.")
out = Console()
err = Console(stderr=True, soft_wrap=True)  # no wrapping: messages carry paths users grep for

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
def validate(recipe: Path = RecipeArg, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Check a recipe without starting anything; print it as resolved."""
    from shardtune.recipe import load_recipe

    resolved = load_recipe(recipe, overrides or [])
    from shardtune.tasks import Can, task_kind

    if task_kind(resolved.task.type).can(Can.CHECK_TOKENIZER):  # e.g. label words: they need the tokenizer
        from shardtune.backbone import load_tokenizer
        from shardtune.tasks import get_task

        get_task(resolved).check(load_tokenizer(resolved))
    sys.stdout.write(resolved.to_yaml())
    err.print(f"[green]ok:[/] {escape(str(recipe))} is valid")


@app.command()
@_command
def run(recipe: Path = RecipeArg, overrides: Optional[list[str]] = OverridesArg,
        address: Optional[str] = typer.Option(None, help="Ray cluster address to attach to "
                                                         "(default: the recipe's, else an embedded cluster)"),
        resume: bool = typer.Option(False, "--resume", help="continue a run stopped by SIGTERM/SIGUSR1 "
                                                            "(Slurm's time limit) from its checkpoint; "
                                                            "starts afresh if there is none")) -> None:
    """Validate a recipe and train it on Ray + DeepSpeed."""
    from shardtune.recipe import load_recipe

    resolved = load_recipe(recipe, overrides or [])
    from shardtune.orchestrate import run as run_recipe

    result = run_recipe(resolved, address=address, resume=resume)
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
    loaded, rows, examples, outputs = _infer(run_dir, data, format, batch_size, with_targets=True,
                                             overrides=overrides or [])
    metrics = loaded.task.metrics(outputs, examples)
    print(json.dumps({"data": str(data or "validation split"), "examples": len(examples), **metrics}, indent=2))


@app.command()
@_command
def predict(run_dir: Path = RunOrRecipeArg,
            data: Path = typer.Option(..., help="file of inputs in the run's data format (labels optional)"),
            out_file: Path = typer.Option(..., "--out", help="where to write one JSON prediction per line"),
            format: Optional[str] = typer.Option(None, help="override the data format"),
            overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
            batch_size: int = typer.Option(32, min=1)) -> None:
    """Write one prediction per input row as JSON lines."""
    if _generates(run_dir):  # language models: predict means generate
        loaded, rows = _load_rows(run_dir, data, format, overrides=overrides or [])
        records = loaded.task.generate(loaded.model, loaded.tokenizer, rows, batch_size=batch_size)
    else:
        loaded, rows, examples, outputs = _infer(run_dir, data, format, batch_size, with_targets=False,
                                                 overrides=overrides or [])
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
    from shardtune.errors import RunError
    from shardtune.inference import load_run

    if not prompt:
        raise RunError("give at least one --prompt")
    loaded = load_run(run_dir)
    from shardtune.tasks import Can, kind_of, task_kinds

    if not kind_of(loaded.recipe).can(Can.GENERATE):
        able = " or ".join(kind.type for kind in task_kinds() if kind.can(Can.GENERATE))
        raise RunError(f"'{run_dir}' is a {loaded.recipe.task.type} run; generate needs a {able} run")
    rows = [loaded.task.prompt_row(p, f"--prompt {i + 1}") for i, p in enumerate(prompt)]
    records = loaded.task.generate(loaded.model, loaded.tokenizer, rows, max_new_tokens=max_new_tokens)
    for record in records:
        print(json.dumps({"prompt": record["prompt"], "response": record["prediction"]}))


@app.command()
@_command
def merge(run_dir: Path = typer.Argument(..., help="a finished run's output directory"),
          out_dir: Path = typer.Option(..., "--out", help="new folder for the merged model")) -> None:
    """Merge the run's adapter into the full-precision base and write a standalone model."""
    from shardtune.export import merge_run

    written = merge_run(run_dir, out_dir)
    err.print(f"wrote the merged model to {written} (load it with from_pretrained; pass a "
              "BitsAndBytesConfig to quantise it again)", markup=False)


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
def _generates(run_dir: Path) -> bool:
    from shardtune.recipe import load_raw

    recipe = run_dir if run_dir.is_file() else run_dir / "recipe.yaml"
    from shardtune.tasks import Can, task_kinds

    if not recipe.is_file():
        return False
    kinds = {kind.type: kind for kind in task_kinds()}
    kind = kinds.get((load_raw(recipe).get("task") or {}).get("type"))
    return kind is not None and kind.can(Can.GENERATE)


def _load(run_dir: Path, overrides: list[str]):
    """A finished run, or a prompt recipe's untrained model (zero-shot)."""
    from shardtune.errors import RecipeError
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


def _load_rows(run_dir: Path, data: Optional[Path], fmt: Optional[str], with_targets: bool = False,
               overrides: Optional[list[str]] = None):
    """The file's rows; with the run's `data.on_bad_row: skip`, the bad ones left out and counted.
    No file with a recipe: the recipe's validation split."""
    from shardtune.data import read_rows
    from shardtune.data.pipeline import drop_bad_rows
    from shardtune.errors import DataError

    if data is not None and not data.exists():
        raise DataError(f"data file '{data}' does not exist")
    loaded = _load(run_dir, overrides or [])
    if data is None:
        return loaded, _validation_rows(run_dir, loaded)
    source = loaded.recipe.data.train.model_copy(update={"path": str(data), "format": fmt})
    if fmt is None and source.resolved_format == "":
        source = source.model_copy(update={"format": loaded.recipe.data.train.resolved_format})
    if loaded.recipe.data.on_bad_row == "error":
        return loaded, read_rows(source, max_chars=loaded.recipe.data.max_chars)
    bad: list[str] = []
    rows = drop_bad_rows(read_rows(source, bad, loaded.recipe.data.max_chars), loaded.task, loaded.tokenizer, bad, str(data), with_targets)
    if bad:
        err.print(f"data.on_bad_row is skip: left out {len(bad)} bad rows of '{data}'; first: {bad[0]}", markup=False)
    return loaded, rows


def _validation_rows(run_dir: Path, loaded) -> list:
    """A recipe's validation split; for a finished run, its own, rebuilt from the recorded
    recipe and checked against the rows the run recorded (the data may have changed since)."""
    from shardtune.data.pipeline import load_data, rows_fingerprint
    from shardtune.errors import DataError

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


def _infer(run_dir: Path, data: Optional[Path], fmt: Optional[str], batch_size: int, *, with_targets: bool,
           overrides: Optional[list[str]] = None):
    import torch

    from shardtune.inference import forward_outputs

    loaded, rows = _load_rows(run_dir, data, fmt, with_targets, overrides)
    examples = loaded.task.encode(rows, loaded.tokenizer, with_targets=with_targets)
    outputs = forward_outputs(loaded.model, loaded.task, loaded.tokenizer, examples, batch_size,
                              torch.device("cpu"))
    return loaded, rows, examples, outputs


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


if __name__ == "__main__":
    app()
