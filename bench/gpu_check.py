"""The GPU check: every 16-bit path of qlora-ft on one CUDA GPU, in a few minutes, with a report.

    python bench/gpu_check.py OUT_DIR

Runs, on random-weight GPT-2 models built here (nothing is downloaded): the precision policy for this card;
the chunked loss against the plain loss under autocast (bf16 and fp16) and its speed (bench/loss_bench.py);
the packing probe; 50 QLoRA steps
in bf16 and in fp16 (loss scaling); full fine-tuning (`--qlora False`) in both; an exact-resume check;
inference from the adapter and from an exported model, with their parity; peak memory (allocated and
reserved) of a gpt2-medium-shaped model at batch 8 x 512 with and without gradient checkpointing; and
bench/train_bench.py's throughput comparison. Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md.
Without CUDA, or with a package missing, it says so in one line and exits with status 2.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import pickle
import random
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REQUIRED = ["torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "pandas", "tokenizers"]
WORDS = "the a of and to in was her she he it that had with for as his not be but at by you on all".split()


def preflight() -> str | None:
    """One line saying why the check cannot run here, or None."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        return f"gpu_check: missing Python packages: {', '.join(missing)} (pip install -e . in the repository)"
    import torch

    if not torch.cuda.is_available():
        return f"gpu_check: CUDA is not available (torch {torch.__version__}); run this on a machine with an NVIDIA GPU"
    return None


# ----------------------------------------------------------------------------------------------------------
# Inputs built here: pseudo-text, a small BPE tokenizer, random GPT-2 models


def paragraphs(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words))) + "." for _ in range(n)]


def build_model(path: Path, **config) -> Path:
    """A random GPT-2 (`config` overrides GPT2Config) with a 300-token BPE tokenizer trained on pseudo-text."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    tok.train_from_iterator(paragraphs(200, 30), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**config)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_run(out: Path, name: str, model: Path, data: Path, *flags: str) -> dict:
    """train.py with `flags` into out/name; the summary plus the logged losses and CUDA reserved memory."""
    import torch

    from qlora_ft.cli import train_main

    argv = ["--model", str(model), "--data", str(data), "--batch-size", "8", "--max-input-length", "128",
            "--lr", "2e-3", "--warmup-steps", "5", "--sample-every", "0", "--log-every", "10", "--eval-every", "0",
            "--save-interval", "0", "--output-dir", str(out / name), "--check-dir", str(out / f"{name}-ckpt"),
            *flags]  # fmt: skip
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    train_main(argv)
    summary = json.loads((out / name / "train_summary.json").read_text())
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"method": summary["method"], "steps": summary["steps"], "first_loss": losses[0], "last_loss": losses[-1],
            "finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses)),
            "val_loss": [summary["initial_val_loss"], summary["final_val_loss"]],
            "tokens_per_second": summary["tokens_per_second"], "peak_allocated_bytes": summary["peak_memory_bytes"],
            "peak_reserved_bytes": torch.cuda.max_memory_reserved()}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# The checks: each returns a JSON-able dict (raising marks it failed)


def check_policy() -> dict:
    import torch

    from qlora_ft.precision import precision_policy

    device = torch.device("cuda")
    p = precision_policy("auto", device)
    return {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "is_bf16_supported": torch.cuda.is_bf16_supported(),
            "auto": p.name, "use_scaler": p.use_scaler, "ok": p.name == ("bf16" if
            torch.cuda.get_device_capability() >= (8, 0) else "fp16")}  # fmt: skip


def check_loss_parity() -> dict:
    """Chunked vs plain loss and hidden-state gradient under autocast, on a GPT-2-sized head (8 x 512 tokens)."""
    import torch
    import torch.nn.functional as F

    from qlora_ft.loss import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(4096, 768, device="cuda", requires_grad=True)
    weight = torch.randn(50257, 768, device="cuda") * 0.02
    targets = torch.randint(0, 50257, (4096,), device="cuda")
    result = {}
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cuda", dtype=dtype):
            plain = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
            chunked = linear_cross_entropy(hidden, weight, targets, 1024)
        (g_plain,) = torch.autograd.grad(plain, hidden)
        (g_chunked,) = torch.autograd.grad(chunked, hidden)
        loss_err = abs(float(chunked.detach()) - float(plain.detach())) / abs(float(plain.detach()))
        grad_err = float((g_chunked.float() - g_plain.float()).norm() / g_plain.float().norm())
        result[str(dtype)] = {"loss_rel_error": loss_err, "grad_rel_error": grad_err}
    result["ok"] = all(r["loss_rel_error"] < 1e-3 and r["grad_rel_error"] < 2e-2 for r in result.values())
    return result


def check_loss_speed(out: Path) -> dict:
    """bench/loss_bench.py on this GPU: ours vs torch's F.linear_cross_entropy (where torch has it), 8 x 1024 tokens."""
    sys.path.insert(0, str(ROOT / "bench"))
    import loss_bench

    rows = loss_bench.main(["--device", "cuda", "--tokens", "8192", "--repeats", "5", "--json",
                            str(out / "loss_bench.json")])  # fmt: skip
    return {"rows": rows, "ok": True}


