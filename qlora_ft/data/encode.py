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
from qlora_ft.templates import Template

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
    token(s) trained, everything else (system and user turns, each assistant header) not.

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
            segments.append((text[len(done) :], trained))
            done = text
    return [s for s in segments if s[0]]


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

    Each segment is tokenized on its own and the pieces concatenated. Tokenizing the joined text instead
    would let BPE merge across a boundary (a prompt ending in ": " and a response starting with "Yes" can
    become one " Yes" token), so a token would be half prompt, half response, and the prompt's tokens would
    differ from those of the same prompt tokenized alone, as it is at generation. Special-token text (the
    EOS after a response) becomes its one special id.

    The leading EOS marks the record's start as it does a paragraph's in the text path (and as
    `generate.encode_prompt` puts before a prompt); it is left out when the text already starts with the
    BOS or EOS token (chat templates that write a BOS). It is never a target.

    >>> encode(tokenizer, [("Q: 2+3?\\n", False), ("5<|endoftext|>", True)])  # doctest: +SKIP
    ([50256, 48, 25, 362, 10, 18, 30, 198, 20, 50256], [0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    """
    texts = [text for text, _ in segments]
    pieces = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    return assemble(segments, pieces, tokenizer.bos_token_id, leading_token_id(tokenizer))


def assemble(segments: Sequence[Segment], pieces: Sequence[Sequence[int]], bos_id: int | None, lead_id: int) -> Encoded:
    """`encode` from the segments' token ids, tokenized elsewhere (the token cache tokenizes many records at once)."""
    ids: list[int] = []
    mask: list[int] = []
    for piece, (_, trained) in zip(pieces, segments, strict=True):
        ids += piece
        mask += [int(trained)] * len(piece)
    if not ids or ids[0] not in (bos_id, lead_id):
        ids.insert(0, lead_id)
        mask.insert(0, 0)
    return ids, mask


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
    return "".join(text for text, _ in segments[:-1]), record.messages[last][1]


def prompt_ids(record: Record, template: Template, tokenizer) -> list[int]:
    """The token ids training saw before `record`'s last response, encoded as training encodes them: `encode`
    of the segments before that response, leading EOS included. This, not `generation_prompt`'s text
    tokenized whole, is what inference must feed the model: segment by segment, GPT-2 tokenizes a user turn
    ending in a newline, or an empty system prompt, with `\\n\\n` as one token (628) where the joined
    text gives two (198, 198), and a template that writes a BOS gets no EOS before it.

    >>> prompt_ids(Instruction("Add 2 and 3.", "-"), TEMPLATES["plain"], tokenizer)  # doctest: +SKIP
    [50256, 21017, 46486, 25, 198, 4550, 362, 290, 513, 13, 198, 198, 21017, 18261, 25, 198]
    """
    if isinstance(record, Chat):
        last = max(i for i, (role, _) in enumerate(record.messages) if role == "assistant")
        record = Chat(record.messages[: last + 1])
    return encode(tokenizer, render(record, template, tokenizer)[:-1])[0]


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

    Each segment is tokenized on its own, without special tokens, and its tokens get its `trained` flag. With
    `lead` (bos id, eos id), as for instruction and chat records, each record is `assemble`d as `encode` does it
    (leading EOS) and its prompt length is the tokens before its last segment, the prompt `prompt_ids` gives.
    """
    flat = encode([text for record in chunk for text, _ in record])
    ids: list[int] = []
    mask: list[int] = []
    lengths, hashes, prompts = [], [], []
    at = 0
    for record in chunk:
        start = len(ids)
        pieces = flat[at : at + len(record)]
        at += len(record)
        if lead is not None:
            rec_ids, rec_mask = assemble(record, pieces, *lead)
            ids += rec_ids
            mask += rec_mask
            prompts.append(len(rec_ids) - len(pieces[-1]) if pieces else 0)
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
