"""Sources: bytes -> rows, one reader per format. A row is a dict of fields (tables, JSON, datasets) or a string
(a paragraph of plain text, a JSON string); `records` makes paragraphs or records of them.

    .txt file        book layout (paragraphs between blank lines, lines hard-wrapped) or WikiText's raw layout
                     (one paragraph a line, ` = Title = ` headings), detected from the first MiBs; streamed
    folder of .txt   the files in name order; streamed
    .jsonl           one JSON object or string a line; streamed
    .parquet         read in record batches (only the columns asked for); streamed
    save_to_disk     a `datasets` Dataset or DatasetDict folder, in Arrow batches from its memory maps; streamed
    hub name         `owner/name` of a Hugging Face dataset (the Hub, else its local snapshot); streamed
    demo:NAME        a book shipped with the package (`demo:austen`: Northanger Abbey), read as a .txt file
    .csv             one record a row, every cell text; read in chunks of rows (its header gives the columns)
    .json .pkl       read whole: a list of records or strings, a dict of columns, {"train": ..., "validation": ...}
                     (pickles through a restricted unpickler: nothing in the file is executed); their columns and
                     parts can be given as a known `Shape` (the token cache notes them), so a warm start does not
                     read them

A source already split (a DatasetDict or table with train and validation parts) is read one part at a time.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qlora_ft.data.unpickle import safe_unpickle
from qlora_ft.errors import UserError, first_line
from qlora_ft.fs import sha256_file

log = logging.getLogger(__name__)

Kind = Literal["text", "text_dir", "jsonl", "parquet", "hf_disk", "table", "hub"]
Layout = Literal["auto", "book", "wikitext"]
PICKLE_SUFFIXES = {".pkl", ".pickle"}
KINDS: dict[str, Kind] = {".txt": "text", ".jsonl": "jsonl", ".parquet": "parquet", ".csv": "table",
                          ".json": "table", **{s: "table" for s in PICKLE_SUFFIXES}}  # fmt: skip
VALIDATION_KEYS = ("validation", "valid", "val", "test")
READ_BUFFER = 1 << 20  # bytes read at a time; memory stays bounded by this plus the longest paragraph
DETECT_BYTES = 4 << 20  # how much of a .txt file the layout detection looks at
BATCH_ROWS = 8192  # rows per Arrow batch
# WikiText's raw heading lines: " = Title = ", " = = Section = = " (leading/trailing single spaces).
_WIKI_HEADING = re.compile(r"^ ?(?:= )+\S.*?(?: =)+ ?$")
_HF_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
# `--data demo:NAME`: public-domain books (Project Gutenberg) in qlora_ft/data/demo/, so a first run needs no data
DEMOS = {"austen": "northanger_abbey.txt"}
DEMO_PREFIX = "demo:"


@dataclass(frozen=True)
class Shape:
    """What a table read whole holds, besides its rows: its columns, and whether it has train and validation parts."""

    columns: tuple[str, ...]
    split: bool


@dataclass(frozen=True)
class Source:
    """A resolved data source: its kind, and the files holding its content (none for a hub dataset); a .json or
    pickle table's shape when known without reading it, and its files' digest once computed (`prepare`)."""

    name: str  # as given
    kind: Kind
    files: tuple[Path, ...]
    shape: Shape | None = None
    digest: list[dict[str, Any]] | None = field(default=None, compare=False)

    @property
    def path(self) -> Path:
        return Path(self.name)

    @property
    def plain_text(self) -> bool:
        return self.kind in ("text", "text_dir")

    def parts(self) -> tuple[str, str] | None:
        """(train part, validation part) when the source is already split, else None."""
        if self.kind == "table":
            return ("train", "validation") if table_shape(self).split else None
        if self.kind in ("hf_disk", "hub"):
            names = _dataset_parts(self)
            val = next((k for k in VALIDATION_KEYS if k in names), None)
            return ("train", val) if "train" in names and val else None
        return None

    def digest_key(self) -> dict[str, Any]:
        """What identifies a hub dataset's content (local sources are identified by their files' bytes): the
        name in the repository, size and content hash of each data file of each part. Not where it was loaded
        from: the Hub, a newer commit of it that changed other files (a README), or the local snapshot offline."""
        out = {}
        for part, files in _load_hub(self.name).files.items():
            try:
                out[part] = [{"name": n, "bytes": p.stat().st_size, **_content_hash(p)} for n, p in files]
            except OSError as e:
                raise UserError(f"cannot read {self.name}'s data files: {e.strerror}") from None
        return out

    def earlier_digest_key(self) -> dict[str, Any]:
        """A hub dataset's content as earlier versions identified it: `datasets`' own fingerprint of each part,
        which hashes where it was loaded from."""
        return {name: part._fingerprint for name, part in _hub(self.name).items()}


def resolve(source: str) -> Source:
    """Classify `source` and list its files. UserError for a missing file, an unknown format, or an empty folder."""
    if source.startswith(DEMO_PREFIX):
        return Source(source, "text", (demo_file(source),))
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_dir():
        if any(path.glob("*.arrow")) or any((path / m).exists() for m in _HF_MARKERS):
            return Source(source, "hf_disk", tuple(sorted(p for p in path.rglob("*") if p.is_file())))
        files = tuple(sorted(path.glob("*.txt")))
        if not files:
            raise UserError(f"{source}: folder has no .txt files and is not a saved dataset")
        return Source(source, "text_dir", files)
    if path.is_file():
        if suffix not in KINDS:
            raise UserError(f"{source}: unknown data format {suffix!r} (use .txt, .jsonl, .json, .csv, .parquet or "
                            ".pkl, a folder of .txt files, a saved dataset or a hub dataset name)")  # fmt: skip
        return Source(source, KINDS[suffix], (path,))
    if suffix in KINDS or not is_hub_name(source):
        raise UserError(f"data file not found: {source}")
    return Source(source, "hub", ())


def demo_file(source: str) -> Path:
    """The packaged book `demo:NAME` names.

    >>> demo_file("demo:austen").name
    'northanger_abbey.txt'
    """
    name = source.removeprefix(DEMO_PREFIX)
    if name not in DEMOS:
        raise UserError(f"unknown demo data {source!r} (known: {', '.join(DEMO_PREFIX + n for n in DEMOS)})")
    return Path(__file__).parent / "demo" / DEMOS[name]


def rows(src: Source, part: str | None = None, columns: list[str] | None = None, layout: Layout = "auto",
         ) -> Iterator[Any]:  # fmt: skip
    """The rows of `src` in order: every part in turn, or the one `part` names (see `Source.parts`). `columns`:
    the only fields a table needs to decode (Arrow formats read nothing else)."""
    if src.kind in ("text", "text_dir"):
        yield from (p for f in src.files for p in iter_text_file(f, layout))
    elif src.kind == "jsonl":
        yield from iter_jsonl(src.files[0])
    elif src.kind == "parquet":
        yield from iter_parquet(src.files[0], columns)
    elif src.kind == "table" and is_csv(src.files[0]):
        yield from iter_csv(src.files[0])
    elif src.kind == "table":
        train, validation = _table(src.files[0])
        chosen = {"train": [train], "validation": [validation or []]}.get(part or "", [train, validation or []])
        yield from itertools.chain.from_iterable(chosen)
    else:
        parts = _hub(src.name) if src.kind == "hub" else _saved(src.path)
        if part is not None and part not in parts:
            raise UserError(f"{src.name}: no part {part!r} (parts: {', '.join(parts)})")
        for name, dataset in parts.items():
            if part is None or name == part:
                yield from _arrow_rows(dataset, columns)


def columns(src: Source, sample_rows: int = 1000) -> list[str] | None:
    """The field names of `src`'s rows (None for plain text), without reading a large source whole: a parquet
    file's schema, a saved dataset's columns, the first `sample_rows` lines of a JSONL file, a CSV file's header."""
    if src.plain_text:
        return None
    if src.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(src.files[0]).names)
        except Exception as e:
            raise UserError(f"cannot read {src.name}: {first_line(e)}") from None
    if src.kind in ("hf_disk", "hub"):
        parts = _hub(src.name) if src.kind == "hub" else _saved(src.path)
        return list(dict.fromkeys(c for part in parts.values() for c in part.column_names))
    if src.kind == "table":
        return list(table_shape(src).columns)
    sample = itertools.islice(rows(src), sample_rows) if src.kind == "jsonl" else rows(src)
    return list(dict.fromkeys(str(k) for row in sample if isinstance(row, dict) for k in row))


