"""The data pipeline every rank and the driver share: read, split, sample, drop bad rows,
tokenise, augment per epoch, and cut each rank's micro-batches and evaluation shard.

Same result on every rank: every choice is seeded. The encoded examples are cached in
Arrow (cache.py): the driver's preflight reads and tokenises once, and every worker maps
the cache instead of holding the rows and examples itself.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from shardtune.data import cache
from shardtune.data.readers import read_rows
from shardtune.data.splits import few_shot, sample, split_train_validation
from shardtune.errors import DataError

if TYPE_CHECKING:
    from shardtune.recipe import Recipe


@dataclass
class Data:
    train_rows: list | None  # None when the examples came from the cache (nothing was read)
    val_rows: list | None
    train_examples: Sequence  # a list, or a memory-mapped cache.ExampleStore
    val_examples: Sequence
    skipped: dict  # split -> bad rows left out (data.on_bad_row: skip)
    problems: list  # the first few of those rows' problems, for the log
    val_rows_sha256: str = ""  # which rows the validation split holds (rows_fingerprint)
    cached: bool = False  # the examples were mapped from the cache


def load_data(recipe: Recipe, task, tokenizer, *, encode: bool = True) -> Data:
    """The run's examples, with the task's labels fixed: from the cache when this data, task
    and tokenizer were encoded before, else read, split, sampled, checked and tokenised
    here (and cached). encode=False: the rows only (zero-shot inference and `eval RUN`
    tokenise just what they score). Augmented runs re-encode their rows every epoch, so
    they hold the rows and skip the cache."""
    if not (encode and recipe.data.cache and recipe.data.augment is None):
        return _read_and_encode(recipe, task, tokenizer, encode)
    if (problem := cache.unwritable()) is not None:  # e.g. a read-only home on a cluster node
        print(f"warning: not caching the encoded data: {problem}", file=sys.stderr)
        return _read_and_encode(recipe, task, tokenizer, encode)
    key = cache.data_key(recipe, tokenizer)
    # One process per machine encodes a missing entry; the others wait, then map it (the
    # 8 ranks of a node whose cache the driver could not write, e.g. on another machine).
    with cache.writing(key):
        if (found := cache.read(key)) is not None:
            stores, meta = found
            task.load_state(meta["task_state"])
            return Data(None, None, stores["train"], stores["validation"], meta["skipped"], meta["problems"],
                        meta["val_rows_sha256"], cached=True)
        data = _read_and_encode(recipe, task, tokenizer, encode)
        cache.write(key, {"train": data.train_examples, "validation": data.val_examples},
                    {"task_state": task.state(), "skipped": data.skipped, "problems": data.problems,
                     "val_rows_sha256": data.val_rows_sha256})
    return data


def _read_and_encode(recipe: Recipe, task, tokenizer, encode: bool) -> Data:
    skip = recipe.data.on_bad_row == "skip"
    bad_train: list[str] | None = [] if skip else None
    bad_val: list[str] | None = [] if skip else None
    train_rows = read_rows(recipe.data.train, bad_train, recipe.data.max_chars)
    if recipe.data.validation is not None:
        val_rows = read_rows(recipe.data.validation, bad_val, recipe.data.max_chars)
    else:
        train_rows, val_rows = split_train_validation(train_rows, recipe.data.validation_split,
                                                      recipe.train.seed)
    if recipe.data.few_shot_per_class:
        train_rows = few_shot(train_rows, recipe.data.few_shot_per_class, task.row_label, recipe.train.seed)
    train_rows = sample(train_rows, recipe.data.max_train_examples, recipe.train.seed)
    val_rows = sample(val_rows, recipe.data.max_eval_examples, recipe.train.seed)
    task.fit_labels(train_rows)
    if skip:
        train_rows = drop_bad_rows(train_rows, task, tokenizer, bad_train, recipe.data.train.path)
        val_rows = drop_bad_rows(val_rows, task, tokenizer, bad_val,
                                 (recipe.data.validation or recipe.data.train).path)
    skipped = {"train": len(bad_train or []), "validation": len(bad_val or [])}
    examples = [task.encode(rows, tokenizer) if encode else [] for rows in (train_rows, val_rows)]
    return Data(train_rows, val_rows, *examples, skipped, ((bad_train or []) + (bad_val or []))[:5],
                rows_fingerprint(val_rows))


def rows_fingerprint(rows: list) -> str:
    """Which rows these are (their file:line, in order): a run records its validation split's,
    so that `shardtune eval RUN` can rebuild that split later and know it is the same."""
    import hashlib

    return hashlib.sha256("\n".join(row.where for row in rows).encode()).hexdigest()


def drop_bad_rows(rows: list, task, tokenizer, bad: list[str], path: str, with_targets: bool = True) -> list:
    """The rows that encode on their own; the others' problems go to `bad`. A file that is
    mostly bad is not what the recipe says it is: that stays an error."""
    good = []
    for row in rows:
        try:
            task.encode([row], tokenizer, with_targets=with_targets)
            good.append(row)
        except DataError as exc:
            bad.append(str(exc))
    if not good or len(bad) > len(good):
        raise DataError([f"'{path}': {len(bad)} of {len(bad) + len(good)} rows do not fit the task, so the file is "
                         "probably not the format or columns the recipe says; the first problems:", *bad[:3]])
    return good


def check_first_rows(recipe: Recipe, task, tokenizer, limit: int = 16) -> int:
    """`shardtune validate`'s look at the data: the first rows of each file are read and
    encoded as training will, so a column the file does not have (a typo in data.columns)
    fails validation with file:line instead of the run. Returns the rows checked."""
    checked = 0
    sources = [recipe.data.train] + ([recipe.data.validation] if recipe.data.validation is not None else [])
    for source in sources:
        skip = recipe.data.on_bad_row == "skip"
        bad: list[str] | None = [] if skip else None
        rows = read_rows(source, bad, recipe.data.max_chars, limit=limit)
        if source is recipe.data.train and not _two_labels(task, rows):
            rows = read_rows(source, bad, recipe.data.max_chars)  # a file sorted by label: its labels are further on
        task.fit_labels(rows)
        rows = rows[::max(1, len(rows) // limit)][:limit]  # every label's rows, when the whole file was read
        if skip:
            drop_bad_rows(rows, task, tokenizer, bad, source.path)  # an error when most rows are bad
        else:
            task.encode(rows, tokenizer)
        checked += len(rows)
    return checked


def _two_labels(task, rows) -> bool:
    from shardtune.tasks import Can
    from shardtune.tasks.base import readable
    from shardtune.tasks.registry import kind_of_task

    return not kind_of_task(task).can(Can.CLASS_LABELS) or len(set(readable(rows, task.row_label))) >= 2


def augmented_examples(recipe: Recipe, task, tokenizer, train_rows, epoch: int):
    """This epoch's training examples with a fresh, seeded draw of augmentations."""
    from shardtune.data.augment import Augmenter

    augmenter = Augmenter(recipe.data.augment, seed=recipe.train.seed * 100_003 + epoch)
    rows = [task.augment(row, augmenter) if augmenter.should_augment() else row for row in train_rows]
    return task.encode(rows, tokenizer)


