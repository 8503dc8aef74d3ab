"""Parameters that ZeRO-3 partitions: telling them apart, reading them whole, and which
ones stay whole. Apart from sharding.py because tasks use it, and the recipe (which
sharding.py reads) imports the tasks."""

from __future__ import annotations

from contextlib import nullcontext


def partitioned(params) -> bool:
    """True for parameters made inside zero.Init (they carry DeepSpeed's ds_id)."""
    return any(hasattr(p, "ds_id") for p in params)


def is_partitioned(model) -> bool:
    return partitioned(model.parameters())


def full_numel(param) -> int:
    """A parameter's full size: a partitioned one holds an empty placeholder (ds_numel)."""
    return getattr(param, "ds_numel", None) or param.numel()


def full_shape(param) -> tuple[int, ...]:
    """A parameter's full shape (a partitioned one's placeholder is empty: ds_shape)."""
    return tuple(getattr(param, "ds_shape", None) or param.shape)


def held_numel(model) -> int:
    """Elements this rank holds: its partition of partitioned parameters, all of the rest."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())


def gathered_for_forward(model):
    """Gather a partitioned model whole for a forward pass outside the DeepSpeed engine
    (the automatic verbalizer reads the untrained model); nothing to do otherwise."""
    return whole(list(model.parameters()))


def whole(params: list):
    """Read partitioned parameters whole on every rank inside the block (soft tokens
    initialised from the embedding table); a no-op for parameters that are not partitioned."""
    if not partitioned(params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


# The most an adapter parameter may hold and still be kept whole (64 MB in fp32): a
# modules_to_save copy of a 128 k-word embedding table is partitioned like the backbone.
KEEP_WHOLE_CAP = 2**24


def largest_trainable(model) -> int:
    """Elements of the largest trainable parameter up to KEEP_WHOLE_CAP: under ZeRO-3 every
    parameter up to this size stays whole (pass 0 for full fine-tuning)."""
    sizes = [n for p in model.parameters() if p.requires_grad
             if (n := full_numel(p)) <= KEEP_WHOLE_CAP]
    return max(sizes, default=0)


def live_parameters(total: int, layers: int) -> int:
    """How many gathered parameters ZeRO-3 keeps alive at once: two layers' worth (the one
    computing and the one prefetched), at most DeepSpeed's default of 1e9 (which a 70 B
    model's layers reach) and at least 1e7 (tiny models gain nothing from less)."""
    per_layer = total / max(layers, 1)
    return int(min(1e9, max(1e7, 2 * per_layer)))
