"""Sampling, shared by in-training samples and inference; `respond` answers an instruction through a run's
template, `complete` continues a prompt's token ids (the chat's turns), `greedy_answers` answers many prompts
at once (eval). Several prompts go through `generate` together, left-padded (`left_padded`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import jinja2
import torch

from qlora_ft.config import SamplingArgs
from qlora_ft.data.encode import leading_token_id, prompt_ids
from qlora_ft.data.records import Chat, Instruction
from qlora_ft.errors import UserError
from qlora_ft.model import context_length
from qlora_ft.templates import DEFAULT_CHAT_STOP, DEFAULT_CHAT_TEMPLATE, Template, check_format, cut_at_stop

log = logging.getLogger(__name__)


def encode_prompt(tokenizer, prompt: str, device: torch.device) -> torch.Tensor:
    """The leading token + prompt: training paragraphs start with it (`encode.leading_token_id`: `<eos>` for
    GPT-2), so a prompt continues like a paragraph opening, and the empty prompt samples a whole paragraph from
    the leading token alone. Shape (1, T)."""
    ids = [leading_token_id(tokenizer), *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    return torch.tensor([ids], dtype=torch.long, device=device)


def prompt_tensor(tokenizer, prompt: str | Sequence[int], device: torch.device) -> torch.Tensor:
    """A prompt's ids, shape (1, T): text through `encode_prompt`, token ids as they are."""
    if isinstance(prompt, str):
        return encode_prompt(tokenizer, prompt, device)
    return torch.tensor([list(prompt)], dtype=torch.long, device=device)


def fit_context(input_ids: torch.Tensor, limit: int | None, max_new_tokens: int, truncate: bool, number: int):
    """`input_ids` (1, T) when T + `max_new_tokens` fits the model's context of `limit` tokens (None: no limit).

    Past it: with `truncate`, the prompt's last tokens that fit, with one warning; else a UserError (GPT-2
    would otherwise fail in an IndexError on its position table). `number` is the prompt's 1-based index.
    """
    length = input_ids.shape[1]
    if limit is None or length + max_new_tokens <= limit:
        return input_ids
    room = limit - max_new_tokens
    if room < 1:
        raise UserError(f"{max_new_tokens} new tokens leave no room for a prompt in the model's context of {limit}")
    if not truncate:
        raise UserError(
            f"prompt {number} is {length} tokens (with the leading <eos>) + {max_new_tokens} new tokens, past the "
            f"model's context of {limit} tokens: shorten it, ask for fewer new tokens, or pass --truncate-prompt"
        )
    log.warning("prompt %d: kept its last %d of %d tokens to fit the model's context of %d with %d new tokens",
                number, room, length, limit, max_new_tokens)  # fmt: skip
    return input_ids[:, -room:]


