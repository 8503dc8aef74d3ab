"""Seeded, deterministic splits and samples: every worker computes the same ones."""

from __future__ import annotations

import random
from typing import TypeVar

T = TypeVar("T")


def split_train_validation(rows: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out `fraction` of rows (at least one) for validation, chosen by `seed`."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(rows) * fraction))
    held = set(order[:n_val])
    train = [r for i, r in enumerate(rows) if i not in held]
    validation = [r for i, r in enumerate(rows) if i in held]
    return train, validation


def sample(rows: list[T], limit: int | None, seed: int) -> list[T]:
    """A seeded sample of `limit` rows in their original order (all rows if limit is None)."""
    if limit is None or limit >= len(rows):
        return rows
    keep = set(random.Random(seed).sample(range(len(rows)), limit))
    return [r for i, r in enumerate(rows) if i in keep]


def few_shot(rows: list[T], k: int, label_of, seed: int) -> list[T]:
    """A seeded draw of k rows per label (data.few_shot_per_class), in the file's order.
    `label_of(row)` reads a row's label; a row it cannot read is left for the task to
    report (or skip) if drawn."""
    from shardtune.errors import DataError

    by_label: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        try:
            by_label.setdefault(label_of(row), []).append(i)
        except DataError:
            pass
    short = {label: len(ids) for label, ids in by_label.items() if len(ids) < k}
    if short:
        raise DataError(f"data.few_shot_per_class is {k}, but label(s) have fewer training rows: {short}; "
                        "lower few_shot_per_class")
    rng = random.Random(seed)
    chosen = sorted(i for label in sorted(by_label) for i in rng.sample(by_label[label], k))
    return [rows[i] for i in chosen]
