"""Checkpoints: the on-disk layout lives only here.

```
<check_dir>/
  Epoch_2/  or  step-000120/
    adapter_config.json, adapter_model.safetensors   peft's own files (full fine-tuning: config.json,
                                                      model.safetensors)
    trainer_state.json    step, epoch (1-based, as in the log), micro-batches done in it, tokens, schedule
    trainer_state.pt      optimizer state and RNG states: tensors only, loaded with weights_only=True
    run_config.json       the full TrainConfig
    split.json            which paragraphs are train / validation, and the data's fingerprint
    manifest.json         written last: every other file with its size and sha256, the format version and
                          the data identity (fingerprint, seed, train share)
    best/                 --output-best, when the best validation so far is not this step's: its weights
                          (the same files), so a resume ships them whatever the output folder holds
  latest                  name of the newest complete checkpoint, written last
  .qlora-ft               marker: a qlora-ft run folder (also in the output folder and its tb/)
<output_dir>/             peft's (or the model's) files, the tokenizer, run_config.json, metrics, report
```

Every checkpoint is written into a hidden temporary folder and renamed into place, so a listed checkpoint
is always complete; loading one checks its files against its manifest (a checkpoint of an earlier version,
without one, is checked by reading its files). No other module names a file inside these folders: they call
the functions here. accelerate's `save_state` is not used: it pickles RNG state (so it cannot be loaded
with `weights_only=True`) and has a layout of its own; this format serves both resume and inference.

A run owns its two folders: a fresh run starts only in empty ones (or with --overwrite, which removes what
qlora-ft wrote there and nothing else); `--keep-checkpoints K` keeps the newest K checkpoints of either kind,
the best by validation loss and the one `latest` names.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from qlora_ft.errors import UserError, first_line
from qlora_ft.fs import follow_umask, fsync, fsync_tree, sha256_file

log = logging.getLogger(__name__)

STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"
CONFIG_JSON = "run_config.json"
SPLIT_JSON = "split.json"
MANIFEST = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"  # peft's names, fixed by peft's save_pretrained
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LATEST = "latest"
BEST = "best"
WEIGHT_FILES = (
    "adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json", "model.safetensors",
    "model-*-of-*.safetensors", "model.safetensors.index.json",
)  # fmt: skip
MARKER = ".qlora-ft"  # written into each folder the package creates for a run
FORMAT = 2  # trainer_state.json: "epoch" is 1-based (format 1, without the key: 0-based)
CHECKPOINT_NAME = re.compile(r"(Epoch_\d+|step-\d+)")
# what train (and eval, report) write into an output folder: --overwrite removes these names and nothing else.
# A fixed list rather than a record of each write, so folders from earlier versions (no marker) are covered too.
OUTPUT_FILES = (
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "config.json", "generation_config.json",
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "run_config.json", "metrics.jsonl", "samples.jsonl", "metrics.tmp",
    "samples.tmp", "train_summary.json", "report.md", "training.png", "eval.json", "eval.md", "eval.png", "compare.md",
)  # fmt: skip
TENSORBOARD_FILES = ("events.out.tfevents.*", "hparams.yml")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def epoch_name(epochs_completed: int) -> str:
    return f"Epoch_{epochs_completed}"


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def missing_files(path: Path) -> list[str]:
    """The files a checkpoint lacks: its state files, and any file its manifest lists (an unreadable manifest
    lists none here: `load_checkpoint` reports it as damaged)."""
    try:
        listed = list(read_manifest(path)["files"]) if (path / MANIFEST).is_file() else []
    except UserError:
        listed = []
    return [name for name in dict.fromkeys([STATE_JSON, STATE_PT, *listed]) if not (path / name).is_file()]


def is_complete(path: Path) -> bool:
    """Whether `path` is a checkpoint whose save finished: its state files and every file its manifest lists are
    there. (Their content is checked on loading: `verify_checkpoint`.)"""
    return path.is_dir() and not missing_files(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(check_dir: Path) -> None:
    """Tidy what a killed save left behind: a `.tmp-NAME-PID` folder is incomplete and goes; an
    `.old-NAME-PID` folder is the previous complete NAME, put back if the new one never got its place."""
    for entry in check_dir.iterdir():
        if not entry.name.startswith((".tmp-", ".old-")):
            continue
        kind, _, rest = entry.name[1:].partition("-")
        name, _, pid = rest.rpartition("-")
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not (check_dir / name).exists() and is_complete(entry):
            os.rename(entry, check_dir / name)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def save_checkpoint(
    check_dir: Path,
    name: str,
    model,
    meta: dict[str, Any],
    tensors: dict[str, Any],
    run_config: dict[str, Any],
    split: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None = None,
    best: Path | None = None,
) -> Path:
    """Write `<check_dir>/<name>/` atomically (temp folder, fsync, rename) and then point `latest` at it.
    `state_dict`: the weights to save where `model`'s own are not them (FSDP: a shard; DeepSpeed: 16-bit copies).
    `best`: a folder whose weights go into `best/` (--output-best: the best validation's, when not this step's)."""
    check_dir.mkdir(parents=True, exist_ok=True)
    clean_stale(check_dir)
    final = check_dir / name
    tmp = check_dir / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        follow_umask(tmp.glob("*.safetensors"))  # safetensors writes 0600
        if best is not None:
            copy_weights(best, tmp / BEST)
        torch.save(tensors, tmp / STATE_PT)
        write_json(tmp / STATE_JSON, meta)
        write_json(tmp / CONFIG_JSON, run_config)
        write_json(tmp / SPLIT_JSON, split)
        write_manifest(tmp, run_config, split)  # last: it covers every file above
        fsync_tree(tmp)
        old = check_dir / f".old-{name}-{os.getpid()}"
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        latest_tmp = check_dir / f".{LATEST}.tmp"
        latest_tmp.write_text(name + "\n", encoding="utf-8")
        os.replace(latest_tmp, check_dir / LATEST)
        fsync(check_dir)  # the renames themselves
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror or str(e)
        raise UserError(f"could not save checkpoint {final}: {reason} (earlier checkpoints are intact)") from None
    return final


def weight_files(folder: Path) -> list[Path]:
    """The weight files in `folder`: peft's adapter files, or a model's."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, w) for w in WEIGHT_FILES))


