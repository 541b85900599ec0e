"""Typed configuration: one dataclass per concern, each default and help line written once.

Each command's configuration groups these concerns (`TrainConfig`: data, model, optim, sample, ckpt).
Cross-field checks live in `__post_init__` and raise `UserError`. The command-line parser, `--config FILE`
merging and the options reference are generated from these dataclasses in `qlora_ft.options`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from qlora_ft.errors import UserError

# validation tokens per pass by default: seconds on CPU for a small model (mini-gpt2-fiction, 16M parameters, scores
# 0.6K-2K tokens/s in QLoRA on 2 cores), a fraction of a second on a GPU; a corpus's whole 10% can be millions of tokens
EVAL_MAX_TOKENS = 8_192
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def parse_bool(text: str | bool) -> bool:
    """`True/False/true/false/1/0/yes/no` -> bool; anything else is an error (never `bool("False")`)."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False, 1/0, yes/no), got {text!r}")


def arg(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its help line; list defaults are copied per instance."""
    meta = {"help": help, **kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------------------
# Per-mode defaults: options left unset (None) take the default of the data's mode, resolved once by
# `apply_mode_defaults` when the data's mode is known. The instruction values and how they were measured:
# docs/instructions.md.

Mode = Literal["text", "instruction", "chat"]


@dataclass(frozen=True)
class Share:
    """A default given as a share of the run's optimizer steps (warmup), resolved by `warmup_steps_for`."""

    of_run: float

    def __str__(self) -> str:
        return f"{self.of_run:g} of the run's steps"


# the instruction values were measured at --batch-size 4 (docs/instructions.md), so that is the mode's batch size
_INSTRUCTION_DEFAULTS = {"lr": 1e-3, "rank_lora": 16, "alpha_lora": 32, "targets_lora": ["all-linear"],
                         "rslora": False, "epochs": 2, "warmup_steps": Share(0.03), "batch_size": 4}  # fmt: skip
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "text": {
        "lr": 2e-4,
        "rank_lora": 64,
        "alpha_lora": 16,
        "targets_lora": ["auto"],
        "rslora": True,  # r 64 with alpha 16: alpha / sqrt(r) = 2, not alpha / r = 0.25 (docs/quality.md)
        "epochs": 3,
        "warmup_steps": 100,
        "batch_size": 8,
    },  # fmt: skip
    "instruction": _INSTRUCTION_DEFAULTS,
    "chat": _INSTRUCTION_DEFAULTS,
}


def per_mode(help: str, name: str) -> Any:
    """A field whose default depends on the data's mode: None until `apply_mode_defaults` fills it; its help
    line shows each mode's value."""
    text, instruction = MODE_DEFAULTS["text"][name], MODE_DEFAULTS["instruction"][name]
    show = " ".join(instruction) if isinstance(instruction, list) else instruction
    shown_text = " ".join(text) if isinstance(text, list) else text
    return arg(None, f"{help} (default: {shown_text} for text, {show} for instruction and chat data)")


def mode_defaults(mode: Mode) -> dict[str, Any]:
    """The values unset per-mode options take for data of `mode`.

    >>> mode_defaults("text")["lr"], mode_defaults("instruction")["rank_lora"]
    (0.0002, 16)
    """
    return {k: list(v) if isinstance(v, list) else v for k, v in MODE_DEFAULTS[mode].items()}


def apply_mode_defaults(cfg: TrainConfig, mode: Mode) -> None:
    """Fill every unset per-mode option of `cfg` with `mode`'s default, except a warmup given as a share of
    the run, which `warmup_steps_for` resolves once the run's length is known."""
    defaults = mode_defaults(mode)
    if not cfg.model.lora and cfg.model.rslora is None:
        cfg.model.rslora = False  # a LoRA option: off in full fine-tuning, which refuses it when given
    for group in (cfg.data, cfg.model, cfg.optim):
        for name, value in defaults.items():
            if hasattr(group, name) and getattr(group, name) is None and not isinstance(value, Share):
                setattr(group, name, value)


