"""How often a chat prompt tokenized as one string (how inference encoded it before `encode.prompt_ids`)
differs from training's encoding of the same conversation, segment by segment, over the shared instruction
records put to a GPT-2 chat run as one user turn (with no, an empty and a short system prompt, and with the
user turn ending in a newline); the same for the Alpaca instruction prompt; and how long building the
prompt of a 20-exchange conversation takes.

    python bench/chat_prompt_ids.py
"""

from __future__ import annotations

import time
from pathlib import Path

from qlora_ft.data.encode import generation_prompt, prompt_ids
from qlora_ft.data.records import Chat, iter_records
from qlora_ft.data.sources import resolve
from qlora_ft.model import load_tokenizer
from qlora_ft.templates import TEMPLATES

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def joined(tokenizer, text: str) -> list[int]:
    """The old inference encoding: `<eos>` + the whole prompt text tokenized at once."""
    return [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]


def main() -> None:
    tok = load_tokenizer(str(SHARED / "gpt2-tokenizer"))
    template = TEMPLATES["alpaca"].for_tokenizer(tok)  # a chat run on GPT-2: the built-in chat template
    records = list(iter_records(resolve(str(SHARED / "instructions" / "instruction-data.json")), "instruction"))
    for system, tail in ((None, ""), ("", ""), ("Be brief.", ""), (None, "\n")):
        differ = 0
        for r in records:
            user = (f"{r.instruction}\n\n{r.input}" if r.input.strip() else r.instruction) + tail
            opening = (("system", system),) if system is not None else ()
            chat = Chat((*opening, ("user", user), ("assistant", r.output)))
            differ += joined(tok, generation_prompt(chat, template, tok)[0]) != prompt_ids(chat, template, tok)
        print(f"chat, system prompt {system!r}, user turn ending {tail!r}: {differ} of {len(records)} prompts differ")
    alpaca = TEMPLATES["alpaca"]
    differ = sum(joined(tok, alpaca.prompt(r)) != prompt_ids(r, alpaca, tok) for r in records)
    print(f"instruction, alpaca: {differ} of {len(records)} prompts differ")
    long = Chat(tuple(turn for r in records[:20] for turn in (("user", r.instruction), ("assistant", r.output))))
    start = time.perf_counter()
    ids = prompt_ids(long, template, tok)
    print(f"prompt of a 20-exchange conversation: {len(ids)} tokens in {1000 * (time.perf_counter() - start):.0f} ms")


if __name__ == "__main__":
    main()
