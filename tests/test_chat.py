"""`qlora-ft chat` on tiny trained runs, driven through a pipe (stdin replaced), and inference prompts
compared with training's encoding as token ids."""

import io
import json
import logging

import pytest
import torch
from test_instruct import chat_rows, instruction_rows, write

from conftest import build_model_dir, shared_or_skip
from qlora_ft import chat as chat_module
from qlora_ft.chat import StopStreamer, chat_prompt, pipe_block
from qlora_ft.cli import main, train_main
from qlora_ft.data.encode import encode, generation_prompt, render
from qlora_ft.data.prepare import Recipe, open_cache, read_template
from qlora_ft.data.records import Chat
from qlora_ft.evaluate import _answer_held_out
from qlora_ft.generate import respond, stop_strings
from qlora_ft.model import load_tokenizer
from qlora_ft.templates import DEFAULT_CHAT_STOP, TEMPLATES, Template

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")  # fmt: skip


def training_encoding(tmp_path, tokenizer, template, conversation: Chat) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of `conversation` as training stores it: chat data read into the token cache (the same
    as `encode` gives it)."""
    data = tmp_path / f"conversation-{len(list(tmp_path.glob('conversation-*')))}.jsonl"
    data.write_text(json.dumps({"messages": [{"role": r, "content": c} for r, c in conversation.messages]}) + "\n")
    cache = open_cache(str(data), tokenizer, Recipe("chat", template), cache_dir=tmp_path / "cache")
    ids, mask = cache.tokens(0).tolist(), cache.mask(0).tolist()
    assert (ids, mask) == encode(tokenizer, render(conversation, template, tokenizer))
    return ids, mask


def train_run(tmp_path, model_dir, data, name):
    train_main(["--data", str(data), "--model", str(model_dir), "--qlora", "False", "--lora", "True",
                "--rank-lora", "2", "--batch-size", "4", "--max-input-length", "128", "--template", "plain",
                "--max-steps", "1", "--sample-every", "0", "--check-dir", str(tmp_path / f"ckpt-{name}"),
                "--output-dir", str(tmp_path / name)])  # fmt: skip
    return tmp_path / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A chat run and an instruction run (one LoRA step each) on a tiny GPT-2 of 256 positions; the base model
    as a text run."""
    tmp = tmp_path_factory.mktemp("chat-runs")
    build_model_dir(tmp / "base", n_embd=32, n_positions=256)
    return {"chat": train_run(tmp, tmp / "base", write(tmp / "chat.json", chat_rows(12)), "chat"),
            "instruction": train_run(tmp, tmp / "base", write(tmp / "inst.json", instruction_rows(12)), "inst"),
            "text": tmp / "base"}  # fmt: skip


class Spy:
    """Wraps `chat.complete`: keeps the prompt ids and the reply of every call."""

    def __init__(self, monkeypatch):
        self.prompts, self.replies, real = [], [], chat_module.complete

        def complete(model, tokenizer, ids, *args, **kwargs):
            self.prompts.append(list(ids))
            self.replies.append(real(model, tokenizer, ids, *args, **kwargs)[0])
            return self.replies[-1:]

        monkeypatch.setattr(chat_module, "complete", complete)


def chat(monkeypatch, capsys, run, lines, *flags) -> list[str]:
    """`qlora-ft chat` with `lines` piped in; the replies read back from stdout (blocks ending in a blank line)."""
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    capsys.readouterr()
    main(["chat", "--model_path", str(run), "--max_length", "8", *map(str, flags)])
    out = capsys.readouterr().out
    assert out.endswith("\n\n") or out == ""
    blocks, reply = [], []
    for line in out.splitlines():
        if line:
            reply.append(line)
        else:
            blocks.append("\n".join(reply))
            reply = []
    assert not reply  # every reply ends with its blank line
    return blocks


# ----------------------------------------------------------------------------------------------------------
# The prompt at each turn is training's encoding of the conversation


