"""Model: load a base (4-bit NF4 or full precision), add LoRA, and rebuild a fine-tuned model for inference."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import torch

from qlora_ft import checkpoint
from qlora_ft.config import ModelArgs, with_mode_defaults
from qlora_ft.errors import UserError, first_line
from qlora_ft.precision import precision_policy

log = logging.getLogger(__name__)


def check_hub_reachable(name: str, kind: Literal["model", "dataset"] = "model") -> None:
    """Fail fast, in one line, when `name` must come from the Hugging Face Hub and the Hub cannot be reached.

    `from_pretrained` would otherwise retry for about a minute and end in a long traceback.
    """
    hint = (
        "pass a local model directory instead (a folder with config.json and the weights, as save_pretrained "
        f"writes it), or fetch it where the Hub is reachable (`hf download {name}`) and copy the Hugging Face cache "
        "(~/.cache/huggingface, or $HF_HOME) here: cached models load offline"
        if kind == "model"
        else "pass a local file or a saved dataset directory instead"
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"cannot load {kind} {name!r}: not a local path or cached, and HF_HUB_OFFLINE is set; {hint}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    api = HfApi()
    try:
        (api.model_info if kind == "model" else api.dataset_info)(name, timeout=10)
    except RepositoryNotFoundError:
        raise UserError(f"{kind} {name!r} is neither a local path nor a repository on the Hugging Face Hub") from None
    except HfHubHTTPError:
        return  # reachable (gated, rate-limited, ...): let the loader say what is wrong
    except Exception as e:
        raise UserError(
            f"cannot load {kind} {name!r}: not a local path, and the Hugging Face Hub is unreachable "
            f"({first_line(e)}); {hint}"
        ) from None


# The files that make a folder a model (a tokenizer may come without config.json). Checked first: otherwise
# transformers fails deep inside with a page-long message whose first line names neither folder nor cause.
_DIR_FILES = {
    "model": ("config.json",),
    "model config": ("config.json",),
    "tokenizer": ("config.json", "tokenizer.json", "tokenizer_config.json"),
}
_AS_GIVEN: dict[str, str] = {}  # resolved local path -> the path as the user typed it, for error messages


def _pretrained(loader, name: str, what: str = "model", **kwargs):
    """`loader.from_pretrained(name)` for a local dir, a cached hub name, or (when reachable) the Hub.
    Errors name the path as the user gave it (see `resolve_base_name`)."""
    path = Path(name).expanduser()
    shown = _AS_GIVEN.get(name, name)
    try:
        if path.is_dir():
            if not any((path / f).is_file() for f in _DIR_FILES[what]):
                raise UserError(f"{shown} is not a model directory (no {' or '.join(_DIR_FILES[what])} in it)")
            return loader.from_pretrained(str(path), **kwargs)
        if name.startswith((".", "/", "~")) or path.suffix:
            raise UserError(f"model directory not found: {name}")
        try:
            return loader.from_pretrained(name, local_files_only=True, **kwargs)  # a cached copy: no network
        except OSError:
            check_hub_reachable(name, "model")
            return loader.from_pretrained(name, **kwargs)
    except UserError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load {what} {shown!r}: {first_line(e).replace(name, shown)}") from None


def resolve_base_name(name: str) -> str:
    """Local directories are recorded as absolute paths (so adapter configs work from any cwd); hub names as is.
    Loading errors still name the path as given."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return name
    resolved = str(path.resolve())
    _AS_GIVEN.setdefault(resolved, name)
    return resolved


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The compute dtype of `precision_policy(choice, device)`: `auto` is bf16 on GPUs with native bf16
    (compute capability >= 8.0), else fp16; float32 on CPU (bf16 matmuls are ~3x slower there)."""
    return precision_policy(choice, device).dtype


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tokenizer = _pretrained(AutoTokenizer, name, "tokenizer")
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer of {name!r} has no end-of-text token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked by position, so sharing the id is safe
    return tokenizer


def bnb_config(dtype: torch.dtype, storage: torch.dtype = torch.uint8):
    """NF4 with double quantisation, computing in `dtype`. `storage` is the dtype the packed 4-bit bytes are
    held in: FSDP shards only floating tensors of one dtype, so under FSDP it is the compute dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=storage,
    )


