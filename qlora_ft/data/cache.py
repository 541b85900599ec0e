"""Token cache: tokenize a source once, then open it as memory maps in milliseconds, on every start and resume,
in every mode (paragraphs, instruction records, chat conversations).

One folder per fingerprint under the cache folder (`--cache-dir`, else $QLORA_FT_CACHE, else
~/.cache/qlora-ft/tokens):

    <fingerprint>/
      ids.bin      token ids of all records back to back (uint16 when the vocabulary fits, else uint32)
      mask.bin     uint8 per token, 1 = trained on; absent when every token is (plain text)
      index.npy    int64 (n_records, 2): start offset in ids.bin, length
      hashes.npy   uint64 per record: a hash of the record's segments, for removing duplicates before the split
      prompts.npy  int64 per record: the tokens before its last response (instruction and chat records only)
      split-<seed>-<share>.npy   int8 per record: 1 train, 2 validation, 0 duplicate (recomputable)
      meta.json    what the fingerprint covers, counts, dtype, file sizes; written last

The fingerprint covers the data (SHA-256 of its files' bytes; of a hub dataset's data files), the tokenizer
(what decides its ids: vocabulary, merges, normalizer, pre-tokenizer, added tokens, eos and bos ids), the
version of the paragraph rules (`records.RULES_VERSION`) and every option that changes the ids (format,
headings, layout, text column, the template's content). It does not cover the window length: windows are cut
from the stored records when training starts (`batches.cut_windows`), so one cache serves every --max-input-length.

EOS: paragraphs are stored without special tokens, and windowing wraps each as `<eos> + ids + <eos>`. Instruction
and chat records are stored as `encode` gives them, leading EOS included, and are never cut.

Builds are streamed (memory bounded by a few chunks of records), use every core (`encode.encode_chunks`), run
under a file lock (a second run building the same cache waits, then reuses it), write into a temporary folder
renamed into place when complete (every file and the rename fsynced), and refuse to start when the disk is
clearly too small. A folder without meta.json or whose file sizes disagree with it is rebuilt.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qlora_ft.data.encode import Parallel, Segment, backend_json, encode_chunks, leading_token_id
from qlora_ft.errors import UserError
from qlora_ft.fs import fsync, sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PROMPTS_VERSION = 2  # prompts.npy of version 1 counted a chat that ends in a user turn up to that turn (rebuilt)
Record = list[Segment]  # a paragraph: [(text, True)]; an instruction: [(prompt, False), (response, True)]
POOL_MIN_BYTES = 16 << 20  # below this much input, tokenize in this process (see open_or_build)
NOTES = ".tables"  # notes on tables read whole (`read_note`), beside the caches
BYTES_PER_TOKEN = 2  # a cautious estimate for the disk check (English BPE averages about 4 bytes a token)


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


def tokenizer_digest(tokenizer: Any) -> dict[str, Any]:
    """What decides a tokenizer's ids: a hash of its pipeline's id rules (`id_rules`), or of a slow tokenizer's
    class and vocabulary, with its eos and bos ids, the leading token's id (`encode.leading_token_id`) and size."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content: Any = id_rules(json.loads(backend.to_str()))
    else:
        content = {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items())}
    text = json.dumps(content, sort_keys=True, ensure_ascii=False)
    return {"eos_id": tokenizer.eos_token_id, "bos_id": tokenizer.bos_token_id, "lead_id": leading_token_id(tokenizer),
            "vocab_size": len(tokenizer), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}  # fmt: skip


