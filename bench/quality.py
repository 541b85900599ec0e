"""Which training methods give better models at the defaults people run: each candidate trained as a new user
would (`python train.py --data X`, nothing else given) plus the candidate's flags, over several seeds, and scored
with `qlora-ft eval`.

    # instructions: 2 epochs of the shared records (the mode's defaults), 3 seeds
    python bench/quality.py --mode instructions --seeds 1 2 3
    # style (Austen): screen at 300 steps, then confirm at the full defaults (3 epochs) with one seed
    python bench/quality.py --mode style --max-steps 300 --seeds 1 2 3
    python bench/quality.py --mode style --candidates defaults dora loraplus --seeds 1
    # another model (a local folder), with flags every run shares
    python bench/quality.py --model /tmp/smollm2-135m-instruct --mode style --max-steps 300 --seeds 1 \
        --flags "--max-input-length 128 --gradient-checkpointing False"

Each run is `python train.py --model MODEL --data DATA --seed S [--max-steps N] <--flags> <candidate flags>` in a
subprocess (MODEL: `--model`, by default ../shared/models/mini-gpt2-fiction), then `python -m qlora_ft eval` on
its output folder:
- instructions: response perplexity, ROUGE-L and format adherence on the run's validation records (the 100 of
  the shared file's 10% split; greedy, `--max-new-tokens` new tokens; `--n-prompts` of them answered);
- style: perplexity on the held-out Austen paragraphs and the share of `--n-generations` generations (fixed
  seed) that eval's classifier judges Austen, against the shared Dickens (`--contrast`).
Wall time of training and of eval per run. Per candidate: the mean over seeds and the spread (min-max).
Writes bench/results/quality-<mode>[-<label>].json and prints a Markdown table (also written beside it, .md).
A candidate's flags may combine others': `original+dora`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "mini-gpt2-fiction"
DATA = {"instructions": SHARED / "data" / "instructions" / "instruction-data.json",
        "style": SHARED / "data" / "corpora" / "austen"}  # fmt: skip
CONTRAST = SHARED / "data" / "corpora" / "dickens"

# name -> train.py flags beside the mode's defaults
CANDIDATES: dict[str, str] = {
    "defaults": "",
    "dora": "--dora",
    "rslora": "--rslora",
    "no-rslora": "--rslora False",  # the text mode's defaults before rsLoRA became one of them
    "loraplus": "--loraplus-ratio 16",
    "neftune": "--neftune-alpha 5",
    "best": "--output-best",
    # more capacity, a higher rate or a longer run: closing the gap to full fine-tuning
    "lr2e-3": "--lr 2e-3",
    "lr3e-3": "--lr 3e-3",
    "lr5e-3": "--lr 5e-3",
    "alpha64": "--alpha-lora 64",
    "r64": "--rank-lora 64",
    "epochs4": "--epochs 4",
    "lora32": "--qlora False --lora True",  # LoRA on the 32-bit base: what 4-bit quantization of the base costs
    # the original style approach's flags (r 64, alpha 16, lr 5e-4, 300 steps, 100-token windows)
    "original": "--rank-lora 64 --alpha-lora 16 --lr 5e-4 --max-steps 300 --max-input-length 100",
    # full fine-tuning, the reference row of the instruction table (its best lr)
    **{f"full-{lr}": f"--qlora False --lora False --lr {lr}" for lr in ("5e-5", "1e-4", "2e-4", "5e-4")},
}
DEFAULT_CANDIDATES = {
    "instructions": ["defaults", "dora", "rslora", "loraplus", "neftune", "best", "full-5e-5", "full-1e-4",
                     "full-2e-4", "full-5e-4"],
    "style": ["defaults", "no-rslora", "dora", "loraplus", "neftune", "best", "original"],
}  # fmt: skip


def flags_of(name: str) -> list[str]:
    """`dora+neftune` -> the flags of both."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidate {'+'.join(unknown)}; known: {', '.join(CANDIDATES)}")
    return [flag for p in parts for flag in CANDIDATES[p].split()]


