"""Token cache: tokenize a corpus once, then open it as memory maps in milliseconds, on every start and resume.

One folder per fingerprint under the cache folder (`--cache-dir`, else $QLORA_FT_CACHE, else
~/.cache/qlora-ft/tokens):

    <fingerprint>/
      ids.bin      token ids of all records back to back (uint16 when the vocabulary fits, else uint32)
      mask.bin     uint8 per token, 1 = trained on; absent when every token is (plain text)
      index.npy    int64 (n_records, 2): start offset in ids.bin, length
      hashes.npy   uint64 per record: a hash of the record's text, for removing duplicates before the split
      split-<seed>-<share>.npy   int8 per record: 1 train, 2 validation, 0 duplicate (recomputable)
      meta.json    what the fingerprint covers, counts, dtype, file sizes; written last

The fingerprint covers the data files' content (SHA-256 of their bytes), the tokenizer (its serialized
vocabulary/merges/pre-tokenizer, class, eos id, size), and every option that changes the ids (format, headings,
layout, text column, template, FORMAT_VERSION). It does not cover the window length: windows are cut from the
stored records when training starts (`cut_windows`), so one cache serves every --max_input_length.

EOS: records are stored without special tokens. Windowing wraps each record as `<eos> + ids + <eos>` exactly as
`data.to_windows` does; the leading <eos> is context and the closing <eos> is trained on (mask 1), so a model
trained on prompt/response records learns to stop.

Builds are streamed (memory bounded by a few chunks of records), use every core (the tokenizers library's
threads, or a spawn-safe process pool whose workers build the tokenizer once), run under a file lock (a second
run building the same cache waits, then reuses it), write into a temporary folder renamed into place when
complete, and refuse to start when the disk is clearly too small. A folder without meta.json or whose file sizes
disagree with it is rebuilt.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import multiprocessing
import os
import random
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qlora_ft.errors import UserError
from qlora_ft.fs import fsync, sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
Segment = tuple[str, bool]  # (text, trained on)
Parallel = Literal["threads", "processes"]
Record = Sequence[Segment]  # plain paragraph: [(text, True)]; instruction: [(prompt, False), (response, True)]
POOL_MIN_BYTES = 16 << 20  # below this much input, tokenize in this process (see open_or_build)
CHUNK_CHARS = 1 << 18  # text per work item sent to a tokenizer worker
BYTES_PER_TOKEN = 2  # a cautious estimate for the disk check (English BPE averages about 4 bytes a token)
SPLIT_DROPPED, SPLIT_TRAIN, SPLIT_VALIDATION = 0, 1, 2


def default_cache_dir() -> Path:
    """$QLORA_FT_CACHE, else $XDG_CACHE_HOME/qlora-ft/tokens, else ~/.cache/qlora-ft/tokens."""
    if env := os.environ.get("QLORA_FT_CACHE"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "qlora-ft" / "tokens"


# ----------------------------------------------------------------------------------------------------------
# Fingerprint


def file_digests(files: Sequence[Path], root: Path | None = None) -> list[dict[str, Any]]:
    """Name (relative to `root`), size and SHA-256 of each file's bytes."""
    out = []
    for path in files:
        try:
            digest = sha256_file(path)
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from None
        name = path.relative_to(root).as_posix() if root is not None and root != path else path.name
        out.append({"name": name, "bytes": path.stat().st_size, "sha256": digest})
    return out


def _backend_json(tokenizer: Any) -> str | None:
    """The fast tokenizer's serialized pipeline with truncation and padding removed (they do not change the
    ids of a whole text, and transformers changes them on the object during calls), or None for slow ones."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    spec["truncation"] = spec["padding"] = None
    return json.dumps(spec, sort_keys=True, ensure_ascii=False)


def tokenizer_digest(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer's ids: class, eos id, size and a hash of its vocabulary, merges and rules."""
    content = _backend_json(tokenizer)
    if content is None:
        content = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {"class": type(tokenizer).__name__, "eos_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer),
            "sha256": hashlib.sha256(content.encode("utf-8")).hexdigest()}  # fmt: skip


