"""The leading token (`encode.leading_token_id`) for a model whose BOS is not its EOS: training's paragraphs and
records, the package's prompts, a text run's export (`tokenizer(prompt)`), an instruction run's exported chat
template and the GGUF file's BOS / `add_bos_token` all start with the same token, from one rule."""

import numpy as np
import pytest
import torch
from test_gguf import fields
from test_gguf_llama import build_llama, chatml_tokenizer

from conftest import build_tokenizer, make_paragraphs
from qlora_ft.cli import main
from qlora_ft.data import cache
from qlora_ft.data.batches import cut_windows
from qlora_ft.data.encode import encode, exported_chat_template, leading_token_id, prompt_ids
from qlora_ft.data.records import Instruction
from qlora_ft.generate import encode_prompt
from qlora_ft.templates import TEMPLATES

CPU = torch.device("cpu")
ENDOFTEXT, IM_START, IM_END = 0, 1, 2  # the ChatML tokenizer's ids, as SmolLM2's


def bos_adding_tokenizer():
    """A Llama-2-like tokenizer: `<s>` BOS that `tokenizer(text)` puts first itself, `</s>` EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(make_paragraphs(100, seed=1), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_the_rule():
    chatml, gpt2_like, llama2_like = chatml_tokenizer(), build_tokenizer(), bos_adding_tokenizer()
    assert (chatml.bos_token_id, chatml.eos_token_id) == (IM_START, IM_END)
    assert leading_token_id(chatml) == ENDOFTEXT  # SmolLM2: the document token, neither chat marker
    assert leading_token_id(gpt2_like) == gpt2_like.eos_token_id  # GPT-2: <|endoftext|>, its EOS
    assert leading_token_id(llama2_like) == llama2_like.bos_token_id == 1  # the BOS its tokenizer adds


def test_training_and_the_packages_prompts_start_with_the_leading_token(tmp_path):
    tokenizer = chatml_tokenizer()
    paragraphs = make_paragraphs(5)
    c = cache.open_or_build({"t": 1}, tokenizer, lambda: ([(p, True)] for p in paragraphs), cache_dir=tmp_path,
                            workers=1)  # fmt: skip
    windows = cut_windows(c, np.arange(c.n_records), 512)
    for k, paragraph in enumerate(paragraphs):  # <|endoftext|> + paragraph + <|im_end|> (the EOS it learns to stop at)
        ids = tokenizer(paragraph)["input_ids"]
        assert windows.ids(k).tolist() == [ENDOFTEXT, *ids, IM_END]
    assert encode_prompt(tokenizer, "She was", CPU)[0].tolist() == [ENDOFTEXT, *tokenizer("She was")["input_ids"]]
    record = Instruction("Name a colour.", "Red.")
    ids, _ = encode(tokenizer, [("### Instruction:\nName a colour.\n\n### Response:\n", False), ("Red.", True)])
    assert ids[0] == ENDOFTEXT and prompt_ids(record, TEMPLATES["plain"], tokenizer)[0] == ENDOFTEXT
    # a chat template that writes the tokenizer's BOS (ChatML's <|im_start|>) gets no leading token before it
    assert encode(tokenizer, [("<|im_start|>user\nHi<|im_end|>\n", False)])[0][0] == IM_START


def test_the_exported_chat_template_writes_the_leading_token():
    tokenizer = chatml_tokenizer()
    record = Instruction("Name a colour.", "-")
    template = exported_chat_template(TEMPLATES["plain"], tokenizer)
    messages = [{"role": "user", "content": "Name a colour."}]
    ids = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, return_dict=False)
    assert ids == prompt_ids(record, TEMPLATES["plain"], tokenizer) and ids[0] == ENDOFTEXT


@pytest.mark.slow
def test_a_text_export_and_its_gguf_give_a_raw_prompt_the_leading_token(tmp_path):
    """A model folder exported as a text run's is: `tokenizer(prompt)` of the safetensors export and of
    transformers' reading of the GGUF file, and the GGUF's BOS / add_bos_token, all give the package's prompt."""
    from transformers import AutoTokenizer

    pytest.importorskip("gguf", reason="the [gguf] extra is not installed")
    base = build_llama(tmp_path / "base")
    main(["export", "--model_path", str(base), "--out", str(tmp_path / "merged")])
    main(["export", "--model_path", str(base), "--out", str(tmp_path / "m.gguf"), "--format", "gguf"])
    meta = fields(tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.bos_token_id"] == ENDOFTEXT and meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.eos_token_id"] == IM_END
    tokenizer = AutoTokenizer.from_pretrained(base)
    exported = AutoTokenizer.from_pretrained(tmp_path / "merged")
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for prompt in ["She was", "  In 1811, caf\u00e9 <|im_start|>", ""]:
        expected = encode_prompt(tokenizer, prompt, CPU)[0].tolist()
        assert exported(prompt)["input_ids"] == expected == from_gguf(prompt)["input_ids"], prompt
    assert leading_token_id(exported) == ENDOFTEXT  # training again from the export keeps the rule
