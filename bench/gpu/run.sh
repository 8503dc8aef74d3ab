#!/usr/bin/env bash
# The GPU check, on the GPU machine: install the carried wheels, then bench/gpu/check.py.
# Here first:  bash bench/gpu/fetch_wheels.sh   (downloads bench/gpu/wheels/, ~47 MB)
# Then (device tool): run "bash bench/gpu/run.sh" with carry ["bench/gpu/wheels"];
# bench/results/gpu.json comes back under $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -m pip install --quiet --no-deps --no-index bench/gpu/wheels/*.whl
export PYTHONPATH="$PWD/src:$PWD/tests:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset DS_ACCELERATOR
python - <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "deepspeed", "bitsandbytes", "pydantic", "yaml", "accelerate"):
    module = importlib.import_module(name)
    print(f"{name} {getattr(module, '__version__', '?')}")
PY
python bench/gpu/check.py "$@"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp bench/results/gpu.json "$OUT/"; cp /tmp/shardtune-gpu-check/*.log "$OUT/" 2>/dev/null || true; fi