def copy_weights(source: Path, folder: Path) -> None:
    """Replace the weights in `folder` by those in `source`."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in weight_files(folder):
        old.unlink()
    for file in weight_files(source):
        shutil.copyfile(file, folder / file.name)


def best_weights(path: Path, best_step: int) -> Path | None:
    """The folder of checkpoint `path` holding the weights of step `best_step` (--output-best's best validation):
    the checkpoint itself when it is that step's, else its `best/`; None where it has neither (an earlier version)."""
    if _step_of(path) == best_step:
        return path
    return path / BEST if weight_files(path / BEST) else None


# ----------------------------------------------------------------------------------------------------------
# manifest.json: what a checkpoint holds, so that a damaged file is found before training resumes from it


def write_manifest(folder: Path, run_config: dict[str, Any], split: dict[str, Any]) -> None:
    """`folder/manifest.json`: every file in `folder` (relative path -> size and sha256), the format version and
    the data identity (the split's data fingerprint, the seed and train share of `run_config`)."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}  # fmt: skip
    data = run_config.get("data", {})
    fingerprint = split.get("cache_fingerprint") or split.get("data_sha256")  # token cache's, or the records'
    identity = {"fingerprint": fingerprint, "seed": data.get("seed"), "train_size": data.get("train_size")}
    write_json(folder / MANIFEST, {"format": FORMAT, "data": identity, "files": files})


def _damaged(path: Path, why: str) -> UserError:
    return UserError(f"checkpoint {path} is damaged or unreadable: {why}; resume from another checkpoint "
                     "(--restore-file NAME) or start a new run")  # fmt: skip


def read_manifest(path: Path) -> dict[str, Any] | None:
    """A checkpoint's manifest, None when it has none (written by an earlier version); one line when unreadable."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise _damaged(path, f"{MANIFEST} is unreadable ({first_line(e)})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    valid = isinstance(files, dict) and all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
        and not Path(k).is_absolute() and ".." not in Path(k).parts
        for k, v in files.items()
    )  # fmt: skip
    if not valid:
        raise _damaged(path, f"{MANIFEST} does not list files with sizes and sha256")
    return manifest


def verify_checkpoint(path: Path) -> None:
    """Check every file a checkpoint's manifest lists (present, same size, same sha256); one line naming the
    first that differs. Without a manifest (earlier versions) nothing is checked here: loading reads each file."""
    manifest = read_manifest(path)
    for name, expected in (manifest or {}).get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise _damaged(path, f"{name} is missing")
        size = file.stat().st_size
        if size != expected["size"]:
            raise _damaged(path, f"{name} has {size} bytes, {MANIFEST} says {expected['size']}")
        if sha256_file(file) != expected["sha256"]:
            raise _damaged(path, f"{name} differs from {MANIFEST} (sha256)")


