"""The run's output folder while it trains: metrics.jsonl, samples.jsonl and TensorBoard (written by the main
process only)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_ft.config import TrainConfig

if TYPE_CHECKING:
    from qlora_ft.training.setup import Run
    from qlora_ft.training.state import TrainState

LOGS = ("metrics.jsonl", "samples.jsonl")


def start_outputs(run: Run, state: TrainState) -> None:
    """Open TensorBoard and the output folder. A fresh run starts the logs anew; a resumed one drops the rows
    logged after its checkpoint by the run that died."""
    run.engine.accelerator.init_trackers("tb", config=flat_config(run.cfg))
    if run.engine.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        for name in LOGS:
            keep_rows_up_to(run.out_dir / name, state.step)


def log_metrics(run: Run, row: dict[str, Any]) -> None:
    """One row of metrics.jsonl, also to TensorBoard (all but step and epoch)."""
    if run.engine.is_main:
        append_jsonl(run.out_dir / "metrics.jsonl", [row])
        run.engine.accelerator.log({k: v for k, v in row.items() if k not in ("step", "epoch")}, step=row["step"])


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def keep_rows_up_to(path: Path, step: int) -> None:
    """Drop the rows of a metrics/samples .jsonl whose step is past `step` (all of them for a fresh run)."""
    if not path.exists():
        return
    rows = path.read_text(encoding="utf-8", errors="replace").splitlines()

    def keep(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except (ValueError, AttributeError):  # a line cut short when the process was killed
            return False

    kept = [line for line in rows if keep(line)]
    if len(kept) != len(rows):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)


def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """Hyperparameters for TensorBoard (scalars only)."""
    flat = {}
    for group in asdict(cfg).values():
        for k, v in group.items():
            flat[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat
