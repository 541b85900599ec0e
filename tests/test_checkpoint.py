"""Crash-safe checkpoints: atomic saves, incomplete or damaged checkpoints, pruning, signals."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from qlora_ft import checkpoint
from qlora_ft.config import TrainConfig, parse_config
from qlora_ft.errors import UserError
from qlora_ft.loop import train


def config(tmp_path, data, model_dir, *argv, run="run"):
    base = ["--data", str(data), "--model", str(model_dir), "--batch-size", "4", "--max-input-length", "24",
            "--rank-lora", "4", "--lr", "5e-3", "--warmup-steps", "1", "--sample-every", "0", "--log-every", "1",
            "--check-dir", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / run)]  # fmt: skip
    return parse_config(TrainConfig, base + list(argv), "train.py")


def digest(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def signal_after(cmd, cwd, sig, losses):
    """Start `cmd`, send `sig` once it has logged `losses` loss rows; (exit status, stderr)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = cwd / "GPT2_fine_tuned_Austen" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count('"loss"') < losses):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_a_failed_save_leaves_earlier_checkpoints_intact(tmp_path, data_pkl, tiny_model_dir, monkeypatch):
    train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "2"))
    before = digest(tmp_path / "ckpt")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="could not save checkpoint .*No space left on device.*intact"):
        train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "4", "--load-checkpoint", "True"))
    assert digest(tmp_path / "ckpt") == before  # no temp folder left, `latest` unchanged
    assert checkpoint.resolve_checkpoint(tmp_path / "ckpt", "latest").name == "step-000002"


def test_incomplete_and_stale_checkpoints_are_never_chosen(tmp_path, data_pkl, tiny_model_dir):
    train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "4", "--save-every-steps", "2"))
    ckpt = tmp_path / "ckpt"
    (ckpt / "step-000009").mkdir()  # a half-written folder from a crash, without its state files
    (ckpt / "step-000009" / "adapter_config.json").write_text("{}")
    (ckpt / ".tmp-step-000010-123").mkdir()
    assert checkpoint.list_checkpoints(ckpt) == ["step-000002", "step-000004"]
    assert checkpoint.resolve_checkpoint(ckpt, "latest").name == "step-000004"
    (ckpt / "latest").write_text("step-000009\n")  # a pointer to something incomplete: newest complete wins
    assert checkpoint.resolve_checkpoint(ckpt, "latest").name == "step-000004"
    (ckpt / "latest").unlink()
    assert checkpoint.resolve_checkpoint(ckpt, "latest").name == "step-000004"
    with pytest.raises(UserError, match="incomplete"):
        checkpoint.resolve_checkpoint(ckpt, "step-000009")


@pytest.mark.parametrize("victim", ["trainer_state.pt", "adapter_model.safetensors", "trainer_state.json",
                                    "split.json"])  # fmt: skip
def test_truncated_checkpoint_files_are_refused(tmp_path, data_pkl, tiny_model_dir, victim):
    train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "2"))
    target = tmp_path / "ckpt" / "step-000002" / victim
    target.write_bytes(target.read_bytes()[: max(1, target.stat().st_size // 2)])
    with pytest.raises(UserError, match="damaged|cannot load weights"):
        train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "4", "--load-checkpoint", "True"))


def test_a_pickled_object_in_trainer_state_is_refused(tmp_path, data_pkl, tiny_model_dir):
    train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "2"))
    state = tmp_path / "ckpt" / "step-000002" / "trainer_state.pt"
    torch.save({"optimizer": {}, "evil": os.getcwd, "rng_cpu": torch.get_rng_state()}, state)
    with pytest.raises(UserError, match="damaged or unreadable"):  # weights_only=True refuses the function
        train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "4", "--load-checkpoint", "True"))


