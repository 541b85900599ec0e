"""The GPU check: every 16-bit path of qlora-ft on one CUDA GPU, in a few minutes, with a report.

    python bench/gpu_check.py OUT_DIR                 # on a CUDA GPU
    python bench/gpu_check.py --device cpu OUT_DIR    # a dry run of the same checks at tiny sizes (~1 min)

Runs, on random-weight GPT-2 models built here (nothing is downloaded): the precision policy for this card;
the chunked loss against the plain loss under autocast (bf16 and fp16) and its speed (bench/loss_bench.py);
the packing probe; QLoRA steps in bf16 and in fp16 (loss scaling); full fine-tuning (`--qlora False`) in
both; an exact-resume check; inference from the adapter and from an exported model, with their parity; peak
memory (allocated and reserved) of a gpt2-medium-shaped model at batch 8 x 512 with and without gradient
checkpointing; `--batch-size auto` on that model (the micro-batch it chose x the accumulation = the global batch);
and bench/train_bench.py's throughput comparison.

A failing check is recorded with its error (for an entry point's exit 2, the UserError behind it) and the
others still run; OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md are written whatever happens (the runs'
files go to OUT_DIR/work, replaced each time). `--device cpu` runs every check that needs no CUDA-only
measurement, and the reports say which it skips and why. Exit status: 0 when every check that ran passed, 1
when one failed, 2 when the check cannot run here (no CUDA, a package missing: one line), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import pickle
import random
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REQUIRED = ["torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "pandas", "tokenizers"]
WORDS = "the a of and to in was her she he it that had with for as his not be but at by you on all".split()


@dataclass(frozen=True)
class Sizes:
    """How big each check runs: real sizes on a GPU, tiny ones for the CPU dry run."""

    small: dict  # GPT2Config overrides of the model most checks train
    large: dict  # the memory and throughput model
    paragraphs: tuple[int, int]  # pseudo-text paragraphs: count, most words
    max_length: int
    large_length: int
    batch: int
    warmup: int
    log_every: int
    qlora_steps: int
    full_steps: int
    resume_every: int  # the resume check: a checkpoint every this many steps, twice
    loss_rows: tuple[int, int, int]  # chunked-loss parity: tokens, width, vocabulary
    loss_bench: tuple[str, ...]  # bench/loss_bench.py's size flags
    bench_tokens: int  # bench/train_bench.py: real training tokens per arm


GPU = Sizes(small=dict(n_layer=4, n_embd=256, n_head=4), large=dict(n_layer=24, n_embd=1024, n_head=16),
            paragraphs=(400, 700), max_length=128, large_length=512, batch=8, warmup=5, log_every=10,
            qlora_steps=50, full_steps=30, resume_every=10, loss_rows=(4096, 768, 50257),
            loss_bench=("--tokens", "8192", "--repeats", "5"), bench_tokens=100_000)  # fmt: skip
TINY = dict(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=300)  # the tokenizer's 300 tokens
CPU = Sizes(small=TINY, large=TINY,
            paragraphs=(60, 60), max_length=64, large_length=64, batch=4, warmup=1, log_every=1, qlora_steps=4,
            full_steps=3, resume_every=2, loss_rows=(256, 64, 1000),
            loss_bench=("--tokens", "128", "--hidden", "64", "--vocab", "1000", "--chunk", "64", "--repeats", "1"),
            bench_tokens=512)  # fmt: skip
CUDA_ONLY = {
    "precision_policy": "the policy follows the GPU's compute capability (on CPU `auto` is float32: tested in "
    "tests/test_precision.py)",
    "memory_gpt2_medium_8x512": "peak memory is read from CUDA's allocator (torch.cuda.max_memory_allocated)",
    "batch_size_auto": "--batch-size auto fits micro-batches into CUDA memory (on CPU it is refused: "
    "tests/test_batch_size.py)",
}


def preflight(device: str) -> str | None:
    """One line saying why the check cannot run here, or None."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        return f"gpu_check: missing Python packages: {', '.join(missing)} (pip install -e . in the repository)"
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return (f"gpu_check: CUDA is not available (torch {torch.__version__}); run this on a machine with an "
                "NVIDIA GPU, or with --device cpu for a dry run at tiny sizes")  # fmt: skip
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


