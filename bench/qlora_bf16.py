"""4-bit + ZeRO-3 + bf16 on SmolLM2-135M: it trains, and the saved adapter is the trained one.

    python bench/qlora_bf16.py

Writes bench/results/qlora_bf16.json (and prints it). Run alone on the machine.

The bug class this guards against: under ZeRO-3 with bf16, DeepSpeed casts every float
parameter to bf16, the packed 4-bit codes included; stored in another dtype they turn into
other numbers and training goes on, silently, on a corrupted backbone. The run:
recipes/smollm2_sst2_qlora.yaml (NF4, double quantisation, LoRA on all linear layers,
ZeRO-3) with sharding.precision bf16, bf16 compute and a bf16 backbone, 96 training
examples, 8 steps, 2 workers under torchrun. Then `shardtune eval RUN` scores the run's own
validation split with plain transformers + peft (the backbone quantised afresh from its
checkpoint, the adapter loaded from the run). If the backbone the workers trained on had
been corrupted, the reloaded model would score differently from the workers' final
evaluation. Targets (issue 15): a finite, falling loss; the reload's loss equal to the
run's final validation loss (within bf16 rounding, 1 %).
"""

from __future__ import annotations

import json
import math

from common import ROOT, shardtune, torchrun, write_result

RECIPE = ROOT / "recipes" / "smollm2_sst2_qlora.yaml"


def main() -> None:
    out = ROOT / "bench" / ".work" / "qlora_bf16" / "run"
    overrides = ["sharding.precision=bf16", "model.dtype=bfloat16", "quantization.compute_dtype=bfloat16",
                 "data.max_train_examples=96", "data.max_eval_examples=48", "train.max_steps=8",
                 "train.micro_batch_size=4", "train.warmup_steps=0", "train.log_every_steps=1",
                 "train.eval_every_steps=4"]
    metrics, train_seconds = torchrun(RECIPE, overrides, out)
    losses = [h["loss"] for h in metrics["history"]]
    reloaded = json.loads(shardtune("eval", str(out)))
    final = metrics["final"]["loss"]
    write_result("qlora_bf16", {
        "setup": "SmolLM2-135M NF4 (double quant), bf16 compute and storage, LoRA all-linear, ZeRO-3, bf16, "
                 "2 workers (torchrun), 96 examples, 8 steps, micro-batch 4, CPU (2 cores)",
        "validation_loss_per_evaluation": losses,
        "train_seconds": round(train_seconds, 1),
        "reloaded_with_peft": {"loss": reloaded["loss"], "examples": reloaded["examples"]},
        "final_loss_in_run": final,
        "relative_difference": round(abs(reloaded["loss"] - final) / final, 5),
        "targets": {"finite_and_falling": all(math.isfinite(x) for x in losses) and losses[-1] < losses[0],
                    "reload_matches_within_1_percent": abs(reloaded["loss"] - final) <= 0.01 * final},
        "summary": {k: metrics["summary"][k] for k in ("peak_memory_mb_per_worker", "steady_step_s",
                                                        "tokens_per_s", "total_parameters")},
    })


if __name__ == "__main__":
    main()
