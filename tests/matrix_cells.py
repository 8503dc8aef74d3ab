"""The compatibility matrix as runnable cells: a recipe per cell on tiny random models,
trained by tests/batch_runs.py in one 2-process group (a real run of shardtune's worker
loop each: DeepSpeed ZeRO, peft, bitsandbytes, from_pretrained on a saved checkpoint)."""

from __future__ import annotations

import itertools
from pathlib import Path

import tiny_models

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "t5": ["q", "v"]}
BACKBONES = {"causal_lm": "llama", "prompt": "llama", "seq2seq": "t5"}  # the others: bert
LEARNING_RATE = {"none": 2e-3, "prompt_tuning": 5e-2, "p_tuning": 2e-2, "prefix_tuning": 5e-2, "frozen": 5e-2}
# The prompt family: a causal LM read through a verbalizer, with template soft tokens that
# every method trains (and that adapter.method frozen trains alone).
PROMPT_TASK = {"type": "prompt_classification", "templates": ["{soft:2} {text} it was {mask}"],
               "verbalizer": {"neg": ["bad", "awful"], "pos": ["good"]}}


def build_assets(root: Path) -> dict:
    """Tiny models and a data file per task family, built once."""
    root.mkdir(parents=True, exist_ok=True)
    assets = {"bert": root / "bert", "llama": root / "llama", "t5": root / "t5"}
    if not (assets["bert"] / "config.json").exists():
        tiny_models.build_tiny_bert(assets["bert"])
        tiny_models.build_tiny_llama(assets["llama"])
        tiny_models.build_tiny_t5(assets["t5"])
    assets["classification"] = tiny_models.write_jsonl(root / "cls.jsonl", tiny_models.sentiment_rows(64, 1))
    assets["tagging"] = tiny_models.write_jsonl(root / "tag.jsonl", tiny_models.tagged_rows(64, 2))
    assets["qa"] = tiny_models.squad_file(root / "qa.json", 64, 3)
    assets["causal_lm"] = tiny_models.write_jsonl(root / "clm.jsonl", tiny_models.instruction_rows(64, 4))
    assets["prompt"] = assets["classification"]
    assets["seq2seq"] = tiny_models.write_jsonl(root / "s2s.jsonl", tiny_models.text2text_rows(64, 5))
    return {k: str(v) for k, v in assets.items()}


def adapter_for(method: str, backbone: str, **variant) -> dict:
    if method == "lora":
        return {"method": "lora", "r": 8, "alpha": 16, "target_modules": TARGETS[backbone], **variant}
    if method in ("prompt_tuning", "prefix_tuning", "p_tuning"):
        extra = {"encoder_hidden_size": 32} if method == "p_tuning" else {}
        return {"method": method, "num_virtual_tokens": 4, **extra, **variant}
    return {"method": method, **variant}


def _learning_rate(method: str, backbone: str, family: str) -> float:
    # LoRA on the tiny Llama (initializer_range 0.5) at 2e-2 is chaotic: reduction-order noise
    # between ZeRO stages grew to 8% of the loss in 30 steps. At 5e-3 the stages agree to 1e-6.
    if method == "lora" and backbone == "llama":
        return 5e-3
    # The tiny encoder's classifier at 2e-2 jumps to a loss of 1.17 at step 12 whatever the
    # adapter, so where 30 steps end was left to the data order: IA3, DoRA and prefix tuning
    # ended above where they began. At 5e-3 every method falls smoothly (1.5-2.6% in 30 steps).
    if family == "classification":
        return min(LEARNING_RATE.get(method, 2e-2), 5e-3)
    return LEARNING_RATE.get(method, 2e-2)


def cell_recipe(assets: dict, out: Path, *, method: str, quant: str, zero: int, family: str,
                adapter: dict | None = None, quantization: dict | None = None, steps: int = 30,
                precision: str = "fp32") -> dict:
    backbone = BACKBONES.get(family, "bert")
    source = {"path": assets[family], "format": "squad"} if family == "qa" else assets[family]
    task = {"classification": {"type": "sequence_classification"}, "tagging": {"type": "token_classification"},
            "qa": {"type": "question_answering"}, "causal_lm": {"type": "causal_lm"}, "prompt": PROMPT_TASK,
            "seq2seq": {"type": "seq2seq", "max_new_tokens": 3}}[family]
    return {
        "model": {"path": assets[backbone]},
        "quantization": {**(quantization or {}), "mode": quant},
        "adapter": adapter or adapter_for(method, backbone),
        "task": task,
        # Validation is the training file: the question is whether training fits, on tiny data.
        "data": {"train": source, "validation": source, "max_eval_examples": 32,
                 "max_length": 64 if family in ("qa", "causal_lm") else 32},
        "train": {"max_steps": steps, "micro_batch_size": 8, "learning_rate": _learning_rate(method, backbone, family),
                  "warmup_ratio": 0.0, "log_every_steps": 1000, "seed": 0},
        "sharding": {"zero_stage": zero, "precision": precision},
        "cluster": {"workers": 2},
        "output": {"dir": str(out)},
    }