def check_packing(model_dir: Path) -> dict:
    import torch

    from qlora_ft.model import load_base
    from qlora_ft.training.setup import packing_is_isolated

    results = {}
    for name, quantize in (("4-bit", True), ("16-bit", False)):
        model = load_base(str(model_dir), quantize, torch.bfloat16, torch.device("cuda"))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results[name] = packing_is_isolated(model, torch.device("cuda"))
    return {**results, "ok": all(results.values())}


def check_training(out: Path, model: Path, data: Path) -> dict:
    """50 QLoRA steps in bf16 and fp16; 30 steps of full fine-tuning in each."""
    runs = {}
    for dtype in ("bfloat16", "float16"):
        runs[f"qlora-{dtype}"] = train_run(out, f"qlora-{dtype}", model, data, "--compute-dtype", dtype,
                                           "--max-steps", "50")  # fmt: skip
        runs[f"full-{dtype}"] = train_run(out, f"full-{dtype}", model, data, "--compute-dtype", dtype,
                                          "--qlora", "False", "--max-steps", "30", "--lr", "2e-4")  # fmt: skip
    ok = all(r["finite"] and r["last_loss"] < r["first_loss"] for r in runs.values())
    return {**runs, "ok": ok}


def check_resume(out: Path, model: Path, data: Path) -> dict:
    """fp16 QLoRA: 20 steps at once == a new run resumed from that run's step-10 checkpoint for 10 more
    (adapter and logged losses; the loss scaler's state travels in the checkpoint)."""
    from safetensors.torch import load_file

    ckpt = out / "resume-ckpt"
    flags = ("--compute-dtype", "float16", "--save-every-steps", "10", "--log-every", "1", "--max-steps", "20",
             "--lora-dropout", "0.1", "--check-dir", str(ckpt))  # fmt: skip
    train_run(out, "resume-full", model, data, *flags)
    (ckpt / "step-000020").rename(out / "resume-full-step20")  # so that the resumed run cannot reuse it
    train_run(out, "resume-part", model, data, *flags, "--restore-file", "step-000010")
    a = load_file(out / "resume-full" / "adapter_model.safetensors")
    b = load_file(out / "resume-part" / "adapter_model.safetensors")
    max_diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    la, lb = (
        {r["step"]: r["loss"] for r in map(json.loads, (out / run / "metrics.jsonl").read_text().splitlines())
         if "loss" in r}
        for run in ("resume-full", "resume-part")
    )  # fmt: skip
    same = sorted(lb) == list(range(11, 21)) and all(la[s] == lb[s] for s in lb)
    return {"adapter_max_abs_diff": max_diff, "resumed_losses_equal": same, "ok": max_diff == 0.0 and same}


def check_inference(out: Path) -> dict:
    """The bf16 QLoRA adapter: merged at load, kept 4-bit, and exported then loaded; logits and greedy text."""
    import torch

    from qlora_ft.cli import main as cli_main
    from qlora_ft.model import load_for_inference

    adapter, exported, device = out / "qlora-bfloat16", out / "exported", torch.device("cuda")
    cli_main(["export", "--model_path", str(adapter), "--out", str(exported), "--overwrite"])
    variants = {"adapter-merged": (adapter, False), "adapter-4bit": (adapter, True), "export": (exported, False)}
    logits, texts, errors = {}, {}, {}
    for name, (path, quantize) in variants.items():
        try:  # each variant on its own: one that fails to load must not hide the others' parity
            model, tokenizer = load_for_inference(str(path), None, quantize, device)
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
            continue
        ids = tokenizer("the a of and to in was her", return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            logits[name] = model(ids).logits.float()
            texts[name] = tokenizer.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0])
        del model
    ref = logits.get("adapter-merged")
    diffs = {name: float((v - ref).abs().max()) for name, v in logits.items()} if ref is not None else {}
    same_text = {name: t == texts.get("adapter-merged") for name, t in texts.items()}
    ok = not errors and diffs.get("export", 1.0) < 0.1 and same_text.get("export", False)
    return {"logits_max_abs_diff_vs_merged": diffs, "same_greedy_text": same_text, "errors": errors, "ok": ok}


