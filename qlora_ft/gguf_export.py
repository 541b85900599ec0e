"""GGUF export: the merged model as one file in llama.cpp's GPT-2 or Llama layout, written with the `gguf` library.

The model is merged exactly as the safetensors export merges it (`model.load_for_inference`), then written as
llama.cpp's own converter (`convert_hf_to_gguf.py`) writes it: `gpt2.*` or `llama.*` hyperparameters, tensors
renamed by the `gguf` library's name map, GPT-2's `Conv1D` weights (stored (in, out)) transposed to (out, in),
Llama's q and k rows permuted to llama.cpp's rotary layout, 1-D tensors (norms, biases) and the position table
in F32, the tokenizer's vocabulary, merges and special tokens.

The leading token that training puts before every example (`encode.leading_token_id`: `<|endoftext|>` for
GPT-2 and SmolLM2) is the file's BOS and comes from exactly one place in each file: a text run's file sets
`add_bos_token`, so a reader that adds the BOS to a raw prompt starts it as training started a paragraph; an
instruction or chat run's file clears it and its chat template writes the token instead, as the prompt's first
text (readers that apply the template tokenize the result without adding a BOS of their own). Measured against
transformers and llama.cpp in docs/gguf.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from qlora_ft import checkpoint
from qlora_ft.errors import UserError

log = logging.getLogger(__name__)

GgufType = Literal["f16", "q8_0", "q4_0"]
SUPPORTED = "GPT-2 (model_type gpt2, gelu_new activation) and Llama (model_type llama: SiLU, no biases, plain RoPE)"
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2's Conv1D layers: weight (in, out)


def check_architecture(config) -> None:
    """UserError unless llama.cpp's `gpt2` graph computes what this transformers model computes: its layout and
    its defaults (tanh-approximated GELU, attention scaled by 1/sqrt(head size) only)."""
    model_type = getattr(config, "model_type", None)
    if model_type == "llama":
        return _check_llama(config)
    if model_type != "gpt2":
        raise UserError(f"GGUF export supports {SUPPORTED} models; this model is {model_type!r}")
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"GGUF export supports {SUPPORTED}; this model uses {config.activation_function!r}")
    if config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn or not config.scale_attn_weights:
        raise UserError(f"GGUF export supports {SUPPORTED} with GPT-2's attention scaling; this model changes it")


def _check_llama(config) -> None:
    """UserError unless llama.cpp's `llama` graph computes this LlamaForCausalLM: SiLU gated MLP, no biases,
    RoPE without scaling, heads of hidden_size / head_count (llama.cpp's default key length)."""
    rope = getattr(config, "rope_parameters", None) or {}
    problems = {
        f"activation {config.hidden_act!r}": config.hidden_act != "silu",
        "attention or MLP biases": config.attention_bias or config.mlp_bias,
        f"RoPE scaling {rope.get('rope_type')!r}": rope.get("rope_type", "default") != "default",
        "a head size other than hidden_size / heads": _head_dim(config) * config.num_attention_heads
        != config.hidden_size,
    }
    for what, bad in problems.items():
        if bad:
            raise UserError(f"GGUF export supports {SUPPORTED}; this Llama model has {what}")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_before_loading(model_path: str, base_model: str | None) -> None:
    """The `gguf` library and `check_architecture` on the config alone: refused before any weights load."""
    from qlora_ft.model import load_config

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError(
            "--format gguf needs the gguf library: pip install 'qlora-ft[gguf]' (or: pip install gguf)"
        ) from None
    path = Path(model_path)
    if not path.is_dir():
        raise UserError(f"model path not found: {model_path}")
    if checkpoint.is_adapter_folder(path):
        model_path = base_model or checkpoint.adapter_base_name(path)
    check_architecture(load_config(model_path))


def write_gguf(model, tokenizer, out: Path, gguf_type: GgufType, chat_template: str | None) -> None:
    """Write `model` (a merged float GPT2LMHeadModel or LlamaForCausalLM) and `tokenizer` to the GGUF file `out`,
    its matrices in `gguf_type`. `chat_template`: the run's template (instruction and chat runs), None for a text run.

    Written to a temporary file beside `out` and renamed into place, so a failure leaves no partial file."""
    import gguf

    check_architecture(model.config)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        arch = model.config.model_type
        writer = gguf.GGUFWriter(tmp, arch)
        _add_hyperparameters(writer, model.config, out.stem, gguf_type)
        _add_tokenizer(writer, tokenizer, model.config, chat_template)
        head = "token_embd.weight" if _tied(model) else "output.weight"  # the output layer's GGUF name
        for name, array in _gguf_tensors(model):  # one at a time: a float32 copy of one tensor alive
            data, qtype = _encode(name, array, gguf_type, head)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: give it a plain file's mode
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _umask() -> int:
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    return umask


def _add_hyperparameters(writer, config, name: str, gguf_type: GgufType) -> None:
    import gguf

    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                  "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}  # fmt: skip
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    if config.model_type == "llama":
        _add_llama_hyperparameters(writer, config)
    else:
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_file_type(file_types[gguf_type])
    if config.model_type == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(_head_dim(config))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_llama_hyperparameters(writer, config) -> None:
    """`llama.*` as the converter writes them (its order; the vocabulary size and rotary dimension follow the
    file type there too)."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def _add_tokenizer(writer, tokenizer, config, chat_template: str | None) -> None:
    """A byte-level BPE as llama.cpp reads it: `tokenizer.ggml.pre` names the pre-tokenizer split
    (`pre_tokenizer_name`: with another one llama.cpp splits text another way and the ids differ). The BOS is
    training's leading token (`encode.leading_token_id`), added to raw prompts in a text run's file only."""
    from qlora_ft.data.encode import leading_token_id

    tokens, types = _vocabulary(tokenizer, config.vocab_size)
    llama = config.model_type == "llama"
    if llama:
        writer.add_add_space_prefix(False)
    writer.add_add_bos_token(chat_template is None)  # the one place the leading token comes from
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer) if llama else "gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer))
    writer.add_bos_token_id(leading_token_id(tokenizer))  # what a reader adds, and `{{ bos_token }}`
    writer.add_eos_token_id(tokenizer.eos_token_id)
    if llama:
        for add, token_id in ((writer.add_unk_token_id, tokenizer.unk_token_id),
                              (writer.add_pad_token_id, tokenizer.pad_token_id)):  # fmt: skip
            if token_id is not None:
                add(token_id)
    else:
        writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


# llama.cpp's pre-tokenizer names. Its converter recognises a vocabulary by the hash of the ids of a check text;
# so does `pre_tokenizer_name` for the vocabularies known here (their own check text), and otherwise by the
# pre-tokenizer's definition, for the splits llama.cpp implements as Hugging Face's tokenizers define them.
_CHECK_TEXT = ("In 1811, 3.14 and 33333 Mr. Darcy's \u201cquotes\u201d \u2014 caf\u00e9, na\u00efve \u65e5\u672c "
               "\U0001F642\n\n  two  spaces\ttab I'VE we'll")  # fmt: skip
_KNOWN_VOCABULARIES = {  # sha256 of str(ids of _CHECK_TEXT) -> name
    "41c93cf08ca65d0a1cfc6aa7a939b267bd9ec5d156a252d93561a521ac5a380d": "smollm",  # SmolLM2 (digits one by one)
}
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_PRE_TOKENIZERS = {
    "gpt-2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for this tokenizer: SmolLM2's vocabulary is `smollm` (single digits, then
    GPT-2's split; transformers' GGUF reader writes it with GPT-2's split alone, which gives the same ids since
    no token holds two digits or a space and a digit); otherwise by its pre-tokenizer's definition. A UserError
    for any other, whose text llama.cpp would split otherwise than transformers."""
    ids = tokenizer(_CHECK_TEXT, add_special_tokens=False)["input_ids"]
    known = _KNOWN_VOCABULARIES.get(hashlib.sha256(str(ids).encode()).hexdigest())
    if known is not None:
        return known
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer")
    for name, definition in _PRE_TOKENIZERS.items():
        if _same(pre, definition):
            return name
    known_splits = "GPT-2's byte-level split, or SmolLM2's digits then byte-level"
    raise UserError(f"GGUF export: the tokenizer's pre-tokenizer is not one llama.cpp is known to split alike "
                    f"({known_splits}): {json.dumps(pre)[:200]}")  # fmt: skip


def _same(pre, known) -> bool:
    """`pre` is `known`, ignoring keys `known` does not name (tokenizers versions add some)."""
    if isinstance(known, dict):
        return isinstance(pre, dict) and all(_same(pre.get(k), v) for k, v in known.items())
    if isinstance(known, list):
        return isinstance(pre, list) and len(pre) == len(known) and all(map(_same, pre, known))
    return pre == known


def _vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order with their llama.cpp types: special tokens (`<|endoftext|>`, ChatML's) CONTROL, other
    added tokens USER_DEFINED, rows of the embedding that no token uses `[PADn]` UNUSED (as llama.cpp's converter)."""
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(by_id)}, past the model's {vocab_size} embeddings")
    added = tokenizer.added_tokens_decoder
    special = set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(TokenType.CONTROL if i in special else TokenType.USER_DEFINED if i in added else TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _merges(tokenizer) -> list[str]:
    """The BPE merges as `"a b"` lines (tokenizers writes them as pairs or as such lines, by version)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export needs GPT-2's byte-level BPE tokenizer, not {model.get('type')!r}")
    return [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


def _tied(model) -> bool:
    """Whether the output layer is the token embedding (the file then has no `output` tensor)."""
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _gguf_tensors(model) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) of each weight; Conv1D weights transposed to (out, in), Llama's q and k rows
    permuted (`rotary_rows`), the output layer left out when it is the token embedding (llama.cpp then reuses
    `token_embd`)."""
    import gguf

    config = model.config
    llama = config.model_type == "llama"
    arch = gguf.MODEL_ARCH.LLAMA if llama else gguf.MODEL_ARCH.GPT2
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers if llama else config.n_layer)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads} if llama else {}
    tied = _tied(model)
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"GGUF export: no llama.cpp {arch.name.lower()} tensor for {key!r}")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        layer = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and layer.endswith(_CONV1D) and not llama:
            array = np.ascontiguousarray(array.T)  # (in, out) -> (out, in)
        if layer.rsplit(".", 1)[-1] in heads:
            array = rotary_rows(array, heads[layer.rsplit(".", 1)[-1]])
        yield name, array