ROWS_PER_CALL = 32  # prompts x sequences generated together: one forward pass per new token serves them all


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    sampling: SamplingArgs,
    max_new_tokens: int,
    num_return_sequences: int = 1,
    seed: int = 0,
    streamer_factory=None,
    truncate: bool = False,
) -> list[list[str]]:
    """For each prompt, `num_return_sequences` texts (prompt included), sampled with top-k/top-p/temperature.
    A prompt is text (`encode_prompt` gives its ids) or token ids, used as given (a record's prompt as training
    encoded it: `encode.prompt_ids`).

    Prompts are generated together, up to `ROWS_PER_CALL` sequences per `generate` call (`left_padded`), or
    one sequence per call when streaming (streamers take batch size 1). Runs under `torch.random.fork_rng`,
    seeded with `seed`: the caller's RNG streams (e.g. the training loop's dropout) are left exactly as they
    were, and the same seed gives the same texts. Stops at `<eos>`. A prompt whose tokens + `max_new_tokens`
    exceed the model's context raises UserError before anything is generated, or with `truncate` is cut to its
    last tokens that fit (see `fit_context`).
    """
    limit = context_length(model.config)
    device = next(model.parameters()).device
    encoded = [fit_context(prompt_tensor(tokenizer, prompt, device), limit, max_new_tokens, truncate, number)[0]
               for number, prompt in enumerate(prompts, 1)]  # fmt: skip
    knobs = {"do_sample": True, "top_k": sampling.top_k, "top_p": sampling.top_p, "temperature": sampling.temperature,
             "max_new_tokens": max_new_tokens, "eos_token_id": tokenizer.eos_token_id,
             "pad_token_id": pad_id(tokenizer)}  # fmt: skip
    texts: list[str] = []
    with seeded_eval(model, seed):
        if streamer_factory:
            for ids in encoded:
                for _ in range(num_return_sequences):
                    generated = model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids[None]),
                                               streamer=streamer_factory(), **knobs)  # fmt: skip
                    texts += tokenizer.batch_decode(generated, skip_special_tokens=True)
        else:
            per_call = max(1, ROWS_PER_CALL // num_return_sequences)
            for group in (encoded[i : i + per_call] for i in range(0, len(encoded), per_call)):
                input_ids, mask = left_padded(group, pad_id(tokenizer))
                generated = model.generate(input_ids=input_ids, attention_mask=mask,
                                           num_return_sequences=num_return_sequences, **knobs)  # fmt: skip
                rows = [ids for ids in group for _ in range(num_return_sequences)]  # generate's order
                texts += [tokenizer.decode(torch.cat([ids, new]), skip_special_tokens=True)
                          for ids, new in zip(rows, generated[:, input_ids.shape[1] :], strict=True)]  # fmt: skip
    n = num_return_sequences
    return [[t.strip() for t in texts[i : i + n]] for i in range(0, len(texts), n)]


def pad_id(tokenizer) -> int:
    """The id padding rows of a batch: the tokenizer's padding token, or its EOS when it has none (GPT-2's own)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_padded(rows: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows (1-D, on one device) as one batch padded on the left with `pad_id`, and its attention mask
    (0 on the padding), so that `generate` continues every row from its own last token. Outputs equal those of
    one row at a time except where float rounding flips a near-tie (padding changes the matmuls' shapes)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return input_ids, mask


@contextlib.contextmanager
def seeded_eval(model, seed: int) -> Iterator[None]:
    """The block runs in eval mode on an RNG seeded with `seed`; the model's mode and the caller's RNG streams
    (e.g. the training loop's dropout) are as they were afterwards."""
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            torch.manual_seed(seed)
            yield
    finally:
        model.train(was_training)


def instruction_prompt(
    template: Template, tokenizer, instruction: str, input: str = ""
) -> tuple[list[int], tuple[str, ...]]:
    """(prompt token ids, stop strings) for one instruction, as training encoded it (`encode.prompt_ids`):
    through the template's instruction prompt, or, for a chat-trained run (its template holds the chat
    template it used), as a user turn (the input on its own paragraph after the instruction) plus the
    assistant header."""
    if template.chat_template is None:
        record: Instruction | Chat = Instruction(instruction, "-", input)
    else:
        content = f"{instruction}\n\n{input}" if input.strip() else instruction
        record = Chat((("user", content), ("assistant", "-")))
    return prompt_ids(record, template, tokenizer), stop_strings(template, tokenizer)


def stop_strings(template: Template, tokenizer) -> tuple[str, ...]:
    """The strings that end a generated response: an instruction template's `stop`; a chat run's `chat_stop`,
    unless its chat template is not the built-in one and `chat_stop` was left at the built-in headers
    (`<|user|>`, ...), which that template never writes: then the marks it does write (`chat_turn_marks`)."""
    if template.chat_template is None:
        return template.stop
    if template.chat_template == DEFAULT_CHAT_TEMPLATE or template.chat_stop != DEFAULT_CHAT_STOP:
        return template.chat_stop
    return chat_turn_marks(template.chat_template, tokenizer) or template.chat_stop


def chat_turn_marks(chat_template: str, tokenizer) -> tuple[str, ...]:
    """What a chat template writes after an assistant's words, stripped: the turn's end (none when it is the
    EOS, which stops generation anyway), the next user turn's header and the assistant header; found by
    rendering a conversation of marker words. () when the template cannot render it.

    >>> chat_turn_marks(CHATML, tokenizer)  # doctest: +SKIP
    ('<|im_end|>', '<|im_start|>user', '<|im_start|>assistant')
    """
    user, reply, again = "qlora-ft-user", "qlora-ft-reply", "qlora-ft-again"

    def text(turns, generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], chat_template=chat_template,
                                             tokenize=False, add_generation_prompt=generation_prompt)  # fmt: skip

    try:
        asked, headed = text([("user", user)]), text([("user", user)], True)
        answered = text([("user", user), ("assistant", reply)])
        again_asked = text([("user", user), ("assistant", reply), ("user", again)])
    except (jinja2.TemplateError, ValueError, TypeError):
        return ()
    marks = (answered[answered.rfind(reply) + len(reply) :],  # the assistant turn's end
             again_asked[len(answered) : again_asked.rfind(again)] if again_asked.startswith(answered) else "",
             headed[len(asked) :])  # fmt: skip
    return tuple(dict.fromkeys(m.strip() for m in marks if m.strip() and m.strip() != tokenizer.eos_token))


@torch.no_grad()
def respond(
    model,
    tokenizer,
    template: Template,
    instruction: str,
    input: str = "",
    max_new_tokens: int = 256,
    sampling: SamplingArgs | None = None,
    num_return_sequences: int = 1,
    seed: int = 0,
    truncate: bool = False,
    streamer=None,
) -> list[str]:
    """The model's responses to one instruction, prompted through `template` with the token ids training saw
    (`instruction_prompt`): greedy (one response) unless `sampling` is given. Generation stops at `<eos>` or
    at the template's next header, which is cut off: each string is the response alone.

    >>> respond(model, tokenizer, get_template("alpaca"), "Name a colour.")  # doctest: +SKIP
    ['Blue.']
    """
    ids, stop = instruction_prompt(template, tokenizer, instruction, input)
    return complete(model, tokenizer, ids, stop, max_new_tokens, sampling, num_return_sequences, seed, truncate,
                    streamer)  # fmt: skip


@torch.no_grad()
def complete(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    stop: Sequence[str] = (),
    max_new_tokens: int = 256,
    sampling: SamplingArgs | None = None,
    num_return_sequences: int = 1,
    seed: int = 0,
    truncate: bool = False,
    streamer=None,
) -> list[str]:
    """The model's continuations of the token ids `prompt_ids` (`encode.prompt_ids`, `encode_prompt`):
    greedy (one) unless `sampling` is given, on an RNG seeded with `seed`. Generation stops at `<eos>` or at
    a stop string, which is cut off; each string is the new text alone, stripped. A prompt past the model's
    context is refused or, with `truncate`, cut (`fit_context`)."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # (1, T)
    input_ids = fit_context(input_ids, context_length(model.config), max_new_tokens, truncate, 1)
    knobs = {"do_sample": False, "num_return_sequences": 1}
    if sampling is not None:
        knobs = {"do_sample": True, "top_k": sampling.top_k, "top_p": sampling.top_p,
                 "temperature": sampling.temperature, "num_return_sequences": num_return_sequences}  # fmt: skip
    with seeded_eval(model, seed):
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            stop_strings=list(stop) or None,  # the next header: stop there (cut below, as it is generated)
            tokenizer=tokenizer,
            streamer=streamer,
            **knobs,
        )  # (n, T + new)
    texts = tokenizer.batch_decode(generated[:, input_ids.shape[1] :], skip_special_tokens=True)
    return [cut_at_stop(text, stop).strip() for text in texts]


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop,
                   batch_size: int = 16) -> list[dict[str, Any]]:  # fmt: skip
    """The model's greedy answer to each prompt's token ids (`encode.prompt_ids`, as `generate.respond` prompts)
    and its format.

    Generated without stop strings, up to EOS or `max_new_tokens` (fewer when the model's context leaves less
    room: `token_limit`), so that a template header the model goes on to write shows in `generated`;
    `response` is that text cut at the first header, which is what `respond` returns. Prompts of one budget go
    `batch_size` at a time, shortest first (`left_padded`: the tokens one prompt at a time would give,
    except at near-ties).
    """
    device = next(model.parameters()).device
    limit = context_length(model.config)
    budgets = [max_new_tokens if limit is None else max(1, min(max_new_tokens, limit - len(p))) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-budgets[i], len(prompts[i])))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    groups = [[i for i in g if budgets[i] == b] for g in groups for b in dict.fromkeys(budgets[i] for i in g)]
    answers: list[dict[str, Any]] = [{} for _ in prompts]
    for group in groups:
        input_ids, mask = left_padded([torch.tensor(prompts[i], device=device) for i in group], pad_id(tokenizer))
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=budgets[group[0]], eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad_id(tokenizer))  # fmt: skip
        for i, row in zip(group, out[:, input_ids.shape[1] :].tolist(), strict=True):
            answers[i] = answer_format(tokenizer, row, budgets[i], stop)
    return answers


def answer_format(tokenizer, new_ids: list[int], budget: int, stop) -> dict[str, Any]:
    """One greedy answer (its new ids, through EOS or the padding after it) as `greedy_answers` reports it."""
    eos = tokenizer.eos_token_id
    new_ids = new_ids[: new_ids.index(eos) + 1] if eos in new_ids else new_ids
    text = tokenizer.decode(new_ids[:-1] if new_ids[-1:] == [eos] else new_ids, skip_special_tokens=True)
    check = check_format(new_ids, text, eos, budget, stop)
    return {"response": cut_at_stop(text, stop).strip(), "generated": text, "new_tokens": len(new_ids),
            "token_limit": budget, "ended_with_eos": check.ended, "repeated_header": check.repeated_header,
            "format_ok": check.ok}  # fmt: skip
