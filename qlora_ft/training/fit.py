"""The training loop, top to bottom:

    validate the base model (a fresh run)
    for each epoch, from where the state stands:
        for each optimizer step (`--grad-accum-steps` micro-batches of the epoch plan):
            forward and backward over its micro-batches, clip, update
            log, validate, sample, save at their intervals
        at the epoch's end: validate, save Epoch_N

Everything that differs between engines (one process, DDP, FSDP, DeepSpeed) is behind `run.engine`, and every
number a checkpoint must hold is in the `TrainState`.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from qlora_ft import checkpoint
from qlora_ft.data.encode import leading_token_id
from qlora_ft.errors import UserError
from qlora_ft.generate import sample
from qlora_ft.loss import accumulate_gradients
from qlora_ft.model import sampling_copy
from qlora_ft.training.methods import set_learning_rate
from qlora_ft.training.outputs import append_jsonl, log_metrics
from qlora_ft.training.plan import Rows, due, lr_at
from qlora_ft.training.run import Run
from qlora_ft.training.state import TrainState
from qlora_ft.training.stop import StopRequest
from qlora_ft.training.validate import validation_loss

log = logging.getLogger(__name__)


@dataclass
class Session:
    """What this launch of `fit` tracks beside the TrainState; not saved, as a resumed run starts it anew."""

    tokens_at_start: int
    last_saved_step: int
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0  # training time, once `fit` returns
    validated: bool = False  # validated since the start (the base model's validation aside); else the end does
    window_loss: float = 0.0  # summed loss and target tokens since the last log line
    window_targets: int = 0
    signum: int | None = None  # the signal that stopped it early
    bar: Any = None


def fit(run: Run, state: TrainState) -> Session:
    """Train from `state` to `run.total_steps` (or a SIGINT/SIGTERM: then `Session.signum`), updating `state`."""
    cfg, engine = run.cfg, run.engine
    run.model.train()
    if run.resume is None:  # the base model's loss on the same split: what fine-tuning improves on
        state.initial_val_loss = validate(run, state)
    session = Session(tokens_at_start=state.tokens, last_saved_step=state.step)
    session.bar = tqdm(total=run.total_steps, initial=state.step, desc="training", unit="step",
                       disable=not engine.is_main, dynamic_ncols=True)  # fmt: skip
    # SIGINT/SIGTERM: finish the step, then stop (the caller saves); the bar ends its line even on an error
    with StopRequest() as stop, closing(session.bar):
        while state.step < run.total_steps and not stop.requested(engine):
            batches = run.plan.batches(state.epoch)
            while state.position < len(batches) and state.step < run.total_steps and not stop.requested(engine):
                # --- one optimizer step over the next micro-batches ------------------------------------------
                group = batches[state.position : state.position + cfg.optim.grad_accum_steps]
                lr = lr_at(state.step, cfg.optim.lr, cfg.optim.warmup_steps, run.total_steps)
                loss_sum, n_targets, n_tokens = optimizer_step(run, group, lr, state.step)
                state.advance(len(group), n_tokens)
                session.window_loss += loss_sum
                session.window_targets += n_targets

                # --- log, validate, sample, save ---------------------------------------------------------------
                if state.step % cfg.ckpt.log_every == 0 or state.step == run.total_steps:
                    log_progress(run, state, session, lr)
                session.bar.update(1)
                if due(state.step, cfg.ckpt.eval_every):
                    record_validation(run, state, validate(run, state), due(state.step, cfg.sample.sample_every))
                    session.validated = True
                if due(state.step, cfg.sample.sample_every):
                    write_samples(run, state.step)
                if due(state.step, cfg.ckpt.save_every_steps):
                    save(run, state, session, checkpoint.step_name(state.step))

            # --- the end of an epoch: validate (unless just done), save Epoch_N, on to the next ---------------
            if state.position >= len(batches):
                if not due(state.step, cfg.ckpt.eval_every):
                    record_validation(run, state, validate(run, state), due(state.step, cfg.sample.sample_every))
                    session.validated = True
                if due(state.epoch + 1, cfg.ckpt.save_interval):
                    save(run, state, session, checkpoint.epoch_name(state.epoch + 1))
                state.next_epoch()
    session.seconds, session.signum = time.perf_counter() - session.started, stop.signum
    return session


def optimizer_step(run: Run, group: list[Rows], lr: float, step: int) -> tuple[float, int, int]:
    """Forward and backward over the micro-batches `group`, then clip and update at learning rate `lr`.
    Returns (summed loss, target tokens, real input tokens), all processes together."""
    cfg, engine = run.cfg, run.engine
    micro = [run.micro_batch(rows) for rows in group]
    set_learning_rate(run.optimizer, lr)  # first: DeepSpeed steps inside the last backward
    loss_sum, n_targets, n_tokens = accumulate_gradients(run.model, micro, engine, run.head, cfg.model.loss_chunk)
    if not math.isfinite(loss_sum):  # stop before saving: the last checkpoint stays the last good one
        raise UserError(f"the loss became non-finite at step {step + 1}; try a lower --lr (now {cfg.optim.lr})")
    engine.clip(cfg.optim.max_grad_norm)
    run.optimizer.step()  # (DeepSpeed: accelerate makes this and zero_grad no-ops)
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum, n_targets, n_tokens


def log_progress(run: Run, state: TrainState, session: Session, lr: float) -> None:
    """A metrics row of the mean loss since the last one, and the progress bar's numbers."""
    tokens_per_second = (state.tokens - session.tokens_at_start) / max(time.perf_counter() - session.started, 1e-9)
    loss = session.window_loss / max(1, session.window_targets)
    log_metrics(run, {"step": state.step, "epoch": state.epoch + 1, "loss": loss, "lr": lr, "tokens": state.tokens,
                      "tokens_per_second": tokens_per_second})  # fmt: skip
    session.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}")
    session.window_loss, session.window_targets = 0.0, 0


