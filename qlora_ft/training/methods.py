"""The optimizer and the training-only additions that peft and transformers provide: LoRA+ parameter groups
(peft) and NEFTune's embedding noise (transformers). DoRA and rsLoRA are LoRA settings (`model.add_lora`)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from qlora_ft.config import TrainConfig
from qlora_ft.errors import UserError
from qlora_ft.sharded_state import trained_parameters

log = logging.getLogger(__name__)


def make_optimizer(cfg: TrainConfig, model) -> torch.optim.Optimizer:
    """AdamW over the trained parameters; with --loraplus-ratio, in peft's LoRA+ groups (the B matrices, and
    any 1-D LoRA weight such as DoRA's magnitudes, at ratio x --lr). Each group carries its `lr_ratio`, the
    multiple of the schedule's rate it trains at (`set_learning_rate`), saved with the optimizer's state."""
    o = cfg.optim
    if not o.loraplus_ratio:
        params = [p for _, p in trained_parameters(model)]
        return torch.optim.AdamW(params, lr=o.lr, eps=o.eps, weight_decay=o.weight_decay)
    from peft.optimizers import create_loraplus_optimizer

    def adamw(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
        # peft also lists empty groups (LoRA on embeddings, weights without decay); an engine needs none of them
        return torch.optim.AdamW([{**g, "lr_ratio": g["lr"] / o.lr} for g in groups if g["params"]], **kwargs)

    optimizer = create_loraplus_optimizer(model, adamw, lr=o.lr, loraplus_lr_ratio=o.loraplus_ratio, eps=o.eps,
                                          loraplus_weight_decay=o.weight_decay)  # fmt: skip
    log.info("LoRA+: %s", ", ".join(f"{len(g['params'])} tensors at {g['lr_ratio']:g} x --lr"
                                    for g in optimizer.param_groups))  # fmt: skip
    return optimizer


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate `lr` for this step, times each group's `lr_ratio` (LoRA+), so that the ratio holds at
    every step of warmup and decay (and after a resume: the ratio is part of the saved optimizer state)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)


def add_neftune(model, alpha: float):
    """NEFTune (transformers' hook): uniform noise in [-m, m] on the token embeddings, m = alpha / sqrt(T x d),
    added only while the embedding layer is in training mode, so never at validation, sampling or inference
    (all run in eval mode) and never saved with the weights. Returns the hook's handle (None when off).

    T is the row's length as the model sees it: in a packed row, the whole row (--max-input-length tokens, or
    the longest row of the batch), not each paragraph in it. The hook sees only the embeddings tensor, and a
    packed row is one sequence to it; so with packing every token gets the same noise scale, that of a
    --max-input-length-token sequence, which is smaller than the paper's per-example scale for a short
    paragraph (by sqrt(row length / paragraph length)). A larger --neftune-alpha makes up for it.
    The noise draws from the global RNG, whose state checkpoints keep: a resumed run draws the same noise."""
    if not alpha:
        return None
    try:
        from transformers.integrations.neftune import activate_neftune
    except ImportError:  # an older transformers 5 release
        import transformers

        raise UserError(
            f"--neftune-alpha needs transformers' NEFTune hook (transformers.integrations.neftune), "
            f"which transformers {transformers.__version__} lacks: upgrade transformers"
        ) from None

    return activate_neftune(model, alpha)
