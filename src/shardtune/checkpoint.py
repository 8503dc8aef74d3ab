"""The training state on disk: one writer, one reader, and nothing in it is unpickled.

A checkpoint folder holds:
  state/                  DeepSpeed's checkpoint (trainable weights, optimizer, scheduler),
                          read back with torch.load(weights_only=True) and an allow-list of
                          the few plain-data classes DeepSpeed pickles into it
  trainstate.json         epochs done, micro-batches done in the current epoch, the
                          evaluation history, the logged steps, the seed and the recipe's
                          fingerprint
  rank-N.safetensors      each rank's torch RNG state and running loss
  portable.safetensors    the trainable parameters' fp32 weights and Adam moments whole, the
                          optimizer step and the schedule: what a resume on another number
                          of workers loads, as DeepSpeed's shards are cut for the world that
                          wrote them (adapters always; fully fine-tuned models up to
                          PORTABLE_LIMIT elements)
  committed               in Ray's storage, once every rank's files are there (rayworker.py)

A checkpoint in a shared run folder is a way into every node: anyone who can write a
pickle there gets it run by the next resume. So the loss-scaler, enum and fragment
classes below are the only objects allowed, and a file that wants anything else is
refused with a message instead of being executed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from shardtune.errors import RunError
from shardtune.partitions import full_numel, full_shape, partitioned
from shardtune.rundir import TRAIN_STATE

DEEPSPEED_TAG = "state"

PORTABLE = "portable.safetensors"
PORTABLE_LIMIT = 2**30          # trainable elements: 12 GB of fp32 weights and moments on rank 0
MOMENTS = ("exp_avg", "exp_avg_sq")

# How the global batch is split: a resume may change these if the global batch stays
# (the data order follows the global batch only, pipeline.epoch_micro_batches).
WORLD_FIELDS = {("cluster", "workers"), ("train", "gradient_accumulation_steps")}
# Recipe fields that do not change what a run computes: a resume may differ in these.
NEUTRAL_FIELDS = WORLD_FIELDS | {"output", "slurm", ("cluster", "address"), ("cluster", "max_failures"),
                  ("cluster", "placement"), ("cluster", "shared_storage"), ("cluster", "cpus_per_worker"),
                  ("train", "log_every_steps")}


@dataclass
class TrainState:
    epoch: int                      # epochs finished
    micro_batches_done: int = 0     # in epoch `epoch` (a mid-epoch stop), else 0
    history: list = field(default_factory=list)
    steps: list = field(default_factory=list)   # the logged steps (loss, lr, tokens/s): the report's curves
    seed: int = 0
    fingerprint: str = ""
    world: int = 0                  # workers that wrote it
    accumulation: int = 0           # the gradient accumulation they ran with
    portable: bool = False          # PORTABLE was written


def result_fields(recipe_dict: dict) -> dict:
    """The recipe without the fields that do not change the result (NEUTRAL_FIELDS), with
    the global batch that the world fields make."""
    kept = {"global_batch": global_batch(recipe_dict)}
    for section, values in recipe_dict.items():
        if section in NEUTRAL_FIELDS:
            continue
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if (section, k) not in NEUTRAL_FIELDS}
        kept[section] = values
    return kept


def fingerprint(recipe_dict: dict) -> str:
    return hashlib.sha256(json.dumps(result_fields(recipe_dict), sort_keys=True).encode()).hexdigest()[:16]


def recipe_differences(old: dict, new: dict) -> list[str]:
    """'section.key: old -> new' for every result-changing field that differs."""
    old, new = result_fields(old), result_fields(new)
    changes = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    changes.append(f"{section}.{key}: {_short(a.get(key))} -> {_short(b.get(key))}")
        elif a != b:
            changes.append(f"{section}: {_short(a)} -> {_short(b)}")
    return changes


def global_batch(recipe_dict: dict) -> int:
    train = recipe_dict["train"]
    return train["micro_batch_size"] * train["gradient_accumulation_steps"] * recipe_dict["cluster"]["workers"]


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def save(engine, directory: Path, state: TrainState, rank: int, rank_tensors: dict[str, torch.Tensor]) -> None:
    """Every rank calls this: DeepSpeed writes its shards, each rank its own tensors, rank 0
    the portable state and the JSON, last, so that a checkpoint with one is complete."""
    from safetensors.torch import save_file

    engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    save_file({k: v.contiguous() for k, v in rank_tensors.items()}, str(directory / f"rank-{rank}.safetensors"))
    state.portable = _save_portable(engine, directory / PORTABLE, rank)
    if rank == 0:
        (directory / TRAIN_STATE).write_text(json.dumps(asdict(state), indent=1))


def exists(directory: str | Path | None) -> bool:
    return directory is not None and (Path(directory) / TRAIN_STATE).is_file()


def _read_state(directory: Path, expected_fingerprint: str) -> TrainState:
    try:
        state = TrainState(**json.loads((directory / TRAIN_STATE).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise RunError(f"the checkpoint {directory} is damaged ({TRAIN_STATE}: {exc}); delete it to start "
                       "afresh") from None
    if state.fingerprint != expected_fingerprint:
        raise RunError(f"the checkpoint {directory} was written by a different recipe (or an earlier shardtune); "
                       "resume it with the recipe it was started with, or start afresh without --resume")
    return state


def load(engine, directory: Path, rank: int, world: int,
         expected_fingerprint: str) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Restore the engine from `directory`; returns the loop's state and this rank's tensors.

    On the world that wrote it, DeepSpeed's own shards (bit for bit). On another, the
    portable state; the rank tensors are then rank 0's sum of the running losses, and no
    RNG state (the loop reseeds)."""
    from safetensors.torch import load_file

    state = _read_state(directory, expected_fingerprint)
    if state.world == world:
        _load_deepspeed(engine, directory)
        rank_file = directory / f"rank-{rank}.safetensors"
        return state, load_file(str(rank_file)) if rank_file.is_file() else {}
    if not state.portable:
        raise RunError(f"the checkpoint {directory} was written by {state.world} workers and holds no portable "
                       f"state (a full fine-tuning of over {PORTABLE_LIMIT:,} parameters is kept in DeepSpeed's "
                       f"shards only); resume it with cluster.workers: {state.world}")
    _load_portable(engine, directory / PORTABLE)
    # Rank 0 carries the old ranks' running losses summed (the epoch's mean reduces them); the
    # others start from zeros of the same shape.
    losses = [load_file(str(directory / f"rank-{r}.safetensors"))["loss_sum"]
              for r in (range(state.world) if rank == 0 else [0])]
    loss_sum = torch.stack(losses).sum(0) if rank == 0 else torch.zeros_like(losses[0])
    return state, {"loss_sum": loss_sum}


