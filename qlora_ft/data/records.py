"""Records: rows -> text paragraphs, instruction records or chat conversations, each checked.

The format is read from the columns (or forced with `--format`):

    instruction / input / output (input optional)   -> Instruction(instruction, output, input)
    prompt / completion                              -> Instruction(prompt, completion)
    messages: [{"role": ..., "content": ...}, ...]   -> Chat(((role, content), ...))
    text / sentence / paragraph, or plain text       -> paragraphs

Paragraphs are cleaned (hard-wrapped lines joined, runs of whitespace made one space) and, under the one
heading rule, heading-only paragraphs ("CHAPTER I", "IV", "= Title =") are dropped from every source unless
--keep-headings. Records keep their text verbatim (code, lists and tables need their line breaks). A bad record
raises UserError naming the source, the record and the field: `data.json: record 17: 'output' is missing`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from qlora_ft.data.sources import Layout, Source, columns, rows
from qlora_ft.errors import UserError

log = logging.getLogger(__name__)

Format = Literal["auto", "text", "instruction", "chat"]
Mode = Literal["text", "instruction", "chat"]
FORMATS: tuple[str, ...] = ("auto", "text", "instruction", "chat")
ROLES = ("system", "user", "assistant")
TEXT_KEYS = ("sentence", "text", "paragraph")
# The version of the paragraph rules (cleaning, the heading rule): the token cache's fingerprint covers it, so
# text cut by other rules is tokenized again. 2: headings are dropped from every source, hub datasets included.
# 3: fewer paragraphs are headings; a change only keeps paragraphs the rules before it dropped (`split.Split.check`).
RULES_VERSION = 3
RULES_CHANGES = {
    2: "heading-only paragraphs are now dropped from hub datasets too (--keep-headings keeps them)",
    3: "one-line paragraphs such as 'Did.' or 'Part ways.' are no longer taken for headings (a Roman numeral counts "
    "only when valid and in capitals; Chapter, Volume, Book and Part only with a number)",
}


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
    """A record as one canonical string, for deduplication and data fingerprints (`split.legacy_digest`
    hashes strings): the text itself for a paragraph, else sorted-key JSON of the fields.

    >>> record_key(Instruction("Add 2 and 3.", "5"))
    '{"input": "", "instruction": "Add 2 and 3.", "output": "5"}'
    """
    if isinstance(record, str):
        return record
    return json.dumps(asdict(record), ensure_ascii=False, sort_keys=True)


def prompt_side(record: Record) -> dict[str, Any]:
    """What a record asks, as a row (for eval.json): its instruction and input, or its turns before the last
    assistant turn."""
    if isinstance(record, Instruction):
        return {"instruction": record.instruction, "input": record.input}
    last = max(i for i, (role, _) in enumerate(record.messages) if role == "assistant")
    return {"messages": [{"role": role, "content": content} for role, content in record.messages[:last]]}


# ----------------------------------------------------------------------------------------------------------
# Paragraphs: the cleaning and heading rules


def clean_paragraph(text: str) -> str:
    """Join hard-wrapped lines and trim: `"A truth\\nuniversally  known. "` -> `"A truth universally known."`.

    Runs of whitespace inside a paragraph become one space; NUL bytes are dropped.
    """
    return " ".join(text.replace("\x00", "").split())


# A number in a heading: a valid Roman numeral in capitals (IV, XII; not "Did", "Mild", "Civil" or "Vivid"), digits,
# or a number word (two, Twelfth; "twenty-one" in a heading alone).
_ROMAN = r"(?-i:(?=[IVXLCDM])M{0,3}(?:CM|CD|D?C{0,3})(?:XC|XL|L?X{0,3})(?:IX|IV|V?I{0,3}))"
_TEENS = "(?:thir|four|fif|six|seven|eigh|nine)teen"
_TENS = "(?:twen|thir|for|fif|six|seven|eigh|nine)t"
_WORD = (
    rf"(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|{_TEENS}|{_TENS}y|hundred|first|second"
    rf"|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|{_TEENS}th|{_TENS}ieth)"
)
_KEYWORD = r"(?:chapter|volume|book|part|vol\.|chap\.)"
_HEADING = re.compile(
    rf"^(?:{_KEYWORD}\s+(?:{_ROMAN}|\d+|{_WORD}(?:-{_WORD})?)\.?"  # CHAPTER IV, Chapter 12., Book two, Part One
    r"|=(?:\s*=)*\s.*\s=(?:\s*=)*"  # WikiText: = Title =, = = Section = =
    rf"|{_ROMAN}\.?|\d+\.?)$",  # a lone numeral: IV, IV., 12., 1984
    re.IGNORECASE,
)
# A numbered heading with a title: "CHAPTER 1. I AM BORN", "CHAPTER II—A DEAN", "Book I: Boy and Girl"
_TITLED = re.compile(rf"^(?:chapter|volume|book|part)\s+(?:{_ROMAN}|\d+|{_WORD})(\s*[.:\u2014-]\s*|\s+)(.+)$", re.I)


def is_heading(paragraph: str) -> bool:
    """Whether a cleaned paragraph is only a heading (dropped from training text unless --keep-headings): a
    lone numeral (a valid Roman numeral in capitals, or digits: a year alone counts), "Chapter", "Volume",
    "Book" or "Part" with a numeral or a number word, a WikiText "= Title =", or a numbered heading whose title
    is in capitals or follows a colon. At most 8 words.

    >>> [is_heading(p) for p in ["CHAPTER IV", "Chapter 12.", "VOLUME II", "Book two.", "= = Early life = =", "IV."]]
    [True, True, True, True, True, True]
    >>> [is_heading(p) for p in ["CHAPTER 1. I AM BORN", "CHAPTER II—A DEAN", "Book I: Boy and Girl", "1984"]]
    [True, True, True, True]
    >>> [is_heading(p) for p in ["Did.", "Mild.", "Civil.", "Vivid.", "Part ways.", "Volume up.", "I said so."]]
    [False, False, False, False, False, False, False]
    """
    text = paragraph.strip()
    if len(text.split()) > 8:
        return False
    titled = _TITLED.match(text)
    return _HEADING.match(text) is not None or (
        titled is not None and (titled.group(2).upper() == titled.group(2) or ":" in titled.group(1))
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


def as_chat(record: Instruction) -> Chat:
    """An instruction as a user turn (the input on its own paragraph) answered by its output."""
    content = f"{record.instruction}\n\n{record.input}" if record.input.strip() else record.instruction
    return Chat((("user", content), ("assistant", record.output)))


def to_chat(row: Any, where: str) -> Chat:
    """A Chat from `{messages: [{role, content}, ...]}` (a JSON string in CSV cells), or an instruction record as
    one exchange (`as_chat`); UserError if malformed."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a record must be an object with fields, not {type(row).__name__}")
    if "messages" not in row and ("instruction" in row or "prompt" in row):
        return as_chat(to_instruction(row, where))  # an instruction put to a chat run
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


