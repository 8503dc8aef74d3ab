"""The driver's console during a run: shardtune's own lines, a progress bar, and nothing else.

Ray forwards every worker's and actor's output to the driver (log_to_driver), where its
dispatcher prints it with `(RayTrainWorker pid=...)` prefixes and colour codes: transformers'
load reports, FutureWarnings, Ray Train's own messages and TrainingReport dicts, about four
lines of framework output for each of shardtune's. While a run trains, `run_console`
replaces Ray's printer on that dispatcher: every line goes to the run's
logs/framework.log (uncoloured, with its process), and only shardtune's lines (the
workers' RunLog, marked "[shardtune HH:MM:SS]") reach the console. On a terminal the
step lines drive a rich progress bar (step, loss, lr, tokens/s, ETA); otherwise each is
printed as it comes, one per `train.log_every_steps`. `--verbose` leaves Ray's printer as
it is. The hook is Ray's `global_worker_stdstream_dispatcher` (ray._private.ray_logging),
the one place Ray hands forwarded output to a handler.
"""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

FRAMEWORK_LOG = "framework.log"  # in the run's logs/
PREFIX = "[shardtune "
RAY_PRINTER = "ray_print_logs"  # the name Ray registers its printer under
STEP = re.compile(r"epoch (?P<epoch>[\d.]+)/(?P<epochs>\d+) step (?P<step>\d+)/(?P<total>\d+) loss (?P<loss>\S+) "
                  r"lr (?P<lr>\S+) .*?~(?P<rate>[\d,]+) tok/s")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class RunView:
    """Where the forwarded lines go: all of them to the file, shardtune's to the console."""

    def __init__(self, log_path: Path, console: Console, show: bool = True):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(log_path, "a", buffering=1, errors="replace")
        self.path, self.console, self.lines, self.shows = log_path, console, 0, show
        self.lock = threading.Lock()
        self.progress: Progress | None = None
        self.task = None

    def handle(self, data: dict) -> None:
        """Ray's dispatcher calls this (on its log thread) with a batch of one process's lines."""
        who = data.get("actor_name") or data.get("task_name") or "ray"
        with self.lock:
            for line in data.get("lines", []):
                plain = ANSI.sub("", line)
                self.file.write(f"({who} pid={data.get('pid')}, {data.get('ip')}) {plain}\n")
                self.lines += 1
                if self.shows and PREFIX in plain:
                    self.show(plain[plain.index(PREFIX):])

    def show(self, line: str) -> None:
        step = STEP.search(line)
        if step is None or not self.console.is_terminal:
            self._print(line)
            return
        if self.progress is None:
            self.progress = Progress(TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
                                     TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                     console=self.console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task("train", total=int(step["total"]), status="")
        self.progress.update(self.task, completed=int(step["step"]), total=int(step["total"]),
                             status=f"epoch {step['epoch']}/{step['epochs']} loss {step['loss']} lr {step['lr']} "
                                    f"{step['rate']} tok/s")

    def _print(self, line: str) -> None:
        printer = self.progress.console if self.progress is not None else self.console
        printer.print(line, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        with self.lock:
            if self.progress is not None:
                self.progress.stop()
            self.file.close()


@contextmanager
def run_console(log_path: Path, *, verbose: bool, console: Console | None = None, show: bool = True):
    """While the block runs, forwarded output goes through a RunView (unless verbose);
    `show=False` files shardtune's lines too (a sweep, whose trials' lines would interleave)."""
    if verbose:
        yield None
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    view = RunView(log_path, console or Console(soft_wrap=True), show)
    with dispatcher._lock:
        saved = [pair for pair in dispatcher.handlers if pair[0] == RAY_PRINTER]
    dispatcher.remove_handler(RAY_PRINTER)
    dispatcher.add_handler("shardtune_console", view.handle)
    try:
        yield view
    finally:
        dispatcher.remove_handler("shardtune_console")
        for name, handler in saved:
            dispatcher.add_handler(name, handler)
        view.close()
