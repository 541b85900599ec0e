"""Fixed costs of a short run: where the time before the first training step and after the last one goes.

The run (23 optimizer steps):

    train.py --qlora True --model ../shared/models/mini-gpt2-fiction --data P --epochs 1 --batch-size 8
        --max-input-length 100 --rank-lora 64 --alpha-lora 16 --targets-lora c_attn c_proj --sample-every 1000000

with P the first 200 paragraphs of Sense and Sensibility as a pickle of [{"sentence": ...}], written into a
temporary folder, and fresh --output-dir, --check-dir and --cache-dir folders for every launch.

Each launch is a subprocess that does what train.py does (`qlora_ft.cli.train_main`) with timers wrapped
around the package functions that make up each part (the package itself is unchanged; the wrappers only
record `time.monotonic()`, which is the same clock in every process). "Python start-up" runs from launch to
the wrapper's first line, "process exit" from `train_main`'s return until the parent's `wait4` returns. Every
module load is recorded too (as `python -X importtime` measures it), so each part also shows the imports inside
it, and "first step after the imports end" is the time to the first step less start-up and all imports. The
run's own log is kept beside the figures. With several `--roots` (checkouts of the package) the launches
alternate between them, so that a before/after comparison shares the machine's load.

    python bench/fixed_costs.py --runs 3 --out bench/results/fixed-costs.json
    python bench/fixed_costs.py --runs 5 --roots /tmp/before . --labels before after

Prints a Markdown table of the median seconds of each part and writes JSON (every launch's parts and log).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

T0 = time.monotonic()  # the wrapper's first line (child); the parent's imports below are stdlib only

import argparse  # noqa: E402
import itertools  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BOOK = SHARED / "data" / "corpora" / "austen" / "sense_and_sensibility.txt"
MODEL = SHARED / "models" / "mini-gpt2-fiction"
RUN = ["--qlora", "True", "--epochs", "1", "--batch-size", "8", "--max-input-length", "100", "--rank-lora", "64",
       "--alpha-lora", "16", "--targets-lora", "c_attn", "c_proj", "--sample-every", "1000000"]  # fmt: skip

# (module, attribute, part): functions timed in the child, each call an interval labelled with its part
TIMED = [
    ("qlora_ft.cli", "parse_config", "config parsing"),
    ("qlora_ft.training.setup", "read_resume", "folders + engine (accelerate)"),
    ("qlora_ft.engines", "make_accelerator", "folders + engine (accelerate)"),
    ("qlora_ft.training.setup", "load_tokenizer", "tokenizer"),
    ("qlora_ft.training.setup", "prepare_data", "data + token cache"),
    ("qlora_ft.training.setup", "check_training_context", "model context check (config)"),
    ("qlora_ft.training.setup", "load_base", "model load + quantise"),
    ("qlora_ft.training.setup", "keep_training_layout", "LoRA"),
    ("qlora_ft.training.setup", "add_lora", "LoRA"),
    ("qlora_ft.training.setup", "probe_shortcuts", "probes"),
    ("qlora_ft.training.setup", "EpochPlan", "optimizer + plan + prepare"),
    ("qlora_ft.training.setup", "validation_batches", "optimizer + plan + prepare"),
    ("qlora_ft.engines.Engine", "prepare", "optimizer + plan + prepare"),
    ("qlora_ft.loop", "restore", "restore + outputs (TensorBoard)"),
    ("qlora_ft.loop", "start_outputs", "restore + outputs (TensorBoard)"),
    ("qlora_ft.training.fit", "validate", "validation"),
    ("qlora_ft.training.finish", "validate", "validation"),
    ("qlora_ft.training.fit", "optimizer_step", "step"),
    ("qlora_ft.training.fit", "write_samples", "samples"),
    ("qlora_ft.training.finish", "write_samples", "samples"),
    ("qlora_ft.training.fit", "save", "checkpoint save"),
    ("qlora_ft.training.finish", "save", "checkpoint save"),
    ("qlora_ft.training.finish", "write_outputs", "adapter, tokenizer, summary"),
    ("qlora_ft.training.finish", "write_report", "report (report.md, training.png)"),
    ("qlora_ft.engines.Engine", "finish", "engine finish (TensorBoard close)"),
]
# --- the child: train_main with timers ------------------------------------------------------------------


def child(out: str, argv: list[str]) -> None:
    """Run train_main(argv) with the TIMED functions wrapped; write the intervals to `out` as JSON."""
    import importlib

    marks: dict[str, float] = {"start": T0}
    intervals: list[tuple[str, float, float]] = []
    imports: list[tuple[str, float, float]] = []  # every outermost module load, wherever it happens
    _time_imports(imports)
    import qlora_ft.cli  # what train.py imports

    importlib.import_module("qlora_ft.loop")  # what train_main imports before it starts: the training modules
    marks["imported"] = time.monotonic()
    for module, name, part in TIMED:
        owner = _resolve(module)
        if owner is not None and hasattr(owner, name):
            setattr(owner, name, _timer(getattr(owner, name), part, intervals))
    try:
        qlora_ft.cli.train_main(argv)
    finally:
        marks["returned"] = time.monotonic()
        _flush_handlers()
        import threading

        threads = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
        Path(out).write_text(json.dumps({"marks": marks, "intervals": intervals, "imports": imports,
                                         "threads_at_return": threads}))  # fmt: skip


def _time_imports(imports: list) -> None:
    """Record each outermost module load (name, start, end): the interpreter calls
    importlib._bootstrap._find_and_load for every module not yet in sys.modules (as -X importtime measures)."""
    import importlib._bootstrap as bootstrap

    load, depth = bootstrap._find_and_load, [0]

    def timed_load(name, import_):
        depth[0] += 1
        started = time.monotonic()
        try:
            return load(name, import_)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                imports.append((name, started, time.monotonic()))

    bootstrap._find_and_load = timed_load


def _resolve(dotted: str):
    """A module, or a class in one ("qlora_ft.engines.Engine"); None where it does not exist (another version)."""
    import importlib

    try:
        return importlib.import_module(dotted)
    except ImportError:
        module, _, attr = dotted.rpartition(".")
        return getattr(importlib.import_module(module), attr, None)


def _timer(fn, part: str, intervals: list):
    def timed(*args, **kwargs):
        started = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            intervals.append((part, started, time.monotonic()))

    return timed


def _flush_handlers() -> None:
    import logging

    for handler in logging.getLogger().handlers:
        handler.flush()


# --- the parent: launches, parts, table ------------------------------------------------------------------


def write_data(folder: Path) -> Path:
    """The first 200 paragraphs of Sense and Sensibility as the pickle train.py reads."""
    import pickle

    sys.path.insert(0, str(ROOT))
    from qlora_ft.data.records import clean_paragraph
    from qlora_ft.data.sources import iter_text_file

    paragraphs = [p for p in map(clean_paragraph, iter_text_file(BOOK, "book")) if p][:200]
    path = folder / "sense-200.pkl"
    path.write_bytes(pickle.dumps([{"sentence": p} for p in paragraphs], protocol=4))
    return path


def launch(root: Path, data: Path, folder: Path) -> dict:
    """One run of the package at `root` into fresh folders under `folder`; its parts in seconds, and its log."""
    folder.mkdir(parents=True)
    out = folder / "timings.json"
    argv = [*RUN, "--model", str(MODEL), "--data", str(data), "--output-dir", str(folder / "out"),
            "--check-dir", str(folder / "ckpt"), "--cache-dir", str(folder / "cache")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    log_path = folder / "train.log"
    with open(log_path, "w") as log:
        launched = time.monotonic()
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(out), "--", *argv], cwd=root, env=env,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        _, status, _ = os.wait4(proc.pid, 0)
        exited = time.monotonic()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"run failed ({os.waitstatus_to_exitcode(status)}):\n{log_path.read_text()[-3000:]}")
    timings = json.loads(out.read_text())
    return {"parts": parts(timings, launched, exited), "log": log_lines(log_path)}


def parts(timings: dict, launched: float, exited: float) -> dict[str, dict[str, float]]:
    """Seconds per part before the first step and after the last (and, as "<part> / imports", the module loads
    inside it), from the child's marks, intervals and imports."""
    marks, intervals = timings["marks"], [tuple(x) for x in timings["intervals"]]
    loads = [tuple(x) for x in timings["imports"]]
    steps = [x for x in intervals if x[0] == "step"]
    first, last = steps[0][1], steps[-1][2]
    before = {"Python start-up": (launched, marks["start"]), "imports (train.py's own)": (marks["start"],
              marks["imported"])}  # fmt: skip
    before_rows: dict[str, list] = {k: [v] for k, v in before.items()}
    after_rows: dict[str, list] = {}
    for part, start, end in intervals:
        if part != "step" and end <= first:
            before_rows.setdefault("base-model validation" if part == "validation" else part, []).append((start, end))
        elif part != "step" and start >= last:
            after_rows.setdefault("final validation" if part == "validation" else part, []).append((start, end))
    out = {
        "before first step": _sections(before_rows, loads, (launched, first), "other (set-up glue)"),
        "after last step": _sections(after_rows, loads, (last, marks["returned"]), "other (train_main return)"),
    }
    out["after last step"]["process exit"] = round(exited - marks["returned"], 3)
    imports_before = _overlap(loads, [(marks["start"], first)])
    out["totals"] = {
        "launch to first step": round(first - launched, 3),
        "module imports before the first step (all)": round(imports_before, 3),
        "first step after the imports end (launch to first step - start-up - imports)":
            round(first - marks["start"] - imports_before, 3),
        "23 steps": round(last - first, 3),
        "last step to process exit": round(exited - last, 3),
        "wall": round(exited - launched, 3),
    }  # fmt: skip
    return out