def take_unset_from(cfg: TrainConfig, saved: TrainConfig) -> dict[str, Any]:
    """Fill the per-mode options (and --gradient-checkpointing) left unset in `cfg` (None) from `saved`, a
    checkpoint's configuration, which holds each one as that run resolved it: a resume continues with the
    settings it trained with, not with the defaults of today. Returns the options taken, with their values."""
    taken = {}
    for group, saved_group in ((cfg.data, saved.data), (cfg.model, saved.model), (cfg.optim, saved.optim)):
        for name in [*MODE_DEFAULTS["text"], "gradient_checkpointing"]:  # (the latter: by the model's size)
            value = getattr(saved_group, name, None)
            if hasattr(group, name) and getattr(group, name) is None and value is not None:
                setattr(group, name, list(value) if isinstance(value, list) else value)
                taken[name] = value
    return taken


def with_mode_defaults(args: ModelArgs, mode: Mode = "text") -> ModelArgs:
    """`args` with its unset per-mode options filled for `mode` (for a ModelArgs built outside `train`)."""
    unset = {k: v for k, v in mode_defaults(mode).items() if getattr(args, k, 0) is None}
    return dataclasses.replace(args, **unset) if unset else args


def warmup_steps_for(cfg: TrainConfig, mode: Mode, total_steps: int) -> int:
    """`--warmup-steps`, or when unset the mode's default: a number of steps, or a `Share` of `total_steps`.

    >>> warmup_steps_for(TrainConfig(), "instruction", total_steps=200)
    6
    """
    if cfg.optim.warmup_steps is not None:
        return cfg.optim.warmup_steps
    value = mode_defaults(mode)["warmup_steps"]
    return round(total_steps * value.of_run) if isinstance(value, Share) else value


# ----------------------------------------------------------------------------------------------------------
# Training configuration


@dataclass
class DataArgs:
    data: str | None = arg(
        None,
        "training data: paragraphs, instruction records (instruction/input/output or prompt/completion) or chat "
        "records (messages: [{role, content}]) in .pkl (list of {'sentence': text}, list of str, DataFrame, "
        "{'train','validation'}), .txt, a folder of .txt, .json, .csv, .jsonl, .parquet, a datasets name / "
        "saved dataset dir, or demo:austen (Northanger Abbey, shipped with the package: a first run needs no data)",
    )
    text_column: str | None = arg(None, "column or key holding the text (default: sentence, text or paragraph)")
    train_size: float = arg(0.9, "share of paragraphs used for training; the rest is the validation split")
    max_input_length: int = arg(
        256,
        "tokens per training sequence; longer paragraphs are cut into windows, longer instruction or chat "
        "records are dropped (never cut) and counted in the log",
    )
    batch_size: int | Literal["auto"] | None = per_mode(
        "sequences per micro-batch; auto (CUDA): the largest that fits, the mode's batch kept by gradient accumulation",
        "batch_size",
    )
    packing: bool = arg(True, "pack paragraphs into full sequences (no attention across them); False: pad")
    seed: int = arg(42, "seed for the split, the data order, LoRA init and dropout")
    keep_headings: bool = arg(
        False,
        "keep heading-only paragraphs of text data from any source (CHAPTER I, VOLUME II, a lone numeral); "
        "by default they are dropped",
    )
    format: Literal["auto", "text", "instruction", "chat"] = arg(
        "auto",
        "what --data holds: auto = from its columns (instruction/input/output or prompt/completion: "
        "instruction; messages: chat; else text)",
    )
    template: str = arg(
        "alpaca",
        "prompt template for instruction records: alpaca, plain, or a JSON file; chat records use the "
        "tokenizer's chat template, or a default one when it has none; saved with the run",
    )
    train_on_prompt: bool = arg(False, "instruction/chat data: train on the prompt tokens too (else responses only)")
    validation_data: str | None = arg(
        None, "validation data in any --data format (default: a seeded share of --data, see --train-size)"
    )
    cache_dir: str | None = arg(
        None,
        "folder where the data (every mode) is tokenized once and kept for later runs and resumes (`qlora-ft cache "
        "list|clear` manage it) (default: $QLORA_FT_CACHE, else ~/.cache/qlora-ft/tokens)",
    )
    eval_max_tokens: int = arg(
        EVAL_MAX_TOKENS,
        "tokens of the validation split scored at each validation: a fixed, seeded subset of its sequences, the "
        "same every time (0: the whole split)",
    )

    def __post_init__(self):
        if not 0.0 < self.train_size < 1.0:
            raise UserError(f"--train-size must be between 0 and 1 (exclusive), got {self.train_size}")
        if self.max_input_length < 2:
            raise UserError(f"--max-input-length must be at least 2, got {self.max_input_length}")
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.eval_max_tokens < 0:
            raise UserError(f"--eval-max-tokens must be 0 (all) or more, got {self.eval_max_tokens}")


