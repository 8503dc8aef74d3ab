"""Causal-LM tuning end to end on a tiny Llama with 2 workers, then generation from the run."""

from __future__ import annotations

import copy
import json

import pytest
from typer.testing import CliRunner

from shardtune.cli import app
from shardtune.orchestrate import run
from shardtune.recipe import validate_recipe
from tiny_models import instruction_rows, sentiment_rows, write_jsonl

pytestmark = pytest.mark.integration
cli = CliRunner()


def lm_recipe(tiny_recipe, model, data, task, stage):
    raw = copy.deepcopy(tiny_recipe)
    raw["model"] = {"path": str(model)}
    raw["task"] = {"type": "causal_lm", **task}
    raw["adapter"] = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    raw["data"] = {"train": str(data), "validation_split": 0.2, "max_length": 48}
    raw["sharding"] = {"zero_stage": stage}
    return raw


@pytest.mark.parametrize("stage,chat,packing", [(3, True, False), (0, False, True)])
def test_instruction_tuning_and_generation(ray_session, tiny_recipe, tiny_llama, tiny_llama_chat, tmp_path,
                                           stage, chat, packing):
    data = write_jsonl(tmp_path / "train.jsonl", instruction_rows(400, 1))
    raw = lm_recipe(tiny_recipe, tiny_llama_chat if chat else tiny_llama, data,
                    {"max_new_tokens": 3, "packing": packing}, stage)
    if packing:  # 2-3 records to a sequence. Fixed packs, fewer sequences a step: on this data 3 epochs reach a
        # validation loss of 0.24 (0.12 unpacked), 5 epochs 0.10; the loss before training is the same to 1e-6
        raw["data"]["max_length"] = 112
        raw["train"].update({"micro_batch_size": 3, "epochs": 5})
    run_dir = run(validate_recipe(raw)).output_dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["final"]["perplexity"] < metrics["before"]["perplexity"] / 4
    # No new head: the adapter holds LoRA weights only.
    assert not json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["modules_to_save"]

    fresh = write_jsonl(tmp_path / "fresh.jsonl", instruction_rows(20, 9))
    out = tmp_path / "gen.jsonl"
    result = cli.invoke(app, ["predict", str(run_dir), "--data", str(fresh), "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 20
    # The tuned model answers most held-out prompts right.
    right = sum(r["prediction"].split()[:1] == [r["response"]] for r in records if r["prediction"])
    assert right >= 15, records[:3]

    result = cli.invoke(app, ["generate", str(run_dir), "--prompt", "say good or bad", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["response"]

    result = cli.invoke(app, ["eval", str(run_dir), "--data", str(fresh)])
    assert result.exit_code == 0 and json.loads(result.stdout)["perplexity"] < metrics["before"]["perplexity"]


def test_plain_text_tuning_with_blocks(ray_session, tiny_recipe, tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "corpus.jsonl", sentiment_rows(600, 3))  # its "text" column
    raw = lm_recipe(tiny_recipe, tiny_llama, data, {"input": "text"}, 2)
    raw["data"]["max_length"] = 32
    metrics = json.loads((run(validate_recipe(raw)).output_dir / "metrics.json").read_text())
    assert metrics["final"]["perplexity"] < metrics["before"]["perplexity"] / 2


def test_generate_refuses_other_runs(tmp_path):
    (tmp_path / "recipe.yaml").write_text("task: {type: sequence_classification}\n")
    result = cli.invoke(app, ["generate", str(tmp_path)])
    assert result.exit_code != 0 and "--prompt" in result.output


def test_generate_with_a_fixed_instruction_answers_each_prompt_as_predict_does(tiny_llama, sentiment_data, tmp_path):
    """task.instruction set: --prompt is the instruction's input. generate used to put it in the
    instruction column, which the fixed instruction replaced: every prompt got the same answer."""
    from batch_runs import train_in_one_group
    from helpers import make_tiny_recipe

    raw = make_tiny_recipe(tiny_llama, sentiment_data, tmp_path / "run")
    raw["task"] = {"type": "causal_lm", "instruction": "say good or bad", "response_map": {"neg": "bad", "pos": "good"},
                   "max_new_tokens": 2}
    raw["adapter"]["target_modules"] = ["q_proj", "v_proj"]
    raw["data"].update(columns={"input": "text", "response": "label"}, max_length=48)
    raw["train"]["epochs"] = 1
    result = train_in_one_group({"run": raw}, tmp_path / "batch")["run"]
    assert result.get("code") == 0, result

    texts = ["the film was superb and moving", "a dull and awful plot"]
    generated = cli.invoke(app, ["generate", str(tmp_path / "run"), "--prompt", texts[0], "--prompt", texts[1]])
    assert generated.exit_code == 0, generated.output
    answers = [json.loads(line) for line in generated.stdout.splitlines()[-2:]]
    # (the tiny tokenizer spells unknown words in pieces: compare words it knows)
    assert "superb" in answers[0]["prompt"] and "superb" not in answers[1]["prompt"]
    assert all("say good o" in a["prompt"] for a in answers)

    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": t, "label": "pos"} for t in texts])
    out = tmp_path / "p.jsonl"
    predicted = cli.invoke(app, ["predict", str(tmp_path / "run"), "--data", str(rows), "--out", str(out)])
    assert predicted.exit_code == 0, predicted.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["prompt"] for a in answers] == [r["prompt"] for r in records]
    assert [a["response"] for a in answers] == [r["prediction"] for r in records]

    # chat answers each line as generate does (an instruction recipe carries no conversation).
    chatted = cli.invoke(app, ["chat", str(tmp_path / "run")], input="\n".join(texts) + "\n\n")
    assert chatted.exit_code == 0, chatted.output
    assert chatted.stdout.splitlines()[-2:] == [a["response"] for a in answers]

    # The report of a generating task shows sample generations of the validation split.
    reported = cli.invoke(app, ["report", str(tmp_path / "run"), "--samples", "3"])
    assert reported.exit_code == 0, reported.output
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert "sample generations" in page and "the first 3 of" in page and "say good o" in page


def test_chat_refuses_a_classification_run(tmp_path):
    (tmp_path / "recipe.yaml").write_text("task: {type: sequence_classification}\n")
    result = cli.invoke(app, ["chat", str(tmp_path)])
    assert result.exit_code == 1 and "chat needs a causal_lm run" in result.output
