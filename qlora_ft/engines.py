"""The engines a run trains under — one process, DDP, FSDP 2, DeepSpeed ZeRO-1/2 — behind one interface.

accelerate wraps the model and optimizer for each of them; what still differs between them is here, in `Engine`
(one process and DDP, accelerate's own paths) and its subclasses `FsdpEngine` and `DeepSpeedEngine`, so that the
training loop never asks which engine it runs on. This module also checks that the engine from `accelerate launch
--config_file` is one the loop drives correctly and fills the DeepSpeed settings that the loop's own flags decide;
converting each engine's sharded state to and from the one checkpoint layout is in `qlora_ft.sharded_state`.
"""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from qlora_ft.config import TrainConfig
from qlora_ft.errors import UserError
from qlora_ft.sharded_state import (
    by_position,
    deepspeed_optimizer_state,
    deepspeed_set_optimizer_state,
    deepspeed_weights,
    fp32_masters,
    fsdp_optimizer_state,
    fsdp_set_optimizer_state,
    loss_scaler_state,
    set_fp32_masters,
    set_loss_scaler_state,
    trained_parameters,
    zero_optimizer,
)

log = logging.getLogger(__name__)

FSDP, DEEPSPEED = "fsdp", "deepspeed"
FSDP_CONFIG, DEEPSPEED_CONFIG = "configs/fsdp_qlora.yaml", "configs/deepspeed_zero2.yaml"


def make_accelerator(out_dir: Path, precision: str):
    """The Accelerator: its engine (DDP, FSDP, DeepSpeed) comes from `accelerate launch --config_file`; cpu=True without
    CUDA, so that several CPU processes (torchrun) train data-parallel over gloo. (Tests replace this function to
    run FSDP and DeepSpeed on CPU processes: tests/fsdp_on_cpu.py, tests/deepspeed_on_cpu.py.)"""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state = AcceleratorState._shared_state  # a process-wide singleton that refuses a second precision
    alone = int(os.environ.get("WORLD_SIZE", "1")) == 1  # (no Accelerator yet to ask)
    if alone and state and state.get("_mixed_precision") != precision:
        AcceleratorState._reset_state()  # a second run in this process (a notebook, tests): its own precision
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=precision, log_with="tensorboard", project_dir=str(out_dir)
    )
    cpu_engines = (DistributedType.NO, DistributedType.MULTI_CPU)
    if precision == "fp16" and accelerator.device.type == "cpu" and accelerator.distributed_type in cpu_engines:
        # accelerate runs fp16 on CPU with neither autocast nor a loss scaler (silently float32), though torch has
        # both for CPU: switch on accelerate's own fp16 path (autocast, scaled backward, unscale) with a CPU scaler
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator


def make_engine(accelerator, cfg: TrainConfig) -> Engine:
    """The engine driving `accelerator`'s setup (checked, and DeepSpeed's config filled, by `check_engine`)."""
    kind = check_engine(accelerator, cfg)
    return {FSDP: FsdpEngine, DEEPSPEED: DeepSpeedEngine}.get(kind, Engine)(accelerator)


def check_engine(accelerator, cfg: TrainConfig) -> str | None:
    """The engine: FSDP, DEEPSPEED or None (one process, DDP); a clear error for a setup this loop does not drive."""
    from accelerate.utils import DistributedType

    engine = accelerator.distributed_type
    if engine == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        configure_deepspeed(plugin, cfg, accelerator.num_processes)
        log.info("engine: DeepSpeed ZeRO-%d on %d processes", plugin.zero_stage, accelerator.num_processes)
        return DEEPSPEED
    if engine != DistributedType.FSDP:
        return None
    if accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise UserError(f"FSDP version 1 is not supported: set fsdp_version: 2 (see {FSDP_CONFIG})")
    if not cfg.model.lora:
        raise UserError("FSDP here shards LoRA and QLoRA runs; full fine-tuning (--lora False) needs DDP or DeepSpeed")
    log.info("engine: FSDP 2 on %d processes", accelerator.num_processes)
    return FSDP