def rotary_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """A q or k projection's rows in llama.cpp's rotary order: Hugging Face rotates each head's first half of
    dimensions with its second half, llama.cpp adjacent pairs, so per head the two halves are interleaved
    (row i of half 0, row i of half 1, ...), as the converter's `LlamaModel.permute` does. Without it the file
    loads and answers nonsense."""
    rows = weight.shape[0]
    return np.ascontiguousarray(
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _encode(name: str, array: np.ndarray, gguf_type: GgufType, head: str):
    """(data, GGML type) of one tensor, as llama.cpp's converter and quantizer choose: 1-D tensors and the
    position table F32; matrices in `gguf_type`, except that q4_0 keeps the output layer `head` (`output`, or
    the token embedding when it is tied) in Q8_0, as llama-quantize keeps it at higher precision (its Q6_K
    where rows split into 256-value blocks, which the `gguf` library cannot write; else Q8_0, as here). A
    matrix whose rows do not split into 32-value blocks falls back to F16.

    q8_0 and q4_0 blocks are computed from the f16-rounded values, as llama.cpp's own path (convert to f16,
    then `llama-quantize`) computes them, so that they equal its blocks byte for byte: from float32 values,
    block scales and rounding ties come out differently (on a tuned SmolLM2, q4_0 perplexity 210 against
    llama-quantize's 148; docs/gguf.md)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import QuantError, quantize

    if array.ndim == 1 or name.startswith("position_embd"):
        return array.astype(np.float32), Q.F32
    qtype = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[gguf_type]
    if qtype == Q.Q4_0 and name == head:
        qtype = Q.Q8_0
    if qtype != Q.F16:
        array = array.astype(np.float16).astype(np.float32)
    try:
        return quantize(array, qtype), qtype
    except QuantError:
        log.warning("%s: rows of %d values do not split into blocks of 32: written as F16", name, array.shape[-1])
        return quantize(array, Q.F16), Q.F16


def export_gguf(model_path: str, base_model: str | None, merge_into: str, out: Path, gguf_type: GgufType) -> None:
    """`qlora-ft export --format gguf`: merge as the safetensors export does, then `write_gguf`."""
    from qlora_ft.data.encode import exported_chat_template
    from qlora_ft.data.prepare import read_template
    from qlora_ft.model import load_for_inference

    check_before_loading(model_path, base_model)
    model, tokenizer = load_for_inference(model_path, base_model, False, torch.device("cpu"), merge_into)
    template = read_template(model_path)
    chat_template = exported_chat_template(template, tokenizer) if template is not None else None
    write_gguf(model, tokenizer, out, gguf_type, chat_template)
    log.info("merged model and tokenizer written to %s (GGUF, %s)", out, gguf_type)
