"""Which {adapter method} x {quantisation} x {ZeRO stage} x {task family} combinations train.

One table of rules, used three ways: the recipe validator refuses a combination with the
rule's reason before anything starts; `python -m shardtune.compat` writes the matrix in
docs/compatibility.md; and tests/integration/test_matrix.py trains every cell the rules
allow (2 workers, tiny models) and checks every refusal, so the rules, the docs and the
behaviour cannot drift apart.
"""

from __future__ import annotations

import sys

METHODS = ["lora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "frozen", "none"]
QUANTIZATION = {"none": "none", "4-bit": "nf4", "8-bit": "int8"}  # matrix label -> a mode of that width
ZERO_STAGES = [0, 1, 2, 3]
FAMILIES = {"classification": ("sequence_classification", "sequence_regression"),
            "tagging": ("token_classification",), "qa": ("question_answering",), "causal_lm": ("causal_lm",),
            "prompt": ("prompt_classification",)}

# (key, reason); the key is what the matrix footnotes show.
FULL_QUANTIZED = ("full+quantised", "full fine-tuning trains every weight, and bitsandbytes weights are frozen "
                  "integer codes that cannot take gradient steps; use an adapter on the quantised backbone (LoRA on "
                  "4-bit is QLoRA) or quantization.mode: none")
INT8_ZERO3 = ("8-bit+ZeRO-3", "ZeRO-3 partitions every weight into flat float shards, and bitsandbytes 8-bit weights "
              "(int8 codes plus per-row scales) cannot be partitioned (a known DeepSpeed/transformers limit); use "
              "sharding.zero_stage 0-2, or 4-bit (nf4/fp4), which ZeRO-3 holds with its storage dtype set to the "
              "compute dtype")
PREPENDED_POSITIONS = ("soft tokens+positions", "prompt_tuning and p_tuning prepend soft tokens to the input, which "
                       "shifts every position, so per-token tags and answer spans no longer line up with the model's "
                       "outputs; use prefix_tuning (trained keys and values on every layer, positions unchanged) or lora")
PISSA_QUANTIZED = ("PiSSA+quantised", "adapter.init: pissa initialises from a singular value decomposition of "
                   "full-precision weights, and peft refuses quantised ones; use init: default or gaussian with a "
                   "quantised backbone, or quantization.mode: none")
PREQUANTIZED_ZERO3 = ("pre-quantised+ZeRO-3", "this checkpoint is saved already quantised (its config has a "
                      "quantization_config), and ZeRO-3 cannot partition pre-quantised weights (a known upstream "
                      "limit); use sharding.zero_stage 0-2, or an unquantised checkpoint with quantization.mode")
DORA_QUANTIZED_ZERO3 = ("DoRA+quantised+ZeRO-3", "adapter.use_dora recomputes the norm of the dequantised base weight "
                        "on every forward pass, which needs the whole weight, and ZeRO-3 holds only a shard of each "
                        "quantised weight; use sharding.zero_stage 0-2, plain LoRA, or quantization.mode: none")
FROZEN_OUTSIDE_PROMPT = ("frozen outside prompts", "adapter.method frozen trains nothing but a prompt template's "
                         "{soft} tokens, which only task.type prompt_classification has; choose an adapter (lora, "
                         "ia3, prefix_tuning, ...)")
RULES = [FULL_QUANTIZED, INT8_ZERO3, PREPENDED_POSITIONS, FROZEN_OUTSIDE_PROMPT]  # the ones the matrix's axes decide


def family_of(task_type: str) -> str:
    return next(name for name, types in FAMILIES.items() if task_type in types)


def refusal(method: str, quant_mode: str, zero_stage: int, family: str) -> tuple[str, str] | None:
    """The rule that refuses this cell, or None if it trains."""
    if method == "none" and quant_mode != "none":
        return FULL_QUANTIZED
    if quant_mode == "int8" and zero_stage == 3:
        return INT8_ZERO3
    if method in ("prompt_tuning", "p_tuning") and family in ("tagging", "qa"):
        return PREPENDED_POSITIONS
    if method == "frozen" and family != "prompt":
        return FROZEN_OUTSIDE_PROMPT
    return None


def recipe_problems(recipe) -> list[str]:
    """The rules as validation messages for one recipe."""
    q, ad = recipe.quantization.mode, recipe.adapter
    problems = []
    rule = refusal(ad.method, q, recipe.sharding.zero_stage, family_of(recipe.task.type))
    if rule is not None:
        problems.append(f"adapter.method {ad.method} with quantization.mode {q}, ZeRO-{recipe.sharding.zero_stage} "
                        f"and task.type {recipe.task.type}: {rule[1]}")
    if ad.method == "lora" and ad.init == "pissa" and q != "none":
        problems.append(f"adapter.init: {PISSA_QUANTIZED[1]}")
    if ad.method == "lora" and ad.use_dora and q != "none" and recipe.sharding.zero_stage == 3:
        problems.append(f"adapter.use_dora: {DORA_QUANTIZED_ZERO3[1]}")
    return problems


def matrix_markdown() -> str:
    """docs/compatibility.md: the matrix from the same rules the validator applies."""
    keys = {rule[0]: chr(ord("a") + i) for i, rule in enumerate(RULES)}
    header = ["adapter", "backbone"] + [f"{fam} Z{z}" for fam in FAMILIES for z in ZERO_STAGES]
    lines = [
        "# Compatibility matrix", "",
        "Generated by `python -m shardtune.compat > docs/compatibility.md` from the rules in",
        "`src/shardtune/compat.py`, the same rules `shardtune validate` applies; a test checks this",
        "file is current, and `tests/integration/test_matrix.py` trains every cell marked yes",
        "(2 workers, tiny random models, loss must fall) and checks every refusal.", "",
        "Z0-Z3: DeepSpeed ZeRO stage. classification includes regression. yes: trains; a letter:",
        "refused at validation, for the reason below.", "",
        "| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
    ]
    for method in METHODS:
        for label, mode in QUANTIZATION.items():
            cells = []
            for fam in FAMILIES:
                for z in ZERO_STAGES:
                    rule = refusal(method, mode, z, fam)
                    cells.append("yes" if rule is None else keys[rule[0]])
            lines.append(f"| {method} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "Reasons:", ""]
    lines += [f"- **{keys[key]}** ({key}): {reason}." for key, reason in RULES]
    lines += ["", "Beyond the axes:", "",
              f"- {PISSA_QUANTIZED[0]}: {PISSA_QUANTIZED[1]}.",
              f"- {DORA_QUANTIZED_ZERO3[0]}: {DORA_QUANTIZED_ZERO3[1]}.",
              f"- {PREQUANTIZED_ZERO3[0]} (checked before launch, from the checkpoint's config): "
              f"{PREQUANTIZED_ZERO3[1]}.",
              "- 4-bit covers nf4 and fp4, with or without double quantisation; under ZeRO-3 the packed",
              "  weights are stored in the compute dtype unless quantization.storage_dtype says otherwise.",
              "- LoRA's variants (rsLoRA, DoRA, LoRA+, Gaussian or PiSSA init, all-linear) train wherever",
              "  LoRA does, but for the two rules above; each is tested on the classification and causal-LM",
              "  families under ZeRO-2 and ZeRO-3, unquantised and 4-bit.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(matrix_markdown())