def configure_deepspeed(plugin, cfg: TrainConfig, world: int) -> None:
    """Check a DeepSpeed config against this loop and write into it what train.py's flags decide: gradient
    clipping, and one micro-batch per engine step (the loop accumulates --grad-accum-steps micro-batches itself
    and tells the engine which backward ends the step). The batch per process follows once the data's mode
    has settled it (`DeepSpeedEngine.configure`)."""
    ds = plugin.deepspeed_config
    zero = ds.get("zero_optimization", {})
    if plugin.zero_stage not in (1, 2):
        raise UserError(
            f"DeepSpeed ZeRO stage {plugin.zero_stage} is not supported: use stage 1 or 2 ({DEEPSPEED_CONFIG}); "
            f"to shard the 4-bit model itself, use FSDP ({FSDP_CONFIG})"
        )
    for part in ("offload_optimizer", "offload_param"):
        if zero.get(part, {}).get("device", "none") not in ("none", None):
            raise UserError(f"DeepSpeed {part} is not supported: set its device to none (an adapter's optimizer "
                            "state is small; the 4-bit base is what FSDP shards)")  # fmt: skip
    for part, flags in (("optimizer", "--lr, --eps, --weight-decay"), ("scheduler", "--lr, --warmup-steps")):
        if part in ds:
            raise UserError(f"remove '{part}' from the DeepSpeed config: train.py sets it from {flags}")
    if ds.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise UserError("set gradient_accumulation_steps to 1 in the DeepSpeed config and use --grad-accum-steps")
    ds.update(gradient_accumulation_steps=1, gradient_clipping=cfg.optim.max_grad_norm)  # 0: none, as in the loop


class Engine:
    """One process or DDP, on accelerate's own paths; the base that the sharding engines override.

    The training loop does everything that differs between engines through these methods. After `prepare`,
    `model` and `optimizer` are the wrapped ones. The methods that gather or reduce are collective: with several
    processes, every process must call them, in the same order.
    """

    name = "one process / DDP"
    scaler_key = "scaler"  # the checkpoint's entry for the loss-scaler state (fp16)
    lockstep = False  # whether every forward is collective, so that all processes must run the same number
    chunked_loss = True  # whether the chunked loss may read the output layer's weight outside the forward

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.model: Any = None
        self.optimizer: Any = None
        self.params: list[torch.nn.Parameter] = []  # the trained parameters of the wrapped model
        self.wrapped = True  # whether `prepare` put the model in a container (DDP, DeepSpeed's engine, ...)

    @property
    def world(self) -> int:
        """The number of processes (the one source of it)."""
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def description(self) -> str:
        """The engine and the process count, for the setup line: a launch that silently started one process
        shows as one."""
        return "single process" if self.world == 1 else f"DDP on {self.world} processes"

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """fp16's loss scaler (None in other precisions)."""
        return getattr(self.accelerator, "scaler", None)

    def scaler_state(self) -> dict[str, Any] | None:
        """The fp16 loss scaler's state (None without loss scaling): checkpoints keep it, for an exact resume."""
        return None if self.scaler is None else self.scaler.state_dict()

    def restore_scaler(self, state: dict[str, Any]) -> None:
        """The inverse of `scaler_state`."""
        self.scaler.load_state_dict(state)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and logs progress (the first one)."""
        return self.accelerator.is_main_process

    def quantized_storage(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype that the packed 4-bit weights are stored in (bitsandbytes' default: bytes)."""
        return torch.uint8

    def configure(self, cfg: TrainConfig) -> None:
        """Take the settings the data's mode decides (the batch size), before `prepare`."""

    def prepare(self, model, optimizer):
        """Wrap the model and optimizer for this engine; returns the wrapped pair."""
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.wrapped = self.model is not model
        self.params = [p for _, p in trained_parameters(self.model)]  # FSDP replaces them with sharded ones
        return self.model, self.optimizer

    def unwrap(self):
        """The model without the engine's wrapper (a PeftModel for LoRA runs). A model that `prepare` left as it
        was is returned as is: accelerate's `unwrap_model` imports DeepSpeed, where installed, to look for its
        wrapper (~0.5 s at a one-process run's first save)."""
        return self.accelerator.unwrap_model(self.model) if self.wrapped else self.model

    def autocast(self) -> AbstractContextManager:
        """The run's autocast (16-bit compute, if any), for what runs outside the prepared model's forward."""
        return self.accelerator.autocast()

    def no_sync(self, model) -> AbstractContextManager:
        """Context for a backward that only accumulates: DDP and FSDP skip their gradient all-reduce in it."""
        return self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor, last_in_step: bool) -> None:
        """Backward of one micro-batch's loss; `last_in_step` marks the optimizer step's last micro-batch."""
        self.accelerator.backward(loss)

    def clip(self, max_norm: float) -> None:
        """Clip the gradients' global norm to `max_norm` (0: no clipping)."""
        if max_norm > 0:
            self.accelerator.clip_grad_norm_(self.params, max_norm)

    def gathered_weights(self) -> dict[str, torch.Tensor] | None:
        """The full weights to save, or None where the model's own are full (collective)."""
        return None

    def gathered_optimizer_state(self) -> dict[str, Any]:
        """The optimizer state in a single process's layout, parameters by position (collective)."""
        return by_position(self.optimizer.state_dict(), self.optimizer.param_groups, self.params)

    def restore_optimizer(self, state: dict[str, Any]) -> None:
        """The inverse of `gathered_optimizer_state`, after `prepare`: each process keeps its shard."""
        self.optimizer.load_state_dict(state)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """A small float64 tensor summed over processes (gloo on CPU, nccl on GPU); returned on the CPU."""
        if self.world == 1:
            return values
        return self.accelerator.reduce(values.to(self.device), reduction="sum").cpu()

    def gather_rows(self, state: torch.Tensor) -> torch.Tensor:
        """(processes, n) from each process's 1-D tensor of a fixed size (RNG states)."""
        if self.world == 1:
            return state[None]
        return self.accelerator.gather(state[None].to(self.device)).cpu()

    def fail_together(self, error: UserError | None) -> None:
        """Raise `error`, this process's UserError (or None), on every process when any process has one
        (collective): an error that only some meet (the main process's writes) ends all of them the same way,
        instead of leaving the others in a collective with a process gone."""
        failed = error is not None
        if self.world > 1:
            failed = bool(self.all_sum(torch.tensor([float(failed)], dtype=torch.float64)).item())
        if failed:
            raise error or UserError("stopped: another process failed (its error is in its own line)")

    def finish(self) -> None:
        """Once every process is here (the main one has written the outputs), close the trackers and, with
        several processes, the process group (accelerate's end_training destroys it)."""
        if self.world > 1:
            self.barrier()
        self.accelerator.end_training()


