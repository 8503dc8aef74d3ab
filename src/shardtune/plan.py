"""`shardtune plan`: per-worker memory of a recipe, before anything is loaded.

The model is built on the meta device (no weights read) with the recipe's adapter, which
gives exact counts of frozen, quantised and trainable parameters; the config gives the
shapes that activations and logits follow. Per worker, in bytes (W workers, p bytes per
element of the training precision, d of the backbone's dtype):

  frozen weights    unquantised: N_frozen x d (ZeRO-3: / W, plus two layers gathered); 4-bit: 0.5 B per weight plus
                    one fp32 scale per 64 (double quantisation: 8-bit scales, fp32 per 256);
                    int8: 1 B per weight plus an fp32 scale per output row
  trainable         N_t x p; under ZeRO-3 an adapter stays whole (persistence threshold),
                    a fully fine-tuned model is partitioned
  gradients         N_t x p (ZeRO-2/3: / W), plus the fp32 gradient partition under bf16/fp16
  optimizer         AdamW's two fp32 moments, plus fp32 master weights under bf16/fp16
                    (ZeRO-1/2/3: / W; offloaded: in host memory, not on the GPU)
  activations       what autograd keeps per token and layer: the norms' inputs, q/k/v and the
                    attention output (sdpa keeps no score matrix; eager keeps heads x seq),
                    the MLP's gate, up and activation (frozen matmuls keep no inputs), plus a
                    LoRA branch's input per adapted module; with checkpointing only each
                    layer's input plus one layer's activations. Tokens: micro-batch x max_length
                    (the longest a batch can be)
  logits            causal LM and seq2seq: micro-batch x max_length x vocabulary x (2p + 8):
                    the logits, their fp32 copy in the loss, its softmax and its gradient
  framework         CPU: the worker process with torch, transformers, peft and DeepSpeed
                    imported (measured: ~600 MB); GPU: 5 % allocator fragmentation

On a CPU this predicts a worker's peak resident memory while training (the run summary's
peak_memory_mb_per_worker); on a GPU, the peak allocated memory (torch's max_memory_allocated).
Loading is not in it: the run summary reports its peak apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardtune.partitions import live_parameters
from shardtune.telemetry import config_dimensions, text_config

MB = 2**20
CPU_FRAMEWORK_MB = 600
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Counts:
    """What the memory follows from, read from the meta model and its config."""
    frozen: int            # frozen parameters kept in the backbone's dtype
    quantised: int         # frozen linear weights bitsandbytes would quantise
    quantised_rows: int    # their output rows (int8 keeps one scale per row)
    trainable: int
    adapter_inputs: int    # elements per token of the inputs LoRA branches keep (sum over adapted modules)
    layers: int
    hidden: int
    kv_hidden: int
    intermediate: int
    heads: int
    vocabulary: int
    generates_tokens: bool  # a vocabulary-sized output per position (causal LM, seq2seq)
    gated_mlp: bool         # SwiGLU-style MLP (gate and up projections)


@dataclass(frozen=True)
class Choice:
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    gradient_checkpointing: bool

    def label(self) -> str:
        parts = [f"ZeRO-{self.zero_stage}"]
        if self.offload_optimizer:
            parts.append("optimizer offload")
        if self.offload_params:
            parts.append("parameter offload")
        parts.append("checkpointing" if self.gradient_checkpointing else "no checkpointing")
        return ", ".join(parts)


def estimate(counts: Counts, recipe, choice: Choice, workers: int, on_gpu: bool) -> dict[str, float]:
    """Bytes per worker, by part, for one choice of sharding and checkpointing."""
    p = PRECISION_BYTES[recipe.sharding.precision]
    d = DTYPE_BYTES[recipe.model.dtype]
    z, w = choice.zero_stage, workers
    q = recipe.quantization
    full = counts.trainable > counts.frozen  # full fine-tuning trains the backbone itself

    frozen = counts.frozen * (p if z == 3 or p != d else d)  # DeepSpeed casts floats to the precision
    if z == 3:
        # A 1/W partition, plus the layers gathered at a time (partitions.live_parameters).
        total = counts.frozen + counts.quantised + counts.trainable
        frozen = frozen / w + min(live_parameters(total, counts.layers), counts.frozen) * p
    if q.mode in ("nf4", "fp4"):
        per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if q.double_quant else 4 / 64)
        frozen += counts.quantised * per_weight
    elif q.mode == "int8":
        frozen += counts.quantised + 4 * counts.quantised_rows
    if choice.offload_params and on_gpu:
        frozen = 0.0

    trainable = counts.trainable * p / (w if z == 3 and full else 1)
    gradients = counts.trainable * p / (w if z >= 2 else 1)
    optimizer = counts.trainable * (8 + (4 if p != 4 else 0))  # moments (+ fp32 master weights)
    if p != 4 and z >= 1:
        gradients += counts.trainable * 4 / w  # the fp32 gradient partition
    optimizer /= w if z >= 1 else 1
    if choice.offload_optimizer and on_gpu:
        optimizer = 0.0

    tr, data = recipe.train, recipe.data
    tokens = tr.micro_batch_size * data.max_length
    a = p  # activations are kept in the training precision
    h, kv, inter = counts.hidden, counts.kv_hidden, counts.intermediate
    # The norms' inputs (2h), q, k, v and the attention output; a gated MLP (SwiGLU) keeps
    # gate, up and their activation, a plain one (GELU) the activation's input.
    per_layer = 4 * h + 2 * kv + (3 if counts.gated_mlp else 1) * inter
    if recipe.model.attn_implementation == "eager":
        per_layer += 2 * counts.heads * data.max_length  # scores and their softmax
    per_layer += counts.adapter_inputs / max(counts.layers, 1)
    if choice.gradient_checkpointing:
        activations = tokens * a * (counts.layers * h + per_layer)
    else:
        activations = tokens * a * counts.layers * per_layer
    logits = tokens * counts.vocabulary * (2 * p + 8) if counts.generates_tokens else 0.0

    parts = {"frozen_weights": frozen, "trainable_weights": trainable, "gradients": gradients,
             "optimizer": optimizer, "activations": activations, "logits": logits}
    model_bytes = sum(parts.values())
    parts["framework"] = 0.05 * model_bytes if on_gpu else CPU_FRAMEWORK_MB * MB
    return parts


def choices(recipe) -> list[Choice]:
    """The recipe as written first, then every stage x offload x checkpointing it could use."""
    sh = recipe.sharding
    written = Choice(sh.zero_stage, sh.offload_optimizer, sh.offload_params, recipe.train.gradient_checkpointing)
    options = [written]
    for checkpointing in (False, True):
        for stage in (0, 1, 2, 3):
            for offload_optimizer in ((False,) if stage == 0 else (False, True)):
                for offload_params in ((False, True) if stage == 3 and offload_optimizer else (False,)):
                    option = Choice(stage, offload_optimizer, offload_params, checkpointing)
                    if option != written:
                        options.append(option)
    return options


def cost(choice: Choice) -> tuple:
    """Cheapest first: checkpointing (~30 % more compute) and offload (PCIe traffic) cost
    more time than a higher ZeRO stage (more collectives)."""
    return (choice.gradient_checkpointing, choice.offload_params, choice.offload_optimizer, choice.zero_stage)


def plan(recipe, counts: Counts, *, workers: int | None = None, gpu_memory_mb: float | None = None,
         on_gpu: bool | None = None) -> dict:
    workers = workers or recipe.cluster.workers
    on_gpu = recipe.cluster.gpus_per_worker > 0 if on_gpu is None else on_gpu
    rows = []
    for choice in choices(recipe):
        parts = estimate(counts, recipe, choice, workers, on_gpu)
        total = sum(parts.values()) / MB
        rows.append({"choice": choice.label(), "zero_stage": choice.zero_stage,
                     "offload_optimizer": choice.offload_optimizer, "offload_params": choice.offload_params,
                     "gradient_checkpointing": choice.gradient_checkpointing,
                     "predicted_peak_mb_per_worker": round(total, 1),
                     "parts_mb": {k: round(v / MB, 1) for k, v in parts.items()},
                     "fits": None if gpu_memory_mb is None else total <= gpu_memory_mb})
    fitting = [(cost(c), r) for c, r in zip(choices(recipe), rows) if r["fits"]]
    return {
        "workers": workers, "device": "gpu" if on_gpu else "cpu",
        "memory_limit_mb_per_worker": gpu_memory_mb,
        "parameters": {"trainable": counts.trainable, "frozen": counts.frozen + counts.quantised,
                       "quantised": counts.quantised},
        "predicted_peak_mb_per_worker": rows[0]["predicted_peak_mb_per_worker"],
        "as_written": rows[0],
        "options": rows[1:],
        "recommended": min(fitting, key=lambda pair: pair[0])[1]["choice"] if fitting else None,
    }


def model_counts(recipe) -> Counts:
    """Counts from the recipe's model built on the meta device, with its adapter applied."""
    import torch

    from shardtune import backbone, quantization
    from shardtune.adapters import apply_adapter
    from shardtune.tasks import Can, get_task, kind_of

    task = get_task(recipe)
    kind = kind_of(recipe)
    model = backbone.meta_model(recipe, task)  # label heads get placeholder labels: the data is not read
    if hasattr(model, "tie_weights"):  # built from a config on meta: tie as from_pretrained would
        model.tie_weights()
    linear_weights = {id(m.weight): (m.out_features, name) for name, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear)}
    model = apply_adapter(model, recipe, task)
    frozen = quantised = rows = trainable = adapter_inputs = 0
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), torch.nn.Linear):
            adapter_inputs += module.base_layer.in_features
    keep = tuple(k.strip(".*") for k in quantization.KEEP_FULL_PRECISION)
    for param in model.parameters():
        n = param.numel()
        if param.requires_grad:
            trainable += n
        elif quantization.is_quantized(recipe) and id(param) in linear_weights and \
                not any(k in linear_weights[id(param)][1] for k in keep):
            quantised += n
            rows += linear_weights[id(param)][0]
        else:
            frozen += n
    config = text_config(model.config)
    layers, hidden = config_dimensions(config)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "d_ff", None) or 4 * hidden)
    generates = kind.can(Can.GENERATE)
    gated = any(name.endswith(("gate_proj", "wi_0")) for name, _ in model.named_modules())
    return Counts(frozen=frozen, quantised=quantised, quantised_rows=rows, trainable=trainable,
                  adapter_inputs=adapter_inputs, layers=layers, hidden=hidden, kv_hidden=hidden * kv_heads // heads,
                  intermediate=intermediate, heads=heads, vocabulary=getattr(config, "vocab_size", 0),
                  generates_tokens=generates, gated_mlp=gated)


def parse_memory(text: str) -> float:
    """'80GB', '80G', '81920MB', '141GiB' -> MB (binary units, as GPUs report them)."""
    import re

    from shardtune.errors import RecipeError

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([GMT])(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise RecipeError(f"--gpu-memory {text!r}: give a size such as 80GB, 24G or 49152MB")
    value, unit = float(match.group(1)), match.group(2).upper()
    return value * {"M": 1, "G": 1024, "T": 1024 * 1024}[unit]
