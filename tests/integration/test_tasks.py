"""Every task trains end to end with 2 workers under ZeRO-0 and ZeRO-3, and its run is
scored by `shardtune eval` and `shardtune predict` on a fresh file. The runs share one
torchrun group (tests/batch_runs.py); the Ray path is tested in test_training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batch_runs import train_in_one_group
from helpers import make_tiny_recipe
from shardtune.cli import app
from tiny_models import similarity_rows, squad_file, tagged_rows, text2text_rows, write_jsonl

pytestmark = pytest.mark.integration
cli = CliRunner()

# name, task section, data writer (path, n, seed) -> path, data options, metric, higher is better
TASKS = [
    ("regression", {"type": "sequence_regression"},
     lambda p, n, s: write_jsonl(p / "d.jsonl", similarity_rows(n, s)),
     {"columns": {"text": "text", "text_b": "text_b", "label": "label"}}, "pearson", True),
    ("tagging", {"type": "token_classification"},
     lambda p, n, s: write_jsonl(p / "d.jsonl", tagged_rows(n, s)), {}, "entity_f1", True),
    ("qa", {"type": "question_answering", "doc_stride": 8},
     lambda p, n, s: squad_file(p / "d.json", n, s), {"max_length": 48}, "f1", True),
    # The encoder-decoder family, on a tiny T5: generation at evaluation, scored as text.
    ("seq2seq", {"type": "seq2seq", "max_new_tokens": 4},
     lambda p, n, s: write_jsonl(p / "d.jsonl", text2text_rows(n, s)), {}, "exact_match", True),
]


STAGES = [0, 3]


@pytest.fixture(scope="module")
def task_runs(tiny_bert, tiny_t5, sentiment_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    recipes = {}
    for name, task, write, data, _, _ in TASKS:
        (root / name).mkdir()
        for stage in STAGES:
            raw = make_tiny_recipe(tiny_bert, sentiment_data, root / f"{name}-zero{stage}")
            raw["task"] = task
            raw["data"] = {**raw["data"], **data, "train": str(write(root / name, 400, 1))}
            if name == "qa":
                raw["data"]["train"] = {"path": raw["data"]["train"], "format": "squad"}
            if name == "seq2seq":  # T5 names its projections q, k, v, o, wi, wo
                raw["model"] = {"path": str(tiny_t5)}
                raw["adapter"] = {"method": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}
            raw["sharding"] = {"zero_stage": stage}
            recipes[f"{name}-zero{stage}"] = raw
    return train_in_one_group(recipes, root)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name,task,write,data,metric,higher", TASKS, ids=[t[0] for t in TASKS])
def test_task_trains_evaluates_and_predicts(task_runs, tmp_path, stage, name, task, write, data, metric, higher):
    result = task_runs[f"{name}-zero{stage}"]
    assert "error" not in result and result["code"] == 0, result
    run_dir = Path(result["dir"])
    (tmp_path / "fresh").mkdir()

    metrics = json.loads((run_dir / "metrics.json").read_text())
    before, after = metrics["before"][metric], metrics["final"][metric]
    assert after > before + 0.2 * (100 if name == "qa" else 1), (before, after)
    assert metrics["final"]["loss"] < metrics["before"]["loss"]
    summary = metrics["summary"]
    trainable, total = summary["trainable_parameters"], summary["total_parameters"]
    for held in summary["parameters_held_per_worker"]:
        if stage == 3:  # partitioned while loading: each rank holds its half of the frozen weights
            assert held < trainable + 0.6 * (total - trainable), (held, trainable, total)
        else:
            assert held == total, (held, total)
    assert summary["tokens_per_s"] > 0 and summary["supervised_tokens_per_s"] > 0
    assert summary["flops_per_s_per_worker"] > 0 and summary["mfu"] is None  # no GPU peak to divide by
    assert all(peak > 0 for peak in summary["load_peak_memory_mb_per_worker"] + summary["peak_memory_mb_per_worker"])

    fresh = write(tmp_path / "fresh", 40, 7)
    fmt = ["--format", "squad"] if name == "qa" else []
    result = cli.invoke(app, ["eval", str(run_dir), "--data", str(fresh), *fmt])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert scored["examples"] >= 40 and scored[metric] > before  # a fresh file, scored by the tuned run

    out = tmp_path / "p.jsonl"
    result = cli.invoke(app, ["predict", str(run_dir), "--data", str(fresh), "--out", str(out), *fmt])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 40 and all("prediction" in r for r in records)
