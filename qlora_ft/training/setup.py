"""Set-up: everything a run is built from its config, into one `Run`.

The order matters in places: a checkpoint to resume is read first (bad input fails before anything is built);
the seeds are set around the model's construction so that every process starts from the same adapter and
draws its own dropout masks; the start-up probes may switch packing and the chunked loss off, recording that
in the run's own copy of the config (saved with every checkpoint and as run_config.json).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from qlora_ft import checkpoint, engines
from qlora_ft.config import TrainConfig, apply_mode_defaults, mode_defaults, take_unset_from, warmup_steps_for
from qlora_ft.data.batches import LazyBatches, collate, eval_batches, validation_subset
from qlora_ft.data.prepare import TrainData, prepare_data
from qlora_ft.engines import Engine
from qlora_ft.errors import UserError
from qlora_ft.loss import output_layer
from qlora_ft.model import (
    add_lora,
    check_training_context,
    count_parameters,
    default_device,
    keep_training_layout,
    load_base,
    load_tokenizer,
    memory_estimate,
    resolve_base_name,
)
from qlora_ft.precision import Precision, precision_policy
from qlora_ft.training.batch_size import choose, full_rows_step
from qlora_ft.training.methods import add_neftune, make_optimizer
from qlora_ft.training.plan import EpochPlan, Intervals, lr_at, plan_line, plan_summary
from qlora_ft.training.resume import check_compatible, check_packing, check_same_records, read_resume
from qlora_ft.training.run import Run

log = logging.getLogger(__name__)


def set_up(cfg: TrainConfig) -> Run:
    """Build the run from `cfg` (which is not changed): the checkpoint to resume, engine, data, model, optimizer."""
    cfg = copy.deepcopy(cfg)  # the probes below may switch settings off; the caller's config stays as given
    if cfg.data.data is None:
        raise UserError("--data is required (--data demo:austen: a novel shipped with the package)")
    cfg.model.model = resolve_base_name(cfg.model.model)
    out_dir, check_dir = Path(cfg.ckpt.output_dir), Path(cfg.ckpt.check_dir)
    resume = read_resume(cfg, check_dir)
    if resume is None:  # a fresh run: into empty folders, or --overwrite; checked before anything is written
        checkpoint.check_fresh_folders({"--output-dir": out_dir, "--check-dir": check_dir}, cfg.ckpt.overwrite)
    elif taken := take_unset_from(cfg, resume.config):  # per-mode options not given: as the checkpoint trained
        log.info("resuming with the checkpoint's %s", " ".join(f"--{k} {v}" for k, v in taken.items()))

    # --- engine: accelerate's Accelerator, set up by `accelerate launch --config_file` (else one process / DDP)
    precision = precision_policy(cfg.model.compute_dtype, default_device())
    if default_device().type == "cpu":
        return_freed_memory()
    engine = engines.make_engine(engines.make_accelerator(out_dir, precision.accelerate_name), cfg)

    # --- data (its mode settles the options left to the mode's default), model, optimizer -------------
    tokenizer, data = load_data_once(cfg, engine)
    auto_batch = take_auto_batch(cfg, engine, resume)
    engine.configure(cfg)  # (DeepSpeed: the batch size, which the data's mode may have set)
    if resume:  # the settings first, then the data: a changed flag is named as such
        check_compatible(resume.config, cfg, resume.path, resume.world, engine.world)
        check_same_records(resume, data)
        data.check_split(resume.split)
    model = build_model(cfg, engine, precision.dtype)
    head = probe_shortcuts(cfg, model, engine)
    if auto_batch:  # the largest micro-batch that fits, the mode's global batch kept by accumulation
        global_batch = mode_defaults(data.mode)["batch_size"] * cfg.optim.grad_accum_steps
        trial = full_rows_step(model, cfg.data.max_input_length, len(tokenizer), engine.device, engine.autocast)
        cfg.data.batch_size, cfg.optim.grad_accum_steps = choose(global_batch, trial)
    log_setup(cfg, engine, precision)
    if resume:
        check_packing(resume.config, cfg, resume.path)
    trainable, total = count_parameters(model)
    log.info("parameters: %s trainable of %s (%.2f%%), %s; %s", f"{trainable:,}", f"{total:,}",
             100 * trainable / total, method_name(cfg), precision.describe())  # fmt: skip
    optimizer = make_optimizer(cfg, model)  # AdamW; LoRA+ groups with --loraplus-ratio
    neftune = add_neftune(model, cfg.optim.neftune_alpha)  # on the unwrapped model, before `prepare`

    # --- the plan: micro-batches per epoch, a pure function of (seed, epoch) ----------------------------
    plan = EpochPlan(data.train.lengths, cfg.data.max_input_length, cfg.data.packing,
                     cfg.data.batch_size, engine.world, cfg.optim.grad_accum_steps, cfg.data.seed)  # fmt: skip
    total_steps = plan.total_steps(cfg.optim.epochs, cfg.optim.max_steps)
    cfg.optim.warmup_steps = warmup_steps_for(cfg, data.mode, total_steps)
    warn_if_warmup_outlasts(cfg, total_steps)
    log.info(plan_line(plan_summary(plan, total_steps, int(data.train.lengths.sum()), intervals(cfg, resume is None))))
    val_batches = validation_batches(cfg, data, tokenizer.pad_token_id)

    if resume:  # the checkpoint's weights before `prepare` shards them (its optimizer state after: `restore`)
        checkpoint.load_model_weights(model, resume.path)
    model, optimizer = engine.prepare(model, optimizer)
    return Run(cfg, engine, tokenizer, data, tokenizer.pad_token_id, plan, total_steps, val_batches,
               model, optimizer, head, (trainable, total), out_dir, check_dir, resume, neftune)  # fmt: skip


def take_auto_batch(cfg: TrainConfig, engine: Engine, resume) -> bool:
    """Whether `--batch-size auto` is left to choose (after the model is built); a resume takes its checkpoint's
    micro-batch and accumulation instead."""
    if cfg.data.batch_size != "auto":
        return False
    if engine.world > 1 or type(engine) is not engines.Engine:
        raise UserError("--batch-size auto chooses for one process: give a number under several processes")
    if resume is None:
        return True
    saved = resume.config
    cfg.data.batch_size, cfg.optim.grad_accum_steps = saved.data.batch_size, saved.optim.grad_accum_steps
    log.info("--batch-size auto: the checkpoint's micro-batch %d x %d accumulation steps", cfg.data.batch_size,
             cfg.optim.grad_accum_steps)  # fmt: skip
    return False


def return_freed_memory(threshold: int = 128 * 1024) -> bool:
    """On glibc (Linux): serve every allocation over `threshold` bytes with its own mmap, so a freed tensor goes back
    to the system at once. glibc otherwise raises that threshold after the first large free, and activation-sized
    tensors then come from heap arenas that fragment and keep their pages: a SmolLM2 QLoRA step (8 x 256, gradient
    checkpointing) peaked at 5.6 GB RSS without this, 1.7 GB with it, same loss (docs/memory.md). False elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return False
    return bool(mallopt and mallopt(-3, threshold))  # M_MMAP_THRESHOLD (malloc.h); 1 on success