def _load_deepspeed(engine, directory: Path) -> None:
    engine.checkpoint_engine = _weights_only(engine.checkpoint_engine)
    try:
        engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_module_strict=False)
    except Exception as exc:
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            raise RunError(f"refused to load the checkpoint in {directory}: it holds Python objects that are not "
                           "plain tensors or DeepSpeed's own state, and loading them could run code. If you did "
                           "not write it, someone else did; delete the folder and start afresh") from None
        raise


# ------------------------------------------------------------------ the portable state
def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def _save_portable(engine, path: Path, rank: int) -> bool:
    """Each trainable parameter's fp32 weight and moments, gathered whole (every rank takes
    part in the gathers; rank 0 writes). Through DeepSpeed's fragment API, which reads them
    from whatever ZeRO stage and precision partitioned them."""
    from safetensors.torch import save_file

    params = _trainable(engine)
    if sum(full_numel(p) for _, p in params) > PORTABLE_LIMIT:
        return False
    _link_moments(engine)
    tensors = {}
    for name, param in params:
        for key in ("fp32", *MOMENTS):
            value = _get_full(engine, param, key)
            if rank == 0:
                tensors[f"{key}/{name}"] = value.detach().float().cpu().reshape(full_shape(param)).contiguous()
    if rank == 0:
        metadata = {"optimizer_step": str(_optimizer_step(engine)), "global_steps": str(engine.global_steps),
                    "scheduler": json.dumps(engine.lr_scheduler.state_dict())}
        save_file(tensors, str(path), metadata=metadata)
    return True


def _load_portable(engine, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata, tensors = file.metadata(), {key: file.get_tensor(key) for key in file.keys()}
    params = _trainable(engine)
    missing = [name for name, _ in params if f"fp32/{name}" not in tensors]
    if missing:
        raise RunError(f"the checkpoint's {path.name} lacks {len(missing)} of this model's trainable parameters "
                       f"(first: {missing[0]}); it was written for another model or adapter")
    _create_optimizer_state(engine)
    for name, param in params:
        _set_model_weight(param, tensors[f"fp32/{name}"])
        for key in ("fp32", *MOMENTS):
            _set_full(engine, param, key, tensors[f"{key}/{name}"])
    step = float(metadata["optimizer_step"])
    base = engine.basic_optimizer
    for param_state in base.state.values():
        param_state["step"] = torch.tensor(step)  # torch's AdamW keeps it as a tensor
    engine.lr_scheduler.load_state_dict(json.loads(metadata["scheduler"]))
    for group, lr in zip(base.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps = int(metadata["global_steps"])
    engine.global_samples = engine.global_steps * engine.train_batch_size()


def _create_optimizer_state(engine) -> None:
    """torch's AdamW creates its state at the first step, and DeepSpeed links the moments'
    fragments to the parameters then; a resumed engine has not stepped, so create both."""
    base = engine.basic_optimizer
    # What the torch optimizer updates: ZeRO-3's flat fp32 partitions, which it puts in the
    # param groups only for the duration of each step; else what its param groups hold.
    updated = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [
        tensor for group in base.param_groups for tensor in group["params"]]
    for tensor in updated:
        if not base.state.get(tensor):
            base.state[tensor] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(tensor),
                                  "exp_avg_sq": torch.zeros_like(tensor)}
    _link_moments(engine)


def _link_moments(engine) -> None:
    """ZeRO-1/2 and the bf16 optimizer link each parameter to its moments' fragments after
    their first step, once: DeepSpeed 0.19 does it after the first parameter group's step,
    when the other groups have no state yet, so their moments stay unlinked (and the
    fragment API cannot read them). Link again, with every group's state there."""
    if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def _get_full(engine, param, key: str) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(param) if key == "fp32" else safe_get_full_optimizer_state(param, key)
    if value is not None:
        return value
    master = _master(engine, param)  # not partitioned: the torch optimizer's own tensors
    return master if key == "fp32" else engine.basic_optimizer.state[master][key]


def _set_full(engine, param, key: str, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if partitioned([param]) or hasattr(param, "_hp_mapping"):  # DeepSpeed's fp32 copy and moments
        (safe_set_full_fp32_param(param, value) if key == "fp32" else
         safe_set_full_optimizer_state(param, value.to(param.device), key))
        return
    master = _master(engine, param)
    target = master if key == "fp32" else engine.basic_optimizer.state[master][key]
    with torch.no_grad():
        target.copy_(value.reshape(target.shape))


def _master(engine, param) -> torch.Tensor:
    """The tensor the torch optimizer updates for `param` without ZeRO: the parameter
    itself in fp32, its fp32 copy in DeepSpeed's bf16/fp16 optimizer at stage 0."""
    optimizer = engine.optimizer
    for low, high in zip(getattr(optimizer, "fp16_groups", ()), getattr(optimizer, "fp32_groups", ())):
        for lp, master in zip(low, high):
            if lp is param:
                return master
    return param


def _set_model_weight(param, value: torch.Tensor) -> None:
    """The weight the model computes with (its low-precision copy, when there is one)."""
    if partitioned([param]):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(value.reshape(param.shape))
    else:
        with torch.no_grad():
            param.data.copy_(value.reshape(param.shape))


def _optimizer_step(engine) -> float:
    """Adam's step count (its bias correction), the same for every parameter."""
    return next((float(s["step"]) for s in engine.basic_optimizer.state.values() if "step" in s), 0.0)


def _weights_only(checkpoint_engine):
    """DeepSpeed's torch checkpoint engine loads with weights_only=False; this one doesn't."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    if type(checkpoint_engine) is TorchCheckpointEngine:
        checkpoint_engine.__class__ = WeightsOnlyCheckpointEngine
        return checkpoint_engine
    raise RunError(f"DeepSpeed's checkpoint engine is {type(checkpoint_engine).__name__}; shardtune loads "
                   "checkpoints only through the torch engine, where it can refuse pickled code")


def _deepspeed_safe_globals() -> list:
    """The plain-data classes DeepSpeed's ZeRO optimizer states pickle (found by loading
    stage 0-3, fp32 and bf16 checkpoints with weights_only=True)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
