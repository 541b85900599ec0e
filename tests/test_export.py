"""`qlora-ft export`: every merge mode writes a folder that transformers loads by itself (no code of ours),
with the logits of the adapter it came from, for GPT-2 (Conv1D layers) and Llama (Linear layers), from QLoRA
and from 16/32-bit LoRA runs; `pipeline` and `inference.py` generate from it."""

import pickle

import pytest
import torch
from safetensors import safe_open
from test_architectures import build

from conftest import build_model_dir, make_paragraphs
from qlora_ft.cli import inference_main, main, train_main

MODES = {"qlora": [], "lora": ["--qlora", "False", "--lora", "True"]}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"gpt2": build_model_dir(root / "gpt2"), "llama": build("llama", root / "llama")}


@pytest.fixture(scope="module", params=[(a, m) for a in ("gpt2", "llama") for m in MODES], ids="-".join)
def trained(request, bases, tmp_path_factory):
    """(architecture, mode, base dir, run output dir) of a 2-step run, trained once per module."""
    arch, mode = request.param
    root = tmp_path_factory.mktemp(f"{arch}-{mode}")
    data = root / "data.pkl"
    data.write_bytes(pickle.dumps([{"sentence": p} for p in make_paragraphs(40)]))
    train_main(["--data", str(data), "--model", str(bases[arch]), "--batch-size", "4", "--max-input-length", "24",
                "--rank-lora", "4", "--lr", "2e-2", "--warmup-steps", "1", "--max-steps", "2", "--sample-every", "0",
                "--save-interval", "0", "--check-dir", str(root / "ckpt"), "--output-dir", str(root / "run"),
                *MODES[mode]])  # fmt: skip
    return arch, mode, bases[arch], root / "run"


def adapter_on_base(base_dir, run_dir, nf4: bool):
    """The adapter applied unmerged, with peft, on the base it is merged into: NF4 (what dequantising
    reproduces) or the original weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if nf4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **kwargs)
    for module in base.modules():  # compute in float32, not bitsandbytes' bf16 CPU inference layout
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return PeftModel.from_pretrained(base, str(run_dir)).eval()


def shapes(folder) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.mark.parametrize("merge_into", ["auto", "dequantized", "original"])
def test_export_loads_in_transformers_with_the_adapters_logits(trained, merge_into, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, pipeline

    arch, mode, base_dir, run_dir = trained
    out = tmp_path / "exported"
    main(["export", "--model_path", str(run_dir), "--out", str(out), "--merge-into", merge_into])
    assert shapes(out) == shapes(base_dir)  # the base's own layout (GPT-2: Conv1D weights stored (in, out))

    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    assert type(exported) is type(plain)
    nf4 = merge_into == "dequantized" or (merge_into == "auto" and mode == "qlora")
    reference = adapter_on_base(base_dir, run_dir, nf4)
    ids = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected, before = exported(ids).logits, reference(ids).logits, plain(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - before).abs().max() > 1e-3  # the adapter changed the model, and the export kept the change

    if merge_into != "auto":
        return  # generation from the folder: once per run
    text = pipeline("text-generation", model=str(out), device="cpu")("She was", max_new_tokens=3, do_sample=False)
    assert text[0]["generated_text"].startswith("She was")
    inference_main(["--model_path", str(out), "--prompt", "She was", "--max_length", "4", "--n_return_seqs", "2"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line[:4] in ("[1] ", "[2] ")]
    assert len(lines) == 2 and all(line[4:].startswith("She was") for line in lines)
