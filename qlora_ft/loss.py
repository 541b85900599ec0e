"""Next-token cross-entropy without materialising the full logits tensor.

For GPT-2 the largest activation in training is the logits: tokens x 50,257 x 4 bytes, plus its gradient
(8 x 1024 tokens: 1.65 GB each), far more than the 4-bit weights. `linear_cross_entropy` projects the final
hidden states through the output layer a chunk of tokens at a time and, in the same pass, computes the
gradient with respect to the hidden states (and the output weight, when it trains), so at most one chunk of
logits exists at any moment and nothing is recomputed in backward.

Written here because no maintained library did this on every device: Liger-Kernel's fused linear
cross-entropy is Triton (CUDA) only, and torch gained `F.linear_cross_entropy` (chunked) only in 2.13; where
that exists and measured faster (bench/loss_bench.py, docs/benchmarks-loss.md) it is used instead.

Precision: the matmuls run in the autocast dtype when autocast is on (the loss is computed outside the
model's autocast-wrapped forward), logits are converted to float32 per chunk for the softmax, and the loss
and the output weight's gradient accumulate in float32.
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
    def forward(ctx, hidden, weight, targets, chunk, dtype):  # hidden (N, d), weight (V, d), targets (N,)
        # the casts happen in here so that the output weight's gradient accumulates in float32 for a float32
        # weight (a cast outside would round it to `dtype` on the way back)
        need_weight_grad = ctx.needs_input_grad[1]
        ctx.dtypes = hidden.dtype, weight.dtype
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            loss, grad = _chunk_loss(h, weight, t)  # grad (V, C)
            total += loss
            grad = grad.to(h.dtype)
            grad_hidden[start : start + chunk] = grad.t() @ weight  # (C, d)
            if grad_weight is not None:
                grad_weight += (grad @ h).float()  # (V, d)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_w = (grad_weight * grad_output).to(weight_dtype) if grad_weight is not None else None
        # scaled in float32: in 16 bits the factor (fp16: loss scale / tokens) would be rounded
        return (grad_hidden.float() * grad_output).to(hidden_dtype), grad_w, None, None, None


def compute_dtype_for(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the output layer's matmuls run in: autocast's, where it is on for this device (the loss is
    computed outside the model's forward, so it would otherwise run in float32), else the inputs' own."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _torch_linear_cross_entropy():
    """torch's fused chunked op (torch >= 2.13), else None."""
    fn = getattr(F, "linear_cross_entropy", None)
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    return (fn, options) if fn is not None and options is not None else None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024, use_torch: bool | None = None
) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), computed `chunk` rows at a time; float32.

    hidden (N, d), weight (V, d), targets (N,) with every target a real token id (select rows first).
    Equal to `F.cross_entropy(hidden @ weight.T, targets, reduction="sum")`, gradients included, with the
    matmuls in the autocast dtype when autocast is on (as the model's own output layer would run) and the
    softmax and the loss accumulated in float32. `use_torch` (None: where it is the faster, see
    docs/benchmarks-loss.md) picks torch's `F.linear_cross_entropy` over the implementation here.
    """
    if hidden.shape[0] == 0:
        return hidden.float().sum() * 0.0
    dtype = compute_dtype_for(hidden, weight)
    fused = _torch_linear_cross_entropy()
    if use_torch is None:
        use_torch = _torch_wins(hidden.device, dtype)
    with torch.autocast(hidden.device.type, enabled=False):  # the casts are explicit; autocast would redo them
        if use_torch and fused is not None:
            return _torch_sum(*fused, hidden.to(dtype), weight.to(dtype), targets, chunk)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, dtype)
        h, w = hidden.to(dtype), weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            logits = _logits_t(h[start : start + chunk], w)  # (V, C), float32
            total += F.cross_entropy(logits.t(), targets[start : start + chunk], reduction="sum")
        return total


def _torch_sum(fn, options, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """torch's op, summed in float32 over calls of at most 1024 rows: it returns the sum in the input dtype,
    which fp16 would overflow (65,504) past a few thousand tokens and bf16 would round to 3 digits."""
    rows = min(chunk, 1024)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], rows):
        part = fn(h[start : start + rows], w, targets[start : start + rows], reduction="sum",
                  options=options(batch_chunk_size=rows))  # fmt: skip
        total = total + part.float()
    return total


def _torch_wins(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's op is the better choice here, per bench/loss_bench.py (docs/benchmarks-loss.md).

    On CPU: in fp16, where ours runs emulated fp16 matmuls and torch's accumulates its weight gradient in
    float32 (5x faster); not in float32 (ours ~15% faster) nor in bf16 (ours ~3x faster). CUDA is unmeasured
    (bench/gpu_check.py measures it): ours runs there until a measurement says otherwise.
    """
    return device.type == "cpu" and dtype == torch.float16


# ----------------------------------------------------------------------------------------------------------
# The training loss of a causal LM: from a batch (input_ids, labels with -100 where nothing is trained) to the
# summed next-token loss, through the chunked output layer where the model allows it.


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy, number of target tokens); positions labelled -100 do not count.

    logits (B, T, V), labels (B, T): position t predicts labels[t + 1].
    """
    targets = labels[:, 1:]  # (B, T-1)
    # Upcast: autocast would, but a 16-bit model scored without it (eval's merged model) would otherwise sum
    # its log-probabilities in 16 bits (bf16 is ~0.5% off on a few hundred tokens).
    loss_sum = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
    )  # (), float32
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
    from qlora_ft.data.batches import collate

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
            with engine.autocast():  # the forward is autocast already; this covers the chunked loss
                loss_sum, _ = forward_loss(model, batch, head, chunk)
            scaled = loss_sum * engine.world / max(n_targets, 1)  # DDP and DeepSpeed average over processes
            engine.backward(scaled, last_in_step=not is_accumulating)
        total += float(loss_sum.detach())
        n_tokens += int(batch["n_tokens"])
    total, n_tokens = engine.all_sum(torch.tensor([total, n_tokens], dtype=torch.float64)).tolist()
    return total, n_targets, int(n_tokens)
