"""Recipe -> DeepSpeed configuration, and the DeepSpeed set-up that must happen first.

Everything DeepSpeed-specific about *configuration* lives here; the engine only
calls `deepspeed_config` and `prepare_deepspeed`.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager

from shardtune.recipe import Recipe

# Parameters at or below this many elements stay whole on every rank under ZeRO-3 when
# nothing larger trains (DeepSpeed's default is 1e5).
PERSISTENCE_FLOOR = 100_000


def deepspeed_config(recipe: Recipe, world_size: int, *, on_gpu: bool = False, keep_whole: int = 0,
                     live_parameters: int | None = None) -> dict:
    """The DeepSpeed config dict for a recipe and a world size.

    Batch sizes are explicit numbers: "auto" only works inside the HF Trainer. The
    optimizer and scheduler are torch objects handed to `deepspeed.initialize`, so
    the config names neither (naming one makes DeepSpeed compile FusedAdam/CPUAdam).
    `keep_whole`: the largest trainable parameter's size (see partitions.largest_trainable);
    `live_parameters`: how many gathered parameters ZeRO-3 may keep (partitions.live_parameters).
    """
    tr, sh = recipe.train, recipe.sharding
    zero: dict = {"stage": sh.zero_stage}
    if sh.zero_stage >= 1:
        # Overlapping gradient reduction with the backward pass needs CUDA streams.
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True)
    if sh.zero_stage >= 2:
        zero.update(reduce_scatter=True, allgather_partitions=True)
    if sh.zero_stage == 3:
        # Adapters are small and used every step: kept whole on every rank, they cost an 8 B
        # model's LoRA (r=16: 16 x 14336 = 229 k elements per MLP matrix) ~80 MB per rank
        # instead of an all-gather for each of hundreds of matrices per forward and backward.
        zero.update(stage3_param_persistence_threshold=max(PERSISTENCE_FLOOR, keep_whole),
                    stage3_gather_16bit_weights_on_model_save=True)
        if live_parameters is not None:
            # DeepSpeed keeps up to 1e9 gathered parameters alive, and keeps a layer's gathered
            # between its forward and backward if less than 1e9 are used in between: for a
            # model under ~1 B parameters per rank that is the whole model, gathered on every
            # rank, and ZeRO-3 would save nothing.
            zero.update(stage3_max_live_parameters=live_parameters, stage3_max_reuse_distance=live_parameters)
    if sh.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if sh.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}

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


# ------------------------------------------------------------ ZeRO-3 partitioned models
@contextmanager
def partitioned_loading(recipe: Recipe, world_size: int):
    """Under ZeRO-3, build the model partitioned: with DeepSpeed's config registered
    (HfDeepSpeedConfig), transformers creates the weights inside `deepspeed.zero.Init`, so
    each rank allocates only its 1/world slice, and loads the checkpoint into them; no
    rank ever holds the whole unquantised model. The registration stays alive while the
    adapter is applied (peft gathers base weights for PiSSA-style initialisation when it
    sees ZeRO-3) and is removed afterwards, so that a later load in the same process
    (evaluation, the next run of a test group) is not partitioned by accident.

    Quantised backbones are not partitioned while loading (transformers loads 4- and 8-bit
    models whole on each rank's own device; they are a quarter of the size); DeepSpeed
    partitions their float parameters at initialize.
    """
    from shardtune import quantization

    if recipe.sharding.zero_stage != 3 or quantization.is_quantized(recipe):
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    registered = HfDeepSpeedConfig(deepspeed_config(recipe, world_size))  # transformers keeps a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del registered
