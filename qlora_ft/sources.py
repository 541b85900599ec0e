"""Streaming readers: large text sources -> cleaned paragraph strings, without reading a file whole.

Supported sources (a path as given by the user):
- a `.txt` file, in book layout (paragraphs separated by blank lines, lines hard-wrapped) or in WikiText's raw
  layout (one paragraph per line, ` = Title = ` / ` = = Section = = ` heading lines, separator lines holding a
  single space); the layout is detected from the first MiBs (`layout="auto"`) or given;
- a folder of `.txt` files (sorted by name);
- `.jsonl` (one JSON object or string a line) and `.parquet` (read in record batches with pyarrow);
- a folder written by `datasets`' `save_to_disk` (Dataset or DatasetDict), iterated in Arrow batches;
- `.pkl`, `.csv`, `.json`: small formats read whole by `qlora_ft.data.load_corpus`.

Every paragraph goes through `data.clean_paragraph`; headings (`data.is_heading`) are dropped unless
`keep_headings=True`. Pre-split sources (a DatasetDict or pickle with train and validation parts) are read one
part at a time with `split=`; `source_splits` says whether a source is pre-split.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qlora_ft.data import (
    PICKLE_SUFFIXES,
    VALIDATION_KEYS,
    Corpus,
    _pick_column,
    clean_paragraph,
    is_heading,
    load_corpus,
)
from qlora_ft.errors import UserError, first_line

log = logging.getLogger(__name__)

Layout = Literal["auto", "book", "wikitext"]
Kind = Literal["text", "text_dir", "jsonl", "parquet", "hf_disk", "table"]

READ_BUFFER = 1 << 20  # bytes read at a time; memory stays bounded by this plus the longest paragraph
DETECT_BYTES = 4 << 20  # how much of a .txt file `layout="auto"` looks at
# WikiText's raw heading lines: " = Title = ", " = = Section = = " (leading/trailing single spaces).
_WIKI_HEADING = re.compile(r"^ ?(?:= )+\S.*?(?: =)+ ?$")
_HF_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


@dataclass(frozen=True)
class Source:
    """A resolved data source: what kind it is and which files hold its content (in reading order)."""

    path: Path
    kind: Kind
    files: tuple[Path, ...]


def resolve(source: str) -> Source:
    """Classify a local data source and list its files. Raises UserError for a missing or unknown one."""
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_dir():
        if any(path.glob("*.arrow")) or any((path / m).exists() for m in _HF_MARKERS):
            return Source(path, "hf_disk", tuple(sorted(p for p in path.rglob("*") if p.is_file())))
        files = tuple(sorted(path.glob("*.txt")))
        if not files:
            raise UserError(f"{source}: folder has no .txt files and is not a saved dataset")
        return Source(path, "text_dir", files)
    if not path.is_file():
        raise UserError(f"data file not found: {source}")
    kinds: dict[str, Kind] = {".txt": "text", ".jsonl": "jsonl", ".parquet": "parquet", ".csv": "table",
                              ".json": "table", **{s: "table" for s in PICKLE_SUFFIXES}}  # fmt: skip
    if suffix not in kinds:
        raise UserError(f"{source}: unknown data format {suffix!r} (use .txt, .jsonl, .parquet, .pkl, .csv or .json)")
    return Source(path, kinds[suffix], (path,))


def source_splits(source: str, text_column: str | None = None) -> tuple[str, str] | None:
    """(train key, validation key) when the source is already split (DatasetDict, split pickle), else None.
    A table is read through `text_column` (--text-column) as `iter_paragraphs` reads it."""
    src = resolve(source)
    if src.kind == "hf_disk" and (src.path / "dataset_dict.json").exists():
        keys = json.loads((src.path / "dataset_dict.json").read_text())["splits"]
        val = next((k for k in VALIDATION_KEYS if k in keys), None)
        return ("train", "validation") if "train" in keys and val else None
    if src.kind == "table":
        pre_split = load_corpus(source, text_column, keep_headings=True).validation is not None
        return ("train", "validation") if pre_split else None
    return None


def iter_paragraphs(
    source: str,
    *,
    text_column: str | None = None,
    keep_headings: bool = False,
    layout: Layout = "auto",
    split: str | None = None,
    buffer_size: int = READ_BUFFER,
) -> Iterator[str]:
    """Cleaned, non-empty paragraphs of `source`, in file order, streamed.

    `split` names one part of a pre-split source (see `source_splits`); None reads every part in turn.
    """
    src = resolve(source)
    if src.kind in ("text", "text_dir"):
        texts: Iterable[str] = (p for f in src.files for p in iter_text_file(f, layout, buffer_size))
    elif src.kind == "jsonl":
        texts = iter_jsonl(src.path, text_column)
    elif src.kind == "parquet":
        texts = iter_parquet(src.path, text_column)
    elif src.kind == "hf_disk":
        texts = iter_saved_dataset(src.path, text_column, split)
    else:
        corpus = load_corpus(source, text_column, keep_headings=True)  # the heading rule is applied below
        parts = {"train": corpus.train, "validation": corpus.validation or []}
        texts = parts[split] if split else corpus.train + (corpus.validation or [])
    headings = 0
    for text in texts:
        paragraph = clean_paragraph(text)
        if paragraph and not keep_headings and is_heading(paragraph):
            headings += 1
        elif paragraph:
            yield paragraph
    if headings:
        log.info("%s: dropped %d heading-only paragraphs (CHAPTER I, ...; --keep-headings keeps them)", source,
                 headings)  # fmt: skip


def read_corpus(source: str, text_column: str | None = None, keep_headings: bool = False) -> Corpus:
    """The paragraphs the token cache stores for `source`, in memory (for evaluation-sized work): a pre-split
    source keeps its parts."""
    opts = {"text_column": text_column, "keep_headings": keep_headings}
    splits = source_splits(source, text_column)
    if splits is None:
        return Corpus(list(iter_paragraphs(source, **opts)))
    return Corpus(list(iter_paragraphs(source, split=splits[0], **opts)),
                  list(iter_paragraphs(source, split=splits[1], **opts)))  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Text files


def iter_lines(path: Path, buffer_size: int = READ_BUFFER) -> Iterator[str]:
    """Lines of a UTF-8 file without their line ends (LF, CRLF or CR), reading `buffer_size` bytes at a time.

    Hand-written rather than `open(...)` iteration so that a decoding error names the byte offset in the file,
    as `data.read_text_file` does. Splitting on b"\\n" is safe: that byte never occurs inside a UTF-8 sequence.
    """
    offset, tail = 0, b""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(buffer_size):
                *lines, tail = (tail + chunk).split(b"\n")
                for raw in lines:
                    yield from _decode(raw, offset, path)
                    offset += len(raw) + 1
            if tail:
                yield from _decode(tail, offset, path)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def _decode(raw: bytes, offset: int, path: Path) -> Iterator[str]:
    if offset == 0 and raw.startswith(b"\xef\xbb\xbf"):
        raw, offset = raw[3:], 3
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 text (invalid byte at offset {offset + e.start}); re-save it as UTF-8"
        ) from None
    yield from line.rstrip("\r").split("\r")  # a lone CR (old Mac line end) also ends a line


def detect_layout(path: Path, buffer_size: int = READ_BUFFER) -> Literal["book", "wikitext"]:
    """ "wikitext" when the first `DETECT_BYTES` hold a WikiText heading line (` = Title = `), else "book"."""
    seen = 0
    for line in iter_lines(path, buffer_size):
        if _WIKI_HEADING.match(line):
            return "wikitext"
        seen += len(line) + 1
        if seen > DETECT_BYTES:
            break
    return "book"


def iter_text_file(path: Path, layout: Layout = "auto", buffer_size: int = READ_BUFFER) -> Iterator[str]:
    """Raw paragraphs of one text file (not yet cleaned or filtered).

    book: a line that is empty or whitespace-only ends a paragraph; the lines between are one paragraph.
    wikitext: every line that is not whitespace-only is a paragraph of its own (headings included; the caller
    drops them with `is_heading`).
    """
    if layout == "auto":
        layout = detect_layout(path, buffer_size)
    if layout == "wikitext":
        yield from (line for line in iter_lines(path, buffer_size) if line.strip())
        return
    block: list[str] = []
    for line in iter_lines(path, buffer_size):
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


# ----------------------------------------------------------------------------------------------------------
# Tables


def iter_jsonl(path: Path, text_column: str | None) -> Iterator[str]:
    """The text of each JSON line: a string, or an object's text column (picked as `data.load_corpus` does)."""
    column = text_column
    for number, line in enumerate(iter_lines(path), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {number} is not valid JSON ({e.msg})") from None
        if isinstance(item, dict):
            column = column or _pick_column([str(k) for k in item], None, f"{path} line {number}")
            item = item.get(column)
        if item is None:
            continue
        if not isinstance(item, str):
            raise UserError(f"{path}: line {number}: the text is {type(item).__name__}, not a string")
        yield item


def _arrow_texts(batches: Iterable[Any], column: str, source: str) -> Iterator[str]:
    for batch in batches:
        for item in batch.column(column).to_pylist():
            if item is None:
                continue
            if not isinstance(item, str):
                raise UserError(f"{source}: column {column!r} holds {type(item).__name__}, not text")
            yield item


def iter_parquet(path: Path, text_column: str | None, batch_rows: int = 8192) -> Iterator[str]:
    """The text column of a parquet file, read `batch_rows` rows at a time (only that column is decoded)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"cannot read {path}: {first_line(e)}") from None
    column = _pick_column(pf.schema_arrow.names, text_column, str(path))
    yield from _arrow_texts(pf.iter_batches(batch_size=batch_rows, columns=[column]), column, str(path))


def iter_saved_dataset(path: Path, text_column: str | None, split: str | None, batch_rows: int = 8192) -> Iterator[str]:
    """The text column of a `save_to_disk` folder, in Arrow batches from the memory-mapped files.

    A DatasetDict is read part by part (`split` picks one); nothing is converted to pandas.
    """
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UserError(f"cannot load dataset {str(path)!r}: {first_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split == "validation" and split not in ds:
            split = next((k for k in VALIDATION_KEYS if k in ds), split)
        if split is not None and split not in ds:
            raise UserError(f"{path}: no part {split!r} (parts: {', '.join(ds)})")
        parts = [ds[split]] if split is not None else list(ds.values())
    else:
        parts = [ds]
    for part in parts:
        column = _pick_column(list(part.column_names), text_column, str(path))
        batches = part.select_columns([column]).with_format("arrow").iter(batch_size=batch_rows)
        yield from _arrow_texts(batches, column, str(path))
