import httpx2 as _httpx  # noqa: F401  (huggingface_hub's HTTP client; imported so the monkeypatch below is real)
import pytest
import torch

from qlora_ft.config import ModelArgs
from qlora_ft.errors import UserError
from qlora_ft.model import (
    add_lora,
    check_hub_reachable,
    count_parameters,
    dequantized_bytes,
    dequantized_copy,
    keep_training_layout,
    load_base,
    load_for_inference,
    sampling_copy,
)

CPU = torch.device("cpu")


def lora_model(model_dir, quantize=True, **kw):
    torch.manual_seed(0)
    model = add_lora(load_base(str(model_dir), quantize, torch.float32, CPU), ModelArgs(rank_lora=4, **kw))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter do something, as training would
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_4bit_path_holds_linear4bit_and_lora_on_c_attn_and_both_c_proj(tiny_model_dir):
    import bitsandbytes as bnb

    model = lora_model(tiny_model_dir)
    layers = dict(model.named_modules())
    wrapped = sorted(
        n.removeprefix("base_model.model.transformer.h.")[: -len(".lora_A")] for n in layers if n.endswith("lora_A")
    )
    assert wrapped == ["0.attn.c_attn", "0.attn.c_proj", "0.mlp.c_proj", "1.attn.c_attn", "1.attn.c_proj",
                       "1.mlp.c_proj"]  # fmt: skip
    base = layers["base_model.model.transformer.h.0.attn.c_attn"].base_layer
    assert isinstance(base, bnb.nn.Linear4bit)
    assert base.weight.quant_type == "nf4" and base.weight.compress_statistics  # NF4 + double quantisation
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_fsdp_storage_keeps_the_4bit_weights_and_gives_one_dtype(tiny_model_dir):
    """Under FSDP the packed 4-bit bytes are stored in the compute dtype: the same NF4 model (same logits,
    same parameter count), with every parameter in that one floating dtype, which is what FSDP can shard."""
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    packed = load_base(str(tiny_model_dir), True, torch.float32, CPU)
    stored = load_base(str(tiny_model_dir), True, torch.float32, CPU, quant_storage=torch.float32)
    assert {p.dtype for p in packed.parameters()} == {torch.uint8, torch.float32}
    assert {p.dtype for p in stored.parameters()} == {torch.float32}
    assert count_parameters(stored) == count_parameters(packed)
    with torch.no_grad():
        torch.testing.assert_close(stored(ids).logits, packed(ids).logits, atol=0, rtol=0)


def test_unknown_target_module_is_a_user_error(tiny_model_dir):
    with pytest.raises(UserError, match="q_proj: no such module"):
        add_lora(load_base(str(tiny_model_dir), False, torch.float32, CPU), ModelArgs(targets_lora=["q_proj"]))


def test_merged_model_matches_the_adapter_model_on_the_same_base(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora_model(tiny_model_dir).save_pretrained(tmp_path / "adapter")
    ids = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(0))

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged, _ = load_for_inference(str(tmp_path / "adapter"), None, quantize=False, device=CPU)
    assert not any("lora_" in n for n, _ in merged.named_parameters())  # really merged
    with torch.no_grad():
        expected, got = unmerged(ids).logits, merged(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-3  # and the adapter does change the model

    kept, _ = load_for_inference(str(tmp_path / "adapter"), None, quantize=True, device=CPU)
    assert any("lora_A" in n for n, _ in kept.named_parameters())  # --qlora True: 4-bit base, adapter unmerged


def test_hub_name_offline_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot load model 'gpt2-medium'.*local model directory"):
        load_base("gpt2-medium", True, torch.float32, CPU)


def test_unreachable_hub_fails_fast_with_a_hint(monkeypatch):
    from huggingface_hub import HfApi

    def unreachable(*args, **kwargs):
        raise _httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "model_info", unreachable)
    with pytest.raises(UserError, match="Hub is unreachable .*Name or service.*local model directory") as caught:
        check_hub_reachable("gpt2")
    message = str(caught.value)
    assert "hf download gpt2" in message and "HF_HOME" in message  # what any user can do
    assert "shared" not in message and "mini-gpt2" not in message  # not a path only this project's machines have


def test_missing_local_model_dir():
    with pytest.raises(UserError, match="model directory not found: ./no/such/model"):
        load_base("./no/such/model", True, torch.float32, CPU)


def test_inference_on_a_bad_adapter_dir(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="model path not found"):
        load_for_inference(str(tmp_path / "nothing"), None, False, CPU)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither an adapter"):
        load_for_inference(str(tmp_path / "empty"), None, False, CPU)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="adapter_config.json is unreadable"):
        load_for_inference(str(tmp_path / "broken"), None, False, CPU)


# ----------------------------------------------------------------------------------------------------------
# In-training samples on CPU: a dequantised float copy of the 4-bit LoRA model

NEAR_TIE = 0.1  # docs/gguf.md's rule: a first differing greedy token where the top two logits are this close


def greedy(model, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens, each from the whole sequence's logits (no cache: one rule for both models)."""
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            new.append(int(model(torch.tensor([ids + new])).logits[0, -1].argmax()))
    return new


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_dequantized_copy_computes_what_the_4bit_model_does(kind, tiny_model_dir, tmp_path):
    """Same logits to float rounding and the same greedy tokens (except at a near-tie), with the LoRA update merged
    into the dequantised weights; the float tensors outside the 4-bit layers are shared, not copied."""
    from test_architectures import build

    model_dir = tiny_model_dir if kind == "gpt2" else build("llama", tmp_path / "llama")
    model = lora_model(model_dir, targets_lora=["auto"]).eval()
    keep_training_layout(model)  # as training holds it (else bitsandbytes computes in bf16 in eval)
    copy = dequantized_copy(model)
    assert not any("lora_" in n for n, _ in copy.named_parameters())
    four_bit = [p for p in model.parameters() if getattr(p, "quant_state", None) is not None]
    assert dequantized_bytes(model) == sum(p.quant_state.shape.numel() for p in four_bit) * 4
    shared = model.get_input_embeddings().weight
    assert copy.get_input_embeddings().weight.data_ptr() == shared.data_ptr()
    ids = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(ids).logits, copy(ids).logits
        without_lora = model.get_base_model()
        with model.disable_adapter():
            base = without_lora(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (expected - base).abs().max() > 1e-3  # the adapter matters, so merging it is tested
    for prompt in ([1, 5, 9], [7], [3, 3, 8, 2]):
        a, b = greedy(model, prompt, 16), greedy(copy, prompt, 16)
        at = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        if at is not None:
            with torch.no_grad():
                top2 = model(torch.tensor([prompt + a[:at]])).logits[0, -1].topk(2).values
            assert top2[0] - top2[1] < NEAR_TIE, (prompt, a, b)


def test_sampling_copy_only_on_cpu_for_plain_lora_that_fits(tiny_model_dir, monkeypatch):
    """The rule: a 4-bit LoRA model on CPU whose copy takes at most half the available memory; not on GPUs, not for
    DoRA (its merge rescales each column), not for a model that is not 4-bit."""
    import psutil

    model = lora_model(tiny_model_dir)
    assert sampling_copy(model, CPU) is not None
    assert sampling_copy(model, torch.device("cuda")) is None
    assert sampling_copy(lora_model(tiny_model_dir, dora=True), CPU) is None
    assert sampling_copy(lora_model(tiny_model_dir, quantize=False), CPU) is None
    memory = psutil.virtual_memory()
    small = memory._replace(available=2 * dequantized_bytes(model) - 1)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: small)
    assert sampling_copy(model, CPU) is None
