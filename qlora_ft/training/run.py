"""The data a run is made of: `Resume` (a checkpoint to continue from, as read) and `Run` (the run, set up).

`setup.set_up` builds a `Run`, `resume.read_resume` a `Resume`; the loop's stages (`restore`, `fit`, `finish`)
take the `Run`. Here, apart from the stages, so every stage imports it one way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_ft.config import TrainConfig
from qlora_ft.data.batches import LazyBatches, Rows, make_batch
from qlora_ft.data.prepare import TrainData
from qlora_ft.engines import Engine
from qlora_ft.training.plan import EpochPlan


@dataclass
class Resume:
    """A checkpoint to continue from, as read from disk."""

    path: Path
    meta: dict[str, Any]  # trainer_state.json
    tensors: dict[str, Any]  # trainer_state.pt: optimizer and RNG states
    config: TrainConfig  # the settings it was trained with (run_config.json)
    split: dict[str, Any]  # split.json
    template: dict[str, Any] | None = None  # the template it rendered records with, as data (None: plain text)

    @property
    def world(self) -> int:
        """The number of processes it was trained on (its position counts global batches)."""
        return self.meta.get("world_size", 1)


@dataclass
class Run:
    """A run, set up: what `fit` trains and the folders it writes to."""

    cfg: TrainConfig  # the run's own copy, with the settings in effect after the start-up probes
    engine: Engine  # one process, DDP, FSDP or DeepSpeed; it holds the accelerator
    tokenizer: Any
    data: TrainData  # training / validation sequences (ids, loss masks), split, template; the plan indexes them
    pad_id: int
    plan: EpochPlan  # the micro-batches of each epoch
    total_steps: int  # optimizer steps of the whole run
    val_batches: LazyBatches  # the validation subset (--eval-max-tokens), all processes' batches
    model: Any  # wrapped by the engine
    optimizer: torch.optim.Optimizer  # wrapped by the engine
    head: torch.nn.Linear | None  # the output layer, when the chunked loss stands in for it
    parameters: tuple[int, int]  # trainable, total
    out_dir: Path
    check_dir: Path
    resume: Resume | None  # the checkpoint this run continues, if any
    neftune: Any = None  # the NEFTune hook's handle (--neftune-alpha), removed when the run ends

    def micro_batch(self, rows: Rows) -> dict[str, torch.Tensor]:
        """This process's share of a global micro-batch: its rows rank, rank + world, ... A process left without
        a row (an epoch's last batch may hold fewer rows than there are processes) gets the first row with no
        targets: it takes part in the step's collectives with a zero gradient, and the plan need not depend on
        the process count."""
        train, mine = self.data.train, rows[self.engine.rank :: self.engine.world]
        if mine:
            return make_batch(mine, train, self.pad_id)
        batch = make_batch(rows[:1], train, self.pad_id)
        batch["labels"].fill_(-100)
        batch["n_tokens"].zero_()
        return batch

    def sample_prompts(self) -> list[str] | list[list[int]]:
        """In-training sample prompts: --sample-prompts for text; for instruction and chat records, the token ids
        of a few validation prompts, as training encoded them."""
        return self.data.sample_prompts() or self.cfg.sample.sample_prompts

    def config_dict(self) -> dict[str, Any]:
        """What run_config.json holds: the run's config, and the template instruction/chat records used."""
        return self.data.run_config(self.cfg)
