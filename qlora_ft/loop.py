"""The training loop: one function, read top to bottom, on `accelerate.Accelerator`."""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import resource
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qlora_ft import checkpoint
from qlora_ft.config import TrainConfig, apply_mode_defaults, train_config_from_dict, warmup_steps_for
from qlora_ft.data import collate, epoch_batches, epoch_rows, eval_batches, follow_umask
from qlora_ft.dataset import prepare_data
from qlora_ft.engines import (
    DEEPSPEED,
    FSDP,
    check_engine,
    fp32_masters,
    gathered_optimizer_state,
    gathered_weights,
    restore_optimizer,
    set_fp32_masters,
    trained_parameters,
)
from qlora_ft.errors import Interrupted, UserError
from qlora_ft.generate import sample
from qlora_ft.loss import linear_cross_entropy
from qlora_ft.model import (
    add_lora,
    check_training_context,
    count_parameters,
    default_device,
    keep_training_layout,
    load_base,
    load_tokenizer,
    resolve_base_name,
)
from qlora_ft.precision import precision_policy
from qlora_ft.report import write_report
from qlora_ft.templates import collate_masked

log = logging.getLogger(__name__)


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to `peak`, then linear decay to 0.

    >>> [round(lr_at(s, 1.0, 2, 6), 2) for s in range(6)]
    [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy, number of target tokens); positions labelled -100 do not count.

    logits (B, T, V), labels (B, T): position t predicts labels[t + 1].
    """
    targets = labels[:, 1:]  # (B, T-1)
    loss_sum = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
    )  # fp32 under autocast
    return loss_sum, (targets != -100).sum()


@torch.no_grad()
def output_layer(model, device=None):
    """The output projection when the chunked loss can stand in for it, else None (full logits are made).

    It must be a bias-free Linear fed by the model's last hidden state, with nothing after it (some models
    scale or soft-cap their logits): a two-row probe compares the chunked loss with the plain one.
    """
    head = model.get_output_embeddings()
    if not (isinstance(head, torch.nn.Linear) and head.bias is None):
        return None
    device = device or head.weight.device
    was_training = model.training
    model.eval()
    probe = {k: v.to(device) for k, v in collate([[[1, 2, 3, 4]], [[5, 6, 7]]], pad_id=0).items()}
    plain, _ = forward_loss(model, probe, None, 0)
    chunked, _ = forward_loss(model, probe, head, 2)
    model.train(was_training)
    tol = 1e-2 if torch.is_autocast_enabled(device.type) else 1e-3  # 16-bit logits round differently per layout
    return head if torch.allclose(plain.float(), chunked.float(), rtol=tol, atol=tol) else None


def forward_loss(model, batch: dict[str, torch.Tensor], head, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss, target tokens) of one batch. With `head` and `chunk` > 0 the model stops at
    its final hidden states (`logits_to_keep` empty) and `linear_cross_entropy` applies the output layer a
    chunk at a time, only at positions that predict a real token; otherwise the full logits are made."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if head is None or chunk == 0:
        return token_loss(model(**inputs, use_cache=False).logits, batch["labels"])
    keep_none = torch.empty(0, dtype=torch.long, device=batch["input_ids"].device)
    out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=keep_none)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    valid = targets != -100
    hidden = out.hidden_states[-1][:, :-1][valid]  # (N, d), N = real targets
    return linear_cross_entropy(hidden, head.weight, targets[valid], chunk), valid.sum()


def accumulate_gradients(model, micro: list[dict[str, torch.Tensor]], accelerator, head=None, chunk: int = 0):
    """Forward and backward over the micro-batches of one optimizer step.

    Each micro-batch's summed token loss is divided by the target tokens of the *whole step* on all
    processes, so the accumulated (and, with several processes, all-reduced) gradient equals that of one
    batch holding all of them (padding never counts). Returns (summed loss, target tokens, real input
    tokens), summed over processes. Under DeepSpeed the engine also takes the optimizer step (clipping,
    update, zeroing) at the end of the last backward, which this function marks as the step's boundary.
    """
    world = accelerator.num_processes
    deepspeed = getattr(accelerator, "deepspeed_engine_wrapped", None)
    n_local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    n_targets = int(_all_sum(accelerator, torch.tensor([n_local], dtype=torch.float64))[0]) if world > 1 else n_local
    total, n_tokens = 0.0, 0
    for k, batch in enumerate(micro):
        is_accumulating = k < len(micro) - 1  # DDP: all-reduce gradients only on the last micro-batch
        batch = {key: v.to(accelerator.device) for key, v in batch.items()}
        with accelerator.no_sync(model) if is_accumulating and not deepspeed else nullcontext():
            with accelerator.autocast():  # the forward is autocast already; this covers the chunked loss
                loss_sum, _ = forward_loss(model, batch, head, chunk)
            scaled = loss_sum * world / max(n_targets, 1)  # DDP and DeepSpeed average over processes
            if deepspeed:
                deepspeed.backward(scaled, sync_gradients=not is_accumulating)
            else:
                accelerator.backward(scaled)
        total += float(loss_sum.detach())
        n_tokens += int(batch["n_tokens"])
    if world > 1:
        total, n_tokens = _all_sum(accelerator, torch.tensor([total, n_tokens], dtype=torch.float64)).tolist()
    return total, n_targets, int(n_tokens)


def _all_sum(accelerator, values: torch.Tensor) -> torch.Tensor:
    """Sum a small float64 tensor over processes (gloo on CPU, nccl on GPU)."""
    return accelerator.reduce(values.to(accelerator.device), reduction="sum").cpu()


def make_batch(
    rows: list[list[int]], windows: list[list[int]], pad_id: int, masks: list[list[int]] | None = None
) -> dict[str, torch.Tensor]:
    """`collate` of the rows' windows, plus `n_tokens`: the real (non-pad) tokens in the batch. With `masks`
    (instruction and chat records), `collate_masked`: labels -100 where a window's mask is 0 (the prompt)."""
    if masks is None:
        batch = collate([[windows[i] for i in row] for row in rows], pad_id)
    else:
        batch = collate_masked([[(windows[i], masks[i]) for i in row] for row in rows], pad_id)
    batch["n_tokens"] = torch.tensor(sum(len(windows[i]) for row in rows for i in row))
    return batch


