"""bitsandbytes quantisation of the frozen backbone (QLoRA-style), and its CPU trap.

The backbone's linear layers become bitsandbytes 4-bit (nf4/fp4) or 8-bit layers when
transformers loads it; adapters train on top. Task heads and the LM output layer stay
in full precision: they are new (or tied to the embeddings) and train or read every step.
"""

from __future__ import annotations

# torch is imported where used: recipe validation asks this module about storage dtypes.

# Modules never quantised, as transformers matches them: a prefix of the module's full name
# at a dot boundary, a regex, or a suffix (hence ".*pooler" for bert.pooler.dense). Passing
# the list replaces transformers' own default (the output embedding), so lm_head is here too.
KEEP_FULL_PRECISION = ["lm_head", "score", "classifier", ".*pooler", "qa_outputs"]


def is_quantized(recipe) -> bool:
    return recipe.quantization.mode != "none"


def compute_dtype(recipe) -> str:
    return recipe.quantization.compute_dtype or recipe.model.dtype


PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def storage_dtype(recipe) -> str:
    """ZeRO-3 partitions every parameter as a flat buffer of the training precision: under
    bf16 or fp16 DeepSpeed casts every float parameter to it, packed 4-bit codes included.
    The codes survive only if they are already stored in that dtype (a cast to the same
    dtype copies bits); stored as uint8 they cannot be flattened with the rest, stored in
    another float dtype they are silently converted to other numbers."""
    q = recipe.quantization
    if q.storage_dtype:
        return q.storage_dtype
    return PRECISION_DTYPES[recipe.sharding.precision] if recipe.sharding.zero_stage == 3 else "uint8"


def storage_problem(recipe) -> str | None:
    """A 4-bit storage dtype that ZeRO-3 would corrupt (see storage_dtype), with the fix."""
    q, sh = recipe.quantization, recipe.sharding
    if q.mode in ("none", "int8") or sh.zero_stage != 3 or q.storage_dtype is None:
        return None
    want = PRECISION_DTYPES[sh.precision]
    if q.storage_dtype == want:
        return None
    return (f"quantization.storage_dtype: {q.storage_dtype} under ZeRO-3 with sharding.precision {sh.precision}: "
            f"DeepSpeed casts every partitioned parameter to {want}, which would turn the packed 4-bit weights "
            f"into other numbers (or fail to flatten them); set quantization.storage_dtype: {want}, or remove it "
            "(the default under ZeRO-3 is the training precision's dtype)")


def bnb_config(recipe):
    """The BitsAndBytesConfig for from_pretrained, or None for an unquantised backbone."""
    q = recipe.quantization
    if q.mode == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}

    if q.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=KEEP_FULL_PRECISION)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.mode, bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[compute_dtype(recipe)],
        bnb_4bit_quant_storage=DTYPES[storage_dtype(recipe)],
        llm_int8_skip_modules=KEEP_FULL_PRECISION)


def guard_cpu_4bit_gradients(model) -> int:
    """Keep 4-bit layers on the CPU kernel that has a backward pass.

    On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for a faster inference
    kernel on the first eval-mode, no-grad forward (any evaluation, or from_pretrained's
    own checks); that kernel has no autograd, and from then on adapter gradients are
    silently wrong (relative error ~1). Turning the repacking off keeps the gradients
    exact. Returns the number of layers guarded.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    guarded = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            guarded += 1
    return guarded


def prequantized(config) -> bool:
    """A checkpoint saved already quantised (its config carries a quantization_config)."""
    return getattr(config, "quantization_config", None) is not None
