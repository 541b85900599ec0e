"""Second start of an instruction run on 50,000 records: the whole process of a one-step run, launched again on
the same data (the token cache built by the first launch is found).

Records: the 1,000 shared Alpaca-style records, each in `--variants` numbered variants ("... (variant 7)"
appended to the instruction), so every record is distinct: 50,000 by default, one JSON file. Every launch is

    python train.py --model ../shared/models/mini-gpt2-fiction --data RECORDS.json --max-steps 1 --sample-every 0
        --output-dir OUT --check-dir CKPT --cache-dir CACHE

in a subprocess with fresh output folders (the cache folder is kept per root), timed from launch to exit. The
first launch of each root builds its cache (not counted); then `--runs` second starts per root, alternating
between the `--roots` (checkouts of the package) so that a before/after comparison shares the machine's load.

    python bench/records_start.py --runs 3 --roots /tmp/before . --labels before after
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "mini-gpt2-fiction"
RECORDS = SHARED / "data" / "instructions" / "instruction-data.json"


def write_records(path: Path, variants: int) -> int:
    """`variants` numbered copies of every shared record, each distinct; returns how many were written."""
    base = json.loads(RECORDS.read_text())
    rows = [{**r, "instruction": f"{r['instruction']} (variant {v})"} for v in range(variants) for r in base]
    path.write_text(json.dumps(rows))
    return len(rows)


def launch(root: Path, data: Path, work: Path, cache: Path, name: str) -> float:
    """Seconds from launch to exit of a one-step run from checkout `root`; its log is kept in `work`."""
    out = work / name
    cmd = [sys.executable, "train.py", "--model", str(MODEL), "--data", str(data), "--max-steps", "1",
           "--sample-every", "0", "--output-dir", str(out / "out"), "--check-dir", str(out / "ckpt"),
           "--cache-dir", str(cache)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        done = subprocess.run(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}); see {work / name}.log")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="second starts per root (the table shows medians)")
    parser.add_argument("--variants", type=int, default=50, help="numbered variants of each shared record")
    parser.add_argument("--roots", nargs="+", default=[str(ROOT)], help="checkouts of the package to compare")
    parser.add_argument("--labels", nargs="+", default=None, help="a name per root (default: the folder names)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "records-start.json"))
    args = parser.parse_args()
    roots = [Path(r).resolve() for r in args.roots]
    labels = args.labels or [r.name for r in roots]
    with tempfile.TemporaryDirectory(prefix="records-start-") as tmp:
        work = Path(tmp)
        n = write_records(work / "records.json", args.variants)
        first = {label: launch(root, work / "records.json", work, work / f"cache-{label}", f"{label}-first")
                 for root, label in zip(roots, labels, strict=True)}  # fmt: skip
        seconds: dict[str, list[float]] = {label: [] for label in labels}
        for i in range(args.runs):
            for root, label in zip(roots, labels, strict=True):
                seconds[label].append(
                    launch(root, work / "records.json", work, work / f"cache-{label}", f"{label}-{i}")
                )
                print(f"{label} second start {i + 1}: {seconds[label][-1]:.2f} s", flush=True)
    device = f"{os.cpu_count()}-core CPU ({platform.machine()})"
    command = "python bench/records_start.py " + " ".join(sys.argv[1:])
    lines = ["| checkout | first start (s) | second start, median (s) | all second starts (s) |", "|---|---:|---:|---|"]
    for label in labels:
        lines.append(f"| {label} | {first[label]:.1f} | {statistics.median(seconds[label]):.1f} | "
                     f"{', '.join(f'{s:.1f}' for s in seconds[label])} |")  # fmt: skip
    result = {"command": command, "device": device, "records": n, "first": first, "second": seconds}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"`{command}` on {device}, {n:,} records\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
