import httpx2 as _httpx  # noqa: F401  (huggingface_hub's HTTP client; imported so the monkeypatch below is real)
import pytest
import torch

from qlora_ft.config import ModelArgs
from qlora_ft.errors import UserError
from qlora_ft.model import add_lora, check_hub_reachable, count_parameters, load_base, load_for_inference

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