@torch.no_grad()
def evaluate(
    model,
    batches: list[dict[str, torch.Tensor]],
    device,
    head=None,
    chunk: int = 0,
    accelerator=None,
    lockstep: bool = False,
) -> tuple[float, float]:
    """Token-weighted mean loss and perplexity over all of `batches` (with several processes, each scores
    its share of them and the sums are all-reduced). `lockstep` (FSDP, where every forward is collective):
    all processes run the same number of forwards, a process out of batches repeating one and not counting it."""
    world, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # loss, targets
    mine = batches[rank::world]
    for i in range(math.ceil(len(batches) / world) if lockstep else len(mine)):
        batch = mine[i] if i < len(mine) else batches[0]
        with accelerator.autocast() if accelerator else nullcontext():  # as in training (the chunked loss too)
            loss_sum, n = forward_loss(model, {k: v.to(device) for k, v in batch.items()}, head, chunk)
        if i < len(mine):
            sums += torch.stack([loss_sum.double().cpu(), n.double().cpu()])
    model.train(was_training)
    if world > 1:
        sums = _all_sum(accelerator, sums)
    mean = float(sums[0]) / max(1.0, float(sums[1]))
    return mean, math.exp(min(mean, 50.0))


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


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def method_name(cfg: TrainConfig) -> str:
    """E.g. "QLoRA (4-bit NF4 base + LoRA, bf16)", "16-bit LoRA (fp16)", "full fine-tuning (32-bit)"."""
    precision = precision_policy(cfg.model.compute_dtype, default_device())
    if cfg.model.qlora:
        return f"QLoRA (4-bit NF4 base + LoRA, {precision.name})"
    if precision.autocast_dtype is None:
        return "32-bit LoRA" if cfg.model.lora else "full fine-tuning (32-bit)"
    return f"16-bit LoRA ({precision.name})" if cfg.model.lora else f"full fine-tuning ({precision.name} autocast)"


