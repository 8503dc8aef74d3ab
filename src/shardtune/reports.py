"""What the training loop tells whatever launched it, as typed messages.

Ray's `ray.train.report` (and the torchrun reporter) carry one dict of metrics per report,
so a report's kind travels in it under one reserved key, written and read only here: the
loop reports `Report.stopped(...)`, the launcher asks `report.kind`, and neither decides
anything by looking for metric names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

KIND_KEY = "shardtune_report"  # reserved: no task reports a metric of this name


class Kind(str, Enum):
    EVALUATION = "evaluation"  # a validation pass (with a checkpoint to keep at an epoch's end)
    STOPPED = "stopped"  # stopped on request: the checkpoint is the one to resume from
    FINAL = "final"  # training is done: the checkpoint holds the run's files


@dataclass(frozen=True)
class Report:
    kind: Kind
    metrics: dict = field(default_factory=dict)  # the last validation's metrics, plus the kind's own fields

    @classmethod
    def evaluation(cls, metrics: dict) -> Report:
        return cls(Kind.EVALUATION, metrics)

    @classmethod
    def stopped(cls, last_metrics: dict, step: int, total_steps: int) -> Report:
        # The last evaluation's metrics travel too: a checkpoint kept by keep_best_by is ranked by them.
        return cls(Kind.STOPPED, {**last_metrics, "step": step, "total_steps": total_steps})

    @classmethod
    def final(cls, last_metrics: dict, summary: dict) -> Report:
        return cls(Kind.FINAL, {**last_metrics, **summary})

    def to_metrics(self) -> dict:
        """The dict ray.train.report carries."""
        return {**self.metrics, KIND_KEY: self.kind.value}

    @classmethod
    def from_metrics(cls, metrics: dict | None) -> Report | None:
        """A report read back on the launcher's side (None: nothing was reported)."""
        if not metrics or KIND_KEY not in metrics:
            return None
        return cls(Kind(metrics[KIND_KEY]), {k: v for k, v in metrics.items() if k != KIND_KEY})
