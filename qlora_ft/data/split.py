"""Split: which of a cache's records train and which validate. One type for every mode and source.

A split is a pure function of (the cache's fingerprint, seed, train share), so a checkpoint records the three
instead of every index, and a deleted cache rebuilt from the same data gives the same split. Duplicate records
are kept once, at their first occurrence. Records from a validation source (a pre-split source's validation part,
or --validation-data) are the validation side; records on both sides are kept in validation only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from qlora_ft.data.cache import TokenCache
from qlora_ft.data.records import RULES_CHANGES, RULES_VERSION
from qlora_ft.errors import UserError

log = logging.getLogger(__name__)

SPLIT_DROPPED, SPLIT_TRAIN, SPLIT_VALIDATION = 0, 1, 2


@dataclass
class Split:
    """The record indices (into the cache) of each side, sorted, with what they are a function of."""

    fingerprint: str
    seed: int
    train_share: float
    train_idx: np.ndarray
    val_idx: np.ndarray

    @classmethod
    def of(cls, cache: TokenCache, seed: int, train_share: float) -> Split:
        return cls(cache.fingerprint, seed, train_share, *split_records(cache, seed, train_share))

    def to_json(self) -> dict[str, Any]:
        """What split.json holds (and a checkpoint's manifest names)."""
        return {"cache_fingerprint": self.fingerprint, "seed": self.seed, "train_size": self.train_share,
                "n_train": len(self.train_idx), "n_validation": len(self.val_idx)}  # fmt: skip

    def check(self, saved: dict[str, Any], cache: TokenCache, keys: Callable[[], Iterable[str]]) -> None:
        """UserError, in one line, unless a checkpoint's split.json describes this split: the same data read by the
        same rules, seed and share. `keys`: the records' keys in cache order (`records.record_key`), read only for
        a checkpoint of a version that listed its indices."""
        if "data_sha256" in saved:
            return self._listed(saved, keys)
        was, now = (saved.get("seed"), saved.get("train_size")), (self.seed, self.train_share)
        diff = [f"{flag} {a} (this run: {b})" for flag, a, b in zip(("--seed", "--train-size"), was, now, strict=True)
                if a != b]  # fmt: skip
        if diff:
            raise UserError(f"this checkpoint was split with {', '.join(diff)}: resume with the same settings")
        rules = self._read_by(saved.get("cache_fingerprint"), cache)
        sizes = (saved.get("n_train"), saved.get("n_validation"))
        if sizes != (len(self.train_idx), len(self.val_idx)):
            why = f" (read by the paragraph rules of version {rules}; since: {rules_changes(rules)})" if rules else ""
            raise UserError(f"this checkpoint's split has {sizes[0]} / {sizes[1]} records{why}, this run's "
                            f"{len(self.train_idx)} / {len(self.val_idx)}: start a new run")  # fmt: skip

    def _read_by(self, saved_fingerprint: Any, cache: TokenCache) -> int | None:
        """None when a checkpoint's cache fingerprint is this cache's, or an earlier version's fingerprint of the
        same data, tokenizer and recipe read by the same rules; the rules version its text was read by when the
        paragraph rules changed since. Each change since version 2 only keeps paragraphs that the rules before it
        dropped, so the same record counts then mean the same records. UserError when the data differs."""
        if saved_fingerprint == self.fingerprint:
            return None
        earlier = cache.meta.get("earlier", {})
        if saved_fingerprint not in earlier:
            raise UserError(
                "the data differs from the data this checkpoint was trained on (its tokens' fingerprint changed); "
                "resume with the same --data, tokenizer and template, or start a new run"
            )
        rules = earlier[saved_fingerprint]
        return rules if rules is not None and rules < RULES_VERSION else None

    def _listed(self, saved: dict[str, Any], keys: Callable[[], Iterable[str]]) -> None:
        """A split.json of earlier versions, which listed indices into the distinct records in load order with a
        hash of those records: checked against the records read now, and mapped onto the cache's records, where
        it must be this split (the same seeded shuffle of the same distinct records)."""
        digest, first = hashlib.sha256(), {}
        for i, key in enumerate(keys()):
            if key not in first:
                first[key] = i
                digest.update(key.encode("utf-8"))
                digest.update(b"\x00")
        if digest.hexdigest() != saved["data_sha256"]:
            raise UserError(
                "the data differs from the data this checkpoint was trained on, or is read by other rules than "
                f"when it was made ({rules_changes(1)}); resume with the same --data, or start a new run"
            )
        where = np.fromiter(first.values(), dtype=np.int64, count=len(first))
        train, val = np.sort(where[list(saved["train"])]), np.sort(where[list(saved["validation"])])
        if not (np.array_equal(train, self.train_idx) and np.array_equal(val, self.val_idx)):
            # (later checkpoints of the run record only the fingerprint, seed and share: the split must be this one)
            raise UserError("this checkpoint's split differs from the one this version makes of the same records "
                            "(records are now deduplicated by their rendered text); start a new run")  # fmt: skip


def rules_changes(since: int) -> str:
    """The paragraph rules' changes after version `since`, in one line."""
    return "; ".join(RULES_CHANGES[v] for v in sorted(RULES_CHANGES) if since < v <= RULES_VERSION)


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
    if n_dropped := int((assignment == SPLIT_DROPPED).sum()):  # logged on every start, a stored split's too
        log.info("dropped %d duplicate records", n_dropped)
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
