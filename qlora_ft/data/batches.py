"""Batches: records -> windows -> the rows of an epoch (packed or padded) -> batches, one builder for training,
validation and eval.

A window is a stretch of a cached record: a paragraph wrapped as `<lead> + ids + <eos>` (`encode.leading_token_id`:
`<eos>` for GPT-2) and cut into windows of at most --max-input-length tokens that overlap by one token (every
token after the leading one is predicted exactly once); an instruction or chat record whole (one longer than
--max-input-length is left out and counted, never cut). Windows are offsets into the cache's memory maps, read
when a batch is made.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qlora_ft.data.cache import TokenCache
from qlora_ft.errors import UserError

log = logging.getLogger(__name__)

Rows = list[list[int]]  # rows of a batch, each a list of window indices (several when packed)


# ----------------------------------------------------------------------------------------------------------
# Windows


@dataclass
class Windows:
    """Windows cut from a cache's records. For paragraphs, window k is `<eos> + tokens(record[k]) + <eos>`
    [start[k] : start[k] + lengths[k]]; for instruction and chat records (`cache.whole_records`) it is the record.

    Three int64 arrays instead of lists of ids (24 bytes a window, however long it is).
    """

    cache: TokenCache
    record: np.ndarray
    start: np.ndarray
    lengths: np.ndarray
    every_token: bool = False  # --train-on-prompt: every token of a record is a target, not only its responses

    def __len__(self) -> int:
        return len(self.record)

    def _slice(self, k: int, values: np.ndarray, first: int, last: int) -> np.ndarray:
        if self.cache.whole_records:
            return np.asarray(values, dtype=np.int64)
        n = len(values)
        lo, hi = int(self.start[k]), int(self.start[k] + self.lengths[k])  # positions in the wrapped record
        body = np.asarray(values[max(lo - 1, 0) : min(hi - 1, n)], dtype=np.int64)
        head = [first] if lo == 0 else []
        tail = [last] if hi == n + 2 else []
        return np.concatenate([np.array(head, np.int64), body, np.array(tail, np.int64)])

    @property
    def masked(self) -> bool:
        """Whether some tokens are not targets (the prompts of instruction and chat records)."""
        return self.cache.has_mask and not self.every_token

    def ids(self, k: int) -> np.ndarray:
        """Token ids of window k (int64)."""
        return self._slice(k, self.cache.tokens(int(self.record[k])), self.cache.lead_id, self.cache.eos_id)

    def mask(self, k: int) -> np.ndarray:
        """Loss mask of window k: the record's mask; for a paragraph 0 for the leading token, 1 for the closing eos."""
        return self._slice(k, self.cache.mask(int(self.record[k])), 0, 1)

    def prompt(self, k: int) -> list[int]:
        """The ids of record window k before its last response (`encode.prompt_ids` of the record)."""
        record = int(self.record[k])
        return self.cache.tokens(record)[: int(self.cache.prompts[record])].tolist()


def cut_windows(cache: TokenCache, records: Sequence[int] | np.ndarray, max_len: int) -> Windows:
    """The windows of `records` (in that order), each at most `max_len` tokens. A paragraph is wrapped in the
    leading token and <eos> and cut into windows overlapping by one token: for n tokens the wrapped sequence has
    n + 2, giving ceil((n + 1) / (max_len - 1)) windows starting every max_len - 1 tokens. An instruction or chat
    record is one window, or none when it is longer than `max_len`: a cut response would teach the model to stop
    mid-sentence without its EOS, and a cut prompt would train answers to questions never asked."""
    if max_len < 2:
        raise UserError(f"the window length must be at least 2 tokens (got {max_len})")
    records = np.asarray(records, dtype=np.int64)
    if cache.whole_records:
        lengths = np.asarray(cache.lengths, dtype=np.int64)[records]
        fits = lengths <= max_len
        if not fits.all():
            log.warning("left out %d of %d records longer than %d tokens", int((~fits).sum()), len(records), max_len)
        return Windows(cache, records[fits], np.zeros(int(fits.sum()), np.int64), lengths[fits])
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
# The rows of an epoch


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


def eval_batches(lengths: Sequence[int], block_len: int, packing: bool, batch_size: int) -> list[list[list[int]]]:
    """Validation batches: packed rows, or rows grouped by length (order does not matter for a mean)."""
    order = list(range(len(lengths)))
    if packing:
        rows = pack(lengths, order, block_len)
    else:
        rows = [[i] for i in sorted(order, key=lambda i: lengths[i])]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