def fingerprint(covers: dict[str, Any]) -> str:
    """A short stable hash of everything that determines the cached ids (a JSON-able dict)."""
    text = json.dumps({**covers, "format_version": FORMAT_VERSION}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


# ----------------------------------------------------------------------------------------------------------
# Reading side


class CacheInvalid(Exception):
    """A cache folder that is incomplete, truncated or from another format version (it gets rebuilt)."""


class TokenCache:
    """An opened cache: records as slices of memory-mapped files (nothing is read until sliced).

    `lengths[i]` is record i's token count (without the <eos> that windowing adds); `tokens(i)` its ids,
    `mask(i)` its per-token loss mask (1 = trained on). `built` says whether this call built the cache.
    """

    def __init__(self, path: Path, built: bool = False):
        self.path = Path(path)
        self.built = built
        self.meta = _read_meta(self.path)
        n_tokens = self.meta["n_tokens"]
        dtype = np.dtype(self.meta["dtype"])
        try:  # a reader holds no lock: a builder may be replacing this folder right now (see `_publish`)
            self._ids = np.memmap(self.path / "ids.bin", dtype=dtype, mode="r") if n_tokens else np.zeros(0, dtype)
            has_mask = self.meta["has_mask"] and n_tokens
            self._mask = np.memmap(self.path / "mask.bin", dtype=np.uint8, mode="r") if has_mask else None
            self.index = np.load(self.path / "index.npy", mmap_mode="r")
            self.hashes = np.load(self.path / "hashes.npy", mmap_mode="r")
        except OSError as e:
            raise CacheInvalid(f"{self.path}: {e.strerror or e}") from None
        if len(self.index) and int(self.index[-1].sum()) != n_tokens:
            raise CacheInvalid(f"{self.path}: index.npy disagrees with ids.bin")

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def n_records(self) -> int:
        return self.meta["n_records"]

    @property
    def n_tokens(self) -> int:
        return self.meta["n_tokens"]

    @property
    def eos_id(self) -> int:
        return self.meta["eos_id"]

    @property
    def lengths(self) -> np.ndarray:
        return self.index[:, 1]

    def tokens(self, i: int) -> np.ndarray:
        start, length = self.index[i]
        return self._ids[start : start + length]

    def mask(self, i: int) -> np.ndarray:
        start, length = self.index[i]
        if self._mask is None:
            return np.ones(int(length), dtype=np.uint8)
        return self._mask[start : start + length]


def _read_meta(path: Path) -> dict[str, Any]:
    """meta.json, checked against the folder: every file it lists exists with the size it records."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CacheInvalid(f"{path}: no readable meta.json ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or \
            meta.get("fingerprint") != path.name or not isinstance(meta.get("files"), dict):  # fmt: skip
        raise CacheInvalid(f"{path}: meta.json is from another format or folder")
    for name, size in meta["files"].items():
        try:
            actual = (path / name).stat().st_size
        except OSError:
            raise CacheInvalid(f"{path}: {name} is missing") from None
        if actual != size:
            raise CacheInvalid(f"{path}: {name} has {actual} bytes, meta.json says {size} (truncated?)")
    return meta


# ----------------------------------------------------------------------------------------------------------
# Building


def open_or_build(
    covers: dict[str, Any],
    tokenizer: Any,
    records: Callable[[], Iterable[Record]],
    *,
    cache_dir: str | Path | None = None,
    validation: Callable[[], Iterable[Record]] | None = None,
    input_bytes: int = 0,
    workers: int | None = None,
    parallel: Parallel = "threads",
) -> TokenCache:
    """The cache for `covers` (see `fingerprint`): opened when complete, else built from `records()` first.

    `records` is called only on a miss; `validation` (for pre-split sources) adds records that the split
    keeps on the validation side. `input_bytes` sizes the disk check. `workers`: how many cores tokenize
    (default: every core available), as the tokenizers library's threads in this process (`parallel="threads"`,
    measured faster on 2 cores: docs/data-cache.md) or as spawned processes. Raises UserError when the cache
    folder is unusable or too small.
    """
    import filelock

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the token cache folder {root}: {e.strerror}") from None
    fp = fingerprint(covers)
    final = root / fp
    if workers is None and parallel == "processes" and 0 < input_bytes < POOL_MIN_BYTES:
        workers = 1  # starting spawned workers costs seconds: more than tokenizing a few MB
    try:
        return TokenCache(final)
    except CacheInvalid:
        pass
    lock = filelock.FileLock(str(root / f".{fp}.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log.info("another process is building the token cache %s; waiting for it", final)
        lock.acquire()
    try:
        try:  # another process may have built it while we waited for the lock
            return TokenCache(final)
        except CacheInvalid as e:
            if final.exists():
                log.warning("token cache %s is incomplete or damaged (%s); rebuilding", final, e)
        for stale in [*root.glob(f".{fp}.tmp-*"), *root.glob(f".{fp}.old-*")]:  # a killed build's; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        meta = _build_into(root, fp, tokenizer, records, validation, input_bytes, (workers, parallel))
        meta["covers"] = covers
        _publish(root, fp, meta)
    finally:
        lock.release()
    log.info("token cache %s: %d records, %d tokens, built in %.1fs", final, meta["n_records"], meta["n_tokens"],
             meta["build_seconds"])  # fmt: skip
    return TokenCache(final, built=True)


def _build_into(root: Path, fp: str, tokenizer: Any, records: Callable[[], Iterable[Record]],
                validation: Callable[[], Iterable[Record]] | None, input_bytes: int,
                workers: tuple[int | None, Parallel]) -> dict[str, Any]:  # fmt: skip
    """Build the cache files into root/.<fp>.tmp-<pid>/ (the caller holds the lock); returns meta.json's content
    less `covers`. The temporary folder is removed on failure; a full disk is a UserError."""
    vocab_size = len(tokenizer)
    itemsize = 2 if vocab_size <= 1 << 16 else 4
    check_disk_space(root, input_bytes, itemsize)
    tmp = root / f".{fp}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        started = time.perf_counter()
        meta = _build(tmp, tokenizer, records, validation, itemsize, workers)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise _full_disk(root) from None
        raise
    meta.update(fingerprint=fp, format_version=FORMAT_VERSION, eos_id=tokenizer.eos_token_id, vocab_size=vocab_size,
                build_seconds=round(time.perf_counter() - started, 2),
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # fmt: skip
    return meta


def _full_disk(root: Path) -> UserError:
    return UserError(f"the disk holding {root} filled up while building the token cache")


def _publish(root: Path, fp: str, meta: dict[str, Any]) -> None:
    """Write meta.json (last: the folder is now complete) and rename the temporary folder to its final name,
    replacing a damaged folder there (the caller holds the lock)."""
    tmp, final = root / f".{fp}.tmp-{os.getpid()}", root / fp
    old = root / f".{fp}.old-{os.getpid()}"
    try:
        _write_json(tmp / "meta.json", meta)
        fsync(tmp)
        if final.exists():  # renamed aside, not deleted in place: the final name is missing only between renames
            os.rename(final, old)
        os.rename(tmp, final)
        fsync(root)  # the rename itself survives a power cut
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _full_disk(root) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def check_disk_space(root: Path, input_bytes: int, itemsize: int) -> None:
    """UserError when `root`'s disk cannot hold a cache for `input_bytes` of text (cautious estimate)."""
    need = (input_bytes // BYTES_PER_TOKEN) * (itemsize + 1) + (1 << 20)
    free = shutil.disk_usage(root).free
    if free < need:
        raise UserError(
            f"not enough disk space for the token cache in {root}: about {need / 1e9:.2f} GB needed, "
            f"{free / 1e9:.2f} GB free; free some space or choose another folder with --cache-dir or QLORA_FT_CACHE"
        )


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _build(
    tmp: Path,
    tokenizer: Any,
    records: Callable[[], Iterable[Record]],
    validation: Callable[[], Iterable[Record]] | None,
    itemsize: int,
    workers: tuple[int | None, Parallel],
) -> dict[str, Any]:
    """Tokenize every record into the files of `tmp`, in order; returns the counts for meta.json."""
    from tqdm.auto import tqdm

    dtype = np.uint16 if itemsize == 2 else np.uint32
    lengths, hashes = [], []
    n_tokens, all_trained, n_train_fixed = 0, True, None
    spec = _encoder_spec(tokenizer)
    parts = [records] if validation is None else [records, validation]
    with open(tmp / "ids.bin", "wb") as ids_f, open(tmp / "mask.bin", "wb") as mask_f, \
            tqdm(desc="tokenizing", unit=" tok", unit_scale=True, disable=None) as bar:  # fmt: skip
        for part in parts:
            if part is validation:
                n_train_fixed = sum(len(x) for x in lengths)
            for ids, lens, mask, hs in _encoded(_chunks(part()), spec, *workers):
                if len(ids) and int(ids.max()) > np.iinfo(dtype).max:  # astype would wrap it around silently
                    raise UserError(f"the tokenizer gave token id {int(ids.max())}, past its vocabulary size "
                                    f"{len(tokenizer)}; its vocabulary and added tokens disagree")  # fmt: skip
                ids.astype(dtype, copy=False).tofile(ids_f)
                mask.tofile(mask_f)
                all_trained = all_trained and bool(mask.all())
                lengths.append(lens)
                hashes.append(hs)
                n_tokens += len(ids)
                bar.update(len(ids))
        for f in (ids_f, mask_f):
            f.flush()
            os.fsync(f.fileno())
    lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if len(lengths_all) == 0:
        raise UserError("no records to tokenize (the data is empty)")
    starts = np.concatenate([[0], np.cumsum(lengths_all)[:-1]]).astype(np.int64)
    _save_npy(tmp / "index.npy", np.stack([starts, lengths_all.astype(np.int64)], axis=1))
    _save_npy(tmp / "hashes.npy", np.concatenate(hashes).astype(np.uint64))
    if all_trained:
        (tmp / "mask.bin").unlink()
    files = {p.name: p.stat().st_size for p in tmp.iterdir()}
    return {"n_records": len(lengths_all), "n_tokens": n_tokens, "n_train_fixed": n_train_fixed,
            "dtype": np.dtype(dtype).name, "has_mask": not all_trained, "files": files}  # fmt: skip


def _chunks(records: Iterable[Record]) -> Iterator[list[Record]]:
    """Records grouped into work items of about CHUNK_CHARS characters."""
    chunk: list[Record] = []
    chars = 0
    for record in records:
        chunk.append(record)
        chars += sum(len(text) for text, _ in record)
        if chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------------------------------------
# Tokenizing (in this process, with the tokenizers library's threads, or in a pool of spawned workers)

_WORKER_ENCODE: Callable[[list[str]], list[list[int]]] | None = None


def _encoder_spec(tokenizer: Any) -> tuple[str, Any]:
    """What a worker needs to rebuild the tokenizer: the fast tokenizer's JSON (cheap to send, and workers then
    import only `tokenizers`), or the tokenizer object itself for slow tokenizers (used in this process)."""
    content = _backend_json(tokenizer)
    return ("backend", content) if content is not None else ("object", tokenizer)


def _make_encoder(spec: tuple[str, Any]) -> Callable[[list[str]], list[list[int]]]:
    kind, value = spec
    if kind == "object":
        return lambda texts: value(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(value)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast: no character offsets computed
    return lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]


@contextlib.contextmanager
def _tokenizer_threads(on: bool) -> Iterator[None]:
    """The tokenizers library's thread pool on (all cores) or off while building; the setting is restored after.
    The library reads TOKENIZERS_PARALLELISM at every batch call, so setting the variable here takes effect."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if on else "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _init_worker(spec: tuple[str, Any]) -> None:
    global _WORKER_ENCODE
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; no threads on top
    _WORKER_ENCODE = _make_encoder(spec)


def _worker_encode(chunk: list[Record]) -> tuple[np.ndarray, ...]:
    assert _WORKER_ENCODE is not None
    return encode_records(chunk, _WORKER_ENCODE)


def encode_records(chunk: list[Record], encode: Callable[[list[str]], list[list[int]]]) -> tuple[np.ndarray, ...]:
    """(ids uint32 back to back, length per record int64, mask uint8 per token, text hash per record uint64).

    Each segment is tokenized on its own, without special tokens; a segment's tokens get its `trained` flag.
    """
    texts = [text for record in chunk for text, _ in record]
    flat = encode(texts)
    ids, mask, lengths, hashes = [], [], [], []
    at = 0
    for record in chunk:
        h = hashlib.blake2b(digest_size=8)
        n = 0
        for text, trained in record:
            seg = flat[at]
            at += 1
            ids.extend(seg)
            mask.extend([1 if trained else 0] * len(seg))
            n += len(seg)
            h.update(b"\x01" if trained else b"\x00")
            h.update(text.encode("utf-8"))
            h.update(b"\xff")  # never in UTF-8: separates segments
        lengths.append(n)
        hashes.append(int.from_bytes(h.digest(), "little"))
    return (np.array(ids, dtype=np.uint32), np.array(lengths, dtype=np.int64), np.array(mask, dtype=np.uint8),
            np.array(hashes, dtype=np.uint64))  # fmt: skip


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _encoded(
    chunks: Iterator[list[Record]], spec: tuple[str, Any], workers: int | None, parallel: Parallel
) -> Iterator[tuple]:
    """Encoded chunks in input order. With worker processes at most 2 chunks per worker are in flight, so memory
    stays bounded (Pool.imap and Executor.map would read the whole input ahead)."""
    workers = available_cores() if workers is None else workers
    if workers <= 1 or spec[0] != "backend" or parallel == "threads":
        encode = _make_encoder(spec)
        with _tokenizer_threads(workers > 1):
            yield from (encode_records(chunk, encode) for chunk in chunks)
        return
    # ProcessPoolExecutor rather than multiprocessing.Pool: a worker that dies raises BrokenProcessPool here
    # instead of being replaced forever while this process waits.
    context = multiprocessing.get_context("spawn")  # safe with threads, CUDA and any start method
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(spec,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(_worker_encode, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ----------------------------------------------------------------------------------------------------------
# Windows: the same windows as data.windows_for, as offsets into the cache


@dataclass
class Windows:
    """Windows cut from records: window k is `<eos> + tokens(record[k]) + <eos>`[start[k] : start[k] + lengths[k]].

    Three int64 arrays instead of lists of ids (24 bytes a window, however long it is).
    """

    cache: TokenCache
    record: np.ndarray
    start: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.record)

    def _slice(self, k: int, values: np.ndarray, first: int, last: int) -> np.ndarray:
        n = len(values)
        lo, hi = int(self.start[k]), int(self.start[k] + self.lengths[k])  # positions in the wrapped record
        body = np.asarray(values[max(lo - 1, 0) : min(hi - 1, n)], dtype=np.int64)
        head = [first] if lo == 0 else []
        tail = [last] if hi == n + 2 else []
        return np.concatenate([np.array(head, np.int64), body, np.array(tail, np.int64)])

    def ids(self, k: int) -> np.ndarray:
        """Token ids of window k (int64)."""
        eos = self.cache.eos_id
        return self._slice(k, self.cache.tokens(int(self.record[k])), eos, eos)

    def mask(self, k: int) -> np.ndarray:
        """Loss mask of window k: the record's mask, 0 for the leading <eos>, 1 for the closing one."""
        return self._slice(k, self.cache.mask(int(self.record[k])), 0, 1)

    def rows(self, rows: Sequence[Sequence[int]]) -> list[list[list[int]]]:
        """Rows of window indices (as from `data.epoch_rows`) -> rows of id lists, the input of `data.collate`."""
        return [[self.ids(k).tolist() for k in row] for row in rows]


class WindowIds(Sequence):
    """The windows' token ids as a sequence of lists, read from the memory map when indexed: what the training
    plan batches (`training.plan.make_batch`), with `lengths` for planning. Nothing is held but the offsets."""

    def __init__(self, windows: Windows):
        self.windows = windows
        self.lengths = windows.lengths

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, k):  # type: ignore[override]
        return self.windows.ids(int(k)).tolist()


