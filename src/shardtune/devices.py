"""Which device a worker trains on, and what follows from that choice.

The launcher decides the device, not this code: Ray assigns each GPU worker its GPU through
CUDA_VISIBLE_DEVICES and `ray.train.torch.get_device()` names it (the Ray reporter passes it
in); under torchrun it is `cuda:LOCAL_RANK`. A recipe that asks for GPUs on a worker that
has none is refused here, on the worker, where the truth is known: the driver may be a CPU
login node of a GPU cluster.
"""

from __future__ import annotations

import os

import torch

from shardtune.errors import RunError


def worker_device(recipe, launcher_device: torch.device | None = None) -> torch.device:
    """The device this worker trains on."""
    if recipe.cluster.gpus_per_worker == 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        import socket

        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise RunError(f"cluster.gpus_per_worker is {recipe.cluster.gpus_per_worker} but this worker "
                       f"(on {socket.gethostname()}) sees no CUDA device: torch {torch.__version__} is {build}, "
                       f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}; install the "
                       "CUDA build of torch on the GPU nodes (SHARDTUNE_DEVICE=cuda ./launcher/setup.sh), or set "
                       "cluster.gpus_per_worker: 0 to train on CPU")
    if launcher_device is not None and launcher_device.type == "cuda":
        device = launcher_device
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def configure(device: torch.device, recipe) -> None:
    """Process-wide settings that follow from the device, before DeepSpeed is imported."""
    if device.type == "cuda":
        # A login node's environment (DS_ACCELERATOR=cpu from the CPU set-up) can travel with
        # an sbatch job to the GPU nodes; DeepSpeed would then pick its CPU accelerator.
        if os.environ.get("DS_ACCELERATOR") == "cpu":
            os.environ["DS_ACCELERATOR"] = "cuda"
        # fp32 matmuls on tensor cores (TF32): ~8x the fp32 throughput on A100/H100, at
        # bf16-like input rounding that fine-tuning does not notice.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(max(1, int(recipe.cluster.cpus_per_worker)))


def backend(device: torch.device) -> str:
    """NCCL reduces only CUDA tensors; gloo reduces CPU tensors."""
    return "nccl" if device.type == "cuda" else "gloo"

