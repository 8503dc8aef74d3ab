"""The text-to-text task's own rules: targets end in EOS, target_map, bad rows named, and
its text metrics against hand-computed values."""

from __future__ import annotations

import pytest

from shardtune.data import Row
from shardtune.errors import DataError, RecipeError
from shardtune.recipe import validate_recipe
from shardtune.tasks import Example, get_task


@pytest.fixture
def t5_task(tiny_t5, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"source": "x", "label": "good"}\n')

    def build(**task):
        return get_task(validate_recipe({"model": {"path": str(tiny_t5)}, "task": {"type": "seq2seq", **task},
                                         "data": {"train": str(tmp_path / "d.jsonl"), "columns": {"target": "label"}},
                                         "output": {"dir": str(tmp_path / "run")}}))
    return build


@pytest.fixture
def t5_tokenizer(tiny_t5):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_t5)


def test_targets_end_in_eos_and_the_prefix_leads_the_source(t5_task, t5_tokenizer):
    task = t5_task(source_prefix="say which word ", target_map={"1": "good", "0": "bad"})
    [example] = task.encode([Row({"source": "superb plot", "label": 1.0}, "d.jsonl:1")], t5_tokenizer)
    assert example.target == "good"
    assert example.features["labels"] == t5_tokenizer("good")["input_ids"] + [t5_tokenizer.eos_token_id]
    assert t5_tokenizer.decode(example.features["input_ids"]).startswith("say which word superb plot")


@pytest.mark.parametrize("row,fragment", [
    ({"label": "good"}, "d.jsonl:3: 'source' is missing, empty or not text"),
    ({"source": "  ", "label": "good"}, "'source' is missing, empty or not text"),
    ({"source": "fine", "label": 7}, "'label' value 7 is not in task.target_map"),
])
def test_bad_rows_are_named(t5_task, t5_tokenizer, row, fragment):
    task = t5_task(target_map={"good": "good", "bad": "bad"})
    with pytest.raises(DataError, match=fragment.replace("(", "\\(")):
        task.encode([Row(row, "d.jsonl:3")], t5_tokenizer)


def test_columns_outside_the_roles_are_refused(tiny_t5, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"source": "x", "target": "good"}\n')
    with pytest.raises(RecipeError, match="data.columns.text: not a column role of task seq2seq.*source"):
        validate_recipe({"model": {"path": str(tiny_t5)}, "task": {"type": "seq2seq"},
                         "data": {"train": str(tmp_path / "d.jsonl"), "columns": {"text": "sentence"}},
                         "output": {"dir": str(tmp_path / "run")}})


def test_text_metrics_by_hand(t5_task):
    task = t5_task()
    examples = [Example(0, {}, "Positive."), Example(1, {}, "the cat sat on a mat")]
    outputs = [{"nll": 2.0, "tokens": 2, "text": "positive"}, {"nll": 6.0, "tokens": 6, "text": "the cat sat on the mat"}]
    metrics = task.metrics(outputs, examples)
    assert metrics["loss"] == pytest.approx(1.0)  # (2 + 6) / (2 + 6) tokens
    assert metrics["exact_match"] == 0.5  # case and punctuation ignored in the first only
    # ROUGE-L F: 1 for the first; LCS 5 of 6 tokens each way for the second.
    assert metrics["rougeL"] == pytest.approx((1.0 + 5 / 6) / 2)
    assert 0 < metrics["sacrebleu"] < 100
