"""`qlora-ft chat`: talk to a trained run in the terminal, or answer lines read from a pipe.

The template saved with the run decides what a line is:

    chat run         a user turn; the conversation is kept (opened by `--system`) until `/reset`
    instruction run  an instruction, answered on its own
    text run         the opening of a text that the model continues (a style run writes on)

Each prompt is the token ids training saw for the same conversation (`encode.prompt_ids`: its text tokenized
whole, as an export's readers tokenize it, after the leading EOS), so the model is asked exactly as it was
taught. A reply ends at EOS or at a stop string of the template (`generate.stop_strings`). When the
conversation plus a reply's `--max-length` tokens outgrows the model's context, its oldest exchanges are
dropped (one warning).

From a pipe (stdin not a terminal) every line is one turn and every reply is printed as its non-blank lines
followed by one blank line, with nothing else on stdout:

    $ printf 'Hi\\nName a colour.\\n' | qlora-ft chat --model_path run
    Hello! How can I help?
    <blank line>
    Blue.
    <blank line>
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import TextStreamer

from qlora_ft.data.encode import prompt_ids
from qlora_ft.data.records import Chat
from qlora_ft.errors import UserError
from qlora_ft.generate import complete, encode_prompt, instruction_prompt, stop_strings
from qlora_ft.model import context_length, default_device, load_for_inference
from qlora_ft.run_options import ChatArgs
from qlora_ft.templates import Template, cut_at_stop

log = logging.getLogger(__name__)

Mode = Literal["chat", "instruction", "text"]
Turn = tuple[str, str]  # (role, content)
PROMPT = ">>> "


def chat_prompt(messages: Sequence[Turn], template: Template, tokenizer) -> list[int]:
    """The token ids the assistant's next turn follows after `messages` (opened by a system or user turn):
    the conversation and the assistant header, encoded as training encodes that conversation.

    >>> chat_prompt([("user", "Hi")], template, tokenizer)  # <eos><|user|>\\nHi\\n<|assistant|>\\n  # doctest: +SKIP
    [50256, 27, 91, 7220, 91, 29, 198, 17250, 198, 27, 91, 562, 10167, 91, 29, 198]
    """
    return prompt_ids(Chat((*messages, ("assistant", "-"))), template, tokenizer)


@dataclass
class Session:
    """One conversation with a loaded model: the exchanges so far and how the next prompt is built."""

    model: Any
    tokenizer: Any
    template: Template | None  # None: a text run
    args: ChatArgs
    exchanges: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant), chat runs only
    n_replies: int = 0
    warned: bool = False  # the context warning is given once

    @property
    def mode(self) -> Mode:
        if self.template is None:
            return "text"
        return "chat" if self.template.chat_template is not None else "instruction"

    @property
    def stop(self) -> tuple[str, ...]:
        return () if self.template is None else stop_strings(self.template, self.tokenizer)

    def reset(self) -> None:
        self.exchanges.clear()

    def messages(self, line: str) -> list[Turn]:
        """The conversation so far, then `line` as the user's turn."""
        system = [("system", self.args.system)] if self.args.system is not None else []
        past = [turn for user, reply in self.exchanges for turn in (("user", user), ("assistant", reply))]
        return [*system, *past, ("user", line)]

    def prompt(self, line: str) -> list[int]:
        """The token ids the reply to `line` continues; in a chat, the oldest exchanges dropped until it fits."""
        if self.mode == "text":
            return encode_prompt(self.tokenizer, line, torch.device("cpu"))[0].tolist()
        if self.mode == "instruction":
            return instruction_prompt(self.template, self.tokenizer, line)[0]
        limit = context_length(self.model.config)
        while True:
            ids = chat_prompt(self.messages(line), self.template, self.tokenizer)
            if limit is None or len(ids) + self.args.max_length <= limit or not self.exchanges:
                return ids  # (a lone turn still too long is cut to its last tokens by `complete`)
            self.exchanges.pop(0)
            if not self.warned:
                log.warning("the conversation outgrew the model's context of %d tokens (with %d new tokens per "
                            "reply): dropping its oldest turns", limit, self.args.max_length)  # fmt: skip
                self.warned = True

    def reply(self, line: str, streamer=None) -> str:
        """The model's reply to `line` (kept in the conversation of a chat run), streamed to `streamer`."""
        ids = self.prompt(line)
        self.n_replies += 1
        sampling = self.args if self.args.do_sample else None
        text = complete(self.model, self.tokenizer, ids, self.stop, self.args.max_length, sampling, 1,
                        self.args.seed + self.n_replies, truncate=True, streamer=streamer)[0]  # fmt: skip
        if self.mode == "chat":
            self.exchanges.append((line, text))
        return text


