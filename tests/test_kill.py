"""SIGKILL at random moments (during steps, saves and sampling), resume each time: the final adapter must
equal an uninterrupted run's, bit for bit."""

import random
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from qlora_ft.checkpoint import list_checkpoints
from qlora_ft.config import TrainConfig
from qlora_ft.loop import train
from qlora_ft.options import parse_config


@pytest.mark.slow
def test_ten_sigkills_then_resume_equals_an_uninterrupted_run(tmp_path, data_pkl, tiny_model_dir):
    args = ["--data", str(data_pkl), "--model", str(tiny_model_dir), "--batch-size", "2", "--max-input-length",
            "24", "--rank-lora", "4", "--lr", "5e-3", "--warmup-steps", "5", "--max-steps", "240",
            "--save-every-steps", "5", "--sample-every", "7", "--max-output-length", "6", "--grad-accum-steps", "2",
            "--lora-dropout", "0.1", "--log-every", "1", "--eval-every", "50"]  # fmt: skip
    reference = parse_config(TrainConfig, args + ["--check-dir", str(tmp_path / "ref-ckpt"), "--output-dir",
                                                  str(tmp_path / "ref")], "train.py")  # fmt: skip
    train(reference)

    rng = random.Random(0)
    work = tmp_path / "killed"
    work.mkdir()
    metrics = work / "GPT2_fine_tuned_Austen" / "metrics.jsonl"
    kills = 0
    for _ in range(30):  # at most 30 starts; 10 of them are killed
        resume = ["--load-checkpoint", "True"] if list_checkpoints(work / "Checkpoints") else ["--overwrite"]
        before = metrics.read_text().count("\n") if metrics.exists() else 0
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, *resume], cwd=work,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        if kills < 10:
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline:  # wait until this run is training
                if metrics.exists() and metrics.read_text().count("\n") > before:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.5))  # ~30 steps/s: each killed start trains a few steps; 10 kills fit
            if proc.poll() is None:
                proc.kill()
                kills += 1
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -9, err  # killed by us, nothing else went wrong
    assert kills == 10 and proc.returncode == 0
    assert not [p for p in (work / "Checkpoints").iterdir() if p.name.startswith((".tmp-", ".old-"))]
    a = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    b = load_file(work / "GPT2_fine_tuned_Austen" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