@pytest.mark.slow
def test_keep_checkpoints_keeps_the_newest_and_the_best(tmp_path, data_pkl, tiny_model_dir):
    train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "10", "--save-every-steps", "2",
                 "--eval-every", "2", "--keep-checkpoints", "2"))  # fmt: skip
    names = checkpoint.list_checkpoints(tmp_path / "ckpt")
    losses = {n: json.loads((tmp_path / "ckpt" / n / "trainer_state.json").read_text())["val_loss"] for n in names}
    assert "step-000010" in names and "step-000008" in names
    assert len(names) <= 3
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = min((r["val_loss"], r["step"]) for r in metrics if "val_loss" in r and r["step"] > 0)
    assert f"step-{best[1]:06d}" in names and losses[f"step-{best[1]:06d}"] == best[0]


@pytest.mark.slow
def test_non_finite_loss_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path, data_pkl, tiny_model_dir):
    train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "2"))
    good = load_file(tmp_path / "ckpt" / "step-000002" / "adapter_model.safetensors")
    with pytest.raises(UserError, match="non-finite at step [3-9].*lower --lr"):
        train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "9", "--lr", "1e30", "--warmup-steps", "0",
                     "--max-grad-norm", "0", "--load-checkpoint", "True"))  # fmt: skip
    assert checkpoint.list_checkpoints(tmp_path / "ckpt") == ["step-000002"]
    after = load_file(tmp_path / "ckpt" / "step-000002" / "adapter_model.safetensors")
    assert all(torch.equal(good[k], after[k]) for k in good)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_resumed_run_ends_where_an_uninterrupted_one_does(
    tmp_path, data_pkl, tiny_model_dir
):
    args = ["--data", data_pkl, "--model", tiny_model_dir, "--batch-size", "2", "--max-input-length", "24",
            "--rank-lora", "4", "--lr", "5e-3", "--warmup-steps", "1", "--sample-every", "0", "--max-steps", "400",
            "--save-every-steps", "1000", "--lora-dropout", "0.1"]  # fmt: skip
    uninterrupted = config(tmp_path, data_pkl, tiny_model_dir, *map(str, args), run="whole")
    uninterrupted.ckpt.check_dir = str(tmp_path / "whole-ckpt")
    train(uninterrupted)

    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, args), "--log-every", "1"]
    returncode, err = signal_after(cmd, tmp_path, signal.SIGTERM, losses=20)
    assert returncode == 143, err
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err
    names = checkpoint.list_checkpoints(tmp_path / "Checkpoints")
    assert len(names) == 1 and names[0].startswith("step-")
    stopped_at = int(names[0].split("-")[1])
    assert 20 <= stopped_at < 400

    resumed = subprocess.run(cmd + ["--load-checkpoint", "True"], cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "GPT2_fine_tuned_Austen" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_130(tmp_path, data_pkl, tiny_model_dir):
    args = ["--data", data_pkl, "--model", tiny_model_dir, "--batch-size", "2", "--max-input-length", "24",
            "--rank-lora", "4", "--sample-every", "0", "--max-steps", "100000", "--log-every", "1"]  # fmt: skip
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, args)]
    returncode, err = signal_after(cmd, tmp_path, signal.SIGINT, losses=3)
    assert returncode == 130, err
    assert "stopped by SIGINT" in err and "--load-checkpoint True" in err and "Traceback" not in err
    assert len(checkpoint.list_checkpoints(tmp_path / "Checkpoints")) == 1


def test_pruning_covers_every_kind_and_spares_the_best_and_latest(tmp_path):
    for name, step, val_loss in [("Epoch_1", 4, 5.0), ("step-000006", 6, 4.0), ("Epoch_2", 8, 4.5),
                                 ("step-000010", 10, 4.6), ("step-000012", 12, None)]:  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text(json.dumps({"step": step, "val_loss": val_loss}))
        (tmp_path / name / "trainer_state.pt").write_bytes(b"")
    (tmp_path / "latest").write_text("Epoch_1\n")  # e.g. a run resumed from it
    assert checkpoint.prune_checkpoints(tmp_path, 0) == []  # 0: keep all
    assert checkpoint.prune_checkpoints(tmp_path, 2) == ["Epoch_2"]
    assert checkpoint.list_checkpoints(tmp_path) == ["Epoch_1", "step-000006", "step-000010", "step-000012"]
    assert TrainConfig().ckpt.keep_checkpoints == 3  # the default cannot fill a disk unnoticed
