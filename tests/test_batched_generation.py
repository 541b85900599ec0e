"""Prompts generated together (left-padded, one forward pass per new token for all of them) give the tokens they
give one at a time: in-training samples, `generate` and eval's greedy answers, on GPT-2 and Llama."""

import pytest
import torch
from test_gguf_llama import build_llama

import qlora_ft.generate as generate
from conftest import build_model_dir
from qlora_ft.config import SamplingArgs
from qlora_ft.model import load_tokenizer

PROMPTS = ["She", "It is a truth universally acknowledged that", "Mr. Darcy was", ""]  # lengths 1 to 9 words


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_and_tokenizer(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp(request.param)
    (build_model_dir if request.param == "gpt2" else build_llama)(path)
    return AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(str(path))


def test_left_padding_puts_each_row_at_the_right_edge():
    ids, mask = generate.left_padded([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_greedy_answers_together_equal_one_at_a_time(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [generate.encode_prompt(tokenizer, p, torch.device("cpu"))[0].tolist() for p in PROMPTS]
    together = generate.greedy_answers(model, tokenizer, prompts, 12, stop=(), batch_size=16)
    alone = generate.greedy_answers(model, tokenizer, prompts, 12, stop=(), batch_size=1)
    assert together == alone
    assert len({a["generated"] for a in alone}) > 1  # the prompts' answers differ: the rows were not mixed up


@pytest.mark.parametrize("rows_per_call", [32, 2])
def test_samples_together_equal_one_prompt_at_a_time(model_and_tokenizer, monkeypatch, rows_per_call):
    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(generate, "ROWS_PER_CALL", rows_per_call)
    argmax = SamplingArgs(top_k=1)  # sampling from the top token only: what it samples does not depend on the RNG
    together = generate.sample(model, tokenizer, PROMPTS, argmax, 10, num_return_sequences=2, seed=3)
    alone = [generate.sample(model, tokenizer, [p], argmax, 10, num_return_sequences=2, seed=3)[0] for p in PROMPTS]
    assert together == alone
    assert all(texts[0].startswith(prompt) for prompt, texts in zip(PROMPTS, together, strict=True))
