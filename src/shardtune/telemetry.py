"""What a run reports about its speed and memory: tokens per second, model FLOPs
utilisation (MFU) and peak memory, split into loading and training.

MFU counts the FLOPs the model needs, not what the hardware did (no recomputation from
gradient checkpointing), for adapter training, where most of the backward pass runs
through frozen weights:

    per token   forward  2 N                 (N: weights of every matmul, frozen or not)
                backward 2 N                 (gradients of the activations, through every layer)
                       + 2 N_trainable       (gradients of the trainable weights only)
    per sequence of S tokens, attention (QK^T and AV, forward 4 L d S^2, backward twice that)
                12 L d S^2

Full fine-tuning gives the familiar 6 N. The peak is the GPU's dense bf16 (or fp16) figure,
not the sparse one; on a CPU or an unknown GPU `mfu` is null and `flops_per_s` says what
was achieved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense bf16/fp16 tensor-core peaks, TFLOP/s, by the name torch reports (longest match wins).
PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0,
    "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "A10G": 125.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 6000 Ada": 364.0, "V100": 125.0, "T4": 65.0,
}


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs from a model, read once before DeepSpeed partitions it."""
    matmul_weights: int          # N
    trainable_matmul_weights: int
    layers: int
    hidden: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelShape":
        total = trainable = 0
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):  # bitsandbytes' 4- and 8-bit layers are Linears too
                n = module.in_features * module.out_features
                total += n
                if module.weight.requires_grad:
                    trainable += n
        layers, hidden = config_dimensions(getattr(model, "config", None))
        return cls(total, trainable, layers, hidden)

    def flops(self, tokens: int, sequences: int, sequence_length: int) -> float:
        """Training FLOPs of one micro-batch of `sequences` padded to `sequence_length`."""
        per_token = 4 * self.matmul_weights + 2 * self.trainable_matmul_weights
        attention = 12 * self.layers * self.hidden * sequence_length ** 2 * sequences
        return float(per_token * tokens + attention)


def text_config(config):
    """The language model's config (a multimodal config nests it)."""
    return config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config


def config_dimensions(config) -> tuple[int, int]:
    """(layers, hidden width) under the names the model families use: Llama/BERT's
    num_hidden_layers and hidden_size; T5's encoder plus decoder layers and d_model."""
    text = text_config(config)
    layers = (getattr(text, "num_hidden_layers", None) or
              (getattr(text, "num_layers", 0) or 0) + (getattr(text, "num_decoder_layers", 0) or 0))
    hidden = getattr(text, "hidden_size", None) or getattr(text, "d_model", 0)
    return int(layers or 0), int(hidden or 0)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in PEAK_TFLOPS if key in name]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def mfu(flops_per_s: float, device: torch.device) -> float | None:
    peak = peak_tflops(device)
    return None if peak is None or flops_per_s <= 0 else round(flops_per_s / (peak * 1e12), 4)


def batch_tokens(batch: dict) -> tuple[int, int, int, int]:
    """(tokens processed, tokens supervised, sequences, padded length) of a collated batch.

    Supervised tokens are the positions with a label when labels are per token (causal LM,
    seq2seq, tagging); a sequence-level label supervises the whole sequence. A packed causal-LM
    batch carries no attention mask (its position ids mark the records), so its tail padding,
    under one record per row, counts as processed: the model computes it all the same."""
    ids = batch.get("input_ids")
    if ids is None:
        return 0, 0, 0, 0
    mask = batch.get("attention_mask")
    processed = int(mask.sum()) if mask is not None else ids.numel()
    labels = batch.get("labels")
    if labels is not None and labels.dim() >= 2 and labels.shape[0] == ids.shape[0]:
        supervised = int((labels != -100).sum())
    else:
        supervised = processed
    return processed, supervised, ids.shape[0], ids.shape[-1]


# ------------------------------------------------------------------------------ memory
def release_host_memory() -> None:
    """Hand memory freed while loading back to the operating system. glibc keeps freed heap
    blocks for reuse, and raises its mmap threshold as large blocks are freed, so a loaded
    and converted checkpoint can leave gigabytes of free but resident memory per process,
    which is host RAM the node's other ranks and the page cache do not get."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim this way
        pass


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the training peak is then measured without the loading peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak resident set (VmHWM)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> dict:
    """The peak since the last reset: allocated and reserved on a GPU, resident set on a CPU."""
    if device.type == "cuda":
        return {"allocated": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "reserved": round(torch.cuda.max_memory_reserved(device) / 2**20, 1)}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return {"resident": round(int(line.split()[1]) / 1024, 1)}
    except OSError:
        pass
    import resource

    return {"resident": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def headline_mb(peak: dict) -> float:
    """The one figure per worker the summary lists: allocated on a GPU, resident on a CPU."""
    return peak.get("allocated", peak.get("resident"))