class StopStreamer(TextStreamer):
    """Prints a reply as it is generated, up to its first stop string: text that could be the start of one
    is held back until the next tokens show it is not."""

    def __init__(self, tokenizer, stop: Sequence[str], write: Callable[[str], Any]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stop, self.write, self.pending, self.stopped = tuple(stop), write, "", False

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if not self.stopped:
            self.pending += text
            cut = cut_at_stop(self.pending, self.stop)
            self.stopped = len(cut) < len(self.pending)
            held = 0 if stream_end or self.stopped else _partial_stop(cut, self.stop)
            self.write(cut[: len(cut) - held])
            self.pending = cut[len(cut) - held :]
        if stream_end:
            self.write("\n")


def _partial_stop(text: str, stop: Sequence[str]) -> int:
    """The length of the longest end of `text` that begins a stop string (0: none)."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def pipe_block(reply: str) -> str:
    """A reply as printed to a pipe: its non-blank lines, then one blank line (a lone newline for an empty one).

    >>> pipe_block("Blue.\\n\\nOr green.")
    'Blue.\\nOr green.\\n\\n'
    """
    body = "\n".join(line for line in reply.splitlines() if line.strip())
    return f"{body}\n\n" if body else "\n"


# ----------------------------------------------------------------------------------------------------------
# The command


def run_chat(args: ChatArgs) -> None:
    """`qlora-ft chat`: load the run, then answer every line of stdin until `/exit` or its end."""
    from qlora_ft.data.prepare import read_template

    if args.model_path is None:
        raise UserError("--model_path is required")
    model, tokenizer = load_for_inference(args.model_path, args.base_model, args.qlora, _device(args.device),
                                          args.merge_into)  # fmt: skip
    limit = context_length(model.config)
    if limit is not None and args.max_length >= limit:
        raise UserError(f"--max_length {args.max_length} leaves no room for a prompt in the model's context of {limit}")
    session = Session(model, tokenizer, read_template(args.model_path), args)
    if args.system is not None and session.mode != "chat":
        log.warning("--system has no effect: %s is a%s %s run", args.model_path, "n" * (session.mode[0] == "i"),
                    session.mode)  # fmt: skip
    interactive = sys.stdin.isatty()
    log.info("%s run: %s; /exit or Ctrl-D ends", session.mode, _what_a_line_is(session))
    for line in _lines(interactive):
        command = line.strip()
        if command == "/exit":
            break
        if command == "/reset":
            session.reset()
            log.info("conversation cleared")
        elif command:
            _answer(session, command, interactive)


def _answer(session: Session, line: str, interactive: bool) -> None:
    if not interactive:
        sys.stdout.write(pipe_block(session.reply(line)))
        sys.stdout.flush()
        return
    try:
        session.reply(line, StopStreamer(session.tokenizer, session.stop, _write))
    except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
        _write("\n")
        log.info("reply interrupted (not kept)")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _what_a_line_is(session: Session) -> str:
    return {"chat": "each line is your next turn, /reset starts a new conversation",
            "instruction": "each line is a new instruction",
            "text": "each line is the opening of a text the model continues"}[session.mode]  # fmt: skip


def _lines(interactive: bool) -> Iterator[str]:
    """stdin's lines: read with a prompt (and line editing) from a terminal, as they come from a pipe."""
    if not interactive:
        for line in sys.stdin:
            yield line.rstrip("\r\n")
        return
    while True:
        try:
            yield input(PROMPT)
        except EOFError:  # Ctrl-D
            _write("\n")
            return


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return default_device()
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    return torch.device(choice)