def load_data(cfg: TrainConfig) -> tuple[Any, TrainData]:
    """(tokenizer, data): the data road (`prepare_data`: token cache, split, windows). The data's mode (text,
    instruction, chat) fills the options left to it in `cfg`."""
    if cfg.data.batch_size == "auto" and default_device().type != "cuda":
        raise UserError("--batch-size auto finds the largest micro-batch that fits in a CUDA GPU's memory: on CPU, "
                        "give a number")  # fmt: skip
    tokenizer = load_tokenizer(cfg.model.model)
    data = prepare_data(cfg, tokenizer)
    apply_mode_defaults(cfg, data.mode)  # unset per-mode options (--lr, --rank-lora, ...) take the mode's default
    # the model's context, from its config (no weights yet): sequences or samples past it fail now, not mid-run
    check_training_context(cfg.model.model, cfg.data.max_input_length, tokenizer if cfg.sample.sample_every else None,
                           cfg.sample.sample_prompts, cfg.sample.max_output_length)  # fmt: skip
    return tokenizer, data


def intervals(cfg: TrainConfig, fresh: bool) -> Intervals:
    """How often the run validates, samples and saves (for its plan)."""
    return Intervals(cfg.ckpt.eval_every, cfg.sample.sample_every, cfg.ckpt.save_every_steps, cfg.ckpt.save_interval,
                     fresh)  # fmt: skip


