"""A chat run's prompt ids are the same in training and in every reader of its export: for generated
conversations (no, an empty or a real system prompt, several turns, whitespace at the ends of turns,
non-ASCII), the ids training gave the prompt before the last reply equal those of the exported chat template's
prompt tokenized whole (`apply_chat_template(..., add_generation_prompt=True)`, llama.cpp on the GGUF file), as
servers tokenize it."""

import io
import json
import logging
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import build_model_dir, shared_or_skip
from qlora_ft.chat import chat_prompt
from qlora_ft.data.encode import encode, exported_chat_template, prompt_ids, render
from qlora_ft.data.records import Chat
from qlora_ft.templates import DEFAULT_CHAT_TEMPLATE, TEMPLATES, Template

EDGES = st.sampled_from(["", " ", "  ", "\n", "\n\n", " \n", "\n ", "\t", "\n\n\n"])
WORDS = st.text(st.sampled_from(list("abcXY 09.,?!'-:\n<|>éñΩ中文😀")), max_size=16)
CONTENT = st.builds(lambda a, w, b: a + w + b, EDGES, WORDS, EDGES)
PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip


@st.composite
def conversations(draw) -> Chat:
    system = draw(st.one_of(st.none(), st.just(""), CONTENT))
    turns = [] if system is None else [("system", system)]
    for _ in range(draw(st.integers(1, 3))):
        turns += [("user", draw(CONTENT)), ("assistant", draw(CONTENT))]
    return Chat(tuple(turns))


def whole_prompt(tokenizer, chat_template: str, chat: Chat) -> list[int]:
    """The prompt for `chat`'s last reply as `apply_chat_template` gives it: the rendered text tokenized whole."""
    messages = [{"role": r, "content": c} for r, c in chat.messages[:-1]]
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, add_generation_prompt=True,
                                         tokenize=True, return_dict=False)  # fmt: skip


def trained_prompt(tokenizer, template: Template, chat: Chat) -> list[int]:
    """The ids training gave the prompt of `chat`'s last reply, checked to be where that reply starts in
    training's ids (`prompt_ids` is the prefix of `encode` that chat and eval prompt with)."""
    ids, mask = encode(tokenizer, render(chat, template, tokenizer))
    prompt = prompt_ids(chat, template, tokenizer)
    assert ids[: len(prompt)] == prompt and mask[len(prompt)] == 1 and not any(mask[: len(prompt)][-1:])
    return prompt


@pytest.fixture(scope="module")
def gpt2():
    """GPT-2's tokenizer and a chat run's template on it (the built-in chat template: GPT-2 has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_or_skip("data", "gpt2-tokenizer"))
    template = TEMPLATES["alpaca"].for_tokenizer(tokenizer)
    assert template.chat_template == DEFAULT_CHAT_TEMPLATE
    return tokenizer, template, exported_chat_template(template, tokenizer)


@PROPERTY
@given(chat=conversations())
def test_gpt2_default_template_prompts_with_trainings_ids(gpt2, chat):
    tokenizer, template, exported = gpt2
    assert trained_prompt(tokenizer, template, chat) == whole_prompt(tokenizer, exported, chat)


@pytest.mark.parametrize(("system", "user", "n_ids"), [("", "Hi", 23), (None, "Hi\n", 17)], ids=["system", "newline"])
def test_gpt2_whitespace_cases_are_the_whole_prompts_ids(gpt2, system, user, n_ids):
    """An empty system prompt and a user turn ending in a newline, which differed when each turn was tokenized
    apart (22 ids vs the whole prompt's 23, 16 vs 17): `\\n\\n` before a header is two tokens (198, 198) in
    the rendered prompt, and now in training's ids too, not one (628)."""
    tokenizer, template, exported = gpt2
    chat = Chat((*([("system", system)] if system is not None else []), ("user", user), ("assistant", "Yes.")))
    prompt = trained_prompt(tokenizer, template, chat)
    assert prompt == whole_prompt(tokenizer, exported, chat) and len(prompt) == n_ids
    assert 628 not in prompt and prompt[0] == tokenizer.eos_token_id


def test_export_names_a_template_whose_prompts_cannot_be_trainings(gpt2, caplog):
    """A template that ends assistant turns with text, not a special token: "\\n\\n" then the next turn merges
    differently in the whole prompt; export says so in one line. The built-in template does not."""
    tokenizer, _, _ = gpt2
    plain_turns = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n\\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="qlora_ft"):
        exported_chat_template(TEMPLATES["alpaca"].for_tokenizer(tokenizer), tokenizer)
        assert not caplog.records
        text_ends = Template("x", "{instruction}{input}", "{instruction}", chat_template=plain_turns)
        exported_chat_template(text_ends, tokenizer)
    (record,) = caplog.records
    assert "differ from the ids training gave them" in record.getMessage() and "\n" not in record.getMessage()


@pytest.fixture(scope="module")
def gpt2_gguf(gpt2, tmp_path_factory):
    """llama.cpp on a GGUF file of a tiny GPT-2 with GPT-2's vocabulary and the chat run's exported template
    (the prompt's ids depend on the tokenizer and template only, not on training)."""
    pytest.importorskip("gguf", reason="the [gguf] extra is not installed")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (docs/gguf.md)")
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    from qlora_ft.gguf_export import write_gguf

    tokenizer, _, exported = gpt2
    folder = build_model_dir(tmp_path_factory.mktemp("gpt2-vocab"), tokenizer=tokenizer)
    path = folder / "chat.gguf"
    write_gguf(AutoModelForCausalLM.from_pretrained(folder), tokenizer, path, "f16", exported)
    return Llama(str(path), n_ctx=512, vocab_only=True, verbose=False)


