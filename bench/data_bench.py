"""Data-path benchmark: the token cache (build cold, open warm) at corpus sizes 1x, 4x, 16x the shared novels,
extrapolated to WikiText-103's ~120M GPT-2 tokens.

The synthetic corpora are the shared novels' paragraphs with their words shuffled (fixed seed, a different
shuffle for every copy), written as one book-layout .txt per scale to a temporary folder, so no two copies share
a paragraph and nothing can be served from an earlier cache by accident. Every measurement runs in a fresh
subprocess so that its peak RSS (getrusage) is its own:

- build 1 core: `open_cache(workers=1)` of the plain-text recipe into an empty cache folder (read, hash,
  tokenize, write);
- build N cores (processes): the same with a pool of N spawned tokenizer workers (`parallel="processes"`);
- build N cores (threads): one process, the tokenizers library's own threads (`parallel="threads"`, the default);
- open warm: open the cache, cut 1024-token windows, compute the split (no stored split).

The in-memory path of earlier versions, once measured here as a further arm, is gone (docs/data-cache.md keeps its
numbers).

    python bench/data_bench.py --scales 1 4 --out bench/results/data-cache.json

Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TARGET_TOKENS = 120_000_000  # WikiText-103's training split with the GPT-2 tokenizer, roughly


def write_corpus(out: Path, scale: int, seed: int = 0) -> Path:
    """`scale` word-shuffled copies of every shared novel paragraph, as one book-layout text file."""
    sys.path.insert(0, str(ROOT))
    from qlora_ft.data.records import clean_paragraph
    from qlora_ft.data.sources import iter_text_file

    books = sorted((SHARED / "data" / "corpora").glob("*/*.txt"))
    paragraphs = [p for f in books for p in map(clean_paragraph, iter_text_file(f, "book")) if p]
    rng = random.Random(seed)
    path = out / f"corpus-{scale}x.txt"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(scale):
            for p in paragraphs:
                words = p.split()
                rng.shuffle(words)
                f.write(" ".join(words) + "\n\n")
    return path


def _child(args: argparse.Namespace) -> None:
    """One measurement in this process; prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    from transformers import AutoTokenizer

    from qlora_ft.data.batches import cut_windows
    from qlora_ft.data.prepare import Recipe, open_cache
    from qlora_ft.data.split import split_records

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    started = time.perf_counter()
    result: dict = {}
    if args.measure.startswith("build"):
        c = open_cache(args.corpus, tok, Recipe(), cache_dir=args.cache_dir, workers=args.workers,
                       parallel=args.parallel)  # fmt: skip
        assert c.built
        result.update(tokens=c.n_tokens, records=c.n_records, disk_bytes=sum(c.meta["files"].values()))
    else:
        c = open_cache(args.corpus, tok, Recipe(), cache_dir=args.cache_dir)
        assert not c.built
        for split in c.path.glob("split-*.npy"):
            split.unlink()
        train, _ = split_records(c, seed=0, train_share=0.9)
        windows = cut_windows(c, train, 1024)
        result.update(tokens=c.n_tokens, windows=len(windows), checksum=int(np.asarray(windows.lengths).sum()))
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["workers_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(result))


def measure(name: str, corpus: Path, cache_dir: Path, tokenizer: str, workers: int, parallel: str) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--corpus", str(corpus), "--cache-dir", str(cache_dir),
           "--tokenizer", tokenizer, "--workers", str(workers), "--parallel", parallel]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}  # as the CLI sets it; the builder decides
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_scale(scale: int, tmp: Path, tokenizer: str, cores: int) -> list[dict]:
    corpus = write_corpus(tmp, scale)
    size = corpus.stat().st_size
    arms = [
        ("build 1 core", "build", 1, "threads"),
        (f"build {cores} cores (processes)", "build", cores, "processes"),
        (f"build {cores} cores (threads)", "build", cores, "threads"),
        ("open warm + split + windows", "open", 1, "threads"),
    ]
    rows = []
    for i, (label, kind, workers, parallel) in enumerate(arms):
        cache_dir = tmp / f"cache-{scale}x-{0 if kind == 'open' else i}"  # "open" opens what the 1-core build wrote
        r = measure(kind, corpus, cache_dir, tokenizer, workers, parallel)
        r.update(arm=label, scale=scale, corpus_mb=size / 1e6, tokens_per_second=r["tokens"] / r["seconds"])
        rows.append(r)
        print(f"  {scale}x {label}: {r['seconds']:.1f}s, {r['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    return rows


def extrapolate(rows: list[dict]) -> list[dict]:
    """Each arm at 120M tokens: time linear in tokens; RSS from the growth between the two largest scales."""
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["tokens"])
        last = mine[-1]
        seconds = last["seconds"] / last["tokens"] * TARGET_TOKENS
        if len(mine) > 1:
            a, b = mine[-2], mine[-1]
            slope = (b["peak_rss_mb"] - a["peak_rss_mb"]) / (b["tokens"] - a["tokens"])
            rss = b["peak_rss_mb"] + slope * (TARGET_TOKENS - b["tokens"])
        else:
            rss = float("nan")
        out.append({"arm": arm, "tokens": TARGET_TOKENS, "seconds": seconds, "peak_rss_mb": rss,
                    "disk_bytes": last.get("disk_bytes", 0) / last["tokens"] * TARGET_TOKENS or None})  # fmt: skip
    return out


def table(rows: list[dict], extra: list[dict]) -> str:
    lines = ["| corpus | arm | tokens | time (s) | tokens/s | peak RSS (MB) | cache on disk (MB) |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        disk = f"{r['disk_bytes'] / 1e6:.0f}" if r.get("disk_bytes") else ""
        speed = r["tokens_per_second"] / 1e6
        lines.append(f"| {r['scale']}x ({r['corpus_mb']:.0f} MB) | {r['arm']} | {r['tokens'] / 1e6:.1f}M | "
                     f"{r['seconds']:.1f} | {speed:.2f}M | {r['peak_rss_mb']:.0f} | {disk} |")  # fmt: skip
    for r in extra:
        disk = f"{r['disk_bytes'] / 1e6:.0f}" if r.get("disk_bytes") else ""
        lines.append(f"| 120M tokens (extrapolated) | {r['arm']} | 120M | {r['seconds']:.0f} | | "
                     f"{r['peak_rss_mb']:.0f} | {disk} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tokenizer", default=str(SHARED / "data" / "gpt2-tokenizer"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "data-cache.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--parallel", default="threads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.measure = args.child
        _child(args)
        return
    sys.path.insert(0, str(ROOT))
    from qlora_ft.data.encode import available_cores

    cores = available_cores()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
        for scale in args.scales:
            rows += bench_scale(scale, Path(tmp), args.tokenizer, cores)
    extra = extrapolate(rows)
    print(table(rows, extra))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cores": cores, "rows": rows, "extrapolated": extra}, indent=1))


if __name__ == "__main__":
    main()
