"""The interface every task implements (`Task`), and the capabilities a task may add, each
a typed protocol that its registration declares (registry.Can). Structural (Protocols),
not base classes; no torch at import time (the recipe imports the task modules)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Protocol

from typing import TYPE_CHECKING

from shardtune.data import Row

if TYPE_CHECKING:
    import torch


@dataclass
class Example:
    """One tokenised example. `index` identifies it across ranks when predictions are gathered."""

    index: int
    features: dict[str, list[int]]
    target: Any = None  # what the metrics compare with (a label id, a score, spans...)
    extra: dict = field(default_factory=dict)


def readable(rows: list[Row], read) -> list:
    """`read(row)` for the rows it can read. Label fitting uses this: a row whose label is
    unreadable is reported (or skipped) by `encode`, which names the row."""
    from shardtune.errors import DataError

    values = []
    for row in rows:
        try:
            values.append(read(row))
        except DataError:
            pass
    return values


def read_label(row: Row, column: str, role: str = "label") -> str:
    """A row's class label as text (a float like 1.0 read as "1"); DataError naming the row."""
    from shardtune.errors import DataError

    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{row.where}: no label in column '{column}' (columns: {sorted(row.values)}); "
                        f"map it with data.columns.{role}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def mapped_text(row: Row, column: str, mapping: dict[str, str], option: str, role: str) -> str:
    """The text a row's label stands for (task.response_map, task.target_map): labelled data
    turned into text targets."""
    from shardtune.errors import DataError

    key = read_label(row, column, role)
    if key not in mapping:
        raise DataError(f"{row.where}: '{column}' value {row.get(column)!r} is not in task.{option} ({sorted(mapping)})")
    return mapping[key]


def class_labels(rows: list[Row], read, column: str) -> list[str]:
    """The distinct labels of the training rows, numbers in numeric order ("2" < "10")."""
    from shardtune.errors import DataError

    found = set(readable(rows, read))
    if len(found) < 2:
        raise DataError(f"the training data has {len(found)} distinct label(s) in column '{column}'; "
                        "classification needs at least two")
    return sorted(found, key=lambda label: (0, float(label), "") if label.lstrip("-").replace(".", "", 1).isdigit()
                  else (1, 0.0, label))


def label_head_config(labels: list[str]) -> dict:
    """The from_pretrained/config arguments of a head with one output per label."""
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}}


# Elements of fp32 logits upcast at once when scoring tokens: 2^27 x 4 B = 512 MB. An 8 B
# model's default evaluation batch (32 x 2048 positions x 128 k words) would be 34 GB at once.
NLL_CHUNK_ELEMENTS = 2**27


