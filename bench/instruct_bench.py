"""Instruction tuning throughput with packing vs padding (`--packing True/False`): real tokens/s and response
tokens/s, one `python train.py` run per arm with the instruction mode's defaults.

    python bench/instruct_bench.py --model ../shared/models/mini-gpt2-fiction \\
        --data ../shared/data/instructions/instruction-data.json --max-steps 20

Real tokens/s is the run's train_summary.json `tokens_per_second`: non-pad tokens (prompts and responses) over
the training loop's time, which with `--max-steps` inside the first epoch holds no validation (the loop
validates before it starts and after it ends) and no samples (`--sample-every 0`). Response tokens/s is that
times the share of labelled tokens (responses + EOS) in the training split, counted from the data as the run
prepares it (`data.prepare.prepare_data`); a few dozen steps see a sample of the records, so it is an estimate.
Writes bench/results/instruct-bench.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_ft.config import TrainConfig  # noqa: E402
from qlora_ft.data.prepare import prepare_data  # noqa: E402
from qlora_ft.model import load_tokenizer  # noqa: E402
from qlora_ft.options import parse_config  # noqa: E402


def shared_argv(args) -> list[str]:
    return ["--data", args.data, "--model", args.model, "--batch-size", str(args.batch_size),
            "--max-input-length", str(args.max_input_length), "--seed", str(args.seed)]  # fmt: skip


def response_share(args) -> float:
    """Labelled (response) tokens / all tokens of the training split, as the run encodes it."""
    cfg = parse_config(TrainConfig, shared_argv(args), "train.py", "")
    train = prepare_data(cfg, load_tokenizer(args.model)).train
    return sum(int(train.mask(k).sum()) for k in range(len(train))) / int(train.lengths.sum())


def run_arm(packing: bool, args, work: Path) -> dict:
    out_dir = work / f"packing-{packing}"
    cmd = [sys.executable, str(ROOT / "train.py"), *shared_argv(args), "--packing", str(packing),
           "--max-steps", str(args.max_steps), "--sample-every", "0", "--save-interval", "0",
           "--output-dir", str(out_dir / "run"), "--check-dir", str(out_dir / "ckpt")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"--packing {packing} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    s = json.loads((out_dir / "run" / "train_summary.json").read_text())
    return {"steps": s["steps"], "train_tokens": s["train_tokens"], "train_seconds": s["train_seconds"],
            "tokens_per_second": s["tokens_per_second"], "tokens_per_step": s["train_tokens"] / s["steps"],
            "final_val_loss": s["final_val_loss"], "wall_seconds": wall}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT.parent / "shared/models/mini-gpt2-fiction"))
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/instructions/instruction-data.json"))
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-input-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=str(ROOT / "bench/results/instruct-bench.json"))
    args = p.parse_args()
    share = response_share(args)
    arms: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="instruct-bench-") as work:
        for packing in (True, False):
            arm = run_arm(packing, args, Path(work))
            arm["response_tokens_per_second"] = arm["tokens_per_second"] * share
            arms[f"packing={packing}"] = arm
            print(f"packing={packing}: {arm['tokens_per_second']:.0f} tokens/s", flush=True)
    print(f"\nresponse share of training tokens: {share:.3f}\n")
    print("| arm | real tokens/s | response tokens/s | real tokens/step | steps | train s |\n|---|---|---|---|---|---|")
    for name, a in arms.items():
        print(f"| {name} | {a['tokens_per_second']:.0f} | {a['response_tokens_per_second']:.0f} | "
              f"{a['tokens_per_step']:.0f} | {a['steps']} | {a['train_seconds']:.0f} |")  # fmt: skip
    command = "python bench/instruct_bench.py " + " ".join(sys.argv[1:])
    Path(args.out).write_text(json.dumps({"command": command, "response_share": share,
                                          "settings": {k: v for k, v in vars(args).items() if k != "out"},
                                          "arms": arms}, indent=2) + "\n")  # fmt: skip
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