def epoch_micro_batches(n_examples: int, world: int, rank: int, micro: int, accum: int,
                        seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches (example indices) for one epoch.

    Optimizer step s takes the s-th block of the epoch's seeded order, micro x accum x world
    examples, and rank r micro-batch j of it. So what a step trains on depends on the
    global batch only, not on how it is split: a run resumed on another world size (the
    accumulation changed to keep the global batch) continues with the very same batches,
    and the steps done are always a prefix of the order. Every rank gets the same number of
    micro-batches, a multiple of the accumulation: ZeRO's collectives hang if one rank steps
    more often than another. An incomplete last block is shared out evenly when it still
    gives every micro-batch an example, else left for the next epoch's shuffle.
    """
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_step, per_rank = micro * accum * world, micro * accum
    full, left = divmod(n_examples, per_step)
    batches = []
    for start in range(0, full * per_step, per_step):
        mine = order[start + rank * per_rank:start + (rank + 1) * per_rank]
        batches += [mine[j * micro:(j + 1) * micro] for j in range(accum)]
    share = left // world
    if share >= accum:
        mine = order[full * per_step + rank * share:full * per_step + (rank + 1) * share]
        batches += [mine[j * share // accum:(j + 1) * share // accum] for j in range(accum)]
    return batches


def optimizer_steps_per_epoch(n_examples: int, world: int, train) -> int:
    micro = len(epoch_micro_batches(n_examples, world, 0, train.micro_batch_size,
                                    train.gradient_accumulation_steps, train.seed, 0))
    steps = micro // train.gradient_accumulation_steps
    if steps == 0:
        raise DataError(f"{n_examples} training examples are too few for one optimizer step "
                        f"with {world} workers x micro_batch_size {train.micro_batch_size} x "
                        f"gradient_accumulation_steps {train.gradient_accumulation_steps}; lower those")
    return steps


def eval_shard(n_examples: int, world: int, rank: int) -> list[int]:
    """Strided shard, padded with repeats so every rank runs the same number of forwards."""
    mine = list(range(rank, n_examples, world))
    per_rank = math.ceil(n_examples / world)
    return mine + [mine[-1] if mine else 0] * (per_rank - len(mine))


class _Collate:
    """A micro-batch of indices -> (examples in it, collated tensors); a class, not a
    closure, so that DataLoader workers started by spawn can receive it too."""

    def __init__(self, examples, task, tokenizer):
        self.examples, self.task, self.tokenizer = examples, task, tokenizer

    def __call__(self, micro: list[int]):
        return len(micro), self.task.collate([self.examples[i] for i in micro], self.tokenizer)


def collated_batches(examples, micro_batches: list[list[int]], task, tokenizer, *, workers: int, pin: bool):
    """The micro-batches' tensors in order. With workers, DataLoader processes collate the
    next batches while the model computes, into pinned memory on a GPU (so the copy to the
    device can overlap too); without, collation runs in the training process."""
    collate = _Collate(examples, task, tokenizer)
    if workers == 0:
        return map(collate, micro_batches)
    from torch.utils.data import DataLoader

    return iter(DataLoader(micro_batches, batch_size=None, shuffle=False, collate_fn=collate, num_workers=workers,
                           pin_memory=pin, prefetch_factor=4))
