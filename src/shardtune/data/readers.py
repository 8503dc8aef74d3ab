"""Read a data source into rows: dicts of column -> value, each knowing where it came from.

The standard library's csv and json do the parsing; what this module adds is the
error contract: a malformed file is reported with its path and line (or record),
never half-read. With `bad` (a list) a malformed line or record is recorded there and
left out instead (`data.on_bad_row: skip`); a file that is unreadable as a whole
(not JSON at all, no header) is always an error.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from shardtune.errors import DataError
from shardtune.data.schema import DataSource
from shardtune.sources import resolve_local


@dataclass(frozen=True)
class Row:
    values: dict
    where: str  # "file:line" or "file#record", for error messages

    def get(self, column: str):
        return self.values.get(column)


def read_rows(source: DataSource, bad: list[str] | None = None, max_chars: int | None = None,
              limit: int | None = None) -> list[Row]:
    """Every row of the source (its first `limit` rows: jsonl, csv, tsv and parquet stop
    reading there); a bad row raises DataError with file:line, or, with `bad`, is noted there."""
    path = resolve_local(source.path)
    if path is None or not path.exists():
        raise DataError(f"data file '{source.path}' does not exist")
    if path.is_file() and not path.stat().st_size:
        raise DataError(f"'{source.path}' is empty")
    fmt = source.resolved_format
    readers = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_delimited,
               "tsv": _read_delimited, "textdir": _read_textdir, "conll": _read_conll,
               "wordtag": _read_wordtag, "squad": _read_squad, "parquet": _read_parquet}
    if fmt not in readers:
        raise DataError(f"'{source.path}': unknown format '{fmt}'; one of {sorted(readers)}")
    problems = _Problems(bad)
    rows = [row for row in itertools.islice(readers[fmt](path, source, problems), limit)
            if _fits(row, max_chars, problems)]
    if not rows:
        raise DataError(f"'{source.path}' holds no examples")
    return rows


def _fits(row: Row, max_chars: int | None, problem) -> bool:
    """Text with NUL bytes is binary data, and a multi-megabyte field would be tokenised for
    minutes only to be truncated to max_length tokens: both are the row's problem."""
    for column, value in row.values.items():
        for text in _strings(value):
            if "\x00" in text:
                problem(f"{row.where}: column '{column}' contains a NUL byte; is this a binary file?")
                return False
            if max_chars is not None and len(text) > max_chars:
                problem(f"{row.where}: column '{column}' holds {len(text):,} characters, over data.max_chars "
                        f"({max_chars:,}); raise data.max_chars or split the text")
                return False
    return True


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


def _lines(path: Path, problem):
    """(line number, text) of a UTF-8 file; a leading BOM is dropped, and a line that is not
    UTF-8 is the line's problem, with the byte that is wrong."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problem(f"{path}:{number}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                        "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def _whole_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); re-encode the file as "
                        "UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


class _Problems:
    """Raise a row's problem, or (skip mode) note it and let the reader go on."""

    def __init__(self, bad: list[str] | None):
        self.bad = bad

    def __call__(self, message: str) -> None:
        if self.bad is None:
            raise DataError(message)
        self.bad.append(message)