def prune_checkpoints(check_dir: Path, keep: int) -> list[str]:
    """Delete checkpoints (`Epoch_N` and `step-NNNNNN` alike) except the newest `keep` by step, the best by
    validation loss and the one `latest` names; returns the names deleted. `keep` 0 keeps them all."""
    if keep <= 0:
        return []
    names = sorted(list_checkpoints(check_dir), key=lambda n: (_step_of(check_dir / n), n))
    keep_names = set(names[-keep:])
    losses = {n: _meta(check_dir / n).get("val_loss") for n in names}
    scored = [n for n in names if isinstance(losses[n], (int, float))]
    if scored:
        keep_names.add(min(scored, key=lambda n: losses[n]))
    pointer = check_dir / LATEST
    if pointer.is_file():
        keep_names.add(pointer.read_text(encoding="utf-8").strip())
    deleted = [n for n in names if n not in keep_names]
    for name in deleted:
        shutil.rmtree(check_dir / name, ignore_errors=True)
    return deleted


def position_meta(epoch_index: int, position: int, batches_in_epoch: int) -> dict[str, int]:
    """The training position as trainer_state.json stores it: `epoch` 1-based, as the log and metrics.jsonl
    number it, with `position` of its `batches_in_epoch` micro-batches done.

    >>> position_meta(1, 14, 14)
    {'format': 2, 'epoch': 2, 'position': 14, 'batches_in_epoch': 14, 'epochs_completed': 2}
    """
    done = epoch_index + (position >= batches_in_epoch)
    return {"format": FORMAT, "epoch": epoch_index + 1, "position": position, "batches_in_epoch": batches_in_epoch,
            "epochs_completed": done}  # fmt: skip


def resume_point(path: Path, meta: dict[str, Any]) -> tuple[int, int]:
    """(0-based epoch index, micro-batches done in it) of a checkpoint's trainer_state.json, of this format or
    of format 1 (earlier versions: no `format`, `epoch` 0-based); one line when it cannot be resumed."""
    version = meta.get("format", 1)
    if not all(isinstance(meta.get(k), int) for k in ("step", "epoch", "position", "tokens")) or version > FORMAT:
        raise UserError(f"checkpoint {path} cannot be resumed by this version (trainer_state.json format {version}); "
                        "it still serves inference and export: start a new run to train further")  # fmt: skip
    return (meta["epoch"] - 1 if version >= 2 else meta["epoch"]), meta["position"]


# ----------------------------------------------------------------------------------------------------------
# run folders: a fresh run starts in empty ones; --overwrite removes only what the package wrote


def run_folder_entries(folder: Path) -> list[str]:
    """What a folder holds besides the marker ([] when absent); a fresh run needs it empty."""
    if not folder.exists():
        return []
    if not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder")
    return sorted(p.name for p in folder.iterdir() if p.name != MARKER)


def check_fresh_folders(folders: dict[str, Path], overwrite: bool) -> None:
    """Refuse a fresh run into a folder holding anything (another run's outputs or checkpoints) unless
    `overwrite`. `folders`: the flag that names each one -> its path. Reads only."""
    for flag, folder in folders.items():
        entries = run_folder_entries(folder)
        if entries and not overwrite:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise UserError(f"{flag} {folder} is not empty ({shown}): resume its run with --load-checkpoint True, "
                            "pass --overwrite to replace what qlora-ft wrote there, or pick another")  # fmt: skip


def _only_tensorboard(folder: Path) -> bool:
    return all(p.is_dir() or any(fnmatch.fnmatch(p.name, g) for g in TENSORBOARD_FILES) for p in folder.rglob("*"))


def _written_by_us(entry: Path) -> bool:
    """Whether qlora-ft wrote this entry of an output or checkpoint folder (see OUTPUT_FILES); a folder only
    when it is a complete checkpoint, a temporary of a save, or a tb/ it made (marker, or events files only)."""
    name = entry.name
    if entry.is_symlink():
        return False
    if entry.is_dir():
        if name.startswith((".tmp-", ".old-")) or (CHECKPOINT_NAME.fullmatch(name) and is_complete(entry)):
            return True
        return name == "tb" and ((entry / MARKER).is_file() or _only_tensorboard(entry))
    if name in (MARKER, LATEST, f".{LATEST}.tmp"):
        return True
    if name == "README.md":  # peft's model card; a README of the user's own stays
        return "library_name: peft" in entry.read_text(encoding="utf-8", errors="replace")[:2000]
    return any(fnmatch.fnmatch(name, pattern) for pattern in OUTPUT_FILES)


