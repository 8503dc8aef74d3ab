"""Regression, token tagging and extractive QA: readers, alignment and metrics, checked by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shardtune.data import Row, read_rows
from shardtune.errors import DataError
from shardtune.metrics import exact_match, regression_metrics, squad_scores, tagging_metrics, token_f1
from shardtune.recipe import DataSource, validate_recipe
from shardtune.tasks import get_task

IGNORE = -100


@pytest.fixture
def tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def task_for(tiny_recipe, task: dict, **data):
    raw = {**tiny_recipe, "task": task, "data": {**tiny_recipe["data"], **data}}
    return get_task(validate_recipe(raw))


# ------------------------------------------------------------------------ readers
def test_conll_reader(tmp_path):
    (tmp_path / "w").write_text("-DOCSTART-\tO\n\nen:Paris\tB-LOC\nen:is\tO\n\nen:Bob\tB-PER\n")
    rows = read_rows(DataSource(path=str(tmp_path / "w"), format="conll", token_prefix="en:"))
    assert [r.values for r in rows] == [{"tokens": ["Paris", "is"], "tags": ["B-LOC", "O"]},
                                        {"tokens": ["Bob"], "tags": ["B-PER"]}]
    assert rows[0].where.endswith("w:3") and rows[1].where.endswith("w:6")


def test_wordtag_reader(tmp_path):
    (tmp_path / "t.txt").write_text("EU###B-ORG rejects###O\n\n#####O C###B-X\n")
    rows = read_rows(DataSource(path=str(tmp_path / "t.txt"), format="wordtag"))
    assert rows[0].values == {"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}
    assert rows[1].values == {"tokens": ["##", "C"], "tags": ["O", "B-X"]} and rows[1].where.endswith(":3")
    (tmp_path / "bad.txt").write_text("EU###B-ORG rejects\n")
    with pytest.raises(DataError, match=r"bad.txt:1: 'rejects' is not word###TAG"):
        read_rows(DataSource(path=str(tmp_path / "bad.txt"), format="wordtag"))


def test_conll_line_without_tag(tmp_path):
    (tmp_path / "w").write_text("Paris\tB-LOC\nlonely\n")
    with pytest.raises(DataError, match=r"w:2: expected a token and a tag"):
        read_rows(DataSource(path=str(tmp_path / "w"), format="conll"))


def test_squad_reader(tmp_path):
    data = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "q1", "question": "Where?", "answers": [{"text": "France", "answer_start": 12}]},
        {"id": "q2", "question": "Who?", "answers": [], "is_impossible": True}]}]}]}
    (tmp_path / "s.json").write_text(json.dumps(data))
    rows = read_rows(DataSource(path=str(tmp_path / "s.json"), format="squad"))
    assert [r.values["id"] for r in rows] == ["q1", "q2"] and rows[1].values["is_impossible"]
    (tmp_path / "n.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="not a SQuAD file"):
        read_rows(DataSource(path=str(tmp_path / "n.json"), format="squad"))


def test_format_must_fit_the_task(tiny_recipe):
    from shardtune.errors import RecipeError

    with pytest.raises(RecipeError, match="conll files hold data for token_classification"):
        validate_recipe({**tiny_recipe, "data": {**tiny_recipe["data"],
                                                  "train": {"path": tiny_recipe["data"]["train"], "format": "conll"}}})


# --------------------------------------------------------------------- regression
def test_regression_targets_and_metrics(tiny_recipe, tokenizer):
    task = task_for(tiny_recipe, {"type": "sequence_regression"})
    rows = [Row({"text": "good", "label": "4.5"}, "f:1"), Row({"text": "bad", "label": 0}, "f:2")]
    assert [e.target for e in task.encode(rows, tokenizer)] == [4.5, 0.0]
    with pytest.raises(DataError, match="f:1: label 'high' in column 'label' is not a number"):
        task.encode([Row({"text": "x", "label": "high"}, "f:1")], tokenizer)
    metrics = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 7.0]))
    assert metrics["loss"] == pytest.approx((1 + 4 + 16) / 3)
    assert metrics["spearman"] == pytest.approx(1.0)
    assert metrics["pearson"] == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1])


# -------------------------------------------------------------------- token tagging
def test_labels_only_on_first_subtokens(tiny_recipe, tokenizer):
    task = task_for(tiny_recipe, {"type": "token_classification"})
    rows = [Row({"tokens": ["superb", "cafe"], "tags": ["B-X", "I-X"]}, "f:1"),
            Row({"tokens": ["film"], "tags": ["O"]}, "f:2")]
    task.fit_labels(rows)
    assert task.labels == ["O", "B-X", "I-X"]
    example = task.encode(rows, tokenizer)[0]
    # [CLS] superb c ##a ##f ##e [SEP]: "cafe" splits into four sub-tokens
    assert tokenizer.convert_ids_to_tokens(example.features["input_ids"]) == \
        ["[CLS]", "superb", "c", "##a", "##f", "##e", "[SEP]"]
    assert example.target == [IGNORE, 1, 2, IGNORE, IGNORE, IGNORE, IGNORE]


def test_label_all_subtokens(tiny_recipe, tokenizer):
    task = task_for(tiny_recipe, {"type": "token_classification", "labels": ["O", "B-X", "I-X"],
                                  "label_all_subtokens": True})
    example = task.encode([Row({"tokens": ["superb", "cafe"], "tags": ["B-X", "I-X"]}, "f:1")], tokenizer)[0]
    assert example.target == [IGNORE, 1, 2, 2, 2, 2, IGNORE]


def test_word_predictions_come_from_first_subtokens(tiny_recipe, tokenizer):
    task = task_for(tiny_recipe, {"type": "token_classification", "labels": ["O", "B-X", "I-X"]})
    example = task.encode([Row({"tokens": ["superb", "cafe"], "tags": ["B-X", "I-X"]}, "f:1")], tokenizer)[0]
    logits = np.zeros((7, 3))
    logits[1, 1] = logits[2, 2] = 5  # superb -> B-X, first piece of cafe -> I-X
    logits[3, 0] = 9                 # a later piece says O: must be ignored
    assert task.word_predictions(logits, example) == ["B-X", "I-X"]


@pytest.mark.parametrize("row,fragment", [
    ({"tokens": ["a", "b"], "tags": ["O"]}, "f:1: 2 words but 1 tags"),
    ({"tokens": [], "tags": []}, "must be a non-empty list of words"),
    ({"tokens": ["a"], "tags": ["B-NOPE"]}, "tag 'B-NOPE' is not one of the task's tags"),
])
def test_bad_tagged_rows(tiny_recipe, tokenizer, row, fragment):
    task = task_for(tiny_recipe, {"type": "token_classification", "labels": ["O", "B-X"]})
    with pytest.raises(DataError, match=fragment):
        task.encode([Row(row, "f:1")], tokenizer)


def test_tagging_metrics_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    predicted = [["B-PER", "I-PER", "O", "O"]]
    metrics = tagging_metrics(gold, predicted, np.zeros((1, 2)), np.array([0]))
    assert metrics["entity_precision"] == 1.0 and metrics["entity_recall"] == 0.5
    assert metrics["entity_f1"] == pytest.approx(2 / 3) and metrics["token_accuracy"] == 0.75


# ------------------------------------------------------------------------------ QA
def qa_row(context="the film was superb and the plot was bad", answer="superb", qid="q1"):
    start = context.find(answer) if answer else -1
    answers = [{"text": answer, "answer_start": start}] if answer else []
    return Row({"id": qid, "question": "what was the film", "context": context, "answers": answers}, f"s#{qid}")


def test_answer_span_maps_to_tokens_and_back(tiny_recipe, tokenizer):
    task = task_for(tiny_recipe, {"type": "question_answering"}, max_length=64)
    task.fit_labels([qa_row()])
    [feature] = task.encode([qa_row()], tokenizer)
    start, end = feature.target
    tokens = tokenizer.convert_ids_to_tokens(feature.features["input_ids"])
    assert tokens[start:end + 1] == ["superb"]
    offsets = feature.extra["offsets"]
    assert feature.extra["context"][offsets[start][0]:offsets[end][1]] == "superb"


def test_long_context_becomes_overlapping_windows(tiny_recipe, tokenizer):
    context = " ".join(["the plot was bad"] * 12) + " and the film was superb"
    task = task_for(tiny_recipe, {"type": "question_answering", "doc_stride": 8}, max_length=32)
    task.fit_labels([qa_row(context)])
    features = task.encode([qa_row(context)], tokenizer)
    assert len(features) > 2 and {f.extra["row"] for f in features} == {0}
    # The answer sits in the last window only; the others point at [CLS].
    assert [f.target != (0, 0) for f in features].count(True) >= 1 and features[0].target == (0, 0)
    # Scoring the gold span highest in its window recovers the answer text.
    outputs = []
    for f in features:
        logits = np.full((len(f.features["input_ids"]), 2), -5.0)
        if f.target != (0, 0):
            logits[f.target[0], 0] = logits[f.target[1], 1] = 5.0
        outputs.append(logits)
    assert task.answers(outputs, features) == {0: "superb"}
    assert task.metrics(outputs, features)["exact_match"] == 100.0


def test_no_answer_wins_when_cls_scores_highest(tiny_recipe, tokenizer):
    task = task_for(tiny_recipe, {"type": "question_answering"}, max_length=64)
    rows = [qa_row(answer=None, qid="q2"), qa_row(qid="q1")]
    task.fit_labels(rows)
    assert task.allow_no_answer  # learned from the data: one question has no answer
    features = task.encode(rows, tokenizer)
    assert features[0].target == (0, 0)
    logits = np.zeros((len(features[0].features["input_ids"]), 2))
    logits[0] = 3.0  # [CLS] start + end = 6 beats any span (0)
    assert task.answers([logits], [features[0]]) == {0: ""}


def test_answer_not_in_context_is_refused(tiny_recipe, tokenizer):
    task = task_for(tiny_recipe, {"type": "question_answering"}, max_length=64)
    row = Row({"question": "q", "context": "the film was bad", "answers": [{"text": "superb", "answer_start": 4}]},
              "s.json#data[0].paragraphs[0].qas[3]")
    with pytest.raises(DataError, match=r"qas\[3\]: answer 'superb' is not in its context at character 4"):
        task.encode([row], tokenizer)


def test_squad_metric_definitions():
    assert exact_match("The Cat!", "cat") == 1.0
    assert token_f1("a big red dog", "red dog") == pytest.approx(0.8)  # P 2/3, R 1
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    scores = squad_scores(["Paris", "", "blue"], [["paris", "Paris, France"], [], ["red"]])
    assert scores == {"exact_match": pytest.approx(200 / 3), "f1": pytest.approx(200 / 3)}


def test_best_no_answer_threshold_by_hand():
    from shardtune.metrics import best_no_answer_threshold

    # margins: q0 -1 (span right), q1 0.5 (span right), q2 2.0 (gold: no answer), q3 3.0 (span wrong)
    candidates = [("paris", -1.0), ("blue", 0.5), ("red", 2.0), ("x", 3.0)]
    golds = [["Paris"], ["blue"], [], ["green"]]
    result = best_no_answer_threshold(candidates, golds)
    # answering q0, q1 and abstaining on q2, q3 gets 1 + 1 + 1 + 0 = 3 of 4
    assert result["best_f1"] == pytest.approx(75.0) and result["best_exact_match"] == pytest.approx(75.0)
    assert result["best_no_answer_threshold"] == 0.5
    # At threshold 0 (the default), q1 would abstain: 2 of 4.


# ------------------------------------------------------------- data.on_bad_row: skip
def _good_and_bad(kind):
    """Per task: rows that fit, and one that does not, with the problem it must report."""
    if kind == "sequence_regression":
        good = [Row({"text": f"film {i}", "label": str(i % 5)}, f"f:{i}") for i in range(4)]
        return good, Row({"text": "film", "label": "high"}, "f:9"), "is not a number"
    if kind == "token_classification":
        good = [Row({"tokens": ["superb", "film"], "tags": ["B-X", "O"]}, f"f:{i}") for i in range(4)]
        return good, Row({"tokens": ["a", "b"], "tags": ["O"]}, "f:9"), "2 words but 1 tags"
    if kind == "question_answering":
        good = [qa_row(qid=f"q{i}") for i in range(4)]
        bad = Row({"question": "q", "context": "the film was bad",
                   "answers": [{"text": "superb", "answer_start": 4}]}, "f:9")
        return good, bad, "is not in its context"
    good = [Row({"instruction": "rate the film", "output": "good"}, f"f:{i}") for i in range(4)]
    return good, Row({"instruction": "rate the film", "output": ""}, "f:9"), "missing or empty"


@pytest.mark.parametrize("kind", ["sequence_regression", "token_classification", "question_answering",
                                  "causal_lm"])
def test_bad_rows_are_skipped_and_reported_for_every_task(kind, tiny_recipe, tokenizer, tiny_llama):
    from transformers import AutoTokenizer

    from shardtune.data.pipeline import drop_bad_rows

    extra = {"max_length": 64}
    if kind == "causal_lm":
        tiny_recipe = {**tiny_recipe, "model": {"path": str(tiny_llama)}, "adapter": {"method": "lora"}}
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    task = task_for(tiny_recipe, {"type": kind}, **extra)
    good, bad_row, fragment = _good_and_bad(kind)
    rows = good[:2] + [bad_row] + good[2:]
    task.fit_labels(rows)  # label fitting reads past the bad row; encode reports it
    with pytest.raises(DataError, match=fragment):
        task.encode(rows, tokenizer)
    bad: list[str] = []
    kept = drop_bad_rows(rows, task, tokenizer, bad, "f")
    assert kept == good and len(bad) == 1 and bad[0].startswith("f:9: ") and fragment in bad[0]
