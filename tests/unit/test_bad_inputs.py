"""Hostile and broken inputs, as a table: every bad data file and recipe value is refused with
the file:line (or field) and the fix, never a traceback; in skip mode a bad row is counted and
the good ones kept. Each row was a traceback or a silent acceptance before."""

from __future__ import annotations

import copy
import json

import pytest
from typer.testing import CliRunner

from shardtune.cli import app
from shardtune.data import read_rows
from shardtune.errors import DataError, RecipeError
from shardtune.recipe import DataSource, validate_recipe

GOOD = {"jsonl": b'{"text": "a good film", "label": "pos"}\n', "tsv": b"pos\ta good film\n",
        "csv": b"pos,a good film\n", "conll": b"good\tO\nfilm\tO\n\n", "wordtag": b"good###O film###O\n"}
COLUMNS = {"tsv": ["label", "text"], "csv": ["label", "text"]}


def _source(path, fmt):
    return DataSource(path=str(path), format=fmt, header=False if fmt in COLUMNS else True,
                      column_names=COLUMNS.get(fmt))


# (case, format, the bad line's bytes, fragment of the message)
BAD_LINES = [
    ("invalid UTF-8 in jsonl", "jsonl", b'{"text": "caf\xe9", "label": "pos"}\n', ":2: not valid UTF-8 (byte 0xe9"),
    ("invalid UTF-8 in tsv", "tsv", b"pos\tcaf\xe9 \xff\n", ":2: not valid UTF-8 (byte 0xe9"),
    ("invalid UTF-8 in csv", "csv", b"pos,caf\xe9\n", ":2: not valid UTF-8"),
    ("invalid UTF-8 in conll", "conll", b"caf\xe9\tO\n\n", ":4: not valid UTF-8"),
    ("invalid UTF-8 in wordtag", "wordtag", b"caf\xe9###O\n", ":2: not valid UTF-8"),
    ("NUL byte in jsonl", "jsonl", b'{"text": "a\\u0000b", "label": "pos"}\n', "contains a NUL byte"),
    ("NUL byte in tsv", "tsv", b"pos\ta\x00b\n", "contains a NUL byte"),
    ("unclosed csv quote", "csv", b'pos,"never "closed\n', "is a quote never closed?"),
    ("a 2 MB line", "tsv", b"pos\t" + b"word " * 400_000 + b"\n", "over data.max_chars (1,000,000)"),
]


@pytest.mark.parametrize("case,fmt,line,fragment", BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_a_bad_line_is_named_or_skipped(tmp_path, case, fmt, line, fragment):
    path = tmp_path / f"data.{fmt}"
    path.write_bytes(GOOD[fmt] + line + GOOD[fmt] * 3)
    with pytest.raises(DataError) as info:
        read_rows(_source(path, fmt), max_chars=1_000_000)
    assert fragment in info.value.render() and str(path) in info.value.render(), info.value.render()
    bad: list[str] = []
    rows = read_rows(_source(path, fmt), bad, max_chars=1_000_000)
    assert len(bad) == 1 and fragment in bad[0]
    assert len(rows) == 4 if fmt != "conll" else len(rows) >= 2


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_a_field_over_csvs_128_kib_limit_is_read(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    sep = b"," if fmt == "csv" else b"\t"
    path.write_bytes(b"pos" + sep + b"x" * 140_000 + b"\n")
    assert len(read_rows(_source(path, fmt), max_chars=1_000_000)[0].values["text"]) == 140_000


@pytest.mark.parametrize("fmt", ["json", "squad"])
def test_invalid_utf8_in_a_whole_file_format_names_the_line(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    path.write_bytes(b'{"data": [\n{"text": "caf\xe9"}]}')
    with pytest.raises(DataError, match=r":2: not valid UTF-8 \(byte 0xe9\)"):
        read_rows(DataSource(path=str(path), format=fmt))


def test_a_bom_is_not_part_of_a_column_name_label_or_token(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "h.tsv").write_bytes(bom + b"label\tsentence\npos\tgood\n")
    assert read_rows(DataSource(path=str(tmp_path / "h.tsv")))[0].values == {"label": "pos", "sentence": "good"}
    (tmp_path / "n.tsv").write_bytes(bom + b"pos\tgood\n")
    rows = read_rows(DataSource(path=str(tmp_path / "n.tsv"), header=False, column_names=["label", "text"]))
    assert rows[0].values["label"] == "pos"
    (tmp_path / "t.conll").write_bytes(bom + b"Paris\tB-LOC\n\n")
    assert read_rows(DataSource(path=str(tmp_path / "t.conll"), format="conll"))[0].values["tokens"] == ["Paris"]
    (tmp_path / "j.jsonl").write_bytes(bom + GOOD["jsonl"])
    assert read_rows(DataSource(path=str(tmp_path / "j.jsonl")))[0].values["label"] == "pos"


def _squad(tmp_path, data) -> str:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"data": data}))
    return str(path)


