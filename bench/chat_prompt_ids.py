"""How often a chat prompt tokenized whole (as `apply_chat_template` on an export, llama.cpp and servers
tokenize it) differs from the ids training gave the same conversation, over the shared instruction records put
to a chat run as one user turn (with no, an empty and a short system prompt, and with the user turn ending in a
newline); the same for the Alpaca instruction prompt; and how long building the prompt of a 20-exchange
conversation takes. The tokenizer is GPT-2's (the built-in chat template), or a model folder's (its own
template), e.g. SmolLM2's written by ../shared/models/smollm2-135m-instruct/to_hf.py:

    python bench/chat_prompt_ids.py [TOKENIZER_FOLDER]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from qlora_ft.data.encode import exported_chat_template, prompt_ids
from qlora_ft.data.records import Chat, iter_records
from qlora_ft.data.sources import resolve
from qlora_ft.model import load_tokenizer
from qlora_ft.templates import TEMPLATES

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def whole(tokenizer, chat_template: str, chat: Chat) -> list[int]:
    """The prompt of `chat`'s last reply through the exported chat template, its text tokenized whole."""
    messages = [{"role": r, "content": c} for r, c in chat.messages[:-1]]
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, add_generation_prompt=True,
                                         tokenize=True, return_dict=False)  # fmt: skip


def main() -> None:
    tok = load_tokenizer(sys.argv[1] if len(sys.argv) > 1 else str(SHARED / "gpt2-tokenizer"))
    template = TEMPLATES["alpaca"].for_tokenizer(tok)  # a chat run: the tokenizer's chat template, or the built-in
    exported = exported_chat_template(template, tok)
    records = list(iter_records(resolve(str(SHARED / "instructions" / "instruction-data.json")), "instruction"))
    for system, tail in ((None, ""), ("", ""), ("Be brief.", ""), (None, "\n")):
        differ = 0
        for r in records:
            user = (f"{r.instruction}\n\n{r.input}" if r.input.strip() else r.instruction) + tail
            opening = (("system", system),) if system is not None else ()
            chat = Chat((*opening, ("user", user), ("assistant", r.output)))
            differ += whole(tok, exported, chat) != prompt_ids(chat, template, tok)
        print(f"chat, system prompt {system!r}, user turn ending {tail!r}: {differ} of {len(records)} prompts differ")
    alpaca = TEMPLATES["alpaca"]
    lead = [tok.eos_token_id]
    differ = sum(lead + tok(alpaca.prompt(r), add_special_tokens=False)["input_ids"] != prompt_ids(r, alpaca, tok)
                 for r in records)  # fmt: skip
    print(f"instruction, alpaca: {differ} of {len(records)} prompts differ")
    long = Chat(tuple(turn for r in records[:20] for turn in (("user", r.instruction), ("assistant", r.output))))
    start = time.perf_counter()
    ids = prompt_ids(long, template, tok)
    print(f"prompt of a 20-exchange conversation: {len(ids)} tokens in {1000 * (time.perf_counter() - start):.0f} ms")


if __name__ == "__main__":
    main()
