"""Typed configuration: one dataclass per concern, each default and help line written once.

The command-line parser is generated from these dataclasses (`build_parser`), every field accepting both
`--x-y` and `--x_y`. A `--config FILE` (JSON or YAML, flat or grouped by concern) is merged under the
flags given on the command line. Cross-field checks live in `__post_init__` and raise `UserError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qlora_ft.errors import UserError

log = logging.getLogger(__name__)

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
# Training configuration


@dataclass
class DataArgs:
    data: str | None = arg(
        None,
        "training data: .pkl (list of {'sentence': text}, list of str, DataFrame, {'train','validation'}), "
        ".txt, a folder of .txt, .csv, .jsonl, .parquet, or a datasets name / saved dataset dir",
    )
    text_column: str | None = arg(None, "column or key holding the text (default: sentence, text or paragraph)")
    train_size: float = arg(0.9, "share of paragraphs used for training; the rest is the validation split")
    max_input_length: int = arg(256, "tokens per training sequence; longer paragraphs are cut into windows")
    batch_size: int = arg(8, "sequences per micro-batch")
    packing: bool = arg(True, "pack paragraphs into full sequences (no attention across them); False: pad")
    seed: int = arg(42, "seed for the split, the data order, LoRA init and dropout")
    keep_headings: bool = arg(
        False, "keep heading-only paragraphs of plain text (CHAPTER I, VOLUME II); by default they are dropped"
    )

    def __post_init__(self):
        if not 0.0 < self.train_size < 1.0:
            raise UserError(f"--train-size must be between 0 and 1 (exclusive), got {self.train_size}")
        if self.max_input_length < 2:
            raise UserError(f"--max-input-length must be at least 2, got {self.max_input_length}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass
class ModelArgs:
    model: str = arg("gpt2", "hub name (gpt2, gpt2-medium, ...) or a local model directory")
    qlora: bool = arg(True, "load the base in 4-bit NF4 and train LoRA adapters on it; False: full precision base")
    lora: bool | None = arg(
        None,
        "train LoRA adapters (default: the --qlora value, or True with LoRA options; --qlora False --lora True: "
        "16/32-bit LoRA, --qlora False alone: full fine-tuning)",
    )
    rank_lora: int = arg(64, "LoRA rank r")
    alpha_lora: float = arg(16, "LoRA alpha (the update is scaled by alpha / r)")
    targets_lora: list[str] = arg(
        ["auto"],
        "module names LoRA wraps (suffix match); auto: per architecture (GPT-2: c_attn c_proj; Llama, Mistral, "
        "Qwen: q/k/v/o_proj gate/up/down_proj; GPT-NeoX: query_key_value dense dense_h_to_4h dense_4h_to_h; "
        "others: all-linear); all-linear: every linear layer but the output layer",
    )
    lora_dropout: float = arg(0.05, "dropout on the LoRA input")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward: less memory, ~30% slower")
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
        if self.rank_lora < 1:
            raise UserError(f"--rank-lora must be at least 1, got {self.rank_lora}")
        if not self.targets_lora:
            raise UserError("--targets-lora needs at least one module name")
        if self.loss_chunk < 0:
            raise UserError(f"--loss-chunk must be >= 0, got {self.loss_chunk}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class OptimArgs:
    epochs: int = arg(3, "passes over the training split")
    max_steps: int | None = arg(None, "stop after this many optimizer steps (overrides --epochs)")
    lr: float = arg(2e-4, "peak learning rate (AdamW)")
    eps: float = arg(1e-8, "AdamW epsilon")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    warmup_steps: int = arg(100, "linear warmup steps, then linear decay to 0")
    grad_accum_steps: int = arg(1, "micro-batches per optimizer step")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0 disables)")

    def __post_init__(self):
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.lr <= 0 or self.eps <= 0:
            raise UserError("--lr and --eps must be positive")
        if self.warmup_steps < 0 or self.grad_accum_steps < 1:
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

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------
# Generation configuration (inference.py, `qlora-ft generate`)


MERGE_HELP = (
    "weights the adapter is merged into: dequantized = the NF4 base it was trained on, dequantised (matches "
    "the trained model); original = the full-precision base; auto = dequantized for QLoRA runs, else original"
)


@dataclass
class GenerateArgs(SamplingArgs):
    model_path: str | None = arg(None, "output dir, checkpoint dir, or merged/full model dir")
    base_model: str | None = arg(None, "base model (default: the one named in the adapter's config)")
    prompt: list[str] = arg([], "prompt (repeat the flag for several; none starts from <|endoftext|>)")
    max_length: int = arg(100, "new tokens per generated sequence")
    n_return_seqs: int = arg(3, "sequences per prompt")
    seed: int = arg(42, "sampling seed")
    stream: bool = arg(False, "print tokens as they are generated")
    qlora: bool = arg(False, "keep the base in 4-bit with the adapter unmerged (least memory)")
    merge_into: Literal["auto", "dequantized", "original"] = arg("auto", MERGE_HELP)
    truncate_prompt: bool = arg(False, "keep a too-long prompt's last tokens that fit the context (else an error)")

    def __post_init__(self):
        super().__post_init__()
        if self.max_length < 1 or self.n_return_seqs < 1:
            raise UserError("--max_length and --n_return_seqs must be at least 1")


@dataclass
class GenerateConfig:
    gen: GenerateArgs = field(default_factory=GenerateArgs)


@dataclass
class ExportArgs:
    model_path: str | None = arg(None, "output dir or checkpoint dir holding an adapter")
    base_model: str | None = arg(None, "base model (default: the one named in the adapter's config)")
    out: str | None = arg(None, "folder for the merged model and tokenizer (safetensors)")
    merge_into: Literal["auto", "dequantized", "original"] = arg("auto", MERGE_HELP)


@dataclass
class ExportConfig:
    export: ExportArgs = field(default_factory=ExportArgs)


@dataclass
class EvalArgs(SamplingArgs):
    model_path: str | None = arg(None, "the run's output dir (adapter + run_config.json) to evaluate")
    base_model: str | None = arg(None, "base model (default: the one named in the adapter's config)")
    data: str | None = arg(None, "held-out paragraphs, any --data format (default: the run's validation split)")
    reference: str | None = arg(None, "target-style text for the style classifier (default: the run's training split)")
    contrast: str | None = arg(None, "contrasting-style text for the style classifier (none: no style score)")
    lora_reference: str | None = arg(
        None, "output dir of a 16/32-bit LoRA run (--qlora False --lora True) on the same data, shown beside"
    )
    prompt: list[str] = arg(["The morning", "She was", "It was", ""], "prompts the generations start from")
    n_generations: int = arg(100, "generations per model (spread evenly over the prompts)")
    max_length: int = arg(100, "new tokens per generation")
    seed: int = arg(42, "sampling seed (the same for the base and the fine-tuned model)")
    batch_size: int = arg(4, "held-out sequences per forward pass")
    out_dir: str | None = arg(None, "where eval.json, eval.md, eval.png and report.md go (default: --model_path)")

    def __post_init__(self):
        super().__post_init__()
        if self.n_generations < 1 or self.max_length < 1 or self.batch_size < 1:
            raise UserError("--n-generations, --max-length and --batch-size must be at least 1")


@dataclass
class EvalConfig:
    eval: EvalArgs = field(default_factory=EvalArgs)


@dataclass
class CompareArgs(SamplingArgs):
    model_path: str | None = arg(None, "the run's output dir (or a checkpoint dir) holding the adapter")
    base_model: str | None = arg(None, "base model (default: the one named in the adapter's config)")
    prompt: list[str] = arg([], "prompt (repeat the flag for several; none: the empty prompt)")
    n_return_seqs: int = arg(2, "generations per prompt and model")
    max_length: int = arg(60, "new tokens per generation")
    seed: int = arg(42, "sampling seed (the same for both models)")
    merge_into: Literal["auto", "dequantized", "original"] = arg("auto", MERGE_HELP)
    out: str | None = arg(None, "the Markdown file to write (default: MODEL_PATH/compare.md)")
    truncate_prompt: bool = arg(False, "keep a too-long prompt's last tokens that fit the context (else an error)")

    def __post_init__(self):
        super().__post_init__()
        if self.max_length < 1 or self.n_return_seqs < 1:
            raise UserError("--max_length and --n_return_seqs must be at least 1")


@dataclass
class CompareConfig:
    compare: CompareArgs = field(default_factory=CompareArgs)


# ----------------------------------------------------------------------------------------------------------
# Parser generation


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UserError (one line, exit 2) instead of usage + exit."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def _groups(cfg_cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cfg_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cfg_cls)}


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True); `int` -> (int, False)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _converter(tp: Any):
    base, optional = _unwrap(tp)
    if typing.get_origin(base) is list:
        base = typing.get_args(base)[0]
    if base is bool:
        conv = parse_bool
    elif typing.get_origin(base) is Literal:
        conv = str
    else:
        conv = base

    def convert(text):
        if optional and isinstance(text, str) and text.lower() == "none":
            return None
        return conv(text)

    convert.__name__ = getattr(base, "__name__", "value")  # argparse names the type in its messages
    return convert


def _named_default(help_text: str) -> str | None:
    """The default a help line names itself, shown instead of the field's value:
    `"base model (default: the one named in the adapter's config)"` -> `"the one named in the adapter's config"`."""
    found = re.search(r"\(default: ([^;)]+)", help_text)
    return found.group(1).strip() if found else None


def build_parser(cfg_cls: type, prog: str, description: str, parser: argparse.ArgumentParser | None = None):
    """An argparse parser with one flag per field of each concern in `cfg_cls` (defaults suppressed so the
    merge in `parse_config` can tell a given flag from a default)."""
    parser = parser or _Parser(prog=prog, description=description)
    parser.argument_default = argparse.SUPPRESS
    parser.add_argument("--config", metavar="FILE", help="JSON or YAML file of options; flags given here win")
    for group_name, group_cls in _groups(cfg_cls).items():
        group = parser.add_argument_group(group_name)
        hints = typing.get_type_hints(group_cls)
        for f in dataclasses.fields(group_cls):
            tp = hints[f.name]
            base, _ = _unwrap(tp)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            flags = [f"--{f.name.replace('_', '-')}"]
            if "_" in f.name:
                flags.append(f"--{f.name}")
            kw: dict[str, Any] = {"dest": f"{group_name}.{f.name}", "type": _converter(tp)}
            kw["metavar"] = {int: "N", float: "X"}.get(base, "TEXT")
            help_text = f.metadata.get("help", "")
            kw["help"] = help_text if _named_default(help_text) else f"{help_text} (default: {default!r})"
            if base is bool:
                kw.update(nargs="?", const=True, metavar="BOOL")
            elif typing.get_origin(base) is list:
                kw.update(nargs="+", action="extend", metavar="TEXT")
            elif typing.get_origin(base) is Literal:
                kw["choices"] = typing.get_args(base)
                kw["metavar"] = "{" + ",".join(typing.get_args(base)) + "}"
            group.add_argument(*flags, **kw)
    return parser


def _read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            loaded = yaml.safe_load(text)
        else:
            loaded = json.loads(text)
    except Exception as e:  # JSONDecodeError, yaml.YAMLError, UnicodeDecodeError: all "not a config file"
        raise UserError(f"cannot parse config file {path}: {str(e).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"config file {path} must hold a mapping of option names to values")
    return loaded


def _flatten(loaded: dict[str, Any], cfg_cls: type, source: str) -> dict[str, Any]:
    """Config-file keys (flat `lr` or `lr-x` spellings, or grouped `{"optim": {"lr": ...}}`) -> `group.field`."""
    where = {}
    for group_name, group_cls in _groups(cfg_cls).items():
        for f in dataclasses.fields(group_cls):
            where[f.name] = f"{group_name}.{f.name}"
    flat: dict[str, Any] = {}
    for key, value in loaded.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in _groups(cfg_cls) and isinstance(value, dict):
            flat.update(_flatten(value, cfg_cls, source))
        elif name in where:
            flat[where[name]] = value
        else:
            raise UserError(f"unknown option {key!r} in {source}")
    return flat


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Check/convert a config-file value with the same converters the flags use."""
    base, optional = _unwrap(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"option {name} cannot be null")
    convert = _converter(tp)
    try:
        if typing.get_origin(base) is list:
            items = value if isinstance(value, list) else [value]
            return [convert(v) for v in items]
        if base in (int, float) and isinstance(value, bool):
            raise ValueError("a boolean is not a number")
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("not an integer")
        out = convert(value if base is bool or not isinstance(value, (int, float)) else str(value))
        if typing.get_origin(base) is Literal and out not in typing.get_args(base):
            raise ValueError(f"choose from {', '.join(typing.get_args(base))}")
        return out
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise UserError(f"bad value for {name}: {value!r} ({e})") from None


