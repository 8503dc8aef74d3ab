"""Shared fixtures: offline environment, tiny models built once per session, one Ray instance."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS = Path(__file__).parent
ROOT = TESTS.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(TESTS))

import tiny_models  # noqa: E402
from helpers import make_tiny_recipe  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (about 20 more minutes)")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow are deselected unless --slow: the suite stays inside CI's time."""
    if config.getoption("--slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return tiny_models.build_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def sentiment_data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    return {
        "train": tiny_models.write_jsonl(folder / "train.jsonl", tiny_models.sentiment_rows(400, seed=1)),
        "test": tiny_models.write_jsonl(folder / "test.jsonl", tiny_models.sentiment_rows(60, seed=2)),
    }


@pytest.fixture
def tiny_recipe(tiny_bert, sentiment_data, tmp_path):
    """A raw recipe dict for the tiny model and data; tests change what they need."""
    return make_tiny_recipe(tiny_bert, sentiment_data, tmp_path / "run")


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray instance for every test that trains; shardtune reuses it."""
    import ray

    from shardtune.raycluster import start_embedded_cluster

    start_embedded_cluster(num_cpus=4, log_to_driver=True, configure_logging=False)
    yield
    ray.shutdown()  # this process's cluster only; never `ray stop`


@pytest.fixture(scope="session")
def reference_run(ray_session, tiny_bert, sentiment_data, tmp_path_factory) -> Path:
    """An uninterrupted 5-epoch run of the tiny recipe, which stopped, killed and resumed runs
    (test_interrupts, test_fault_tolerance) must end equal to."""
    from shardtune.orchestrate import run
    from shardtune.recipe import validate_recipe

    raw = make_tiny_recipe(tiny_bert, sentiment_data, tmp_path_factory.mktemp("reference") / "run")
    raw["train"].update(epochs=5, log_every_steps=5)
    return run(validate_recipe(raw)).output_dir


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_models.build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_llama_chat(tmp_path_factory) -> Path:
    return tiny_models.build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-chat", chat_template=True)


@pytest.fixture(scope="session")
def tiny_masked_lm(tmp_path_factory) -> Path:
    return tiny_models.build_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert-mlm", masked_lm=True)


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return tiny_models.build_tiny_t5(tmp_path_factory.mktemp("models") / "tiny-t5")
