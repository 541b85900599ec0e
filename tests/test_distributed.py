"""Data-parallel training with several processes: 2 CPU processes (torchrun, gloo) against one."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from qlora_ft.config import TrainConfig, parse_config
from qlora_ft.errors import UserError
from qlora_ft.loop import _check_compatible


def launch(n_proc: int, tmp_path, data, model_dir, run: str, *extra: str):
    args = ["--data", str(data), "--model", str(model_dir), "--max-input-length", "24", "--rank-lora", "4",
            "--lr", "1e-2", "--warmup-steps", "1", "--max-steps", "3", "--sample-every", "2", "--lora-dropout", "0",
            "--max-output-length", "4", "--log-every", "1", "--check-dir", str(tmp_path / f"ckpt-{run}"),
            "--output-dir", str(tmp_path / run), *extra]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n_proc}",
           str(ROOT / "train.py"), *args]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def no_dropout_copy(model_dir, out):
    """The tiny model without dropout (GPT-2 configs default to 0.1): runs on different processes draw
    different masks, so only a dropout-free model can be compared across process counts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.update({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


@pytest.mark.slow
def test_two_processes_equal_one_with_the_double_batch(tmp_path, data_pkl, tiny_model_dir):
    tiny_model_dir = no_dropout_copy(tiny_model_dir, tmp_path / "model")
    launch(2, tmp_path, data_pkl, tiny_model_dir, "two", "--batch-size", "2", "--save-every-steps", "2")
    launch(1, tmp_path, data_pkl, tiny_model_dir, "one", "--batch-size", "4")
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("two", "one"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    # only the main process writes: one set of metrics rows, one checkpoint folder, one samples file
    rows = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in rows if '"loss"' in r]) == 3
    assert sorted(p.name for p in (tmp_path / "ckpt-two").iterdir()) == ["latest", "step-000002", "step-000003"]
    two, one = (
        [line for line in rows if '"val_loss"' in line],
        [line for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in line],
    )
    assert len(two) == len(one) == 2  # step 0 and the end, scored on all validation paragraphs by both

    # resume the 2-process run on 1 process with the same global batch (1 x 4): allowed, same data position
    launch(1, tmp_path, data_pkl, tiny_model_dir, "two", "--batch-size", "4", "--max-steps", "3",
           "--check-dir", str(tmp_path / "ckpt-two"), "--restore-file", "step-000002")  # fmt: skip


def test_resume_refuses_a_different_global_batch(tmp_path):
    cfg = parse_config(TrainConfig, ["--data", "x.pkl", "--batch-size", "2"], "train.py")
    same = parse_config(TrainConfig, ["--data", "x.pkl", "--batch-size", "4"], "train.py")
    _check_compatible(cfg, same, tmp_path, saved_world=2, world=1)  # 2 x 2 == 4 x 1
    with pytest.raises(UserError, match=r"--batch-size 2 on 2 process\(es\) \(this run: 2 on 1\)"):
        _check_compatible(cfg, cfg, tmp_path, saved_world=2, world=1)
