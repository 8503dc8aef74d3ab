#!/usr/bin/env bash
# Download (here, where the package registries are reachable) the wheels the GPU machine
# lacks, into bench/gpu/wheels/ (git-ignored; carried to the GPU machine with the run).
# That machine has Python 3.12, torch, transformers, peft, accelerate, safetensors and
# tokenizers (../shared/notes/gpu-machine.md); the worker loop also needs deepspeed (and
# the small packages it imports), bitsandbytes' CUDA build and pydantic.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
PY=(--python-version 3.12 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64
    --platform manylinux_2_17_x86_64 --only-binary=:all: --no-deps -d wheels)
python -m pip download --quiet "${PY[@]}" bitsandbytes==0.50.2 pydantic==2.14.3 pydantic-core==2.50.4 \
    annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0 py-cpuinfo==9.0.0 msgpack==1.2.4 ninja==1.13.2 psutil==7.1.3 einops==0.8.1
# deepspeed is published as source only: a pure-Python wheel, its CUDA ops compile on first
# use there (the check passes torch optimizers, so none is compiled).
python -m pip wheel --quiet --no-deps --no-build-isolation -w wheels deepspeed==0.19.8 -c ../../launcher/constraints.txt \
    -c ../../launcher/constraints-cpu.txt
du -ch wheels/*.whl | tail -1