def _sections(rows: dict[str, list], loads: list, span: tuple[float, float], rest: str) -> dict[str, float]:
    """Seconds per part (and the module loads in it) within `span`: each moment goes to the innermost part
    running then (a part timed inside another, like the report inside writing the outputs, counts once);
    moments no part covers go to `rest`."""
    timed = sorted(((s, e, name) for name, spans in rows.items() for s, e in spans), key=lambda x: (x[0], -x[1]))
    cuts = sorted({span[0], span[1], *(t for s, e, _ in timed for t in (s, e) if span[0] <= t <= span[1])})
    out: dict[str, float] = {}
    for a, b in itertools.pairwise(cuts):
        running = [name for s, e, name in timed if s <= a and b <= e]
        name = running[-1] if running else rest  # the latest started: the innermost
        out[name] = out.get(name, 0.0) + b - a
        out[name + " / imports"] = out.get(name + " / imports", 0.0) + _overlap(loads, [(a, b)])
    return {k: round(v, 3) for k, v in out.items()}


def _overlap(loads: list, spans: list) -> float:
    """Seconds of module loading inside `spans`."""
    return sum(max(0.0, min(e, le) - max(s, ls)) for _, ls, le in loads for s, e in spans)


def log_lines(path: Path) -> list[str]:
    """The run's own log lines ("HH:MM:SS LEVEL message"; no progress bar, no sample texts)."""
    lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    return [line for line in lines if line[:8].count(":") == 2 and line[:2].isdigit()]