@dataclass
class ModelArgs:
    model: str = arg("gpt2", "hub name (gpt2, gpt2-medium, ...) or a local model directory")
    qlora: bool = arg(True, "load the base in 4-bit NF4 and train LoRA adapters on it; False: full precision base")
    lora: bool | None = arg(
        None,
        "train LoRA adapters (default: the --qlora value, or True with LoRA options; --qlora False --lora True: "
        "16/32-bit LoRA, --qlora False alone: full fine-tuning)",
    )
    rank_lora: int | None = per_mode("LoRA rank r", "rank_lora")
    alpha_lora: float | None = per_mode("LoRA alpha (the update is scaled by alpha / r)", "alpha_lora")
    targets_lora: list[str] | None = per_mode(
        "module names LoRA wraps (suffix match); auto: per architecture (GPT-2: c_attn c_proj; Llama, Mistral, "
        "Qwen: q/k/v/o_proj gate/up/down_proj; GPT-NeoX: query_key_value dense dense_h_to_4h dense_4h_to_h; "
        "others: all-linear); all-linear: every linear layer but the output layer",
        "targets_lora",
    )
    lora_dropout: float = arg(0.05, "dropout on the LoRA input")
    dora: bool = arg(
        False, "DoRA (peft use_dora): LoRA on the weights' direction plus a trained magnitude vector per output"
    )
    rslora: bool | None = per_mode(
        "rank-stabilised LoRA (peft use_rslora): scale the update by alpha / sqrt(r), not alpha / r", "rslora"
    )
    gradient_checkpointing: bool | None = arg(
        None,
        "recompute activations in backward: less memory, slower (default: on when a micro-batch's activations would "
        "outweigh the rest of training memory, by estimate: docs/memory.md)",
    )
    loss_chunk: int = arg(1024, "tokens per chunk of the output layer + loss (0: whole batch at once)")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg(
        "auto",
        "dtype of autocast and 4-bit matmuls (trainable weights stay float32): auto = bf16 on GPUs with native bf16 "
        "(compute capability >= 8.0), else fp16 with loss scaling; float32 on CPU",
    )

    def __post_init__(self):
        if self.lora is None:
            self.lora = self.qlora
        if self.qlora and not self.lora:
            raise UserError("--qlora True trains LoRA on frozen 4-bit weights: --lora False needs --qlora False")
        if self.rank_lora is not None and self.rank_lora < 1:
            raise UserError(f"--rank-lora must be at least 1, got {self.rank_lora}")
        if self.targets_lora is not None and not self.targets_lora:
            raise UserError("--targets-lora needs at least one module name")
        if self.loss_chunk < 0:
            raise UserError(f"--loss-chunk must be >= 0, got {self.loss_chunk}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora and (self.dora or self.rslora):
            raise UserError("--dora and --rslora change LoRA adapters: they need LoRA (drop --lora False)")


@dataclass
class OptimArgs:
    epochs: int | None = per_mode("passes over the training split", "epochs")
    max_steps: int | None = arg(None, "stop after this many optimizer steps (overrides --epochs)")
    lr: float | None = per_mode("peak learning rate (AdamW)", "lr")
    eps: float = arg(1e-8, "AdamW epsilon")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    warmup_steps: int | None = per_mode("linear warmup steps, then linear decay to 0", "warmup_steps")
    grad_accum_steps: int = arg(1, "micro-batches per optimizer step")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0 disables)")
    loraplus_ratio: float = arg(
        0.0,
        "LoRA+ (peft create_loraplus_optimizer): the B matrices learn at this multiple of --lr (0: off; the paper: 16)",
    )
    neftune_alpha: float = arg(
        0.0,
        "NEFTune: uniform noise of magnitude alpha / sqrt(row length x width) on the input embeddings, in the "
        "training forward only (0: off; the paper: 5)",
    )

    def __post_init__(self):
        if self.loraplus_ratio < 0 or self.neftune_alpha < 0:
            raise UserError("--loraplus-ratio and --neftune-alpha must be >= 0 (0: off)")
        if self.epochs is not None and self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be at least 1, got {self.max_steps}")
        if (self.lr is not None and self.lr <= 0) or self.eps <= 0:
            raise UserError("--lr and --eps must be positive")
        if (self.warmup_steps is not None and self.warmup_steps < 0) or self.grad_accum_steps < 1:
            raise UserError("--warmup-steps must be >= 0 and --grad-accum-steps >= 1")


