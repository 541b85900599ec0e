"""Beyond GPT-2: tiny random Llama, Qwen2 and GPT-NeoX models through train, resume, merge and generate."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tokenizer
from qlora_ft.checkpoint import list_checkpoints
from qlora_ft.cli import inference_main
from qlora_ft.config import ModelArgs, TrainConfig
from qlora_ft.loop import train
from qlora_ft.loss import output_layer
from qlora_ft.model import LORA_TARGETS, add_lora, keep_training_layout, load_base, load_for_inference
from qlora_ft.options import parse_config
from qlora_ft.training.setup import packing_is_isolated

CPU = torch.device("cpu")


def build(kind: str, path):
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tokenizer = build_tokenizer()
    tokenizer.pad_token = None  # like Llama's: the loader must supply one
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)  # fmt: skip
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM),
    }[kind]
    torch.manual_seed(0)
    model_cls(config_cls(**common)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt_neox"])
def arch_dir(request, tmp_path_factory):
    return request.param, build(request.param, tmp_path_factory.mktemp(request.param))


def argv(tmp_path, data, model_dir, *extra, run="run"):
    return ["--data", str(data), "--model", str(model_dir), "--batch-size", "4", "--max-input-length", "24",
            "--rank-lora", "4", "--lr", "1e-2", "--warmup-steps", "1", "--max-steps", "4", "--sample-every", "0",
            "--max-output-length", "4", "--log-every", "1", "--lora-dropout", "0.1",
            "--check-dir", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / run), *extra]  # fmt: skip


@pytest.mark.slow
def test_train_resume_merge_generate(arch_dir, tmp_path, data_pkl, capsys):
    kind, model_dir = arch_dir
    # the shortcuts the loop takes are checked per model at start-up; these families support both
    model = add_lora(load_base(str(model_dir), True, torch.float32, CPU), ModelArgs(rank_lora=4))
    assert packing_is_isolated(model, CPU) and output_layer(model, CPU) is not None
    wrapped = {n.rsplit(".", 2)[-2] for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert wrapped == set(LORA_TARGETS[kind])  # auto targets: attention and MLP projections

    full = train(parse_config(TrainConfig, argv(tmp_path, data_pkl, model_dir, "--save-every-steps", "2"), "t"))
    assert list_checkpoints(tmp_path / "ckpt") == ["step-000002", "step-000004"]
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["data"]["packing"] is True
    assert full.summary["final_val_loss"] < full.summary["initial_val_loss"]
    (tmp_path / "ckpt" / "step-000004").rename(tmp_path / "full-step4")
    train(parse_config(TrainConfig, argv(tmp_path, data_pkl, model_dir, "--restore-file", "step-000002",
                                         run="resumed"), "t"))  # fmt: skip
    a, b = (
        load_file(tmp_path / "run" / "adapter_model.safetensors"),
        load_file(tmp_path / "resumed" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resume is bit-exact

    base = load_base(str(model_dir), True, torch.float32, CPU)
    keep_training_layout(base)
    from peft import PeftModel

    trained = PeftModel.from_pretrained(base, str(tmp_path / "run")).eval()
    merged, tokenizer = load_for_inference(str(tmp_path / "run"), None, False, CPU)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # supplied: the tokenizer had none
    ids = torch.randint(1, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained(ids).logits, atol=1e-4, rtol=1e-4)

    inference_main(["--model_path", str(tmp_path / "run"), "--prompt", "She was", "--max_length", "5",
                    "--n_return_seqs", "2"])  # fmt: skip
    lines = [line for line in capsys.readouterr().out.splitlines() if line[:4] in ("[1] ", "[2] ")]
    assert len(lines) == 2 and all(line[4:].startswith("She was") for line in lines)


def test_all_linear_wraps_every_block_linear(tiny_model_dir):
    model = add_lora(load_base(str(tiny_model_dir), False, torch.float32, CPU),
                     ModelArgs(rank_lora=2, targets_lora=["all-linear"]))  # fmt: skip
    wrapped = {n.rsplit(".", 2)[-2] for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert wrapped == {"c_attn", "c_proj", "c_fc"}  # every block linear, not the output layer