def validate(run: Run, state: TrainState) -> float:
    """The validation loss now (logged as a metrics row); the caller decides which loss of the state it is."""
    loss, perplexity = validation_loss(run.model, run.val_batches, run.engine, run.head, run.cfg.model.loss_chunk)
    log_metrics(run, {"step": state.step, "epoch": state.epoch + 1, "val_loss": loss, "val_perplexity": perplexity})
    log.info("step %d | validation loss %.4f | perplexity %.2f", state.step, loss, perplexity)
    return loss


def record_validation(run: Run, state: TrainState, loss: float, sampled: bool) -> None:
    """Record a validation loss; with --output-best, an improvement writes the weights to the output folder (and,
    when sampling is on and `sampled` says this step's samples are not written anyway, samples of them).
    Collective: every process sees the same loss, so all take the same branch."""
    improved = state.best_val_loss is None or loss < state.best_val_loss
    state.record_validation(loss)
    if not (run.cfg.ckpt.output_best and improved):
        return
    state.best_step = state.step
    weights = run.engine.gathered_weights()
    if run.engine.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        run.engine.unwrap().save_pretrained(run.out_dir, safe_serialization=True, state_dict=weights)
        log.info("step %d: best validation so far, written to %s (--output-best)", state.step, run.out_dir)
    if run.cfg.sample.sample_every and not sampled:
        write_samples(run, state.step)


def write_samples(run: Run, step: int) -> None:
    """Generate from each sample prompt (seeded by the step, leaving the training RNG as it was) into samples.jsonl."""
    engine, cfg = run.engine, run.cfg
    if not (engine.is_main or engine.lockstep):  # FSDP: all generate the same texts, in lockstep
        return
    prompts = run.sample_prompts()
    model = engine.unwrap()
    model = (sampling_copy(model, engine.device) if engine.world == 1 else None) or model  # CPU: a float copy
    with engine.autocast():
        texts = sample(model, run.tokenizer, prompts, cfg.sample, cfg.sample.max_output_length,
                       seed=cfg.data.seed + step, truncate=True)  # fmt: skip
    if not engine.is_main:
        return
    rows = [{"step": step, "prompt": prompt_text(run.tokenizer, prompt), "text": text}
            for prompt, (text,) in zip(prompts, texts, strict=True)]  # fmt: skip
    append_jsonl(run.out_dir / "samples.jsonl", rows)
    for row in rows:
        tqdm.write(f"[sample @ step {step}] {row['text']}")


def prompt_text(tokenizer, prompt: str | list[int]) -> str:
    """A sample prompt as samples.jsonl shows it: a record's prompt ids decoded, without their leading token."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.decode(prompt[1:] if prompt[:1] == [leading_token_id(tokenizer)] else prompt)


def save(run: Run, state: TrainState, session: Session, name: str) -> Path:
    """Checkpoint `name`: weights, optimizer state and the TrainState, gathered whole from every process (so it
    resumes under any engine and process count), and --output-best's weights when they are an earlier step's (the
    output folder holds them); pruned to --keep-checkpoints. Collective."""
    engine = run.engine
    session.last_saved_step = state.step
    state.capture_rng(engine)  # every process's RNG, for dropout
    weights = engine.gathered_weights()
    optimizer_state = engine.gathered_optimizer_state()
    path, error = run.check_dir / name, None
    if engine.is_main:
        try:
            path = write_checkpoint(run, state, name, weights, optimizer_state)
        except UserError as e:  # (a full disk): every process stops with it
            error = e
    engine.fail_together(error)
    return path


def write_checkpoint(run: Run, state: TrainState, name: str, weights, optimizer_state) -> Path:
    """The main process's part of `save`: write checkpoint `name`, then prune."""
    engine = run.engine
    meta = {**state.to_meta(len(run.plan.batches(state.epoch))), "world_size": engine.world,
            "total_steps": run.total_steps}  # fmt: skip
    tensors = {"optimizer": optimizer_state, **state.to_tensors()}
    scaler = engine.scaler_state()  # fp16: the loss scale and its counters, for an exact resume
    if scaler is not None:
        tensors[engine.scaler_key] = scaler
    best = run.out_dir if state.best_step not in (None, state.step) else None  # --output-best: what it ships
    path = checkpoint.save_checkpoint(run.check_dir, name, engine.unwrap(), meta, tensors, run.config_dict(),
                                      run.data.split.to_json(), state_dict=weights, best=best)  # fmt: skip
    log.info("saved checkpoint %s", path)
    keep = run.cfg.ckpt.keep_checkpoints
    for old in checkpoint.prune_checkpoints(run.check_dir, keep):
        log.info("deleted checkpoint %s (--keep-checkpoints %d)", run.check_dir / old, keep)
    return path
