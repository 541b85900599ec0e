"""Records: any source -> plain text, instruction or chat records, checked one by one.

The format is read from the columns (or forced with `format`):

    instruction / input / output (input optional)   -> Instruction(instruction, output, input)
    prompt / completion                              -> Instruction(prompt, completion)
    messages: [{"role": ..., "content": ...}, ...]   -> Chat(((role, content), ...))
    text / sentence / paragraph, .txt files          -> plain text, read by `data.load_corpus`

Sources: JSON (a list of records, a dict of columns, or {"train": [...], "validation": [...]}), JSONL, CSV,
parquet, pickle (restricted: `data.safe_unpickle`), a `datasets` save_to_disk folder, or a hub dataset name.
A bad record raises UserError naming the record and the field: `data.json: record 17: 'output' is missing`.

Texts are kept verbatim (no whitespace cleaning as for paragraphs): instructions and answers may hold code,
lists and tables whose line breaks matter.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from qlora_ft.data import (
    PICKLE_SUFFIXES,
    TABLE_SUFFIXES,
    TEXT_KEYS,
    VALIDATION_KEYS,
    is_hub_name,
    load_corpus,
    load_dataset_splits,
    read_text_file,
    safe_unpickle,
)
from qlora_ft.errors import UserError, first_line

log = logging.getLogger(__name__)

Format = Literal["auto", "text", "instruction", "chat"]
FORMATS: tuple[str, ...] = ("auto", "text", "instruction", "chat")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Instruction:
    """One instruction-following example; `input` is the optional context ("" when there is none)."""

    instruction: str
    output: str
    input: str = ""


@dataclass(frozen=True)
class Chat:
    """One conversation: (role, content) turns, roles among `ROLES`, opened by a system or user turn, with at
    least one assistant turn."""

    messages: tuple[tuple[str, str], ...]


Record = Instruction | Chat


def record_key(record: Record | str) -> str:
    """A record as one canonical string, for deduplication and data fingerprints (`data.Split.fingerprint`
    hashes strings): the text itself for a paragraph, else sorted-key JSON of the fields.

    >>> record_key(Instruction("Add 2 and 3.", "5"))
    '{"input": "", "instruction": "Add 2 and 3.", "output": "5"}'
    """
    if isinstance(record, str):
        return record
    return json.dumps(asdict(record), ensure_ascii=False, sort_keys=True)


@dataclass
class Records:
    """What a source holds. `train` / `validation` are paragraph strings for "text", else Instruction or Chat
    records; `validation` is set only when the source was already split."""

    format: Literal["text", "instruction", "chat"]
    train: list[Any]
    validation: list[Any] | None = None


# ----------------------------------------------------------------------------------------------------------
# Format detection


def detect_format(
    columns: Sequence[str], text_column: str | None = None, source: str = "data"
) -> Literal["text", "instruction", "chat"]:
    """The record format a set of column names implies (a named `text_column` means text); UserError if none.

    >>> detect_format(["instruction", "input", "output"]), detect_format(["prompt", "completion"])
    ('instruction', 'instruction')
    >>> detect_format(["messages"]), detect_format(["id", "text"])
    ('chat', 'text')
    """
    cols = set(columns)
    if text_column is not None:
        return "text"
    if "messages" in cols:
        return "chat"
    if "instruction" in cols or {"prompt", "completion"} <= cols:
        return "instruction"
    if cols & set(TEXT_KEYS):
        return "text"
    raise UserError(
        f"{source}: no known columns among {', '.join(columns) or 'none'} (looked for instruction/input/output, "
        f"prompt/completion, messages, or a text column: {', '.join(TEXT_KEYS)})"
    )


# ----------------------------------------------------------------------------------------------------------
# Checking one record


def _missing(value: Any) -> bool:
    """None, NaN (pandas' empty cell) or pandas.NA (compared by type name: pandas is imported only if used)."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or type(value).__name__ == "NAType"


def _text_field(row: dict, key: str, where: str, required: bool) -> str:
    """`row[key]` as text: "" when optional and absent; UserError when required and absent or empty."""
    value = row.get(key)
    if _missing(value):
        if required:
            raise UserError(f"{where}: {key!r} is missing")
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: {key!r} is {type(value).__name__}, not text")
    if required and not value.strip():
        raise UserError(f"{where}: {key!r} is empty")
    return value


def to_instruction(row: Any, where: str) -> Instruction:
    """An Instruction from `{instruction, input?, output}` or `{prompt, completion}`; UserError if malformed."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a record must be an object with fields, not {type(row).__name__}")
    if "instruction" not in row and "prompt" in row:
        return Instruction(_text_field(row, "prompt", where, True), _text_field(row, "completion", where, True))
    return Instruction(
        _text_field(row, "instruction", where, True),
        _text_field(row, "output", where, True),
        _text_field(row, "input", where, False),
    )


def to_chat(row: Any, where: str) -> Chat:
    """A Chat from `{messages: [{role, content}, ...]}` (a JSON string in CSV cells); UserError if malformed."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a record must be an object with fields, not {type(row).__name__}")
    messages = row.get("messages")
    if isinstance(messages, str):  # CSV cells hold the list as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise UserError(f"{where}: 'messages' is text that is not a JSON list of {{role, content}}") from None
    if _missing(messages):
        raise UserError(f"{where}: 'messages' is missing")
    if not isinstance(messages, (list, tuple)):
        raise UserError(f"{where}: 'messages' is {type(messages).__name__}, not a list of {{role, content}}")
    turns = []
    for j, message in enumerate(messages):
        at = f"{where}: 'messages'[{j}]"
        if not isinstance(message, dict):
            raise UserError(f"{at} is {type(message).__name__}, not an object with role and content")
        role = _text_field(message, "role", at, True)
        if role not in ROLES:
            raise UserError(f"{at}: 'role' {role!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        if _missing(content):
            raise UserError(f"{at}: 'content' is missing")
        if not isinstance(content, str):  # "" is allowed: an empty system prompt, say
            raise UserError(f"{at}: 'content' is {type(content).__name__}, not text")
        turns.append((role, content))
    if turns and turns[0][0] == "assistant":  # chat templates (and per-turn rendering) need an opening prompt
        raise UserError(f"{where}: 'messages'[0]: 'role' 'assistant' cannot open a conversation")
    if not any(role == "assistant" for role, _ in turns):
        raise UserError(f"{where}: 'messages' has no assistant turn (nothing to train on)")
    return Chat(tuple(turns))


def parse_records(rows: Sequence[Any], fmt: Literal["instruction", "chat"], source: str, part: str = "") -> list:
    """Each row checked and turned into a record; the first bad one raises UserError naming its index."""
    convert = to_instruction if fmt == "instruction" else to_chat
    prefix = f"{source}: {part + ' ' if part else ''}record"
    return [convert(row, f"{prefix} {i}") for i, row in enumerate(rows)]


# ----------------------------------------------------------------------------------------------------------
# Reading rows


def _rows_of(obj: Any, source: str) -> tuple[list, list | None]:
    """(train rows, validation rows or None) of a loaded object: a list of records, a DataFrame, a dict of
    equal-length columns, or {"train": ..., "validation": ...} holding any of those."""
    import pandas as pd

    if isinstance(obj, dict) and "train" in obj:
        val_key = next((k for k in VALIDATION_KEYS if k in obj), None)
        if val_key is None:
            raise UserError(f"{source}: a split dataset needs 'train' and 'validation' keys (found {list(obj)})")
        return _rows_of(obj["train"], source)[0], _rows_of(obj[val_key], source)[0]
    if isinstance(obj, pd.DataFrame):
        return obj.to_dict("records"), None
    if isinstance(obj, pd.Series):
        return obj.tolist(), None
    if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
        if len({len(v) for v in obj.values()}) != 1:
            raise UserError(f"{source}: the columns have different lengths")
        keys = list(obj)
        return [dict(zip(keys, values, strict=True)) for values in zip(*obj.values(), strict=True)], None
    if isinstance(obj, (list, tuple)):
        return list(obj), None
    raise UserError(f"{source}: expected a list of records, a dict of columns, or train/validation splits, "
                    f"got {type(obj).__name__}")  # fmt: skip


def _load_json(path: Path) -> Any:
    """A JSON document; a .json file holding one record per line (JSON Lines, a common naming slip) is
    read as JSON Lines."""
    text = read_text_file(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _load_jsonl(path)
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def _load_jsonl(path: Path) -> list:
    rows = []
    for n, line in enumerate(read_text_file(path).splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
    return rows


def _read_table(path: Path, suffix: str) -> Any:
    """CSV cells all as text ("" for an empty cell, so "45" stays text); parquet through pyarrow, so nested
    lists (chat messages) come back as Python lists rather than numpy arrays."""
    import pandas as pd
    import pyarrow.parquet as pq

    try:
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        return pq.read_table(path).to_pylist()
    except Exception as e:
        raise UserError(f"cannot read {path}: {first_line(e)}") from None


def _rows_from_datasets(source: str) -> tuple[list, list | None]:
    """Rows of a `datasets` save_to_disk folder or hub dataset (see `data.load_dataset_splits`)."""
    train, validation = load_dataset_splits(source)
    return train.to_list(), None if validation is None else validation.to_list()


def read_rows(source: str) -> tuple[list, list | None] | None:
    """(train rows, validation rows or None) as stored, unchecked; None for plain text (.txt, a folder of .txt
    files), which has no rows. Raises UserError for a missing, unreadable or unknown file."""
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_dir():
        if any(path.glob("*.arrow")) or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _rows_from_datasets(source)
        return None
    if path.is_file():
        if suffix == ".txt":
            return None
        if suffix in PICKLE_SUFFIXES:
            try:
                data = path.read_bytes()
            except OSError as e:
                raise UserError(f"cannot read {path}: {e.strerror}") from None
            return _rows_of(safe_unpickle(data, source), source)
        if suffix == ".json":
            return _rows_of(_load_json(path), source)
        if suffix == ".jsonl":
            return _load_jsonl(path), None
        if suffix in TABLE_SUFFIXES:
            return _rows_of(_read_table(path, suffix), source)
        raise UserError(f"{source}: unknown data format {suffix!r} (use .json, .jsonl, .csv, .parquet, .pkl or .txt)")
    if suffix in PICKLE_SUFFIXES | TABLE_SUFFIXES | {".txt"} or not is_hub_name(source):
        raise UserError(f"data file not found: {source}")
    return _rows_from_datasets(source)


def _columns(rows: Sequence[Any]) -> list[str]:
    """Field names over all rows, in order of first appearance (a record may lack an optional field)."""
    return list(dict.fromkeys(str(k) for row in rows if isinstance(row, dict) for k in row))


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_records(source: str, format: Format = "auto", text_column: str | None = None) -> Records:
    """Read and check every record of `source` (see the module docstring). `format` "auto" detects it from
    the columns; plain text is read by `data.load_corpus` (paragraphs cleaned, headings kept as there).
    Raises UserError on a missing or unreadable source, empty data, or the first bad record.

    >>> # load_records("alpaca.json").train[0]  ->  Instruction(instruction='Edit ...', output='...', input='...')
    """
    if format not in FORMATS:
        raise UserError(f"unknown data format {format!r} (choose from {', '.join(FORMATS)})")
    rows = None if format == "text" else read_rows(source)
    if rows is None:
        if format not in ("auto", "text"):
            raise UserError(f"{source}: plain text holds no {format} records (use .json, .jsonl, .csv, .parquet)")
        corpus = load_corpus(source, text_column)
        return Records("text", corpus.train, corpus.validation)
    train_rows, val_rows = rows
    if not train_rows and not val_rows:
        raise UserError(f"{source}: no records found (the data is empty)")
    fmt = format
    if fmt == "auto":
        every = train_rows + (val_rows or [])
        fmt = "text" if all(isinstance(r, str) for r in every) else detect_format(_columns(every), text_column, source)
    if fmt == "text":
        corpus = load_corpus(source, text_column)
        return Records("text", corpus.train, corpus.validation)
    if val_rows is None:
        records = Records(fmt, parse_records(train_rows, fmt, source))
    else:
        records = Records(fmt, parse_records(train_rows, fmt, source, "train"),
                          parse_records(val_rows, fmt, source, "validation"))  # fmt: skip
    log.info("%s: %d %s records%s", source, len(records.train), fmt,
             f" + {len(records.validation)} validation" if records.validation is not None else "")  # fmt: skip
    return records