# ----------------------------------------------------------------------------------------------------------
# Format detection


def detect_format(columns: Sequence[str], text_column: str | None = None, source: str = "data") -> Mode:
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


def data_mode(src: Source, fmt: Format, text_column: str | None) -> Mode:
    """The mode of `src`: `fmt` unless "auto", else read from its columns (a sample of them for large formats).
    Anything not clearly instruction or chat records is text, so paragraph data gets the text reader's own
    messages; a row that does not parse is named as such."""
    if fmt not in FORMATS:
        raise UserError(f"unknown data format {fmt!r} (choose from {', '.join(FORMATS)})")
    if fmt != "auto":
        if fmt != "text" and src.plain_text:
            raise UserError(f"{src.name}: plain text holds no {fmt} records (use .json, .jsonl, .csv, .parquet)")
        return fmt
    found = None if text_column is not None else columns(src)
    if not found:
        return "text"
    try:
        return detect_format(found, None, src.name)
    except UserError:
        return "text"  # the text reader names the missing text column


def pick_column(names: Sequence[str], text_column: str | None, source: str) -> str:
    """The column holding paragraphs: `text_column` (--text-column), else the first of `TEXT_KEYS` present."""
    if text_column is not None:
        if text_column not in names:
            raise UserError(f"{source}: no column {text_column!r} (columns: {', '.join(names) or 'none'})")
        return text_column
    for key in TEXT_KEYS:
        if key in names:
            return key
    raise UserError(
        f"{source}: no text column found among {', '.join(names) or 'none'}; "
        f"name one with --text-column (looked for {', '.join(TEXT_KEYS)})"
    )


