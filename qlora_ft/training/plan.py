"""What each optimizer step trains on, and at which learning rate: pure functions of the step and the epoch.

The epoch plan is computed from the windows' lengths alone, so that a resumed run, given the same seed, finds
the very batches it stopped at; the schedule is a function of the step, so it resumes without state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from qlora_ft.data.batches import Rows, epoch_batches, epoch_rows


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to `peak`, then linear decay to 0.

    >>> [round(lr_at(s, 1.0, 2, 6), 2) for s in range(6)]
    [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


@dataclass
class EpochPlan:
    """The global batches of each epoch, a pure function of (seed, epoch).

    A global batch holds `batch_size` x `world` rows; process r trains on rows r, r + world, ... of it. The plan
    depends on the global batch alone, not on the process count, so a checkpoint's position means the same data
    under any process count with the same global batch (a process left without a row in an epoch's short last
    batch steps with a zero gradient: `Run.micro_batch`). An
    optimizer step takes `grad_accum_steps` global batches (micro-batches); the last step of an epoch may
    take fewer.
    """

    lengths: Sequence[int]  # tokens of each training window
    block_len: int  # --max-input-length: the packed row length
    packing: bool
    batch_size: int  # rows per process and micro-batch
    world: int
    grad_accum_steps: int
    seed: int
    _cache: dict[int, list[Rows]] = field(default_factory=dict, repr=False)

    def batches(self, epoch: int) -> list[Rows]:
        """The epoch's micro-batches, in training order (the two most recent epochs are kept)."""
        if epoch not in self._cache:
            rows = epoch_rows(self.lengths, self.block_len, self.packing, self.seed, epoch)
            batches = epoch_batches(rows, self.lengths, self.batch_size * self.world, not self.packing, self.seed,
                                    epoch)  # fmt: skip
            if len(self._cache) == 2:
                del self._cache[min(self._cache)]
            self._cache[epoch] = batches
        return self._cache[epoch]

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps in `epoch`."""
        return math.ceil(len(self.batches(epoch)) / self.grad_accum_steps)

    def total_steps(self, epochs: int, max_steps: int | None) -> int:
        """The run's length in optimizer steps: `max_steps` if given, else the steps of `epochs` epochs."""
        # last epoch first: the plan then still holds epochs 0 and 1 when training starts (packing a large corpus's
        # epoch takes seconds)
        return max_steps or sum(self.steps_in(e) for e in reversed(range(epochs)))


def due(count: int, every: int) -> bool:
    """Whether something done every `every` steps (or epochs; 0: never) is due at `count`."""
    return bool(every) and count % every == 0


@dataclass
class Intervals:
    """How often a run validates, samples and saves (--eval-every, --sample-every, --save-every-steps,
    --save-interval), and whether it starts fresh (then it validates the base model first)."""

    eval_every: int
    sample_every: int
    save_every_steps: int
    save_interval: int
    fresh: bool = True


def count_events(steps_per_epoch: int, total_steps: int, every: Intervals) -> dict[str, int]:
    """How many validations, sample rounds and checkpoint saves a run of `total_steps` makes, as `fit` and
    `finish` decide them (every epoch taken to have `steps_per_epoch` steps).

    >>> count_events(10, 25, Intervals(eval_every=0, sample_every=0, save_every_steps=0, save_interval=1))
    {'validations': 3, 'samples': 0, 'saves': 3}
    """
    validations, samples, saves = int(every.fresh), 0, 0
    step, epoch, last_saved, validated = 0, 0, 0, False
    while step < total_steps:
        done, first = min(steps_per_epoch, total_steps - step), step + 1
        for step in range(first, first + done):  # noqa: B020 (the loop's last step is the step reached)
            validations += due(step, every.eval_every)
            validated = validated or due(step, every.eval_every)
            samples += due(step, every.sample_every)
            if due(step, every.save_every_steps):
                saves, last_saved = saves + 1, step
        if done == steps_per_epoch:  # the epoch's end
            if not due(step, every.eval_every):
                validations, validated = validations + 1, True
            if due(epoch + 1, every.save_interval):
                saves, last_saved = saves + 1, step
            epoch += 1
    samples += bool(every.sample_every and step % every.sample_every)
    validations += not validated
    saves += last_saved != step
    return {"validations": validations, "samples": samples, "saves": saves}


def plan_summary(plan: EpochPlan, total_steps: int, tokens_per_epoch: int, every: Intervals) -> dict[str, int]:
    """The run's plan in numbers: optimizer steps per epoch and in all, tokens per step and per epoch (the
    training windows' tokens, padding aside), and how often it validates, samples and saves."""
    per_epoch = plan.steps_in(0)
    return {"steps_per_epoch": per_epoch, "total_steps": total_steps, "tokens_per_epoch": tokens_per_epoch,
            "tokens_per_step": round(tokens_per_epoch / max(1, per_epoch)),
            "micro_batch": plan.batch_size, "grad_accum_steps": plan.grad_accum_steps, "processes": plan.world,
            **count_events(per_epoch, total_steps, every)}  # fmt: skip


def plan_line(s: dict[str, int]) -> str:
    """One log line of `plan_summary`."""
    return (f"plan: {s['total_steps']:,} optimizer steps ({s['steps_per_epoch']:,} an epoch) of {s['micro_batch']} "
            f"x {s['grad_accum_steps']} x {s['processes']} sequences, ~{s['tokens_per_step']:,} tokens a step, "
            f"{s['tokens_per_epoch']:,} an epoch; {s['validations']} validations, {s['samples']} sample rounds, "
            f"{s['saves']} checkpoints")  # fmt: skip
