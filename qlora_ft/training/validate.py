"""The validation loss: token-weighted mean next-token loss over the validation batches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch

from qlora_ft.loss import forward_loss


@torch.no_grad()
def validation_loss(
    model, batches: Sequence[dict[str, torch.Tensor]], engine=None, head=None, chunk: int = 0, device=None
) -> tuple[float, float]:
    """(mean loss per target token, perplexity) over all of `batches`.

    With an `engine` (qlora_ft.engines.Engine) of several processes, each scores its share of the batches and
    the sums are all-reduced. Under an engine whose forwards are collective (`engine.lockstep`, FSDP), all
    processes run the same number of forwards, a process out of batches repeating one and not counting it.
    `device`: where the batches go (default: the engine's, else the model's).
    """
    world, rank = (engine.world, engine.rank) if engine else (1, 0)
    device = device or (engine.device if engine else next(model.parameters()).device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # loss, targets
    mine = range(rank, len(batches), world)  # indices: batches may be made when indexed (`plan.LazyBatches`)
    forwards = math.ceil(len(batches) / world) if engine and engine.lockstep else len(mine)
    for i in range(forwards):
        batch = batches[mine[i]] if i < len(mine) else batches[0]
        with engine.autocast() if engine else nullcontext():  # as in training (the chunked loss too)
            loss_sum, n = forward_loss(model, {k: v.to(device) for k, v in batch.items()}, head, chunk)
        if i < len(mine):
            sums += torch.stack([loss_sum.double().cpu(), n.double().cpu()])
    model.train(was_training)
    if engine:
        sums = engine.all_sum(sums)
    mean = float(sums[0]) / max(1.0, float(sums[1]))
    return mean, math.exp(min(mean, 50.0))