@dataclass(frozen=True)
class Setup:
    """Where the checks work and on what: data and models under `work`."""

    device: str
    sizes: Sizes
    work: Path
    data = property(lambda self: self.work / "data.pkl")
    small = property(lambda self: self.work / "gpt2-small-random")

    def large(self) -> Path:
        """The gpt2-medium-shaped model (at GPU sizes), built by the first check that needs it."""
        path = self.work / "gpt2-large-random"
        return path if (path / "config.json").exists() else build_model(path, **self.sizes.large)


def make_inputs(s: Setup) -> dict:
    """The pseudo-text data (at GPU sizes ~512-token windows) and the small random model."""
    n, words = s.sizes.paragraphs
    s.data.write_bytes(pickle.dumps([{"sentence": p} for p in paragraphs(n, words)]))
    build_model(s.small, **s.sizes.small)
    return {"data": str(s.data), "model": str(s.small), "ok": True}


def train_run(s: Setup, name: str, model: Path, *flags: str) -> dict:
    """train.py with `flags` into work/name; the summary plus the logged losses and CUDA reserved memory."""
    import torch

    from qlora_ft.cli import train_main

    z, cuda = s.sizes, s.device == "cuda"
    argv = ["--model", str(model), "--data", str(s.data), "--batch-size", str(z.batch),
            "--max-input-length", str(z.max_length), "--lr", "2e-3", "--warmup-steps", str(z.warmup),
            "--sample-every", "0", "--log-every", str(z.log_every), "--eval-every", "0", "--save-interval", "0",
            "--output-dir", str(s.work / name), "--check-dir", str(s.work / f"{name}-ckpt"), *flags]  # fmt: skip
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train_main(argv)
    summary = json.loads((s.work / name / "train_summary.json").read_text())
    losses = [r["loss"] for r in metric_rows(s.work / name) if "loss" in r]
    return {"method": summary["method"], "steps": summary["steps"], "first_loss": losses[0], "last_loss": losses[-1],
            "finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses)),
            "val_loss": [summary["initial_val_loss"], summary["final_val_loss"]],
            "tokens_per_second": summary["tokens_per_second"], "peak_allocated_bytes": summary["peak_memory_bytes"],
            "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None}  # fmt: skip


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------
# The checks: each returns a JSON-able dict (raising marks it failed)


def check_policy() -> dict:
    import torch

    from qlora_ft.precision import precision_policy

    p = precision_policy("auto", torch.device("cuda"))
    return {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "is_bf16_supported": torch.cuda.is_bf16_supported(),
            "auto": p.name, "use_scaler": p.use_scaler, "ok": p.name == ("bf16" if
            torch.cuda.get_device_capability() >= (8, 0) else "fp16")}  # fmt: skip


def check_loss_parity(s: Setup) -> dict:
    """Chunked vs plain loss and hidden-state gradient under autocast (at GPU sizes a GPT-2 head, 8 x 512 tokens)."""
    import torch
    import torch.nn.functional as F

    from qlora_ft.loss import linear_cross_entropy

    rows, width, vocab = s.sizes.loss_rows
    torch.manual_seed(0)
    hidden = torch.randn(rows, width, device=s.device, requires_grad=True)
    weight = torch.randn(vocab, width, device=s.device) * 0.02
    targets = torch.randint(0, vocab, (rows,), device=s.device)
    result = {}
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast(s.device, dtype=dtype):
            plain = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
            chunked = linear_cross_entropy(hidden, weight, targets, rows // 4)
        (g_plain,) = torch.autograd.grad(plain, hidden)
        (g_chunked,) = torch.autograd.grad(chunked, hidden)
        loss_err = abs(float(chunked.detach()) - float(plain.detach())) / abs(float(plain.detach()))
        grad_err = float((g_chunked.float() - g_plain.float()).norm() / g_plain.float().norm())
        result[str(dtype)] = {"loss_rel_error": loss_err, "grad_rel_error": grad_err}
    result["ok"] = all(r["loss_rel_error"] < 1e-3 and r["grad_rel_error"] < 2e-2 for r in result.values())
    return result


def check_loss_speed(s: Setup) -> dict:
    """bench/loss_bench.py: ours vs torch's F.linear_cross_entropy (where torch has it), at GPU sizes 8 x 1024."""
    sys.path.insert(0, str(ROOT / "bench"))
    import loss_bench

    rows = loss_bench.main(["--device", s.device, *s.sizes.loss_bench, "--json", str(s.work / "loss_bench.json")])
    return {"rows": rows, "ok": bool(rows)}


def check_packing(s: Setup) -> dict:
    import torch

    from qlora_ft.model import load_base
    from qlora_ft.training.setup import packing_is_isolated

    device, results = torch.device(s.device), {}
    for name, quantize in (("4-bit", True), ("16-bit", False)):
        model = load_base(str(s.small), quantize, torch.bfloat16, device)
        with torch.autocast(s.device, dtype=torch.bfloat16):
            results[name] = packing_is_isolated(model, device)
    return {**results, "ok": all(results.values())}


def attempt(run: Callable[..., dict], *args) -> dict:
    """`run(*args)`, or its error: one run failing inside a check must not hide the check's other runs."""
    try:
        return run(*args)
    except (Exception, SystemExit) as e:  # SystemExit: an entry point's end after a UserError (a non-finite loss)
        if interrupted(e):
            raise
        return {"error": describe(e)}


def check_training(s: Setup) -> dict:
    """QLoRA steps in bf16 and fp16; full fine-tuning in each (fewer steps, lower learning rate)."""
    z, runs = s.sizes, {}
    for dtype in ("bfloat16", "float16"):
        runs[f"qlora-{dtype}"] = attempt(train_run, s, f"qlora-{dtype}", s.small, "--compute-dtype", dtype,
                                         "--max-steps", str(z.qlora_steps))  # fmt: skip
        runs[f"full-{dtype}"] = attempt(train_run, s, f"full-{dtype}", s.small, "--compute-dtype", dtype,
                                        "--qlora", "False", "--max-steps", str(z.full_steps),
                                        "--lr", "2e-4")  # fmt: skip
    ok = all("error" not in r and r["finite"] and r["last_loss"] < r["first_loss"] for r in runs.values())
    return {**runs, "ok": ok}


def check_resume(s: Setup) -> dict:
    """fp16 QLoRA: 2k steps at once == a new run resumed from that run's step-k checkpoint for k more
    (adapter and logged losses; the loss scaler's state travels in the checkpoint)."""
    from safetensors.torch import load_file

    k, ckpt = s.sizes.resume_every, s.work / "resume-ckpt"
    flags = ("--compute-dtype", "float16", "--save-every-steps", str(k), "--max-steps", str(2 * k),
             "--lora-dropout", "0.1", "--check-dir", str(ckpt), "--log-every", "1")  # fmt: skip
    train_run(s, "resume-full", s.small, *flags)
    (ckpt / f"step-{2 * k:06d}").rename(s.work / "resume-full-end")  # so that the resumed run cannot reuse it
    train_run(s, "resume-part", s.small, *flags, "--restore-file", f"step-{k:06d}")
    a = load_file(s.work / "resume-full" / "adapter_model.safetensors")
    b = load_file(s.work / "resume-part" / "adapter_model.safetensors")
    max_diff = max(float((a[n].float() - b[n].float()).abs().max()) for n in a)
    la, lb = ({r["step"]: r["loss"] for r in metric_rows(s.work / run) if "loss" in r}
              for run in ("resume-full", "resume-part"))  # fmt: skip
    same = sorted(lb) == list(range(k + 1, 2 * k + 1)) and all(la[step] == lb[step] for step in lb)
    return {"adapter_max_abs_diff": max_diff, "resumed_losses_equal": same, "ok": max_diff == 0.0 and same}


PARITY_PROMPT = "the a of and to in was her"


def check_inference(s: Setup) -> dict:
    """The bf16 QLoRA adapter: merged at load, kept 4-bit, and exported then loaded; logits and greedy text."""
    import torch

    from qlora_ft.cli import main as cli_main
    from qlora_ft.data.encode import leading_token_id
    from qlora_ft.model import load_for_inference

    adapter, exported, device = s.work / "qlora-bfloat16", s.work / "exported", torch.device(s.device)
    if not (adapter / "adapter_config.json").exists():
        raise RuntimeError(f"no adapter at {adapter}: the training check's bf16 QLoRA run did not finish")
    cli_main(["export", "--model_path", str(adapter), "--out", str(exported), "--overwrite"])
    variants = {"adapter-merged": (adapter, False), "adapter-4bit": (adapter, True), "export": (exported, False)}
    logits, texts, errors = {}, {}, {}
    for name, (path, quantize) in variants.items():
        try:  # each variant on its own: one that fails to load must not hide the others' parity
            model, tokenizer = load_for_inference(str(path), None, quantize, device)
        except Exception as e:
            errors[name] = describe(e)
            continue
        # the package's prompt ids (the leading token, then the text), which an export's tokenizer gives by itself
        plain = tokenizer(PARITY_PROMPT, add_special_tokens=False).input_ids
        ids = torch.tensor([[leading_token_id(tokenizer), *plain]], device=device)
        if name == "export" and tokenizer(PARITY_PROMPT).input_ids != ids[0].tolist():
            errors[name] = "the export's tokenizer does not give the package's prompt ids"
        with torch.no_grad():
            logits[name] = model(ids).logits.float()
            texts[name] = tokenizer.decode(
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)[0]
            )  # the leading token is no padding
        del model
    ref = logits.get("adapter-merged")
    diffs = {name: float((v - ref).abs().max()) for name, v in logits.items()} if ref is not None else {}
    same_text = {name: t == texts.get("adapter-merged") for name, t in texts.items()}
    ok = not errors and diffs.get("export", 1.0) < 0.1 and same_text.get("export", False)
    return {"logits_max_abs_diff_vs_merged": diffs, "same_greedy_text": same_text, "errors": errors, "ok": ok}


def check_memory(s: Setup) -> dict:
    """gpt2-medium-shaped QLoRA at batch 8 x 512, with and without gradient checkpointing (3 steps each)."""
    model, runs = s.large(), {}
    for gc in ("False", "True"):
        runs[f"gradient_checkpointing={gc}"] = attempt(
            train_run, s, f"large-gc-{gc}", model, "--max-input-length", str(s.sizes.large_length),
            "--max-steps", "3", "--gradient-checkpointing", gc, "--train-size", "0.98")  # fmt: skip
    a, b = runs["gradient_checkpointing=False"], runs["gradient_checkpointing=True"]
    ok = "error" not in a and "error" not in b and b["peak_allocated_bytes"] < a["peak_allocated_bytes"]
    return {**runs, "ok": ok}


def check_batch_size_auto(s: Setup) -> dict:
    """--batch-size auto --grad-accum-steps 2 on the gpt2-medium-shaped model: the micro-batch it chose times the
    accumulation is the global batch 8 x 2, and the run trains."""
    run = train_run(s, "batch-auto", s.large(), "--max-input-length", str(s.sizes.large_length), "--max-steps", "2",
                    "--batch-size", "auto", "--grad-accum-steps", "2", "--train-size", "0.98")  # fmt: skip
    saved = json.loads((s.work / "batch-auto" / "run_config.json").read_text())
    micro, accum = saved["data"]["batch_size"], saved["optim"]["grad_accum_steps"]
    return {**run, "micro_batch": micro, "grad_accum_steps": accum, "ok": micro * accum == 16 and run["finite"]}


def check_throughput(s: Setup) -> dict:
    """bench/train_bench.py: ours vs the Trainer + peft recipe (at GPU sizes gpt2-medium-shaped, batch 8 x 512)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import train_bench

    result = s.work / "train_bench.json"
    train_bench.main(["--model", str(s.large()), "--data", str(s.data), "--paragraphs", "0",
                      "--arms", "ours,trainer", "--tokens", str(s.sizes.bench_tokens), "--repeats", "1",
                      "--max-length", str(s.sizes.large_length), "--out", str(result)])  # fmt: skip
    arms = json.loads(result.read_text())["arms"]
    return {**arms, "ok": set(arms) == {"ours", "trainer"}}


def plan_checks(s: Setup) -> tuple[dict[str, Callable[[], dict]], dict[str, str]]:
    """The checks to run on `s.device`, in order, and those skipped there with the reason."""
    checks = {
        "inputs": lambda: make_inputs(s),
        "precision_policy": check_policy,
        "chunked_loss_vs_plain": lambda: check_loss_parity(s),
        "chunked_loss_speed": lambda: check_loss_speed(s),
        "packing_probe": lambda: check_packing(s),
        "training_16bit": lambda: check_training(s),
        "resume_fp16": lambda: check_resume(s),
        "inference_parity": lambda: check_inference(s),
        "memory_gpt2_medium_8x512": lambda: check_memory(s),
        "batch_size_auto": lambda: check_batch_size_auto(s),
        "throughput_train_bench": lambda: check_throughput(s),
    }
    skipped = CUDA_ONLY if s.device == "cpu" else {}
    return {name: c for name, c in checks.items() if name not in skipped}, dict(skipped)


# ----------------------------------------------------------------------------------------------------------
# Running the checks and reporting


def describe(e: BaseException) -> str:
    """`Type: message`; for the exit of an entry point, also the error it reported (the exception it handled)."""
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, SystemExit) and e.__context__ is not None:
        text = f"SystemExit({e.code}) after {type(e.__context__).__name__}: {e.__context__}"
    return text


def interrupted(e: BaseException) -> bool:
    """Ctrl-C, also once an entry point has turned it into its exit status."""
    return isinstance(e, KeyboardInterrupt) or isinstance(e.__context__, KeyboardInterrupt)


def run_checks(checks: dict[str, Callable[[], dict]], results: dict, out: Path) -> dict:
    """Run each check, recording its result or error under results["checks"]; gpu_check.json is rewritten after
    each, and both reports are written whatever happens. Ctrl-C stops the run (KeyboardInterrupt)."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        for name, check in checks.items():
            start, stop = time.perf_counter(), False
            try:
                r = check()
            except BaseException as e:  # SystemExit too: the entry points turn a UserError into exit status 2
                r = {"ok": False, "error": describe(e), "traceback": traceback.format_exc()[-3000:]}
                stop = interrupted(e)
            r["seconds"] = time.perf_counter() - start
            results["checks"][name] = r
            print(f"{name}: {'ok' if r.get('ok') else 'FAILED'} ({r['seconds']:.1f} s)", flush=True)
            (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
            if stop:
                raise KeyboardInterrupt
    finally:
        results["not_run"] = [name for name in checks if name not in results["checks"]]
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "gpu_check.md").write_text(report_markdown(results))
    return results


def report_markdown(results: dict) -> str:
    checks, skipped = results["checks"], results.get("skipped", {})
    failed = [name for name, r in checks.items() if not r.get("ok")]
    lines = ["# qlora-ft GPU check", "", f"Command: `{results.get('command', 'python bench/gpu_check.py OUT_DIR')}`, "
             f"{results['device']}", "",
             f"{len(checks) - len(failed)} passed, {len(failed)} failed ({', '.join(failed) or 'none'}), "
             f"{len(skipped)} skipped, {len(results.get('not_run', []))} not run (interrupted).", "",
             "| check | ok | seconds | details |", "| --- | --- | --- | --- |"]  # fmt: skip
    for name, r in checks.items():
        details = {k: v for k, v in r.items() if k not in ("ok", "seconds", "error", "traceback")}
        text = r.get("error") or json.dumps(details, default=str)
        lines.append(f"| {name} | {'yes' if r.get('ok') else 'NO'} | {r['seconds']:.1f} | `{cell(text)}` |")
    lines += [f"| {name} | skipped | - | {cell(reason)} |" for name, reason in skipped.items()]
    lines += [f"| {name} | not run | - | interrupted |" for name in results.get("not_run", [])]
    return "\n".join(lines) + "\n"


def cell(text: str) -> str:
    """`text` as one Markdown table cell: one line, no column breaks or code-span ends, at most 1,500 characters."""
    return " ".join(text.split()).replace("|", "\\|").replace("`", "'")[:1500]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="where the reports and the runs' files go")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a dry run at tiny sizes, skipping the CUDA-only measurements")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" and "torch" not in sys.modules:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the package's entry points would pick up a GPU that is there
    problem = preflight(args.device)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    import torch

    logging.basicConfig(level=logging.WARNING)
    s = Setup(args.device, CPU if args.device == "cpu" else GPU, args.out_dir / "work")
    shutil.rmtree(s.work, ignore_errors=True)  # the runs of an earlier check: training refuses non-empty folders
    s.work.mkdir(parents=True)
    os.environ.setdefault("QLORA_FT_CACHE", str(s.work / "token-cache"))  # everything it writes under OUT_DIR
    checks, skipped = plan_checks(s)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    results = {"device": device, "torch": torch.__version__, "sizes": asdict(s.sizes), "skipped": skipped,
               "command": "python bench/gpu_check.py" + (" --device cpu" if args.device == "cpu" else "") + " OUT_DIR",
               "checks": {}}  # fmt: skip
    try:
        run_checks(checks, results, args.out_dir)
    except KeyboardInterrupt:
        print("gpu_check: interrupted", file=sys.stderr)
        return 130
    return 0 if all(r.get("ok") for r in results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
