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


def launch(n_proc: int, tmp_path, data, model_dir, run: str, *extra: str, fsdp: bool = False):
    args = ["--data", str(data), "--model", str(model_dir), "--max-input-length", "24", "--rank-lora", "4",
            "--lr", "1e-2", "--warmup-steps", "1", "--max-steps", "3", "--sample-every", "2", "--lora-dropout", "0",
            "--max-output-length", "4", "--log-every", "1", "--check-dir", str(tmp_path / f"ckpt-{run}"),
            "--output-dir", str(tmp_path / run), *extra]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n_proc}",
           str(ROOT / "train.py"), *args]  # fmt: skip
    if fsdp:  # the shipped config, through accelerate's own launcher
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs/fsdp_qlora.yaml"), "--num_processes", str(n_proc), "--mixed_precision", "no",
               str(ROOT / "tests/fsdp_on_cpu.py"), *args]  # fmt: skip
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

    # resume step 2 -> 3 on 1 process with the same global batch (1 x 4): allowed, same data position;
    # and on 2 processes (each takes back its own RNG state)
    for n_proc, batch in ((1, "4"), (2, "2")):
        run = f"resumed-{n_proc}"
        launch(n_proc, tmp_path, data_pkl, tiny_model_dir, run, "--batch-size", batch, "--check-dir",
               str(tmp_path / "ckpt-two"), "--restore-file", "step-000002")  # fmt: skip
        c = load_file(tmp_path / run / "adapter_model.safetensors")
        for k in a:
            torch.testing.assert_close(c[k], a[k], atol=1e-5, rtol=1e-4)


def test_resume_refuses_a_different_global_batch(tmp_path):
    cfg = parse_config(TrainConfig, ["--data", "x.pkl", "--batch-size", "2"], "train.py")
    same = parse_config(TrainConfig, ["--data", "x.pkl", "--batch-size", "4"], "train.py")
    _check_compatible(cfg, same, tmp_path, saved_world=2, world=1)  # 2 x 2 == 4 x 1
    with pytest.raises(UserError, match=r"--batch-size 2 on 2 process\(es\) \(this run: 2 on 1\)"):
        _check_compatible(cfg, cfg, tmp_path, saved_world=2, world=1)


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_and_resume_anywhere(tmp_path, data_pkl, tiny_model_dir):
    """QLoRA sharded with FSDP 2 over 2 CPU processes (tests/fsdp_on_cpu.py) trains the adapter that one
    unsharded process does; its checkpoints (gathered weights and optimizer state) resume unsharded and sharded."""
    tiny_model_dir = no_dropout_copy(tiny_model_dir, tmp_path / "model")
    fsdp = launch(2, tmp_path, data_pkl, tiny_model_dir, "fsdp", "--batch-size", "2", "--save-every-steps", "2",
                  fsdp=True)  # fmt: skip
    assert "FSDP: computing full logits" in fsdp.stderr
    launch(1, tmp_path, data_pkl, tiny_model_dir, "one", "--batch-size", "4")
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("fsdp", "one"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    step2 = load_file(tmp_path / "ckpt-fsdp" / "step-000002" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in step2.items()} == {k: v.shape for k, v in b.items()}  # gathered, not a shard

    # step 2 -> 3 again, from the FSDP checkpoint: on one unsharded process, and sharded on two
    for n_proc, batch, sharded, run in ((1, "4", False, "resumed-one"), (2, "2", True, "resumed-fsdp")):
        launch(n_proc, tmp_path, data_pkl, tiny_model_dir, run, "--batch-size", batch, "--check-dir",
               str(tmp_path / "ckpt-fsdp"), "--restore-file", "step-000002", "--output-dir", str(tmp_path / run),
               fsdp=sharded)  # fmt: skip
        c = load_file(tmp_path / run / "adapter_model.safetensors")
        for k in a:
            torch.testing.assert_close(c[k], a[k], atol=1e-5, rtol=1e-4)


def test_engines_this_loop_does_not_drive_are_refused():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from qlora_ft.loop import check_engine

    cfg = parse_config(TrainConfig, ["--data", "x.pkl"], "train.py")
    engine = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    with pytest.raises(UserError, match="DeepSpeed is not supported.*configs/fsdp_qlora.yaml"):
        check_engine(engine, cfg)
    fsdp1 = SimpleNamespace(
        distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1))
    )
    with pytest.raises(UserError, match="FSDP version 1 is not supported"):
        check_engine(fsdp1, cfg)
    fsdp1.state.fsdp_plugin.fsdp_version = 2
    assert check_engine(fsdp1, cfg) is True
    assert check_engine(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU), cfg) is False
    cfg.model.lora = False
    with pytest.raises(UserError, match="full fine-tuning"):
        check_engine(fsdp1, cfg)