def _check_compatible(saved: TrainConfig, cfg: TrainConfig, path: Path, saved_world: int = 1, world: int = 1):
    """Refuse to resume a checkpoint into a differently shaped model, or onto a different data plan (packing is
    checked by `_check_packing` once the model's packing probe has settled it).

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
        "template": (saved.data.template, cfg.data.template),
        "train_on_prompt": (saved.data.train_on_prompt, cfg.data.train_on_prompt),
        "grad_accum_steps": (saved.optim.grad_accum_steps, cfg.optim.grad_accum_steps),
    }
    diff = [f"--{k} {a} (this run: {b})" for k, (a, b) in fields.items() if a != b]
    if saved.data.batch_size * saved_world != cfg.data.batch_size * world:
        diff.append(f"--batch-size {saved.data.batch_size} on {saved_world} process(es) "
                    f"(this run: {cfg.data.batch_size} on {world})")  # fmt: skip
    if diff:
        raise UserError(f"checkpoint {path} was trained with {'; '.join(diff)}: use the same settings to resume")


def _check_packing(saved: TrainConfig, cfg: TrainConfig, path: Path) -> None:
    """Packing as the checkpoint trained (after its probe) against packing as this run will train (after its)."""
    if saved.data.packing != cfg.data.packing:
        raise UserError(f"checkpoint {path} was trained with --packing {saved.data.packing} (this run: "
                        f"{cfg.data.packing}): use the same settings to resume")  # fmt: skip


class StopRequest:
    """SIGINT/SIGTERM during training: the first one lets the current optimizer step finish, after which the
    loop saves a checkpoint and stops (exit status 130/143); a second one exits at once (checkpoints are
    written atomically, so that cannot damage one)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        log.warning("%s: finishing this step, then saving a checkpoint (again to stop at once)",
                    signal.Signals(signum).name)  # fmt: skip

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainResult:
    model: Any  # the trained model (a PeftModel for QLoRA), unwrapped from accelerate
    summary: dict[str, Any]  # also written to <output_dir>/train_summary.json