def id_rules(pipeline: dict[str, Any]) -> dict[str, Any]:
    """The parts of a `tokenizers` pipeline (its JSON) that decide the ids, as data in one form: the model (type,
    vocabulary, merges as pairs, settings), normalizer, pre-tokenizer and added (special) tokens, with fields that
    are null or false left out. So a `tokenizers` release that writes the same pipeline another way (merges as
    "a b" or ["a", "b"], a new switch written off) keeps it; the post-processor, decoder, truncation and padding
    do not change the ids the cache stores (encoded without special tokens).

    >>> id_rules({"model": {"type": "BPE", "merges": ["a b"], "ignore_merges": False}, "decoder": {}})
    {'model': {'type': 'BPE', 'merges': [['a', 'b']]}}
    """
    model = dict(pipeline.get("model") or {})
    if "merges" in model:
        model["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model["merges"]]
    rules = {"model": model, **{k: pipeline.get(k) for k in ("normalizer", "pre_tokenizer", "added_tokens")}}
    return _set_fields(rules)


def _set_fields(value: Any) -> Any:
    """`value` with every mapping's null and false fields left out, at any depth."""
    if isinstance(value, dict):
        return {k: _set_fields(v) for k, v in value.items() if v is not None and v is not False}
    if isinstance(value, list):
        return [_set_fields(v) for v in value]
    return value


def earlier_tokenizer_digest(tokenizer: Any) -> dict[str, Any]:
    """A tokenizer's digest as earlier versions computed it (a hash of its whole serialized pipeline), to know
    their checkpoints (`prepare.earlier_fingerprints`)."""
    content = backend_json(tokenizer)
    if content is None:
        content = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {"class": type(tokenizer).__name__, "eos_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer),
            "sha256": hashlib.sha256(content.encode("utf-8")).hexdigest()}  # fmt: skip


def fingerprint(covers: dict[str, Any]) -> str:
    """A short stable hash of everything that determines the cached ids (a JSON-able dict)."""
    text = json.dumps({**covers, "format_version": FORMAT_VERSION}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


# ----------------------------------------------------------------------------------------------------------
# Notes on files read whole (a table's columns and parts), by the SHA-256 of their bytes


def read_note(cache_dir: str | Path | None, sha256: str) -> dict[str, Any] | None:
    """What the cache folder noted of a file with these bytes (`write_note`), or None."""
    try:
        note = json.loads((_root(cache_dir) / NOTES / f"{sha256}.json").read_text())
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) and note.get("format_version") == FORMAT_VERSION else None


def write_note(cache_dir: str | Path | None, sha256: str, note: dict[str, Any]) -> None:
    """Note `note` of a file with these bytes in the cache folder, whole or not at all (in a folder that cannot
    be written, not: the file is then read again next time)."""
    folder = _root(cache_dir) / NOTES
    tmp = folder / f".{sha256}.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({**note, "format_version": FORMAT_VERSION}))
        os.replace(tmp, folder / f"{sha256}.json")
    except OSError as e:
        log.debug("could not note %s in %s: %s", sha256, folder, e)
        tmp.unlink(missing_ok=True)


def _root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


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
            prompts = self.path / "prompts.npy"
            self.prompts = np.load(prompts, mmap_mode="r") if "prompts.npy" in self.meta["files"] else None
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
    def lead_id(self) -> int:
        """The token before each paragraph (`encode.leading_token_id`; caches written before it: the eos)."""
        return self.meta.get("lead_id", self.meta["eos_id"])

    @property
    def lengths(self) -> np.ndarray:
        return self.index[:, 1]

    @property
    def has_mask(self) -> bool:
        """Whether some tokens are not trained on (instruction and chat records); else every one is."""
        return self._mask is not None

    @property
    def whole_records(self) -> bool:
        """Instruction or chat records: stored with their leading EOS, never cut into windows."""
        return self.prompts is not None

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
    if "prompts.npy" in meta["files"] and meta.get("prompts_version") != PROMPTS_VERSION:
        raise CacheInvalid(f"{path}: prompts.npy counts the prompts by an earlier rule")
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
    lead: bool = False,
    earlier: Callable[[], dict[str, int | None]] | None = None,
    read: dict[str, Any] | None = None,
) -> TokenCache:
    """The cache for `covers` (see `fingerprint`): opened when complete, else built from `records()` first.

    `records` is called only on a miss; `validation` (for pre-split sources) adds records that the split
    keeps on the validation side; `lead`: they are instruction or chat records (`encode.encode_chunk`).
    `input_bytes` sizes the disk check. `earlier()`: the fingerprints earlier versions gave the same data,
    tokenizer and recipe, each with the paragraph rules version it read text by (None for records), kept in
    meta.json when building, for resuming their checkpoints (`split.Split.check`). `read`: filled while
    `records()` is read with what the reader dropped; kept in meta.json. `workers`: how many cores tokenize
    (default: every core available), as the tokenizers library's threads in this process (`parallel="threads"`,
    measured faster on 2 cores: docs/data-cache.md) or as spawned processes. Raises UserError when the cache
    folder is unusable or too small.
    """
    import filelock

    root = _cache_root(cache_dir)
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
        meta = _build_into(root, fp, tokenizer, records, validation, input_bytes, (workers, parallel, lead))
        meta.update(covers=covers, earlier=earlier() if earlier is not None else {}, read=read or {})
        _publish(root, fp, meta)
    finally:
        lock.release()
    log.info("token cache %s: %d records, %d tokens, built in %.1fs", final, meta["n_records"], meta["n_tokens"],
             meta["build_seconds"])  # fmt: skip
    return TokenCache(final, built=True)