GOOD_QA = {"id": "q", "question": "who?", "answers": [{"text": "me", "answer_start": 0}]}
BAD_SQUAD = [
    ("an article that is not an object", ["text"], "#data[1]: expected a JSON object, got str"),
    ("paragraphs that are not a list", [{"paragraphs": "x"}], "data[1].paragraphs: expected a list"),
    ("a paragraph that is not an object", [{"paragraphs": [3]}], "paragraphs[0]: expected a JSON object, got int"),
    ("a qa that is not an object", [{"paragraphs": [{"context": "me", "qas": ["q"]}]}],
     "qas[0]: expected a JSON object, got str"),
    ("a question without answers", [{"paragraphs": [{"context": "me", "qas": [{"id": "1", "question": "who?"}]}]}],
     "no 'answers'; give its answers, or \"is_impossible\": true"),
    ("answers that are not spans", [{"paragraphs": [{"context": "me", "qas": [{**GOOD_QA, "answers": ["me"]}]}]}],
     "'answers' must be a list of"),
]


@pytest.mark.parametrize("case,data,fragment", BAD_SQUAD, ids=[c[0] for c in BAD_SQUAD])
def test_a_malformed_squad_file_is_named(tmp_path, case, data, fragment):
    good = {"paragraphs": [{"context": "me and you", "qas": [GOOD_QA]}]}
    path = _squad(tmp_path, [good, *data])
    with pytest.raises(DataError) as info:
        read_rows(DataSource(path=path, format="squad"))
    assert fragment in info.value.render(), info.value.render()
    bad: list[str] = []
    assert len(read_rows(DataSource(path=path, format="squad"), bad)) == 1 and len(bad) == 1


def test_an_impossible_question_needs_no_answers(tmp_path):
    qa = {"id": "1", "question": "who?", "is_impossible": True}
    rows = read_rows(DataSource(path=_squad(tmp_path, [{"paragraphs": [{"context": "me", "qas": [qa]}]}]),
                                format="squad"))
    assert rows[0].values["answers"] == [] and rows[0].values["is_impossible"]


def test_an_empty_file_says_so(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        read_rows(DataSource(path=str(tmp_path / "e.jsonl")))


# ------------------------------------------------------------------------- recipes
BAD_VALUES = [
    # (case, section, key, value, fragment)
    ("a seed of 1e26", "train", "seed", 1e26, "train.seed"),
    ("a negative seed", "train", "seed", -1, "train.seed: input should be greater than or equal to 0"),
    ("infinite CPUs", "cluster", "cpus_per_worker", float("inf"), "cluster.cpus_per_worker: input should be a finite"),
    ("a micro-batch of 1e30", "train", "micro_batch_size", 1e30, "train.micro_batch_size"),
    ("infinite alpha", "adapter", "alpha", float("inf"), "adapter.alpha: input should be a finite number"),
    ("nan and 5 as betas", "train", "adam_betas", [float("nan"), 5],
     "train.adam_betas.0: input should be a finite number"),
    ("a learning rate of nan", "train", "learning_rate", float("nan"), "train.learning_rate: input should be a finite"),
]


@pytest.mark.parametrize("case,section,key,value,fragment", BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_a_value_no_run_can_use_is_refused(tiny_recipe, case, section, key, value, fragment):
    raw = copy.deepcopy(tiny_recipe)
    raw.setdefault(section, {})[key] = value
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw)
    assert fragment in info.value.render(), info.value.render()


BAD_FILES = [
    ("an alias bomb", ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))).encode(),
     "more than 20 YAML aliases"),
    ("a file of megabytes", b"# " + b"x" * 1_100_000 + b"\n", "a recipe is a few kB of YAML"),
    ("not UTF-8", b"model: {path: caf\xe9}\n", "not UTF-8 text"),
    ("markup in a value", b"model: {path: '[/red] [bold]x'}\ndata: {train: 'a[/b].jsonl'}\noutput: {dir: /tmp/o}\n",
     "a[/b].jsonl"),
]


@pytest.mark.parametrize("case,content,fragment", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_a_bad_recipe_file_fails_fast_and_clearly(tmp_path, case, content, fragment):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert "Traceback" not in result.output and len(result.output) < 5_000


def test_a_model_path_that_is_not_a_model_folder_is_refused(tiny_recipe, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    for path, fragment in ((tmp_path / "weights.bin", "is a file; give the model's folder"),
                           (tmp_path / "empty", "has no config.json")):
        raw = copy.deepcopy(tiny_recipe)
        raw["model"]["path"] = str(path)
        with pytest.raises(RecipeError, match=fragment):
            validate_recipe(raw)


def test_more_workers_than_this_machine_has_is_refused_before_anything_starts(tiny_recipe, tmp_path):
    import os

    from shardtune.orchestrate import run

    raw = copy.deepcopy(tiny_recipe)
    raw["cluster"]["workers"] = 4096
    with pytest.raises(RecipeError, match=f"embedded cluster runs on this machine's {os.cpu_count()}"):
        run(validate_recipe(raw))
    raw["cluster"].update(workers=1, gpus_per_worker=1)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="set cluster.gpus_per_worker: 0 to train on CPU"):
            run(validate_recipe(raw))
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()