def token_nll(logits, labels, ignore_index: int = -100, chunk_elements: int | None = None):
    """Per-position negative log-likelihood of `labels` under `logits` (batch, positions,
    vocabulary), upcast to fp32 a slice of positions at a time, never the whole tensor."""
    import torch

    chunk_elements = chunk_elements or NLL_CHUNK_ELEMENTS
    batch, positions, vocabulary = logits.shape
    step = max(1, chunk_elements // max(1, batch * vocabulary))
    labels = labels.to(logits.device)
    pieces = [torch.nn.functional.cross_entropy(logits[:, start:start + step].float().transpose(1, 2),
                                                labels[:, start:start + step], ignore_index=ignore_index,
                                                reduction="none")
              for start in range(0, positions, step)]
    return torch.cat(pieces, dim=1) if pieces else logits.new_zeros(batch, 0, dtype=torch.float32)


def no_grad(method):
    """torch.no_grad() as a decorator that imports torch when called, not when defined."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return method(*args, **kwargs)
    return wrapper


class Task(Protocol):
    """What every task has."""

    #: peft TaskType name: decides which wrapper peft puts around the backbone
    peft_task_type: str

    def __init__(self, recipe) -> None: ...

    def fit_labels(self, train_rows: list[Row]) -> None:
        """Fix the label set (from the recipe, else from the training rows)."""

    def build_model(self, model_path: str, load_kwargs: dict) -> torch.nn.Module:
        """The backbone with this task's head, freshly initialised where new."""

    def build_model_from_config(self, config) -> torch.nn.Module:
        """The same architecture from a config alone (used on the meta device for checks)."""

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """Module names that train in full and are saved with an adapter."""

    #: batch keys that hold targets: dropped before an evaluation forward
    target_keys: tuple[str, ...]

    def encode(self, rows: list[Row], tokenizer, *, with_targets: bool = True) -> list[Example]:
        """Validate and tokenise rows; raise DataError naming the row on bad input."""

    def collate(self, examples: list[Example], tokenizer) -> dict[str, torch.Tensor]:
        """A padded batch the model's forward accepts (with `labels` when targets exist)."""

    def outputs(self, model_output, batch: dict) -> list:
        """One output per example of an evaluation forward (what metrics and predictions read)."""

    def metrics(self, outputs: list, examples: list[Example]) -> dict[str, float]:
        """Validation loss and task metrics from the gathered outputs (one row per example)."""

    def predictions(self, outputs: list, examples: list[Example], rows: list[Row]) -> list[dict]:
        """One JSON-serialisable record per input row."""

    def state(self) -> dict:
        """What must be saved with a run to rebuild the task (label names, ...)."""

    def load_state(self, state: dict) -> None: ...


# ---------------------------------------------------------------- the capabilities
class ChecksTokenizer(Protocol):
    def check(self, tokenizer) -> None:
        """Rules that need the tokenizer (label words, the slot token); RecipeError naming the field."""


class FitsOnModel(Protocol):
    def fit_verbalizer(self, model, tokenizer, examples: list[Example], device, rank: int = 0, world: int = 1,
                       log=print) -> None:
        """Fit what the task needs from the untrained model, before the adapter is applied."""


class WrapsModel(Protocol):
    def wrap(self, model: torch.nn.Module, tokenizer, saved: str | None = None) -> torch.nn.Module:
        """A module around the adapted model (its forward is what trains); `saved`: a run's folder."""


class PreparesForward(Protocol):
    def before_forward(self, model, tokenizer, device) -> None:
        """Once before each evaluation pass (e.g. a content-free calibration input)."""


class Generates(Protocol):
    def prompt_row(self, text: str, where: str) -> Row:
        """A user's prompt (`shardtune generate --prompt`) as the row a data file would hold."""

    def generate(self, model, tokenizer, rows: list[Row], *, batch_size: int = 8,
                 max_new_tokens: int | None = None) -> list[dict]:
        """One record per row with the generated text as `prediction`."""


class GeneratesAtEval(Protocol):
    def eval_outputs(self, model, batch: dict, tokenizer) -> list:
        """The per-example outputs of an evaluation batch, targets included in `batch`: replaces
        the plain forward when evaluation generates."""


class HasClassLabels(Protocol):
    def row_label(self, row: Row) -> str:
        """A row's class label (few-shot draws group rows by it)."""


class Augments(Protocol):
    def augment(self, row: Row, augmenter) -> Row:
        """A label-preserving variant of a training row (data.augment)."""


class Chats(Protocol):
    def reply(self, model, tokenizer, conversation: list[dict], message: str, *,
              max_new_tokens: int | None = None) -> tuple[str, list[dict]]:
        """The model's answer to a user's message, and the conversation to continue from."""


@dataclass(frozen=True)
class ReportTable:
    """A table of the run report (`shardtune report`): plain strings and numbers."""
    title: str
    columns: list[str]
    rows: list[list]
    note: str = ""


class Reports(Protocol):
    def report_tables(self, records: list[dict]) -> list[ReportTable]:
        """Tables for the run report from this task's prediction records on a labelled split:
        `predictions(...)` records, or `generate(...)` records for a task that generates."""


class ZeroShot(Protocol):
    def check(self, tokenizer) -> None: ...

    def wrap(self, model: torch.nn.Module, tokenizer, saved: str | None = None) -> torch.nn.Module: ...


def protocol_methods(protocol: type) -> list[str]:
    """The methods a capability protocol asks for."""
    return [name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")]
