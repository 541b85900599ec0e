"""16-bit training on CPU: the precision policy, the chunked loss under autocast, every mode in bf16 and fp16
(fp16 with loss scaling), float32 trainable weights, and an exact fp16 resume."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qlora_ft.checkpoint import list_checkpoints, load_checkpoint
from qlora_ft.cli import train_main
from qlora_ft.config import TrainConfig
from qlora_ft.loss import linear_cross_entropy
from qlora_ft.model import compute_dtype
from qlora_ft.options import parse_config
from qlora_ft.precision import BF16, FP16, FP32, precision_policy
from qlora_ft.training.setup import method_name

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def fake_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    """A CUDA device of this compute capability that (like torch on a T4 or V100) reports bf16 support."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


@pytest.mark.parametrize("capability, expected", [((7, 0), FP16), ((7, 5), FP16), ((8, 0), BF16), ((9, 0), BF16)])
def test_auto_is_bf16_only_where_native(monkeypatch, capability, expected):
    fake_gpu(monkeypatch, capability)
    assert precision_policy("auto", CUDA) == expected
    assert compute_dtype("auto", CUDA) == expected.dtype
    assert expected.use_scaler == (expected.dtype == torch.float16)
    cfg = parse_config(TrainConfig, ["--compute-dtype", "auto"], "train.py")
    assert method_name(cfg) == f"QLoRA (4-bit NF4 base + LoRA, {expected.name})"


def test_cpu_auto_is_float32_and_explicit_choices_are_honoured(monkeypatch):
    assert precision_policy("auto", CPU) == FP32 and compute_dtype("auto", CPU) == torch.float32
    assert precision_policy("bfloat16", CPU) == BF16 and precision_policy("float16", CPU) == FP16
    assert precision_policy("float32", CPU).accelerate_name == "no"
    fake_gpu(monkeypatch, (7, 5))
    assert precision_policy("bfloat16", CUDA) == BF16  # asked for: honoured (with a warning)
    assert precision_policy("float32", CUDA) == FP32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_torch", [False, True])
def test_chunked_loss_matches_plain_loss_under_autocast(dtype, use_torch):
    """Under autocast the chunked loss computes its matmuls in the autocast dtype, as the model's own output
    layer would: it matches the plain loss to 16-bit rounding, closer than the float32 loss is."""
    if use_torch and not hasattr(F, "linear_cross_entropy"):
        pytest.skip("torch < 2.13 has no F.linear_cross_entropy")
    torch.manual_seed(0)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = (torch.randn(300, 32) * 0.3).requires_grad_()  # float32, trained (full fine-tuning's tied head)
    targets = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=dtype):
        plain = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
        chunked = linear_cross_entropy(hidden, weight, targets, chunk=16, use_torch=use_torch)
    full32 = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    assert chunked.dtype == torch.float32
    tol = 4e-3 if use_torch else 1e-5  # torch's op returns the loss rounded to the input dtype
    torch.testing.assert_close(chunked, plain, rtol=tol, atol=0)
    if not use_torch:
        assert abs(float(chunked - plain)) < abs(float(full32 - plain))  # not the float32 loss
    grads_plain = torch.autograd.grad(plain, (hidden, weight))
    grads_chunked = torch.autograd.grad(chunked, (hidden, weight))
    for a, b in zip(grads_chunked, grads_plain, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.02 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch < 2.13 has no F.linear_cross_entropy")
def test_torch_chunked_loss_does_not_overflow_fp16():
    """torch's op returns its sum in the input dtype: the fp16 sum of 3,000 tokens' losses would overflow."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(3000, 16), torch.randn(100, 16) * 3
    targets = torch.randint(0, 100, (3000,))
    with torch.autocast("cpu", dtype=torch.float16):
        plain = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
        chunked = linear_cross_entropy(hidden, weight, targets, chunk=4096, use_torch=True)
    assert float(plain) > 65504 and chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=1e-3, atol=0)


def _argv(tmp_path, data, model_dir, run, *extra):
    return ["--data", str(data), "--model", str(model_dir), "--batch-size", "4", "--max-input-length", "24",
            "--lr", "3e-2", "--warmup-steps", "0", "--sample-every", "0",
            "--max-output-length", "8", "--log-every", "1", "--max-steps", "4",
            "--check-dir", str(tmp_path / f"ckpt-{run}"), "--output-dir", str(tmp_path / run), *extra]  # fmt: skip


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


LORA = ["--rank-lora", "4", "--alpha-lora", "8", "--lora-dropout", "0"]
MODES = {"qlora": LORA, "lora16": ["--qlora", "False", "--lora", "True", *LORA], "full": ["--qlora", "False"]}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_trains_in_16_bit(tmp_path, data_pkl, tiny_model_dir, mode, dtype):
    """Through the CLI: a falling, finite loss; float32 trainable weights (checked in the saved checkpoint,
    which stores them as trained); fp16 with a loss scaler; a result that transformers / peft load."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train_main(_argv(tmp_path, data_pkl, tiny_model_dir, "run", "--compute-dtype", dtype, *MODES[mode]))
    out = tmp_path / "run"
    losses = _losses(out)
    assert all(map(torch.isfinite, torch.tensor(list(losses.values()))))
    assert losses[4] < losses[1] - 0.02, losses
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert ("bf16" if dtype == "bfloat16" else "fp16") in summary["method"]
    _, tensors, _, _ = load_checkpoint(tmp_path / "ckpt-run" / "step-000004")
    states = tensors["optimizer"]["state"]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states.values())  # float32 masters
    assert ("scaler" in tensors) == (dtype == "float16")
    if dtype == "float16":
        assert tensors["scaler"]["scale"] > 1.0  # the loss was scaled
    if mode == "full":
        model = AutoModelForCausalLM.from_pretrained(out)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, base.transformer.h[0].mlp.c_fc.weight)
    else:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
        lora = {n: p for n, p in model.named_parameters() if "lora_B" in n}
        assert lora and all(p.dtype == torch.float32 and p.abs().sum() > 0 for p in lora.values())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["qlora", "full"])
