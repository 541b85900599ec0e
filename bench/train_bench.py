"""Side-by-side training benchmark: this package vs the usual Trainer + peft recipe vs the original script.

Every arm trains the same base (4-bit NF4, LoRA r/alpha on the same targets) on the same training
paragraphs for about the same number of real (non-pad) tokens, in one process, the arms alternating
(a, b, c, a, b, c, ...) so that machine noise hits all of them alike. Each arm's model is then scored on
the same validation paragraphs with the same token-weighted evaluator. Reported per arm: real tokens/s
(median over repeats), peak memory (CUDA peak, or peak RSS above the arm's starting RSS on CPU), model
FLOPs utilisation against this device's measured matmul peak, and validation loss.

    python bench/train_bench.py --model ../shared/models/mini-gpt2-fiction --data ../shared/data/corpora/austen
    python bench/train_bench.py --random-config gpt2-medium --max-length 512 --tokens 400000   # GPU

Any causal LM: every arm wraps the architecture's LoRA targets (`model.LORA_TARGETS`: GPT-2 `c_attn c_proj`,
Llama all seven projections) with the same rank, alpha, learning rate, batch size and length; the FLOPs count
reads the model (`matmul_parameters`). Compare like with like: `ours:gradient_checkpointing=True` beside
`trainer` (which checkpoints), `ours:gradient_checkpointing=False` beside `trainer:gradient_checkpointing=False`.

Arms: `ours` (optionally `ours:packing=False;loss_chunk=0` to override options), `trainer`, `original`.
Writes bench/results/<device>-<model>.json and prints a table.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_ft.config import TrainConfig  # noqa: E402
from qlora_ft.data.batches import make_batch  # noqa: E402
from qlora_ft.data.prepare import prepare_data  # noqa: E402
from qlora_ft.data.records import iter_paragraphs  # noqa: E402
from qlora_ft.data.sources import resolve  # noqa: E402
from qlora_ft.loop import train  # noqa: E402
from qlora_ft.loss import output_layer  # noqa: E402
from qlora_ft.model import bnb_config, compute_dtype, keep_training_layout, load_tokenizer, lora_targets  # noqa: E402
from qlora_ft.options import parse_config  # noqa: E402
from qlora_ft.training.validate import validation_loss  # noqa: E402

SHARED = ROOT.parent / "shared"
RANDOM_CONFIGS = {"gpt2": {}, "gpt2-medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16}}


# ----------------------------------------------------------------------------------------------------------
# Measurement helpers


class PeakMemory:
    """Peak memory of the code inside the `with`: CUDA's allocator peak, or on CPU the highest RSS seen by a
    sampling thread (every 5 ms) minus the RSS at entry (ru_maxrss cannot be reset within a process)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.rss() - self.base)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()


def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul in `dtype`: the denominator of MFU."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 50 if device.type == "cuda" else 10
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def train_flops_per_token(model, trainable_fraction: float, seq_len: int) -> float:
    """Model FLOPs per real token for LoRA training, for any causal LM: forward 2N, backward 2N for input gradients
    (frozen base), plus 2N x trainable share for weight gradients; attention scores add 12 * layers * width *
    seq_len / 2 (causal). N counts the weights that multiply each token (`matmul_parameters`)."""
    config = model.config.get_text_config()
    n_matmul = matmul_parameters(model)
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len / 2
    return 4 * n_matmul + 2 * n_matmul * trainable_fraction + attention


