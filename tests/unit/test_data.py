"""Readers, splits, sharding of examples across ranks, and the classification task's encoding."""

from __future__ import annotations

import json

import pytest

from shardtune.data import read_rows, sample, split_train_validation
from shardtune.data.pipeline import epoch_micro_batches, eval_shard
from shardtune.errors import DataError
from shardtune.recipe import DataSource, validate_recipe
from shardtune.tasks import get_task


def src(path, **kw):
    return DataSource(path=str(path), **kw)


def test_formats_read_the_same_rows(tmp_path):
    rows = [{"text": "a b", "label": "x"}, {"text": "c, \"d\"", "label": "y"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "d.csv").write_text('text,label\na b,x\n"c, ""d""",y\n')
    (tmp_path / "d.tsv").write_text("text\tlabel\na b\tx\nc, \"d\"\ty\n")
    for name in ("d.jsonl", "d.json", "d.csv", "d.tsv"):
        assert [r.values for r in read_rows(src(tmp_path / name))] == rows, name


def test_headerless_tsv_with_column_names(tmp_path):
    (tmp_path / "d.tsv").write_text("1\tgood film\n0\tbad film\n")
    rows = read_rows(src(tmp_path / "d.tsv", header=False, column_names=["label", "sentence"]))
    assert rows[1].values == {"label": "0", "sentence": "bad film"}
    assert rows[1].where.endswith("d.tsv:2")


def test_textdir(tmp_path):
    for label, texts in {"sport": ["goal", "match"], "tech": ["chip"]}.items():
        (tmp_path / label).mkdir()
        for i, text in enumerate(texts):
            (tmp_path / label / f"{i}.txt").write_text(text + "\n")
    (tmp_path / "tech" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    rows = read_rows(src(tmp_path, format="textdir"))
    assert [(r.values["label"], r.values["text"]) for r in rows] == [
        ("sport", "goal"), ("sport", "match"), ("tech", "chip"), ("tech", "café")]


@pytest.mark.parametrize("name,content,fragment", [
    ("bad.jsonl", '{"text": "a"}\n{"text": \n', "bad.jsonl:2: not a JSON object"),
    ("list.jsonl", '[1, 2]\n', "list.jsonl:1: expected a JSON object, got list"),
    ("bad.json", '{"text": }', "bad.json:1: not valid JSON"),
    ("scalar.json", '3', "expected a list of objects"),
    ("ragged.csv", "text,label\na,b\nc\n", "ragged.csv:3: 1 fields, expected 2"),
    ("dup.csv", "text,text\na,b\n", "repeated column names"),
    ("empty.jsonl", "\n\n", "holds no examples"),
])
def test_malformed_files_name_the_line(tmp_path, name, content, fragment):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        read_rows(src(tmp_path / name))


def test_split_is_seeded_and_disjoint():
    rows = list(range(100))
    train, val = split_train_validation(rows, 0.2, seed=7)
    assert len(val) == 20 and sorted(train + val) == rows
    assert split_train_validation(rows, 0.2, seed=7) == (train, val)
    assert split_train_validation(rows, 0.2, seed=8)[1] != val


def test_sample_keeps_order():
    assert sample(list(range(10)), None, 0) == list(range(10))
    picked = sample(list(range(100)), 10, 3)
    assert len(picked) == 10 and picked == sorted(picked) and picked == sample(list(range(100)), 10, 3)


@pytest.mark.parametrize("n,world,micro,accum", [(100, 2, 8, 1), (101, 2, 8, 3), (37, 4, 5, 2), (16, 1, 16, 1)])
def test_every_rank_gets_equal_disjoint_micro_batches(n, world, micro, accum):
    shards = [epoch_micro_batches(n, world, r, micro, accum, seed=1, epoch=0) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) % accum == 0
    seen = [i for s in shards for batch in s for i in batch]
    assert len(seen) == len(set(seen))  # no example twice in an epoch
    assert epoch_micro_batches(n, world, 0, micro, accum, 1, 1) != shards[0]  # reshuffled per epoch


@pytest.mark.parametrize("n,micro", [(320, 8), (101, 4), (37, 2)])
def test_each_step_trains_on_the_same_examples_whatever_the_world(n, micro):
    """2 workers x 2 accumulation, 4 x 1 and 1 x 4: one global batch of 4 micro-batches, and
    step s holds the same examples in each (what lets a run resume on another world size)."""
    def steps(world, accum):
        shards = [epoch_micro_batches(n, world, r, micro, accum, seed=3, epoch=2) for r in range(world)]
        return [sorted(i for shard in shards for batch in shard[s * accum:(s + 1) * accum] for i in batch)
                for s in range(len(shards[0]) // accum)]

    full = n // (4 * micro)
    assert steps(2, 2)[:full] == steps(4, 1)[:full] == steps(1, 4)[:full]
    assert len(steps(2, 2)) >= full


@pytest.mark.parametrize("n,world", [(10, 3), (2, 4), (9, 3)])
def test_eval_shards_cover_everything_equally(n, world):
    shards = [eval_shard(n, world, r) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert set().union(*map(set, shards)) == set(range(n))


# ---------------------------------------------------------------- classification task
@pytest.fixture
def task_and_tokenizer(tiny_recipe):
    from transformers import AutoTokenizer

    recipe = validate_recipe(tiny_recipe)
    return get_task(recipe), AutoTokenizer.from_pretrained(recipe.model.path)


def rows_of(records):
    from shardtune.data import Row

    return [Row(r, f"f.jsonl:{i + 1}") for i, r in enumerate(records)]


def test_labels_inferred_sorted_and_encoded(task_and_tokenizer):
    task, tok = task_and_tokenizer
    rows = rows_of([{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"}])
    task.fit_labels(rows)
    assert task.labels == ["neg", "pos"]
    examples = task.encode(rows, tok)
    assert [e.target for e in examples] == [1, 0]
    ids = tok("good film")["input_ids"]
    assert examples[0].features["input_ids"] == ids and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id


def test_numeric_labels_sort_numerically(task_and_tokenizer):
    task, _ = task_and_tokenizer
    task.fit_labels(rows_of([{"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": 2.0}]))
    assert task.labels == ["2", "10"]


def test_pair_encoding(tiny_recipe):
    from transformers import AutoTokenizer

    tiny_recipe["data"]["columns"] = {"text": "s1", "text_b": "s2", "label": "y"}
    recipe = validate_recipe(tiny_recipe)
    task, tok = get_task(recipe), AutoTokenizer.from_pretrained(recipe.model.path)
    rows = rows_of([{"s1": "good film", "s2": "bad plot", "y": 1}, {"s1": "a", "s2": "b", "y": 0}])
    task.fit_labels(rows)
    example = task.encode(rows, tok)[0]
    assert example.features["input_ids"] == tok("good film", "bad plot")["input_ids"]
    assert 1 in example.features["token_type_ids"]


@pytest.mark.parametrize("record,fragment", [
    ({"label": "pos"}, "f.jsonl:2: no column 'text'"),
    ({"text": "  ", "label": "pos"}, "f.jsonl:2: column 'text' is empty"),
    ({"text": "ok"}, "f.jsonl:2: no label in column 'label'"),
    ({"text": "ok", "label": "meh"}, "f.jsonl:2: label 'meh' is not one of the task's labels"),
])
def test_bad_rows_name_file_line_and_problem(task_and_tokenizer, record, fragment):
    task, tok = task_and_tokenizer
    task.labels = ["neg", "pos"]
    with pytest.raises(DataError, match=fragment):
        task.encode(rows_of([{"text": "fine", "label": "neg"}, record]), tok)


def test_single_label_training_data_is_refused(task_and_tokenizer):
    task, _ = task_and_tokenizer
    with pytest.raises(DataError, match="1 distinct label"):
        task.fit_labels(rows_of([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}]))


# ------------------------------------------------------------------ data.on_bad_row: skip
@pytest.mark.parametrize("name,content,kept,fragment", [
    ("bad.jsonl", '{"text": "a"}\n{"text": \n{"text": "b"}\n', 2, "bad.jsonl:2: not a JSON object"),
    ("ragged.csv", "text,label\na,b\nc\nd,e\n", 2, "ragged.csv:3: 1 fields"),
    ("tags.txt", "a###B-X b###O\nc##O\nd###O\n", 2, "tags.txt:2: 'c##O' is not word###TAG"),
    ("tags.conll", "a O\nb B-X\n\nc\nd O\n\ne O\n", 2, "tags.conll:4: expected a token and a tag"),
])
def test_skip_mode_leaves_out_bad_lines_and_records_them(tmp_path, name, content, kept, fragment):
    (tmp_path / name).write_text(content)
    fmt = {"tags.txt": "wordtag", "tags.conll": "conll"}.get(name)
    source = src(tmp_path / name, format=fmt) if fmt else src(tmp_path / name)
    with pytest.raises(DataError, match=fragment):
        read_rows(source)  # the default: the first bad line stops the run
    bad: list[str] = []
    rows = read_rows(source, bad)
    assert len(rows) == kept and len(bad) == 1 and fragment in bad[0]


def test_conll_skips_the_whole_sentence_of_a_bad_line(tmp_path):
    (tmp_path / "t.conll").write_text("a O\nb B-X\n\nc\nd O\n\ne O\n")
    bad: list[str] = []
    rows = read_rows(src(tmp_path / "t.conll", format="conll"), bad)
    assert [r.values["tokens"] for r in rows] == [["a", "b"], ["e"]]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_load_data_skips_rows_that_do_not_fit_the_task_and_counts_them(tiny_recipe, tmp_path):
    from transformers import AutoTokenizer

    from shardtune.data.pipeline import load_data

    good = [{"text": f"good film {i}", "label": "pos"} for i in range(10)] + \
           [{"text": f"bad film {i}", "label": "neg"} for i in range(10)]
    bad = [{"text": "", "label": "pos"}, {"label": "neg"}, {"text": "no label"}]
    train = _write_jsonl(tmp_path / "train.jsonl", good + bad)
    val = _write_jsonl(tmp_path / "val.jsonl", good[:4] + [{"text": "x", "label": "meh"}])
    tiny_recipe["data"].update(train=str(train), validation=str(val))
    tiny_recipe["task"]["labels"] = ["neg", "pos"]
    recipe = validate_recipe(tiny_recipe)
    tok = AutoTokenizer.from_pretrained(recipe.model.path)
    with pytest.raises(DataError, match=r"train.jsonl:2[123]: "):  # the default stops at a bad row
        load_data(recipe, get_task(recipe), tok)

    tiny_recipe["data"]["on_bad_row"] = "skip"
    recipe = validate_recipe(tiny_recipe)
    data = load_data(recipe, get_task(recipe), tok)
    assert data.skipped == {"train": 3, "validation": 1}
    assert len(data.train_examples) == 20 and len(data.val_examples) == 4
    assert any("label 'meh' is not one of" in p for p in data.problems)


def test_skip_mode_still_refuses_a_file_that_is_mostly_bad(tiny_recipe, tmp_path):
    from transformers import AutoTokenizer

    from shardtune.data.pipeline import load_data

    # Labels in the wrong column: every row lacks one; skipping would silently train on nothing.
    train = _write_jsonl(tmp_path / "train.jsonl", [{"text": f"t {i}", "y": "pos"} for i in range(10)])
    tiny_recipe["data"].update(train=str(train), on_bad_row="skip")
    tiny_recipe["task"]["labels"] = ["neg", "pos"]
    recipe = validate_recipe(tiny_recipe)
    with pytest.raises(DataError, match="rows do not fit the task, so the file is probably not"):
        load_data(recipe, get_task(recipe), AutoTokenizer.from_pretrained(recipe.model.path))