def cut_windows(cache: TokenCache, records: Sequence[int] | np.ndarray, max_len: int) -> Windows:
    """The windows of `records` (in that order), each wrapped in <eos> and cut like `data.to_windows`: at most
    `max_len` tokens, consecutive windows overlapping by one token.

    For a record of n tokens the wrapped sequence has n + 2; it gives ceil((n + 1) / (max_len - 1)) windows
    starting every max_len - 1 tokens.
    """
    if max_len < 2:
        raise UserError(f"the window length must be at least 2 tokens (got {max_len})")
    records = np.asarray(records, dtype=np.int64)
    seq_len = np.asarray(cache.lengths, dtype=np.int64)[records] + 2
    step = max_len - 1
    counts = -(-(seq_len - 1) // step)  # ceil division
    first = np.cumsum(counts) - counts
    record = np.repeat(records, counts)
    j = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts)
    start = j * step
    lengths = np.minimum(max_len, np.repeat(seq_len, counts) - start)
    return Windows(cache, record, start, lengths)


# ----------------------------------------------------------------------------------------------------------
# Split


@dataclass
class CacheSplit:
    """A cache's split, which a checkpoint records as (fingerprint, seed, train share) instead of every index:
    the indices are a pure function of the three (`split_records`), so a deleted cache rebuilt from the same
    data gives the same split."""

    fingerprint: str
    seed: int
    train_share: float
    train_idx: np.ndarray
    val_idx: np.ndarray

    @classmethod
    def of(cls, cache: TokenCache, seed: int, train_share: float) -> CacheSplit:
        return cls(cache.fingerprint, seed, train_share, *split_records(cache, seed, train_share))

    def to_json(self) -> dict[str, Any]:
        return {"cache_fingerprint": self.fingerprint, "seed": self.seed, "train_size": self.train_share,
                "n_train": len(self.train_idx), "n_validation": len(self.val_idx)}  # fmt: skip

    def check(self, saved: dict[str, Any]) -> None:
        """UserError unless `saved` (a checkpoint's split.json) describes this very split."""
        if saved.get("cache_fingerprint") != self.fingerprint:
            raise UserError(
                "the data differs from the data this checkpoint was trained on (its tokens' fingerprint "
                "changed); resume with the same --data and tokenizer, or start a new run"
            )
        if self.to_json() != saved:
            raise UserError(f"this checkpoint's split ({saved}) is not this run's ({self.to_json()}); resume with "
                            "the same --seed and --train-size")  # fmt: skip


