"""Encoded examples cached on disk in Arrow (Hugging Face `datasets`), memory-mapped by
every rank.

A run's data is read, split, checked and tokenised once per (data files, data and task
sections, seed, tokenizer, encoding code): the driver's preflight does it and writes the
cache; each worker then maps the Arrow files instead of reading and tokenising the whole
data set again, so a worker's memory no longer grows with the data set (on an 8-GPU node
that was eight copies), and a second run on the same data starts from the cache.

An example is stored as one JSON string (its features, target and extra), so every task's
examples fit one schema and nothing is unpickled. The key covers the files' identity
(path, size, modification time), every option that changes the encoding, the tokenizer's
full definition and the source of the encoding code itself: a changed file, option or
encoder is a new key, never a stale hit. A folder is written beside its final name and
renamed into place, so a reader never sees half of it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from shardtune.sources import resolve_local
from shardtune.tasks.base import Example

FORMAT_VERSION = 1
META = "meta.json"


def cache_root() -> Path:
    """SHARDTUNE_CACHE (default ~/.cache/shardtune)/data: the GGUF cache's neighbour."""
    return Path(os.environ.get("SHARDTUNE_CACHE", "~/.cache/shardtune")).expanduser() / "data"


# ----------------------------------------------------------------------------- the key
def data_key(recipe, tokenizer) -> str:
    sources = [recipe.data.train] + ([recipe.data.validation] if recipe.data.validation is not None else [])
    described = {
        "format_version": FORMAT_VERSION, "code": _code_fingerprint(),
        "files": [_file_identity(src.path) for src in sources],
        "data": recipe.data.model_dump(mode="json"), "task": recipe.task.model_dump(mode="json"),
        "seed": recipe.train.seed, "model": [recipe.model.path, recipe.model.gguf_file],  # prompt tasks read its config
        "tokenizer": _tokenizer_identity(tokenizer),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _file_identity(path: str) -> list:
    local = resolve_local(path)
    if local is None or not local.exists():
        return [path]
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    stats = [(f, f.stat()) for f in files]  # one stat a file: a textdir may hold 100 k of them
    return [str(local.resolve())] + [[str(f.relative_to(local)) if f != local else "", st.st_size, st.st_mtime_ns]
                                     for f, st in stats]


def _tokenizer_identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The last call's truncation and padding settings are kept in the backend's state; they
        # are per call, not part of what the tokenizer is.
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        definition = json.dumps(state, sort_keys=True)
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    extras = [type(tokenizer).__name__, tokenizer.special_tokens_map, getattr(tokenizer, "chat_template", None),
              tokenizer.padding_side, tokenizer.truncation_side, getattr(tokenizer, "add_bos_token", None),
              getattr(tokenizer, "add_eos_token", None)]
    return hashlib.sha256((definition + json.dumps(extras, sort_keys=True, default=str)).encode()).hexdigest()


@lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    """The source of everything that turns rows into examples (tasks, prompting, data)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for folder in ("tasks", "prompting", "data"):
        for file in sorted((package / folder).glob("*.py")):
            digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


# ------------------------------------------------------------------- writing, reading
def unwritable() -> str | None:
    """Why the cache cannot be written here (the reason and the fix), or None."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        return f"{root} is not writable ({exc.strerror}); set SHARDTUNE_CACHE to a writable folder"
    return None


@contextmanager
def writing(key: str):
    """An exclusive lock on this key's entry across the processes of this machine (flock:
    released by the kernel if the holder dies, so a killed process never wedges the rest)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write(key: str, splits: dict[str, list[Example]], meta: dict) -> Path:
    """Write the splits' examples and the run's data facts (task state, skipped rows, ...)."""
    from datasets.arrow_writer import ArrowWriter

    final = cache_root() / key
    if (final / META).is_file():
        return final
    staging = final.with_name(f".{key}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for split, examples in splits.items():
        with ArrowWriter(path=str(staging / f"{split}.arrow")) as writer:
            for example in examples:
                writer.write({"example": json.dumps(asdict(example))})
            writer.finalize()
    (staging / META).write_text(json.dumps({**meta, "splits": {s: len(e) for s, e in splits.items()}}))
    try:
        staging.rename(final)
    except OSError:  # another process wrote the same key first: its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return final


def read(key: str) -> tuple[dict[str, ExampleStore], dict] | None:
    """The cached splits (memory-mapped) and facts, or None when this key was never written."""
    folder = cache_root() / key
    if not (folder / META).is_file():
        return None
    from datasets import Dataset

    meta = json.loads((folder / META).read_text())
    stores = {split: ExampleStore(Dataset.from_file(str(folder / f"{split}.arrow"))) for split in meta["splits"]}
    return stores, meta


class ExampleStore:
    """A sequence of Examples backed by a memory-mapped Arrow file; decoded when indexed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        return Example(**json.loads(self.dataset[index]["example"]))

    def __iter__(self) -> Iterator[Example]:
        for start in range(0, len(self), 1000):  # a batch at a time: Arrow reads are per call
            for text in self.dataset[start:start + 1000]["example"]:
                yield Example(**json.loads(text))