# ----------------------------------------------------------------------------------------------------------
# Reading


def iter_paragraphs(src: Source, *, text_column: str | None = None, keep_headings: bool = False,
                    layout: Layout = "auto", part: str | None = None,
                    tally: dict | None = None) -> Iterator[str]:  # fmt: skip
    """The cleaned, non-empty paragraphs of `src` (or of its `part`), streamed in order, under the heading rule.

    `tally`: a dict that receives what was dropped, under `src.name` (`{"headings": 2, "missing": 0,
    "heading_example": "CHAPTER I"}`), for the caller to log (the token cache keeps it); else this logs it."""
    names = columns(src)
    column = pick_column(names, text_column, src.name) if names else None
    headings = missing = n = 0
    example = None
    for i, row in enumerate(rows(src, part, [column] if column and src.kind in ("parquet", "hf_disk", "hub")
                                 else None, layout)):  # fmt: skip
        if isinstance(row, dict):
            row = row.get(column or pick_column([str(k) for k in row], text_column, f"{src.name} row {i}"))
        if _missing(row):
            missing += 1
            continue
        if not isinstance(row, str):
            raise UserError(f"{src.name}: row {i}: the text is {type(row).__name__}, not a string")
        paragraph = clean_paragraph(row)
        if paragraph and not keep_headings and is_heading(paragraph):
            headings += 1
            example = example or paragraph
        elif paragraph:
            n += 1
            yield paragraph
    counts = {"headings": headings, "missing": missing, "heading_example": example}
    if tally is None:
        log_dropped({src.name: counts})
    else:
        previous = tally.get(src.name, {"headings": 0, "missing": 0, "heading_example": None})
        tally[src.name] = {"headings": previous["headings"] + headings, "missing": previous["missing"] + missing,
                           "heading_example": previous["heading_example"] or example}  # fmt: skip
    if n == 0 and part is None:
        raise UserError(f"{src.name}: no paragraphs found (the data is empty)")


def log_dropped(tally: dict[str, dict[str, Any]]) -> None:
    """Log what the paragraph reader dropped from each source (an `iter_paragraphs` tally)."""
    for name, counts in tally.items():
        if counts["missing"]:
            log.warning("%s: skipped %d missing values", name, counts["missing"])
        if counts["headings"]:
            log.info("%s: dropped %d heading-only paragraphs (CHAPTER I, ...; --keep-headings keeps them)", name,
                     counts["headings"])  # fmt: skip


def record_prefix(src: Source, part: str | None) -> str:
    """How an error names a record of `src`: `data.json: record` (+ its index), `data: validation record`."""
    return f"{src.name}: {part + ' ' if part and src.parts() else ''}record"


def iter_records(src: Source, mode: Literal["instruction", "chat"], part: str | None = None) -> Iterator[Record]:
    """Each row of `src` (or of its `part`) checked and made a record; the first bad one raises UserError naming
    it by index."""
    convert = to_instruction if mode == "instruction" else to_chat
    prefix = record_prefix(src, part)
    n = 0
    for n, row in enumerate(rows(src, part), start=1):
        if isinstance(row, str):
            raise UserError(f"{prefix} {n - 1}: a record must be an object with fields, not text")
        yield convert(row, f"{prefix} {n - 1}")
    if n == 0 and part is None:
        raise UserError(f"{src.name}: no records found (the data is empty)")