def _cache_root(cache_dir: str | Path | None) -> Path:
    """The folder holding the caches (created if missing); a UserError when it cannot be."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the token cache folder {root}: {e.strerror}") from None
    return root


def _build_into(root: Path, fp: str, tokenizer: Any, records: Callable[[], Iterable[Record]],
                validation: Callable[[], Iterable[Record]] | None, input_bytes: int,
                workers: tuple[int | None, Parallel, bool]) -> dict[str, Any]:  # fmt: skip
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
    meta.update(fingerprint=fp, format_version=FORMAT_VERSION, eos_id=tokenizer.eos_token_id,
                lead_id=leading_token_id(tokenizer), vocab_size=vocab_size,
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
    workers: tuple[int | None, Parallel, bool],
) -> dict[str, Any]:
    """Tokenize every record into the files of `tmp`, in order; returns the counts for meta.json."""
    from tqdm.auto import tqdm

    dtype = np.uint16 if itemsize == 2 else np.uint32
    lengths, hashes, prompts = [], [], []
    n_tokens, all_trained, n_train_fixed = 0, True, None
    n_workers, parallel, lead = workers
    parts = [records] if validation is None else [records, validation]
    with open(tmp / "ids.bin", "wb") as ids_f, open(tmp / "mask.bin", "wb") as mask_f, \
            tqdm(desc="tokenizing", unit=" tok", unit_scale=True, disable=None) as bar:  # fmt: skip
        for part in parts:
            if part is validation:
                n_train_fixed = sum(len(x) for x in lengths)
            for ids, lens, mask, hs, ps in encode_chunks(part(), tokenizer, lead, n_workers, parallel):
                if len(ids) and int(ids.max()) > np.iinfo(dtype).max:  # astype would wrap it around silently
                    raise UserError(f"the tokenizer gave token id {int(ids.max())}, past its vocabulary size "
                                    f"{len(tokenizer)}; its vocabulary and added tokens disagree")  # fmt: skip
                ids.astype(dtype, copy=False).tofile(ids_f)
                mask.tofile(mask_f)
                all_trained = all_trained and bool(mask.all())
                lengths.append(lens)
                hashes.append(hs)
                prompts.append(ps)
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
    extra = {}
    if lead:
        _save_npy(tmp / "prompts.npy", np.concatenate(prompts).astype(np.int64))
        extra["prompts_version"] = PROMPTS_VERSION
    if all_trained and not lead:
        (tmp / "mask.bin").unlink()
    files = {p.name: p.stat().st_size for p in tmp.iterdir()}
    return {"n_records": len(lengths_all), "n_tokens": n_tokens, "n_train_fixed": n_train_fixed,
            "dtype": np.dtype(dtype).name, "has_mask": not all_trained, "files": files, **extra}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Managing the cache folder


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
    if not fingerprints:
        shutil.rmtree(root / NOTES, ignore_errors=True)
    return deleted
