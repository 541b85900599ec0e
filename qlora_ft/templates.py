"""Templates: how instruction and chat records become prompts (`data.encode` renders and encodes them), the chat
template an exported model carries, and how a generated response is cut and checked.

Instruction records use a named template (`alpaca`, `plain`) or one from a JSON file; chat records use the
tokenizer's chat template, or `DEFAULT_CHAT_TEMPLATE` when it has none (GPT-2). A template is plain data
(`to_dict` / `from_dict`), saved with the run so that generation and evaluation prompt the same way.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from qlora_ft.data.records import Instruction
from qlora_ft.errors import UserError

Segment = tuple[str, bool]  # (text, trained on)
Encoded = tuple[list[int], list[int]]  # (token ids, loss mask: 1 = trained on)

# The Stanford Alpaca prompts (tatsu-lab/stanford_alpaca, as in tloen/alpaca-lora's templates/alpaca.json,
# which end the prompt with a newline so the response starts on its own line).
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
HEADER_STOP = ("\n### Instruction:", "\n### Input:", "\n### Response:")

# For tokenizers without a chat template (GPT-2). Every turn is `<|role|>\n` + content; a user or system turn
# ends with a newline, an assistant turn with the EOS token, so generation stops there and the next header
# follows the EOS directly (nothing after the EOS is trained on). Written into the tokenizer's
# `chat_template` by export, so `apply_chat_template(..., add_generation_prompt=True)` prompts the same way.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
DEFAULT_CHAT_STOP = ("<|user|>", "<|system|>", "<|assistant|>")


# ----------------------------------------------------------------------------------------------------------
# Templates


def _fields(text: str, where: str) -> set[str]:
    """The `{placeholders}` of a prompt; UserError for a malformed one (a lone `{`; write `{{` for a brace)."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as e:
        raise UserError(f"{where}: {e} (write {{{{ and }}}} for literal braces)") from None


def _check_prompts(prompt_input: Any, prompt_no_input: Any, where: str) -> None:
    """UserError unless prompt_input holds exactly {instruction} and {input}, prompt_no_input {instruction}."""
    for key, text, want in (("prompt_input", prompt_input, {"instruction", "input"}),
                            ("prompt_no_input", prompt_no_input, {"instruction"})):  # fmt: skip
        if not isinstance(text, str):
            raise UserError(f"{where}: {key!r} is {type(text).__name__}, not text")
        got = _fields(text, f"{where}: {key!r}")
        if got != want:
            raise UserError(f"{where}: {key!r} must hold the placeholders {_braced(want)} (found {_braced(got)})")


def _braced(names: set[str]) -> str:
    return ", ".join("{" + n + "}" for n in sorted(names)) or "none"


@dataclass(frozen=True)
class Template:
    """How instruction and chat records become prompts.

    prompt_input / prompt_no_input: the prompt for a record with / without `input`, holding `{instruction}`
        (and `{input}`); the response follows the prompt directly, then EOS.
    stop: strings that end a generated response (the template's next header).
    chat_template: a Jinja chat template for chat records; None = the tokenizer's own, else the default.
    chat_stop: strings that end a generated chat turn.
    """

    name: str
    prompt_input: str
    prompt_no_input: str
    stop: tuple[str, ...] = ()
    chat_template: str | None = None
    chat_stop: tuple[str, ...] = DEFAULT_CHAT_STOP

    def __post_init__(self):
        _check_prompts(self.prompt_input, self.prompt_no_input, f"template {self.name!r}")

    def prompt(self, record: Instruction) -> str:
        """The prompt text of an instruction record: the with-input form when `input` is not blank."""
        if record.input.strip():
            return self.prompt_input.format(instruction=record.instruction, input=record.input)
        return self.prompt_no_input.format(instruction=record.instruction)

    def for_tokenizer(self, tokenizer) -> Template:
        """This template with `chat_template` resolved (the given one, the tokenizer's, or the default): what
        a run saves, so inference renders chats the same way even with a different tokenizer copy."""
        chosen = self.chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        return replace(self, chat_template=chosen)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stop": list(self.stop), "chat_stop": list(self.chat_stop)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "template") -> Template:
        """A template from `to_dict`'s output or a JSON template file (tloen/alpaca-lora's files work: their
        `description` and `response_split` keys are accepted and ignored). UserError if malformed."""
        if not isinstance(d, dict):
            raise UserError(f"{where}: a template is a JSON object, not {type(d).__name__}")
        known = {"name", "prompt_input", "prompt_no_input", "stop", "chat_template", "chat_stop"}
        unknown = set(d) - known - {"description", "response_split"}
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
        for key in ("prompt_input", "prompt_no_input"):
            if key not in d:
                raise UserError(f"{where}: {key!r} is missing (a template needs prompt_input and prompt_no_input)")
        for key in ("stop", "chat_stop"):
            if key in d and not (isinstance(d[key], list) and all(isinstance(s, str) and s for s in d[key])):
                raise UserError(f"{where}: {key!r} must be a list of non-empty strings")
        if d.get("chat_template") is not None and not isinstance(d["chat_template"], str):
            raise UserError(f"{where}: 'chat_template' must be a Jinja template string")
        _check_prompts(d["prompt_input"], d["prompt_no_input"], where)  # first, to name the file in errors
        fields = {k: tuple(v) if k in ("stop", "chat_stop") else v for k, v in d.items() if k in known}
        return cls(**{**fields, "name": str(d.get("name", Path(where).stem))})