def input_bytes(src: Source) -> int:
    return sum(f.stat().st_size for f in src.files)


# ----------------------------------------------------------------------------------------------------------
# Plain text


def iter_lines(path: Path, buffer_size: int = READ_BUFFER) -> Iterator[str]:
    """Lines of a UTF-8 file without their line ends (LF, CRLF or CR), reading `buffer_size` bytes at a time.

    Hand-written rather than `open(...)` iteration so that a decoding error names the byte offset in the file.
    Splitting on b"\\n" is safe: that byte never occurs inside a UTF-8 sequence.
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
    wikitext: every line that is not whitespace-only is a paragraph of its own (headings included; `records`
    drops them by the heading rule).
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
# JSON Lines, parquet, Arrow datasets


def iter_jsonl(path: Path) -> Iterator[Any]:
    """Each non-blank line of a JSON Lines file, parsed; a bad line is named by its number."""
    for number, line in enumerate(iter_lines(path), start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {number} is not valid JSON ({e.msg})") from None


def iter_parquet(path: Path, columns: list[str] | None) -> Iterator[dict[str, Any]]:
    """The rows of a parquet file, `BATCH_ROWS` at a time, decoding only `columns` (all when None). Nested
    lists (chat messages) come back as Python lists."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            yield from batch.to_pylist()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {first_line(e)}") from None
    except Exception as e:  # pyarrow's own errors: a damaged file, a column that is not there
        if type(e).__module__.startswith("pyarrow"):
            raise UserError(f"cannot read {path}: {first_line(e)}") from None
        raise


