"""The compatibility matrix as runnable cells: a recipe per cell on tiny random models, and
a torchrun worker that trains a list of them in one 2-process group.

    python -m torch.distributed.run --nproc-per-node 2 tests/matrix_cells.py CELLS.json RESULTS.json

Each cell is a real run of shardtune's worker loop (DeepSpeed ZeRO, peft, bitsandbytes,
from_pretrained on a saved checkpoint); only the process group is shared between cells,
because starting two processes per cell would cost more than the cells themselves.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
LEARNING_RATE = {"none": 2e-3, "prompt_tuning": 5e-2, "p_tuning": 2e-2, "prefix_tuning": 5e-2, "frozen": 5e-2}
# The prompt family: a causal LM read through a verbalizer, with template soft tokens that
# every method trains (and that adapter.method frozen trains alone).
PROMPT_TASK = {"type": "prompt_classification", "templates": ["{soft:2} {text} it was {mask}"],
               "verbalizer": {"neg": ["bad", "awful"], "pos": ["good"]}}


def build_assets(root: Path) -> dict:
    """Tiny models and a data file per task family, built once."""
    root.mkdir(parents=True, exist_ok=True)
    assets = {"bert": root / "bert", "llama": root / "llama"}
    if not (assets["bert"] / "config.json").exists():
        tiny_models.build_tiny_bert(assets["bert"])
        tiny_models.build_tiny_llama(assets["llama"])
    assets["classification"] = tiny_models.write_jsonl(root / "cls.jsonl", tiny_models.sentiment_rows(64, 1))
    assets["tagging"] = tiny_models.write_jsonl(root / "tag.jsonl", tiny_models.tagged_rows(64, 2))
    assets["qa"] = tiny_models.squad_file(root / "qa.json", 64, 3)
    assets["causal_lm"] = tiny_models.write_jsonl(root / "clm.jsonl", tiny_models.instruction_rows(64, 4))
    assets["prompt"] = assets["classification"]
    return {k: str(v) for k, v in assets.items()}


def adapter_for(method: str, backbone: str, **variant) -> dict:
    if method == "lora":
        return {"method": "lora", "r": 8, "alpha": 16, "target_modules": TARGETS[backbone], **variant}
    if method in ("prompt_tuning", "prefix_tuning", "p_tuning"):
        extra = {"encoder_hidden_size": 32} if method == "p_tuning" else {}
        return {"method": method, "num_virtual_tokens": 4, **extra, **variant}
    return {"method": method, **variant}


def cell_recipe(assets: dict, out: Path, *, method: str, quant: str, zero: int, family: str,
                adapter: dict | None = None, quantization: dict | None = None, steps: int = 30) -> dict:
    backbone = "llama" if family in ("causal_lm", "prompt") else "bert"
    source = {"path": assets[family], "format": "squad"} if family == "qa" else assets[family]
    task = {"classification": {"type": "sequence_classification"}, "tagging": {"type": "token_classification"},
            "qa": {"type": "question_answering"}, "causal_lm": {"type": "causal_lm"}, "prompt": PROMPT_TASK}[family]
    return {
        "model": {"path": assets[backbone]},
        "quantization": {**(quantization or {}), "mode": quant},
        "adapter": adapter or adapter_for(method, backbone),
        "task": task,
        # Validation is the training file: the question is whether training fits, on tiny data.
        "data": {"train": source, "validation": source, "max_eval_examples": 32,
                 "max_length": 64 if family in ("qa", "causal_lm") else 32},
        "train": {"max_steps": steps, "micro_batch_size": 8, "learning_rate": LEARNING_RATE.get(method, 2e-2),
                  "warmup_ratio": 0.0, "log_every_steps": 1000, "seed": 0},
        "sharding": {"zero_stage": zero},
        "cluster": {"workers": 2},
        "output": {"dir": str(out)},
    }


def main(cells_file: str, results_file: str) -> None:
    import torch.distributed as dist

    from shardtune.engine import train_worker
    from shardtune.torchrun import LocalReporter
    from shardtune.export import write_metrics
    from shardtune.recipe import validate_recipe

    cells = json.loads(Path(cells_file).read_text())
    results = {}
    for name, raw in cells.items():
        started = time.perf_counter()
        recipe = validate_recipe(raw)
        out = Path(recipe.output.dir)
        out.mkdir(parents=True, exist_ok=True)
        try:
            train_worker(recipe.model_dump(mode="json"), LocalReporter(out))
            dist.barrier()
            if dist.get_rank() == 0:
                metrics = write_metrics(out, recipe, time.perf_counter() - started)
                results[name] = {"before": metrics["before"]["loss"], "after": metrics["final"]["loss"],
                                 "trainable": metrics["summary"]["trainable_parameters"],
                                 "seconds": round(time.perf_counter() - started, 2)}
        except Exception:  # a cell that fails on both ranks; recorded, the next cell goes on
            results[name] = {"error": traceback.format_exc()[-3000:]}
        if dist.get_rank() == 0:
            Path(results_file).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])


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
                    backbone = "llama" if family in ("causal_lm", "prompt") else "bert"
                    cell = f"{name}/{mode}/zero{zero}/{family}"
                    cells[cell] = cell_recipe(assets, out_root / cell.replace("/", "-"), method=method, quant=mode,
                                              zero=zero, family=family, adapter=adapter_for(method, backbone, **extra),
                                              quantization=quantization)
    return cells


BOTH = ("classification", "causal_lm")
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
