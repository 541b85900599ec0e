"""`qlora-ft export --format gguf` of a Llama model: llama.cpp's `llama` layout (hyperparameters, tensor names,
the q/k rows in llama.cpp's rotary order), a ChatML-style vocabulary whose BOS is not its EOS, and the shipped
SmolLM2 file (written by llama.cpp's own converter) as the oracle for the metadata and the f16 tensors."""

import numpy as np
import pytest
import torch
from test_gguf import export, fields, llama_or_skip, one_line

from conftest import SHARED, make_paragraphs
from qlora_ft.gguf_export import rotary_rows

CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def chatml_tokenizer(pre: str = "smollm"):
    """A tiny byte-level BPE with SmolLM2's special tokens (ids 0, 1, 2: `<|endoftext|>`, BOS `<|im_start|>`,
    EOS `<|im_end|>`) and its pre-tokenizer (single digits, then GPT-2's byte-level split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    split = {"smollm": [pre_tokenizers.Digits(individual_digits=True)], "whitespace": [pre_tokenizers.Whitespace()]}
    tok.pre_tokenizer = pre_tokenizers.Sequence([*split[pre], pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=CHATML,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(make_paragraphs(300, seed=1), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")  # fmt: skip


def build_llama(path, tied: bool = False, tokenizer=None, **overrides):
    """A random LlamaForCausalLM: 2 layers, 64 wide, 4 query heads sharing 2 key-value heads (as SmolLM2's 9/3)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or chatml_tokenizer()
    config = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=tied,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    pytest.importorskip("gguf", reason="the [gguf] extra is not installed")
    root = tmp_path_factory.mktemp("llama-gguf")
    base = build_llama(root / "base")
    export(base, root / "f16.gguf")
    return base, root / "f16.gguf"


def test_rotary_rows_interleave_each_heads_halves():
    w = np.arange(8 * 3).reshape(8, 3)  # 2 heads of 4 rows: halves (0, 1 | 2, 3) and (4, 5 | 6, 7)
    assert rotary_rows(w, 2)[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]  # rows 0 2 1 3 4 6 5 7


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_blocks_are_llama_quantizes_blocks_of_the_f16_file(llama, tmp_path, kind):
    """A q8_0 or q4_0 export holds the blocks llama.cpp's own path gives (convert to f16, then llama-quantize):
    computed from the f16 values, and, where llama-cpp-python is installed, equal byte for byte to
    `llama_model_quantize` of the f16 export."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    base, f16_path = llama
    export(base, tmp_path / f"{kind}.gguf", "--gguf-type", kind)
    ours, f16 = fields(tmp_path / f"{kind}.gguf"), fields(f16_path)
    for name, data in ours["data"].items():
        if f16["tensors"][name][0] == "F16":
            blocks = quantize(np.asarray(f16["data"][name], dtype=np.float32), Q[ours["tensors"][name][0]])
            np.testing.assert_array_equal(np.asarray(data).view(np.uint8), blocks.view(np.uint8), err_msg=name)
    try:
        import llama_cpp
    except ImportError:
        return
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    assert llama_cpp.llama_model_quantize(str(f16_path).encode(), str(tmp_path / "ref.gguf").encode(), params) == 0
    reference = fields(tmp_path / "ref.gguf")
    assert ours["tensors"] == reference["tensors"]
    for name, data in ours["data"].items():
        assert np.asarray(data).tobytes() == np.asarray(reference["data"][name]).tobytes(), name


def test_a_llama_exports_llama_cpps_layout(llama):
    from transformers import AutoModelForCausalLM

    base, path = llama
    meta = fields(path)
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "model"
    hyper = {k.removeprefix("llama."): v for k, v in meta.items() if k.startswith("llama.")}
    assert hyper.pop("attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert hyper == {"block_count": 2, "context_length": 256, "embedding_length": 64, "feed_forward_length": 96,
                     "attention.head_count": 4, "attention.head_count_kv": 2, "rope.freq_base": 100000.0,
                     "vocab_size": 400, "rope.dimension_count": 16}  # fmt: skip
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    tensors = meta["tensors"]
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight",  # untied: `output`
                            *(f"blk.{b}.{n}.weight" for b in range(2) for n in per_block)}  # fmt: skip
    assert tensors["blk.0.attn_k.weight"] == ("F16", (64, 32)) and tensors["blk.0.ffn_norm.weight"][0] == "F32"

    model = AutoModelForCausalLM.from_pretrained(base)
    attention = model.model.layers[1].self_attn
    for name, layer, heads in (("attn_q", attention.q_proj, 4), ("attn_k", attention.k_proj, 2)):
        stored = meta["data"][f"blk.1.{name}.weight"].astype(np.float32)
        expected = rotary_rows(layer.weight.detach().numpy(), heads)
        np.testing.assert_allclose(stored, expected, atol=1e-3)  # f16 of the permuted rows
        assert not np.allclose(stored, layer.weight.detach().numpy(), atol=1e-3)  # the rows did move


def test_transformers_reads_the_llama_file_back(llama):
    """transformers' GGUF loader undoes llama.cpp's rotary order: it computes the model's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, path = llama
    reference = AutoModelForCausalLM.from_pretrained(base).eval()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = torch.tensor([tokenizer(" ".join(make_paragraphs(8, seed=3)))["input_ids"][:60]])
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max().item() < 2e-3
    read = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "In 1811, 22 people said <|im_start|> hi"
    assert read(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_llama_tokenizer_metadata(llama):
    base, path = llama
    meta = fields(path)
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # the ChatML tokens CONTROL, the rest NORMAL
    assert set(meta["tokenizer.ggml.token_type"][3:]) == {1}
    assert meta["tokenizer.ggml.tokens"][:3] == CHATML
    ids = {k: meta[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown", "padding")}
    assert ids == {"bos": 0, "eos": 2, "unknown": 0, "padding": 2}  # BOS: the leading token, <|endoftext|>
    assert meta["tokenizer.ggml.add_space_prefix"] is False and len(meta["tokenizer.ggml.merges"]) > 0


def test_a_tied_llama_has_no_output_tensor(tmp_path):
    pytest.importorskip("gguf", reason="the [gguf] extra is not installed")
    export(build_llama(tmp_path / "tied", tied=True), tmp_path / "tied.gguf")
    tensors = fields(tmp_path / "tied.gguf")["tensors"]
    assert "output.weight" not in tensors and "token_embd.weight" in tensors


@pytest.mark.parametrize(
    "overrides, says",
    [
        ({"attention_bias": True}, "biases"),
        ({"hidden_act": "gelu"}, "'gelu'"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "'linear'"),
        ({"head_dim": 8}, "head size"),
    ],  # fmt: skip
)
def test_llamas_llama_cpp_would_compute_otherwise_are_refused(tmp_path, capsys, overrides, says):
    from transformers import LlamaConfig

    pytest.importorskip("gguf", reason="the [gguf] extra is not installed")
    config = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4)
    LlamaConfig(**{**config, **overrides}).save_pretrained(tmp_path / "m")
    line = one_line(capsys, ["export", "--model_path", str(tmp_path / "m"), "--out", str(tmp_path / "m.gguf"),
                             "--format", "gguf"])  # fmt: skip
    assert says in line and not (tmp_path / "m.gguf").exists()


def test_a_pre_tokenizer_llama_cpp_does_not_know_is_refused(tmp_path, capsys):
    pytest.importorskip("gguf", reason="the [gguf] extra is not installed")
    base = build_llama(tmp_path / "ws", tokenizer=chatml_tokenizer("whitespace"))
    line = one_line(capsys, ["export", "--model_path", str(base), "--out", str(tmp_path / "ws.gguf"),
                             "--format", "gguf"])  # fmt: skip
    assert "pre-tokenizer" in line and not (tmp_path / "ws.gguf").exists()


# ----------------------------------------------------------------------------------------------------------
# The oracle: SmolLM2-135M-Instruct as llama.cpp's converter wrote it


SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct"
SHIPPED = SMOLLM2 / "SmolLM2-135M-Instruct.Q4_1.gguf"
# Keys whose values differ from the shipped file's, each for its reason (docs/gguf.md names them):
DIFFERENT = {
    "general.name",  # the output file's name, as for every export; the shipped one is the model card's
    "general.file_type",  # f16 here, Q4_1 there
    "tokenizer.ggml.bos_token_id",  # 0 (<|endoftext|>, training's leading token) for 1 (<|im_start|>)
    "tokenizer.ggml.add_bos_token",  # true: a text run's file gives a raw prompt the leading token
}
# The model card's fields, which the converter reads from the hub's README and an HF folder does not hold, and
# the chat template, which a text run's file leaves out (an instruction or chat run's carries the run's):
CARD_ONLY = {"general.organization", "general.finetune", "general.basename", "general.size_label",
             "general.license", "general.languages", "tokenizer.chat_template"}  # fmt: skip


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The shipped file as a Hugging Face folder (to_hf.py) and that folder exported f16."""
    import subprocess
    import sys

    pytest.importorskip("gguf", reason="the [gguf] extra is not installed")
    if not SHIPPED.exists():
        pytest.skip(f"{SHIPPED} is absent (integration data lives in ../shared beside the checkout)")
    root = tmp_path_factory.mktemp("smollm2")
    subprocess.run([sys.executable, str(SMOLLM2 / "to_hf.py"), str(root / "hf")], check=True, capture_output=True)
    export(root / "hf", root / "export-f16.gguf")
    return root


def f16_ulps(a: np.ndarray, b: np.ndarray) -> int:
    """The largest distance between two f16 arrays in units in the last place (same-sign values)."""
    return int(np.abs(a.view(np.int16).astype(np.int32) - b.view(np.int16).astype(np.int32)).max())


@pytest.mark.slow
def test_smollm2_exports_as_llama_cpps_converter_wrote_it(smollm2):
    """The metadata: the shipped file's keys and values but the named differences. The tensors: the shipped
    file's, dequantised by the gguf library and rounded to f16, bit for bit (so the q/k rows, un-permuted by
    transformers' reader and permuted back by the export, are where llama.cpp's converter put them)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    ours, shipped = fields(smollm2 / "export-f16.gguf"), fields(SHIPPED)
    keys = lambda meta: {k for k in meta if k not in ("tensors", "data")}  # noqa: E731
    assert keys(shipped) - keys(ours) == CARD_ONLY and keys(ours) - keys(shipped) == set()
    for key in keys(ours) - DIFFERENT:
        same = ours[key] == pytest.approx(shipped[key]) if isinstance(ours[key], float) else ours[key] == shipped[key]
        assert same, key
    assert ours["general.file_type"] == 1 and ours["tokenizer.ggml.bos_token_id"] == 0
    assert (ours["tokenizer.ggml.add_bos_token"], shipped["tokenizer.ggml.add_bos_token"]) == (True, False)
    assert set(ours["tensors"]) == set(shipped["tensors"])
    for tensor in GGUFReader(str(SHIPPED)).tensors:
        mine = ours["data"][tensor.name]
        theirs = dequantize(tensor.data, tensor.tensor_type).reshape(mine.shape)
        if mine.dtype == np.float16:
            assert f16_ulps(mine, theirs.astype(np.float16)) == 0, tensor.name
        else:
            np.testing.assert_array_equal(mine, theirs, err_msg=tensor.name)


@pytest.mark.slow
def test_smollm2_f16_tensors_equal_llama_cpps_own_f16_requantisation(smollm2):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (docs/gguf.md)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_F16, True
    out = smollm2 / "llama-f16.gguf"
    assert llama_cpp.llama_model_quantize(str(SHIPPED).encode(), str(out).encode(), params) == 0
    ours, requantised = fields(smollm2 / "export-f16.gguf"), fields(out)
    assert ours["tensors"] == requantised["tensors"]  # names, types (F16 matrices, F32 norms), shapes
    for name, data in ours["data"].items():
        theirs = requantised["data"][name]
        if data.dtype == np.float16:  # within one f16 ulp: two dequantisations of Q4_1 may round apart
            assert f16_ulps(data, theirs) <= 1, name
        else:
            np.testing.assert_allclose(data, theirs, rtol=1e-6, err_msg=name)


@pytest.mark.slow
def test_smollm2_in_llama_cpp_computes_what_transformers_computes(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2 / "hf")
    model = AutoModelForCausalLM.from_pretrained(smollm2 / "hf").eval()
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be"
    ids = tokenizer(text)["input_ids"]
    llm = llama_or_skip(smollm2 / "export-f16.gguf")
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    got = np.array(llm.scores[: len(ids)])
    assert np.abs(got - expected).max() <= 0.15 and (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.99