def _arrow_rows(dataset: Any, columns: list[str] | None) -> Iterator[dict[str, Any]]:
    """The rows of a `datasets.Dataset`, in Arrow batches (nothing converted to pandas)."""
    if columns is not None:
        dataset = dataset.select_columns(columns)
    for batch in dataset.with_format("arrow").iter(batch_size=BATCH_ROWS):
        yield from batch.to_pylist()


def _saved(path: Path) -> dict[str, Any]:
    """The parts of a `save_to_disk` folder (memory-mapped: nothing is read but the metadata)."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UserError(f"cannot load dataset {str(path)!r}: {first_line(e)}") from None
    return dict(saved) if isinstance(saved, datasets.DatasetDict) else {"train": saved}


def _dataset_parts(src: Source) -> list[str]:
    return list(_hub(src.name) if src.kind == "hub" else _saved(src.path))


# ----------------------------------------------------------------------------------------------------------
# Hub datasets


def is_hub_name(source: str) -> bool:
    """Whether `source`, not found locally, reads as a hub repository id (`name` or `owner/name`), not a path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return not source.startswith((".", "~"))


@dataclass(frozen=True)
class _Hub:
    parts: dict[str, Any]  # part name -> datasets.Dataset, memory-mapped from datasets' cache
    files: dict[str, list[tuple[str, Path]]]  # part name -> its data files: (name in the repository, local path)


_HUB: dict[str, _Hub] = {}  # name -> the dataset: loaded once per process
_HUB_URL = re.compile(r"^hf://datasets/(?P<repo>[^@]+)@(?P<revision>[^/]+)/(?P<path>.+)$")


def _hub(name: str) -> dict[str, Any]:
    """The parts of hub dataset `name` (as `datasets.load_dataset` loads them; memory-mapped from datasets' cache)."""
    return _load_hub(name).parts


def _load_hub(name: str) -> _Hub:
    if name not in _HUB:
        import datasets

        location = _hub_location(name)
        try:  # what datasets.load_dataset does, keeping the builder for its data files
            builder = datasets.load_dataset_builder(location)
            builder.download_and_prepare()
            loaded = builder.as_dataset()
            found = builder.config.data_files.items()
            files = {str(part): [_local_file(f, location) for f in paths] for part, paths in found}
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot load dataset {name!r}: {first_line(e)}") from None
        parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        _HUB[name] = _Hub(parts, files)
    return _HUB[name]


def _content_hash(path: Path) -> dict[str, str]:
    """A file of the Hugging Face cache by the name of the blob it links to (the cache names each by its content's
    hash, as the Hub gives it: SHA-256 for large files, git's SHA-1 for others), without reading it; else (a cache
    without links) the SHA-256 of its bytes."""
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs":
        return {"blob": target.name}
    return {"sha256": sha256_file(path)}


def _local_file(data_file: str, location: str) -> tuple[str, Path]:
    """(name in the repository, local path) of a data file `datasets` read: a Hub URL (`hf://datasets/<repo>@
    <revision>/<path>`, downloaded into the Hugging Face cache), or a file of the local snapshot `location`."""
    from urllib.parse import unquote

    url = _HUB_URL.match(data_file)
    if url is None:
        return Path(data_file).relative_to(location).as_posix(), Path(data_file)
    from huggingface_hub import hf_hub_download

    local = hf_hub_download(url["repo"], url["path"], repo_type="dataset", revision=unquote(url["revision"]))
    return url["path"], Path(local)