def check_memory(out: Path, data: Path) -> dict:
    """gpt2-medium-shaped QLoRA at batch 8 x 512, with and without gradient checkpointing (3 steps each)."""
    model = build_model(out / "gpt2-medium-random", n_layer=24, n_embd=1024, n_head=16)
    runs = {}
    for gc in ("False", "True"):
        runs[f"gradient_checkpointing={gc}"] = train_run(
            out, f"medium-gc-{gc}", model, data, "--max-input-length", "512", "--max-steps", "3",
            "--gradient-checkpointing", gc, "--train-size", "0.98")  # fmt: skip
    a, b = runs["gradient_checkpointing=False"], runs["gradient_checkpointing=True"]
    return {**runs, "ok": b["peak_allocated_bytes"] < a["peak_allocated_bytes"]}


def check_throughput(out: Path, data: Path) -> dict:
    """bench/train_bench.py: ours vs the Trainer + peft recipe, gpt2-medium-shaped, batch 8 x 512."""
    sys.path.insert(0, str(ROOT / "bench"))
    import train_bench

    result = out / "train_bench.json"
    train_bench.main(["--model", str(out / "gpt2-medium-random"), "--data", str(data), "--paragraphs", "0",
                      "--arms", "ours,trainer", "--tokens", "100000", "--repeats", "1", "--max-length", "512",
                      "--out", str(result)])  # fmt: skip
    arms = json.loads(result.read_text())["arms"]
    return {**arms, "ok": True}


# ----------------------------------------------------------------------------------------------------------


def report_markdown(results: dict) -> str:
    lines = ["# qlora-ft GPU check", "", f"Command: `python bench/gpu_check.py OUT_DIR`, {results['device']}", "",
             "| check | ok | seconds | details |", "| --- | --- | --- | --- |"]  # fmt: skip
    for name, r in results["checks"].items():
        details = {k: v for k, v in r.items() if k not in ("ok", "seconds", "error")}
        text = r.get("error") or json.dumps(details, default=str)
        lines.append(f"| {name} | {'yes' if r.get('ok') else 'NO'} | {r['seconds']:.1f} | `{text[:1500]}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python bench/gpu_check.py OUT_DIR", file=sys.stderr)
        return 2
    problem = preflight()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    import torch

    logging.basicConfig(level=logging.WARNING)
    out = Path(argv[0])
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data.pkl"
    data.write_bytes(pickle.dumps([{"sentence": p} for p in paragraphs(400, 700)]))  # ~512-token windows
    small = build_model(work / "gpt2-small-random", n_layer=4, n_embd=256, n_head=4)
    checks = {
        "precision_policy": check_policy,
        "chunked_loss_vs_plain": check_loss_parity,
        "chunked_loss_speed": lambda: check_loss_speed(work),
        "packing_probe": lambda: check_packing(small),
        "training_16bit": lambda: check_training(work, small, data),
        "resume_fp16": lambda: check_resume(work, small, data),
        "inference_parity": lambda: check_inference(work),
        "memory_gpt2_medium_8x512": lambda: check_memory(work, data),
        "throughput_train_bench": lambda: check_throughput(work, data),
    }
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": {}}
    for name, check in checks.items():
        start = time.perf_counter()
        try:
            r = check()
        except Exception as e:  # one failing check must not hide the others' results
            r = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        torch.cuda.synchronize()
        r["seconds"] = time.perf_counter() - start
        results["checks"][name] = r
        print(f"{name}: {'ok' if r.get('ok') else 'FAILED'} ({r['seconds']:.1f} s)", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "gpu_check.md").write_text(report_markdown(results))
    return 0 if all(r.get("ok") for r in results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