class FsdpEngine(Engine):
    """FSDP 2: every process holds a shard of each weight, gathered inside each forward (a collective)."""

    name = "FSDP"
    lockstep = True

    @property
    def description(self) -> str:
        return f"FSDP 2 on {self.world} processes"

    chunked_loss = False  # outside the forward, the output layer's weight is only this process's shard

    def quantized_storage(self, dtype: torch.dtype) -> torch.dtype:
        return dtype  # FSDP shards only floating tensors of one dtype: the packed 4-bit bytes go in the compute dtype

    def prepare(self, model, optimizer):
        from torch.distributed.fsdp import register_fsdp_forward_method

        super().prepare(model, optimizer)
        register_fsdp_forward_method(self.model, "generate")  # gathers the outer weights (embeddings) for samples
        return self.model, self.optimizer

    def gathered_weights(self) -> dict[str, torch.Tensor] | None:
        return self.accelerator.get_state_dict(self.model)

    def gathered_optimizer_state(self) -> dict[str, Any]:
        return fsdp_optimizer_state(self.model, self.optimizer)

    def restore_optimizer(self, state: dict[str, Any]) -> None:
        fsdp_set_optimizer_state(self.model, self.optimizer, state)


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-1/2: float32 masters and AdamW moments split over the processes; the engine takes the
    optimizer step (clipping, update, zeroing) at the end of the step's last backward."""

    name = "DeepSpeed"
    scaler_key = "deepspeed_loss_scaler"  # DeepSpeed scales fp16 losses itself (accelerate's scaler is None)

    @property
    def description(self) -> str:
        stage = self.accelerator.state.deepspeed_plugin.zero_stage
        return f"DeepSpeed ZeRO-{stage} on {self.world} process{'es' if self.world > 1 else ''}"

    def configure(self, cfg: TrainConfig) -> None:
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        ds.update(train_micro_batch_size_per_gpu=cfg.data.batch_size, train_batch_size=cfg.data.batch_size * self.world)

    def scaler_state(self) -> dict[str, Any] | None:
        scaler = zero_optimizer(self.optimizer)[0].loss_scaler
        return loss_scaler_state(scaler) if scaler.dynamic else None  # bf16, fp32: a fixed scale of 1

    def restore_scaler(self, state: dict[str, Any]) -> None:
        set_loss_scaler_state(zero_optimizer(self.optimizer)[0].loss_scaler, state)

    def prepare(self, model, optimizer):
        masters = fp32_masters(model)  # before DeepSpeed casts the model to 16 bits
        super().prepare(model, optimizer)
        set_fp32_masters(self.model, masters)
        return self.model, self.optimizer

    def no_sync(self, model) -> AbstractContextManager:
        return nullcontext()  # DeepSpeed is told which backward ends the step instead

    def backward(self, loss: torch.Tensor, last_in_step: bool) -> None:
        self.accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=last_in_step)

    def clip(self, max_norm: float) -> None:
        pass  # DeepSpeed clips in its own step, by the same rule (gradient_clipping, set by configure_deepspeed)

    def gathered_weights(self) -> dict[str, torch.Tensor] | None:
        return deepspeed_weights(self.unwrap())  # trainable weights in float32, from the masters

    def gathered_optimizer_state(self) -> dict[str, Any]:
        return deepspeed_optimizer_state(self.model, self.optimizer)

    def restore_optimizer(self, state: dict[str, Any]) -> None:
        deepspeed_set_optimizer_state(self.model, self.optimizer, state)
