"""Gradient checkpointing on SmolLM2-135M at sequence 512, micro-batch 4: the memory it saves.

    python bench/checkpointing.py

Writes bench/results/checkpointing.json (and prints it). Run alone on the machine.

The run: recipes/smollm2_bbc_text.yaml (LoRA r=8 on every projection, BBC News articles
packed into blocks) with data.max_length 512 and micro-batch 4, 40 articles, 5 optimizer
steps, 2 workers under torchrun (the worker loop of `shardtune run`), with
`train.gradient_checkpointing` false and then true. Read from each run's summary: every
worker's training peak (peak_memory_mb_per_worker: resident memory after the engine was
built), the steady step time and tokens per second.
Target (issue 15): checkpointing lowers the per-worker peak by at least 1 GB.
"""

from __future__ import annotations

from common import ROOT, torchrun, write_result

RECIPE = ROOT / "recipes" / "smollm2_bbc_text.yaml"


def run(checkpointing: bool) -> dict:
    out = ROOT / "bench" / ".work" / "checkpointing" / f"out-{'checkpointed' if checkpointing else 'plain'}"
    overrides = ["data.max_length=512", "train.micro_batch_size=4", "data.max_train_examples=40",
                 "data.max_eval_examples=4", "train.max_steps=5", "train.warmup_steps=0",
                 "train.eval_before_training=false", "train.log_every_steps=1",
                 f"train.gradient_checkpointing={str(checkpointing).lower()}"]
    metrics, wall = torchrun(RECIPE, overrides, out)
    summary = metrics["summary"]
    keys = ("peak_memory_mb_per_worker", "load_peak_memory_mb_per_worker", "steady_step_s", "tokens_per_s",
            "train_examples")
    return {**{k: summary[k] for k in keys}, "wall_seconds": round(wall, 1)}


def main() -> None:
    plain, checkpointed = run(False), run(True)
    saved = [a - b for a, b in zip(plain["peak_memory_mb_per_worker"], checkpointed["peak_memory_mb_per_worker"])]
    write_result("checkpointing", {
        "setup": "SmolLM2-135M (GGUF, dequantised to fp32), LoRA r=8 all projections, seq 512, micro-batch 4, "
                 "2 workers (torchrun), ZeRO-2, fp32, CPU (2 cores)",
        "plain": plain, "checkpointed": checkpointed,
        "saved_mb_per_worker": [round(s, 1) for s in saved],
        "step_time_ratio": round(checkpointed["steady_step_s"] / plain["steady_step_s"], 3),
        "target": "checkpointing lowers each worker's peak by at least 1 GB",
        "target_met": min(saved) >= 1024,
    })


if __name__ == "__main__":
    main()