def matmul_parameters(model) -> int:
    """Every 2-D weight but the embedding tables (4-bit ones at their unpacked size), plus a tied output layer."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
            for p in model.parameters() if p.dim() == 2 and id(p) not in embeddings)  # fmt: skip
    head = model.get_output_embeddings().weight
    return n + (head.numel() if id(head) in embeddings else 0)


# ----------------------------------------------------------------------------------------------------------
# The arms


def ours_config(ctx, overrides: dict[str, str]) -> TrainConfig:
    """The configuration of the `ours` arm (its token cache in the work folder, built by `main` for the split; each
    arm and repeat replaces the previous one's output and checkpoint folders)."""
    argv = ["--model", ctx.model_dir, "--data", ctx.data_pkl, "--batch-size", str(ctx.batch),
            "--max-input-length", str(ctx.max_length), "--rank-lora", str(ctx.rank), "--alpha-lora", str(ctx.alpha),
            "--lr", str(ctx.lr), "--warmup-steps", "10", "--sample-every", "0", "--save-interval", "0",
            "--train-size", str(ctx.train_size), "--output-dir", str(ctx.work / "ours"),
            "--check-dir", str(ctx.work / "ours-ckpt"), "--cache-dir", str(ctx.work / "cache"), "--overwrite",
            "--log-every", "1000"]  # fmt: skip
    for key, value in overrides.items():
        argv += [f"--{key}", value]
    return parse_config(TrainConfig, argv, "bench")


def arm_ours(ctx, overrides: dict[str, str]):
    """This package's `train()` as users run it (minus checkpoints, samples and extra validations)."""
    cfg = ours_config(ctx, overrides)
    per_step = cfg.data.batch_size * (cfg.data.max_input_length if cfg.data.packing else ctx.mean_len)
    cfg.optim.max_steps = max(1, round(ctx.tokens / per_step))
    with PeakMemory(ctx.device) as mem:
        result = train(cfg)
    s = result.summary
    return result.model, s["train_tokens"], s["train_seconds"], mem.peak, cfg.optim.max_steps


def _hf_qlora_model(ctx, gradient_checkpointing: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        ctx.model_dir, quantization_config=bnb_config(ctx.dtype), device_map={"": ctx.device}, dtype=torch.float32
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    keep_training_layout(model)  # the same bitsandbytes CPU-layout guard for every arm
    lora = LoraConfig(
        r=ctx.rank,
        lora_alpha=ctx.alpha,
        lora_dropout=0.05,
        target_modules=lora_targets(model, ["auto"]),
        task_type="CAUSAL_LM",
    )  # the architecture's targets, as the `ours` arm (Llama: all seven)
    return get_peft_model(model, lora)


def arm_trainer(ctx, overrides):
    """The usual recipe: transformers Trainer + peft QLoRA, DataCollatorForLanguageModeling, dynamic padding
    (`prepare_model_for_kbit_training` with its default gradient checkpointing; `trainer:gradient_checkpointing=False`
    turns it off)."""
    import datasets
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    mem = PeakMemory(ctx.device).__enter__()  # like ours, the arm's memory includes loading the model
    model = _hf_qlora_model(ctx, gradient_checkpointing=overrides.get("gradient_checkpointing", "True") == "True")
    tok = ctx.tokenizer
    ds = datasets.Dataset.from_dict({"text": ctx.train_texts}).map(
        lambda b: tok(b["text"], truncation=True, max_length=ctx.max_length), batched=True, remove_columns=["text"]
    )
    base_collator = DataCollatorForLanguageModeling(tok, mlm=False)
    seen = [0]

    def collator(features):
        batch = base_collator(features)
        seen[0] += int(batch["attention_mask"].sum())
        return batch

    steps = max(1, round(ctx.tokens / (ctx.batch * ctx.mean_len)))
    on_cuda = ctx.device.type == "cuda"
    args = TrainingArguments(
        output_dir=str(ctx.work / "trainer"), per_device_train_batch_size=ctx.batch, max_steps=steps,
        learning_rate=ctx.lr, warmup_steps=10, lr_scheduler_type="linear", logging_steps=10_000,
        save_strategy="no", report_to=[], use_cpu=not on_cuda, bf16=on_cuda and ctx.dtype == torch.bfloat16,
        fp16=on_cuda and ctx.dtype == torch.float16, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    if on_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    mem.__exit__()
    return model, seen[0], seconds, mem.peak, steps


def arm_original(ctx, _overrides):
    """The original script: every paragraph padded to max length, batch 8, labels = input_ids, plain loop."""
    from torch.utils.data import DataLoader

    mem = PeakMemory(ctx.device).__enter__()  # like ours, the arm's memory includes loading the model
    model = _hf_qlora_model(ctx, gradient_checkpointing=False)
    enc = ctx.tokenizer(ctx.train_texts, truncation=True, max_length=ctx.max_length, padding="max_length",
                        return_tensors="pt")  # fmt: skip
    pairs = list(zip(enc["input_ids"], enc["attention_mask"], strict=True))
    loader = DataLoader(pairs, batch_size=ctx.batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    steps = max(1, round(ctx.tokens / (ctx.batch * ctx.mean_len)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ctx.lr, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps))
    seen, step = 0, 0
    model.train()
    start = time.perf_counter()
    while step < steps:
        for ids, mask in loader:
            ids, mask = ids.to(ctx.device), mask.to(ctx.device)
            with torch.autocast(ctx.device.type, dtype=ctx.dtype, enabled=ctx.device.type == "cuda"):
                loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            seen += int(mask.sum())
            step += 1
            if step >= steps:
                break
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    mem.__exit__()
    return model, seen, seconds, mem.peak, steps


ARMS = {"ours": arm_ours, "trainer": arm_trainer, "original": arm_original}


# ----------------------------------------------------------------------------------------------------------


class Context:
    pass


def random_model_dir(name: str, work: Path) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok_dir = SHARED / "data" / "gpt2-tokenizer"
    tokenizer = load_tokenizer(str(tok_dir))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**RANDOM_CONFIGS[name])).save_pretrained(work / name)
    tokenizer.save_pretrained(work / name)
    return str(work / name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(SHARED / "models" / "mini-gpt2-fiction"), help="local model dir")
    p.add_argument("--random-config", choices=sorted(RANDOM_CONFIGS), help="random-weight gpt2 / gpt2-medium")
    p.add_argument("--data", default=str(SHARED / "data" / "corpora" / "austen"))
    p.add_argument("--paragraphs", type=int, default=3000, help="use the first N paragraphs (0: all)")
    p.add_argument("--arms", default="ours,trainer,original", help="comma list; ours:flag=v;flag=v sets options")
    p.add_argument("--tokens", type=int, default=30_000, help="real training tokens per arm")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=100)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default=None, help="results file (default bench/results/<device>-<model>.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    ctx = Context()
    ctx.work = Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    ctx.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx.dtype = compute_dtype("auto", ctx.device)
    ctx.model_dir = random_model_dir(args.random_config, ctx.work) if args.random_config else args.model
    model_name = args.random_config or Path(args.model).name
    ctx.batch, ctx.max_length, ctx.rank, ctx.alpha, ctx.lr = (args.batch_size, args.max_length, args.rank,
                                                               args.alpha, args.lr)  # fmt: skip
    ctx.tokens = args.tokens
    ctx.tokenizer = load_tokenizer(ctx.model_dir)

    src = resolve(args.data)
    parts = src.parts()
    paragraphs = list(itertools.islice(iter_paragraphs(src, part=parts[0] if parts else None), args.paragraphs or None))
    ctx.train_size = 0.95
    ctx.data_pkl = str(ctx.work / "data.pkl")
    import pickle

    Path(ctx.data_pkl).write_bytes(pickle.dumps([{"sentence": t} for t in paragraphs]))
    data = prepare_data(ours_config(ctx, {}), ctx.tokenizer)  # the split train() makes from this data
    ctx.train_texts = data.read(data.split.train_idx)
    lengths = [min(ctx.max_length, n + 2) for n in map(len, ctx.tokenizer(ctx.train_texts)["input_ids"])]
    ctx.mean_len = statistics.mean(lengths)
    val = data.validation
    val_batches = [make_batch([[i] for i in range(j, min(j + 16, len(val)))], val, ctx.tokenizer.pad_token_id)
                   for j in range(0, len(val), 16)]  # fmt: skip

    peak = matmul_peak_flops(ctx.device, ctx.dtype)
    results: dict[str, dict] = {}
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for repeat in range(args.repeats):
        for spec in arms:
            name, _, opts = spec.partition(":")
            overrides = dict(kv.split("=", 1) for kv in opts.split(";") if kv)
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so each arm's RSS starts low
            model, tokens, seconds, mem, steps = ARMS[name](ctx, overrides)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
            val_loss, _ = validation_loss(model, val_batches, head=output_layer(model), chunk=1024, device=ctx.device)
            r = results.setdefault(spec, {"tokens_per_second": [], "peak_memory_bytes": [], "val_loss": []})
            r["tokens_per_second"].append(tokens / seconds)
            r["peak_memory_bytes"].append(mem)
            r["val_loss"].append(val_loss)
            r.update(steps=steps, train_tokens=tokens, seconds=seconds)
            flops = train_flops_per_token(model, trainable / total, ctx.max_length)
            r["mfu"] = statistics.median(r["tokens_per_second"]) * flops / peak
            print(f"[{repeat + 1}/{args.repeats}] {spec:40s} {tokens / seconds:9.0f} tok/s  {mem / 2**20:8.0f} MiB  "
                  f"val {val_loss:.4f}  ({tokens} tokens, {steps} steps, {seconds:.1f} s)", flush=True)  # fmt: skip
            del model
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()

    device_name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    summary = {
        "device": device_name, "model": model_name, "command": "python " + " ".join(sys.argv),
        "batch_size": ctx.batch, "max_length": ctx.max_length, "lora_rank": ctx.rank, "lora_alpha": ctx.alpha,
        "compute_dtype": str(ctx.dtype), "matmul_peak_flops": peak, "threads": torch.get_num_threads(),
        "arms": {spec: {"tokens_per_second": statistics.median(r["tokens_per_second"]),
                        "tokens_per_second_runs": r["tokens_per_second"],
                        "peak_memory_bytes": max(r["peak_memory_bytes"]), "val_loss": r["val_loss"][-1],
                        "train_tokens": r["train_tokens"], "steps": r["steps"], "mfu": r["mfu"]}
                 for spec, r in results.items()},
    }  # fmt: skip
    default_out = ROOT / "bench" / "results" / f"{device_name.replace(' ', '_')}-{model_name}.json"
    out = Path(args.out) if args.out else default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")

    base = summary["arms"].get("original", {}).get("tokens_per_second")
    print(f"\n{device_name}, {model_name}, batch {ctx.batch} x {ctx.max_length}, LoRA r={ctx.rank}")
    print(f"{'arm':40s} {'tokens/s':>9s} {'vs orig':>8s} {'peak MiB':>9s} {'MFU':>6s} {'val loss':>9s}")
    for spec, r in summary["arms"].items():
        ratio = f"{r['tokens_per_second'] / base:.2f}x" if base else "-"
        print(f"{spec:40s} {r['tokens_per_second']:9.0f} {ratio:>8s} {r['peak_memory_bytes'] / 2**20:9.0f} "
              f"{100 * r['mfu']:5.1f}% {r['val_loss']:9.4f}")  # fmt: skip
    print(f"written to {out}")
    return summary


if __name__ == "__main__":
    main()
