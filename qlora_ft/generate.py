"""Sampling, shared by in-training samples and inference."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qlora_ft.config import SamplingArgs


def encode_prompt(tokenizer, prompt: str, device: torch.device) -> torch.Tensor:
    """`<eos> + prompt`: training paragraphs start with `<eos>`, so a prompt continues like a paragraph opening,
    and the empty prompt samples a whole paragraph from `<eos>` alone. Shape (1, T)."""
    ids = [tokenizer.eos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    return torch.tensor([ids], dtype=torch.long, device=device)


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: Sequence[str],
    sampling: SamplingArgs,
    max_new_tokens: int,
    num_return_sequences: int = 1,
    seed: int = 0,
    streamer_factory=None,
) -> list[list[str]]:
    """For each prompt, `num_return_sequences` texts (prompt included), sampled with top-k/top-p/temperature.

    Runs under `torch.random.fork_rng`, seeded with `seed`: the caller's RNG streams (e.g. the training
    loop's dropout) are left exactly as they were, and the same seed gives the same texts. Stops at `<eos>`.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[str]] = []
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            torch.manual_seed(seed)
            for prompt in prompts:
                input_ids = encode_prompt(tokenizer, prompt, device)
                texts = []
                # one sequence per call when streaming (streamers take batch size 1), else all at once
                n_calls, per_call = (num_return_sequences, 1) if streamer_factory else (1, num_return_sequences)
                for _ in range(n_calls):
                    generated = model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        do_sample=True,
                        top_k=sampling.top_k,
                        top_p=sampling.top_p,
                        temperature=sampling.temperature,
                        max_new_tokens=max_new_tokens,
                        num_return_sequences=per_call,
                        eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id,
                        streamer=streamer_factory() if streamer_factory else None,
                    )  # (per_call, T + new)
                    texts += tokenizer.batch_decode(generated, skip_special_tokens=True)
                out.append([t.strip() for t in texts])
    finally:
        model.train(was_training)
    return out