@pytest.mark.slow
@PROPERTY
@given(chat=conversations())
def test_llama_cpp_prompts_a_gpt2_chat_gguf_with_trainings_ids(gpt2, gpt2_gguf, chat):
    from llama_cpp import llama_chat_format

    tokenizer, template, _ = gpt2
    llm = gpt2_gguf
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    formatter = llama_chat_format.Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos, eos)
    result = formatter(messages=[{"role": r, "content": c} for r, c in chat.messages[:-1]])
    ids = llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)
    assert trained_prompt(tokenizer, template, chat) == ids


# ----------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct: a real model with its own chat template (ChatML) and special tokens


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2 as a Hugging Face folder (../shared's GGUF file through its to_hf.py: needs the gguf library)."""
    pytest.importorskip("gguf", reason="the [gguf] extra is not installed (to_hf.py reads the GGUF file with it)")
    script = shared_or_skip("models", "smollm2-135m-instruct", "to_hf.py")
    out = tmp_path_factory.mktemp("smollm2") / "model"
    subprocess.run([sys.executable, str(script), str(out)], check=True, capture_output=True)
    return out


@pytest.mark.slow
@PROPERTY
@given(chat=conversations())
def test_smollm2_template_prompts_with_trainings_ids(smollm2_chat, chat):
    tokenizer, template, exported = smollm2_chat
    assert trained_prompt(tokenizer, template, chat) == whole_prompt(tokenizer, exported, chat)


@pytest.fixture(scope="module")
def smollm2_chat(smollm2):
    """SmolLM2's tokenizer and a chat run's template on it (its own ChatML template)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    template = TEMPLATES["alpaca"].for_tokenizer(tokenizer)
    assert "<|im_start|>" in template.chat_template
    return tokenizer, template, exported_chat_template(template, tokenizer)


def alpaca_conversations(n: int) -> list[Chat]:
    """The first `n` shared Alpaca records as one-turn conversations, every other one opened by a system prompt."""
    records = json.loads(shared_or_skip("data", "instructions", "instruction-data.json").read_text())[:n]
    return [Chat((*([("system", "Answer briefly.")] if i % 2 else []),
                  ("user", f"{r['instruction']}\n\n{r['input']}" if r["input"].strip() else r["instruction"]),
                  ("assistant", r["output"]))) for i, r in enumerate(records)]  # fmt: skip


@pytest.mark.slow
def test_smollm2_chat_run_trains_exports_and_stops_at_im_end(smollm2, tmp_path, monkeypatch, capsys):
    """A LoRA chat run on SmolLM2 (2 steps) over Alpaca conversations with and without a system prompt:
    `<|im_start|>` and `<|im_end|>` are one special id each in training's ids, every response is trained up to
    and including `<|im_end|>` (the EOS) and not the newline after it, the export's `apply_chat_template` prompts
    with training's ids, and `qlora-ft chat` replies until the model writes `<|im_end|>`."""
    from transformers import AutoTokenizer, GenerationMixin

    from qlora_ft.cli import main, train_main
    from qlora_ft.data.prepare import read_template
    from qlora_ft.model import load_tokenizer

    chats = alpaca_conversations(16)
    data = tmp_path / "chats.json"
    data.write_text(json.dumps([{"messages": [{"role": r, "content": c} for r, c in chat.messages]} for chat in chats]))
    run = tmp_path / "run"
    train_main(["--data", str(data), "--model", str(smollm2), "--qlora", "False", "--lora", "True", "--rank-lora",
                "2", "--batch-size", "2", "--max-input-length", "256", "--max-steps", "2", "--sample-every", "0",
                "--save-interval", "0", "--check-dir", str(tmp_path / "ckpt"), "--output-dir", str(run)])  # fmt: skip
    tokenizer, template = load_tokenizer(str(run)), read_template(run)
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert (start, end) == (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    for chat in chats:
        ids, mask = encode(tokenizer, render(chat, template, tokenizer))
        assert (
            ids[0] == start and ids.count(start) == ids.count(end) == 3
        )  # system (given or the template's), user, assistant
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in chat.messages], tokenize=False
        )  # one id per special token
        first = mask.index(1)
        assert ids[first:] == [*tokenizer(chat.messages[-1][1], add_special_tokens=False)["input_ids"], end, *newline]
        assert mask[first:] == [1] * (len(ids) - first - len(newline)) + [0] * len(newline)

    export = tmp_path / "export"
    main(["export", "--model_path", str(run), "--out", str(export)])
    exported = AutoTokenizer.from_pretrained(export)
    for chat in chats:
        messages = [{"role": r, "content": c} for r, c in chat.messages[:-1]]
        whole = exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert whole == prompt_ids(chat, template, tokenizer)

    generated, real = [], GenerationMixin.generate

    def generate(self, *args, **kwargs):
        generated.append((kwargs.get("eos_token_id"), out := real(self, *args, **kwargs)))
        return out

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n"))
    capsys.readouterr()
    main(["chat", "--model_path", str(run), "--do-sample", "False", "--max_length", "64"])
    reply = capsys.readouterr().out
    ((eos, out),) = generated
    new = out[0, len(chat_prompt([("user", "What is the capital of France?")], template, tokenizer)) :].tolist()
    assert eos == end and new[-1] == end and end not in new[:-1] and len(new) < 64  # stopped by <|im_end|>
    assert "Paris" in reply and "<|im" not in reply and reply.endswith("\n\n")