TEMPLATES: dict[str, Template] = {
    "alpaca": Template("alpaca", ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, HEADER_STOP),
    "plain": Template(
        "plain",
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "### Instruction:\n{instruction}\n\n### Response:\n",
        HEADER_STOP,
    ),
}


def instruction_chat_template(template: Template, lead: str = "{{ eos_token }}") -> str:
    r"""A Jinja chat template that prompts as `template` prompts an instruction without input, for exported
    models (`tokenizer.apply_chat_template`, `pipeline`): `lead` (training's leading token), then each user
    turn as the instruction prompt and each assistant turn as its content + EOS; system turns are left out.
    The prompt already ends with the response header, so a generation prompt adds nothing.

    >>> chat = [{"role": "user", "content": "Hi"}]
    >>> tokenizer.apply_chat_template(chat, chat_template=instruction_chat_template(TEMPLATES["plain"]),
    ...                               tokenize=False)  # doctest: +SKIP
    '<|endoftext|>### Instruction:\nHi\n\n### Response:\n'
    """
    # the prompt's text around {instruction}, with format's {{ }} escapes undone; json.dumps makes each a
    # Jinja string literal (Jinja reads the same backslash escapes)
    (before, _, _, _), *rest = string.Formatter().parse(template.prompt_no_input)
    after = "".join(literal for literal, _, _, _ in rest)
    return (
        lead + "{% for message in messages %}"
        f"{{% if message['role'] == 'user' %}}{{{{ {json.dumps(before)} + message['content'] + {json.dumps(after)} }}}}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    )


def get_template(name_or_path: str) -> Template:
    """A registered template by name (`alpaca`, `plain`) or one read from a JSON file."""
    if name_or_path in TEMPLATES:
        return TEMPLATES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise UserError(f"unknown template {name_or_path!r}: neither a template name "
                        f"({', '.join(TEMPLATES)}) nor a JSON file")  # fmt: skip
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {name_or_path}: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{name_or_path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return Template.from_dict(d, name_or_path)


# ----------------------------------------------------------------------------------------------------------
# Generation and evaluation


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first stop string (the template's next header), if any.

    >>> cut_at_stop("Paris.\\n### Instruction:\\nAnd Spain?", HEADER_STOP)
    'Paris.'
    """
    at = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:at]


@dataclass(frozen=True)
class FormatCheck:
    """Whether a generated response kept the format: it ended with EOS within the token limit, and did not
    go on to write a template header (a new instruction, say) before it."""

    ended: bool
    repeated_header: bool

    @property
    def ok(self) -> bool:
        return self.ended and not self.repeated_header


def check_format(
    new_ids: Sequence[int], response: str, eos_id: int, max_new_tokens: int, stop: Sequence[str]
) -> FormatCheck:
    """Format adherence of one generation: `new_ids` the generated ids (prompt excluded), `response` their
    decoded text up to the EOS, `stop` the template's headers (`Template.stop` or `chat_stop`; a header
    counts with or without the newline before it).

    >>> check_format([5, 6, 0], "Paris.", eos_id=0, max_new_tokens=8, stop=HEADER_STOP).ok
    True
    >>> check_format([5, 6, 7], "Paris.\\n### Instruction:", eos_id=0, max_new_tokens=3, stop=HEADER_STOP)
    FormatCheck(ended=False, repeated_header=True)
    """
    ended = eos_id in list(new_ids)[:max_new_tokens]
    repeated = any(s.strip() and s.strip() in response for s in stop)
    return FormatCheck(ended, repeated)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference, by Google's `rouge-score` (the scorer of
    Self-Instruct and Super-NaturalInstructions). Its tokenizer lowercases and keeps only a-z and 0-9, so
    texts in other scripts score 0; no stemming."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
