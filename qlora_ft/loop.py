"""Training: set up, restore, fit, finish. Each step lives in qlora_ft/training/ (see its __init__)."""

from __future__ import annotations

from qlora_ft.config import TrainConfig
from qlora_ft.training.finish import TrainResult, finish, stop_early
from qlora_ft.training.fit import fit
from qlora_ft.training.outputs import start_outputs
from qlora_ft.training.resume import restore
from qlora_ft.training.setup import set_up

__all__ = ["TrainResult", "train"]


def train(cfg: TrainConfig) -> TrainResult:
    """Fine-tune `cfg.model.model` on `cfg.data.data`, checkpointing and sampling as configured.

    `cfg` is not changed: the run works on a copy, in which the start-up probes record what they switch off
    (packing, the chunked loss); that copy is saved with every checkpoint and as run_config.json.
    """
    run = set_up(cfg)  # engine, data, model, optimizer; a checkpoint's weights when resuming
    state = restore(run)  # step, epoch, position, RNG and optimizer states: fresh, or the checkpoint's
    start_outputs(run, state)
    session = fit(run, state)
    if session.signum:  # SIGINT/SIGTERM: a checkpoint of the step reached, then exit 130/143
        stop_early(run, state, session)
    return finish(run, state, session)