def split_records(cache: TokenCache, seed: int, train_share: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) record indices, sorted: a pure function of (cache fingerprint, seed, train share).

    Duplicate records (same text hash) are kept once, at their first occurrence. For an unsplit corpus this is
    the split `data.split_corpus` makes of the same paragraphs. A pre-split corpus keeps its parts; records in
    both are kept in validation only. Stored as split-<seed>-<share>.npy beside the cache (if writable).
    """
    path = cache.path / f"split-{seed}-{train_share}.npy"
    try:
        assignment = np.load(path)
        if assignment.shape != (cache.n_records,):
            raise ValueError("wrong shape")
    except (OSError, ValueError):
        assignment = _assign(cache, seed, train_share)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, assignment)
            os.replace(tmp, path)
        except OSError as e:  # a read-only cache still works; the split is recomputed next time
            log.debug("could not store %s: %s", path, e)
            tmp.unlink(missing_ok=True)
    return np.flatnonzero(assignment == SPLIT_TRAIN), np.flatnonzero(assignment == SPLIT_VALIDATION)


def _first_occurrences(hashes: np.ndarray) -> np.ndarray:
    _, first = np.unique(hashes, return_index=True)
    return np.sort(first)


def _assign(cache: TokenCache, seed: int, train_share: float) -> np.ndarray:
    hashes = np.asarray(cache.hashes)
    n_fixed = cache.meta.get("n_train_fixed")
    if n_fixed is not None:
        val = n_fixed + _first_occurrences(hashes[n_fixed:])
        train = _first_occurrences(hashes[:n_fixed])
        train = train[~np.isin(hashes[train], hashes[val])]
        if not len(train) or not len(val):
            raise UserError("the pre-split data needs at least one paragraph on each side")
    else:
        unique = _first_occurrences(hashes)
        if len(unique) < len(hashes):
            log.info("dropped %d duplicate records", len(hashes) - len(unique))
        n_val = max(1, round(len(unique) * (1.0 - train_share)))
        if len(unique) - n_val < 1:
            raise UserError(f"too few paragraphs to split: {len(unique)} (need at least 2)")
        order = list(range(len(unique)))
        random.Random(seed).shuffle(order)  # the same generator and order as data.split_corpus
        val, train = np.sort(unique[order[:n_val]]), np.sort(unique[order[n_val:]])
    assignment = np.full(len(hashes), SPLIT_DROPPED, dtype=np.int8)
    assignment[train] = SPLIT_TRAIN
    assignment[val] = SPLIT_VALIDATION
    return assignment


# ----------------------------------------------------------------------------------------------------------
# Plain-text sources, and managing the cache folder


def open_text_cache(
    source: str,
    tokenizer: Any,
    *,
    cache_dir: str | Path | None = None,
    keep_headings: bool = False,
    layout: str = "auto",
    text_column: str | None = None,
    workers: int | None = None,
    parallel: Parallel = "threads",
    validation_source: str | None = None,
) -> TokenCache:
    """The token cache of a plain-text data source (any `qlora_ft.sources` source): each paragraph one record,
    all of it trained on. Tokenizes only when the data, the tokenizer or an option changed. `validation_source`
    (--validation-data): a second source whose paragraphs the split keeps on the validation side."""
    from qlora_ft import sources

    src = sources.resolve(source)
    val_src = sources.resolve(validation_source) if validation_source is not None else None
    covers = {"data": _digests(src), "kind": src.kind, "tokenizer": tokenizer_digest(tokenizer),
              "format": "text", "keep_headings": keep_headings, "layout": layout, "text_column": text_column,
              "template": None}  # fmt: skip
    if val_src is not None:
        covers["validation_data"] = {"data": _digests(val_src), "kind": val_src.kind}
    opts = {"text_column": text_column, "keep_headings": keep_headings, "layout": layout}
    splits = sources.source_splits(source, text_column) if val_src is None else None

    def part(where: str, split: str | None) -> Callable[[], Iterator[Record]]:
        return lambda: ([(p, True)] for p in sources.iter_paragraphs(where, split=split, **opts))

    train = part(source, splits[0] if splits else None)
    validation = part(validation_source, None) if val_src else part(source, splits[1]) if splits else None
    files = src.files + (val_src.files if val_src else ())
    return open_or_build(covers, tokenizer, train, cache_dir=cache_dir, validation=validation,
                         input_bytes=sum(f.stat().st_size for f in files), workers=workers,
                         parallel=parallel)  # fmt: skip


def _digests(src: Any) -> list[dict[str, Any]]:
    return file_digests(src.files, src.path if src.path.is_dir() else None)


@dataclass
class CacheInfo:
    fingerprint: str
    path: Path
    bytes: int
    complete: bool
    meta: dict[str, Any]


def list_caches(cache_dir: str | Path | None = None) -> list[CacheInfo]:
    """Every cache folder under `cache_dir` (complete or not), oldest first."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = []
    for path in sorted(p for p in root.glob("*") if p.is_dir() and not p.name.startswith(".")):
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        try:
            meta, complete = _read_meta(path), True
        except CacheInvalid:
            meta, complete = {}, False
        out.append(CacheInfo(path.name, path, size, complete, meta))
    return sorted(out, key=lambda c: c.meta.get("created", ""))


def clear_caches(cache_dir: str | Path | None = None, fingerprints: Sequence[str] = ()) -> list[str]:
    """Delete the named caches (all when none are named), skipping any being built now; returns those deleted."""
    import filelock

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    known = {c.fingerprint for c in list_caches(root)}
    unknown = [f for f in fingerprints if f not in known]
    if unknown:
        raise UserError(f"no token cache {', '.join(unknown)} in {root}")
    deleted = []
    for fp in fingerprints or sorted(known):
        try:
            with filelock.FileLock(str(root / f".{fp}.lock"), timeout=0):
                shutil.rmtree(root / fp)
                for stale in [*root.glob(f".{fp}.tmp-*"), *root.glob(f".{fp}.old-*")]:
                    shutil.rmtree(stale, ignore_errors=True)
            deleted.append(fp)
        except filelock.Timeout:
            log.warning("token cache %s is being built by another process; left alone", fp)
    return deleted
