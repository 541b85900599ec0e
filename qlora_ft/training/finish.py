"""The end of a run: final validation and checkpoint, then the adapter (or model), tokenizer, run config,
summary and report in the output folder. Or, stopped by a signal: a checkpoint, and `Interrupted`."""

from __future__ import annotations

import logging
import math
import resource
import signal
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from qlora_ft import checkpoint
from qlora_ft.errors import Interrupted
from qlora_ft.fs import follow_umask
from qlora_ft.report import write_report
from qlora_ft.training.fit import Session, record_validation, save, validate, write_samples
from qlora_ft.training.run import Run
from qlora_ft.training.setup import method_name
from qlora_ft.training.state import TrainState

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: Any  # the trained model (a PeftModel for LoRA runs) at the last step, unwrapped from the engine
    summary: dict[str, Any]  # also written to <output_dir>/train_summary.json (empty on other processes)
    output_step: int  # the step whose weights <output_dir> holds (--output-best: the best validation's)


def finish(run: Run, state: TrainState, session: Session) -> TrainResult:
    """Sample (unless just done: so a run shorter than --sample-every shows samples), validate (unless this launch
    has since the base model's validation) and checkpoint the last step (unless just saved); write the outputs."""
    every = run.cfg.sample.sample_every
    if every and state.step % every:
        write_samples(run, state.step)
    if not session.validated:
        record_validation(run, state, validate(run, state), sampled=True)  # (sampled just above)
    if session.last_saved_step != state.step:
        save(run, state, session, checkpoint.step_name(state.step))
    if run.neftune is not None:  # the returned model computes what it was trained to, with no noise
        run.neftune.remove()
    weights = None if run.cfg.ckpt.output_best else run.engine.gathered_weights()  # collective
    summary = write_outputs(run, state, session, weights) if run.engine.is_main else {}
    run.engine.finish()
    return TrainResult(run.engine.unwrap(), summary, output_step(run, state))


def stop_early(run: Run, state: TrainState, session: Session) -> NoReturn:
    """After a signal: save the step reached (unless just saved) and raise `Interrupted` (exit 128 + signal)."""
    if session.last_saved_step != state.step:
        path = save(run, state, session, checkpoint.step_name(state.step))
    else:
        path = checkpoint.resolve_checkpoint(run.check_dir, checkpoint.LATEST)
    run.engine.finish()
    name = signal.Signals(session.signum).name
    raise Interrupted(f"stopped by {name} after step {state.step}; checkpoint {path} saved; "
                      "resume with the same command plus --load-checkpoint True", 128 + session.signum)  # fmt: skip


def write_outputs(run: Run, state: TrainState, session: Session, weights) -> dict[str, Any]:
    """The adapter (full fine-tuning: the model), tokenizer, run_config.json, train_summary.json and report.md;
    returns the summary. Main process only."""
    cfg, out_dir = run.cfg, run.out_dir
    if not cfg.ckpt.output_best:  # (--output-best: written when validation improved)
        run.engine.unwrap().save_pretrained(out_dir, safe_serialization=True, state_dict=weights)
    run.tokenizer.save_pretrained(out_dir)
    follow_umask(out_dir.glob("*.safetensors"))  # safetensors writes 0600; the folder is meant to be shared
    checkpoint.write_run_config(out_dir, run.config_dict())
    summary = train_summary(run, state, session)
    checkpoint.write_json(out_dir / "train_summary.json", summary)
    try:
        write_report(out_dir, out_dir)
    except Exception as e:  # plotting must not cost a finished run its exit status; the adapter is saved
        log.warning("could not write report.md: %s", e)
    log.info("done: %d steps, validation loss %.4f, perplexity %.2f; %s of step %d in %s", state.step, state.val_loss,
             summary["final_val_perplexity"], "adapter" if cfg.model.lora else "model", summary["output_step"],
             out_dir)  # fmt: skip
    return summary


def train_summary(run: Run, state: TrainState, session: Session) -> dict[str, Any]:
    device = run.engine.device
    tokens = state.tokens - session.tokens_at_start  # trained on in this launch
    return {
        "method": method_name(run.cfg),
        "train_tokens": tokens,
        "train_tokens_total": state.tokens,
        "train_seconds": session.seconds,
        "tokens_per_second": tokens / max(session.seconds, 1e-9),
        "initial_val_loss": state.initial_val_loss,
        "final_val_loss": state.val_loss,
        "final_val_perplexity": math.exp(min(state.val_loss, 50.0)),
        "peak_memory_bytes": peak_memory_bytes(device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "steps": state.step,
        "best_val_loss": state.best_val_loss,
        "output_step": output_step(run, state),
        "epochs": state.epoch + state.position / max(1, len(run.plan.batches(state.epoch))),
        "trainable_parameters": run.parameters[0],
        "total_parameters": run.parameters[1],
    }


def output_step(run: Run, state: TrainState) -> int:
    """The step whose weights the output folder holds: the best validation's with --output-best, else the last."""
    return state.best_step if run.cfg.ckpt.output_best else state.step


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