# ----------------------------------------------------------------------------------------------------------
# Batches


def collate(rows: Sequence[Sequence[Sequence[int]]], pad_id: int,
            masks: Sequence[Sequence[Sequence[int]]] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """A batch from rows of one or more windows each (`masks`: the windows' loss masks, 1 = trained on, None when
    every token is). Shapes (B, T), T = the longest row.

    Every window's first token is context only (label -100): it is the record's leading `<eos>` or the token a
    window overlaps with the previous one, and in a packed row it must not be predicted from the window before
    it. Padding gets label -100 *by position*, so a real closing `<eos>` (the same id as the pad token in GPT-2)
    is still a target. A token whose mask is 0 (a prompt) gets label -100 too.

    Rows of one window are padded and masked with `attention_mask`. Rows of several windows (packing) get
    `position_ids` that restart at every window instead and no `attention_mask`: transformers then builds a
    block-diagonal causal mask from the restarts, so no token attends across windows (the padding tail
    is a block of its own).

    >>> collate([[[0, 5, 0]], [[0, 7]]], pad_id=0)["labels"].tolist()
    [[-100, 5, 0], [-100, 7, -100]]
    >>> b = collate([[[0, 5, 0], [0, 7]]], pad_id=0); b["position_ids"].tolist(), b["labels"].tolist()
    ([[0, 1, 2, 0, 1]], [[-100, 5, 0, -100, 7]])
    >>> collate([[[0, 5, 6, 0]], [[0, 7]]], pad_id=0, masks=[[[0, 0, 1, 1]], [[0, 1]]])["labels"].tolist()
    [[-100, -100, 6, 0], [-100, 7, -100, -100]]
    """
    width = max(sum(len(w) for w in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for w, window in enumerate(row):
            n = len(window)
            input_ids[r, at : at + n] = torch.as_tensor(window, dtype=torch.long)
            labels[r, at + 1 : at + n] = input_ids[r, at + 1 : at + n]
            if masks is not None:
                untrained = torch.as_tensor(masks[r][w], dtype=torch.bool).logical_not()
                labels[r, at : at + n] = labels[r, at : at + n].masked_fill(untrained, -100)
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


def make_batch(rows: Rows, windows: Windows, pad_id: int) -> dict[str, torch.Tensor]:
    """The batch of `rows` (lists of window indices) for training, validation and eval alike: `collate` of the
    windows read from the cache, with their loss masks where the cache has them, plus `n_tokens`, the real
    (non-pad) tokens in the batch."""
    ids = [[windows.ids(k) for k in row] for row in rows]
    masks = [[windows.mask(k) for k in row] for row in rows] if windows.masked else None
    batch = collate(ids, pad_id, masks)
    batch["n_tokens"] = torch.tensor(sum(len(w) for row in ids for w in row))
    return batch


def held_out_batches(windows: Windows, pad_id: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Padded batches of held-out windows, each scored once, built as training's validation builds its own."""
    rows = eval_batches(windows.lengths, int(max(windows.lengths)), packing=False, batch_size=batch_size)
    return [make_batch(batch, windows, pad_id) for batch in rows]


def validation_subset(lengths: Sequence[int], max_tokens: int, seed: int) -> list[int]:
    """The sequences validation scores: all of them when they hold at most `max_tokens` tokens (or `max_tokens`
    is 0), else a seeded random subset of at most `max_tokens` tokens (at least one sequence), in index order:
    the same subset at every validation and every resume, so the curve compares like with like.

    >>> validation_subset([4, 4, 4, 4], 0, seed=0), validation_subset([4, 4, 4, 4], 8, seed=0)
    ([0, 1, 2, 3], [0, 2])
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if not max_tokens or int(lengths.sum()) <= max_tokens:
        return list(range(len(lengths)))
    order = np.random.default_rng(seed).permutation(len(lengths))
    n = max(1, int(np.searchsorted(np.cumsum(lengths[order]), max_tokens, side="right")))
    return sorted(order[:n].tolist())


class LazyBatches(Sequence):
    """Batches made when indexed, from rows of window indices: the validation batches of a large corpus are read
    from the token cache's memory map at each validation instead of held in memory."""

    def __init__(self, rows: list[Rows], windows: Windows, pad_id: int):
        self.rows, self.windows, self.pad_id = rows, windows, pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k):  # type: ignore[override]
        return make_batch(self.rows[k], self.windows, self.pad_id)