def run(cmd: list[str], log_path: Path, threads: int | None) -> float:
    """Run `cmd` from the project root, its output into `log_path`; its wall time in seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with log_path.open("w") as log:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log_path}")
    return time.perf_counter() - start


def train_and_eval(args, name: str, seed: int, work: Path) -> dict:
    out = work / f"{name}-seed{seed}"
    train = [sys.executable, "train.py", "--model", args.model, "--data", str(DATA[args.mode]), "--seed", str(seed),
             "--output-dir", str(out), "--check-dir", str(work / f"ckpt-{name}-seed{seed}"), "--sample-every", "0",
             *(["--max-steps", str(args.max_steps)] if args.max_steps else []), *args.flags.split(),
             *flags_of(name)]  # fmt: skip
    # (--sample-every 0: in-training samples change no weight, and cost time the table would count)
    train_s = run(train, work / f"{name}-seed{seed}-train.log", args.threads)
    evaluate = [sys.executable, "-m", "qlora_ft", "eval", "--model_path", str(out), "--seed", "42"]
    if args.mode == "instructions":
        evaluate += ["--n-prompts", str(args.n_prompts), "--max-length", str(args.max_new_tokens)]
    else:
        evaluate += ["--contrast", str(CONTRAST), "--n-generations", str(args.n_generations)]
    eval_s = run(evaluate, work / f"{name}-seed{seed}-eval.log", args.threads)
    result = json.loads((out / "eval.json").read_text())
    summary = json.loads((out / "train_summary.json").read_text())
    row = {"candidate": name, "seed": seed, "flags": " ".join(flags_of(name)), "train_seconds": train_s,
           "eval_seconds": eval_s, "steps": summary["steps"], "output_step": summary.get("output_step"),
           "device": summary["device"]}  # fmt: skip
    if args.mode == "instructions":
        row.update(response_perplexity=result["response_perplexity"]["fine_tuned"],
                   rouge_l=result["rouge_l"]["fine_tuned"],
                   format_adherence=100 * result["format"]["fine_tuned"]["adherence"],
                   n_prompts=result["generation"]["n_prompts"],
                   base={"response_perplexity": result["response_perplexity"]["base"],
                         "rouge_l": result["rouge_l"]["base"],
                         "format_adherence": 100 * result["format"]["base"]["adherence"]})  # fmt: skip
    else:
        ppl = result["perplexity"]
        row.update(held_out_perplexity=ppl["fine_tuned"], perplexity_drop=100 * ppl["reduction"],
                   judged_share=100 * result["style"]["judged_target"]["fine_tuned"]["share"],
                   base_perplexity=ppl["base"])  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


METRICS = {"instructions": [("response_perplexity", "response ppl", "lower"), ("rouge_l", "ROUGE-L", "higher"),
                            ("format_adherence", "format %", "higher")],
           "style": [("held_out_perplexity", "held-out ppl", "lower"), ("perplexity_drop", "ppl drop %", "higher"),
                     ("judged_share", "judged Austen %", "higher")]}  # fmt: skip


def table(mode: str, rows: list[dict]) -> str:
    """One line per candidate: each metric's mean over seeds and its spread (min-max), steps, wall times."""
    metrics = METRICS[mode]
    head = ["candidate", "flags", "seeds", *[f"{label} ({better})" for _, label, better in metrics], "steps",
            "train s", "eval s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in dict.fromkeys(r["candidate"] for r in rows):
        mine = [r for r in rows if r["candidate"] == name]

        def cell(key: str, digits: int = 3, mine: list[dict] = mine) -> str:
            values = [r[key] for r in mine]
            spread = f" ({min(values):.{digits}g}–{max(values):.{digits}g})" if len(values) > 1 else ""
            return f"{statistics.fmean(values):.{digits}g}{spread}"

        steps = "/".join(sorted({str(r["steps"]) if r["output_step"] in (None, r["steps"]) else
                                 f"{r['steps']} (best {r['output_step']})" for r in mine}))  # fmt: skip
        lines.append("| " + " | ".join([name, f"`{mine[0]['flags']}`" if mine[0]["flags"] else "", str(len(mine)),
                                        *[cell(key) for key, _, _ in metrics], steps, cell("train_seconds", 4),
                                        cell("eval_seconds", 4)]) + " |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=list(DATA), default="instructions")
    p.add_argument("--model", default=str(MODEL), help="the base model: a local folder (default: the mini GPT-2)")
    p.add_argument("--flags", default="", help="train.py flags every run shares, as one string")
    p.add_argument("--candidates", nargs="+", help="names from CANDIDATES, combined with + (default: the mode's)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--max-steps", type=int, help="screening budget (default: the mode's full defaults)")
    p.add_argument("--n-prompts", type=int, default=100, help="instructions: validation records answered")
    p.add_argument("--max-new-tokens", type=int, default=64, help="instructions: greedy new tokens per answer")
    p.add_argument("--n-generations", type=int, default=100, help="style: generations judged per model")
    p.add_argument("--label", default="", help="suffix of the result files (e.g. smoke)")
    p.add_argument("--work-dir", help="where runs go, kept (<candidate>-seed<S>; default: a temporary folder)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each run (default: torch's choice)")
    args = p.parse_args()
    if not Path(args.model).is_dir() or not DATA[args.mode].exists():
        raise SystemExit(f"needs {args.model} and {DATA[args.mode]} (../shared beside the checkout)")
    candidates = args.candidates or DEFAULT_CANDIDATES[args.mode]
    for name in candidates:
        flags_of(name)  # an unknown name fails before anything runs
    command = "python bench/quality.py " + shlex.join(sys.argv[1:])
    stem = ROOT / "bench" / "results" / f"quality-{args.mode}{'-' + args.label if args.label else ''}"
    # rows already measured by an interrupted run of the same command are kept, not run again
    done = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").is_file() else {}
    rows = done.get("rows", []) if done.get("command") == command else []
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="quality-")))
        work.mkdir(parents=True, exist_ok=True)
        for name in candidates:
            for seed in args.seeds:
                if not any(r["candidate"] == name and r["seed"] == seed for r in rows):
                    rows.append(train_and_eval(args, name, seed, work))
                    write(args, command, stem, rows)
    print(write(args, command, stem, rows))


def write(args, command: str, stem: Path, rows: list[dict]) -> str:
    """The rows so far as JSON and as a Markdown table beside it; returns the table."""
    device = rows[0]["device"] if rows[0]["device"] != "cpu" else f"{os.cpu_count()}-core CPU ({platform.machine()})"
    if args.threads:
        device += f", {args.threads} thread{'s' if args.threads > 1 else ''} per run"
    markdown = table(args.mode, rows)
    meta = {"command": command, "device": device, "model": Path(args.model).name,
            "data": str(DATA[args.mode].relative_to(SHARED.parent)), "max_steps": args.max_steps}  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(f"`{command}` on {meta['device']}\n\n{markdown}\n")
    return markdown


if __name__ == "__main__":
    main()
