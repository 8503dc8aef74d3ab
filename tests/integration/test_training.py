"""Real 2-worker runs on a tiny BERT: ZeRO stages, saved adapters, reload (Ray + DeepSpeed),
and the training options (in one torchrun group, tests/batch_runs.py).

One run per ZeRO stage is trained once for this module and shared by the checks below.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import make_tiny_recipe
from shardtune.data.pipeline import load_data
from shardtune.inference import forward_outputs, load_run
from shardtune.orchestrate import run
from shardtune.recipe import validate_recipe

pytestmark = pytest.mark.integration
STAGES = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def stage_runs(ray_session, tiny_bert, sentiment_data, tmp_path_factory):
    base = {
        "model": {"path": str(tiny_bert)},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        "data": {"train": str(sentiment_data["train"]), "validation_split": 0.2, "max_length": 32},
        "train": {"epochs": 3, "micro_batch_size": 8, "learning_rate": 2e-2, "warmup_ratio": 0.0,
                  "log_every_steps": 10},
        "cluster": {"workers": 2},
    }
    runs = {}
    for stage in STAGES:
        raw = copy.deepcopy(base)
        raw["sharding"] = {"zero_stage": stage}
        raw["output"] = {"dir": str(tmp_path_factory.mktemp(f"zero{stage}") / "run")}
        if stage == 1:  # retention, ranked the wrong way round on purpose: keep the worst-loss epoch
            raw["output"].update(keep_checkpoints=True, checkpoints_to_keep=1, keep_best_by="loss",
                                 keep_best_mode="max")
        runs[stage] = run(validate_recipe(raw)).output_dir
    return runs


def metrics_of(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_run_directory_is_complete(stage_runs):
    run_dir = stage_runs[2]
    for item in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "tokenizer/tokenizer.json",
                 "task.json", "recipe.yaml", "metrics.json", "logs/train.log"):
        assert (run_dir / item).exists(), item
    assert list((run_dir / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert not (run_dir / "ray").exists()  # checkpoints are dropped unless keep_checkpoints
    assert not run_dir.with_name(run_dir.name + ".partial").exists()
    assert json.loads((run_dir / "task.json").read_text()) == {"labels": ["neg", "pos"]}
    log = (run_dir / "logs" / "train.log").read_text()
    assert "model ready" in log and "validation loss" in log


def test_the_console_and_the_metrics_state_the_same_epoch(stage_runs):
    """A step line's epoch, a validation line's epoch and metrics.json's are one figure."""
    run_dir = stage_runs[2]
    log = (run_dir / "logs" / "train.log").read_text()
    metrics = metrics_of(run_dir)
    logged = {int(m["step"]): float(m["epoch"]) for m in re.finditer(r"epoch (?P<epoch>[\d.]+)/3 step (?P<step>\d+)/", log)}
    assert logged and {p["step"]: p["epoch"] for p in metrics["steps"] if p["step"] in logged} == logged
    validated = [float(e) for e in re.findall(r"\(epoch ([\d.]+), step \d+\)", log)]
    assert validated == [m["epoch"] for m in metrics["history"]]
    assert logged[30] == 1.5  # half-way through the second epoch of 20 steps


def test_checkpoints_kept_are_the_best_by_the_recipes_metric(stage_runs):
    history = metrics_of(stage_runs[1])["history"][1:]  # the three epoch evaluations
    worst = max(history, key=lambda m: m["loss"])["epoch"]
    kept = [json.loads(p.read_text())["epoch"] for p in (stage_runs[1] / "ray").glob("checkpoint_*/trainstate.json")]
    assert kept == [worst]


def test_training_learns(stage_runs):
    metrics = metrics_of(stage_runs[2])
    assert [m["epoch"] for m in metrics["history"]] == [0, 1, 2, 3]  # before training + every epoch
    assert metrics["final"]["loss"] < metrics["before"]["loss"] - 0.1
    assert metrics["final"]["accuracy"] >= 0.75
    summary = metrics["summary"]
    assert summary["steps"] == 3 * (320 // 16)
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]
    assert len(summary["peak_memory_mb_per_worker"]) == 2


def test_zero_stages_give_the_same_losses(stage_runs):
    """ZeRO partitions optimizer state, gradients and parameters; it must not change the maths."""
    reference = [m["loss"] for m in metrics_of(stage_runs[0])["history"]]
    for stage in STAGES[1:]:
        losses = [m["loss"] for m in metrics_of(stage_runs[stage])["history"]]
        np.testing.assert_allclose(losses, reference, rtol=2e-3, err_msg=f"ZeRO-{stage}")
        train_losses = [m["train_loss"] for m in metrics_of(stage_runs[stage])["history"][1:]]
        reference_train = [m["train_loss"] for m in metrics_of(stage_runs[0])["history"][1:]]
        np.testing.assert_allclose(train_losses, reference_train, rtol=2e-3, err_msg=f"ZeRO-{stage}")


