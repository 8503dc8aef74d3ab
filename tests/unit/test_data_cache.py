"""The Arrow cache of encoded examples: a second load maps what the first wrote (the same
examples, labels and facts, no rows read), any change that alters the encoding misses,
and the cache can be turned off. Also the parquet reader."""

from __future__ import annotations

import json
import os

import pytest

import tiny_models
from shardtune.data import cache, read_rows
from shardtune.data.pipeline import load_data
from shardtune.errors import DataError
from shardtune.recipe import validate_recipe
from shardtune.tasks import get_task


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def _recipe(tiny_recipe, **data):
    return validate_recipe({**tiny_recipe, "data": {**tiny_recipe["data"], **data}})


def _load(recipe, tokenizer):
    task = get_task(recipe)
    return task, load_data(recipe, task, tokenizer)


def test_the_second_load_maps_what_the_first_wrote(tiny_recipe, tokenizer):
    recipe = _recipe(tiny_recipe)
    task, first = _load(recipe, tokenizer)
    assert not first.cached and first.train_rows is not None
    again, second = _load(recipe, tokenizer)
    assert second.cached and second.train_rows is None and second.val_rows is None  # nothing was read
    assert again.state() == task.state()  # the labels the first load fitted
    assert [e.features for e in second.train_examples] == [e.features for e in first.train_examples]
    assert [e.target for e in second.val_examples] == [e.target for e in first.val_examples]
    assert second.val_rows_sha256 == first.val_rows_sha256 and len(second.val_rows_sha256) == 64
    assert second.train_examples[:2][1].features == first.train_examples[1].features  # slices, as fit_verbalizer takes


@pytest.mark.parametrize("change", ["data_file", "max_length", "seed", "task_option"])
def test_a_change_that_alters_the_encoding_misses(tiny_recipe, tokenizer, change):
    recipe = _recipe(tiny_recipe)
    _load(recipe, tokenizer)
    if change == "data_file":
        path = recipe.data.train.path
        with open(path, "a") as handle:
            handle.write(json.dumps({"text": "superb superb superb", "label": "pos"}) + "\n")
        changed = recipe
    elif change == "max_length":
        changed = _recipe(tiny_recipe, max_length=16)
    elif change == "seed":
        changed = validate_recipe({**tiny_recipe, "train": {**tiny_recipe["train"], "seed": 7}})
    else:
        changed = validate_recipe({**tiny_recipe, "task": {"type": "sequence_classification", "labels": ["pos", "neg"]}})
    _, data = _load(changed, tokenizer)
    assert not data.cached


def test_a_tokenizer_with_other_tokens_has_another_key(tiny_recipe, tokenizer, tiny_llama):
    from transformers import AutoTokenizer

    recipe = _recipe(tiny_recipe)
    assert cache.data_key(recipe, tokenizer) == cache.data_key(recipe, AutoTokenizer.from_pretrained(tiny_recipe["model"]["path"]))
    assert cache.data_key(recipe, tokenizer) != cache.data_key(recipe, AutoTokenizer.from_pretrained(tiny_llama))


def test_skipped_rows_are_reported_from_the_cache_too(tiny_recipe, tokenizer, tmp_path):
    rows = tiny_models.sentiment_rows(40, 0) + [{"text": "", "label": "pos"}]
    path = tiny_models.write_jsonl(tmp_path / "bad.jsonl", rows)
    recipe = _recipe(tiny_recipe, train=str(path), on_bad_row="skip")
    _, first = _load(recipe, tokenizer)
    _, second = _load(recipe, tokenizer)
    assert second.cached and second.skipped == first.skipped and sum(first.skipped.values()) == 1
    assert second.problems == first.problems and "bad.jsonl:41" in second.problems[0]


def test_the_cache_can_be_turned_off_and_augmented_runs_skip_it(tiny_recipe, tokenizer, tmp_path):
    _load(_recipe(tiny_recipe, cache=False), tokenizer)
    _load(_recipe(tiny_recipe, augment={"probability": 0.5, "synonym_replace": 0.0, "random_swap": 0.2}), tokenizer)
    assert not (tmp_path / "cache" / "data").exists() or not os.listdir(tmp_path / "cache" / "data")


def test_parquet_rows_are_read_with_their_row_numbers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = tiny_models.sentiment_rows(25, 0)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    source = validate_recipe({"model": {"path": "x"}, "data": {"train": str(tmp_path / "d.parquet")},
                              "output": {"dir": str(tmp_path / "run")}}, check_files=False).data.train
    read = read_rows(source)
    assert [r.values for r in read] == rows and read[24].where.endswith("d.parquet#row 25")


def test_a_broken_parquet_file_is_named(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"PAR1 this is not parquet")
    source = validate_recipe({"model": {"path": "x"}, "data": {"train": str(tmp_path / "d.parquet")},
                              "output": {"dir": str(tmp_path / "run")}}, check_files=False).data.train
    with pytest.raises(DataError, match="d.parquet': not a readable parquet file"):
        read_rows(source)


RACER = """
import json, os, sys, time
from pathlib import Path
from transformers import AutoTokenizer
from shardtune.data.pipeline import load_data
from shardtune.recipe import validate_recipe
from shardtune.tasks import get_task
recipe = validate_recipe(json.loads(sys.argv[1]))
tokenizer, task = AutoTokenizer.from_pretrained(recipe.model.path), get_task(recipe)
go = Path(sys.argv[2])
(go.parent / f"ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.01)
print(json.dumps(load_data(recipe, task, tokenizer).cached))
"""


def test_processes_that_miss_together_encode_once(tiny_recipe, tmp_path):
    """Two ranks of one machine asking for the same missing entry at the same instant: one
    encodes and writes, the other waits and maps it (without the lock both would encode)."""
    import subprocess
    import sys
    import time

    env = {**os.environ, "SHARDTUNE_CACHE": str(tmp_path / "cache")}
    go = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, json.dumps(tiny_recipe), str(go)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in racers]
    assert sorted(results) == [False, True]


def test_an_unwritable_cache_warns_and_encodes_anyway(tiny_recipe, tokenizer, tmp_path, monkeypatch, capsys):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("SHARDTUNE_CACHE", str(blocked))
    _, data = _load(_recipe(tiny_recipe), tokenizer)
    assert not data.cached and len(data.train_examples) > 0
    warned = capsys.readouterr().err
    assert "not caching the encoded data" in warned and "set SHARDTUNE_CACHE to a writable folder" in warned