def parse_config(cfg_cls: type, argv: list[str] | None, prog: str, description: str = ""):
    """Parse `argv` into a `cfg_cls` instance: dataclass defaults < `--config FILE` < command-line flags."""
    parser = build_parser(cfg_cls, prog, description)
    given = vars(parser.parse_args(argv))
    return config_from_flat(cfg_cls, given)


def config_from_flat(cfg_cls: type, given: dict[str, Any], check_given: bool = True):
    """A `cfg_cls` from `group.field` values the user gave (flags, plus a `--config` file): the rest default.

    `check_given`: apply the rules about options the user set (`_lora_from_flags`, `warn_ineffective`); off
    for a saved run_config.json, which names every option."""
    given = dict(given)
    values: dict[str, Any] = {}
    config_file = given.pop("config", None)
    if config_file:
        for key, value in _flatten(_read_config_file(config_file), cfg_cls, config_file).items():
            group_name, name = key.split(".")
            tp = typing.get_type_hints(_groups(cfg_cls)[group_name])[name]
            values[key] = _coerce(tp, value, name)
    values.update(given)
    if check_given and cfg_cls is TrainConfig:
        _lora_from_flags(values)
    groups = {}
    for group_name, group_cls in _groups(cfg_cls).items():
        kwargs = {k.split(".", 1)[1]: v for k, v in values.items() if k.split(".", 1)[0] == group_name}
        groups[group_name] = group_cls(**kwargs)
    cfg = cfg_cls(**groups)
    if check_given and isinstance(cfg, TrainConfig):
        warn_ineffective(cfg, {k.split(".", 1)[1] for k in values})
    return cfg


