"""Data: file -> paragraphs -> train/validation split -> token windows -> padded batches.

All functions here are pure (lists in, lists/tensors out) except the loaders, which only read.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import logging
import math
import os
import pickle
import random
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlora_ft.errors import UserError, first_line
from qlora_ft.fs import follow_umask

log = logging.getLogger(__name__)

TEXT_KEYS = ("sentence", "text", "paragraph")
TABLE_SUFFIXES = {".csv", ".jsonl", ".json", ".parquet"}
PICKLE_SUFFIXES = {".pkl", ".pickle"}
VALIDATION_KEYS = ("validation", "valid", "val", "test")

# ----------------------------------------------------------------------------------------------------------
# Restricted unpickling
#
# Hand-written because no library restricts pickle: `pickle.load` runs any callable a file names. This
# unpickler resolves only the globals a list/dict of strings or a pandas DataFrame/Series of text needs
# (current and older pandas/numpy names); everything else is refused before anything is called.

_SAFE_GLOBALS = {
    ("builtins", "slice"), ("builtins", "bytearray"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "complex"), ("__builtin__", "slice"), ("__builtin__", "bytearray"), ("__builtin__", "set"),
    ("_codecs", "encode"),  # how protocol 2 stores bytes
    ("collections", "OrderedDict"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    ("pandas", "DataFrame"), ("pandas", "Series"), ("pandas", "Index"), ("pandas", "RangeIndex"),
    ("pandas", "NA"), ("pandas", "StringDtype"),
    ("pandas.core.frame", "DataFrame"), ("pandas.core.series", "Series"),
    ("pandas.core.indexes.base", "Index"), ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.range", "RangeIndex"),
    ("pandas.core.internals.managers", "BlockManager"), ("pandas.core.internals.managers", "SingleBlockManager"),
    ("pandas.core.internals.blocks", "new_block"), ("pandas.core.internals.blocks", "ObjectBlock"),
    ("pandas.core.internals.blocks", "Block"), ("pandas.core.internals.blocks", "NumpyBlock"),
    ("pandas._libs.internals", "_unpickle_block"), ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
    ("pandas.arrays", "StringArray"), ("pandas.arrays", "ArrowStringArray"),
    ("pandas.core.arrays.string_", "StringArray"), ("pandas.core.arrays.string_", "StringDtype"),
    ("pandas.core.arrays.string_arrow", "ArrowStringArray"),
    ("pyarrow.lib", "_restore_array"), ("pyarrow.lib", "py_buffer"), ("pyarrow.lib", "type_for_alias"),
}  # fmt: skip


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def safe_unpickle(data: bytes, source: str = "pickle") -> Any:
    """Load pickled builtin containers, strings, numbers and pandas text tables without running other code."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("refusing"):
            raise UserError(
                f"{source}: {e}: only lists/dicts of text and pandas DataFrames/Series are accepted "
                "(nothing in the file was executed)"
            ) from None
        raise UserError(f"{source}: not a readable pickle, corrupt or truncated ({e})") from None
    except Exception as e:  # any failure inside a malformed stream: EOFError, ValueError, struct errors, ...
        raise UserError(f"{source}: not a readable pickle, corrupt or truncated ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------------------
# Loading paragraphs


def clean_paragraph(text: str) -> str:
    """Join hard-wrapped lines and trim: `"A truth\\nuniversally  known. "` -> `"A truth universally known."`.

    Runs of whitespace inside a paragraph become one space; NUL bytes are dropped.
    """
    return " ".join(text.replace("\x00", "").split())


_HEADING = re.compile(
    r"^(?:(?:chapter|volume|book|part|vol\.|chap\.)\s+(?:[ivxlcdm]+|\d+|[a-z-]+)\.?"  # CHAPTER I, Volume 2
    r"|=(?:\s*=)*\s.*\s=(?:\s*=)*"  # WikiText: = Title =, = = Section = =
    r"|[ivxlcdm]+\.?|\d+\.?)$",  # a bare chapter number: IV, 12.
    re.IGNORECASE,
)
# A numbered heading with a title: "CHAPTER 1. I AM BORN", "CHAPTER II—A DEAN", "Book I: Boy and Girl"
_TITLED = re.compile(r"^(?:chapter|volume|book|part)\s+(?:[ivxlcdm]+|\d+|[a-z]+)(\s*[.:\u2014-]\s*|\s+)(.+)$", re.I)


def is_heading(paragraph: str) -> bool:
    """Whether a cleaned paragraph is only a heading (dropped from training text unless --keep-headings).
    A heading with a title counts when the title is in capitals or follows a colon.

    >>> [is_heading(p) for p in ["CHAPTER I", "Chapter 12.", "VOLUME II", "= = Early life = =", "IV", "I said so."]]
    [True, True, True, True, True, False]
    >>> [is_heading(p) for p in ["CHAPTER 1. I AM BORN", "CHAPTER II—A DEAN", "Book I: Boy and Girl"]]
    [True, True, True]
    >>> [is_heading(p) for p in ["Chapter and verse were quoted at him by the curate.", "Part of it was true."]]
    [False, False]
    """
    text = paragraph.strip()
    if len(text.split()) > 8:
        return False
    titled = _TITLED.match(text)
    return _HEADING.match(text) is not None or (
        titled is not None and (titled.group(2).upper() == titled.group(2) or ":" in titled.group(1))
    )


def split_text(text: str) -> list[str]:
    """Paragraphs of a plain-text book: blocks separated by blank lines, hard-wrapped lines joined.

    >>> split_text("First line\\nwrapped.\\n\\n\\nSecond.\\n")
    ['First line wrapped.', 'Second.']
    """
    blocks = text.replace("\r\n", "\n").replace("\r", "\n").split("\n\n")
    return [p for p in (clean_paragraph(b) for b in blocks) if p]


def read_text_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (invalid byte at offset {e.start}); re-save it as UTF-8") from None


def _texts(items: Any, text_column: str | None, source: str) -> list[str]:
    """Paragraph strings from a list of str/dicts, a DataFrame, a Series, or a column dict."""
    # a DataFrame, Series or pd.NA exists only once pandas is loaded: a list of paragraphs does not import it
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(items, pd.DataFrame):
        column = _pick_column([str(c) for c in items.columns], text_column, source)
        items = items[column].tolist()
    elif pd is not None and isinstance(items, pd.Series):
        items = items.tolist()
    elif isinstance(items, dict):
        column = _pick_column([str(k) for k in items], text_column, source)
        items = items[column]
        if isinstance(items, str):
            items = [items]
    if not isinstance(items, (list, tuple)):
        raise UserError(f"{source}: expected a list of paragraphs, got {type(items).__name__}")
    texts, missing = [], 0
    for i, item in enumerate(items):
        if isinstance(item, dict):
            item = item.get(_pick_column([str(k) for k in item], text_column, f"{source} item {i}"))
        if item is None or (isinstance(item, float) and math.isnan(item)) or (pd is not None and item is pd.NA):
            missing += 1
            continue
        if not isinstance(item, str):
            raise UserError(f"{source}: item {i} is {type(item).__name__}, not text")
        if text := clean_paragraph(item):
            texts.append(text)
    if missing:
        log.warning("%s: skipped %d missing values", source, missing)
    return texts


def _pick_column(columns: list[str], text_column: str | None, source: str) -> str:
    if text_column is not None:
        if text_column not in columns:
            raise UserError(f"{source}: no column {text_column!r} (columns: {', '.join(columns) or 'none'})")
        return text_column
    for key in TEXT_KEYS:
        if key in columns:
            return key
    raise UserError(
        f"{source}: no text column found among {', '.join(columns) or 'none'}; "
        f"name one with --text-column (looked for {', '.join(TEXT_KEYS)})"
    )


@dataclass
class Corpus:
    """Paragraphs as loaded; `validation` is set only when the source was already split."""

    train: list[str]
    validation: list[str] | None = None


def _from_object(obj: Any, text_column: str | None, source: str) -> Corpus:
    if isinstance(obj, dict) and "train" in obj:
        val_key = next((k for k in VALIDATION_KEYS if k in obj), None)
        if val_key is None:
            raise UserError(f"{source}: a split dataset needs 'train' and 'validation' keys (found {list(obj)})")
        return Corpus(_texts(obj["train"], text_column, source), _texts(obj[val_key], text_column, source))
    return Corpus(_texts(obj, text_column, source))


def load_dataset_splits(source: str):
    """(train, validation or None) of a `datasets` save_to_disk folder or hub dataset: its train and
    validation splits if it has both, else all its splits together as train."""
    import datasets

    try:
        if Path(source).is_dir():
            ds = datasets.load_from_disk(source)
        else:
            ds = datasets.load_dataset(_hub_dataset(source))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot load dataset {source!r}: {first_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        val_key = next((k for k in VALIDATION_KEYS if k in ds), None)
        if "train" in ds and val_key:
            return ds["train"], ds[val_key]
        ds = datasets.concatenate_datasets(list(ds.values()))
    return ds, None


def is_hub_name(source: str) -> bool:
    """Whether `source`, not found locally, reads as a hub repository id (`name` or `owner/name`), not a path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return not source.startswith((".", "~"))


def _hub_dataset(name: str) -> str:
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


def _load_datasets(source: str, text_column: str | None) -> Corpus:
    train, validation = load_dataset_splits(source)
    val_texts = None if validation is None else _texts(validation.to_pandas(), text_column, source)
    return Corpus(_texts(train.to_pandas(), text_column, source), val_texts)


def _is_saved_dataset(path: Path) -> bool:
    return any(path.glob("*.arrow")) or (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def is_plain_text(source: str) -> bool:
    """Whether `load_corpus` reads `source` as plain text: a .txt file, or a folder that is not a saved dataset."""
    path = Path(source)
    return not _is_saved_dataset(path) if path.is_dir() else path.suffix.lower() == ".txt"


def text_paragraphs(files: list[Path]) -> list[str]:
    """The paragraphs of plain-text books."""
    return [p for f in files for p in split_text(read_text_file(f))]


def drop_headings(corpus: Corpus, source: str) -> Corpus:
    """`corpus` without its heading-only paragraphs (`is_heading`): the one rule for text from every source, as
    `sources.iter_paragraphs` applies it to what the token cache stores."""
    train = [p for p in corpus.train if not is_heading(p)]
    validation = None if corpus.validation is None else [p for p in corpus.validation if not is_heading(p)]
    dropped = len(corpus.train) + len(corpus.validation or []) - len(train) - len(validation or [])
    if dropped:
        log.info("%s: dropped %d heading-only paragraphs (CHAPTER I, ...; --keep-headings keeps them)", source,
                 dropped)  # fmt: skip
    return Corpus(train, validation)


def load_corpus(source: str, text_column: str | None = None, keep_headings: bool = False) -> Corpus:
    """Read paragraphs from any supported source (see `DataArgs.data`). Raises UserError on bad input.

    Heading-only paragraphs are dropped from every source unless `keep_headings`."""
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_dir():
        if _is_saved_dataset(path):
            corpus = _load_datasets(source, text_column)
        else:
            files = sorted(path.glob("*.txt"))
            if not files:
                raise UserError(f"{source}: folder has no .txt files and is not a saved dataset")
            corpus = Corpus(text_paragraphs(files))
    elif path.is_file():
        if suffix in PICKLE_SUFFIXES:
            corpus = _from_object(safe_unpickle(_read_bytes(path), str(path)), text_column, str(path))
        elif suffix == ".txt":
            corpus = Corpus(text_paragraphs([path]))
        elif suffix in TABLE_SUFFIXES:
            import pandas as pd

            try:
                if suffix == ".csv":
                    frame = pd.read_csv(path)
                elif suffix == ".parquet":
                    frame = pd.read_parquet(path)
                else:
                    frame = pd.read_json(path, lines=suffix == ".jsonl")
            except Exception as e:
                raise UserError(f"cannot read {path}: {first_line(e)}") from None
            corpus = Corpus(_texts(frame, text_column, str(path)))
        else:
            raise UserError(f"{source}: unknown data format {suffix!r} (use .pkl, .txt, .csv, .jsonl or .parquet)")
    elif suffix in PICKLE_SUFFIXES | TABLE_SUFFIXES | {".txt"} or not is_hub_name(source):
        raise UserError(f"data file not found: {source}")
    else:
        corpus = _load_datasets(source, text_column)
    if not keep_headings:
        corpus = drop_headings(corpus, source)
    n = len(corpus.train) + len(corpus.validation or [])
    if n == 0:
        raise UserError(f"{source}: no paragraphs found (the data is empty)")
    return corpus


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


# ----------------------------------------------------------------------------------------------------------
# Split


@dataclass
class Split:
    """Which paragraphs train and which validate: indices into `paragraphs` (deduplicated, load order)."""

    paragraphs: list[str]
    train_idx: list[int]
    val_idx: list[int]

    @property
    def train(self) -> list[str]:
        return [self.paragraphs[i] for i in self.train_idx]

    @property
    def validation(self) -> list[str]:
        return [self.paragraphs[i] for i in self.val_idx]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.paragraphs:
            h.update(p.encode("utf-8"))
            h.update(b"\x00")
        return h.hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {"data_sha256": self.fingerprint(), "n_paragraphs": len(self.paragraphs),
                "train": self.train_idx, "validation": self.val_idx}  # fmt: skip


def split_corpus(corpus: Corpus, train_size: float, seed: int) -> Split:
    """Split at paragraph level, before any chunking, so no paragraph text is on both sides.

    Exact duplicate paragraphs are kept once (otherwise a repeated line such as "CHAPTER I" would land on
    both sides). A pre-split corpus keeps its split; paragraphs in both are kept in validation only.

    >>> s = split_corpus(Corpus(["a", "b", "c", "a"]), train_size=0.5, seed=0); sorted(s.train + s.validation)
    ['a', 'b', 'c']
    """
    if corpus.validation is not None:
        val = list(dict.fromkeys(corpus.validation))
        val_set = set(val)
        train = [p for p in dict.fromkeys(corpus.train) if p not in val_set]
        if not train or not val:
            raise UserError("the pre-split data needs at least one paragraph on each side")
        return Split(train + val, list(range(len(train))), list(range(len(train), len(train) + len(val))))
    paragraphs = list(dict.fromkeys(corpus.train))
    if len(paragraphs) < len(corpus.train):
        log.info("dropped %d duplicate paragraphs", len(corpus.train) - len(paragraphs))
    n_val = max(1, round(len(paragraphs) * (1.0 - train_size)))
    if len(paragraphs) - n_val < 1:
        raise UserError(f"too few paragraphs to split: {len(paragraphs)} (need at least 2)")
    order = list(range(len(paragraphs)))
    random.Random(seed).shuffle(order)
    return Split(paragraphs, sorted(order[n_val:]), sorted(order[:n_val]))


def split_from_json(paragraphs_source: Split, saved: dict[str, Any]) -> Split:
    """The split a checkpoint recorded, checked against the data loaded now."""
    if saved.get("data_sha256") != paragraphs_source.fingerprint():
        raise UserError(
            "the data differs from the data this checkpoint was trained on (fingerprint mismatch); "
            "resume with the same --data, or start a new run (earlier versions kept the heading-only paragraphs "
            "of tables and hub datasets: --keep-headings True reads them as they did)"
        )
    return Split(paragraphs_source.paragraphs, list(saved["train"]), list(saved["validation"]))


# ----------------------------------------------------------------------------------------------------------
# Tokens -> windows -> batches


def tokenize(tokenizer, texts: Sequence[str], batch: int = 1000) -> list[list[int]]:
    """Token ids per text, without special tokens (added by `to_windows`)."""
    ids: list[list[int]] = []
    for i in range(0, len(texts), batch):
        ids.extend(tokenizer(list(texts[i : i + batch]), add_special_tokens=False, verbose=False)["input_ids"])
    return ids


def to_windows(ids: list[int], eos_id: int, max_len: int) -> list[list[int]]:
    """`<eos> + ids + <eos>`, cut into windows of at most `max_len` tokens that overlap by one token, so that
    every token after the leading `<eos>` is predicted exactly once (the overlap token is context only).

    >>> to_windows([1, 2, 3, 4, 5], eos_id=0, max_len=4)
    [[0, 1, 2, 3], [3, 4, 5, 0]]
    >>> to_windows([1, 2], eos_id=0, max_len=8)
    [[0, 1, 2, 0]]
    """
    seq = [eos_id, *ids, eos_id]
    if len(seq) <= max_len:
        return [seq]
    step = max_len - 1
    return [seq[i : i + max_len] for i in range(0, len(seq) - 1, step)]


def windows_for(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    return [w for ids in tokenize(tokenizer, texts) for w in to_windows(ids, eos, max_len)]


def pack(lengths: Sequence[int], order: Sequence[int], block_len: int) -> list[list[int]]:
    """Best-fit decreasing: put window indices (taken longest first, ties in `order`) into rows of at most
    `block_len` tokens, each into the fullest row that still has room (the earliest such row on a tie). Waste is
    usually well under 1%.

    Rows with room left wait in one heap per amount of room, and an integer's bits say which amounts have rows:
    the fullest row with room for n tokens is then two integer operations away, which keeps packing a
    million windows to about a second (hand-written: no library packs by best fit; a sorted list took 6x as long).

    >>> pack([5, 3, 2, 4], order=[0, 1, 2, 3], block_len=7)
    [[0, 2], [3, 1]]
    """
    order = np.asarray(order, dtype=np.int64)
    sizes = np.asarray(lengths, dtype=np.int64)
    taken = order[np.argsort(-sizes[order], kind="stable")].tolist()  # stable: equal lengths keep `order`
    rows: list[list[int]] = []
    waiting: dict[int, list[int]] = {}  # room left -> heap of row indices with exactly that room
    has_room = 0  # bit r set: some row has exactly r tokens of room
    for i, n in zip(taken, sizes[taken].tolist(), strict=True):
        fits = has_room >> n
        if fits:
            room = n + ((fits & -fits).bit_length() - 1)  # the least room that still holds n tokens
            row = heapq.heappop(waiting[room])
            if not waiting[room]:
                has_room &= ~(1 << room)
            rows[row].append(i)
        else:
            room, row = block_len, len(rows)
            rows.append([i])
        if room > n:
            heapq.heappush(waiting.setdefault(room - n, []), row)
            has_room |= 1 << (room - n)
    return rows


def epoch_rows(lengths: Sequence[int], block_len: int, packing: bool, seed: int, epoch: int) -> list[list[int]]:
    """The rows (lists of window indices) of one epoch, in training order; a pure function of (seed, epoch),
    so a resumed run sees the same order and can skip the batches it already trained on.

    packing: windows packed into rows of `block_len` tokens, rows shuffled. Otherwise one window a row, in
    a shuffled order (batches are then grouped by length in `epoch_batches`).
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if not packing:
        return [[i] for i in order]
    rows = pack(lengths, order, block_len)
    return [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]


def epoch_batches(
    rows: list[list[int]], lengths: Sequence[int], batch_size: int, group_by_length: bool, seed: int, epoch: int
) -> list[list[list[int]]]:
    """Rows cut into micro-batches. With `group_by_length`, rows are sorted by length inside pools of 64
    batches so that a padded batch holds rows of similar length, and the batches are then shuffled."""
    if group_by_length:
        pool = batch_size * 64
        rows = [r for i in range(0, len(rows), pool)
                for r in sorted(rows[i : i + pool], key=lambda r: sum(lengths[w] for w in r))]  # fmt: skip
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    if group_by_length:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def collate(rows: Sequence[Sequence[Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch from rows of one or more windows each. Shapes (B, T), T = the longest row.

    Every window's first token is context only (label -100): it is the paragraph's leading `<eos>` or the
    token a window overlaps with the previous one, and in a packed row it must not be predicted from the
    window before it. Padding gets label -100 *by position*, so a real closing `<eos>` (the same id as the
    pad token in GPT-2) is still a target.

    Rows of one window are padded and masked with `attention_mask`. Rows of several windows (packing) get
    `position_ids` that restart at every window instead and no `attention_mask`: transformers then builds a
    block-diagonal causal mask from the restarts, so no token attends across windows (the padding tail
    is a block of its own).

    >>> collate([[[0, 5, 0]], [[0, 7]]], pad_id=0)["labels"].tolist()
    [[-100, 5, 0], [-100, 7, -100]]
    >>> b = collate([[[0, 5, 0], [0, 7]]], pad_id=0); b["position_ids"].tolist(), b["labels"].tolist()
    ([[0, 1, 2, 0, 1]], [[-100, 5, 0, -100, 7]])
    """
    width = max(sum(len(w) for w in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for window in row:
            n = len(window)
            input_ids[r, at : at + n] = torch.tensor(window, dtype=torch.long)
            labels[r, at + 1 : at + n] = input_ids[r, at + 1 : at + n]
            position_ids[r, at : at + n] = torch.arange(n)
            attention_mask[r, at : at + n] = 1
            at += n
        position_ids[r, at:] = torch.arange(width - at)  # the padding tail: a block of its own
    batch = {"input_ids": input_ids, "labels": labels}
    if all(len(row) == 1 for row in rows):
        batch["attention_mask"] = attention_mask
    else:
        batch["position_ids"] = position_ids
    return batch


def eval_batches(lengths: Sequence[int], block_len: int, packing: bool, batch_size: int) -> list[list[list[int]]]:
    """Validation batches: packed rows, or rows grouped by length (order does not matter for a mean)."""
    order = list(range(len(lengths)))
    if packing:
        rows = pack(lengths, order, block_len)
    else:
        rows = [[i] for i in sorted(order, key=lambda i: lengths[i])]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


# ----------------------------------------------------------------------------------------------------------
# `qlora-ft prepare`


def write_pickle_dataset(texts: list[str], out: str) -> None:
    """Write the original format (a list of `{"sentence": paragraph}`) atomically: temp file, then rename.
    The file gets the usual mode (`follow_umask`), not the temp file's 0600."""
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    try:
        follow_umask([tmp])
        with os.fdopen(fd, "wb") as f:
            pickle.dump([{"sentence": t} for t in texts], f, protocol=4)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