@dataclass
class SamplingArgs:
    top_k: int = arg(50, "sample from the k most likely tokens (0 disables)")
    top_p: float = arg(0.95, "nucleus sampling threshold")
    temperature: float = arg(1.0, "sampling temperature")

    def __post_init__(self):
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0 or self.temperature <= 0:
            raise UserError("--top-k must be >= 0, --top-p in (0, 1] and --temperature > 0")


@dataclass
class SampleArgs(SamplingArgs):
    sample_every: int = arg(200, "generate samples every N optimizer steps (0 disables)")
    sample_prompts: list[str] = arg(
        ["The morning", "She was", "It was", ""],
        "prompt for in-training samples (repeat the flag for several; '' starts from <|endoftext|> alone)",
    )
    max_output_length: int = arg(100, "new tokens per in-training sample")


@dataclass
class CheckpointArgs:
    check_dir: str = arg("Checkpoints", "folder for checkpoints")
    save_interval: int = arg(1, "save Epoch_N every this many epochs (0 disables)")
    save_every_steps: int = arg(0, "save step-NNNNNN every this many optimizer steps (0 disables)")
    eval_every: int = arg(0, "validate every N optimizer steps (0: only at the end of each epoch)")
    log_every: int = arg(10, "optimizer steps between log lines and metrics.jsonl rows")
    restore_file: str | None = arg(None, "checkpoint to resume: a name in --check-dir (Epoch_2), a path, or latest")
    load_checkpoint: bool | None = arg(
        None, "resume: True alone means --restore-file latest (default: resume only when --restore-file is given)"
    )
    keep_checkpoints: int = arg(
        3, "keep the newest K checkpoints (Epoch_N and step-NNNNNN alike) plus the best by validation loss (0: all)"
    )
    output_dir: str = arg("GPT2_fine_tuned_Austen", "where the final adapter, tokenizer, metrics and summary go")
    output_best: bool = arg(
        False,
        "the output folder holds the adapter of the best validation loss so far (written when validation "
        "improves), not the last step's; the summary and report name its step",
    )
    overwrite: bool = arg(
        False, "start a fresh run in a used --output-dir / --check-dir: remove what qlora-ft wrote there (only that)"
    )

    def __post_init__(self):
        if min(self.save_interval, self.save_every_steps, self.eval_every) < 0 or self.log_every < 1:
            raise UserError("--save-interval, --save-every-steps, --eval-every must be >= 0, --log-every >= 1")
        if self.load_checkpoint is False and self.restore_file is not None:
            raise UserError("--load-checkpoint False conflicts with --restore-file: drop one of them")
        if self.load_checkpoint and self.restore_file is None:
            self.restore_file = "latest"
        if self.keep_checkpoints < 0:
            raise UserError(f"--keep-checkpoints must be >= 0, got {self.keep_checkpoints}")
        if self.overwrite and self.restore_file is not None:
            raise UserError("--overwrite starts a new run, --load-checkpoint / --restore-file resume one: drop one")