LORA_FLAGS = ("rank_lora", "alpha_lora", "targets_lora", "lora_dropout")
SAMPLE_FLAGS = ("sample_prompts", "max_output_length", "top_k", "top_p", "temperature")


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _lora_from_flags(values: dict[str, Any]) -> None:
    """LoRA flags mean LoRA: with `--qlora False` and no `--lora`, they turn LoRA on (16/32-bit LoRA); with an
    explicit `--lora False` (full fine-tuning) they would do nothing, which is an error."""
    given = [_flag(k) for k in LORA_FLAGS if f"model.{k}" in values]
    if not given or values.get("model.qlora", ModelArgs.qlora):  # QLoRA always trains LoRA
        return
    if values.get("model.lora") is False:
        raise UserError(f"{' '.join(given)}: LoRA options have no effect in full fine-tuning (--lora False); "
                        "drop them, or drop --lora False to train LoRA adapters")  # fmt: skip
    if values.get("model.lora") is None:
        values["model.lora"] = True
        log.info("%s given with --qlora False: training LoRA adapters on the full-precision base (--lora True)",
                 " ".join(given))  # fmt: skip


def warn_ineffective(cfg: TrainConfig, given: set[str]) -> list[str]:
    """Warn, one line each, about options in `given` (field names the user set) that do nothing in the mode
    `cfg` chose; returns the warnings. (LoRA options in full fine-tuning are an error: `_lora_from_flags`.)"""
    from qlora_ft.data import is_plain_text  # (imports torch: only once a training config is built)

    notes = []
    sampling = [_flag(k) for k in SAMPLE_FLAGS if k in given]
    if sampling and cfg.sample.sample_every == 0:
        notes.append(f"{' '.join(sampling)}: no effect with --sample-every 0 (no samples are generated)")
    if "epochs" in given and cfg.optim.max_steps is not None:
        notes.append(f"--epochs: no effect, --max-steps {cfg.optim.max_steps} sets the length of the run")
    if "keep_checkpoints" in given and cfg.ckpt.keep_checkpoints and not cfg.ckpt.save_every_steps:
        notes.append("--keep-checkpoints: no effect without --save-every-steps (it prunes only step-NNNNNN "
                     "checkpoints; Epoch_N ones are kept)")  # fmt: skip
    plain_text = cfg.data.data is not None and is_plain_text(cfg.data.data)
    if "text_column" in given and cfg.data.text_column is not None and plain_text:
        notes.append(f"--text-column: no effect on plain text ({cfg.data.data} is read as paragraphs)")
    if "keep_headings" in given and cfg.data.keep_headings and cfg.data.data is not None and not plain_text:
        notes.append(f"--keep-headings: no effect, {cfg.data.data} is not plain text (.txt or a folder of .txt)")
    for note in notes:
        log.warning(note)
    return notes


