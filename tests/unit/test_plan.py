"""`shardtune plan`: the memory arithmetic against hand-computed cases, the choices it
weighs and recommends, its counts against the real model's, and the command."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import write_recipe
from matrix_cells import cell_recipe
from shardtune import compat
from shardtune.cli import app
from shardtune.errors import RecipeError
from shardtune.plan import Choice, Counts, estimate, model_counts, parse_memory, plan
from shardtune.recipe import validate_recipe

FAKE = {"bert": "/nowhere/bert", "llama": "/nowhere/llama", "t5": "/nowhere/t5",
        **{family: f"/nowhere/{family}.jsonl" for family in compat.FAMILIES}, "qa": "/nowhere/qa.json"}
COUNTS = Counts(frozen=1_000_000, quantised=0, quantised_rows=0, trainable=10_000, adapter_inputs=0, layers=2,
                hidden=8, kv_hidden=4, intermediate=16, heads=2, vocabulary=100, generates_tokens=True,
                gated_mlp=True)


def recipe(quant="none", zero=2, precision="fp32", micro=4, length=10, **extra):
    raw = cell_recipe(FAKE, Path("/nowhere/out"), method="lora", quant=quant, zero=zero, family="causal_lm")
    raw["sharding"]["precision"] = precision
    raw["train"]["micro_batch_size"] = micro
    raw["data"]["max_length"] = length
    for section, values in extra.items():
        raw.setdefault(section, {}).update(values)
    return validate_recipe(raw, check_files=False)


def test_fp32_zero0_by_hand():
    parts = estimate(COUNTS, recipe(zero=0), Choice(0, False, False, False), workers=2, on_gpu=True)
    tokens = 4 * 10
    assert parts["frozen_weights"] == 1_000_000 * 4
    assert parts["trainable_weights"] == parts["gradients"] == 10_000 * 4
    assert parts["optimizer"] == 10_000 * 8  # two fp32 moments; no master copy in fp32
    per_layer = 4 * 8 + 2 * 4 + 3 * 16  # norms + q/k/v/out, SwiGLU's gate, up and activation
    assert parts["activations"] == tokens * 4 * 2 * per_layer
    assert parts["logits"] == tokens * 100 * (2 * 4 + 8)
    model = sum(v for k, v in parts.items() if k != "framework")
    assert parts["framework"] == pytest.approx(0.05 * model)


def test_zero_stages_divide_what_they_partition():
    big = Counts(**{**COUNTS.__dict__, "frozen": 10**9 - 10_000, "layers": 100})
    r2 = estimate(big, recipe(zero=2), Choice(2, False, False, False), workers=4, on_gpu=True)
    r3 = estimate(big, recipe(zero=3), Choice(3, False, False, False), workers=4, on_gpu=True)
    assert r2["frozen_weights"] == 4 * (10**9 - 10_000)
    # A quarter of the backbone, plus two of its 100 layers gathered at a time.
    assert r3["frozen_weights"] == 4 * (10**9 - 10_000) / 4 + 2 * 10**7 * 4
    assert r2["gradients"] == r3["gradients"] == 10_000 * 4 / 4
    assert r3["trainable_weights"] == 10_000 * 4  # an adapter stays whole under ZeRO-3
    offloaded = estimate(COUNTS, recipe(zero=3), Choice(3, True, True, False), workers=4, on_gpu=True)
    assert offloaded["optimizer"] == offloaded["frozen_weights"] == 0  # in host memory


def test_bf16_adds_fp32_master_weights_and_gradients():
    parts = estimate(COUNTS, recipe(precision="bf16", zero=2), Choice(2, False, False, False), workers=2,
                     on_gpu=True)
    assert parts["frozen_weights"] == 1_000_000 * 2
    assert parts["optimizer"] == 10_000 * (8 + 4) / 2
    assert parts["gradients"] == 10_000 * 2 / 2 + 10_000 * 4 / 2


@pytest.mark.parametrize("mode, double, per_weight", [("nf4", False, 0.5 + 4 / 64),
                                                      ("nf4", True, 0.5 + 1 / 64 + 4 / (64 * 256)),
                                                      ("int8", False, 1.0)])
def test_quantised_weights_by_hand(mode, double, per_weight):
    counts = Counts(**{**COUNTS.__dict__, "frozen": 0, "quantised": 1_000_000, "quantised_rows": 1000})
    r = recipe(quant=mode, **({"quantization": {"double_quant": True}} if double else {}))
    parts = estimate(counts, r, Choice(2, False, False, False), workers=2, on_gpu=True)
    rows = 4 * 1000 if mode == "int8" else 0
    assert parts["frozen_weights"] == pytest.approx(1_000_000 * per_weight + rows)


def test_checkpointing_keeps_one_layers_activations_and_every_layers_input():
    counts = Counts(**{**COUNTS.__dict__, "layers": 10})
    r = recipe(zero=2)
    plain = estimate(counts, r, Choice(2, False, False, False), workers=2, on_gpu=True)["activations"]
    checkpointed = estimate(counts, r, Choice(2, False, False, True), workers=2, on_gpu=True)["activations"]
    per_layer = 4 * 8 + 2 * 4 + 3 * 16
    assert plain == 40 * 4 * 10 * per_layer and checkpointed == 40 * 4 * (10 * 8 + per_layer)


def test_the_recommendation_is_the_cheapest_choice_that_fits():
    r = recipe(zero=0, micro=64, length=512)
    everything = plan(r, COUNTS, workers=2, on_gpu=True)
    sizes = {row["choice"]: row["predicted_peak_mb_per_worker"] for row in [everything["as_written"],
                                                                         *everything["options"]]}
    limit = sizes["ZeRO-0, checkpointing"] + 0.1  # only checkpointing gets under it
    assert sizes["ZeRO-3, optimizer offload, parameter offload, no checkpointing"] > limit
    chosen = plan(r, COUNTS, workers=2, gpu_memory_mb=limit, on_gpu=True)
    assert chosen["recommended"] == "ZeRO-0, checkpointing"
    assert plan(r, COUNTS, workers=2, gpu_memory_mb=1.0, on_gpu=True)["recommended"] is None
    assert everything["predicted_peak_mb_per_worker"] == everything["as_written"]["predicted_peak_mb_per_worker"]


@pytest.mark.parametrize("text, mb", [("80GB", 81920), ("24G", 24576), ("49152MB", 49152), ("141GiB", 144384),
                                      ("1.5T", 1.5 * 1024 * 1024)])
def test_memory_sizes(text, mb):
    assert parse_memory(text) == mb


@pytest.mark.parametrize("text", ["80", "eighty GB", "80 PB", ""])
def test_a_memory_size_it_cannot_read_is_refused(text):
    with pytest.raises(RecipeError, match="give a size such as 80GB"):
        parse_memory(text)


def test_the_meta_model_counts_equal_the_real_models(tiny_llama):
    """Counted without reading a weight, as the real run counts them after loading."""
    from transformers import AutoTokenizer

    from shardtune import backbone
    from shardtune.adapters import apply_adapter
    from shardtune.tasks import get_task

    raw = cell_recipe({**FAKE, "llama": str(tiny_llama)}, Path("/nowhere/out"), method="lora", quant="none", zero=2,
                      family="causal_lm")
    r = validate_recipe(raw, check_files=False)
    counts = model_counts(r)
    task = get_task(r)
    model = apply_adapter(backbone.load_model(r, task, AutoTokenizer.from_pretrained(tiny_llama)), r, task)
    trainable, total = backbone.count_parameters(model)
    assert (counts.trainable, counts.frozen + counts.quantised) == (trainable, total - trainable)
    config = model.config
    assert (counts.layers, counts.hidden, counts.vocabulary) == (config.num_hidden_layers, config.hidden_size,
                                                                 config.vocab_size)
    assert counts.gated_mlp and counts.generates_tokens
    assert counts.adapter_inputs == 2 * config.num_hidden_layers * config.hidden_size  # q_proj and v_proj inputs


def test_plan_json_and_table(tiny_recipe, tmp_path):
    cli = CliRunner()
    path = write_recipe(tmp_path / "r.yaml", copy.deepcopy(tiny_recipe))
    result = cli.invoke(app, ["plan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    planned = json.loads(result.stdout)
    assert planned["predicted_peak_mb_per_worker"] > 600 and planned["device"] == "cpu"
    assert len(planned["options"]) >= 10
    result = cli.invoke(app, ["plan", str(path), "--gpus-per-node", "8", "--gpu-memory", "80GB"])
    assert result.exit_code == 0 and "recommended: ZeRO-0, no checkpointing" in result.output, result.output
    result = cli.invoke(app, ["plan", str(path), "--gpu-memory", "lots"])
    assert result.exit_code == 2 and "give a size such as 80GB" in result.output