@pytest.mark.slow
def test_three_turns_are_prompted_as_training_encodes_the_conversation(runs, tmp_path, monkeypatch, capsys):
    spy = Spy(monkeypatch)
    lines = ["Hello there", "and the letter", "Darcy said what"]
    replies = chat(monkeypatch, capsys, runs["chat"], lines, "--system", "Be brief.")
    assert replies == [pipe_block(r).strip() for r in spy.replies] and len(replies) == 3
    # training's encoding of that conversation (the third reply included): its prompt is all before that reply
    tokenizer, template = load_tokenizer(str(runs["chat"])), read_template(runs["chat"])
    turns = [("system", "Be brief.")] + [
        t for u, r in zip(lines, spy.replies, strict=True) for t in (("user", u), ("assistant", r))
    ]
    ids, mask = training_encoding(tmp_path, tokenizer, template, Chat(tuple(turns)))
    start = max(i for i, m in enumerate(mask) if not m) + 1  # where the last reply starts
    assert spy.prompts[2] == ids[:start]
    assert spy.prompts[1] == chat_prompt(turns[:4], template, tokenizer)
    assert spy.prompts[2][: len(spy.prompts[1])] == spy.prompts[1]  # the conversation grows

    # /reset: the next turn is prompted as a fresh conversation; /exit ends before the last line
    spy.prompts.clear()
    replies = chat(monkeypatch, capsys, runs["chat"], ["Hello there", "and the letter", "/reset", "and the letter",
                                                       "/exit", "never read"])  # fmt: skip
    assert len(replies) == 3 and len(spy.prompts) == 3
    assert spy.prompts[2] == chat_prompt([("user", "and the letter")], template, tokenizer) != spy.prompts[1]


@pytest.mark.slow
def test_instruction_run_answers_each_line_alone_and_text_run_continues(runs, monkeypatch, capsys):
    spy = Spy(monkeypatch)
    tokenizer = load_tokenizer(str(runs["instruction"]))
    replies = chat(monkeypatch, capsys, runs["instruction"], ["Say hi 1?", "", "Say hi 1?"], "--do-sample", "False")
    prompt = TEMPLATES["plain"].prompt_no_input.format(instruction="Say hi 1?")
    expected = [tokenizer.eos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    assert spy.prompts == [expected] * 2  # the blank line is skipped; no history is kept
    assert replies[0] == replies[1]  # greedy: the same answer to the same line

    spy.prompts.clear()
    replies = chat(monkeypatch, capsys, runs["text"], ["She was"])
    assert spy.prompts == [[tokenizer.eos_token_id, *tokenizer("She was")["input_ids"]]] and len(replies) == 1


@pytest.mark.slow
def test_a_conversation_past_the_context_drops_its_oldest_turns_once_said(runs, monkeypatch, capsys, caplog):
    """The model has 256 positions: 32 new tokens per reply and exchanges of ~100 tokens overflow by the third."""
    spy = Spy(monkeypatch)
    words = "the evening walk with Elizabeth and her sister Emma and Mr Darcy and the letter of Mrs Bennet"
    lines = [f"{words} {i}" for i in range(5)]
    with caplog.at_level(logging.WARNING, logger="qlora_ft"):
        replies = chat(monkeypatch, capsys, runs["chat"], lines, "--system", "Be brief.", "--max_length", "32")
    assert len(replies) == 5
    warnings = [r.getMessage() for r in caplog.records if "outgrew the model's context" in r.getMessage()]
    assert len(warnings) == 1 and "256 tokens" in warnings[0]
    assert all(len(p) + 32 <= 256 for p in spy.prompts)
    assert lines[0] in load_tokenizer(str(runs["chat"])).decode(spy.prompts[1])  # kept while it fits
    last = load_tokenizer(str(runs["chat"])).decode(spy.prompts[-1])
    assert last.startswith("<|endoftext|><|system|>\nBe brief.\n<|user|>\n")  # the system prompt is kept
    assert lines[0] not in last and last.count("<|user|>") < 5 and lines[4] in last  # the oldest turns are gone


@pytest.mark.parametrize(
    "argv, message",
    [([], "--model_path is required"), (["--model_path", "/nonexistent/run"], "model path not found"),
     (["--model_path", "TMP"], "holds neither an adapter")],
    ids=["missing", "not-found", "not-a-run"],
)  # fmt: skip
def test_bad_model_path_is_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["chat", *[str(tmp_path) if a == "TMP" else a for a in argv]])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


# ----------------------------------------------------------------------------------------------------------
# Token ids, not strings: inference builds the prompt as training encodes it