def medians(runs: list[dict]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for section in runs[0]["parts"]:
        names = dict.fromkeys(k for r in runs for k in r["parts"][section])
        out[section] = {k: round(statistics.median(r["parts"][section].get(k, 0.0) for r in runs), 2) for k in names}
    return out


def table(results: dict[str, dict]) -> str:
    """Markdown: a row per part, for each label its median seconds and (in brackets) the module imports in it."""
    labels = list(results)
    lines = ["| part | " + " | ".join(f"{label}: s (imports)" for label in labels) + " |",
             "|---|" + "---:|" * len(labels)]  # fmt: skip
    for section in ("before first step", "after last step", "totals"):
        lines.append(f"| **{section}** |" + " |" * len(labels))
        names = [k for k in dict.fromkeys(k for label in labels for k in results[label]["median"][section])
                 if not k.endswith(" / imports")]  # fmt: skip
        for name in names:
            cells = []
            for label in labels:
                median = results[label]["median"][section]
                value, imports = median.get(name), median.get(name + " / imports")
                cells.append("" if value is None else f"{value:.2f}" + (f" ({imports:.2f})" if imports else ""))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="launches per root (the table shows medians)")
    parser.add_argument("--roots", nargs="+", default=[str(ROOT)], help="checkouts of the package to compare")
    parser.add_argument("--labels", nargs="+", default=None, help="a name per root (default: the folder names)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fixed-costs.json"))
    args = parser.parse_args()
    labels = args.labels or [Path(r).resolve().name for r in args.roots]
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    with tempfile.TemporaryDirectory(prefix="fixed-costs-") as tmp:
        data = write_data(Path(tmp))
        for i in range(args.runs):
            for label, root in zip(labels, args.roots, strict=True):  # alternating: the same load for each
                runs[label].append(launch(Path(root).resolve(), data, Path(tmp) / f"{label}-{i}"))
                print(label, json.dumps(runs[label][-1]["parts"]["totals"]), flush=True)
    results = {label: {"median": medians(r), "runs": r} for label, r in runs.items()}
    print(table(results))
    command = "python bench/fixed_costs.py " + " ".join(sys.argv[1:])
    report = {"command": command, "device": f"{os.cpu_count()}-core CPU", "load_average": os.getloadavg(),
              "results": results}  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:])
    else:
        main()
