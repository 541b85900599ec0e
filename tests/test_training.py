"""qlora_ft.training: the run's own copy of the config, and the TrainState that checkpoints save whole."""

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch

from qlora_ft.config import TrainConfig
from qlora_ft.loop import train
from qlora_ft.options import parse_config
from qlora_ft.training.state import TrainState


def test_train_leaves_the_callers_config_as_given_and_checkpoints_the_validation_losses(
    tmp_path, data_pkl, tiny_model_dir, monkeypatch
):
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(TrainConfig, ["--data", str(data_pkl), "--model", "model", "--batch-size", "4",
                                     "--max-input-length", "24", "--rank-lora", "4", "--lr", "1e-2",
                                     "--warmup-steps", "1", "--max-steps", "3", "--eval-every", "1",
                                     "--sample-every", "0", "--log-every", "1", "--check-dir", "ckpt",
                                     "--output-dir", "run"], "train.py")  # fmt: skip
    given = copy.deepcopy(cfg)
    train(cfg)
    assert cfg == given  # e.g. the model path stays relative, as given
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["model"]["model"] == str((tmp_path / "model").resolve())  # the run records it absolute

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(val) == [0, 1, 2, 3]
    meta = json.loads((tmp_path / "ckpt" / "step-000003" / "trainer_state.json").read_text())
    assert meta["initial_val_loss"] == val[0]  # the base model's
    assert meta["val_loss"] == val[3]
    assert meta["best_val_loss"] == min(val[1], val[2], val[3])
    assert (meta["step"], meta["tokens"]) == (3, sum(r["tokens"] for r in rows if r["step"] == 3 and "loss" in r))


def test_train_state_round_trips_and_reads_checkpoints_of_earlier_versions(tmp_path):
    state = TrainState(step=7, epoch=1, position=3, tokens=900, initial_val_loss=5.0, best_val_loss=4.0,
                       val_loss=4.5, rng={"rng_cpu": torch.get_rng_state()[None].repeat(2, 1)})  # fmt: skip
    meta = json.loads(json.dumps(state.to_meta(batches_in_epoch=10)))
    assert (meta["epoch"], meta["position"]) == (2, 3)  # trainer_state.json counts epochs from 1, as the logs do
    again = TrainState.from_checkpoint(tmp_path, meta, state.to_tensors())
    assert again.to_meta(10) == state.to_meta(10) and torch.equal(again.rng["rng_cpu"], state.rng["rng_cpu"])

    # an earlier version's: epoch 0-based, no best_val_loss, one RNG state for the one process
    old_meta = {"step": 4, "epoch": 0, "position": 8, "tokens": 512, "world_size": 1, "total_steps": 8,
                "batches_in_epoch": 14, "initial_val_loss": 5.5, "val_loss": 5.1}  # fmt: skip
    torch.manual_seed(3)
    old = TrainState.from_checkpoint(tmp_path, old_meta, {"optimizer": {}, "rng_cpu": torch.get_rng_state()})
    expected = torch.rand(3)
    assert (old.step, old.epoch, old.position, old.tokens) == (4, 0, 8, 512)
    assert (old.initial_val_loss, old.val_loss, old.best_val_loss) == (5.5, 5.1, 5.1)
    torch.manual_seed(0)
    old.restore_rng(rank=0, device=torch.device("cpu"), seed=0)
    assert torch.equal(torch.rand(3), expected)


FRAGMENT = """
import resource, sys, torch
from qlora_ft.training.setup import return_freed_memory
def rss(): return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
first = torch.ones(4 << 20)
del first  # 16 MB freed: glibc raises its mmap threshold past the 8 MB tensors below
if sys.argv[1] == "on":
    assert return_freed_memory()
start = rss()
big, kept = [], []
for _ in range(40):  # 8 MB activations with small long-lived tensors between them, as a step leaves them
    big.append(torch.ones(2 << 20))
    kept.append(torch.ones(40_000))
del big
print((rss() - start) / 1e6)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_go_back_to_the_system_on_cpu():
    """CPU training sets glibc's mmap threshold: freed activation-sized tensors leave no pages behind in fragmented
    heap arenas (without it, 320 MB of freed 8 MB tensors stay resident)."""
    held = {mode: float(subprocess.run([sys.executable, "-c", FRAGMENT, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("off", "on")}  # fmt: skip
    assert held["off"] > 200 and held["on"] < 50, held
