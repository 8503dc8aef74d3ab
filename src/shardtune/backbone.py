"""Loading a pretrained backbone and its tokenizer from a hub id, a local folder or a package,
quantised by bitsandbytes when the recipe says so (see quantization.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoTokenizer

from shardtune import quantization
from shardtune.partitions import full_numel
from shardtune.sources import resolve_local

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Never run Python shipped inside a model, tokenizer or run folder (transformers' auto_map):
# with the flag unset, transformers asks on a terminal, and a "y" runs it.
NO_REMOTE_CODE = {"trust_remote_code": False}


@contextmanager
def refusing_remote_code(source):
    """Turn transformers' refusal of custom code into an error that says what to do."""
    from shardtune.errors import RecipeError

    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc) and "custom code" not in str(exc):
            raise
        raise RecipeError(f"'{source}' needs custom Python code of its own (auto_map in its config.json or "
                          "tokenizer_config.json) to load, and shardtune never runs code from a model or run "
                          "folder; use a model whose architecture transformers supports natively") from None


def model_location(recipe) -> str:
    """What from_pretrained gets: an absolute local path, or the hub id as written.

    A GGUF file is dequantised once into a safetensors cache (see gguf_cache)."""
    local = resolve_local(recipe.model.path)
    if recipe.model.gguf_file:
        return str(gguf_cache((local or Path(recipe.model.path)) / recipe.model.gguf_file))
    return str(local) if local is not None else recipe.model.path


def gguf_cache(gguf: Path) -> Path:
    """A transformers folder (fp32 safetensors + tokenizer) made from a GGUF file, once.

    transformers dequantises GGUF on every load (~25 s for a 135 M model); the cache
    reloads in under a second. The folder appears atomically, so workers on one node
    racing to build it never see half of it. SHARDTUNE_CACHE moves it (default
    ~/.cache/shardtune).
    """
    from transformers import AutoModelForCausalLM

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("SHARDTUNE_CACHE", "~/.cache/shardtune")).expanduser() / "gguf" / f"{gguf.stem}-{key}"
    if (root / "config.json").is_file():
        return root
    building = root.with_name(f"{root.name}.building-{os.getpid()}")
    with refusing_remote_code(gguf):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     **NO_REMOTE_CODE)
    # The weights are dequantised fp32 tensors by now; transformers still marks the model
    # as GGUF-quantised and refuses to save it unless the marks are dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(building)
    with refusing_remote_code(gguf):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, **NO_REMOTE_CODE)
    tokenizer.save_pretrained(building)
    (building / "tokenizer.model").unlink(missing_ok=True)  # a second copy of the GGUF, unused
    try:
        building.rename(root)
    except OSError:  # another process finished first
        shutil.rmtree(building, ignore_errors=True)
    return root


def load_kwargs(recipe, *, quantize: bool = True) -> dict:
    """from_pretrained arguments. quantize=False loads the backbone in full precision
    (what `shardtune merge` merges into)."""
    kwargs: dict = {"dtype": DTYPES[recipe.model.dtype], **NO_REMOTE_CODE}
    if (attention := attn_implementation(recipe)) is not None:
        kwargs["attn_implementation"] = attention
    config = quantization.bnb_config(recipe) if quantize else None
    if config is not None:
        kwargs["quantization_config"] = config
        if recipe.cluster.gpus_per_worker > 0 and torch.cuda.is_available():
            # Quantised weights are made on the device they load to; one GPU per worker.
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    return kwargs


def attn_implementation(recipe) -> str | None:
    """What from_pretrained's attn_implementation gets; None leaves transformers' choice
    (sdpa where the model supports it, else eager)."""
    wanted = recipe.model.attn_implementation
    if wanted != "auto":
        if wanted == "flash_attention_2" and not flash_attention_available():
            from shardtune.errors import RunError

            raise RunError("model.attn_implementation: flash_attention_2 needs the flash-attn package and a CUDA "
                           "GPU on every worker (pip install flash-attn); use sdpa or auto")
        return wanted
    gpu = recipe.cluster.gpus_per_worker > 0 and torch.cuda.is_available()
    half = recipe.model.dtype in ("bfloat16", "float16")
    return "flash_attention_2" if gpu and half and flash_attention_available() else None


def flash_attention_available() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def enable_gradient_checkpointing(model) -> None:
    """Keep one layer's activations instead of all: each layer is recomputed in the backward
    pass. Non-reentrant checkpointing (torch's recommended kind, which also works when no
    input of a checkpointed block requires grad, as with a frozen backbone); input grads on
    as peft's prepare_model_for_kbit_training does, for models or peft versions that still
    take the reentrant path; the KV cache off (it is useless in training and conflicts)."""
    from shardtune.errors import RecipeError

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise RecipeError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient "
                          "checkpointing in transformers; set train.gradient_checkpointing: false")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.20's name for it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False


def load_tokenizer(recipe):
    tokenizer = load_tokenizer_from(model_location(recipe))
    if tokenizer.pad_token is None:
        # Decoder-only models often ship without a pad token; padding is masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer_from(location):
    """A tokenizer from a model folder, a hub id or a run's tokenizer/, never with its own code."""
    with refusing_remote_code(location):
        return AutoTokenizer.from_pretrained(location, **NO_REMOTE_CODE)


def load_config(recipe):
    from transformers import AutoConfig

    with refusing_remote_code(recipe.model.path):
        return AutoConfig.from_pretrained(model_location(recipe), **NO_REMOTE_CODE)


def load_model(recipe, task, tokenizer, *, quantize: bool = True) -> torch.nn.Module:
    with refusing_remote_code(recipe.model.path):
        model = task.build_model(model_location(recipe), load_kwargs(recipe, quantize=quantize))
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    quantization.guard_cpu_4bit_gradients(model)
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. A ZeRO-3 partitioned parameter holds an empty
    placeholder; its full size is `ds_numel`. bitsandbytes packs two 4-bit weights per byte
    of a uint8 (or more per element of a float storage dtype): counted as the weights they
    stand for."""
    def size(p):
        n = full_numel(p)
        quant_state = getattr(p, "quant_state", None)
        return quant_state.shape.numel() if quant_state is not None and hasattr(quant_state, "shape") else n
    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    return trainable, total


def meta_model(recipe, task) -> torch.nn.Module:
    """The task model's module tree without weights (for name checks before launch)."""
    from accelerate import init_empty_weights

    config = load_config(recipe)
    with init_empty_weights(), refusing_remote_code(recipe.model.path):
        return task.build_model_from_config(config)