def train(cfg: TrainConfig) -> TrainResult:
    """Fine-tune `cfg.model.model` on `cfg.data.data`, checkpointing and sampling as configured."""
    from accelerate.utils import set_seed

    cfg = copy.deepcopy(cfg)  # the probes below may switch settings off; the caller's config stays as given
    if cfg.data.data is None:
        raise UserError("--data is required")
    cfg.model.model = resolve_base_name(cfg.model.model)
    out_dir, check_dir = Path(cfg.ckpt.output_dir), Path(cfg.ckpt.check_dir)

    # --- resume point: read before touching anything, so bad input fails fast -----------------------
    resume = None
    if cfg.ckpt.restore_file:
        path = checkpoint.resolve_checkpoint(check_dir, cfg.ckpt.restore_file)
        meta, tensors, saved_cfg, saved_split = checkpoint.load_checkpoint(path)
        saved = train_config_from_dict(saved_cfg)  # checked against this run once its mode defaults are set
        checkpoint.resume_point(path, meta)  # a checkpoint this version cannot resume: say so now
        resume = (path, meta, tensors, saved_split, saved)
    else:  # a fresh run: into empty folders, or --overwrite; checked before anything is written
        checkpoint.check_fresh_folders({"--output-dir": out_dir, "--check-dir": check_dir}, cfg.ckpt.overwrite)

    # --- data: paragraphs -> windows, or records -> template -> ids + loss masks; split; mode defaults --------
    tokenizer = load_tokenizer(cfg.model.model)
    data = prepare_data(cfg, tokenizer, resume[3] if resume else None)
    apply_mode_defaults(cfg, data.mode)  # unset per-mode options (--lr, --rank-lora, ...) take the mode's default
    if resume:
        _check_compatible(resume[4], cfg, path, meta.get("world_size", 1), world_size())
    split, train_windows, val_windows = data.split, data.train.ids, data.validation.ids
    sample_prompts = data.sample_prompts(tokenizer) or cfg.sample.sample_prompts
    # the model's context, from its config (no weights yet): sequences or samples past it fail now, not mid-run
    check_training_context(cfg.model.model, cfg.data.max_input_length, tokenizer if cfg.sample.sample_every else None,
                           cfg.sample.sample_prompts, cfg.sample.max_output_length)  # fmt: skip
    pad_id = tokenizer.pad_token_id

    # --- accelerator, model, optimizer ----------------------------------------------------------------
    precision = precision_policy(cfg.model.compute_dtype, default_device())
    dtype = precision.dtype
    # cpu=True without CUDA: several CPU processes (torchrun) then train data-parallel over gloo
    accelerator = make_accelerator(out_dir, precision.accelerate_name)
    world, rank = accelerator.num_processes, accelerator.process_index
    device = accelerator.device
    engine = check_engine(accelerator, cfg)  # FSDP, DEEPSPEED or None (one process, DDP)
    fsdp = engine == FSDP
    set_seed(cfg.data.seed)  # the same initial adapter on every process (FSDP keeps each one's own shard of it)
    # FSDP shards only floating tensors of one dtype: the packed 4-bit bytes are stored in the compute dtype
    # full fine-tuning trains every weight: float32 masters (a LoRA base is frozen and may stay 16-bit)
    model = load_base(cfg.model.model, cfg.model.qlora, dtype, device, dtype if fsdp else torch.uint8,
                      weights_dtype=None if cfg.model.lora else torch.float32)  # fmt: skip
    model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.qlora:
        keep_training_layout(model)
    if cfg.model.lora:
        model = add_lora(model, cfg.model)
    set_seed(cfg.data.seed, device_specific=True)  # seed + rank: each process its own dropout masks
    if cfg.data.packing and not _autocast(accelerator, packing_is_isolated, model, device):
        log.warning("this model attends across packed paragraphs; training with padded batches instead")
        cfg.data.packing = False
    scaling = "dynamic (fp16 GradScaler)" if precision.use_scaler else "none"
    packing = "on" if cfg.data.packing else "off"
    log.info("setup: device %s, compute dtype %s, loss scaling %s, %s, packing %s", device,
             str(dtype).removeprefix("torch."), scaling, method_name(cfg), packing)  # fmt: skip
    if fsdp and cfg.model.loss_chunk:  # the chunked loss reads the output layer's weight outside the forward,
        log.info("FSDP: computing full logits (--loss-chunk off)")  # where FSDP holds only this process's shard
        cfg.model.loss_chunk = 0
    head = _autocast(accelerator, output_layer, model, device) if cfg.model.loss_chunk else None
    if cfg.model.loss_chunk and head is None:
        log.warning("this model's output layer cannot be chunked; computing full logits (--loss-chunk ignored)")
    trainable, total = count_parameters(model)
    log.info("parameters: %s trainable of %s (%.2f%%), %s; %s", f"{trainable:,}", f"{total:,}",
             100 * trainable / total, method_name(cfg), precision.describe())  # fmt: skip
    params = [p for _, p in trained_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)

    # --- the plan: micro-batches per epoch, a pure function of (seed, epoch) -----------------------------
    lengths = [len(w) for w in train_windows]

    @functools.lru_cache(maxsize=2)
    def plan(epoch: int) -> list[list[list[int]]]:
        """Global batches of `--batch-size` x processes rows; process r trains on rows r, r + world, ..."""
        rows = epoch_rows(lengths, cfg.data.max_input_length, cfg.data.packing, cfg.data.seed, epoch)
        batches = epoch_batches(rows, lengths, cfg.data.batch_size * world, not cfg.data.packing, cfg.data.seed, epoch)
        return [b for b in batches if len(b) >= world]  # every process needs a row (drops at most one batch)

    def steps_in(epoch: int) -> int:
        return math.ceil(len(plan(epoch)) / cfg.optim.grad_accum_steps)

    total_steps = cfg.optim.max_steps or sum(steps_in(e) for e in range(cfg.optim.epochs))
    cfg.optim.warmup_steps = warmup_steps_for(cfg, data.mode, total_steps)
    if cfg.optim.warmup_steps >= total_steps:  # lr_at then never reaches its decay
        last_lr, peak = lr_at(total_steps - 1, cfg.optim.lr, cfg.optim.warmup_steps, total_steps), cfg.optim.lr
        log.warning("--warmup-steps %d >= the run's %d steps: the learning rate only warms up, to %.3g of %.3g at "
                    "the last step, and never decays", cfg.optim.warmup_steps, total_steps, last_lr, peak)  # fmt: skip
    val_batches = [make_batch(rows, val_windows, pad_id, data.validation.masks) for rows in
                   eval_batches([len(w) for w in val_windows], cfg.data.max_input_length, cfg.data.packing,
                                cfg.data.batch_size * 2)]  # fmt: skip
    step, epoch, position, tokens_seen = 0, 0, 0, 0
    initial_val_loss = None
    if resume:
        path, meta, tensors, _, saved = resume
        _check_packing(saved, cfg, path)
        checkpoint.load_model_weights(model, path)  # (the optimizer state after `prepare`, below)
        # one row per process (older checkpoints: a single state); cloned, as set_rng_state reads a row's
        # storage from its start, ignoring the view's offset (rank 1 would get an invalid state)
        rng_cpu = tensors["rng_cpu"]
        torch.set_rng_state((rng_cpu[rank] if rng_cpu.dim() == 2 else rng_cpu).clone())
        if device.type == "cuda" and "rng_cuda" in tensors:
            rng_cuda = tensors["rng_cuda"]
            torch.cuda.set_rng_state((rng_cuda[rank] if rng_cuda.dim() == 2 else rng_cuda).clone(), device)
        (epoch, position), step, tokens_seen = checkpoint.resume_point(path, meta), meta["step"], meta["tokens"]
        initial_val_loss = meta.get("initial_val_loss")
        log.info("resumed from %s: step %d, epoch %d, %d of %d micro-batches done", path, step, epoch + 1, position,
                 len(plan(epoch)))  # fmt: skip
        if position >= len(plan(epoch)):
            epoch, position = epoch + 1, 0
        if meta.get("total_steps") != total_steps:
            log.warning("schedule length changed from %s to %d steps", meta.get("total_steps"), total_steps)
    masters = fp32_masters(model) if engine == DEEPSPEED else None  # before it casts the model to 16 bits
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for _, p in trained_parameters(model)]  # FSDP replaces them with sharded ones
    if fsdp:
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "generate")  # gathers the outer weights (embeddings) for samples
    if masters:
        set_fp32_masters(model, masters)
    if resume:  # under FSDP and DeepSpeed, into each process's shard
        restore_optimizer(engine, model, optimizer, resume[2]["optimizer"])
        if accelerator.scaler is not None and "scaler" in resume[2]:
            accelerator.scaler.load_state_dict(resume[2]["scaler"])
    if accelerator.is_main_process:
        start_run_folders(out_dir, check_dir, cfg, step if resume else None)
    # one TensorBoard run, <output-dir>/tb, continued on resume: events past the checkpoint's step are purged
    accelerator.init_trackers("tb", init_kwargs={"tensorboard": {"purge_step": step + 1}} if resume else None)
    if accelerator.is_main_process and not resume:
        _write_hparams(accelerator.get_tracker("tensorboard", unwrap=True), _flat(cfg))

    def save(name: str) -> Path:
        nonlocal last_saved_step
        last_saved_step = step
        path = check_dir / name
        rng = {"rng_cpu": _gather_rows(accelerator, torch.get_rng_state())}  # every process's RNG, for dropout
        if device.type == "cuda":
            rng["rng_cuda"] = _gather_rows(accelerator, torch.cuda.get_rng_state(device))
        # under FSDP and DeepSpeed, gathering the full weights and optimizer state takes every process
        weights = gathered_weights(engine, accelerator, model)
        optim_state = gathered_optimizer_state(engine, model, optimizer)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return path
        meta = {"step": step, **checkpoint.position_meta(epoch, position, len(plan(epoch))), "tokens": tokens_seen,
                "world_size": world, "total_steps": total_steps, "initial_val_loss": initial_val_loss,
                "val_loss": None if math.isnan(val_loss) else val_loss}  # fmt: skip
        tensors = {"optimizer": optim_state, **rng}
        if accelerator.scaler is not None:  # fp16: the loss scale and its growth counter, for an exact resume
            tensors["scaler"] = accelerator.scaler.state_dict()
        unwrapped = accelerator.unwrap_model(model)
        path = checkpoint.save_checkpoint(check_dir, name, unwrapped, meta, tensors, data.run_config(cfg),
                                          split.to_json(), state_dict=weights)  # fmt: skip
        log.info("saved checkpoint %s", path)
        for old in checkpoint.prune_checkpoints(check_dir, cfg.ckpt.keep_checkpoints):
            log.info("deleted checkpoint %s (--keep-checkpoints %d)", check_dir / old, cfg.ckpt.keep_checkpoints)
        return path

    def record(row: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            accelerator.log({k: v for k, v in row.items() if k not in ("step", "epoch")}, step=row["step"])

    def validate() -> tuple[float, float]:
        val_loss, val_ppl = evaluate(model, val_batches, device, head, cfg.model.loss_chunk, accelerator, fsdp)
        record({"step": step, "epoch": epoch + 1, "val_loss": val_loss, "val_perplexity": val_ppl})
        log.info("step %d | validation loss %.4f | perplexity %.2f", step, val_loss, val_ppl)
        return val_loss, val_ppl

    def write_samples() -> None:
        if not (accelerator.is_main_process or fsdp):  # FSDP: all generate the same texts, in lockstep
            return
        prompts = sample_prompts  # instruction/chat: a few validation prompts, through the template
        with accelerator.autocast():
            texts = sample(accelerator.unwrap_model(model), tokenizer, prompts, cfg.sample,
                           cfg.sample.max_output_length, seed=cfg.data.seed + step, truncate=True)  # fmt: skip
        if not accelerator.is_main_process:
            return
        with open(out_dir / "samples.jsonl", "a", encoding="utf-8") as f:
            for prompt, (text,) in zip(prompts, texts, strict=True):
                f.write(json.dumps({"step": step, "prompt": prompt, "text": text}) + "\n")
                tqdm.write(f"[sample @ step {step}] {text}")

    # --- the loop -------------------------------------------------------------------------------------
    model.train()
    val_loss = val_ppl = float("nan")
    last_saved_step = step
    if not resume:
        initial_val_loss, _ = validate()  # the base model's loss on the same split: what fine-tuning improves on
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)  # fmt: skip
    t_start, tokens_start = time.perf_counter(), tokens_seen
    window_loss, window_targets = 0.0, 0
    with StopRequest() as stop:  # SIGINT/SIGTERM: finish the step, save, stop

        def stopping() -> bool:  # with several processes: all stop at the same step if any got a signal
            if world > 1:
                signum = int(_gather_rows(accelerator, torch.tensor([stop.signum or 0])).max())
                stop.signum = stop.signum or signum or None
            return stop.signum is not None

        while step < total_steps and not stopping():
            batches = plan(epoch)
            while position < len(batches) and step < total_steps and not stopping():
                group = batches[position : position + cfg.optim.grad_accum_steps]
                micro = [make_batch(rows[rank::world], train_windows, pad_id, data.train.masks) for rows in group]
                lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, total_steps)
                for group_ in optimizer.param_groups:  # set first: DeepSpeed steps inside the last backward
                    group_["lr"] = lr
                loss_sum, n_targets, n_tokens = accumulate_gradients(
                    model, micro, accelerator, head, cfg.model.loss_chunk
                )
                window_loss += loss_sum
                tokens_seen += n_tokens
                window_targets += n_targets
                if not math.isfinite(window_loss):  # stop before saving: the last checkpoint stays the last good one
                    raise UserError(
                        f"the loss became non-finite at step {step + 1}; try a lower --lr (now {cfg.optim.lr})"
                    )
                if cfg.optim.max_grad_norm > 0:  # (DeepSpeed clips in its step, by the same rule)
                    accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                optimizer.step()  # (DeepSpeed: accelerate makes this and zero_grad no-ops)
                optimizer.zero_grad(set_to_none=True)
                step += 1
                position += len(group)

                # --- log, validate, sample, save ----------------------------------------------------------
                elapsed = time.perf_counter() - t_start
                tokens_per_second = (tokens_seen - tokens_start) / max(elapsed, 1e-9)
                if step % cfg.ckpt.log_every == 0 or step == total_steps:
                    loss = window_loss / max(1, window_targets)
                    record({"step": step, "epoch": epoch + 1, "loss": loss, "lr": lr, "tokens": tokens_seen,
                            "tokens_per_second": tokens_per_second})  # fmt: skip
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:,.0f}")
                    window_loss, window_targets = 0.0, 0
                bar.update(1)
                if cfg.ckpt.eval_every and step % cfg.ckpt.eval_every == 0:
                    val_loss, val_ppl = validate()
                if cfg.sample.sample_every and step % cfg.sample.sample_every == 0:
                    write_samples()
                if cfg.ckpt.save_every_steps and step % cfg.ckpt.save_every_steps == 0:
                    save(checkpoint.step_name(step))
            if position >= len(batches):  # end of epoch
                if not (cfg.ckpt.eval_every and step % cfg.ckpt.eval_every == 0):
                    val_loss, val_ppl = validate()
                if cfg.ckpt.save_interval and (epoch + 1) % cfg.ckpt.save_interval == 0:
                    save(checkpoint.epoch_name(epoch + 1))
                epoch, position = epoch + 1, 0
    bar.close()
    train_seconds = time.perf_counter() - t_start
    if stop.signum:  # a signal: keep what was done and stop
        path = (
            save(checkpoint.step_name(step))
            if last_saved_step != step
            else checkpoint.resolve_checkpoint(check_dir, checkpoint.LATEST)
        )
        _finish(accelerator)
        name = signal.Signals(stop.signum).name
        raise Interrupted(f"stopped by {name} after step {step}; checkpoint {path} saved; "
                          "resume with the same command plus --load-checkpoint True", 128 + stop.signum)  # fmt: skip

    # --- the end: final validation, checkpoint, adapter, summary -------------------------------------
    if cfg.sample.sample_every and step % cfg.sample.sample_every:  # a run shorter than --sample-every shows samples
        write_samples()
    if math.isnan(val_loss):
        val_loss, val_ppl = validate()
    if last_saved_step != step:
        save(checkpoint.step_name(step))
    summary: dict[str, Any] = {}
    weights = gathered_weights(engine, accelerator, model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(out_dir, safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(out_dir)
        follow_umask(out_dir.glob("*.safetensors"))  # safetensors writes 0600; the folder is meant to be shared
        checkpoint.write_run_config(out_dir, data.run_config(cfg))
        summary = {
            "method": method_name(cfg),
            "train_tokens": tokens_seen - tokens_start,
            "train_tokens_total": tokens_seen,
            "train_seconds": train_seconds,
            "tokens_per_second": (tokens_seen - tokens_start) / max(train_seconds, 1e-9),
            "initial_val_loss": initial_val_loss,
            "final_val_loss": val_loss,
            "final_val_perplexity": val_ppl,
            "peak_memory_bytes": peak_memory_bytes(device),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "steps": step,
            "epochs": epoch + position / max(1, len(plan(epoch))),
            "trainable_parameters": trainable,
            "total_parameters": total,
        }
        checkpoint.write_json(out_dir / "train_summary.json", summary)
        try:
            write_report(out_dir, out_dir)
        except Exception as e:  # plotting must not cost a finished run its exit status; the adapter is saved
            log.warning("could not write report.md: %s", e)
        log.info("done: %d steps, validation loss %.4f, perplexity %.2f; %s in %s", step, val_loss, val_ppl,
                 "adapter" if cfg.model.lora else "model", out_dir)  # fmt: skip
    _finish(accelerator)
    return TrainResult(accelerator.unwrap_model(model), summary)


def make_accelerator(out_dir: Path, precision: str):
    """The Accelerator: its engine (DDP, FSDP, DeepSpeed) comes from `accelerate launch --config_file`; cpu=True without
    CUDA, so that several CPU processes (torchrun) train data-parallel over gloo."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state = AcceleratorState._shared_state  # a process-wide singleton that refuses a second precision
    if world_size() == 1 and state and state.get("_mixed_precision") != precision:
        AcceleratorState._reset_state()  # a second run in this process (a notebook, tests): its own precision
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=precision, log_with="tensorboard", project_dir=str(out_dir)
    )
    cpu_engines = (DistributedType.NO, DistributedType.MULTI_CPU)
    if precision == "fp16" and accelerator.device.type == "cpu" and accelerator.distributed_type in cpu_engines:
        # accelerate runs fp16 on CPU with neither autocast nor a loss scaler (it silently trains in float32),
        # though torch has both for CPU: switch on accelerate's own fp16 path (autocast around the forward,
        # scaled backward, unscale before clipping, scaler.step/update in optimizer.step) with a CPU scaler
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator


def _autocast(accelerator, fn, *args):
    """`fn(*args)` under the run's autocast: for the probes that run before `prepare` wraps the forward."""
    with accelerator.autocast():
        return fn(*args)


def _finish(accelerator) -> None:
    accelerator.end_training()
    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # else gloo aborts the process at exit


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _gather_rows(accelerator, state: torch.Tensor) -> torch.Tensor:
    """(processes, n) from each process's 1-D state tensor (RNG states have a fixed size)."""
    if accelerator.num_processes == 1:
        return state[None]
    return accelerator.gather(state[None].to(accelerator.device)).cpu()


def start_run_folders(out_dir: Path, check_dir: Path, cfg: TrainConfig, resume_step: int | None) -> None:
    """Ready the output and checkpoint folders (main process): a fresh run with --overwrite first removes what
    qlora-ft wrote there; a resumed one drops the metrics/samples rows logged after its checkpoint."""
    if resume_step is None and cfg.ckpt.overwrite:
        for folder in dict.fromkeys((out_dir, check_dir)):
            removed = checkpoint.clear_run_folder(folder)
            if removed:
                log.info("--overwrite: removed %s from %s", ", ".join(removed), folder)
    for folder in (out_dir, out_dir / "tb", check_dir):
        checkpoint.make_run_folder(folder)
    if resume_step is not None:
        for name in ("metrics.jsonl", "samples.jsonl"):
            _keep_rows_up_to(out_dir / name, resume_step)
    keep = cfg.ckpt.keep_checkpoints
    log.info("checkpoints go to %s (%s)", check_dir,
             f"keeping the newest {keep} and the best" if keep else "keeping all")  # fmt: skip


def _write_hparams(writer, flat: dict[str, Any]) -> None:
    """The hyperparameters into the run's own events file: accelerate's store_init_configuration (and
    SummaryWriter.add_hparams) would start a new time-named run folder at each launch."""
    from torch.utils.tensorboard.summary import hparams

    for summary in hparams(flat, {}):
        writer.file_writer.add_summary(summary)
    writer.flush()


def _keep_rows_up_to(path: Path, step: int) -> None:
    """Drop the rows of a metrics/samples .jsonl whose step is past `step` (a resumed run's checkpoint)."""
    if not path.exists():
        return
    rows = path.read_text(encoding="utf-8", errors="replace").splitlines()

    def keep(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except (ValueError, AttributeError):  # a line cut short when the process was killed
            return False

    kept = [line for line in rows if keep(line)]
    if len(kept) != len(rows):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)


def _flat(cfg: TrainConfig) -> dict[str, Any]:
    """Hyperparameters for TensorBoard (scalars only)."""
    flat = {}
    for group in asdict(cfg).values():
        for k, v in group.items():
            flat[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat
