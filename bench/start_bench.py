"""Start-up benchmark: how long `python train.py` on a large plain-text corpus takes to its first training step,
and its peak memory, when the token cache is built (cold), found (warm), and when a checkpoint is resumed.

Corpora: `data_bench.write_corpus` (the shared novels' paragraphs, words shuffled, `scale` copies, one
book-layout .txt). Every run is `python train.py --qlora True --model MODEL --data CORPUS` with the default batch
and length, `--max-steps 2 --save-every-steps 1 --log-every 1 --sample-every 0`, a cache folder of its own per
scale, in a subprocess. "Ready": from launch until the log says where checkpoints go (data, model, optimizer
and plan built); "to first step": until the first training-step row appears in metrics.jsonl (polled every
50 ms); "peak RSS" is the subprocess's own maximum resident set (`os.wait4`). The three runs:

- cold: empty cache folder, so the corpus is read, hashed and tokenized into the cache first;
- warm: a new run on the same corpus (cache hit: hash the file, open the memory maps, split, cut windows);
- resume: `--restore-file step-000001` into the warm run's folders, to the next step (no base validation).

A fresh run (cold, warm) validates the base model on `--eval-max-tokens` tokens (default 8,192) before its
first step; that part does not grow with the corpus. The resume does not.

    python bench/start_bench.py --scales 1 16 --out bench/results/train-start.json
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
sys.path.insert(0, str(ROOT / "bench"))

from data_bench import SHARED, write_corpus  # noqa: E402


def run_to_first_step(argv: list[str], out_dir: Path, rows_before: int = 0, timeout: float = 3600) -> dict:
    """Launch train.py with `argv`; seconds until ready and until metrics.jsonl has more than `rows_before` step rows,
    total seconds,
    peak RSS (MB) and the log's `data:` and `validation:` lines."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    metrics, log_path = out_dir / "metrics.jsonl", out_dir.with_name(out_dir.name + ".log")
    started, first, built = time.perf_counter(), None, None
    seen = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
        while True:  # wait4, not Popen.wait: it returns the child's own resource usage (peak RSS)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = time.perf_counter() - started
            if first is None and metrics.is_file() and _step_rows(metrics) > rows_before:
                first = now
            if built is None and "checkpoints go to" in log_path.read_text(errors="replace")[seen:]:
                built = now  # logged when data, model and optimizer are ready, before the base model's validation
            if time.perf_counter() - started > timeout:
                proc.kill()
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    total = time.perf_counter() - started
    stderr = log_path.read_text(errors="replace")[seen:]
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed ({proc.returncode}):\n{stderr[-3000:]}")
    lines = [line.split(" - ", 1)[-1] for line in stderr.splitlines()]
    return {"to_ready_s": round(built, 2) if built else None, "to_first_step_s": round(first, 2) if first else None,
            "total_s": round(total, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "log": [x for x in lines if "data:" in x or "validation:" in x or "token cache" in x]}  # fmt: skip


def _step_rows(metrics: Path) -> int:
    """Training-step rows of metrics.jsonl (validation rows hold `val_loss` and no `loss`)."""
    return sum('"loss"' in line for line in metrics.read_text().splitlines())


def bench_scale(scale: int, tmp: Path, model: str) -> list[dict]:
    corpus = write_corpus(tmp, scale)
    cache, rows = tmp / f"cache-{scale}x", []
    common = ["--qlora", "True", "--model", model, "--data", str(corpus), "--cache-dir", str(cache),
              "--max-steps", "2", "--save-every-steps", "1", "--log-every", "1", "--sample-every", "0"]  # fmt: skip
    for arm in ("cold", "warm"):
        out, ckpt = tmp / f"{arm}-{scale}x", tmp / f"{arm}-{scale}x-ckpt"
        result = run_to_first_step([*common, "--output-dir", str(out), "--check-dir", str(ckpt)], out)
        rows.append({"scale": scale, "arm": arm, "corpus_mb": round(corpus.stat().st_size / 1e6, 1), **result})
        print(json.dumps(rows[-1]), flush=True)
    out, ckpt = tmp / f"warm-{scale}x", tmp / f"warm-{scale}x-ckpt"
    done = _step_rows(out / "metrics.jsonl")
    resumed = [*common[:-8], "--max-steps", "3", "--save-every-steps", "1", "--log-every", "1", "--sample-every",
               "0", "--output-dir", str(out), "--check-dir", str(ckpt), "--restore-file", "step-000001"]  # fmt: skip
    result = run_to_first_step(resumed, out, rows_before=done)
    rows.append({"scale": scale, "arm": "resume", "corpus_mb": round(corpus.stat().st_size / 1e6, 1), **result})
    print(json.dumps(rows[-1]), flush=True)
    meta = next(p for p in cache.iterdir() if not p.name.startswith(".")) / "meta.json"
    tokens = json.loads(meta.read_text())["n_tokens"]
    for row in rows[-3:]:
        row["tokens"] = tokens
    corpus.unlink()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| corpus | tokens | run | ready to train (s) | to first step (s) | peak RSS (MB) |",
             "|---|---:|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['scale']}x ({r['corpus_mb']:.0f} MB) | {r['tokens'] / 1e6:.1f}M | {r['arm']} | "
                     f"{r['to_ready_s']} | {r['to_first_step_s']} | {r['peak_rss_mb']} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--model", default=str(SHARED / "models" / "mini-gpt2-fiction"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train-start.json"))
    args = parser.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="start-bench-") as tmp:
        for scale in args.scales:
            rows += bench_scale(scale, Path(tmp), args.model)
    print(table(rows))
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), "unknown")  # fmt: skip
    command = "python bench/start_bench.py " + " ".join(sys.argv[1:])
    Path(args.out).write_text(json.dumps({"command": command, "device": f"{cpu}, {os.cpu_count()} cores",
                                          "load_average": os.getloadavg(), "rows": rows}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
