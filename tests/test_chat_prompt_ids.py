"""A chat run's prompt ids are the same in training and in every reader of its export: for generated
conversations (no, an empty or a real system prompt, several turns, whitespace at the ends of turns,
non-ASCII), the ids training gave the prompt before the last reply equal those of the exported chat template's
prompt tokenized whole (`apply_chat_template(..., add_generation_prompt=True)`, llama.cpp on the GGUF file), as
servers tokenize it."""

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import build_model_dir, shared_or_skip
from qlora_ft.data.encode import encode, prompt_ids, render
from qlora_ft.data.records import Chat
from qlora_ft.templates import DEFAULT_CHAT_TEMPLATE, TEMPLATES, Template, exported_chat_template

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