def load_base(
    name: str,
    quantize: bool,
    dtype: torch.dtype,
    device: torch.device,
    quant_storage: torch.dtype = torch.uint8,
    weights_dtype: torch.dtype | None = None,
):
    """The base model: NF4 4-bit with double quantisation and `dtype` compute (its other weights float32),
    or unquantised in `weights_dtype` (default `dtype`). Training passes float32 for weights it trains (full
    fine-tuning): the optimizer must update float32 masters; autocast supplies the low-precision compute."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch.float32 if quantize else (weights_dtype or dtype)}
    if quantize:
        kwargs.update(quantization_config=bnb_config(dtype, quant_storage), device_map={"": device})
    model = _pretrained(AutoModelForCausalLM, name, "model", **kwargs)
    if not quantize:
        model.to(device)
    return model


def keep_training_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during training.

    On CPUs with AVX512-BF16, bitsandbytes (0.49+) converts a Linear4bit's weights to a bf16-only packed
    layout the first time the layer runs in eval mode without gradients (our validation and samples). The
    training forward then fails on that layout, and validation would be computed in bf16, not the dtype the
    model trains in (which also breaks bit-exact resume). The flag below is the library's own switch.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# The attention and MLP projections of each family (the QLoRA paper adapts every linear layer of the blocks).
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_NEOX_LIKE = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj"],
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2"], _LLAMA_LIKE),
    **dict.fromkeys(["gpt_neox", "falcon"], _NEOX_LIKE),
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


def lora_targets(model, targets: list[str]) -> list[str] | str:
    """`--targets-lora` resolved for this model: `auto` looks the architecture up in LORA_TARGETS (others get
    `all-linear`, peft's every-linear-layer-but-the-output one); explicit names must exist."""
    if targets == ["auto"]:
        model_type = getattr(model.config, "model_type", "")
        if model_type not in LORA_TARGETS:
            log.info("no LoRA target list for model type %r: using all-linear", model_type)
            return "all-linear"
        return LORA_TARGETS[model_type]
    if targets == ["all-linear"]:
        return "all-linear"
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise UserError(f"--targets-lora {' '.join(missing)}: no such module in this model")
    return list(targets)


def add_lora(model, args: ModelArgs):
    """Wrap `args.targets_lora` with LoRA (peft). With a 4-bit base, first `prepare_model_for_kbit_training`
    (casts norms/embeddings to float32 and enables input gradients)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    args = with_mode_defaults(args)  # options left unset and not resolved by `train`: the text defaults
    targets = lora_targets(model, args.targets_lora)
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=args.rank_lora,
        lora_alpha=args.alpha_lora,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        fan_in_fan_out=_stores_transposed(model, targets),  # else peft corrects it per layer, with a warning
        use_dora=args.dora,  # peft's DoRA runs on bitsandbytes 4-bit layers and GPT-2 Conv1D alike
        use_rslora=args.rslora,
    )
    return get_peft_model(model, config)


def _stores_transposed(model, targets: list[str] | str) -> bool:
    """Whether the targeted layers are GPT-2 `Conv1D`s, which store their weight as (in, out): peft's
    `fan_in_fan_out`. A 4-bit base has none (bitsandbytes turns them into Linear4bit)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()  # never a target of all-linear
    layers = [m for n, m in model.named_modules()
              if m is not head and (targets == "all-linear" or n.rsplit(".", 1)[-1] in targets)]  # fmt: skip
    conv = [m for m in layers if isinstance(m, Conv1D)]
    return bool(conv) and len(conv) == sum(isinstance(m, (Conv1D, torch.nn.Linear)) for m in layers)


# Bytes a decoder layer keeps for backward per token and per unit of its width, in float32 with LoRA (and its
# dropout) on every projection: measured on SmolLM2-135M, 8 x 256 tokens (bench/memory_account.py, docs/memory.md)
ACTIVATION_BYTES_PER_TOKEN_WIDTH = 123


def memory_estimate(model, tokens: int, loss_chunk: int, dtype: torch.dtype) -> tuple[int, int]:
    """(activations, rest) in bytes for a micro-batch of `tokens` tokens: what the decoder layers keep for backward
    (tokens x layers x width x ACTIVATION_BYTES_PER_TOKEN_WIDTH, scaled to `dtype`), and the rest of training
    memory: the weights as held (4-bit packed or not), a gradient and two AdamW moments per trainable parameter,
    and the logits of one loss chunk (all `tokens` with `loss_chunk` 0) with their gradient, in float32.

    >>> memory_estimate(smollm2_qlora_r64, 8 * 256, 1024, torch.float32)  # doctest: +SKIP
    (4352901120, 880000000)
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = torch.finfo(dtype).bits / 32
    activations = tokens * config.num_hidden_layers * config.hidden_size * ACTIVATION_BYTES_PER_TOKEN_WIDTH * scale
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    logits = 2 * (loss_chunk or tokens) * config.vocab_size * 4
    return int(activations), weights + state + logits


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their unpacked element number."""
    trainable = total = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)  # a bitsandbytes 4-bit weight, packed in any storage dtype
        n = quant_state.shape.numel() if quant_state is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