def _hub_location(name: str) -> str:
    """Where `datasets.load_dataset` reads hub dataset `name` from: the Hub when it is reachable (datasets then
    fetches whatever its cache lacks), else the dataset's snapshot in the local Hugging Face cache, read as a
    local folder of data files, so that a downloaded dataset loads offline; one line when neither is there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from qlora_ft.model import check_hub_reachable

    try:
        check_hub_reachable(name, "dataset")
        return name
    except UserError as unreachable:
        try:
            return snapshot_download(name, repo_type="dataset", local_files_only=True)
        except (LocalEntryNotFoundError, ValueError):
            raise unreachable from None  # offline or unreachable, and not in the cache


# ----------------------------------------------------------------------------------------------------------
# Tables: .csv in chunks of rows; .json and pickles, read whole


def is_csv(path: Path) -> bool:
    return path.suffix.lower() == ".csv"


def _read_csv(path: Path, **options: Any) -> Any:
    import pandas as pd

    # every cell as text ("" for an empty one), so that "45" stays text
    return pd.read_csv(path, dtype=str, keep_default_na=False, **options)


def iter_csv(path: Path) -> Iterator[dict[str, str]]:
    """The rows of a CSV file as {column: text}, parsed `BATCH_ROWS` rows at a time."""
    try:
        with _read_csv(path, chunksize=BATCH_ROWS) as chunks:
            for chunk in chunks:
                yield from chunk.to_dict("records")
    except Exception as e:  # pandas' and the csv module's parse errors, OSError
        raise UserError(f"cannot read {path}: {first_line(e)}") from None


def table_shape(src: Source) -> Shape:
    """A table's columns and parts: as known (`Source.shape`), else a CSV file's header (no row is read), else
    the whole .json or pickle file read."""
    if src.shape is not None:
        return src.shape
    path = src.files[0]
    if is_csv(path):
        try:
            return Shape(tuple(str(c) for c in _read_csv(path, nrows=0).columns), False)
        except Exception as e:
            raise UserError(f"cannot read {path}: {first_line(e)}") from None
    train, validation = _table(path)
    rows = itertools.chain(train, validation or [])
    names = dict.fromkeys(str(k) for row in rows if isinstance(row, dict) for k in row)
    return Shape(tuple(names), validation is not None)


def _table(path: Path) -> tuple[list, list | None]:
    """(train rows, validation rows or None) of a .json or pickle file, read whole (at every call: a table's rows
    are not kept, so they are never older than the file)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from None
        return _parts_of(safe_unpickle(data, str(path)), str(path))
    return _parts_of(_load_json(path), str(path))


def _parts_of(obj: Any, source: str) -> tuple[list, list | None]:
    """(train rows, validation rows or None) of a loaded object: a list of records or strings, a DataFrame or
    Series, a dict of equal-length columns, or {"train": ..., "validation": ...} holding any of those."""
    pd = sys.modules.get("pandas")  # a DataFrame or Series exists only once pandas is loaded
    if isinstance(obj, dict) and "train" in obj:
        val_key = next((k for k in VALIDATION_KEYS if k in obj), None)
        if val_key is None:
            raise UserError(f"{source}: a split dataset needs 'train' and 'validation' keys (found {list(obj)})")
        return _parts_of(obj["train"], source)[0], _parts_of(obj[val_key], source)[0]
    if pd is not None and isinstance(obj, pd.DataFrame):
        return obj.to_dict("records"), None
    if pd is not None and isinstance(obj, pd.Series):
        return obj.tolist(), None
    if isinstance(obj, dict) and obj and all(isinstance(v, (list, tuple)) for v in obj.values()):
        if len({len(v) for v in obj.values()}) != 1:
            raise UserError(f"{source}: the columns have different lengths")
        keys = list(obj)
        return [dict(zip(keys, values, strict=True)) for values in zip(*obj.values(), strict=True)], None
    if isinstance(obj, (list, tuple)):
        return list(obj), None
    raise UserError(f"{source}: expected a list of records or paragraphs, a dict of columns, or train/validation "
                    f"splits, got {type(obj).__name__}")  # fmt: skip


def read_text_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (invalid byte at offset {e.start}); re-save it as UTF-8") from None


def _load_json(path: Path) -> Any:
    """A JSON document; a .json file holding one record per line (JSON Lines, a common naming slip) is
    read as JSON Lines."""
    text = read_text_file(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return list(iter_jsonl(path))
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
