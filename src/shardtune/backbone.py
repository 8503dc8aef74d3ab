"""Loading a pretrained backbone and its tokenizer from a hub id, a local folder or a package.

Quantisation (bitsandbytes) will plug in here through `load_kwargs`; the recipe
already has the section, and the validator refuses modes that are not built yet.
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from shardtune.sources import resolve_local

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_location(recipe) -> str:
    """What from_pretrained gets: an absolute local path, or the hub id as written."""
    local = resolve_local(recipe.model.path)
    return str(local) if local is not None else recipe.model.path


def load_kwargs(recipe) -> dict:
    kwargs = {"dtype": DTYPES[recipe.model.dtype]}
    if recipe.model.gguf_file:
        kwargs["gguf_file"] = recipe.model.gguf_file
    return kwargs


def load_tokenizer(recipe):
    kwargs = {"gguf_file": recipe.model.gguf_file} if recipe.model.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model_location(recipe), **kwargs)
    if tokenizer.pad_token is None:
        # Decoder-only models often ship without a pad token; padding is masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(recipe, task, tokenizer) -> torch.nn.Module:
    model = task.build_model(model_location(recipe), load_kwargs(recipe))
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; call before DeepSpeed partitions the model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def meta_model(recipe, task) -> torch.nn.Module:
    """The task model's module tree without weights (for name checks before launch)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    kwargs = {"gguf_file": recipe.model.gguf_file} if recipe.model.gguf_file else {}
    config = AutoConfig.from_pretrained(model_location(recipe), **kwargs)
    with init_empty_weights():
        return task.build_model_from_config(config)
