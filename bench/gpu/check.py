"""The GPU check: shardtune's worker loop on one GPU with an 8 B-parameter model.

    bash bench/gpu/run.sh                        # on the GPU machine (installs the carried wheels)
    python bench/gpu/check.py --shape tiny       # the same script on a CPU, a tiny model: a dry run

Each case is a real run of the worker loop under torchrun at world size 1 (NCCL, bf16,
bitsandbytes' CUDA kernels, DeepSpeed ZeRO-2 and ZeRO-3) on a randomly initialised model
with Llama-3-8B's shape (hidden 4096, 32 layers, GQA 8 KV heads, MLP 14336, vocab 128 256:
8.03 B parameters), saved once as bf16 safetensors. Random weights cost what trained ones
cost in memory and time. Data: plain text of the tests' word-level vocabulary, packed into
2048-token blocks (task.input: text).

Cases (each its recipe in bench/gpu/recipes, overridden here for the model and data):
  lora_bf16    LoRA r=16 on every projection, bf16, ZeRO-2, micro-batch 2, no checkpointing:
               tokens/s, MFU (dense bf16 peak), peak memory. Target: MFU >= 0.45.
  qlora_nf4    4-bit NF4 backbone (double quant), bf16 compute, LoRA, gradient checkpointing,
               micro-batch 1: peak memory. Target: <= 8 GiB allocated.
  zero3_load   LoRA, bf16, ZeRO-3: the partitioned-loading path runs and trains.

Writes bench/results/gpu.json (per case: the run summary's throughput and memory figures,
or the error), with the device, the library versions and the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
RECIPES = Path(__file__).resolve().parent / "recipes"

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128_256, max_position_embeddings=8192, rope_theta=500000.0,
                      tie_word_embeddings=False),
    # The dry run on a CPU: the same code paths on a model that trains in seconds.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, max_position_embeddings=2048, tie_word_embeddings=False),
}
CASES = ("lora_bf16", "qlora_nf4", "zero3_load")
TARGETS = {"lora_bf16": ("mfu", ">=", 0.45), "qlora_nf4": ("peak_allocated_gib", "<=", 8.0)}


def build_model(directory: Path, shape: str) -> Path:
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import tiny_models

    building = directory.with_name(directory.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    tokenizer = tiny_models.build_tokenizer(building, decoder=True)
    config = LlamaConfig(**SHAPES[shape], pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the GPU: seconds, where a CPU takes minutes
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(building, safe_serialization=True)
    del model
    building.rename(directory)
    return directory


def write_text(path: Path, documents: int, words: int) -> Path:
    import tiny_models

    vocabulary = tiny_models.FILLER + tiny_models.POSITIVE + tiny_models.NEGATIVE
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choices(vocabulary, k=words))} for _ in range(documents)]
    return tiny_models.write_jsonl(path, rows)


def run_case(case: str, model: Path, data: Path, work: Path, gpu: bool, steps: int, timeout: int) -> dict:
    raw = yaml.safe_load((RECIPES / f"{case}.yaml").read_text())
    raw["model"]["path"] = str(model)
    raw["data"]["train"] = str(data)
    raw["train"]["max_steps"] = steps
    raw["output"] = {"dir": str(work / case), "if_exists": "overwrite"}
    if not gpu:  # the dry run: the CPU's precision and kernels
        raw["cluster"]["gpus_per_worker"] = 0
        raw["sharding"]["precision"] = "fp32"
        raw["quantization"] = {**raw.get("quantization", {}), "compute_dtype": None} if "quantization" in raw else {}
        raw["data"]["max_length"] = 128
    shutil.rmtree(work / case, ignore_errors=True)
    path = work / f"{case}.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "SHARDTUNE_CACHE": str(work / "cache"), "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    if gpu:
        env.pop("DS_ACCELERATOR", None)
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m",
                               "shardtune.torchrun", str(path)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"ran past {timeout} s"}
    (work / f"{case}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-2500:]}
    metrics = json.loads((work / case / "metrics.json").read_text())
    s = metrics["summary"]
    detail = s["peak_memory_detail_mb_per_worker"][0]
    return {
        "wall_seconds": round(time.perf_counter() - started, 1), "steps": s["steps"],
        "validation_loss": metrics["final"].get("loss"),
        "steady_step_s": s["steady_step_s"], "tokens_per_s": s["tokens_per_s"],
        "flops_per_s": s["flops_per_s_per_worker"], "mfu": s["mfu"], "mfu_peak_tflops": s["mfu_peak_tflops"],
        "peak_allocated_gib": round(detail.get("allocated", detail.get("resident", 0)) / 1024, 2),
        "peak_reserved_gib": round(detail.get("reserved", 0) / 1024, 2),
        "load_peak_gib": round(s["load_peak_memory_mb_per_worker"][0] / 1024, 2),
        "parameters": s["total_parameters"], "trainable": s["trainable_parameters"],
    }


def environment() -> dict:
    import torch

    versions = {}
    for name in ("transformers", "peft", "deepspeed", "bitsandbytes", "accelerate"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 (report whatever is missing)
            versions[name] = f"missing: {exc}"
    gpu = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": sys.version.split()[0], **versions}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--work", type=Path, default=Path("/tmp/shardtune-gpu-check"))
    parser.add_argument("--case-timeout", type=int, default=150)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = build_model(args.work / f"model-{args.shape}", args.shape)
    built = round(time.perf_counter() - started, 1)
    data = write_text(args.work / "text.jsonl", documents=400, words=2500)
    result = {"environment": environment(), "shape": {"name": args.shape, **SHAPES[args.shape]},
              "model_build_s": built, "cases": {}, "measured": time.strftime("%Y-%m-%d %H:%M")}
    for case in args.cases:
        result["cases"][case] = run_case(case, model, data, args.work, gpu, args.steps, args.case_timeout)
        print(case, json.dumps(result["cases"][case]), flush=True)
    result["targets"] = {}
    for case, (key, op, bound) in TARGETS.items():
        value = result["cases"].get(case, {}).get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        result["targets"][case] = {"figure": key, "value": value, "target": f"{op} {bound}", "met": met}
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["targets"], indent=2))


if __name__ == "__main__":
    main()
