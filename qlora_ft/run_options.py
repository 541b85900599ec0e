"""The options of the commands that use a trained run: generate (inference.py), chat, export, eval and compare.

One dataclass per command, built from the same `arg` fields as training's concerns in `qlora_ft.config`; the
parser and the options reference are generated from them in `qlora_ft.options`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from qlora_ft.config import SamplingArgs, arg
from qlora_ft.errors import UserError

MERGE_HELP = (
    "weights the adapter is merged into: dequantized = the NF4 base it was trained on, dequantised (matches "
    "the trained model); original = the full-precision base; auto = dequantized for QLoRA runs, else original"
)


@dataclass
class InferenceArgs:
    """What the inference-side commands (generate, export, eval, compare) share: the trained run, its base."""

    model_path: str | None = arg(None, "the run's output dir or a checkpoint dir, holding the adapter")
    base_model: str | None = arg(None, "base model (default: the one named in the adapter's config)")


@dataclass
class GenerateArgs(InferenceArgs, SamplingArgs):  # (fields: SamplingArgs', InferenceArgs', then these)
    # (its own help: generate also takes a merged or fully fine-tuned model)
    model_path: str | None = arg(None, "output dir, checkpoint dir, or merged/full model dir")
    prompt: list[str] = arg([], "prompt (repeat the flag for several; none starts from <|endoftext|>)")
    instruction: str | None = arg(
        None, "an instruction to answer, wrapped in the template the run was trained with; prints the response only"
    )
    input: str = arg("", "context for --instruction (the Alpaca input field)")
    do_sample: bool | None = arg(
        None, "--instruction: sample instead of greedy decoding (default: greedy, unless --n_return_seqs > 1)"
    )
    max_length: int = arg(100, "new tokens per generated sequence")
    n_return_seqs: int | None = arg(None, "sequences per prompt (default: 3 for --prompt, 1 for --instruction)")
    seed: int = arg(42, "sampling seed")
    stream: bool = arg(False, "print tokens as they are generated")
    qlora: bool = arg(False, "keep the base in 4-bit with the adapter unmerged (least memory)")
    merge_into: Literal["auto", "dequantized", "original"] = arg("auto", MERGE_HELP)
    truncate_prompt: bool = arg(False, "keep a too-long prompt's last tokens that fit the context (else an error)")

    def __post_init__(self):
        super().__post_init__()
        if self.max_length < 1 or (self.n_return_seqs is not None and self.n_return_seqs < 1):
            raise UserError("--max_length and --n_return_seqs must be at least 1")
        if self.instruction is not None and self.prompt:
            raise UserError("--prompt and --instruction exclude each other: give one")
        if self.input and self.instruction is None:
            raise UserError("--input is the context of an --instruction: give --instruction too")
        if self.n_return_seqs is None:
            self.n_return_seqs = 1 if self.instruction is not None else 3


@dataclass
class GenerateConfig:
    gen: GenerateArgs = field(default_factory=GenerateArgs)


@dataclass
class ChatArgs(InferenceArgs, SamplingArgs):
    # (its own help: chat also takes a merged model written by export)
    model_path: str | None = arg(None, "the run's output dir, a checkpoint dir, or a model dir written by export")
    system: str | None = arg(None, "chat runs: the system prompt that opens the conversation (default: none)")
    max_length: int = arg(256, "new tokens per reply at most")
    do_sample: bool = arg(True, "sample replies with --top-k/--top-p/--temperature; False: greedy")
    seed: int = arg(42, "sampling seed (reply N samples with seed + N: a session replays exactly)")
    qlora: bool = arg(False, "keep the base in 4-bit with the adapter unmerged (least memory)")
    merge_into: Literal["auto", "dequantized", "original"] = arg("auto", MERGE_HELP)
    device: Literal["auto", "cpu", "cuda"] = arg("auto", "where the model runs (auto: CUDA when present)")

    def __post_init__(self):
        super().__post_init__()
        if self.max_length < 1:
            raise UserError("--max_length must be at least 1")


@dataclass
class ChatConfig:
    chat: ChatArgs = field(default_factory=ChatArgs)


@dataclass
class ExportArgs(InferenceArgs):
    out: str | None = arg(None, "folder for the merged model and tokenizer (safetensors), or the file to write (gguf)")
    merge_into: Literal["auto", "dequantized", "original"] = arg("auto", MERGE_HELP)
    format: Literal["safetensors", "gguf"] = arg(
        "safetensors", "safetensors: a transformers model folder; gguf: one llama.cpp file (GPT-2 and Llama models)"
    )
    gguf_type: Literal["f16", "q8_0", "q4_0"] | None = arg(
        None, "--format gguf: the weight matrices' type (default: f16; docs/gguf.md)"
    )
    overwrite: bool = arg(False, "replace an existing --out (an existing non-empty folder or file is refused)")


@dataclass
class ExportConfig:
    export: ExportArgs = field(default_factory=ExportArgs)


@dataclass
class EvalArgs(InferenceArgs, SamplingArgs):
    # (its own help: eval needs the run's saved config, and writes its results into the run's output dir)
    model_path: str | None = arg(None, "the run's output dir (adapter + run_config.json) to evaluate")
    data: str | None = arg(
        None,
        "held-out paragraphs, any --data format; for an instruction/chat run, records of its kind, all held out "
        "(default: the run's validation split)",
    )
    reference: str | None = arg(None, "target-style text for the style classifier (default: the run's training split)")
    contrast: str | None = arg(None, "contrasting-style text for the style classifier (none: no style score)")
    lora_reference: str | None = arg(
        None, "output dir of a 16/32-bit LoRA run (--qlora False --lora True) on the same data, shown beside"
    )
    prompt: list[str] = arg(["The morning", "She was", "It was", ""], "prompts the generations start from")
    n_generations: int = arg(100, "generations per model (spread evenly over the prompts)")
    n_prompts: int = arg(20, "instruction/chat runs: held-out records each model answers greedily (the first N)")
    max_length: int = arg(100, "new tokens per generation")
    seed: int = arg(42, "sampling seed (the same for the base and the fine-tuned model)")
    batch_size: int = arg(4, "held-out sequences per forward pass")
    out_dir: str | None = arg(None, "where eval.json, eval.md, eval.png and report.md go (default: --model_path)")

    def __post_init__(self):
        super().__post_init__()
        if self.n_generations < 1 or self.max_length < 1 or self.batch_size < 1:
            raise UserError("--n-generations, --max-length and --batch-size must be at least 1")
        if self.n_prompts < 1:
            raise UserError("--n-prompts must be at least 1")


@dataclass
class EvalConfig:
    eval: EvalArgs = field(default_factory=EvalArgs)


@dataclass
class CompareArgs(InferenceArgs, SamplingArgs):
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