def test_trainable_weights_are_float32_in_16_bit_modes(tmp_path, data_pkl, tiny_model_dir, mode):
    """The live model after training: what the optimizer updated is float32 (autocast computes in 16 bits)."""
    from qlora_ft.loop import train

    cfg = parse_config(TrainConfig, _argv(tmp_path, data_pkl, tiny_model_dir, "run", "--compute-dtype", "float16",
                                          "--max-steps", "1", *MODES[mode]), "train.py")  # fmt: skip
    model = train(cfg).model
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}


@pytest.mark.slow
def test_fp16_resume_is_bit_exact(tmp_path, data_pkl, tiny_model_dir):
    """fp16 with loss scaling: 4 steps at once == 2 steps, then a new run resumed from that checkpoint for 2
    more (the scaler's state is saved and restored); with dropout."""
    from safetensors.torch import load_file

    args = ("--compute-dtype", "float16", "--qlora", "False", "--lora", "True", "--save-every-steps", "2",
            "--rank-lora", "4", "--alpha-lora", "8", "--lora-dropout", "0.1",
            "--check-dir", str(tmp_path / "ckpt"))  # fmt: skip
    train_main(_argv(tmp_path, data_pkl, tiny_model_dir, "full", *args))
    assert list_checkpoints(tmp_path / "ckpt") == ["step-000002", "step-000004"]
    _, tensors, _, _ = load_checkpoint(tmp_path / "ckpt" / "step-000002")
    assert tensors["scaler"]["scale"] > 1.0
    (tmp_path / "ckpt" / "step-000004").rename(tmp_path / "full-step4")  # so the resumed run cannot reuse it
    train_main(_argv(tmp_path, data_pkl, tiny_model_dir, "resumed", *args, "--restore-file", "step-000002"))
    full = load_file(tmp_path / "full" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    losses = _losses(tmp_path / "resumed")
    assert sorted(losses) == [3, 4] and all(_losses(tmp_path / "full")[s] == losses[s] for s in losses)


@pytest.mark.cuda
def test_cuda_bf16_policy_and_autocast_loss():
    """On a real GPU: the policy matches the card, and the chunked loss matches the plain one under autocast."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    native = torch.cuda.get_device_capability() >= (8, 0)
    assert precision_policy("auto", CUDA) == (BF16 if native else FP16)
    torch.manual_seed(0)
    hidden = torch.randn(512, 64, device="cuda", requires_grad=True)
    weight = torch.randn(1000, 64, device="cuda") * 0.3
    targets = torch.randint(0, 1000, (512,), device="cuda")
    dtype = precision_policy("auto", CUDA).dtype
    with torch.autocast("cuda", dtype=dtype):
        plain = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
        chunked = linear_cross_entropy(hidden, weight, targets, chunk=128)
    torch.testing.assert_close(chunked, plain.float(), rtol=1e-3, atol=0)
