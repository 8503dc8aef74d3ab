"""`shardtune sweep`'s answers that need no cluster: the search space validated like a
recipe (one table of bad spaces, each refused with the field and the fix), the shipped
spaces, and the --out / --resume rules. The sweeps themselves: tests/integration/test_sweep.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from shardtune.cli import app
from shardtune.errors import RecipeError, RunError
from shardtune.recipe import load_raw, validate_recipe
from shardtune.sweep import prepare
from shardtune.sweepspace import check_space, load_space

cli = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def recipe_file(tiny_recipe, tmp_path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    return path


def _space(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


# Each bad space: (its body or --grid arguments, a piece of the message that names the fix).
BAD_SPACES = [
    ({"parameters": {"train.learnin_rate": {"grid": [1e-3]}}}, "did you mean 'learning_rate'"),
    ({"parameters": {"trian.epochs": {"grid": [1]}}}, "trian"),
    ({"parameters": {"train.epochs": {"uniform": [1, 4]}}}, "use choice or grid for whole numbers"),
    ({"parameters": {"train.learning_rate": {"loguniform": [0, 1e-3]}}}, "loguniform's low end must be above 0"),
    ({"parameters": {"train.learning_rate": {"uniform": [1e-3, 1e-4]}}}, "low < high"),
    ({"parameters": {"train.learning_rate": {"grid": [1e-3], "choice": [1e-4]}}}, "exactly one of"),
    ({"parameters": {"train.learning_rate": {"range": [1, 2]}}}, "range"),
    ({"parameters": {"train.learning_rate": {"grid": [-1.0]}}}, "parameters.train.learning_rate = -1.0"),
    ({"parameters": {"adapter.r": {"choice": [8, 0]}}}, "parameters.adapter.r = 0"),
    ({"parameters": {"output.dir": {"grid": ["a", "b"]}}}, "not sweepable"),
    ({"parameters": {"train.epochs": {"grid": [1]}}, "trails": 3}, "trails"),
    ({"parameters": {"train.epochs": {"grid": [1]}}, "scheduler": "hyperband"}, "scheduler"),
    ({"parameters": {}}, "nothing to sweep"),
    ({"parameters": ["train.epochs"]}, "parameters: a mapping"),
    (["--grid", "train.epochs=2"], "is a YAML list of the values to try"),
    (["--grid", "train.epochs"], "not of the form section.key=value"),
]


@pytest.mark.parametrize("space, fix", BAD_SPACES, ids=[fix for _, fix in BAD_SPACES])
def test_a_bad_space_is_refused_before_anything_starts(recipe_file, tmp_path, space, fix):
    args = space if isinstance(space, list) else ["--space", str(_space(tmp_path, space))]
    result = cli.invoke(app, ["sweep", str(recipe_file), *args, "--out", str(tmp_path / "sweep")])
    assert result.exit_code != 0
    assert fix in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "sweep").exists()  # nothing written


@pytest.mark.parametrize("space", sorted((ROOT / "recipes" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_space_fits_the_recipes_it_names(space):
    text = space.read_text()
    loaded = load_space(space, [])
    named = sorted({word for word in text.split() if word.startswith("recipes/") and word.endswith(".yaml")
                    and "/sweeps/" not in word})
    assert named, f"{space.name} names no recipe to sweep"
    for recipe in named:
        raw = load_raw(ROOT / recipe)
        check_space(loaded, raw, recipe)  # raises with the field if a swept key or value does not fit
        assert loaded.metric_and_mode(raw)[0] == loaded.metric


def test_the_metric_defaults_to_keep_best_by_then_the_loss(tiny_recipe):
    space = load_space(None, ["train.epochs=[1, 2]"])
    assert space.metric_and_mode(tiny_recipe) == ("loss", "min")
    tiny_recipe["output"]["keep_best_by"] = "accuracy"
    assert space.metric_and_mode(tiny_recipe) == ("accuracy", "max")
    assert load_space(None, ["train.epochs=[1]"], trials=4).trials == 4  # the command line over the file


def test_out_must_be_new_or_empty_and_resume_needs_the_same_sweep(tiny_recipe, tmp_path):
    base = validate_recipe(tiny_recipe)
    space = load_space(None, ["train.learning_rate=[0.01, 0.02]"])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not an empty folder"):
        prepare(tiny_recipe, base, space, taken, "recipe", resume=False)
    assert (taken / "notes.txt").read_text() == "mine"
    with pytest.raises(RunError, match="holds no sweep to continue"):
        prepare(tiny_recipe, base, space, tmp_path / "none", "recipe", resume=True)
    out = tmp_path / "sweep"
    prepare(tiny_recipe, base, space, out, "recipe", resume=False)
    assert json.loads((out / "sweep.json").read_text())["space"]["parameters"]
    with pytest.raises(RunError, match="holds a sweep already; continue it with --resume"):
        prepare(tiny_recipe, base, space, out, "recipe", resume=False)
    prepare(tiny_recipe, base, space, out, "recipe", resume=True)  # the same sweep: fine
    other = load_space(None, ["train.learning_rate=[0.05]"])
    with pytest.raises(RunError, match="the space differ"):
        prepare(tiny_recipe, base, other, out, "recipe", resume=True)
    for unsafe in ("/", str(Path.home())):
        with pytest.raises(RunError, match="--out"):
            prepare(tiny_recipe, base, space, Path(unsafe), "recipe", resume=False)


def test_a_range_over_a_float_field_and_a_choice_of_lists_are_accepted(tiny_recipe):
    space = load_space(None, ["adapter.target_modules=[[query], [query, value]]"])
    space.parameters.update(load_space(None, ["train.learning_rate=[0.01]"]).parameters)
    check_space(space, tiny_recipe, "recipe")
    with pytest.raises(RecipeError, match="adapter.target_modules"):
        check_space(load_space(None, ["adapter.target_modules=[[query], 7]"]), tiny_recipe, "recipe")
