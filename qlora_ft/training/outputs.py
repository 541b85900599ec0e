"""The run's output folder while it trains: metrics.jsonl, samples.jsonl and TensorBoard (written by the main
process only)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_ft import checkpoint
from qlora_ft.config import TrainConfig

if TYPE_CHECKING:
    from qlora_ft.training.run import Run
    from qlora_ft.training.state import TrainState

log = logging.getLogger(__name__)

LOGS = ("metrics.jsonl", "samples.jsonl")


def start_outputs(run: Run, state: TrainState) -> None:
    """Ready the output and checkpoint folders, then TensorBoard: one run in <output-dir>/tb, continued on resume
    (events past the checkpoint's step are purged, as are its metrics/samples rows: see `start_run_folders`). A
    resumed --output-best run's folder gets the weights of the checkpoint's best step."""
    resumed = run.resume is not None
    if run.engine.is_main:
        start_run_folders(run.out_dir, run.check_dir, run.cfg, state.step if resumed else None)
        if resumed and state.best_step is not None:  # whatever a later launch left there
            checkpoint.copy_weights(checkpoint.best_weights(run.resume.path, state.best_step), run.out_dir)
            log.info("--output-best: %s holds the weights of step %d, the best validation so far", run.out_dir,
                     state.best_step)  # fmt: skip
    accelerator = run.engine.accelerator
    accelerator.init_trackers("tb", init_kwargs={"tensorboard": {"purge_step": state.step + 1}} if resumed else None)
    if run.engine.is_main and not resumed:
        write_hparams(accelerator.get_tracker("tensorboard", unwrap=True), flat_config(run.cfg))


def start_run_folders(out_dir: Path, check_dir: Path, cfg: TrainConfig, resume_step: int | None) -> None:
    """Ready the output and checkpoint folders (main process): a fresh run with --overwrite first removes what
    qlora-ft wrote there; a resumed one drops the metrics/samples rows logged after its checkpoint."""
    if resume_step is None and cfg.ckpt.overwrite:
        for folder in dict.fromkeys((out_dir, check_dir)):
            removed = checkpoint.clear_run_folder(folder)
            if removed:
                log.info("--overwrite: removed %s from %s", ", ".join(removed), folder)
    for folder in (out_dir, out_dir / "tb", check_dir):
        checkpoint.make_run_folder(folder)
    if resume_step is not None:
        for name in LOGS:
            keep_rows_up_to(out_dir / name, resume_step)
    keep = cfg.ckpt.keep_checkpoints
    log.info("checkpoints go to %s (%s)", check_dir,
             f"keeping the newest {keep} and the best" if keep else "keeping all")  # fmt: skip


def write_hparams(writer, flat: dict[str, Any]) -> None:
    """The hyperparameters into the run's own events file: accelerate's store_init_configuration (and
    SummaryWriter.add_hparams) would start a new time-named run folder at each launch."""
    from torch.utils.tensorboard.summary import hparams

    for summary in hparams(flat, {}):
        writer.file_writer.add_summary(summary)
    writer.flush()


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
    """Drop the rows of a metrics/samples .jsonl whose step is past `step` (a resumed run's checkpoint)."""
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