def validation_batches(cfg: TrainConfig, data: TrainData, pad_id: int) -> LazyBatches:
    """The batches every validation scores: a fixed seeded subset of the validation sequences (--eval-max-tokens),
    packed or grouped by length, made when scored."""
    val, d = data.validation, cfg.data
    lengths = val.lengths
    subset = validation_subset(lengths, d.eval_max_tokens, d.seed)
    if len(subset) < len(lengths):
        log.info("validation: %d of %d sequences, %d of %d tokens (--eval-max-tokens %d; 0 scores all)",
                 len(subset), len(lengths), sum(int(lengths[i]) for i in subset), int(sum(lengths)),
                 d.eval_max_tokens)  # fmt: skip
    rows = eval_batches([int(lengths[i]) for i in subset], d.max_input_length, d.packing, d.batch_size * 2)
    rows = [[[subset[i] for i in row] for row in batch] for batch in rows]  # back to indices into `val`
    return LazyBatches(rows, val, pad_id)


def load_data_once(cfg: TrainConfig, engine: Engine) -> tuple[Any, TrainData]:
    """`load_data` on process 0 first (it builds a missing token cache), then on the others (they open it). A
    failure on process 0 still releases the others, which then meet the same bad input and fail as it did."""
    if not engine.is_main:
        engine.barrier()
    try:
        return load_data(cfg)
    finally:
        if engine.is_main:
            engine.barrier()


def build_model(cfg: TrainConfig, engine: Engine, dtype: torch.dtype):
    """The base model (4-bit NF4 for QLoRA), with LoRA adapters unless fully fine-tuned: its trained weights
    float32 (the optimizer's masters), `dtype` what autocast and the 4-bit matmuls compute in."""
    from accelerate.utils import set_seed

    set_seed(cfg.data.seed)  # the same initial adapter on every process (FSDP keeps each one's own shard of it)
    # full fine-tuning trains every weight: float32 masters (a LoRA base is frozen and may stay 16-bit)
    model = load_base(cfg.model.model, cfg.model.qlora, dtype, engine.device, engine.quantized_storage(dtype),
                      weights_dtype=None if cfg.model.lora else torch.float32)  # fmt: skip
    model.config.use_cache = False
    if cfg.model.qlora:
        keep_training_layout(model)
    if cfg.model.lora:
        model = add_lora(model, cfg.model)
    if cfg.model.gradient_checkpointing is None:  # by the model's size: on where activations dominate
        activations, rest = memory_estimate(model, cfg.data.batch_size * cfg.data.max_input_length,
                                            cfg.model.loss_chunk, dtype)  # fmt: skip
        cfg.model.gradient_checkpointing = activations > rest
        log.info("gradient checkpointing %s by default: a micro-batch's activations, ~%.2f GB by estimate, %s the "
                 "weights, trainable state and logits, ~%.2f GB (--gradient-checkpointing True/False to choose)",
                 "on" if activations > rest else "off", activations / 1e9,
                 "outweigh" if activations > rest else "do not outweigh", rest / 1e9)  # fmt: skip
    if cfg.model.gradient_checkpointing:
        base = model.get_base_model() if cfg.model.lora else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_seed(cfg.data.seed, device_specific=True)  # seed + rank: each process its own dropout masks
    return model


def probe_shortcuts(cfg: TrainConfig, model, engine: Engine) -> torch.nn.Linear | None:
    """Check the two shortcuts the loop takes on this model and engine, switching off in `cfg` what does not
    hold: packing (windows must not attend to each other) and the chunked loss (returns its output layer).
    The probes run under the run's autocast, as training will (before `prepare` wraps the forward in it)."""
    with engine.autocast():
        isolated = not cfg.data.packing or packing_is_isolated(model, engine.device)
    if not isolated:
        log.warning("this model attends across packed paragraphs; training with padded batches instead")
        cfg.data.packing = False
    if cfg.model.loss_chunk and not engine.chunked_loss:
        log.info("%s: computing full logits (--loss-chunk off)", engine.name)
        cfg.model.loss_chunk = 0
    with engine.autocast():
        head = output_layer(model, engine.device) if cfg.model.loss_chunk else None
    if cfg.model.loss_chunk and head is None:
        log.warning("this model's output layer cannot be chunked; computing full logits (--loss-chunk ignored)")
        cfg.model.loss_chunk = 0
    return head


def log_setup(cfg: TrainConfig, engine: Engine, precision: Precision) -> None:
    """One line on how the run trains, once the probes have settled packing."""
    scaler = "DeepSpeed's loss scaler" if isinstance(engine, engines.DeepSpeedEngine) else "GradScaler"
    scaling = f"dynamic (fp16 {scaler})" if precision.use_scaler else "none"
    packing = "on" if cfg.data.packing else "off"
    checkpointing = "on" if cfg.model.gradient_checkpointing else "off"
    log.info("setup: %s, device %s, compute dtype %s, loss scaling %s, %s, packing %s, gradient checkpointing %s",
             engine.description, engine.device, str(precision.dtype).removeprefix("torch."), scaling, method_name(cfg),
             packing, checkpointing)  # fmt: skip


def warn_if_warmup_outlasts(cfg: TrainConfig, total_steps: int) -> None:
    """Warn when the run ends inside its warmup: the learning rate then never reaches its decay."""
    if cfg.optim.warmup_steps >= total_steps:
        last_lr, peak = lr_at(total_steps - 1, cfg.optim.lr, cfg.optim.warmup_steps, total_steps), cfg.optim.lr
        log.warning("--warmup-steps %d >= the run's %d steps: the learning rate only warms up, to %.3g of %.3g at "
                    "the last step, and never decays", cfg.optim.warmup_steps, total_steps, last_lr, peak)  # fmt: skip


@torch.no_grad()
def packing_is_isolated(model, device) -> bool:
    """Whether this model keeps packed windows apart: the logits of window B must not depend on the window
    packed before it. transformers builds the block-diagonal mask from restarting `position_ids`; a model
    whose attention ignores them would silently attend across paragraphs."""
    was_training = model.training
    model.eval()
    b = collate([[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [4, 5, 6]]], pad_id=0)
    logits = model(input_ids=b["input_ids"].to(device), position_ids=b["position_ids"].to(device),
                   use_cache=False).logits.float()  # fmt: skip
    model.train(was_training)
    return torch.allclose(logits[0, 3:], logits[1, 3:], atol=1e-3, rtol=1e-3)


def method_name(cfg: TrainConfig) -> str:
    """E.g. "QLoRA (4-bit NF4 base + LoRA, bf16)", "16-bit LoRA (fp16)", "full fine-tuning (32-bit)"."""
    precision = precision_policy(cfg.model.compute_dtype, default_device())
    if cfg.model.qlora:
        return f"QLoRA (4-bit NF4 base + LoRA, {precision.name})"
    if precision.autocast_dtype is None:
        return "32-bit LoRA" if cfg.model.lora else "full fine-tuning (32-bit)"
    return f"16-bit LoRA ({precision.name})" if cfg.model.lora else f"full fine-tuning ({precision.name} autocast)"
