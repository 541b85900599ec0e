"""Where one training step's time goes: torch.profiler over a few optimizer steps of this package's loop.

    python bench/profile_step.py                       # mini-gpt2-fiction, Austen, batch 8 x 100, packing
    python bench/profile_step.py --max-length 256 --loss-chunk 0 --no-packing

Also times building the corpus' token cache (cold, into a temporary folder), opening it again (warm), and
assembling a batch from it (the reason for no DataLoader workers). Prints tokens/s over 10 timed steps (after
3 warm-up steps) and the profiler's top operators.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_ft.config import ModelArgs  # noqa: E402
from qlora_ft.data.batches import cut_windows, make_batch, pack  # noqa: E402
from qlora_ft.data.prepare import Recipe, open_cache  # noqa: E402
from qlora_ft.engines import Engine  # noqa: E402
from qlora_ft.loss import accumulate_gradients, output_layer  # noqa: E402
from qlora_ft.model import add_lora, keep_training_layout, load_base, load_tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared"


def first_batches(cache, args, pad_id: int) -> list[dict]:
    """16 batches of windows of the first 2000 paragraphs, in order, timed."""
    windows = cut_windows(cache, range(min(2000, cache.n_records)), args.max_length)
    lengths = windows.lengths.tolist()
    order = list(range(len(windows)))
    rows = [[i] for i in order] if args.no_packing else pack(lengths, order, args.max_length)
    b = args.batch_size
    start = time.perf_counter()
    batches = [make_batch(rows[i : i + b], windows, pad_id) for i in range(0, min(len(rows), 16 * b), b)]
    print(f"assembling a batch: {1000 * (time.perf_counter() - start) / len(batches):.2f} ms")
    return batches


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(SHARED / "models" / "mini-gpt2-fiction"))
    p.add_argument("--data", default=str(SHARED / "data" / "corpora" / "austen"))
    p.add_argument("--max-length", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--no-packing", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    args = p.parse_args()
    from accelerate import Accelerator

    tok = load_tokenizer(args.model)
    with tempfile.TemporaryDirectory(prefix="profile-step-") as cache_dir:
        start = time.perf_counter()
        cache = open_cache(args.data, tok, Recipe(), cache_dir=cache_dir)
        print(f"token cache of {cache.n_records} paragraphs, cold: {time.perf_counter() - start:.2f} s")
        start = time.perf_counter()
        cache = open_cache(args.data, tok, Recipe(), cache_dir=cache_dir)
        print(f"token cache, warm: {1000 * (time.perf_counter() - start):.1f} ms")
        batches = first_batches(cache, args, tok.pad_token_id)

    base = load_base(args.model, True, torch.float32, torch.device("cpu"))
    keep_training_layout(base)
    if args.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(base, ModelArgs(rank_lora=64, lora_dropout=args.lora_dropout))
    model.config.use_cache = False
    head = output_layer(model)
    engine = Engine(Accelerator(cpu=True))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)

    def step(batch):
        accumulate_gradients(model, [batch], engine, head, args.loss_chunk)
        opt.step()
        opt.zero_grad()

    for batch in batches[:3]:
        step(batch)
    start, tokens = time.perf_counter(), 0
    for batch in batches[3:13]:
        step(batch)
        tokens += int(batch["n_tokens"])
    seconds = time.perf_counter() - start
    print(f"{tokens / seconds:.0f} real tokens/s, {seconds / 10:.3f} s/step, {tokens / 10:.0f} tokens/step")
    with torch.profiler.profile() as prof:
        for batch in batches[13:16]:
            step(batch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