# ----------------------------------------------------------------------------------------------------------
# Inference


def trained_on_4bit(path: Path) -> bool | None:
    """Whether the run that wrote `path` trained on a 4-bit base (its saved run config), None if unknown."""
    try:
        return bool(checkpoint.read_run_config(path)["model"]["qlora"])
    except (UserError, KeyError, TypeError):
        return None


def merge_target(path: Path, merge_into: str) -> str:
    """`auto` -> `dequantized` for adapters trained on a 4-bit base, `original` otherwise (see eval.md:
    merging into the dequantised NF4 base reproduces the trained model; the original weights do not)."""
    if merge_into != "auto":
        return merge_into
    return "dequantized" if trained_on_4bit(path) else "original"


def load_dequantized_base(name: str, dtype: torch.dtype, device: torch.device):
    """The base as a QLoRA adapter saw it, in the base's own architecture: each weight that 4-bit loading
    quantises holds its NF4-dequantised values in `dtype`; every other tensor is the base's own.

    transformers' `dequantize()` leaves an nn.Linear where the base had a GPT-2 `Conv1D` (weight stored
    (in, out), the transpose of a Linear's). Saving that model writes weights that transformers cannot load
    as GPT-2 (or, for a square layer, loads transposed), so the dequantised values are copied back into
    the base loaded in full precision, transposed for each Conv1D.
    """
    from transformers.pytorch_utils import Conv1D

    dequantized = load_base(name, True, dtype, device).dequantize().state_dict()
    model = load_base(name, False, dtype, device)
    conv1d = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
    fixed = {k: (v.t() if k in conv1d else v).to(dtype) for k, v in dequantized.items()}
    model.load_state_dict(fixed, strict=True)  # copies into the model's own tensors; any mismatch is a bug
    return model


def dequantized_copy(model):
    """A float model computing what the 4-bit LoRA `model` (a PeftModel) computes, for sampling on CPU, where
    bitsandbytes' 4-bit path is slow one token at a time: each 4-bit weight dequantised (its LoRA update, if any,
    merged in: W + s·BA) in the dtype of the model's float weights; every other tensor is `model`'s own, shared.
    It costs `dequantized_bytes(model)`. None when a LoRA layer is not plain LoRA (DoRA: its merge rescales)."""
    import copy

    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    base = model.get_base_model()
    dtype = base.get_input_embeddings().weight.dtype
    config = copy.deepcopy(base.config)
    config.__dict__.pop("quantization_config", None)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = {}
    for name, module in plain.named_modules():
        source = base.get_submodule(name)
        if isinstance(source, LoraLayer) and any(source.use_dora.values()):
            return None
        weight = _float_weight(source, dtype)
        source = source.get_base_layer() if isinstance(source, LoraLayer) else source
        if weight is not None:
            tensors[f"{name}.weight"] = weight.t().contiguous() if isinstance(module, Conv1D) else weight
        for kind in ("parameters", "buffers"):
            for key, _ in getattr(module, f"named_{kind}")(recurse=False):
                if f"{name}.{key}".lstrip(".") not in tensors:
                    tensors[f"{name}.{key}".lstrip(".")] = getattr(source, key)  # shared, not copied
    for key, value in tensors.items():
        module_name, _, attr = key.rpartition(".")
        setattr_tensor(plain.get_submodule(module_name), attr, value)
    plain.generation_config = base.generation_config
    return plain.eval()


def sampling_copy(model, device: torch.device):
    """What in-training samples generate from on CPU: `dequantized_copy(model)` when `model` is a 4-bit LoRA model
    and the copy takes at most half the memory available now (on GPUs, and where it does not fit, None: sample from
    `model` itself). Same tokens: the copy computes the same function to float rounding."""
    import psutil

    if device.type != "cpu" or not getattr(model, "is_loaded_in_4bit", False) or not hasattr(model, "peft_config"):
        return None
    if dequantized_bytes(model) > psutil.virtual_memory().available / 2:
        return None
    return dequantized_copy(model)


def setattr_tensor(module, name: str, value: torch.Tensor) -> None:
    """Put `value` in `module` as its parameter or buffer `name`, replacing the meta tensor there."""
    if name in module._parameters:
        module._parameters[name] = torch.nn.Parameter(value.detach(), requires_grad=False)
    else:
        module._buffers[name] = value