def test_zero3_adapter_is_complete(stage_runs):
    """Under ZeRO-3 parameters are partitioned; the saved adapter must hold whole tensors."""
    tensors = load_file(stage_runs[3] / "adapter" / "adapter_model.safetensors")
    reference = load_file(stage_runs[0] / "adapter" / "adapter_model.safetensors")
    assert tensors.keys() == reference.keys()
    assert any("lora_A" in k for k in tensors) and any("classifier" in k for k in tensors)
    assert any("pooler" in k for k in tensors)
    for key, tensor in tensors.items():
        assert tensor.shape == reference[key].shape and tensor.numel() > 0, key
        assert torch.count_nonzero(tensor) > 0, key
        torch.testing.assert_close(tensor, reference[key], rtol=0.05, atol=2e-3)


@pytest.mark.parametrize("stage", [2, 3])
def test_plain_peft_reload_reproduces_shardtune_evaluation(stage_runs, stage, tiny_bert):
    """Load with plain transformers + peft; outputs on the validation split give shardtune's metrics."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir = stage_runs[stage]
    labels = json.loads((run_dir / "task.json").read_text())["labels"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=len(labels))
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")

    loaded = load_run(run_dir)
    val_examples = load_data(loaded.recipe, loaded.task, tokenizer).val_examples
    plain = forward_outputs(model, loaded.task, tokenizer, val_examples, 16, torch.device("cpu"))
    ours = forward_outputs(loaded.model, loaded.task, tokenizer, val_examples, 16, torch.device("cpu"))
    np.testing.assert_allclose(plain, ours, rtol=1e-5, atol=1e-5)

    recorded = metrics_of(run_dir)["final"]
    recomputed = loaded.task.metrics(plain, val_examples)
    assert recomputed["accuracy"] == pytest.approx(recorded["accuracy"], abs=1e-9)
    assert recomputed["loss"] == pytest.approx(recorded["loss"], rel=1e-4)


# Sharding and training options, each a real 2-worker run that must learn. The lr the
# workers logged to TensorBoard at step 10 of 60 tells which schedule ran (no warm-up).
PEAK = 2e-2
OPTIONS = [
    ("zero3-offload-both", {"sharding": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True}},
     PEAK * 50 / 60),
    ("zero2-offload-optimizer", {"sharding": {"zero_stage": 2, "offload_optimizer": True}}, PEAK * 50 / 60),
    ("bf16-cosine", {"sharding": {"zero_stage": 2, "precision": "bf16"}, "train": {"lr_scheduler": "cosine"}},
     PEAK * 0.5 * (1 + math.cos(math.pi * 10 / 60))),
    ("constant", {"train": {"lr_scheduler": "constant"}}, PEAK),
    ("augmented", {"data": {"augment": {"probability": 0.5, "synonym_replace": 0.2, "random_swap": 0.1}}},
     PEAK * 50 / 60),
]


@pytest.fixture(scope="module")
def option_runs(tiny_bert, sentiment_data, tmp_path_factory):
    """The options train in one torchrun group (tests/batch_runs.py): the loop is the same."""
    from batch_runs import train_in_one_group

    root = tmp_path_factory.mktemp("options")
    recipes = {}
    for name, changes, _ in OPTIONS:
        raw = make_tiny_recipe(tiny_bert, sentiment_data, root / name)
        for section, values in changes.items():
            raw[section] = {**raw.get(section, {}), **values}
        recipes[name] = raw
    return train_in_one_group(recipes, root)


@pytest.mark.parametrize("name,changes,lr_at_step_10", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_options_train(option_runs, name, changes, lr_at_step_10):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = option_runs[name]
    assert "error" not in result and result["code"] == 0, result
    run_dir = Path(result["dir"])
    metrics = metrics_of(run_dir)
    assert metrics["final"]["loss"] < metrics["before"]["loss"] - 0.1
    events = EventAccumulator(str(run_dir / "logs" / "tensorboard"))
    events.Reload()
    lr = {e.step: e.value for e in events.Scalars("train/lr")}
    assert lr[10] == pytest.approx(lr_at_step_10, rel=1e-4)


def test_torchrun_without_ray_writes_the_same_run(tiny_recipe, tmp_path, sentiment_data):
    """`torchrun -m shardtune.torchrun` runs the same loop with a local reporter."""
    import subprocess
    import sys

    from helpers import write_recipe

    raw = copy.deepcopy(tiny_recipe)
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "shardtune.torchrun", str(recipe), "train.epochs=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert metrics_of(run_dir)["summary"]["steps"] == 2 * 20
    assert not (run_dir / "checkpoint").exists()
    loaded = load_run(run_dir)  # loads like any run
    assert loaded.task.labels == ["neg", "pos"]
