"""Second start of a text run on a large CSV table: time to ready and peak memory of `python train.py` launched
again on the same table (the token cache built by the first launch is found), against the same on a small one.

Tables (written under the temporary folder, deleted after): `--sizes` in MB, each a CSV of columns `id`, `text`
(a short numbered sentence, ~2% of the bytes: what is tokenized) and `notes` (~1 KB of filler words a row: bytes
a reader must get through, not training text). Every launch is

    python train.py --model ../shared/models/mini-gpt2-fiction --data TABLE.csv --max-steps 1 --sample-every 0
        --output-dir OUT --check-dir CKPT --cache-dir CACHE

in a subprocess from one checkout (`--roots`, PYTHONPATH and working folder), with fresh output folders and one
cache folder per table, shared by the checkouts (their fingerprints are the same). The first launch (by the
last root) builds the cache; then `--runs` rounds of second starts, each round every size and root in turn, so
that they share the machine's load. "Ready": launch until the log says where checkpoints go (data, model and
optimizer built; the process is then killed: what follows, the base model's validation and the step, does not
depend on the table); peak RSS: the child's maximum resident set until then (`os.wait4`).

    python bench/table_start.py --sizes 10 1000 --runs 3 --roots /tmp/before . --labels before after
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "mini-gpt2-fiction"
WORDS = ("morning letter garden carriage evening sister promise river window silence answer cousin journey "
         "visit fortune country dinner question library weather").split()  # fmt: skip


def write_table(path: Path, megabytes: int, seed: int = 0) -> int:
    """A CSV of about `megabytes` MB (id, text, notes); returns its rows."""
    rng = random.Random(seed)
    filler = " ".join(rng.choice(WORDS) for _ in range(200_000))
    rows, size = 0, 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["id", "text", "notes"])
        while size < megabytes * 1_000_000:
            start = rng.randrange(len(filler) - 1100)
            row = [rows, f"Entry {rows}: the {rng.choice(WORDS)} came with the {rng.choice(WORDS)}.",
                   filler[start : start + 1000]]  # fmt: skip
            out.writerow(row)
            size += sum(len(str(x)) for x in row) + 8
            rows += 1
    return rows


def launch(root: Path, table: Path, work: Path, cache: Path, name: str) -> dict:
    """Seconds to ready and peak RSS (MiB) of a one-step run from checkout `root` (killed once ready)."""
    out, log_path = work / name, work / f"{name}.log"
    cmd = [sys.executable, "train.py", "--model", str(MODEL), "--data", str(table), "--max-steps", "1",
           "--sample-every", "0", "--output-dir", str(out / "out"), "--check-dir", str(out / "ckpt"),
           "--cache-dir", str(cache)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    started, ready = time.perf_counter(), None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        while True:  # wait4: the child's own resource usage (peak RSS)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if ready is None and "checkpoints go to" in log_path.read_text(errors="replace"):
                ready = time.perf_counter() - started
                proc.kill()  # the start is measured; the step after it is not
            time.sleep(0.05)
    if ready is None:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log_path}:\n{log_path.read_text()[-2000:]}")
    return {"ready_s": round(ready, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 1000], help="table sizes in MB")
    parser.add_argument("--runs", type=int, default=2, help="second starts per root and size")
    parser.add_argument("--roots", nargs="+", default=[str(ROOT)], help="checkouts of the package to compare")
    parser.add_argument("--labels", nargs="+", default=None, help="a name per root (default: the folder names)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "table-start.json"))
    args = parser.parse_args()
    roots = [Path(r).resolve() for r in args.roots]
    labels = args.labels or [r.name for r in roots]
    results = []
    with tempfile.TemporaryDirectory(prefix="table-start-") as tmp:
        work = Path(tmp)
        for mb in args.sizes:
            table, cache = work / f"table-{mb}mb.csv", work / f"cache-{mb}mb"
            rows = write_table(table, mb)
            first = launch(roots[-1], table, work, cache, f"{mb}mb-first")
            print(f"{mb} MB ({rows:,} rows) first start ({labels[-1]}): {first}", flush=True)
            results.append({"mb": round(table.stat().st_size / 1e6), "rows": rows, "first": first,
                            "second": {label: [] for label in labels}})  # fmt: skip
        for i in range(args.runs):  # every size and root in turn, so that they share the machine's load
            for mb, r in zip(args.sizes, results, strict=True):
                for root, label in zip(roots, labels, strict=True):
                    run = launch(root, work / f"table-{mb}mb.csv", work, work / f"cache-{mb}mb", f"{mb}mb-{label}-{i}")
                    r["second"][label].append(run)
                    print(f"{mb} MB {label} second start {i + 1}: {run}", flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), "unknown")  # fmt: skip
    device = f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end"
    command = "python bench/table_start.py " + " ".join(sys.argv[1:])
    lines = ["| table | checkout | second start: ready (s) | peak RSS (MiB) | all (s) |", "|---|---|---:|---:|---|"]
    for r in results:
        for label in labels:
            med = {k: statistics.median(run[k] for run in r["second"][label]) for k in r["first"]}
            every = ", ".join(f"{run['ready_s']:.1f}" for run in r["second"][label])
            lines.append(f"| {r['mb']:,} MB ({r['rows']:,} rows) | {label} | {med['ready_s']:.1f} | "
                         f"{med['peak_rss_mib']:,.0f} | {every} |")  # fmt: skip
    Path(args.out).write_text(json.dumps({"command": command, "device": device, "results": results}, indent=2) + "\n")
    print(f"`{command}` on {device}\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
