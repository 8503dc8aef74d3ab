"""Recipe -> DeepSpeed config mapping."""

from __future__ import annotations

import pytest

from shardtune.recipe import validate_recipe
from shardtune.sharding import deepspeed_config


def config_for(tiny_recipe, world=2, **sections):
    raw = {**tiny_recipe}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return deepspeed_config(validate_recipe(raw), world)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_and_batch_sizes(tiny_recipe, stage):
    cfg = config_for(tiny_recipe, world=4, sharding={"zero_stage": stage},
                     train={"micro_batch_size": 8, "gradient_accumulation_steps": 3, "max_grad_norm": 0.5})
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 8 * 3 * 4
    assert cfg["gradient_clipping"] == 0.5
    assert "optimizer" not in cfg and "scheduler" not in cfg  # torch objects: nothing to compile
    assert ("stage3_gather_16bit_weights_on_model_save" in cfg["zero_optimization"]) == (stage == 3)


def test_offload(tiny_recipe):
    cfg = config_for(tiny_recipe, sharding={"zero_stage": 3, "offload_optimizer": True, "offload_params": True})
    zero = cfg["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    assert cfg["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize("precision,bf16,fp16", [("fp32", False, False), ("bf16", True, False)])
def test_precision(tiny_recipe, precision, bf16, fp16):
    cfg = config_for(tiny_recipe, sharding={"precision": precision})
    assert (cfg["bf16"]["enabled"], cfg["fp16"]["enabled"]) == (bf16, fp16)


def test_fp16_on_gpus(tiny_recipe):
    cfg = config_for(tiny_recipe, sharding={"precision": "fp16"}, cluster={"gpus_per_worker": 1})
    assert cfg["fp16"]["enabled"] and cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling
