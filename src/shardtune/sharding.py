"""Recipe -> DeepSpeed configuration, and the DeepSpeed set-up that must happen first.

Everything DeepSpeed-specific about *configuration* lives here; the engine only
calls `deepspeed_config` and `prepare_deepspeed`.
"""

from __future__ import annotations

import importlib

from shardtune.recipe import Recipe


def deepspeed_config(recipe: Recipe, world_size: int) -> dict:
    """The DeepSpeed config dict for a recipe and a world size.

    Batch sizes are explicit numbers: "auto" only works inside the HF Trainer. The
    optimizer and scheduler are torch objects handed to `deepspeed.initialize`, so
    the config names neither (naming one makes DeepSpeed compile FusedAdam/CPUAdam).
    """
    tr, sh = recipe.train, recipe.sharding
    zero: dict = {"stage": sh.zero_stage}
    if sh.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if sh.zero_stage >= 2:
        zero.update(reduce_scatter=True, allgather_partitions=True)
    if sh.zero_stage == 3:
        # Adapters are tiny; without this, every small LoRA matrix would be gathered on
        # each use. Parameters below the threshold stay whole on every rank.
        zero.update(stage3_param_persistence_threshold=10_000,
                    stage3_gather_16bit_weights_on_model_save=True)
    if sh.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": recipe.cluster.gpus_per_worker > 0}
    if sh.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": recipe.cluster.gpus_per_worker > 0}

    config = {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.gradient_accumulation_steps,
        "train_batch_size": tr.micro_batch_size * tr.gradient_accumulation_steps * world_size,
        "gradient_clipping": tr.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": sh.precision == "bf16"},
        "fp16": {"enabled": sh.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # shardtune prints its own progress
        "wall_clock_breakdown": False,
    }
    if sh.offload_optimizer:
        # A client (torch) optimizer with offload is allowed; DeepSpeed's CPU Adam would be
        # faster on large models but costs a ~3 minute compile on first use.
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def prepare_deepspeed() -> None:
    """Process-wide DeepSpeed set-up before `init_distributed`.

    DeepSpeed builds a shared-memory all-reduce op when its torch backend starts,
    which compiles C++ for ~85 s on a fresh machine and only speeds up CPU-only
    collectives. Training on CPU is for tests and small runs, so we skip it; gloo
    does the collectives. (Attribute access through the package yields the real
    `torch` module, hence importlib.)
    """
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None
