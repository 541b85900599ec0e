"""Entry points: `qlora-ft train|generate|chat|prepare|export|eval|compare`, `train.py`, `inference.py`."""

from __future__ import annotations

import argparse
import atexit
import functools
import gc
import logging
import os
import sys
import warnings
from pathlib import Path

from qlora_ft import __version__
from qlora_ft.config import CheckConfig, DataArgs, TrainConfig, parse_bool
from qlora_ft.errors import UserError, exits_cleanly, leave
from qlora_ft.options import _Parser, build_parser, config_from_flat, parse_config
from qlora_ft.run_options import ChatConfig, CompareConfig, EvalConfig, ExportConfig, GenerateConfig

log = logging.getLogger("qlora_ft")


def setup_logging() -> None:
    """One fixed-format line per event on stderr; third-party chatter kept to real problems. With several
    processes, the main one reports progress and the others only warnings and errors, marked with their rank."""
    rank = int(os.environ.get("RANK", "0"))
    tag = f"[rank {rank}] " if rank else ""
    logging.basicConfig(level=logging.WARNING if rank else logging.INFO,
                        format=f"%(asctime)s %(levelname)s {tag}%(message)s", datefmt="%H:%M:%S")  # fmt: skip
    noisy = ("transformers", "accelerate", "peft", "bitsandbytes", "datasets", "httpx", "huggingface_hub", "DeepSpeed",
             "gguf")  # fmt: skip
    for name in noisy:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module=r"(transformers|peft|accelerate|bitsandbytes|torch)\b")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


@functools.cache
def leave_objects_at_exit() -> None:
    """At interpreter exit, hand the objects still alive to the OS instead of collecting them: the final
    collections walk everything torch, transformers, bitsandbytes and peft loaded (~3,700 modules), 1-2 s after
    the last log line. By then the entry point has returned, every output is written and closed, and logging
    flushes in its own exit hook (which runs after this one). A launched process ends by `end_launched_process`."""
    if not launched():
        atexit.register(gc.freeze)