def _float_weight(module, dtype: torch.dtype) -> torch.Tensor | None:
    """A 4-bit layer's weight (out, in) dequantised to `dtype`, with the active LoRA updates of a LoRA layer around
    it merged in; None for any other module."""
    from peft.tuners.lora import LoraLayer

    inner = module.get_base_layer() if isinstance(module, LoraLayer) else module
    quant_state = getattr(getattr(inner, "weight", None), "quant_state", None)
    if quant_state is None:
        return None
    import bitsandbytes as bnb

    weight = bnb.functional.dequantize_4bit(inner.weight.data, quant_state).to(dtype)
    if isinstance(module, LoraLayer) and not module.disable_adapters:
        for adapter in module.active_adapters:
            if adapter in module.lora_A:  # W += s·BA in place (a 4-bit layer is never fan_in_fan_out)
                a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                weight.addmm_(b.to(dtype), a.to(dtype), alpha=module.scaling[adapter])
    return weight


def dequantized_bytes(model) -> int:
    """Bytes a `dequantized_copy` of `model` allocates: its 4-bit weights' elements in the float weights' dtype."""
    elements = sum(p.quant_state.shape.numel() for p in model.parameters() if getattr(p, "quant_state", None))
    return elements * model.get_input_embeddings().weight.element_size()


def context_length(config) -> int | None:
    """Tokens the model attends over (GPT-2's `n_positions`, others' `max_position_embeddings`), or None when
    the config states no limit."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_config(name: str):
    """The model's config alone (no weights): `AutoConfig` from a local dir, the cache or the Hub."""
    from transformers import AutoConfig

    return _pretrained(AutoConfig, name, "model config")


def check_training_context(name: str, max_input_length: int, tokenizer=None, prompts=(), max_new: int = 0) -> None:
    """Raise UserError when `--max-input-length`, or an in-training sample (`<eos>` + prompt + `max_new` new
    tokens; checked when `tokenizer` is given), runs past the context of model `name`: read from its config
    before any weights load, so the run fails at start instead of in an IndexError mid-way."""
    limit = context_length(load_config(name))
    if limit is None:
        return
    if max_input_length > limit:
        raise UserError(f"--max-input-length {max_input_length} is past the model's context of {limit} tokens")
    for prompt in prompts if tokenizer is not None else ():
        needed = 1 + len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + max_new
        if needed > limit:
            raise UserError(
                f"sample prompt {prompt!r} (+ <eos>) with --max-output-length {max_new} needs {needed} tokens, "
                f"past the model's context of {limit} tokens"
            )


def load_for_inference(
    model_path: str, base_model: str | None, quantize: bool, device: torch.device, merge_into: str = "auto"
):
    """(model, tokenizer) ready to generate.

    An adapter dir is merged into full-precision weights (fp16/bf16 on CUDA, float32 on CPU), never into
    4-bit weights (lossy): `merge_into` picks the dequantised NF4 base (what a QLoRA adapter was trained
    against) or the original base (see `merge_target`). `quantize=True` keeps the base in 4-bit with the
    adapter applied unmerged, which is exactly what was trained and uses the least memory. A full model dir
    is loaded as is.
    """
    path = Path(model_path)
    if not path.is_dir():
        raise UserError(f"model path not found: {model_path}")
    dtype = compute_dtype("auto", device)
    if not checkpoint.is_adapter_folder(path):
        if not (path / "config.json").is_file():
            raise UserError(f"{model_path} holds neither an adapter (adapter_config.json) nor a model (config.json)")
        model = load_base(str(path), quantize, dtype, device)
        return model.eval(), load_tokenizer(str(path))

    from peft import PeftModel

    base_name = base_model or checkpoint.adapter_base_name(path)
    target = merge_target(path, merge_into)
    if quantize:
        base = load_base(base_name, True, dtype, device)
        keep_training_layout(base)  # as trained; bitsandbytes' CPU repacking breaks peft's DoRA (it dequantises)
    elif target == "dequantized":
        base = load_dequantized_base(base_name, dtype, device)
    else:
        base = load_base(base_name, False, dtype, device)
    try:
        model = PeftModel.from_pretrained(base, str(path))
    except Exception as e:  # peft raises ValueError, KeyError, RuntimeError, TypeError for bad configs
        raise UserError(f"cannot apply the adapter in {model_path} to {base_name!r}: {first_line(e)}") from None
    if not quantize:
        model = model.merge_and_unload()
        log.info("adapter merged into the %s base", "dequantised NF4" if target == "dequantized" else "original")
    tokenizer_src = str(path) if (path / "tokenizer_config.json").is_file() else base_name
    return model.eval(), load_tokenizer(tokenizer_src)
