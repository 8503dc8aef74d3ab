"""A finished run's report: `RUN/report/index.html` with PNG plots beside it.

Plots (matplotlib, headless Agg): training loss and learning rate per logged step with the
epochs' mean loss and the validation loss; every validation metric per evaluation;
tokens/s per logged step and each worker's peak memory. Then the final metrics, the
hardware and time, the task's tables (`report_tables`: per-class scores and a confusion
matrix, per-entity F1, EM/F1 by question kind, sample generations) when the caller scored
a split, and the recipe. Everything comes from the run's own files (metrics.json,
recipe.yaml); nothing here loads a model. The page is static: no scripts, no network.
"""

from __future__ import annotations

import html
import json
import shutil
import time
from pathlib import Path

from shardtune import rundir

REPORT_DIR = rundir.REPORT
INDEX = "index.html"


def index_of(run_dir: Path) -> Path:
    return Path(run_dir) / REPORT_DIR / INDEX


def write_report(run_dir: Path, tables: list | None = None, scored_on: str | None = None,
                 published: Path | None = None) -> Path:
    """Write (or replace) the run's report; returns the index.html path. `tables`: the task's
    ReportTables for `scored_on` (a file; None: the validation split), None when nothing was
    scored. `published`: the run's final folder, when run_dir is still its staging folder."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / rundir.METRICS).read_text())
    recipe_text = (run_dir / rundir.RECIPE).read_text()
    staging = run_dir / f".{REPORT_DIR}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    images = _plots(metrics, staging)
    (staging / INDEX).write_text(_page(published or run_dir, metrics, recipe_text, images, tables, scored_on))
    final = run_dir / REPORT_DIR
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final / INDEX


def write_at_finish(run_dir: Path, published: Path | None = None) -> None:
    """The report every finished run gets (plots, figures, recipe; no tables: no model is
    loaded). A view of the run, so a failure here warns and never fails the run."""
    import sys

    try:
        write_report(run_dir, published=published)
    except Exception as exc:  # noqa: BLE001
        print(f"warning: could not write the run's report ({type(exc).__name__}: {exc}); "
              f"`shardtune report {published or run_dir}` tries again", file=sys.stderr)


# ------------------------------------------------------------------------------ plots
def _plots(metrics: dict, folder: Path) -> list[tuple[str, str]]:
    """(file name, caption) of each plot written."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster's login node
    import matplotlib.pyplot as plt

    steps, history = metrics.get("steps") or [], metrics.get("history") or []
    written = []

    def save(fig, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        written.append((name, caption))

    fig, (loss_ax, lr_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    if steps:
        loss_ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="training loss (logged step)")
        lr_ax.plot([s["step"] for s in steps], [s["lr"] for s in steps], color="tab:orange")
    epochs = [h for h in history if "train_loss" in h]
    if epochs:
        loss_ax.plot([h["step"] for h in epochs], [h["train_loss"] for h in epochs], "o", label="training loss (epoch mean)")
    evaluated = [h for h in history if "loss" in h]
    if evaluated:
        loss_ax.plot([h["step"] for h in evaluated], [h["loss"] for h in evaluated], "s--", label="validation loss")
    loss_ax.set(title="loss", xlabel="optimizer step")
    loss_ax.legend(fontsize="small")
    lr_ax.set(title="learning rate", xlabel="optimizer step")
    save(fig, "loss.png", "Training and validation loss, and the learning-rate schedule")

    names = [k for k in (history[-1] if history else {}) if k not in ("epoch", "step", "loss", "train_loss")
             and all(isinstance(h.get(k), (int, float)) for h in history)]
    if names:
        cols = min(3, len(names))
        rows = -(-len(names) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(11, 3.2 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            ax.plot([h["step"] for h in history], [h[name] for h in history], "o-")
            ax.set(title=f"validation {name}", xlabel="optimizer step")
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        save(fig, "validation.png", "Validation metrics at every evaluation")

    summary = metrics.get("summary") or {}
    fig, (rate_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    if steps:
        rate_ax.plot([s["step"] for s in steps], [s.get("tokens_per_s", 0) for s in steps], color="tab:green")
    rate_ax.set(title="tokens/s (all workers)", xlabel="optimizer step")
    training = summary.get("peak_memory_mb_per_worker") or []
    loading = summary.get("load_peak_memory_mb_per_worker") or []
    ranks = range(len(training))
    memory_ax.bar([r - 0.2 for r in ranks], training, width=0.4, label="training peak")
    if len(loading) == len(training):
        memory_ax.bar([r + 0.2 for r in ranks], loading, width=0.4, label="loading peak")
    memory_ax.set(title="peak memory per worker (MB)", xlabel="worker rank", xticks=list(ranks))
    memory_ax.legend(fontsize="small")
    save(fig, "throughput.png", "Throughput and each worker's peak memory")
    return written


# ------------------------------------------------------------------------------- page
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ccc; padding: 3px 9px; }
th { background: #f0f0f0; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.meta { color: #555; } .note { color: #555; font-size: 0.9em; } img { max-width: 100%; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _page(run_dir: Path, metrics: dict, recipe_text: str, images, tables, scored_on) -> str:
    import yaml

    recipe = yaml.safe_load(recipe_text) or {}
    summary, final, before = metrics.get("summary") or {}, metrics["final"], metrics.get("before")
    model, task, adapter = recipe.get("model", {}), recipe.get("task", {}), recipe.get("adapter", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>shardtune report: {_e(run_dir.name)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>shardtune run: {_e(run_dir.name)}</h1>",
             f"<p class='meta'>{_e(task.get('type', '?'))} · {_e(model.get('path', '?'))} · adapter "
             f"{_e(adapter.get('method', '?'))} · report written {_e(time.strftime('%Y-%m-%d %H:%M'))}</p>",
             "<h2>Final metrics</h2>", _metrics_table(final, before)]
    parts.append("<h2>Plots</h2>")
    parts += [f"<figure><img src='{_e(name)}' alt='{_e(caption)}'><figcaption class='note'>{_e(caption)}"
              "</figcaption></figure>" for name, caption in images]
    parts.append("<h2>Hardware and time</h2>" + _table(["", ""], _hardware(recipe, summary)))
    if tables is None:
        parts.append("<h2>Per-task tables</h2><p class='note'>Not scored: run <code>shardtune report "
                     f"{_e(str(run_dir))}</code> to score the validation split and add them.</p>")
    else:
        parts.append(f"<h2>Per-task tables</h2><p class='note'>scored on {_e(scored_on or 'the validation split')}</p>")
        for table in tables:
            parts.append(f"<h3>{_e(table.title)}</h3>" + _table(table.columns, table.rows)
                         + (f"<p class='note'>{_e(table.note)}</p>" if table.note else ""))
        if not tables:
            parts.append("<p class='note'>this task has no tables for this split (no labels in it)</p>")
    parts.append(f"<h2>Recipe</h2><pre>{_e(recipe_text)}</pre></body></html>")
    return "\n".join(parts)


def _metrics_table(final: dict, before: dict | None) -> str:
    rows = [[k, "" if not before or k not in before else _number(before[k]), _number(v)]
            for k, v in final.items() if k not in ("epoch", "step")]
    return _table(["metric", "before training", "after"], rows)


def _hardware(recipe: dict, summary: dict) -> list[list]:
    cluster, sharding = recipe.get("cluster", {}), recipe.get("sharding", {})
    gpus = cluster.get("gpus_per_worker", 0)
    mfu = "n/a on this device" if summary.get("mfu") is None else f"{100 * summary['mfu']:.1f}%"
    rows = [["workers", f"{summary.get('workers', cluster.get('workers'))} on "
                        f"{'GPU' if gpus else 'CPU'}; nodes {sorted(set(summary.get('worker_nodes') or []))}"],
            ["sharding", f"ZeRO-{sharding.get('zero_stage')}, {sharding.get('precision')}"],
            ["parameters", f"{summary.get('trainable_parameters', 0):,} trainable of "
                           f"{summary.get('total_parameters', 0):,}"],
            ["steps", f"{summary.get('steps')} ({summary.get('epochs')} epochs), {summary.get('train_examples')} "
                      f"training / {summary.get('validation_examples')} validation examples"],
            ["time", f"{summary.get('wall_seconds', 0):.0f} s in all; first step after "
                     f"{summary.get('time_to_first_step_s', 0):.0f} s; {summary.get('steady_step_s')} s per step"],
            ["throughput", f"{summary.get('tokens_per_s', 0):,.0f} tokens/s "
                           f"({summary.get('supervised_tokens_per_s', 0):,.0f} supervised); MFU {mfu}"],
            ["peak memory (MB per worker)", f"training {summary.get('peak_memory_mb_per_worker')}, loading "
                                            f"{summary.get('load_peak_memory_mb_per_worker')}"]]
    return rows


def _table(columns: list[str], rows: list[list]) -> str:
    head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>" if any(columns) else ""
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _cell(value) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"<td class='n'>{_e(_number(value))}</td>"
    return f"<td>{_e(str(value))}</td>"


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _e(text: str) -> str:
    return html.escape(text, quote=True)
