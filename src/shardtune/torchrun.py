"""The worker loop without Ray, for debugging and GPU profiling:

    torchrun --nproc-per-node 2 -m shardtune.torchrun RECIPE [key=value ...]

Writes the same run directory as `shardtune run`; re-running resumes from OUTPUT/checkpoint.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

from shardtune import checkpoint, rundir
from shardtune.engine import train_worker
from shardtune.errors import RecipeError, RunError
from shardtune.reports import Kind, Report


class LocalReporter:
    """For torchrun: epoch checkpoints go to OUTPUT/checkpoint, the finished run to OUTPUT.

    Ranks share a file system here (one machine, or a shared output directory). A new
    checkpoint is written beside the old one and swapped in by renames, so a kill during
    a save leaves the previous checkpoint whole.
    """

    def __init__(self, output_dir: Path):
        import signal

        self.output_dir = output_dir
        self._signalled = False
        if threading.current_thread() is threading.main_thread():
            # torchrun forwards SIGTERM to its workers; Ctrl-C reaches every process of the group.
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._signalled = True

    def stop_requested(self) -> bool:
        return self._signalled or (self.output_dir / rundir.STOP_FILE).exists()

    def node(self) -> str:
        import socket

        return socket.gethostname()

    def device(self):
        return None  # torchrun: cuda:LOCAL_RANK (devices.worker_device)

    def report(self, report: Report, checkpoint_dir: str | None) -> None:
        if checkpoint_dir and report.kind is Kind.FINAL:
            shutil.copytree(checkpoint_dir, self.output_dir, dirs_exist_ok=True)
        elif checkpoint_dir:
            shutil.copytree(checkpoint_dir, self.output_dir / "checkpoint.next", dirs_exist_ok=True)
            dist.barrier()
            if dist.get_rank() == 0:
                current, old = self.output_dir / "checkpoint", self.output_dir / "checkpoint.old"
                shutil.rmtree(old, ignore_errors=True)
                if current.exists():
                    current.rename(old)
                (self.output_dir / "checkpoint.next").rename(current)
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def latest_checkpoint(self, scratch: Path) -> str | None:
        for name in ("checkpoint", "checkpoint.old"):  # .old: killed between the two renames
            if checkpoint.exists(self.output_dir / name):
                return str(self.output_dir / name)
        return None


def main(argv: list[str] | None = None) -> int:
    """torchrun --nproc-per-node N -m shardtune.torchrun RECIPE [key=value ...]

    The worker loop without Ray, for debugging and GPU profiling. Writes the same run
    directory as `shardtune run`; re-running resumes from OUTPUT/checkpoint.
    """
    from shardtune.recipe import load_recipe

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if argv else 2
    started = time.perf_counter()
    try:
        recipe = load_recipe(argv[0], argv[1:])
        output = Path(recipe.output.dir)
        if output.exists() and any(output.iterdir()) and not rundir.is_run(output):
            raise RunError(f"output directory '{output}' exists and is not a shardtune run (no {rundir.MARKER} "
                           "marker); choose a new output.dir")
    except (RecipeError, RunError) as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    code = run_in_group(recipe, started)
    dist.destroy_process_group()
    return code


def run_in_group(recipe, started: float | None = None) -> int:
    """One run in this torchrun group (started here on first use, kept for the next run):
    0 when OUTPUT holds the finished run, 3 when it stopped with OUTPUT/checkpoint to resume.
    The test suite trains many recipes one after another in one group through this."""
    from shardtune.export import write_metrics

    started = time.perf_counter() if started is None else started
    output = Path(recipe.output.dir)
    output.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", 0)) == 0 and not rundir.is_run(output):
        rundir.mark(output)
    (output / rundir.STOP_FILE).unlink(missing_ok=True)  # a request from an earlier attempt is spent
    reporter = LocalReporter(output)
    train_worker(recipe.model_dump(mode="json"), reporter)
    finished = (output / rundir.HISTORY).exists()
    dist.barrier()  # every rank has looked before rank 0 turns history.json into metrics.json
    if not finished:  # stopped: the checkpoint is in OUTPUT/checkpoint
        if dist.get_rank() == 0:
            print(f"stopped; run the same command again to resume from {output / 'checkpoint'}", file=sys.stderr)
        return 3
    if dist.get_rank() == 0:
        (output / rundir.RECIPE).write_text(recipe.to_yaml())
        write_metrics(output, recipe, time.perf_counter() - started)
        from shardtune.runreport import write_at_finish

        write_at_finish(output)
        if not recipe.output.keep_checkpoints:
            shutil.rmtree(output / "checkpoint", ignore_errors=True)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
