"""GGUF export: the merged model as one file in llama.cpp's GPT-2 layout, written with the `gguf` library.

The model is merged exactly as the safetensors export merges it (`model.load_for_inference`), then written as
llama.cpp's own converter writes a GPT-2: `gpt2.*` hyperparameters, tensors renamed by the `gguf` library's
name map, GPT-2's `Conv1D` weights (stored (in, out)) transposed to (out, in), 1-D tensors (norms, biases)
and the position table in F32, the tokenizer's vocabulary, merges and special tokens.

The leading `<|endoftext|>` that training puts before every example comes from exactly one place in each file:
a text run's file sets `add_bos_token` (BOS = EOS = `<|endoftext|>`), so a reader that adds the BOS to a raw
prompt starts it as training started a paragraph; an instruction or chat run's file clears it and its chat
template writes the token instead, as the prompt's first text (readers that apply the template tokenize the
result without adding a BOS of their own). Measured against transformers and llama.cpp in docs/gguf.md.
"""

from __future__ import annotations

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
SUPPORTED = "GPT-2 (model_type gpt2, gelu_new activation)"
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2's Conv1D layers: weight (in, out)


def check_architecture(config) -> None:
    """UserError unless llama.cpp's `gpt2` graph computes what this transformers model computes: its layout and
    its defaults (tanh-approximated GELU, attention scaled by 1/sqrt(head size) only)."""
    model_type = getattr(config, "model_type", None)
    if model_type != "gpt2":
        raise UserError(f"GGUF export supports {SUPPORTED} models; this model is {model_type!r}")
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"GGUF export supports {SUPPORTED}; this model uses {config.activation_function!r}")
    if config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn or not config.scale_attn_weights:
        raise UserError(f"GGUF export supports {SUPPORTED} with GPT-2's attention scaling; this model changes it")


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
    """Write `model` (a merged float GPT2LMHeadModel) and `tokenizer` to the GGUF file `out`, its matrices in
    `gguf_type`. `chat_template`: the run's template (instruction and chat runs), None for a text run.

    Written to a temporary file beside `out` and renamed into place, so a failure leaves no partial file."""
    import gguf

    check_architecture(model.config)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, "gpt2")
        _add_hyperparameters(writer, model.config, out.stem, gguf_type)
        _add_tokenizer(writer, tokenizer, model.config.vocab_size, chat_template)
        for name, array in _gguf_tensors(model):
            data, qtype = _encode(name, array, gguf_type)
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
    writer.add_name(name)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_file_type(file_types[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer, tokenizer, vocab_size: int, chat_template: str | None) -> None:
    """GPT-2's byte-level BPE as llama.cpp reads it: `tokenizer.ggml.pre = gpt-2` selects GPT-2's own
    pre-tokenizer split (without it llama.cpp splits text another way and the ids differ)."""
    tokens, types = _vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer))
    writer.add_bos_token_id(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(chat_template is None)  # the one place the leading <|endoftext|> comes from
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens in id order with their llama.cpp types: special tokens (`<|endoftext|>`) CONTROL, other added
    tokens USER_DEFINED, rows of the embedding that no token uses `[PADn]` UNUSED (as llama.cpp's converter)."""
    from gguf import TokenType

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(by_id)}, past the model's {vocab_size} embeddings")
    special = set(tokenizer.all_special_ids)
    added = set(tokenizer.added_tokens_decoder)
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


def _gguf_tensors(model) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) of each weight; Conv1D weights transposed to (out, in), the output layer
    left out when it is the token embedding (llama.cpp then reuses `token_embd`)."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, config.n_layer)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"GGUF export: no llama.cpp GPT-2 tensor for {key!r}")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if key.endswith(".weight") and key.rsplit(".", 1)[0].endswith(_CONV1D):
            array = np.ascontiguousarray(array.T)  # (in, out) -> (out, in)
        yield name, array


def _encode(name: str, array: np.ndarray, gguf_type: GgufType):
    """(data, GGML type) of one tensor, as llama.cpp's converter and quantizer choose: 1-D tensors and the
    position table F32; matrices in `gguf_type`, except that q4_0 keeps the token embedding (which is also
    the output layer) in Q8_0, as llama-quantize keeps the output layer at higher precision. A matrix whose
    rows do not split into 32-value blocks falls back to F16."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import QuantError, quantize

    if array.ndim == 1 or name.startswith("position_embd"):
        return array.astype(np.float32), Q.F32
    qtype = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[gguf_type]
    if qtype == Q.Q4_0 and name.startswith(("token_embd", "output.")):
        qtype = Q.Q8_0
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
