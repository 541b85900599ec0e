"""Encode: records -> (token ids, loss mask), the same way for training and for inference's prompts.

The loss mask is data, not loop logic: a record renders to (text, trained) segments, `encode` turns them into
ids and a 0/1 mask (1 = the token is a target), and the batch builder turns mask 0 into label -100:

    Instruction("Say hi.", "Hi!")
      --render-->  [("Below is ...\\n### Instruction:\\nSay hi.\\n\\n### Response:\\n", False), ("Hi!<eos>", True)]
      --encode-->  ids  = [<eos>, p1, p2, ..., pn, r1, r2, <eos>]
                   mask = [0,     0,  0,  ..., 0,  1,  1,  1]

A paragraph of plain text is one trained segment, `[(paragraph, True)]`, stored without the `<eos>` around it
that windowing adds (`batches.cut_windows`). Inference builds a prompt with `prompt_ids`: the record's segments
before its last response, through the same `encode`, so the ids equal those training saw.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Literal

import jinja2
import numpy as np

from qlora_ft.data.records import Chat, Instruction, Record
from qlora_ft.errors import UserError, first_line
from qlora_ft.templates import Template, instruction_chat_template

log = logging.getLogger(__name__)
Segment = tuple[str, bool]  # (text, trained on)
Encoded = tuple[list[int], list[int]]  # (token ids, loss mask: 1 = trained on)


def segments_of(record: Record | str, template: Template | None, tokenizer, train_on_prompt: bool = False,
             ) -> list[Segment]:  # fmt: skip
    """The segments of a paragraph or record; with `train_on_prompt` every segment is trained."""
    if isinstance(record, str):
        return [(record, True)]
    assert template is not None, "instruction and chat records need a template"
    return render(record, template, tokenizer, train_on_prompt)


def render_instruction(record: Instruction, template: Template, eos_token: str) -> list[Segment]:
    """`[(prompt, False), (output + EOS, True)]`.

    >>> from qlora_ft.templates import TEMPLATES
    >>> render_instruction(Instruction("Add 2 and 3.", "5"), TEMPLATES["plain"], "<eos>")
    [('### Instruction:\\nAdd 2 and 3.\\n\\n### Response:\\n', False), ('5<eos>', True)]
    """
    return [(template.prompt(record), False), (record.output + eos_token, True)]


def render_chat(record: Chat, tokenizer, chat_template: str) -> list[Segment]:
    """Segments of a conversation under a Jinja chat template: every assistant turn's content and closing
    token(s) up to its EOS trained, everything else (system and user turns, each assistant header, what the
    template writes after an assistant's EOS) not.

    Rendered turn by turn: the text a turn adds is the difference between the conversation rendered up to
    it and up to the turn before (with the generation prompt before an assistant turn, which splits off
    its header). This needs a template that renders a conversation as a growing prefix; one that rewrites
    earlier turns (some strip past reasoning) is refused.

    >>> render_chat(Chat((("user", "Hi"), ("assistant", "Hello"))), tokenizer, DEFAULT_CHAT_TEMPLATE)  # doctest: +SKIP
    [('<|user|>\\nHi\\n', False), ('<|assistant|>\\n', False), ('Hello<|endoftext|>', True)]
    """
    messages = [{"role": role, "content": content} for role, content in record.messages]
    segments: list[Segment] = []
    done = ""
    for i, (role, _) in enumerate(record.messages):
        steps = [(messages[:i], True, False)] if role == "assistant" else []  # the assistant header
        steps.append((messages[: i + 1], False, role == "assistant"))
        for history, generation_prompt, trained in steps:
            try:
                text = tokenizer.apply_chat_template(
                    history, chat_template=chat_template, tokenize=False, add_generation_prompt=generation_prompt
                )
            except (jinja2.TemplateError, ValueError, TypeError) as e:  # a broken template, or one that refuses
                raise UserError(f"the chat template fails on turn {i} ({role}): {first_line(e)}") from None
            if not text.startswith(done):
                raise UserError(f"the chat template rewrites earlier turns when turn {i} ({role}) is added, so "
                                "the trained turns cannot be told apart; use a template that only appends")  # fmt: skip
            segments += _closed(text[len(done) :], tokenizer.eos_token) if trained else [(text[len(done) :], False)]
            done = text
    return [s for s in segments if s[0]]


def _closed(turn: str, eos: str | None) -> list[Segment]:
    """An assistant turn's text as segments: trained up to the EOS that closes it, and what the template writes
    after that EOS (ChatML's newline) not, since generation stops at the EOS: it is the next turn's prompt.

    >>> _closed("Hello<|im_end|>\\n", "<|im_end|>")
    [('Hello<|im_end|>', True), ('\\n', False)]
    """
    head, closed, tail = turn.rpartition(eos) if eos else ("", "", turn)
    return [(head + closed, True), (tail, False)] if closed else [(turn, True)]


def render(record: Record, template: Template, tokenizer, train_on_prompt: bool = False) -> list[Segment]:
    """The segments of any record; with `train_on_prompt` every segment is trained."""
    if isinstance(record, Instruction):
        segments = render_instruction(record, template, tokenizer.eos_token)
    else:
        segments = render_chat(record, tokenizer, template.for_tokenizer(tokenizer).chat_template)
    return [(text, True) for text, _ in segments] if train_on_prompt else segments


# ----------------------------------------------------------------------------------------------------------
# Tokens: segments -> (ids, mask), length limit, batches


def leading_token_id(tokenizer) -> int:
    """The token before every paragraph and record in training, and before every prompt at inference: the one
    place it comes from (exports and GGUF files give a raw prompt this token, their chat templates write it).

    The tokenizer's BOS when the tokenizer puts it before any text itself (Llama 2, TinyLlama: `<s>`, as they
    were pretrained); else `<|endoftext|>` when the vocabulary holds it as a special token (GPT-2, where it is
    also the EOS; SmolLM2, whose pretraining separated documents with it: its BOS `<|im_start|>` and EOS
    `<|im_end|>` are chat-turn markers, measured worse before a paragraph in docs/gguf.md); else the EOS.
    """
    if tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return tokenizer.bos_token_id
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return endoftext if endoftext in special else tokenizer.eos_token_id


def add_leading_token(tokenizer) -> None:
    """Make `tokenizer(text)` start with the leading token, as a text run's export does: the token becomes the
    BOS and is added to every text (`add_bos_token`, which GGUF files of text runs set too)."""
    tokenizer.bos_token = tokenizer.convert_ids_to_tokens(leading_token_id(tokenizer))
    tokenizer.add_bos_token = True


def encode(tokenizer, segments: Sequence[Segment]) -> Encoded:
    """Token ids and loss mask (1 = trained on) of a record's segments, after a leading EOS.

    The ids are those of the rendered text tokenized whole, as `apply_chat_template`, llama.cpp and servers
    tokenize a prompt, except that the last response is tokenized apart from its prompt. Tokenizing it with
    its prompt would let BPE merge across the boundary (a prompt ending in ": " and a response starting with
    "Yes" can become one " Yes" token), so a token would be half prompt, half response, and the prompt's
    tokens would differ from those of the prompt tokenized alone, as it is at generation. So (`units`): the
    untrained text before a response is tokenized whole (adjacent untrained segments joined: GPT-2 makes
    `\\n\\n` one token only when both newlines are in one text); an earlier response, history by the time the
    last one is asked for, is tokenized together with its prompt, as a server re-tokenizes a conversation,
    and a token that joins the prompt's end to the response's start is not trained. Special-token text (the
    EOS after a response) becomes its one special id, and no token crosses it.

    The leading EOS marks the record's start as it does a paragraph's in the text path (and as
    `generate.encode_prompt` puts before a prompt); it is left out when the text already starts with the
    BOS or EOS token (chat templates that write a BOS). It is never a target.

    >>> encode(tokenizer, [("Q: 2+3?\\n", False), ("5<|endoftext|>", True)])  # doctest: +SKIP
    ([50256, 48, 25, 362, 10, 18, 30, 198, 20, 50256], [0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    """
    return encode_with_prompt(tokenizer, segments)[:2]


def encode_with_prompt(tokenizer, segments: Sequence[Segment]) -> tuple[list[int], list[int], int]:
    """`encode`, and the number of ids before the last response (its prompt, leading EOS included)."""
    texts = texts_to_tokenize(segments)
    pieces = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    return assemble(segments, pieces, tokenizer.bos_token_id, leading_token_id(tokenizer))


def units(segments: Sequence[Segment]) -> list[tuple[str, str]]:
    """A record's segments as (prompt, response) pairs: each trained segment after the untrained text before
    it (adjacent untrained segments joined), and the untrained text after the last one with no response.

    >>> units([("<|user|>\\nHi\\n", False), ("<|assistant|>\\n", False), ("Hello<eos>", True)])
    [('<|user|>\\nHi\\n<|assistant|>\\n', 'Hello<eos>')]
    """
    out: list[tuple[str, str]] = []
    prompt = ""
    for text, trained in segments:
        if trained:
            out.append((prompt, text))
            prompt = ""
        else:
            prompt += text
    return [*out, (prompt, "")] if prompt or not out else out


def _last_response(pairs: Sequence[tuple[str, str]]) -> int:
    return max((i for i, (_, response) in enumerate(pairs) if response), default=len(pairs))


def texts_to_tokenize(segments: Sequence[Segment]) -> list[str]:
    """Two texts per unit, for `assemble`: (prompt, prompt + response) for a unit before the last response,
    tokenized whole as history is; (prompt, response) apart for the last response and after it."""
    pairs = units(segments)
    last = _last_response(pairs)
    return [t for i, (p, r) in enumerate(pairs) for t in ((p, p + r) if i < last else (p, r))]


def assemble(segments: Sequence[Segment], pieces: Sequence[Sequence[int]], bos_id: int | None, lead_id: int,
             ) -> tuple[list[int], list[int], int]:  # fmt: skip
    """`encode_with_prompt` from the token ids of `texts_to_tokenize(segments)`, tokenized elsewhere (the
    token cache tokenizes many records at once)."""
    pairs = units(segments)
    last = _last_response(pairs)
    ids: list[int] = []
    mask: list[int] = []
    prompt = None
    for i, (alone, second) in enumerate(zip(pieces[::2], pieces[1::2], strict=True)):
        if i < last:  # history: prompt + response tokenized whole
            n = _prompt_tokens(alone, second)
            ids += second
            mask += [0] * n + [1] * (len(second) - n)
        else:
            prompt = len(ids) + len(alone) if i == last else prompt
            ids += [*alone, *second]
            mask += [0] * len(alone) + [1] * len(second)
    prompt = len(ids) if prompt is None else prompt
    if not ids or ids[0] not in (bos_id, lead_id):
        ids.insert(0, lead_id)
        mask.insert(0, 0)
        prompt += 1
    return ids, mask, prompt


def _prompt_tokens(alone: Sequence[int], whole: Sequence[int]) -> int:
    """How many of `whole` (a prompt and response tokenized together) are not trained: the prompt's own tokens,
    or, where the two merged at their boundary, those before the first that differs and that one too."""
    same = next((k for k, (a, b) in enumerate(zip(alone, whole, strict=False)) if a != b), min(len(alone), len(whole)))
    return same if same == len(alone) else min(same + 1, len(whole))


# ----------------------------------------------------------------------------------------------------------
# Generation and evaluation


def generation_prompt(record: Record, template: Template, tokenizer) -> tuple[str, str]:
    """(prompt, reference): the text a model continues to answer `record`, and the answer the data gives.

    For an instruction, its prompt and output; for a chat, the conversation before its last assistant turn
    plus that turn's header, and the turn's content. Training saw exactly this prompt before the response
    (after the leading EOS, which `generate.encode_prompt` adds too).
    """
    if isinstance(record, Instruction):
        return template.prompt(record), record.output
    last = max(i for i, (role, _) in enumerate(record.messages) if role == "assistant")
    chat_template = template.for_tokenizer(tokenizer).chat_template
    segments = render_chat(Chat(record.messages[: last + 1]), tokenizer, chat_template)
    response = max(i for i, (_, trained) in enumerate(segments) if trained)
    return "".join(text for text, _ in segments[:response]), record.messages[last][1]


def prompt_ids(record: Record, template: Template, tokenizer) -> list[int]:
    """The token ids training saw before `record`'s last response: `encode`'s ids of the record up to that
    response, leading EOS included. They equal `generation_prompt`'s text tokenized whole after the leading
    EOS (what `apply_chat_template` on an export and llama.cpp give); the exceptions are a chat template's
    (`whole_prompt_mismatch`), which export names.

    >>> prompt_ids(Instruction("Add 2 and 3.", "-"), TEMPLATES["plain"], tokenizer)  # doctest: +SKIP
    [50256, 21017, 46486, 25, 198, 4550, 362, 290, 513, 13, 198, 198, 21017, 18261, 25, 198]
    """
    if isinstance(record, Chat):
        last = max(i for i, (role, _) in enumerate(record.messages) if role == "assistant")
        record = Chat(record.messages[: last + 1])
    ids, _, prompt = encode_with_prompt(tokenizer, render(record, template, tokenizer))
    return ids[:prompt]


# ----------------------------------------------------------------------------------------------------------
# Many records at once, for the token cache (in this process with the tokenizers library's threads, or in a
# pool of spawned workers)

Parallel = Literal["threads", "processes"]
Lead = tuple[int | None, int] | None  # (bos id, leading id) for records that take the leading token; None: paragraphs
CHUNK_CHARS = 1 << 18  # text per work item sent to a tokenizer worker


def backend_json(tokenizer: Any) -> str | None:
    """The fast tokenizer's serialized pipeline with truncation and padding removed (they do not change the
    ids of a whole text, and transformers changes them on the object during calls), or None for slow ones."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    spec["truncation"] = spec["padding"] = None
    return json.dumps(spec, sort_keys=True, ensure_ascii=False)


def _chunks(records: Iterable[list[Segment]]) -> Iterator[list[list[Segment]]]:
    """list[Segment]s grouped into work items of about CHUNK_CHARS characters."""
    chunk: list[list[Segment]] = []
    chars = 0
    for record in records:
        chunk.append(record)
        chars += sum(len(text) for text, _ in record)
        if chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------------------------------------
# Tokenizing (in this process, with the tokenizers library's threads, or in a pool of spawned workers)

_WORKER_ENCODE: Callable[[list[str]], list[list[int]]] | None = None
_WORKER_LEAD: Lead = None


def _encoder_spec(tokenizer: Any) -> tuple[str, Any]:
    """What a worker needs to rebuild the tokenizer: the fast tokenizer's JSON (cheap to send, and workers then
    import only `tokenizers`), or the tokenizer object itself for slow tokenizers (used in this process)."""
    content = backend_json(tokenizer)
    return ("backend", content) if content is not None else ("object", tokenizer)


def _make_encoder(spec: tuple[str, Any]) -> Callable[[list[str]], list[list[int]]]:
    kind, value = spec
    if kind == "object":
        return lambda texts: value(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(value)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast: no character offsets computed
    return lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]


@contextlib.contextmanager
def _tokenizer_threads(on: bool) -> Iterator[None]:
    """The tokenizers library's thread pool on (all cores) or off while building; the setting is restored after.
    The library reads TOKENIZERS_PARALLELISM at every batch call, so setting the variable here takes effect."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if on else "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _init_worker(spec: tuple[str, Any], lead: Lead) -> None:
    global _WORKER_ENCODE, _WORKER_LEAD
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; no threads on top
    _WORKER_ENCODE, _WORKER_LEAD = _make_encoder(spec), lead


def _worker_encode(chunk: list[list[Segment]]) -> tuple[np.ndarray, ...]:
    assert _WORKER_ENCODE is not None
    return encode_chunk(chunk, _WORKER_ENCODE, _WORKER_LEAD)


def encode_chunk(chunk: list[list[Segment]], encode: Callable[[list[str]], list[list[int]]], lead: Lead,
                 ) -> tuple[np.ndarray, ...]:  # fmt: skip
    """(ids uint32 back to back, length per record int64, mask uint8 per token, hash per record uint64, prompt
    length per record int64) of records given as segments.

    Without `lead` (paragraphs) each segment is tokenized on its own, without special tokens, and its tokens get
    its `trained` flag. With `lead` (bos id, eos id), as for instruction and chat records, each record is
    `assemble`d as `encode` does it (leading EOS), and its prompt length is the tokens before its last response
    (a chat may go on with a user turn), the prompt `prompt_ids` gives.
    """
    texts = [texts_to_tokenize(record) if lead is not None else [text for text, _ in record] for record in chunk]
    flat = encode([text for record in texts for text in record])
    ids: list[int] = []
    mask: list[int] = []
    lengths, hashes, prompts = [], [], []
    at = 0
    for record, record_texts in zip(chunk, texts, strict=True):
        start = len(ids)
        pieces = flat[at : at + len(record_texts)]
        at += len(record_texts)
        if lead is not None:
            rec_ids, rec_mask, prompt = assemble(record, pieces, *lead)
            ids += rec_ids
            mask += rec_mask
            prompts.append(prompt)
        else:
            for piece, (_, trained) in zip(pieces, record, strict=True):
                ids += piece
                mask += [int(trained)] * len(piece)
            prompts.append(0)
        lengths.append(len(ids) - start)
        h = hashlib.blake2b(digest_size=8)
        for text, trained in record:
            h.update(b"\x01" if trained else b"\x00")
            h.update(text.encode("utf-8"))
            h.update(b"\xff")  # never in UTF-8: separates segments
        hashes.append(int.from_bytes(h.digest(), "little"))
    return (np.array(ids, dtype=np.uint32), np.array(lengths, dtype=np.int64), np.array(mask, dtype=np.uint8),
            np.array(hashes, dtype=np.uint64), np.array(prompts, dtype=np.int64))  # fmt: skip


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def encode_chunks(records: Iterable[list[Segment]], tokenizer: Any, lead: bool, workers: int | None = None,
                  parallel: Parallel = "threads") -> Iterator[tuple[np.ndarray, ...]]:  # fmt: skip
    """`encode_chunk` of the records, a chunk at a time, in input order: in this process with the tokenizers
    library's threads (`workers` of them; default every core), or in spawned worker processes. With worker
    processes at most 2 chunks per worker are in flight, so memory stays bounded (Pool.imap and Executor.map
    would read the whole input ahead). `lead`: records get the leading EOS rule (instruction and chat)."""
    spec = _encoder_spec(tokenizer)
    how: Lead = (tokenizer.bos_token_id, leading_token_id(tokenizer)) if lead else None
    chunks = _chunks(records)
    workers = available_cores() if workers is None else workers
    if workers <= 1 or spec[0] != "backend" or parallel == "threads":
        encode = _make_encoder(spec)
        with _tokenizer_threads(workers > 1):
            yield from (encode_chunk(chunk, encode, how) for chunk in chunks)
        return
    # ProcessPoolExecutor rather than multiprocessing.Pool: a worker that dies raises BrokenProcessPool here
    # instead of being replaced forever while this process waits.
    context = multiprocessing.get_context("spawn")  # safe with threads, CUDA and any start method
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(spec, how)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(_worker_encode, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def exported_chat_template(template: Template, tokenizer) -> str:
    """The chat template an exported model carries, writing training's leading token itself (`leading_token_id`:
    `{{ eos_token }}` for GPT-2): an instruction run's `instruction_chat_template`; a chat run's own template,
    after the leading token unless it already starts with it or the BOS token (as `encode` adds the leading token
    only when the text lacks both). So `apply_chat_template(..., add_generation_prompt=True)` gives the ids
    training saw before a response; where a chat run's template cannot (`whole_prompt_mismatch`), a warning says
    so."""
    lead_id = leading_token_id(tokenizer)
    lead_token = tokenizer.convert_ids_to_tokens(lead_id)
    names = {tokenizer.bos_token_id: "{{ bos_token }}", tokenizer.eos_token_id: "{{ eos_token }}"}  # GPT-2: eos
    lead = names.get(lead_id, "{{ " + json.dumps(lead_token) + " }}")
    if template.chat_template is None:
        return instruction_chat_template(template, lead)
    chat = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(chat, chat_template=template.chat_template, tokenize=False)
    starts = tuple(t for t in (tokenizer.bos_token, lead_token) if t)
    exported = template.chat_template if text.startswith(starts) else lead + template.chat_template
    if (probe := whole_prompt_mismatch(template, exported, tokenizer)) is not None:
        log.warning("the chat template's prompts, tokenized whole (apply_chat_template, llama.cpp, servers), differ "
                    "from the ids training gave them, e.g. for %r (a template whose assistant turns do not end in a "
                    "special token: docs/chat.md)", probe)  # fmt: skip
    return exported


# Conversations whose prompts, tokenized whole, can differ from training's ids (whitespace at turn boundaries, an
# empty system prompt, several turns); the last assistant turn is the one prompted for.
PROBES: tuple[tuple[tuple[str, str], ...], ...] = (
    (("system", ""), ("user", "Hi\n"), ("assistant", "\n\nHello.\n\n"), ("user", "  More  "), ("assistant", "-")),
    (("user", "Hi"), ("assistant", " Hello. "), ("user", "\nAnd then?\n"), ("assistant", "-")),
    (("system", "Be brief.\n"), ("user", "Caf\u00e9?"), ("assistant", "Oui.\n"), ("user", "Et?"), ("assistant", "-")),
)


def whole_prompt_mismatch(template: Template, exported: str, tokenizer) -> list[tuple[str, str]] | None:
    """The first of `PROBES` whose prompt under the `exported` chat template, as `apply_chat_template` tokenizes
    it, differs from the ids training gave it (`encode.prompt_ids`), as (role, content) turns; None if none does.
    Training tokenizes the text before a response whole as they do, and each earlier turn with its response, but
    the turns one by one: the two agree when every assistant turn ends in a special token (the EOS), across
    which nothing merges."""
    for probe in PROBES:
        messages = [{"role": r, "content": c} for r, c in probe[:-1]]
        try:
            trained = prompt_ids(Chat(probe), template, tokenizer)
            whole = tokenizer.apply_chat_template(messages, chat_template=exported, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)  # fmt: skip
        except UserError:  # a template that refuses the probe (roles it does not know): training refuses it too
            continue
        if list(whole) != trained:
            return list(probe[:-1])
    return None
