"""One battery over every registered task, driven by a table of cases (as peft's
tests/test_custom_models.py drives one battery over its models): rows -> encode -> collate
-> forward (or generation) -> metrics -> predictions -> task state round trip, on tiny
models built in fixtures. A task registered without a case here fails the first test."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np

import pytest
import torch

import tiny_models
from shardtune.data import cache, read_rows
from shardtune.inference import forward_outputs
from shardtune.recipe import validate_recipe
from shardtune.tasks import Can, get_task, kind_of, task_kinds

PROMPT = {"type": "prompt_classification", "templates": ["{text} it was {mask}"],
          "verbalizer": {"pos": ["good"], "neg": ["bad"]}}

# task.type -> (model fixture, task section, rows writer(path) -> data source)
CASES = {
    "sequence_classification": ("tiny_bert", {"type": "sequence_classification"},
                                lambda p: str(tiny_models.write_jsonl(p / "d.jsonl", tiny_models.sentiment_rows(12, 0)))),
    "sequence_regression": ("tiny_bert", {"type": "sequence_regression"},
                            lambda p: str(tiny_models.write_jsonl(p / "d.jsonl", tiny_models.similarity_rows(12, 0)))),
    "token_classification": ("tiny_bert", {"type": "token_classification"},
                             lambda p: str(tiny_models.write_jsonl(p / "d.jsonl", tiny_models.tagged_rows(12, 0)))),
    "question_answering": ("tiny_bert", {"type": "question_answering"},
                           lambda p: {"path": str(tiny_models.squad_file(p / "d.json", 12, 0)), "format": "squad"}),
    "causal_lm": ("tiny_llama", {"type": "causal_lm"},
                  lambda p: str(tiny_models.write_jsonl(p / "d.jsonl", tiny_models.instruction_rows(12, 0)))),
    "prompt_classification": ("tiny_llama", PROMPT,
                              lambda p: str(tiny_models.write_jsonl(p / "d.jsonl", tiny_models.sentiment_rows(12, 0)))),
    "seq2seq": ("tiny_t5", {"type": "seq2seq", "max_new_tokens": 4},
                lambda p: str(tiny_models.write_jsonl(p / "d.jsonl", tiny_models.text2text_rows(12, 0)))),
}


def test_every_registered_task_has_a_case():
    assert sorted(CASES) == sorted(kind.type for kind in task_kinds())


@pytest.mark.parametrize("task_type", sorted(CASES))
def test_battery(task_type, request, tmp_path, monkeypatch):
    model_fixture, section, source = CASES[task_type]
    model_path = request.getfixturevalue(model_fixture)
    recipe = validate_recipe({"model": {"path": str(model_path)}, "task": section,
                              "adapter": {"method": "none"}, "data": {"train": source(tmp_path), "max_length": 48},
                              "output": {"dir": str(tmp_path / "run")}})
    kind, task = kind_of(recipe), get_task(recipe)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows = read_rows(recipe.data.train)
    task.fit_labels(rows)
    if kind.can(Can.CHECK_TOKENIZER):
        task.check(tokenizer)
    examples = task.encode(rows, tokenizer)
    assert examples and all(isinstance(e.features, dict) for e in examples)

    batch = task.collate(examples[:4], tokenizer)
    assert all(isinstance(v, torch.Tensor) for v in batch.values())
    torch.manual_seed(0)
    model = task.build_model(str(model_path), {})
    if kind.can(Can.WRAP_MODEL):
        model = task.wrap(model, tokenizer)
    assert model(**batch).loss is not None  # the batch trains as it is

    outputs = forward_outputs(model, task, tokenizer, examples, 4, torch.device("cpu"))
    assert len(outputs) == len(examples)

    # The examples survive the Arrow cache the workers read them from, and score the same.
    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path / "cache"))
    cache.write("battery", {"train": examples}, {})
    stored = cache.read("battery")[0]["train"]
    assert [asdict(e) for e in stored] == json.loads(json.dumps([asdict(e) for e in examples]))
    for ours, theirs in zip(forward_outputs(model, task, tokenizer, stored, 4, torch.device("cpu")), outputs):
        if isinstance(ours, dict):
            assert ours.keys() == theirs.keys() and ours.get("text") == theirs.get("text")
        else:
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    metrics = task.metrics(outputs, examples)
    assert "loss" in metrics and all(math.isfinite(v) for v in metrics.values()), metrics
    assert task.metrics(outputs, stored) == pytest.approx(metrics)  # targets and extras read back alike
    records = task.predictions(outputs, examples, rows)
    assert len(records) == len(rows) and json.dumps(records)

    saved = json.loads(json.dumps(task.state()))  # what a run's task.json holds
    again = get_task(recipe)
    again.load_state(saved)
    assert again.state() == task.state()

    if kind.can(Can.GENERATE):
        generated = task.generate(model, tokenizer, [task.prompt_row("great film", "--prompt 1")], max_new_tokens=3)
        assert len(generated) == 1 and isinstance(generated[0]["prediction"], str)