def clear_run_folder(folder: Path) -> list[str]:
    """Remove what qlora-ft wrote in `folder` (never the folder itself, nor anything else in it); returns the
    names removed."""
    if not folder.is_dir():
        return []
    removed = sorted(p.name for p in folder.iterdir() if _written_by_us(p))
    for name in removed:
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return removed


def make_run_folder(folder: Path) -> None:
    """Create `folder` (and parents) if needed and mark it as a qlora-ft run folder."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    if not marker.exists():
        marker.write_text("written by qlora-ft: --overwrite removes only the files qlora-ft writes here\n",
                          encoding="utf-8")  # fmt: skip


def list_checkpoints(check_dir: Path) -> list[str]:
    if not check_dir.is_dir():
        return []
    return sorted(p.name for p in check_dir.iterdir() if not p.name.startswith(".") and is_complete(p))


def _meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def _step_of(path: Path) -> int:
    step = _meta(path).get("step")
    return step if isinstance(step, int) else -1


def resolve_checkpoint(check_dir: Path, restore_file: str) -> Path:
    """`latest`, a name inside `check_dir` (`Epoch_2`), or a path -> a complete checkpoint folder."""
    if restore_file == LATEST:
        pointer = check_dir / LATEST
        if pointer.is_file():
            candidate = check_dir / pointer.read_text(encoding="utf-8").strip()
            if is_complete(candidate):
                return candidate
        names = list_checkpoints(check_dir)
        if not names:
            raise UserError(f"no checkpoint to resume in {check_dir}")
        return max((check_dir / n for n in names), key=_step_of)  # pointer missing: newest by step
    for candidate in (check_dir / restore_file, Path(restore_file)):
        if is_complete(candidate):
            return candidate
        if candidate.is_dir() and candidate.name == Path(restore_file).name:
            raise UserError(f"checkpoint {candidate} is incomplete (missing {', '.join(missing_files(candidate))})")
    available = ", ".join(list_checkpoints(check_dir)) or "none"
    raise UserError(f"checkpoint {restore_file!r} not found in {check_dir} (available: {available})")


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(meta, tensors, run_config, split) of a checkpoint, its files first checked against its manifest;
    tensors are loaded with weights_only=True."""
    verify_checkpoint(path)
    try:
        meta = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        run_config = json.loads((path / CONFIG_JSON).read_text(encoding="utf-8"))
        split = json.loads((path / SPLIT_JSON).read_text(encoding="utf-8"))
        tensors = torch.load(path / STATE_PT, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad JSON, a pickle that weights_only refuses, ...
        raise UserError(f"checkpoint {path} is damaged or unreadable ({type(e).__name__}: {first_line(e)})") from None
    return meta, tensors, run_config, split


def load_model_weights(model, path: Path) -> None:
    """Load a checkpoint's adapter (or full-model) weights into `model`, which has the same shape."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        if isinstance(model, PeftModel):
            state = load_file(path / ADAPTER_WEIGHTS)
            result = set_peft_model_state_dict(model, state)
            bad = [k for k in result.unexpected_keys if "lora" in k]
        else:  # full fine-tuning: every safetensors shard save_pretrained wrote
            state = {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}
            if not state:
                raise OSError(f"no model weights in {path}")
            bad = list(model.load_state_dict(state, strict=False).unexpected_keys)
    except Exception as e:  # safetensors raises its own SafetensorError on truncated files
        raise UserError(f"cannot load weights from checkpoint {path}: {first_line(e)}") from None
    if bad:
        raise UserError(f"checkpoint {path} has weights this model does not: {', '.join(bad[:3])}")


# ----------------------------------------------------------------------------------------------------------
# what other modules read from a run's output folder or a checkpoint


def write_run_config(folder: Path, run_config: dict[str, Any]) -> None:
    """The run's full TrainConfig (`TrainConfig.to_dict()`) beside the weights in `folder`."""
    write_json(folder / CONFIG_JSON, run_config)


def read_run_config(folder: Path) -> dict[str, Any] | None:
    """The TrainConfig dict a run saved in `folder` (its output folder or a checkpoint); None when it saved none
    there; one line when it is unreadable."""
    path = folder / CONFIG_JSON
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} does not hold a run configuration (a mapping of options)")
    return config


def is_adapter_folder(folder: Path) -> bool:
    """Whether `folder` holds a peft adapter (a run's output folder or a checkpoint of a LoRA run)."""
    return (folder / ADAPTER_CONFIG).is_file()


def adapter_base_name(folder: Path) -> str:
    """The base model an adapter folder names (peft's `base_model_name_or_path`); one line when it names none."""
    path = folder / ADAPTER_CONFIG
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["base_model_name_or_path"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is unreadable or has no base model ({first_line(e)})") from None
