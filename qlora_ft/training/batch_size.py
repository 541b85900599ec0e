"""`--batch-size auto` on CUDA: the largest micro-batch that fits, the global batch kept by gradient accumulation.

The global batch is the mode's batch size times --grad-accum-steps; micro-batches are tried from the whole global
batch down through its divisors (accelerate's `find_executable_batch_size` idea: try, and on an out-of-memory
error free the memory and try smaller), each a forward and backward of rows of --max-input-length tokens, the
longest a row can be. A resumed run takes its checkpoint's choice instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from qlora_ft.errors import UserError

log = logging.getLogger(__name__)


def divisors_descending(n: int) -> list[int]:
    """The micro-batches tried for a global batch of `n`, largest first.

    >>> divisors_descending(12)
    [12, 6, 4, 3, 2, 1]
    """
    return [d for d in range(n, 0, -1) if n % d == 0]


def largest_fitting(global_batch: int, try_step: Callable[[int], None]) -> int:
    """The largest divisor of `global_batch` for which `try_step(micro_batch)` does not run out of memory."""
    from accelerate.utils.memory import release_memory, should_reduce_batch_size

    for micro in divisors_descending(global_batch):
        try:
            try_step(micro)
            return micro
        except Exception as e:
            if not should_reduce_batch_size(e):
                raise
            release_memory()
            log.info("--batch-size auto: a micro-batch of %d ran out of memory", micro)
    raise UserError("--batch-size auto: even one sequence of --max-input-length tokens runs out of memory; lower "
                    "--max-input-length, or add --gradient-checkpointing True")  # fmt: skip


def choose(global_batch: int, try_step: Callable[[int], None]) -> tuple[int, int]:
    """(micro-batch, accumulation steps) whose product is `global_batch`, the micro-batch as large as fits."""
    micro = largest_fitting(global_batch, try_step)
    log.info("--batch-size auto: micro-batch %d x %d accumulation steps (the global batch of %d kept)", micro,
             global_batch // micro, global_batch)  # fmt: skip
    return micro, global_batch // micro


def full_rows_step(model, max_len: int, vocab: int, device: torch.device, autocast) -> Callable[[int], None]:
    """A trial step: forward and backward of `micro` rows of `max_len` random tokens, gradients then dropped."""

    def step(micro: int) -> None:
        ids = torch.randint(0, vocab, (micro, max_len), device=device)
        try:
            with autocast():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)

    return step
