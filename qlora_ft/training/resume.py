"""Resuming: read a checkpoint before anything is built, check it fits this run, restore its `TrainState`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qlora_ft import checkpoint
from qlora_ft.config import TrainConfig, train_config_from_dict
from qlora_ft.data.prepare import TEMPLATE_KEY, TrainData
from qlora_ft.errors import UserError
from qlora_ft.training.run import Resume, Run
from qlora_ft.training.state import TrainState

log = logging.getLogger(__name__)


def read_resume(cfg: TrainConfig, check_dir: Path) -> Resume | None:
    """The checkpoint `--restore-file` names, read whole (bad input fails here, before anything is built); None for
    a fresh run."""
    if not cfg.ckpt.restore_file:
        return None
    path = checkpoint.resolve_checkpoint(check_dir, cfg.ckpt.restore_file)
    meta, tensors, saved_cfg, saved_split = checkpoint.load_checkpoint(path)
    checkpoint.resume_point(path, meta)  # a checkpoint this version cannot resume: say so now
    template = saved_cfg.get("data", {}).get(TEMPLATE_KEY)
    return Resume(path, meta, tensors, train_config_from_dict(saved_cfg), saved_split, template)


def check_compatible(saved: TrainConfig, cfg: TrainConfig, path: Path, saved_world: int = 1, world: int = 1):
    """Refuse to resume a checkpoint into a differently shaped model, or onto a different data plan (packing is
    checked by `check_packing` once the model's packing probe has settled it).

    The saved position counts global batches (`--batch-size` x processes); a different process count is
    fine when the global batch is the same (2 x 4 -> 1 x 8), as the position then means the same data."""
    fields = {
        "model": (saved.model.model, cfg.model.model),
        "qlora": (saved.model.qlora, cfg.model.qlora),
        "lora": (saved.model.lora, cfg.model.lora),
        "rank_lora": (saved.model.rank_lora, cfg.model.rank_lora),
        "alpha_lora": (saved.model.alpha_lora, cfg.model.alpha_lora),
        "targets_lora": (sorted(saved.model.targets_lora), sorted(cfg.model.targets_lora)),
        "max_input_length": (saved.data.max_input_length, cfg.data.max_input_length),
        "seed": (saved.data.seed, cfg.data.seed),  # it orders every epoch, and splits records
        "train_size": (saved.data.train_size, cfg.data.train_size),
        "train_on_prompt": (saved.data.train_on_prompt, cfg.data.train_on_prompt),
        "grad_accum_steps": (saved.optim.grad_accum_steps, cfg.optim.grad_accum_steps),
        # what the weights, the optimizer state and the output folder hold (absent from older checkpoints: off)
        "dora": (saved.model.dora, cfg.model.dora),
        "rslora": (saved.model.rslora, cfg.model.rslora),
        "loraplus_ratio": (saved.optim.loraplus_ratio, cfg.optim.loraplus_ratio),
        "neftune_alpha": (saved.optim.neftune_alpha, cfg.optim.neftune_alpha),
        "output_best": (saved.ckpt.output_best, cfg.ckpt.output_best),
    }
    diff = [f"--{k} {a} (this run: {b})" for k, (a, b) in fields.items() if a != b]
    if saved.data.batch_size * saved_world != cfg.data.batch_size * world:
        diff.append(f"--batch-size {saved.data.batch_size} on {saved_world} process(es) "
                    f"(this run: {cfg.data.batch_size} on {world})")  # fmt: skip
    if diff:
        raise UserError(f"checkpoint {path} was trained with {'; '.join(diff)}: use the same settings to resume")


def check_same_records(resume: Resume, data: TrainData) -> None:
    """Refuse a resume whose records render differently: the template is compared by its content (stored in
    the checkpoint), not by its file's path, and so is the mode (text, instruction, chat) it implies."""
    current = None if data.template is None else data.template.to_dict()
    if current == resume.template:
        return

    def describe(template: dict[str, Any] | None) -> str:
        return "plain text" if template is None else f"records rendered by template {template.get('name')!r}"

    changed = " (same name, other content)" if current and resume.template and \
        current.get("name") == resume.template.get("name") else ""  # fmt: skip
    raise UserError(
        f"checkpoint {resume.path} was trained on {describe(resume.template)}, this run has "
        f"{describe(current)}{changed}: restore the data and template it trained with to resume"
    )


def check_packing(saved: TrainConfig, cfg: TrainConfig, path: Path) -> None:
    """Packing as the checkpoint trained (after its probe) against packing as this run will train (after its)."""
    if saved.data.packing != cfg.data.packing:
        raise UserError(f"checkpoint {path} was trained with --packing {saved.data.packing} (this run: "
                        f"{cfg.data.packing}): use the same settings to resume")  # fmt: skip


def restore(run: Run) -> TrainState:
    """The state to start from: a fresh one, or the checkpoint's, whose RNG states (this process's row) and
    optimizer state (each process its shard) are put back. The model's weights are loaded by `set_up`."""
    if run.resume is None:
        return TrainState()
    resume, engine = run.resume, run.engine
    state = TrainState.from_checkpoint(resume.path, resume.meta, resume.tensors)
    state.restore_rng(engine.rank, engine.device, run.cfg.data.seed)
    if engine.world > resume.world:
        log.info("the checkpoint was saved by %d process(es): processes %d to %d draw fresh dropout RNG streams, "
                 "seeded from --seed, the step and the process", resume.world, resume.world,
                 engine.world - 1)  # fmt: skip
    if state.best_step is not None and checkpoint.best_weights(resume.path, state.best_step) is None:
        log.warning("checkpoint %s does not hold the weights of its best validation (step %d): --output-best ships "
                    "the best of the validations from here on", resume.path, state.best_step)  # fmt: skip
        state.best_step = state.best_val_loss = None
    engine.restore_optimizer(resume.tensors["optimizer"])
    restore_loss_scaler(engine, resume.tensors)
    batches = len(run.plan.batches(state.epoch))
    if resume.meta.get("batches_in_epoch", batches) != batches:  # a plan made by an earlier version
        log.warning("epoch %d has %d micro-batches in this run's plan, %s in the checkpoint's: the data order "
                    "may not continue exactly", state.epoch + 1, batches, resume.meta["batches_in_epoch"])  # fmt: skip
    log.info("resumed from %s: step %d, epoch %d, %d of %d micro-batches done", resume.path, state.step,
             state.epoch + 1, state.position, batches)  # fmt: skip
    if state.position >= batches:  # saved at the end of an epoch
        state.next_epoch()
    if resume.meta.get("total_steps") != run.total_steps:
        log.warning("schedule length changed from %s to %d steps", resume.meta.get("total_steps"), run.total_steps)
    return state


def restore_loss_scaler(engine, tensors: dict[str, Any]) -> None:
    """fp16: put back the loss scale and its counters, when the checkpoint holds this engine's kind of them
    (accelerate's GradScaler, or DeepSpeed's own loss scaler); else the scale starts afresh."""
    if engine.scaler_state() is None:  # no loss scaling in this run
        return
    if engine.scaler_key in tensors:
        engine.restore_scaler(tensors[engine.scaler_key])
    else:
        log.info("the checkpoint holds no loss-scaler state of this engine: fp16 loss scaling starts afresh")
