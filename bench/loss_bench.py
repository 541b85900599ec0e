"""The chunked output-layer loss: qlora_ft.loss (ours) against torch's F.linear_cross_entropy (torch >= 2.13).

For each compute dtype, times forward + backward of the summed next-token loss over N tokens through a
GPT-2-sized output layer (V = 50,257), median of --repeats, with the error of the loss and of the hidden
states' gradient against a float64 reference. 16-bit runs happen under autocast, as in training (trainable
weights stay float32). On CUDA it also reports the peak allocated memory of one call.

    python bench/loss_bench.py                          # CPU, N=1024, d=768
    python bench/loss_bench.py --device cuda --tokens 8192 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_ft.loss import _torch_linear_cross_entropy, linear_cross_entropy  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(impl: str, dtype: torch.dtype, hidden, weight, targets, chunk: int, repeats: int) -> dict:
    """Median seconds of forward + backward, errors against float64, CUDA peak memory (bytes) of one call."""
    device = hidden.device
    ref_h = hidden.detach().double().requires_grad_()
    ref = F.cross_entropy(ref_h @ weight.detach().double().t(), targets, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, ref_h)
    times, peak = [], 0
    for _ in range(repeats + 1):  # the first call warms up
        h = hidden.detach().clone().requires_grad_()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = linear_cross_entropy(h, weight, targets, chunk, use_torch=impl == "torch")
        loss.backward()
        _sync(device)
        times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
    return {
        "impl": impl,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": statistics.median(times[1:]),
        "loss_rel_error": abs(float(loss.detach()) - float(ref.detach())) / abs(float(ref.detach())),
        "grad_rel_error": float((h.grad.double() - ref_grad).norm() / ref_grad.norm()),
        "peak_bytes": peak or None,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, device=device)
    weight = torch.randn(args.vocab, args.hidden, device=device) * 0.02  # a frozen (LoRA) head
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    impls = ["ours"] + (["torch"] if _torch_linear_cross_entropy() else [])
    rows = []
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, N={args.tokens}, "
          f"d={args.hidden}, V={args.vocab}, chunk={args.chunk}")  # fmt: skip
    print(f"{'dtype':9} {'impl':6} {'seconds':>8} {'loss rel err':>13} {'grad rel err':>13} {'peak MiB':>9}")
    for name in args.dtypes.split(","):
        for impl in impls:
            row = measure(impl, DTYPES[name], hidden, weight, targets, args.chunk, args.repeats)
            rows.append(row)
            peak = f"{row['peak_bytes'] / 2**20:.0f}" if row["peak_bytes"] else "-"
            print(f"{name:9} {impl:6} {row['seconds']:8.3f} {row['loss_rel_error']:13.2e} "
                  f"{row['grad_rel_error']:13.2e} {peak:>9}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "torch": torch.__version__, **vars(args),
                                         "json": str(args.json), "rows": rows}, indent=1))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
