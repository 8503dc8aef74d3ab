"""User-facing errors: each one says what is wrong and what to change.

The CLI prints these without a traceback and exits non-zero; anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class ShardtuneError(Exception):
    """An error the user can fix. `problems` holds one line per problem."""

    exit_code = 2

    def __init__(self, problems: str | list[str], *, where: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.where = where
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.where}: " if self.where else ""
        if len(self.problems) == 1:
            return head + self.problems[0]
        lines = [f"{head}{len(self.problems)} problems:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class RecipeError(ShardtuneError):
    """The recipe (file or overrides) is invalid."""


class DataError(ShardtuneError):
    """A data file is missing, malformed or does not fit the task."""


class RunError(ShardtuneError):
    """A run could not start or finish (output directory, cluster, workers)."""

    exit_code = 1


class RunStopped(RunError):
    """The run was asked to stop (SIGTERM, Slurm's time-limit warning) and saved a checkpoint."""

    exit_code = 3
