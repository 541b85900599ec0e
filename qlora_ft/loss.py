"""Next-token cross-entropy without materialising the full logits tensor.

For GPT-2 the largest activation in training is the logits: tokens x 50,257 x 4 bytes, plus its gradient
(8 x 1024 tokens: 1.65 GB each), far more than the 4-bit weights. `linear_cross_entropy` projects the final
hidden states through the output layer a chunk of tokens at a time and, in the same pass, computes the
gradient with respect to the hidden states (and the output weight, when it trains), so at most one chunk of
logits exists at any moment and nothing is recomputed in backward.

Written here because no maintained library does this on every device: Liger-Kernel's fused linear
cross-entropy is Triton (CUDA) only, and torch has no fused linear + cross-entropy op.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

_cpu_buffer: dict[str, torch.Tensor] = {}


def _logits_t(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits of a chunk, vocabulary first: (V, C), float32.

    On CPU this layout runs the (V, d) @ (d, C) product about twice as fast as (C, d) @ (d, V), and the
    result goes into one reused buffer: a fresh ~200 MB tensor per chunk costs page faults every step.
    """
    if h.device.type == "cpu" and h.dtype == weight.dtype == torch.float32:
        need = weight.shape[0] * h.shape[0]
        buf = _cpu_buffer.get("logits")
        if buf is None or buf.numel() < need:
            buf = _cpu_buffer["logits"] = torch.empty(need, dtype=torch.float32)
        return torch.mm(weight, h.t(), out=buf[:need].view(weight.shape[0], h.shape[0]))
    return (weight @ h.t()).float()


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and d(loss)/d(logits) for one chunk: h (C, d), weight (V, d), t (C,) -> (), (V, C)."""
    logits = _logits_t(h, weight)  # (V, C)
    target_logit = logits.gather(0, t[None, :])  # (1, C)
    # softmax in place (the chunk is the largest tensor here; every extra copy costs a pass over memory)
    top = logits.amax(dim=0, keepdim=True)  # (1, C)
    probs = logits.sub_(top).exp_()
    total = probs.sum(dim=0, keepdim=True)  # (1, C)
    loss = (top + total.log() - target_logit).sum()  # sum of logsumexp - target logit
    grad = probs.div_(total)
    grad[t, torch.arange(t.numel(), device=t.device)] -= 1.0
    return loss, grad


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):  # hidden (N, d), weight (V, d), targets (N,)
        need_weight_grad = ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            loss, grad = _chunk_loss(h, weight, t)  # grad (V, C)
            total += loss
            grad = grad.to(h.dtype)
            grad_hidden[start : start + chunk] = grad.t() @ weight.to(h.dtype)  # (C, d)
            if grad_weight is not None:
                grad_weight += (grad @ h).float()  # (V, d)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_w = (grad_weight * grad_output).to(grad_weight.dtype) if grad_weight is not None else None
        return grad_hidden * grad_output.to(grad_hidden.dtype), grad_w, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), computed `chunk` rows at a time.

    hidden (N, d), weight (V, d), targets (N,) with every target a real token id (select rows first).
    Equal to `F.cross_entropy(hidden @ weight.T, targets, reduction="sum")`, gradients included.
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        logits = _logits_t(hidden[start : start + chunk], weight)  # (V, C)
        total += F.cross_entropy(logits.t(), targets[start : start + chunk], reduction="sum")
    return total


# ----------------------------------------------------------------------------------------------------------
# The training loss of a causal LM: from a batch (input_ids, labels with -100 where nothing is trained) to the
# summed next-token loss, through the chunked output layer where the model allows it.


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy, number of target tokens); positions labelled -100 do not count.

    logits (B, T, V), labels (B, T): position t predicts labels[t + 1].
    """
    targets = labels[:, 1:]  # (B, T-1)
    loss_sum = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
    )  # fp32 under autocast
    return loss_sum, (targets != -100).sum()


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


@torch.no_grad()
def output_layer(model, device=None):
    """The output projection when the chunked loss can stand in for it, else None (full logits are made).

    It must be a bias-free Linear fed by the model's last hidden state, with nothing after it (some models
    scale or soft-cap their logits): a two-row probe compares the chunked loss with the plain one.
    """
    from qlora_ft.data import collate

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
    return head if torch.allclose(plain.float(), chunked.float(), rtol=1e-3, atol=1e-3) else None


def accumulate_gradients(model, micro: list[dict[str, torch.Tensor]], engine, head=None, chunk: int = 0):
    """Forward and backward over the micro-batches of one optimizer step, on `engine` (qlora_ft.engines.Engine).

    Each micro-batch's summed token loss is divided by the target tokens of the *whole step* on all
    processes, so the accumulated (and, with several processes, all-reduced) gradient equals that of one
    batch holding all of them (padding never counts). Returns (summed loss, target tokens, real input
    tokens), summed over processes. Under DeepSpeed the engine also takes the optimizer step (clipping,
    update, zeroing) at the end of the last backward, which this function marks as the step's boundary.
    """
    n_local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    n_targets = int(engine.all_sum(torch.tensor([n_local], dtype=torch.float64))[0])
    total, n_tokens = 0.0, 0
    for k, batch in enumerate(micro):
        is_accumulating = k < len(micro) - 1  # DDP, FSDP: all-reduce gradients only on the last micro-batch
        batch = {key: v.to(engine.device) for key, v in batch.items()}
        with engine.no_sync(model) if is_accumulating else nullcontext():
            loss_sum, _ = forward_loss(model, batch, head, chunk)
            scaled = loss_sum * engine.world / max(n_targets, 1)  # DDP and DeepSpeed average over processes
            engine.backward(scaled, last_in_step=not is_accumulating)
        total += float(loss_sum.detach())
        n_tokens += int(batch["n_tokens"])
    total, n_tokens = engine.all_sum(torch.tensor([total, n_tokens], dtype=torch.float64)).tolist()
    return total, n_targets, int(n_tokens)
