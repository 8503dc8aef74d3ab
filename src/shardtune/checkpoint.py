"""The training state on disk: one writer, one reader, and nothing in it is unpickled.

A checkpoint folder holds:
  state/                  DeepSpeed's checkpoint (trainable weights, optimizer, scheduler),
                          read back with torch.load(weights_only=True) and an allow-list of
                          the few plain-data classes DeepSpeed pickles into it
  trainstate.json         epochs done, micro-batches done in the current epoch, the
                          evaluation history, the logged steps, the seed and the recipe's
                          fingerprint
  rank-N.safetensors      each rank's torch RNG state and running loss
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
from shardtune.rundir import TRAIN_STATE

DEEPSPEED_TAG = "state"

# Recipe fields that do not change what a run computes: a resume may differ in these.
NEUTRAL_FIELDS = {"output", "slurm", ("cluster", "address"), ("cluster", "max_failures"),
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


def result_fields(recipe_dict: dict) -> dict:
    """The recipe without the fields that do not change the result (NEUTRAL_FIELDS)."""
    kept = {}
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


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def save(engine, directory: Path, state: TrainState, rank: int, rank_tensors: dict[str, torch.Tensor]) -> None:
    """Every rank calls this: DeepSpeed writes its shards, each rank its own tensors, rank 0 the JSON."""
    from safetensors.torch import save_file

    engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    save_file({k: v.contiguous() for k, v in rank_tensors.items()}, str(directory / f"rank-{rank}.safetensors"))
    if rank == 0:
        (directory / TRAIN_STATE).write_text(json.dumps(asdict(state), indent=1))


def exists(directory: str | Path | None) -> bool:
    return directory is not None and (Path(directory) / TRAIN_STATE).is_file()


def load(engine, directory: Path, rank: int, expected_fingerprint: str) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Restore the engine from `directory`; returns the loop's state and this rank's tensors."""
    from safetensors.torch import load_file

    try:
        state = TrainState(**json.loads((directory / TRAIN_STATE).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise RunError(f"the checkpoint {directory} is damaged ({TRAIN_STATE}: {exc}); delete it to start "
                       "afresh") from None
    if state.fingerprint != expected_fingerprint:
        raise RunError(f"the checkpoint {directory} was written by a different recipe; resume it with the recipe "
                       "it was started with, or start afresh without --resume")
    engine.checkpoint_engine = _weights_only(engine.checkpoint_engine)
    try:
        engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_module_strict=False)
    except Exception as exc:
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            raise RunError(f"refused to load the checkpoint in {directory}: it holds Python objects that are not "
                           "plain tensors or DeepSpeed's own state, and loading them could run code. If you did "
                           "not write it, someone else did; delete the folder and start afresh") from None
        raise
    rank_file = directory / f"rank-{rank}.safetensors"
    tensors = load_file(str(rank_file)) if rank_file.is_file() else {}
    return state, tensors


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