def _read_jsonl(path: Path, source: DataSource, problem: _Problems):
    for number, line in _lines(path, problem):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problem(f"{path}:{number}: not a JSON object ({exc.msg}); jsonl holds one JSON object per line")
            continue
        if not isinstance(record, dict):
            problem(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            continue
        yield Row(record, f"{path}:{number}")


def _read_parquet(path: Path, source: DataSource, problem: _Problems):
    """Parquet (what `datasets` and the hub store data sets in), streamed a batch at a time."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's own error names what is wrong with the file
        raise DataError(f"'{path}': not a readable parquet file ({exc})") from None
    number = 0
    for batch in table.iter_batches(batch_size=10_000):
        for values in batch.to_pylist():
            number += 1
            yield Row(values, f"{path}#row {number}")


def _read_json(path: Path, source: DataSource, problem: _Problems) -> list[Row]:
    try:
        data = json.loads(_whole_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    # Accept a list of records, or the common {"data": [...]} wrapper.
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects (or {{\"data\": [...]}}); "
                        "for one object per line use format: jsonl")
    rows = []
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            problem(f"{path}#{index}: expected a JSON object, got {type(record).__name__}")
            continue
        rows.append(Row(record, f"{path}#{index}"))
    return rows


def _read_delimited(path: Path, source: DataSource, problem: _Problems):
    # csv's own limit (128 KiB a field) would make long documents a parser error; data.max_chars
    # is the limit that says what to change.
    csv.field_size_limit(2**31 - 1)
    delimiter = "\t" if source.resolved_format == "tsv" else ","
    # GLUE tsv files contain bare quotes inside sentences; tsv is read without quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    # strict: an unclosed quote is an error, not a field that swallows the rest of the file.
    reader = csv.reader((line for _, line in _lines(path, problem)), delimiter=delimiter, quoting=quoting,
                        strict=delimiter == ",")
    names = source.column_names
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:  # e.g. a field over csv's 128 KiB limit, or an unclosed quote
            problem(f"{path}:{reader.line_num}: {exc}; is a quote never closed? (csv quotes a field that holds "
                    "commas or newlines with \"...\", and a quote inside it as \"\")")
            continue
        number = reader.line_num
        if names is None:  # header row
            names = [c.strip() for c in cells]
            if len(set(names)) != len(names):
                raise DataError(f"{path}:1: repeated column names in header {names}")
            continue
        if not cells or all(not c.strip() for c in cells):
            continue
        if len(cells) != len(names):
            problem(f"{path}:{number}: {len(cells)} fields, expected {len(names)} ({', '.join(names)})")
            continue
        yield Row(dict(zip(names, cells)), f"{path}:{number}")


def _read_textdir(path: Path, source: DataSource, problem: _Problems) -> list[Row]:
    """One sub-folder per label, one UTF-8 (or Latin-1) text file per example."""
    rows = []
    label_dirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not label_dirs:
        raise DataError(f"{path}: format textdir needs one sub-folder per label; found none")
    for label_dir in label_dirs:
        for file in sorted(label_dir.iterdir()):
            if not file.is_file() or file.name.startswith("."):
                continue
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")  # older corpora; every byte is valid Latin-1
            rows.append(Row({"text": text.strip(), "label": label_dir.name}, str(file)))
    return rows


# ------------------------------------------------------------------ tagged sentences
def _read_conll(path: Path, source: DataSource, problem: _Problems) -> list[Row]:
    """CoNLL-style columns: a token per line (first column), its tag in the last column,
    a blank line between sentences; -DOCSTART- lines are skipped. A skipped bad line
    drops its whole sentence (a sentence missing a token would mislead the tagger)."""
    rows, tokens, tags, start, broken = [], [], [], 1, False
    prefix = source.token_prefix or ""

    def flush(line_number: int) -> None:
        nonlocal tokens, tags, broken
        if tokens and not broken:
            rows.append(Row({"tokens": tokens, "tags": tags}, f"{path}:{start}"))
        tokens, tags, broken = [], [], False

    for number, line in _lines(path, problem):
        line = line.rstrip("\r\n")
        if not line.strip():
            flush(number)
            start = number + 1
            continue
        if line.startswith("-DOCSTART-"):
            start = number + 1
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if not tokens:
            start = number
        if len(fields) < 2:
            problem(f"{path}:{number}: expected a token and a tag separated by a tab or spaces, got {line!r}")
            broken = True
        token = fields[0][len(prefix):] if prefix and fields[0].startswith(prefix) else fields[0]
        tokens.append(token)
        tags.append(fields[-1])
    flush(0)
    return rows


def _read_wordtag(path: Path, source: DataSource, problem: _Problems) -> list[Row]:
    """One sentence a line, tokens `word###TAG` separated by spaces."""
    rows = []
    for number, line in _lines(path, problem):
        if not line.strip():
            continue
        tokens, tags = [], []
        for item in line.split():
            word, sep, tag = item.rpartition("###")
            if not sep or not word or not tag:
                problem(f"{path}:{number}: {item!r} is not word###TAG")
                break
            tokens.append(word)
            tags.append(tag)
        else:
            rows.append(Row({"tokens": tokens, "tags": tags}, f"{path}:{number}"))
    return rows


# ------------------------------------------------------------------------ SQuAD json
def _read_squad(path: Path, source: DataSource, problem: _Problems) -> list[Row]:
    """SQuAD 1.1 / 2.0 json: one row per question with its context and gold answers."""
    try:
        data = json.loads(_whole_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: not a SQuAD file (expected {{\"data\": [{{\"paragraphs\": ...}}]}})")
    rows = []
    for a, article in enumerate(data["data"]):
        for p, paragraph in enumerate(_objects(article, "paragraphs", f"{path}#data[{a}]", problem)):
            where_p = f"{path}#data[{a}].paragraphs[{p}]"
            context = paragraph.get("context")
            for q, qa in enumerate(_objects(paragraph, "qas", where_p, problem)):
                where = f"{where_p}.qas[{q}]"
                if not isinstance(context, str) or not isinstance(qa.get("question"), str):
                    problem(f"{where}: a question needs 'question' and its paragraph a 'context'")
                    continue
                impossible = bool(qa.get("is_impossible", False))
                answers = qa.get("answers")
                if answers is None and not impossible:
                    # Not "no answer": that is what is_impossible says (SQuAD 2.0). Taking it as
                    # one would turn on allow_no_answer for the whole run.
                    problem(f"{where}: no 'answers'; give its answers, or \"is_impossible\": true for a question "
                            "the context does not answer")
                    continue
                if not isinstance(answers or [], list) or not all(
                        isinstance(x, dict) and isinstance(x.get("text"), str)
                        and isinstance(x.get("answer_start"), int) for x in answers or []):
                    problem(f"{where}: 'answers' must be a list of {{\"text\": ..., \"answer_start\": N}}")
                    continue
                rows.append(Row({"id": str(qa.get("id", f"{a}-{p}-{q}")), "question": qa["question"],
                                 "context": context, "answers": answers or [], "is_impossible": impossible}, where))
    return rows


def _objects(holder, key: str, where: str, problem) -> list[dict]:
    """holder[key] as a list of JSON objects; anything else is reported where it is."""
    if not isinstance(holder, dict):
        problem(f"{where}: expected a JSON object, got {type(holder).__name__}")
        return []
    items = holder.get(key, [])
    if not isinstance(items, list):
        problem(f"{where}.{key}: expected a list, got {type(items).__name__}")
        return []
    good = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            good.append(item)
        else:
            problem(f"{where}.{key}[{i}]: expected a JSON object, got {type(item).__name__}")
    return good