# ------------------------------------------------------------------------ the cells
def matrix_cells(assets: dict, out_root: Path) -> dict[str, dict]:
    """Every cell of the matrix that the rules allow, plus LoRA's variants, the 4-bit options
    and the soft-prompt options on the families and stages where they differ most."""
    from shardtune import compat

    cells = {}
    for method in compat.METHODS:
        for mode in compat.QUANTIZATION.values():
            for zero in compat.ZERO_STAGES:
                for family in compat.FAMILIES:
                    if compat.refusal(method, mode, zero, family) is None:
                        name = f"{method}/{mode}/zero{zero}/{family}"
                        cells[name] = cell_recipe(assets, out_root / name.replace("/", "-"), method=method,
                                                  quant=mode, zero=zero, family=family)
    for name, (method, extra, quantization, families) in VARIANTS.items():
        for family in families:
            for zero in (2, 3):
                modes = ("none",) if name.endswith("pissa") else ("none", "nf4")
                for mode in modes if quantization is None else (quantization.get("mode", "nf4"),):
                    if name == "lora+dora" and mode != "none" and zero == 3:
                        continue  # refused: compat.DORA_QUANTIZED_ZERO3 (tests/unit/test_compat.py)
                    backbone = BACKBONES.get(family, "bert")
                    cell = f"{name}/{mode}/zero{zero}/{family}"
                    cells[cell] = cell_recipe(assets, out_root / cell.replace("/", "-"), method=method, quant=mode,
                                              zero=zero, family=family, adapter=adapter_for(method, backbone, **extra),
                                              quantization=quantization)
    for mode, zero, family in BF16_CELLS:
        if compat.refusal("lora", mode, zero, family) is not None:
            continue  # int8 under ZeRO-3: refused in any precision (tests/unit/test_compat.py)
        cell = f"lora+bf16/{mode}/zero{zero}/{family}"
        # A plain bf16 backbone takes longer to move the tiny classifier's loss than a 4-bit one.
        cells[cell] = cell_recipe(assets, out_root / cell.replace("/", "-"), method="lora", quant=mode, zero=zero,
                                  family=family, precision="bf16", steps=90 if mode == "none" else 30)
    return cells



BOTH = ("classification", "causal_lm")

# bf16 training on quantised backbones at every ZeRO stage: DeepSpeed casts every float
# parameter to bf16 (packed 4-bit codes too, under ZeRO-3), the bug class fp32 cells never see.
# And on plain backbones at ZeRO-2/3: ZeRO-3 refused the fp32 adapter beside the bf16 head
# (one flat buffer, one dtype) until the engine cast them.
BF16_CELLS = [(mode, zero, family) for mode in ("nf4", "int8") for zero in range(4) for family in BOTH]
BF16_CELLS += [("none", zero, family) for zero in (2, 3) for family in BOTH]
VARIANTS = {  # name -> (method, adapter options, quantization options or None, families)
    "lora+rslora": ("lora", {"use_rslora": True}, None, BOTH),
    "lora+dora": ("lora", {"use_dora": True}, None, BOTH),
    "lora+gaussian": ("lora", {"init": "gaussian"}, None, BOTH),
    "lora+pissa": ("lora", {"init": "pissa"}, None, BOTH),
    "lora+loraplus": ("lora", {"loraplus_lr_ratio": 16}, None, BOTH),
    "lora+all-linear": ("lora", {"target_modules": "all-linear"}, None, BOTH),
    "lora+fp4": ("lora", {}, {"mode": "fp4"}, BOTH),
    "lora+double-quant": ("lora", {}, {"double_quant": True}, BOTH),
    "lora+bf16-compute": ("lora", {}, {"compute_dtype": "bfloat16"}, BOTH),
    "prompt_tuning+text-init": ("prompt_tuning", {"init_text": "say good or bad"}, None, BOTH),
    "prefix_tuning+projection": ("prefix_tuning", {"projection": True, "projection_hidden_size": 32}, None,
                                 ("classification", "tagging", "qa", "causal_lm")),
    "p_tuning+lstm": ("p_tuning", {"encoder": "LSTM"}, None, BOTH),
}


# ------------------------------------------------------------------------ what CI trains
# The cells test_variants_change_what_trains compares.
COMPARED = [f"lora/none/zero{z}/{f}" for z in range(4) for f in ("classification", "causal_lm")] + [
    "lora+dora/none/zero2/classification", "lora+all-linear/none/zero2/classification",
    "ia3/none/zero2/classification"]


def covering_cells(names: list[str]) -> list[str]:
    """A subset of the matrix that CI trains in minutes instead of the whole in twenty: every
    pair of values of any two dimensions (method, quantisation, ZeRO stage, family) that an
    allowed cell has; every (method, quantisation) at ZeRO-3, where parameters are partitioned
    and most interactions live; each variant once per family with its 4-bit mode where
    allowed (ZeRO-3 on its first family, ZeRO-2 on the others); and the cells that
    test_variants_change_what_trains compares. Greedy, so the same list every time."""
    base = [tuple(n.split("/")) for n in names if "+" not in n.split("/")[0]]

    def pairs(cell):
        return {(i, cell[i], j, cell[j]) for i, j in itertools.combinations(range(4), 2)}

    chosen = {n for n in COMPARED if n in names}
    for cell in base:  # one per (method, quantisation) at ZeRO-3
        if cell[2] == "zero3" and not any(n.startswith("/".join(cell[:2]) + "/zero3/") for n in chosen):
            chosen.add("/".join(cell))
    need = set().union(*(pairs(c) for c in base)) - set().union(*(pairs(tuple(n.split("/"))) for n in chosen))
    while need:
        best = max(base, key=lambda c: (len(pairs(c) & need), c[2] == "zero3"))
        chosen.add("/".join(best))
        need -= pairs(best)
    chosen |= {n for n in names if n.startswith("lora+bf16/")}
    for variant, (_, _, _, families) in VARIANTS.items():
        for i, family in enumerate(families):  # ZeRO-3 (three times slower) on the first family only
            stage = "zero3" if i == 0 else "zero2"
            options = [n for n in names if n.startswith(variant + "/") and n.endswith(f"/{family}")]
            chosen.add(max(options, key=lambda n: (n.split("/")[2] == stage, n.split("/")[1] != "none")))
    return [n for n in names if n in chosen]
