"""Reading examples from files, and seeded splits. Task-specific preprocessing lives in tasks/."""

from shardtune.data.readers import Row, read_rows
from shardtune.data.splits import few_shot, sample, split_train_validation

__all__ = ["Row", "few_shot", "read_rows", "sample", "split_train_validation"]
