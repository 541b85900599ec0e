"""`TrainState`: where training stands, saved and restored whole by every checkpoint.

A checkpoint holds the weights, the optimizer state and this state; together they continue a run exactly
(the same batches, learning rates and dropout masks as if it had never stopped). The numbers go to
trainer_state.json, readable; the RNG states to trainer_state.pt beside the optimizer's tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlora_ft import checkpoint

RNG_KEYS = ("rng_cpu", "rng_cuda")  # the tensors' names in trainer_state.pt


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress, 0-based (logs and checkpoint names count from 1)
    position: int = 0  # micro-batches of that epoch done
    tokens: int = 0  # real input tokens trained on, all processes together
    initial_val_loss: float | None = None  # the base model's validation loss, before any step
    best_val_loss: float | None = None  # the lowest validation loss measured so far
    val_loss: float | None = None  # the latest validation loss
    best_step: int | None = None  # --output-best: the step whose weights the output folder holds
    rng: dict[str, torch.Tensor] = field(default_factory=dict)  # RNG states as of the last save: (processes, n)

    def advance(self, micro_batches: int, tokens: int) -> None:
        """Count one optimizer step over `micro_batches` micro-batches holding `tokens` real tokens."""
        self.step += 1
        self.position += micro_batches
        self.tokens += tokens

    def next_epoch(self) -> None:
        self.epoch, self.position = self.epoch + 1, 0

    def record_validation(self, loss: float) -> None:
        self.val_loss = loss
        if self.best_val_loss is None or loss < self.best_val_loss:
            self.best_val_loss = loss

    # --- checkpoints ------------------------------------------------------------------------------------

    def to_meta(self, batches_in_epoch: int) -> dict[str, Any]:
        """The numbers, for trainer_state.json; the position as `checkpoint.position_meta` writes it (the epoch
        1-based there). `batches_in_epoch`: the micro-batches of the epoch in progress."""
        losses = {k: v if v is None or math.isfinite(v) else None
                  for k, v in (("initial_val_loss", self.initial_val_loss), ("best_val_loss", self.best_val_loss),
                               ("val_loss", self.val_loss))}  # fmt: skip
        position = checkpoint.position_meta(self.epoch, self.position, batches_in_epoch)
        return {"step": self.step, **position, "tokens": self.tokens, **losses, "best_step": self.best_step}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The RNG states, for trainer_state.pt."""
        return dict(self.rng)

    @classmethod
    def from_checkpoint(cls, path: Path, meta: dict[str, Any], tensors: dict[str, Any]) -> TrainState:
        """The inverse of `to_meta` + `to_tensors` for checkpoint `path`; reads the checkpoints of earlier
        versions too (0-based epoch, no best loss, one RNG state instead of one per process)."""
        epoch, position = checkpoint.resume_point(path, meta)  # one line for a checkpoint it cannot resume
        return cls(
            step=meta["step"],
            epoch=epoch,
            position=position,
            tokens=meta["tokens"],
            initial_val_loss=meta.get("initial_val_loss"),
            best_val_loss=meta.get("best_val_loss", meta.get("val_loss")),
            val_loss=meta.get("val_loss"),
            best_step=meta.get("best_step"),
            rng={k: tensors[k] for k in RNG_KEYS if k in tensors},
        )

    # --- RNG states (dropout) ---------------------------------------------------------------------------

    def capture_rng(self, engine) -> None:
        """Every process's RNG states, gathered into rows (collective: every process calls it)."""
        self.rng = {"rng_cpu": engine.gather_rows(torch.get_rng_state())}
        if engine.device.type == "cuda":
            self.rng["rng_cuda"] = engine.gather_rows(torch.cuda.get_rng_state(engine.device))

    def restore_rng(self, rank: int, device: torch.device, seed: int) -> None:
        """Set this process's RNG states from its row. A process the checkpoint did not have (it was saved by
        fewer processes; or a single state, from earlier versions, which is process 0's) starts a fresh stream
        instead, seeded by `new_process_seed`: every process then has defined, distinct dropout masks."""
        cpu = self.rng.get("rng_cpu")
        rows = 0 if cpu is None else len(cpu) if cpu.dim() == 2 else 1
        if rank >= rows:
            torch.manual_seed(new_process_seed(seed, self.step, rank))  # the CPU and every CUDA device
            return

        def row(states: torch.Tensor) -> torch.Tensor:
            # cloned: set_rng_state reads a row's storage from its start, ignoring the view's offset
            return (states[rank] if states.dim() == 2 else states).clone()

        torch.set_rng_state(row(cpu))
        if device.type == "cuda" and "rng_cuda" in self.rng:
            torch.cuda.set_rng_state(row(self.rng["rng_cuda"]), device)


def new_process_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of process `rank` resuming at optimizer step `step` from a checkpoint that lacks it (saved by
    fewer processes): a hash of (--seed, step, rank), so the same resume draws the same dropout masks every
    time, and no two processes (nor resumes from different steps) share a stream.

    >>> new_process_seed(0, 2, 1) == new_process_seed(0, 2, 1) != new_process_seed(0, 2, 2)
    True
    """
    return int(np.random.SeedSequence([seed % 2**63, step, rank]).generate_state(1, np.uint64)[0])
