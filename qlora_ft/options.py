"""Command-line options generated from the typed configuration in `qlora_ft.config`.

`build_parser` makes one flag per dataclass field, every field accepting both `--x-y` and `--x_y`. A
`--config FILE` (JSON or YAML, flat or grouped by concern) is merged under the flags given on the command
line (`parse_config`, `config_from_flat`). The rules about options the user set (LoRA flags mean LoRA,
options that do nothing in the chosen mode) apply here, to what the user gave; a saved run configuration
is rebuilt without them (`qlora_ft.config.train_config_from_dict`).

`python -m qlora_ft.options > docs/options.md` writes the options reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from qlora_ft.config import CheckArgs, ModelArgs, TrainConfig, build_config, concerns, flatten_options, parse_bool
from qlora_ft.errors import UserError
from qlora_ft.run_options import ChatConfig, CompareConfig, EvalConfig, ExportConfig, GenerateConfig

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UserError (one line, exit 2) instead of usage + exit."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


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
    words = [w for a in typing.get_args(tp) if typing.get_origin(a) is Literal for w in typing.get_args(a)]
    if typing.get_origin(base) is not Literal and words:  # `int | Literal["auto"]`: a number, or one of the words
        return _or_words(convert, words)
    return convert


def _or_words(convert, words: list[str]):
    def convert_or_word(text):
        return text if text in words else convert(text)

    convert_or_word.__name__ = convert.__name__
    return convert_or_word


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
    for group_name, group_cls in concerns(cfg_cls).items():
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
    for a saved run configuration, which names every option."""
    given = dict(given)
    values: dict[str, Any] = {}
    config_file = given.pop("config", None)
    if config_file:
        for key, value in flatten_options(_read_config_file(config_file), cfg_cls, config_file).items():
            group_name, name = key.split(".")
            tp = typing.get_type_hints(concerns(cfg_cls)[group_name])[name]
            values[key] = _coerce(tp, value, name)
    values.update(given)
    if check_given and issubclass(cfg_cls, TrainConfig):
        _lora_from_flags(values)
    cfg = build_config(cfg_cls, values)
    if check_given and isinstance(cfg, TrainConfig):
        warn_ineffective(cfg, {k.split(".", 1)[1] for k in values})
    return cfg


LORA_FLAGS = ("rank_lora", "alpha_lora", "targets_lora", "lora_dropout", "dora", "rslora", "loraplus_ratio")
LORA_OFF = {"dora": False, "rslora": False, "loraplus_ratio": 0}  # a LoRA option at these values asks for no LoRA
SAMPLE_FLAGS = ("sample_prompts", "max_output_length", "top_k", "top_p", "temperature")


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _lora_from_flags(values: dict[str, Any]) -> None:
    """LoRA flags mean LoRA: with `--qlora False` and no `--lora`, they turn LoRA on (16/32-bit LoRA); with an
    explicit `--lora False` (full fine-tuning) they would do nothing, which is an error. A switch given at its off
    value (`--rslora False`, `--dora False`, `--loraplus-ratio 0`) asks for nothing: it does neither."""
    names = {k: k.split(".", 1)[-1] for k in values}
    given = [_flag(name) for k, name in names.items()
             if name in LORA_FLAGS and not (name in LORA_OFF and values[k] == LORA_OFF[name])]  # fmt: skip
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
    from qlora_ft.data.sources import resolve

    notes = []
    sampling = [_flag(k) for k in SAMPLE_FLAGS if k in given]
    if sampling and cfg.sample.sample_every == 0:
        notes.append(f"{' '.join(sampling)}: no effect with --sample-every 0 (no samples are generated)")
    if "epochs" in given and cfg.optim.max_steps is not None:
        notes.append(f"--epochs: no effect, --max-steps {cfg.optim.max_steps} sets the length of the run")
    if "keep_checkpoints" in given and cfg.ckpt.keep_checkpoints and not cfg.ckpt.save_every_steps:
        notes.append("--keep-checkpoints: no effect without --save-every-steps (it prunes only step-NNNNNN "
                     "checkpoints; Epoch_N ones are kept)")  # fmt: skip
    try:
        plain_text = cfg.data.data is not None and resolve(cfg.data.data).plain_text
    except UserError:  # a missing source: training names it
        plain_text = False
    if "text_column" in given and cfg.data.text_column is not None and plain_text:
        notes.append(f"--text-column: no effect on plain text ({cfg.data.data} is read as paragraphs)")
    for note in notes:
        log.warning(note)
    return notes


# ----------------------------------------------------------------------------------------------------------
# The options reference (docs/options.md)


def options_markdown(cfg_cls: type) -> str:
    """The options of `cfg_cls` as a Markdown table (README's option tables are generated by this)."""

    def show(value: Any) -> str:
        if isinstance(value, list):
            return " ".join(repr(v) if not v or " " in v else v for v in value) or "(none)"
        return "(none)" if value is None else str(value)

    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for group_cls in concerns(cfg_cls).values():
        for f in dataclasses.fields(group_cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            flags = f"`--{f.name.replace('_', '-')}`" + (f" `--{f.name}`" if "_" in f.name else "")
            help_text = f.metadata.get("help", "")
            # a default the help line names is shown once, in the default column
            meaning = re.sub(r"\s*\(default: [^;)]+\)", "", help_text).replace("|", "\\|")
            rows.append(f"| {flags} | {_named_default(help_text) or show(default)} | {meaning} |")
    return "\n".join(rows)


@dataclasses.dataclass
class CheckOnly:
    """check's own options, for the reference (the rest are train's)."""

    check: CheckArgs = dataclasses.field(default_factory=CheckArgs)


def options_reference() -> str:
    """Every command's option table, in Markdown (the body of docs/options.md)."""
    parts = [
        ("train.py, qlora-ft train", TrainConfig),
        ("qlora-ft check (train's options, and these)", CheckOnly),
        ("inference.py, qlora-ft generate", GenerateConfig),
        ("qlora-ft chat", ChatConfig),
        ("qlora-ft export", ExportConfig),
        ("qlora-ft eval", EvalConfig),
        ("qlora-ft compare", CompareConfig),
    ]
    return "\n\n".join(f"## {title}\n\n{options_markdown(cls)}" for title, cls in parts) + "\n"


OPTIONS_INTRO = """# Options reference

Every option of every command, generated from the code: `python -m qlora_ft.options > docs/options.md`
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