@pytest.fixture(scope="module")
def gpt2():
    """The GPT-2 tokenizer (its `\\n\\n` is one token, 628) and a one-layer random GPT-2 over its vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = load_tokenizer(str(shared_or_skip("data", "gpt2-tokenizer")))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=8, n_layer=1, n_head=1)
    return GPT2LMHeadModel(config).eval(), tokenizer


def spy_on_generate(model, monkeypatch) -> list[list[int]]:
    """The prompt ids of every `model.generate` call, which answers EOS at once."""
    seen = []

    def generate(input_ids, eos_token_id, **_):
        seen.append(input_ids[0].tolist())
        return torch.cat([input_ids, torch.full_like(input_ids[:, :1], eos_token_id)], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    return seen


def test_inference_prompt_ids_equal_training_ids_with_gpt2_whitespace(gpt2, tmp_path, monkeypatch):
    """An empty system prompt and a user turn ending in a newline: training encodes `\\n\\n` before the next
    header as the prompt text tokenized whole does (198, 198), not as each turn alone would (628)."""
    model, tokenizer = gpt2
    template = TEMPLATES["alpaca"].for_tokenizer(tokenizer)  # a chat run's saved template: the default chat one
    conversation = Chat((("system", ""), ("user", "Hi\n"), ("assistant", "Hello.")))
    ids, mask = training_encoding(tmp_path, tokenizer, template, conversation)
    trained_prompt = ids[: mask.index(1)]
    whole = tokenizer(generation_prompt(conversation, template, tokenizer)[0], add_special_tokens=False)["input_ids"]
    assert trained_prompt == [tokenizer.eos_token_id, *whole] and 628 not in trained_prompt

    seen = spy_on_generate(model, monkeypatch)
    _answer_held_out({"base": model, "fine_tuned": model}, tokenizer, template, [conversation], 4, {})  # eval's
    respond(model, tokenizer, template, "Hi\n", max_new_tokens=4)  # inference.py --instruction on a chat run
    user_only = training_encoding(tmp_path, tokenizer, template, Chat(conversation.messages[1:]))
    assert seen == [trained_prompt, trained_prompt, user_only[0][: user_only[1].index(1)]]
    assert chat_prompt(conversation.messages[:2], template, tokenizer) == trained_prompt


def test_a_template_that_writes_a_bos_gets_no_eos_before_it(gpt2, tmp_path):
    model, tokenizer = gpt2
    with_bos = Template("x", "{instruction}{input}", "{instruction}", chat_template="{{ bos_token }}" + CHATML)
    conversation = Chat((("user", "Hi"), ("assistant", "Hello.")))
    ids, mask = training_encoding(tmp_path, tokenizer, with_bos, conversation)
    prompt = chat_prompt(conversation.messages[:1], with_bos, tokenizer)
    assert prompt == ids[: mask.index(1)] and prompt.count(tokenizer.eos_token_id) == 1  # (GPT-2: BOS = EOS)


# ----------------------------------------------------------------------------------------------------------
# Stop strings come from the template in use


def test_stop_strings_of_a_tokenizers_own_chat_template(gpt2):
    _, tokenizer = gpt2
    chatml = Template("x", "{instruction}{input}", "{instruction}", chat_template=CHATML)
    assert stop_strings(chatml, tokenizer) == ("<|im_end|>", "<|im_start|>user", "<|im_start|>assistant")
    default = TEMPLATES["alpaca"].for_tokenizer(tokenizer)
    assert stop_strings(default, tokenizer) == DEFAULT_CHAT_STOP
    assert stop_strings(TEMPLATES["alpaca"], tokenizer) == TEMPLATES["alpaca"].stop
    own = Template("x", "{instruction}{input}", "{instruction}", chat_template=CHATML, chat_stop=("END",))
    assert stop_strings(own, tokenizer) == ("END",)  # given stop strings are kept


def test_streamer_holds_back_a_stop_string_as_it_arrives(gpt2):
    _, tokenizer = gpt2
    written = []
    streamer = StopStreamer(tokenizer, ("<|im_end|>",), written.append)
    for piece in ["Blue", " is <|", "im", "_end|> more"]:
        streamer.on_finalized_text(piece)
    streamer.on_finalized_text("", stream_end=True)
    assert "".join(written) == "Blue is \n" and written[1] == " is "


def test_pipe_block():
    assert pipe_block("Blue.\n\n  \nOr green.\n") == "Blue.\nOr green.\n\n"
    assert pipe_block("") == pipe_block(" \n") == "\n"