def launched() -> bool:
    """One process of several started by torchrun, `accelerate launch` or deepspeed."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def end_launched_process() -> None:
    """End one finished process of several here, skipping interpreter finalization: by now every output is
    written and closed and the process group destroyed, while finalization is where the back ends' C++ threads
    meet objects already torn down ("terminate called without an active exception", SIGABRT, seen under FSDP and
    DeepSpeed on CPU after a complete run) - which the launcher would report as a failed run."""
    if launched():
        leave(0)


# ----------------------------------------------------------------------------------------------------------
# train


def run_train(cfg: TrainConfig) -> None:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from qlora_ft.loop import train

    with logging_redirect_tqdm():
        train(cfg)
    end_launched_process()


@exits_cleanly("train.py")
def train_main(argv: list[str] | None = None) -> None:
    leave_objects_at_exit()
    setup_logging()  # first: parsing the options logs what it infers from them
    cfg = parse_config(TrainConfig, argv, "train.py", "QLoRA fine-tuning of a GPT-2-family model on paragraphs.")
    run_train(cfg)


# ----------------------------------------------------------------------------------------------------------
# generate / inference


def run_generate(cfg: GenerateConfig) -> None:
    from transformers import TextStreamer

    from qlora_ft.generate import sample
    from qlora_ft.model import default_device, load_for_inference

    args = cfg.gen
    if args.model_path is None:
        raise UserError("--model_path is required")
    device = default_device()
    model, tokenizer = load_for_inference(args.model_path, args.base_model, args.qlora, device, args.merge_into)
    if args.instruction is not None:
        _answer_instruction(model, tokenizer, args)
        return
    prompts = args.prompt or [""]
    counter = iter(range(1, 1_000_000))

    def streamer():
        print(f"[{next(counter)}] ", end="", flush=True)
        return TextStreamer(tokenizer, skip_special_tokens=True)

    results = sample(model, tokenizer, prompts, args, args.max_length, args.n_return_seqs, args.seed,
                     streamer_factory=streamer if args.stream else None, truncate=args.truncate_prompt)  # fmt: skip
    if args.stream:
        return
    number = 1
    for texts in results:
        for text in texts:
            print(f"[{number}] {text}\n", flush=True)
            number += 1


def _answer_instruction(model, tokenizer, args) -> None:
    """Print the response(s) to `--instruction`, prompted through the template saved with the run."""
    from transformers import TextStreamer

    from qlora_ft.data.prepare import read_template
    from qlora_ft.generate import respond
    from qlora_ft.templates import get_template

    template = read_template(args.model_path)
    if template is None:
        log.warning("%s holds no saved template (not an instruction run?): using alpaca", args.model_path)
        template = get_template("alpaca")
    do_sample = args.do_sample if args.do_sample is not None else args.n_return_seqs > 1
    if args.n_return_seqs > 1 and not do_sample:
        raise UserError("--n_return_seqs > 1 needs sampling: greedy decoding gives one response")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if args.stream else None
    if streamer and args.n_return_seqs > 1:
        raise UserError("--stream shows one response: use --n_return_seqs 1")
    texts = respond(model, tokenizer, template, args.instruction, args.input, args.max_length,
                    args if do_sample else None, args.n_return_seqs, args.seed, args.truncate_prompt,
                    streamer)  # fmt: skip
    if streamer:
        return
    for number, text in enumerate(texts, 1):
        print(text if len(texts) == 1 else f"[{number}] {text}\n", flush=True)


@exits_cleanly("inference.py")
def inference_main(argv: list[str] | None = None) -> None:
    cfg = parse_config(GenerateConfig, argv, "inference.py", "Generate text from a fine-tuned model.")
    leave_objects_at_exit()
    setup_logging()
    run_generate(cfg)


# ----------------------------------------------------------------------------------------------------------
# export, prepare


def run_export(cfg: ExportConfig) -> None:
    import torch

    from qlora_ft import checkpoint
    from qlora_ft.data.encode import add_leading_token, exported_chat_template
    from qlora_ft.data.prepare import read_template
    from qlora_ft.fs import follow_umask
    from qlora_ft.model import load_for_inference

    args = cfg.export
    if args.model_path is None or args.out is None:
        raise UserError("--model_path and --out are required")
    if args.gguf_type is not None and args.format != "gguf":
        raise UserError(f"--gguf-type {args.gguf_type} types a GGUF file: add --format gguf")
    check_export_out(Path(args.out), args.format, args.overwrite)
    if args.format == "gguf":
        from qlora_ft.gguf_export import export_gguf

        export_gguf(args.model_path, args.base_model, args.merge_into, Path(args.out), args.gguf_type or "f16")
        return
    model, tokenizer = load_for_inference(args.model_path, args.base_model, False, torch.device("cpu"), args.merge_into)
    # the folder is a plain transformers model: its generation config names the tokens `pipeline` stops and pads with
    generation = model.generation_config
    generation.eos_token_id = generation.eos_token_id if generation.eos_token_id is not None else tokenizer.eos_token_id
    generation.pad_token_id = generation.pad_token_id if generation.pad_token_id is not None else tokenizer.pad_token_id
    template = read_template(args.model_path)
    if template is not None:  # an instruction/chat run: `apply_chat_template` and `pipeline` prompt as trained
        tokenizer.chat_template = exported_chat_template(template, tokenizer)
    else:  # a text run: `tokenizer(prompt)` starts with training's leading token, as the package's prompts do
        add_leading_token(tokenizer)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    follow_umask(Path(args.out).glob("*.safetensors"))  # safetensors writes 0600
    if template is not None:  # the run's config, template included: inference.py --instruction on this folder
        checkpoint.write_run_config(Path(args.out), checkpoint.read_run_config(Path(args.model_path)))
    log.info("merged model and tokenizer written to %s", args.out)


def check_export_out(out: Path, format: str, overwrite: bool) -> None:
    """Refuse, before anything loads, an --out that would replace something the user did not ask to replace."""
    if format == "gguf":
        if out.is_dir():
            raise UserError(f"--out {out} is a folder: --format gguf writes one file (e.g. {out / 'model.gguf'})")
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: folder {out.parent} not found")
        if out.exists() and not overwrite:
            raise UserError(f"--out {out} exists: pass --overwrite to replace it")
        return
    if out.suffix == ".gguf":
        raise UserError(f"--out {out} names a GGUF file: add --format gguf (the default writes a folder)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: the safetensors export writes a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is a folder that is not empty: pass --overwrite to write into it")


def run_prepare(inputs: list[str], out: str, text_column: str | None, keep_headings: bool = False) -> None:
    """The paragraphs of every source, as training reads them, into a pickle of the original format (a list of
    `{"sentence": paragraph}`), written atomically."""
    import pickle

    from qlora_ft.data.records import iter_paragraphs
    from qlora_ft.data.sources import resolve
    from qlora_ft.fs import atomic_file

    sources = [resolve(source) for source in inputs]  # every source checked before anything is read
    texts = [p for src in sources for p in iter_paragraphs(src, text_column=text_column, keep_headings=keep_headings)]
    if not texts:
        raise UserError(f"no paragraphs found in {', '.join(inputs)} (the data is empty)")
    with atomic_file(out) as f:
        pickle.dump([{"sentence": t} for t in texts], f, protocol=4)
    log.info("wrote %d paragraphs from %d source(s) to %s", len(texts), len(inputs), out)


def _prepare_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="SOURCE", help=".txt books, folders of .txt, any --data source")
    parser.add_argument("--out", required=True, help="the pickle to write: a list of {'sentence': paragraph}")
    parser.add_argument("--text-column", "--text_column", dest="text_column", default=None,
                        help="column or key holding the text, for table sources")  # fmt: skip
    keep_help = DataArgs.__dataclass_fields__["keep_headings"].metadata["help"]  # the same flag as train's
    parser.add_argument("--keep-headings", "--keep_headings", dest="keep_headings", type=parse_bool, nargs="?",
                        const=True, default=False, metavar="BOOL", help=keep_help)  # fmt: skip


def run_cache(action: str, cache_dir: str | None, fingerprints: list[str]) -> None:
    from qlora_ft.data.cache import clear_caches, default_cache_dir, list_caches

    root = cache_dir or str(default_cache_dir())
    if action == "clear":
        deleted = clear_caches(root, fingerprints)
        log.info("deleted %d token cache(s) from %s", len(deleted), root)
        return
    caches = list_caches(root)
    print(f"{len(caches)} token cache(s) in {root}")
    for c in caches:
        what = ", ".join(d["name"] for d in c.meta.get("covers", {}).get("data", [])) or "incomplete"
        counts = f"{c.meta['n_records']:,} records, {c.meta['n_tokens']:,} tokens" if c.complete else "incomplete"
        print(f"{c.fingerprint}  {c.bytes / 1e6:9.1f} MB  {counts}  {what}")


def _cache_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "clear"], help="list the caches, or delete them")
    parser.add_argument("fingerprints", nargs="*", metavar="FINGERPRINT", help="clear only these (default: all)")
    parser.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default=None,
                        help="token cache folder (default: $QLORA_FT_CACHE or ~/.cache/qlora-ft/tokens)")  # fmt: skip


COMMANDS = {
    "train": (TrainConfig, "fine-tune a model (same options as train.py)"),
    "check": (CheckConfig, "what a run with train's options will train on (and, with --plan, cost), before it runs"),
    "generate": (GenerateConfig, "generate text from a fine-tuned model (same options as inference.py)"),
    "chat": (ChatConfig, "talk to a trained run: a conversation, instructions or text, from a terminal or a pipe"),
    "export": (ExportConfig, "merge an adapter into its base and save a full model"),
    "eval": (EvalConfig, "perplexity, merge parity, style score and copying of a run vs its base"),
    "compare": (CompareConfig, "Markdown of base vs fine-tuned generations for the same prompts and seed"),
}


def run_check(cfg: CheckConfig) -> None:
    from qlora_ft.check import run_check

    run_check(cfg)


def run_eval(cfg: EvalConfig) -> None:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from qlora_ft.evaluate import run_eval

    with logging_redirect_tqdm():
        run_eval(cfg)


def run_chat(cfg: ChatConfig) -> None:
    from qlora_ft.chat import run_chat

    run_chat(cfg.chat)


def run_compare(cfg: CompareConfig) -> None:
    from qlora_ft.evaluate import run_compare

    run_compare(cfg)


@exits_cleanly("qlora-ft")
def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="qlora-ft", description="QLoRA fine-tuning and generation for GPT-2-family models.")
    parser.add_argument("--version", action="version", version=f"qlora-ft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (cfg_cls, help_text) in COMMANDS.items():
        build_parser(cfg_cls, f"qlora-ft {name}", help_text, sub.add_parser(name, help=help_text))
    _prepare_parser(sub.add_parser("prepare", help="turn plain-text books into the paragraph pickle"))
    _cache_parser(sub.add_parser("cache", help="list or clear the tokenized-corpus caches"))
    args = vars(parser.parse_args(argv))
    command = args.pop("command", None)
    if command is None:
        parser.print_help(sys.stderr)
        raise UserError("choose a command")
    leave_objects_at_exit()
    setup_logging()
    if command == "prepare":
        run_prepare(args["inputs"], args["out"], args["text_column"], args["keep_headings"])
        return
    if command == "cache":
        run_cache(args["action"], args["cache_dir"], args["fingerprints"])
        return
    cfg = config_from_flat(COMMANDS[command][0], args)
    runners = {"train": run_train, "check": run_check, "generate": run_generate, "chat": run_chat, "export": run_export,
               "eval": run_eval, "compare": run_compare}  # fmt: skip
    runners[command](cfg)
