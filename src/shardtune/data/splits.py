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
