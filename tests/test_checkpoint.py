"""Crash-safe checkpoints: atomic saves, incomplete or damaged checkpoints, pruning, signals."""

import ast
import errno
import hashlib
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
from qlora_ft.cli import train_main
from qlora_ft.config import TrainConfig
from qlora_ft.errors import UserError
from qlora_ft.loop import train
from qlora_ft.options import parse_config


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


# ----------------------------------------------------------------------------------------------------------
# manifest.json: every file of a checkpoint with its size and sha256, checked before a resume


def refused(capsys, argv) -> str:
    """The one stderr line of a train.py run that stops with exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    return err[0]


def flags(tmp_path, data, model_dir, *extra):
    return ["--data", str(data), "--model", str(model_dir), "--batch-size", "4", "--max-input-length", "24",
            "--rank-lora", "4", "--warmup-steps", "1", "--sample-every", "0", "--log-every", "1",
            "--check-dir", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "run"), *extra]  # fmt: skip


def test_a_checkpoint_lists_its_files_their_sizes_and_sha256_and_its_data(tmp_path, data_pkl, tiny_model_dir):
    train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "2", "--seed", "7", "--train-size", "0.8"))
    folder = tmp_path / "ckpt" / "step-000002"
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = {p.name: p for p in folder.iterdir() if p.name != "manifest.json"}
    assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.pt", "split.json"} <= set(on_disk)
    assert set(manifest["files"]) == set(on_disk)
    for name, entry in manifest["files"].items():
        content = on_disk[name].read_bytes()
        assert entry == {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}, name
    split = json.loads((folder / "split.json").read_text())
    assert manifest["format"] == checkpoint.FORMAT
    # text is read through the token cache: the split is (fingerprint, seed, share), not a list of indices
    assert split == {"cache_fingerprint": split["cache_fingerprint"], "seed": 7, "train_size": 0.8,
                     "n_train": split["n_train"], "n_validation": split["n_validation"]}  # fmt: skip
    assert manifest["data"] == {"fingerprint": split["cache_fingerprint"], "seed": 7, "train_size": 0.8}


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # same size, other bytes: a float of the last tensor changes, the file still parses
    path.write_bytes(bytes(data))


def _bump_step(path):
    path.write_text(path.read_text().replace('"step": 2,', '"step": 3,'))  # same size, valid JSON


@pytest.mark.parametrize("victim, tamper", [("adapter_model.safetensors", _flip_last_byte),
                                            ("trainer_state.json", _bump_step)])  # fmt: skip
def test_a_tampered_checkpoint_is_refused_in_one_line(tmp_path, data_pkl, tiny_model_dir, capsys, victim, tamper):
    train_main(flags(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "2"))
    folder = tmp_path / "ckpt" / "step-000002"
    size = (folder / victim).stat().st_size
    tamper(folder / victim)
    assert (folder / victim).stat().st_size == size
    before = digest(tmp_path / "ckpt")
    line = refused(capsys, flags(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "4", "--load-checkpoint", "True"))
    assert line == (
        f"train.py: error: checkpoint {folder} is damaged or unreadable: {victim} differs from "
        "manifest.json (sha256); resume from another checkpoint (--restore-file NAME) or start a new run"
    )
    assert digest(tmp_path / "ckpt") == before  # refused before anything was written


def test_a_checkpoint_without_a_manifest_still_resumes(tmp_path, data_pkl, tiny_model_dir):
    """Checkpoints written before manifests existed: checked by reading their files, as then."""
    train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "2"))
    (tmp_path / "ckpt" / "step-000002" / "manifest.json").unlink()
    assert checkpoint.list_checkpoints(tmp_path / "ckpt") == ["step-000002"]
    train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "4", "--load-checkpoint", "True"))
    state = json.loads((tmp_path / "ckpt" / "step-000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and (tmp_path / "ckpt" / "step-000004" / "manifest.json").is_file()
    # and a pickled object in it is still refused by reading it with weights_only=True, as before manifests
    torch.save({"optimizer": {}, "evil": os.getcwd}, tmp_path / "ckpt" / "step-000002" / "trainer_state.pt")
    with pytest.raises(UserError, match=r"step-000002 is damaged or unreadable \(UnpicklingError"):
        train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "6", "--restore-file", "step-000002"))


def test_a_file_the_manifest_lists_but_the_folder_lacks_makes_the_checkpoint_incomplete(tmp_path):
    for name, step in (("step-000002", 2), ("step-000004", 4)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
        (folder / "trainer_state.pt").write_bytes(b"")
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        checkpoint.write_manifest(folder, {"data": {"seed": 1, "train_size": 0.9}}, {"data_sha256": "x"})
    (tmp_path / "step-000004" / "adapter_model.safetensors").unlink()  # e.g. deleted by hand
    assert checkpoint.list_checkpoints(tmp_path) == ["step-000002"]
    assert checkpoint.resolve_checkpoint(tmp_path, "latest").name == "step-000002"
    with pytest.raises(UserError, match=r"step-000004 is incomplete \(missing adapter_model.safetensors\)"):
        checkpoint.resolve_checkpoint(tmp_path, "step-000004")


# ----------------------------------------------------------------------------------------------------------
# checkpoint.py is the only module that names a file inside a checkpoint or a run's output folder

LAYOUT_NAMES = {"run_config.json", "trainer_state.json", "trainer_state.pt", "split.json", "manifest.json",
                "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "model.safetensors",
                "latest"}  # fmt: skip
# config.py: "latest" is also the value of --restore-file that resolve_checkpoint interprets, and config.py
# stays free of torch (which checkpoint.py imports), so it cannot use checkpoint.LATEST
ALLOWED = {("config.py", "latest")}


def layout_literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of each string literal that is a layout file name, or a path ending in one: the literals
    code uses to open a file. Prose (docstrings, messages, help lines that mention a name) is not such a literal."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            tail = node.value.strip().rsplit("/", 1)[-1]
            if tail in LAYOUT_NAMES:
                found.append((node.lineno, node.value))
    return found


def test_the_layout_scan_finds_file_names_and_skips_prose():
    code = 'p = run / "run_config.json"\nq = f"{run}/adapter_model.safetensors"\nr = resolve(d, "latest")\n'
    code += '"""Reads run_config.json."""\nraise E(f"{p} needs adapter_config.json")\n'
    assert layout_literals(code) == [(1, "run_config.json"), (2, "/adapter_model.safetensors"), (3, "latest")]


def test_no_module_but_checkpoint_names_a_file_inside_a_checkpoint():
    package = ROOT / "qlora_ft"
    offenders = [f"{path.relative_to(ROOT)}:{line}: {text!r}"
                 for path in sorted(package.rglob("*.py")) if path.name != "checkpoint.py"
                 for line, text in layout_literals(path.read_text(encoding="utf-8"))
                 if (path.name, text) not in ALLOWED]  # fmt: skip
    assert not offenders, "use the functions of qlora_ft/checkpoint.py instead:\n" + "\n".join(offenders)
    assert layout_literals((package / "checkpoint.py").read_text(encoding="utf-8"))  # the scan sees the names there
