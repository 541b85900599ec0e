"""In-training sampling on CPU: bitsandbytes' 4-bit path against a dequantised float copy with the LoRA merged.

For each model: the base in 4-bit NF4 with LoRA at the text defaults (r 64, alpha 16, the architecture's
targets; B drawn at random, as training leaves it), then greedy continuations of one prompt, `--new-tokens`
each, from the 4-bit model and from `dequantized_copy` of it, the two paths alternating `--rounds` times in
one process so that machine noise hits both alike. Reported per model and path: tokens/s (median), the copy's
build time and the memory it adds (its bytes by arithmetic and the RSS measured before and after building it),
and whether the greedy tokens agree (else the top-2 logit gap where they first part: a near-tie is < 0.1).

    python bench/sample_bench.py --models mini smollm2 gpt2-medium --smollm2 /tmp/smollm2-hf-s

`mini` is ../shared/models/mini-gpt2-fiction, `smollm2` a folder written by its `to_hf.py`, `gpt2-medium` a
random GPT2Config(n_layer=24, n_embd=1024, n_head=16) (speed does not depend on the weights). Writes
bench/results/sample-bench.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlora_ft.config import ModelArgs  # noqa: E402
from qlora_ft.model import add_lora, dequantized_bytes, dequantized_copy, keep_training_layout, load_base  # noqa: E402

MINI = ROOT.parent / "shared" / "models" / "mini-gpt2-fiction"
CPU = torch.device("cpu")


def model_dir(name: str, smollm2: str, tmp: Path) -> str:
    if name == "mini":
        return str(MINI)
    if name == "smollm2":
        return smollm2
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp / name
    GPT2LMHeadModel(GPT2Config(n_layer=24, n_embd=1024, n_head=16)).save_pretrained(path)
    return str(path)


def rss() -> int:
    return psutil.Process().memory_info().rss


def timed_greedy(model, ids: torch.Tensor, n: int) -> tuple[float, list[int]]:
    """Tokens/s of `n` greedy new tokens (KV cache, as `generate` runs in training samples), and the tokens."""
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0)  # fmt: skip
    return n / (time.perf_counter() - started), out[0, ids.shape[1] :].tolist()


def first_gap(model, ids: torch.Tensor, a: list[int], b: list[int]) -> dict:
    """Where two greedy continuations first part, and the 4-bit model's top-2 logit gap there."""
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
    if at is None:
        return {"equal": True}
    with torch.no_grad():
        top2 = model(torch.cat([ids, torch.tensor([a[:at]], dtype=ids.dtype)], 1)).logits[0, -1].topk(2).values
    return {"equal": False, "first_difference": at, "top2_gap": float(top2[0] - top2[1])}


def measure(name: str, path: str, rounds: int, new_tokens: int) -> dict:
    torch.manual_seed(0)
    model = add_lora(load_base(path, True, torch.float32, CPU), ModelArgs(model=path, rank_lora=64, alpha_lora=16))
    keep_training_layout(model)  # as during training
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    model.eval()
    ids = torch.tensor([[0, 464, 3329, 373, 257, 1310, 1110]])  # a short prompt's ids (in every vocabulary here)
    before = rss()
    started = time.perf_counter()
    copy = dequantized_copy(model)
    build_s = time.perf_counter() - started
    added = rss() - before
    speeds: dict[str, list[float]] = {"4-bit": [], "dequantised copy": []}
    tokens = {}
    for _ in range(rounds):  # alternating: the same machine load for both
        for label, m in (("4-bit", model), ("dequantised copy", copy)):
            speed, tokens[label] = timed_greedy(m, ids, new_tokens)
            speeds[label].append(speed)
    return {"model": name, "copy_bytes": dequantized_bytes(model), "copy_rss_added": added, "copy_build_s": build_s,
            "tokens_per_s": {k: statistics.median(v) for k, v in speeds.items()}, "runs": speeds,
            "greedy": first_gap(model, ids, tokens["4-bit"], tokens["dequantised copy"])}  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = ["| model | 4-bit: tokens/s | dequantised copy: tokens/s | speed-up | copy: MB (RSS added) | copy: build s "
             "| greedy tokens |", "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        a, b = r["tokens_per_s"]["4-bit"], r["tokens_per_s"]["dequantised copy"]
        g = r["greedy"]
        same = "equal" if g["equal"] else f"part at {g['first_difference']} (top-2 gap {g['top2_gap']:.3f})"
        lines.append(f"| {r['model']} | {a:.1f} | {b:.1f} | {b / a:.2f}× | {r['copy_bytes'] / 1e6:.0f} "
                     f"({r['copy_rss_added'] / 1e6:.0f}) | {r['copy_build_s']:.2f} | {same} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mini", "smollm2", "gpt2-medium"])
    parser.add_argument("--smollm2", default="/tmp/smollm2-hf-s", help="SmolLM2 folder written by its to_hf.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sample-bench.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows.append(measure(name, model_dir(name, args.smollm2, Path(tmp)), args.rounds, args.new_tokens))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    report = {"command": "python bench/sample_bench.py " + " ".join(sys.argv[1:]), "threads": torch.get_num_threads(),
              "device": f"{os.cpu_count()}-core CPU", "load_average": os.getloadavg(), "results": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