@dataclass
class TrainConfig:
    data: DataArgs = field(default_factory=DataArgs)
    model: ModelArgs = field(default_factory=ModelArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    sample: SampleArgs = field(default_factory=SampleArgs)
    ckpt: CheckpointArgs = field(default_factory=CheckpointArgs)

    def __post_init__(self):
        if self.optim.loraplus_ratio and not self.model.lora:
            raise UserError("--loraplus-ratio sets the LoRA B matrices' rate: it needs LoRA (drop --lora False)")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


@dataclass
class CheckArgs:
    json: bool = arg(False, "print the report as JSON (for scripts) instead of text")
    show: int = arg(3, "training sequences shown as the model sees them, the trained tokens marked")
    plan: bool = arg(False, "also the plan of the run: steps, tokens, and from --probe-steps real steps its time "
                            "and peak memory on this device")  # fmt: skip
    probe_steps: int = arg(3, "optimizer steps the plan's probe trains (the first is not timed)")

    def __post_init__(self):
        if self.show < 0 or self.probe_steps < 2:
            raise UserError("--show must be >= 0 and --probe-steps >= 2 (the first step is not timed)")


@dataclass
class CheckConfig(TrainConfig):
    """`qlora-ft check`: train's options, plus what to report."""

    check: CheckArgs = field(default_factory=CheckArgs)


# ----------------------------------------------------------------------------------------------------------
# A configuration from `group.field` values (flags, a config file, a saved run configuration)


def concerns(cfg_cls: type) -> dict[str, type]:
    """A command's configuration class -> its concerns: `TrainConfig` -> {"data": DataArgs, "model": ...}."""
    hints = typing.get_type_hints(cfg_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cfg_cls)}


def flatten_options(loaded: dict[str, Any], cfg_cls: type, source: str) -> dict[str, Any]:
    """Option names (flat `lr` or `lr-x` spellings, or grouped `{"optim": {"lr": ...}}`) -> `group.field` keys;
    an unknown name is one line naming `source`."""
    where = {}
    for group_name, group_cls in concerns(cfg_cls).items():
        for f in dataclasses.fields(group_cls):
            where[f.name] = f"{group_name}.{f.name}"
    flat: dict[str, Any] = {}
    for key, value in loaded.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in concerns(cfg_cls) and isinstance(value, dict):
            flat.update(flatten_options(value, cfg_cls, source))
        elif name in where:
            flat[where[name]] = value
        else:
            raise UserError(f"unknown option {key!r} in {source}")
    return flat


def build_config(cfg_cls: type, values: dict[str, Any]):
    """A `cfg_cls` from `group.field` values; every other field keeps its default."""
    groups = {}
    for group_name, group_cls in concerns(cfg_cls).items():
        kwargs = {k.split(".", 1)[1]: v for k, v in values.items() if k.split(".", 1)[0] == group_name}
        groups[group_name] = group_cls(**kwargs)
    return cfg_cls(**groups)


def train_config_from_dict(d: dict[str, Any], source: str = "the saved run configuration") -> TrainConfig:
    """Rebuild a TrainConfig from `to_dict()` output (a run's or a checkpoint's saved configuration), without
    the rules about options a user gave (it names every option). Its data section may also hold
    `template_used`, the template as data, which is no option."""
    d = {**d, "data": {k: v for k, v in d.get("data", {}).items() if k != "template_used"}} if "data" in d else d
    if isinstance(d.get("model"), dict) and "rslora" not in d["model"]:  # saved before --rslora existed: off
        d = {**d, "model": {**d["model"], "rslora": False}}
    return build_config(TrainConfig, flatten_options(d, TrainConfig, source))