def train_config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from `to_dict()` output (a checkpoint's run_config.json)."""
    return config_from_flat(TrainConfig, _flatten(d, TrainConfig, "run_config.json"), check_given=False)


def options_markdown(cfg_cls: type) -> str:
    """The options of `cfg_cls` as a Markdown table (README's option tables are generated by this)."""

    def show(value: Any) -> str:
        if isinstance(value, list):
            return " ".join(repr(v) if not v or " " in v else v for v in value) or "(none)"
        return "(none)" if value is None else str(value)

    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for group_cls in _groups(cfg_cls).values():
        for f in dataclasses.fields(group_cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            flags = f"`--{f.name.replace('_', '-')}`" + (f" `--{f.name}`" if "_" in f.name else "")
            help_text = f.metadata.get("help", "")
            meaning = help_text.replace("|", "\\|")
            rows.append(f"| {flags} | {_named_default(help_text) or show(default)} | {meaning} |")
    return "\n".join(rows)


def options_reference() -> str:
    """Every command's option table, in Markdown (the body of docs/options.md)."""
    parts = [
        ("train.py, qlora-ft train", TrainConfig),
        ("inference.py, qlora-ft generate", GenerateConfig),
        ("qlora-ft export", ExportConfig),
        ("qlora-ft eval", EvalConfig),
        ("qlora-ft compare", CompareConfig),
    ]
    return "\n\n".join(f"## {title}\n\n{options_markdown(cls)}" for title, cls in parts) + "\n"


OPTIONS_INTRO = """# Options reference

Every option of every command, generated from the code: `python -m qlora_ft.config > docs/options.md`
writes this file, and `tests/test_readme.py` fails when it is stale. The README's
[common options](../README.md#common-options) table picks out the most used.

Every option has a `--x-y` and an `--x_y` spelling. Booleans take `True/False/true/false/1/0/yes/no`, and a
bare flag means True. `--config FILE` reads options from JSON or YAML, flat (`{"lr": 1e-4}`) or grouped
by concern (`{"optim": {"lr": 1e-4}}`; the training groups are `data`, `model`, `optim`, `sample`, `ckpt`);
flags on the command line win over the file.

"""


def options_document() -> str:
    """docs/options.md: a short introduction, then `options_reference()`."""
    return OPTIONS_INTRO + options_reference()


if __name__ == "__main__":
    print(options_document(), end="")
