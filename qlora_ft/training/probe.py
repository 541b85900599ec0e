"""The plan of a run before it runs (`qlora-ft check --plan`): its steps and tokens (`plan.plan_summary`), and,
from a probe of a few real optimizer steps on this device through train's own stages (`set_up`, `optimizer_step`,
`validate`, `write_samples`, `save`, `write_outputs`, into a temporary folder), seconds per step, the expected wall
time of the whole run and its peak memory against what the device has.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from qlora_ft.config import TrainConfig
from qlora_ft.training.finish import peak_memory_bytes, write_outputs
from qlora_ft.training.fit import Session, optimizer_step, save, validate, write_samples
from qlora_ft.training.outputs import start_outputs
from qlora_ft.training.plan import lr_at, plan_summary
from qlora_ft.training.resume import restore
from qlora_ft.training.setup import intervals, set_up

log = logging.getLogger(__name__)


def plan_report(cfg: TrainConfig, probe_steps: int, started: float) -> dict[str, Any]:
    """The plan of the run `cfg` describes, with a probe of `probe_steps` real steps (the first not timed).
    `started`: seconds this process spent before the run's own setup (imports), part of the run's start."""
    # the probe's samples are printed as training prints them: on stderr here, where stdout holds the report
    with tempfile.TemporaryDirectory(prefix="qlora-ft-probe-") as tmp, contextlib.redirect_stdout(sys.stderr):
        return _probe(cfg, probe_steps, started, Path(tmp))


def _probe(cfg: TrainConfig, probe_steps: int, started: float, tmp: Path) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    cfg.ckpt.output_dir, cfg.ckpt.check_dir = str(tmp / "out"), str(tmp / "checkpoints")
    cfg.ckpt.restore_file = cfg.ckpt.load_checkpoint = None
    t0 = time.perf_counter()
    run = set_up(cfg)
    setup_seconds = time.perf_counter() - t0
    state = restore(run)
    setup_seconds += timed(run, start_outputs, run, state)  # the output folders, TensorBoard
    run.model.train()
    summary = plan_summary(run.plan, run.total_steps, int(run.data.train.lengths.sum()), intervals(run.cfg, True))
    batches, accum, seconds = run.plan.batches(0), run.cfg.optim.grad_accum_steps, []
    for step in range(probe_steps):
        start = step * accum % max(1, len(batches) - accum + 1)
        lr = lr_at(step, run.cfg.optim.lr, run.cfg.optim.warmup_steps, run.total_steps)
        seconds.append(timed(run, optimizer_step, run, batches[start : start + accum], lr, step))
        state.advance(accum, 0)
    session = Session(tokens_at_start=0, last_saved_step=-1)
    costs = {"setup": started + setup_seconds, "first_step_extra": max(0.0, seconds[0] - median(seconds[1:])),
             "step": median(seconds[1:]),
             "validation": timed(run, lambda: state.record_validation(validate(run, state))),
             "samples": timed(run, lambda: write_samples(run, state.step)) if run.cfg.sample.sample_every else 0.0,
             "save": timed(run, lambda: save(run, state, session, "step-000000")),
             "finish": timed(run, lambda: write_outputs(run, state, session,
                                                        run.engine.gathered_weights()))}  # fmt: skip
    wall = costs["setup"] + costs["first_step_extra"] + costs["finish"] + sum(
        summary[n] * costs[c] for n, c in (("total_steps", "step"), ("validations", "validation"),
                                           ("samples", "samples"), ("saves", "save")))  # fmt: skip
    device = run.engine.device
    return {**summary, "device": device_name(device), "probe_steps": probe_steps,
            "seconds": {k: round(v, 3) for k, v in costs.items()}, "expected_wall_seconds": round(wall, 1),
            "peak_memory_bytes": peak_memory_bytes(device), "device_memory_bytes": device_memory(device)}  # fmt: skip


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def timed(run, work, *args) -> float:
    """Seconds `work(*args)` takes, the device's queued work included."""
    sync(run.engine.device)
    start = time.perf_counter()
    work(*args)
    sync(run.engine.device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def device_memory(device: torch.device) -> int:
    """What the device has: the GPU's memory, or the machine's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def process_seconds() -> float:
    """Seconds since this process started (from /proc; 0 where there is none)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def plan_lines(p: dict[str, Any]) -> list[str]:
    """The plan as lines of text."""
    s = p["seconds"]
    gib = 1 << 30
    return [
        f"plan: {p['total_steps']:,} optimizer steps ({p['steps_per_epoch']:,} an epoch) of {p['micro_batch']} x "
        f"{p['grad_accum_steps']} x {p['processes']} sequences; ~{p['tokens_per_step']:,} tokens a step, "
        f"{p['tokens_per_epoch']:,} an epoch",
        f"  probe on {p['device']}: {s['step']:.2f} s a step ({p['probe_steps']} steps, the first not timed); "
        f"validation {s['validation']:.1f} s x {p['validations']}, samples {s['samples']:.1f} s x {p['samples']}, "
        f"checkpoint {s['save']:.1f} s x {p['saves']}, start {s['setup']:.1f} s, end {s['finish']:.1f} s",
        f"  expected wall time: {format_seconds(p['expected_wall_seconds'])}; peak memory "
        f"{p['peak_memory_bytes'] / gib:.2f} GiB of the device's {p['device_memory_bytes'] / gib:.1f} GiB",
    ]


def format_seconds(seconds: float) -> str:
    """`format_seconds(4000)` -> '1 h 6 min'; '42 s' under a minute."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"
