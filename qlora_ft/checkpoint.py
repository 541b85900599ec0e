"""Checkpoints: the on-disk layout lives only here.

```
<check_dir>/
  Epoch_2/  or  step-000120/
    adapter_config.json, adapter_model.safetensors   peft's own files (full fine-tuning: config.json,
                                                      model.safetensors)
    trainer_state.json    step, epoch, position in the epoch, tokens, schedule (readable)
    trainer_state.pt      optimizer state and RNG states: tensors only, loaded with weights_only=True
    run_config.json       the full TrainConfig
    split.json            which paragraphs are train / validation, and the data's fingerprint
  latest                  name of the newest complete checkpoint, written last
```

Every checkpoint is written into a hidden temporary folder and renamed into place, so a listed checkpoint
is always complete. accelerate's `save_state` is not used: it pickles RNG state (so it cannot be loaded
with `weights_only=True`) and has a layout of its own; this format serves both resume and inference.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from qlora_ft.errors import UserError, first_line

log = logging.getLogger(__name__)

STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"
CONFIG_JSON = "run_config.json"
SPLIT_JSON = "split.json"
LATEST = "latest"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in [*path.rglob("*"), path]:
        _fsync(p)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / STATE_JSON).is_file() and (path / STATE_PT).is_file()


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
) -> Path:
    """Write `<check_dir>/<name>/` atomically (temp folder, fsync, rename) and then point `latest` at it.
    `state_dict`: the weights to save where `model`'s own are not them (FSDP: a shard; DeepSpeed: 16-bit copies)."""
    check_dir.mkdir(parents=True, exist_ok=True)
    clean_stale(check_dir)
    final = check_dir / name
    tmp = check_dir / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        torch.save(tensors, tmp / STATE_PT)
        write_json(tmp / STATE_JSON, meta)
        write_json(tmp / CONFIG_JSON, run_config)
        write_json(tmp / SPLIT_JSON, split)
        _fsync_tree(tmp)
        old = check_dir / f".old-{name}-{os.getpid()}"
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        latest_tmp = check_dir / f".{LATEST}.tmp"
        latest_tmp.write_text(name + "\n", encoding="utf-8")
        os.replace(latest_tmp, check_dir / LATEST)
        _fsync(check_dir)  # the renames themselves
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror or str(e)
        raise UserError(f"could not save checkpoint {final}: {reason} (earlier checkpoints are intact)") from None
    return final


def prune_step_checkpoints(check_dir: Path, keep: int) -> list[str]:
    """Delete `step-*` checkpoints except the newest `keep` and the best by validation loss; returns the
    names deleted. `Epoch_N` checkpoints are never deleted here."""
    steps = sorted(
        (n for n in list_checkpoints(check_dir) if n.startswith("step-")), key=lambda n: _step_of(check_dir / n)
    )
    keep_names = set(steps[-keep:])
    losses = {n: _meta(check_dir / n).get("val_loss") for n in steps}
    scored = [n for n in steps if isinstance(losses[n], (int, float))]
    if scored:
        keep_names.add(min(scored, key=lambda n: losses[n]))
    deleted = [n for n in steps if n not in keep_names]
    for name in deleted:
        shutil.rmtree(check_dir / name, ignore_errors=True)
    return deleted


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
            raise UserError(f"checkpoint {candidate} is incomplete (missing {STATE_JSON} or {STATE_PT})")
    available = ", ".join(list_checkpoints(check_dir)) or "none"
    raise UserError(f"checkpoint {restore_file!r} not found in {check_dir} (available: {available})")


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(meta, tensors, run_config, split) of a checkpoint; tensors are loaded with weights_only=True."""
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
            state = load_file(path / "adapter_model.safetensors")
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
