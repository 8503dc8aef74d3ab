"""The loop's reports to its launcher: typed, carried in the metrics dict Ray reports under
one reserved key, and read back as the same report; nothing decides by metric names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from shardtune.reports import KIND_KEY, Kind, Report

SRC = Path(__file__).resolve().parents[2] / "src" / "shardtune"


@pytest.mark.parametrize("report", [
    Report.evaluation({"loss": 0.5, "accuracy": 0.8, "epoch": 1.0, "step": 10}),
    Report.stopped({"loss": 0.5}, step=25, total_steps=60),
    Report.stopped({}, step=3, total_steps=60),  # stopped before any evaluation
    Report.final({"loss": 0.4}, {"steps": 60, "workers": 2}),
], ids=lambda r: r.kind.value)
def test_a_report_survives_the_trip_through_the_metrics_dict(report):
    carried = report.to_metrics()
    assert carried[KIND_KEY] == report.kind.value and Report.from_metrics(carried) == report


def test_what_each_kind_carries():
    stopped = Report.stopped({"loss": 0.5}, step=25, total_steps=60)
    assert stopped.kind is Kind.STOPPED and stopped.metrics == {"loss": 0.5, "step": 25, "total_steps": 60}
    final = Report.final({"loss": 0.4}, {"steps": 60})
    assert final.kind is Kind.FINAL and final.metrics == {"loss": 0.4, "steps": 60}


@pytest.mark.parametrize("metrics", [None, {}, {"loss": 1.0, "final": True}])
def test_metrics_without_a_report_read_as_none(metrics):
    assert Report.from_metrics(metrics) is None  # e.g. a worker that died before reporting


def test_no_module_decides_by_the_old_metric_keys():
    found = []
    for file in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in ("final", "stopped")):
                found.append(f"{file.relative_to(SRC)}:{node.lineno}")
    assert found == [], f"ask reports.Report.from_metrics(...).kind instead: {found}"
