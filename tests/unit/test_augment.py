"""Augmentation: WordNet synonyms, seeded draws, and labels that survive every operation."""

from __future__ import annotations

import copy

import pytest
from seqeval.metrics.sequence_labeling import get_entities

from shardtune.data import Row
from shardtune.data.augment import Augmenter, synonyms
from shardtune.errors import RecipeError
from shardtune.recipe import AugmentSection, validate_recipe
from shardtune.tasks import get_task

EVERYTHING = AugmentSection(probability=1.0, synonym_replace=0.5, random_insert=0.3, random_swap=0.3,
                            random_delete=0.3, sentence_shuffle=1.0)


def test_wordnet_synonyms():
    assert {"movie", "picture"} <= set(synonyms("film"))
    assert "film" not in synonyms("film") and all(" " not in w and "_" not in w for w in synonyms("good"))


def test_draws_are_seeded():
    text = "The film was good. The plot was quite bad. The music was lovely."
    first = [Augmenter(EVERYTHING, seed=3).text(text) for _ in range(2)]
    assert first[0] == first[1]
    assert Augmenter(EVERYTHING, seed=4).text(text) != first[0]
    assert Augmenter(EVERYTHING, seed=3).text(text) != text


def test_protected_words_stay_put_and_sources_are_tracked():
    words = "the film was good and the plot was bad".split()
    out, sources = Augmenter(EVERYTHING, seed=1).words(words, protected={3, 8})
    assert [out[k] for k, s in enumerate(sources) if s in (3, 8)] == ["good", "bad"]
    assert all(s is None or 0 <= s < len(words) for s in sources)


def tagging_task(tiny_recipe):
    return get_task(validate_recipe({**tiny_recipe, "task": {"type": "token_classification"}}))


@pytest.mark.parametrize("seed", range(60))
def test_tagging_augmentation_never_breaks_an_entity(tiny_recipe, seed):
    task = tagging_task(tiny_recipe)
    words = "Peter Blackburn went to the new offices of the European Commission in Brussels today".split()
    tags = ["B-PER", "I-PER", "O", "O", "O", "O", "O", "O", "O", "B-ORG", "I-ORG", "O", "B-LOC", "O"]
    row = task.augment(Row({"tokens": words, "tags": tags}, "f:1"), Augmenter(EVERYTHING, seed))
    new_words, new_tags = row.values["tokens"], row.values["tags"]
    assert len(new_words) == len(new_tags)
    entities = lambda ws, ts: [(t, ws[a:b + 1]) for t, a, b in get_entities(ts)]
    assert entities(new_words, new_tags) == entities(words, tags)


def qa_task(tiny_recipe):
    return get_task(validate_recipe({**tiny_recipe, "task": {"type": "question_answering"}}))


@pytest.mark.parametrize("seed", range(60))
def test_qa_augmentation_keeps_the_answer_at_its_offset(tiny_recipe, seed):
    task = qa_task(tiny_recipe)
    context = "The film opened in (Paris) in 1996, and critics found the plot was quite good overall."
    for answer in ("Paris", "1996", "The film", "good overall."):
        row = Row({"question": "where did the film open", "context": context,
                   "answers": [{"text": answer, "answer_start": context.index(answer)}]}, "s#0")
        new = task.augment(row, Augmenter(EVERYTHING, seed)).values
        start = new["answers"][0]["answer_start"]
        assert new["context"][start:start + len(answer)] == answer
        task._answers(Row(new, "s#0"))  # passes the same check as real data


def test_augmentation_rules(tiny_recipe, tmp_path, monkeypatch):
    raw = copy.deepcopy(tiny_recipe)
    raw["data"]["augment"] = {"synonym_replace": 0.2}
    validate_recipe(raw)
    monkeypatch.setenv("SHARDTUNE_WORDNET", str(tmp_path))
    with pytest.raises(RecipeError, match="apt-get install wordnet-base"):
        validate_recipe(raw)
    raw["data"]["augment"] = {"synonym_replace": 0, "random_swap": 0.1}
    validate_recipe(raw)  # the other operations need no WordNet
    raw["task"] = {"type": "causal_lm"}
    with pytest.raises(RecipeError, match="remove it for causal_lm"):
        validate_recipe(raw)
