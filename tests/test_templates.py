import json

import numpy as np
import pytest
import torch

from conftest import build_tokenizer, shared_or_skip
from qlora_ft.data import encode as encode_module
from qlora_ft.data.batches import collate, cut_windows
from qlora_ft.data.cache import open_or_build
from qlora_ft.data.encode import encode, encode_chunks, generation_prompt, prompt_ids, render
from qlora_ft.data.prepare import Recipe, open_cache
from qlora_ft.data.records import Chat, Instruction, iter_records
from qlora_ft.data.sources import resolve
from qlora_ft.errors import UserError
from qlora_ft.templates import (
    DEFAULT_CHAT_TEMPLATE,
    HEADER_STOP,
    TEMPLATES,
    FormatCheck,
    Template,
    check_format,
    cut_at_stop,
    get_template,
    rouge_l,
)

EOS = "<|endoftext|>"
ALPACA = TEMPLATES["alpaca"]
NO_INPUT = Instruction("Name a colour.", "Red.")
WITH_INPUT = Instruction("Add the numbers.", "5", input="2 and 3")
CHAT = Chat((("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "More"), ("assistant", "Sure.")))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def labelled_spans(tok, batch, row=0) -> list[str]:
    """The decoded runs of consecutive labelled tokens of a batch row."""
    labels = batch["labels"][row].tolist()
    spans, run = [], []
    for label in [*labels, -100]:
        if label != -100:
            run.append(label)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans


def encode_records(tok, records, template) -> list[tuple[list[int], list[int]]]:
    return [encode(tok, render(r, template, tok)) for r in records]


def collate_masked(rows, pad_id):
    """`collate` of rows of (ids, mask) pairs."""
    return collate([[ids for ids, _ in row] for row in rows], pad_id, [[mask for _, mask in row] for row in rows])


def record_cache(tmp_path, tok, records, template):
    """A token cache of `records` rendered with `template`, as training builds it."""
    covers = {"test": [repr(r) for r in records], "template": template.to_dict()}
    segments = lambda: (render(r, template, tok) for r in records)  # noqa: E731
    return open_or_build(covers, tok, segments, cache_dir=tmp_path / "cache", lead=True)


def test_alpaca_texts():
    assert ALPACA.prompt(NO_INPUT) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )
    assert ALPACA.prompt(WITH_INPUT) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n"
        "2 and 3\n\n### Response:\n"
    )
    assert ALPACA.prompt(Instruction("x", "y", input="  \n")) == ALPACA.prompt(Instruction("x", "y"))


@pytest.mark.parametrize("record", [NO_INPUT, WITH_INPUT], ids=["no-input", "with-input"])
def test_alpaca_labels_only_the_response_and_eos(tok, record):
    ids, mask = encode(tok, render(record, ALPACA, tok))
    batch = collate_masked([[(ids, mask)]], pad_id=tok.eos_token_id)
    assert tok.decode(batch["input_ids"][0]) == EOS + ALPACA.prompt(record) + record.output + EOS
    assert labelled_spans(tok, batch) == [record.output + EOS]
    response_ids = tok(record.output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert batch["labels"][0][batch["labels"][0] != -100].tolist() == response_ids
    assert ids[-len(response_ids) :] == response_ids and sum(mask) == len(response_ids)


def test_train_on_prompt_labels_everything_but_the_first_token(tok):
    ids, mask = encode(tok, render(WITH_INPUT, ALPACA, tok, train_on_prompt=True))
    labels = collate_masked([[(ids, mask)]], pad_id=0)["labels"][0].tolist()
    assert labels == [-100, *ids[1:]]


def test_multi_turn_chat_labels_every_assistant_turn(tok):
    """GPT-2's tokenizer has no chat template, so chats use the default one."""
    assert tok.chat_template is None
    segments = render(CHAT, ALPACA, tok)
    assert segments == [
        ("<|system|>\nBe brief.\n", False), ("<|user|>\nHi\n", False), ("<|assistant|>\n", False),
        ("Hello" + EOS, True), ("<|user|>\nMore\n", False), ("<|assistant|>\n", False), ("Sure." + EOS, True),
    ]  # fmt: skip
    batch = collate_masked([[encode(tok, segments)]], pad_id=tok.eos_token_id)
    assert labelled_spans(tok, batch) == ["Hello" + EOS, "Sure." + EOS]


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_labels_with_and_without_packing(tok, packing):
    plain = TEMPLATES["plain"]
    encoded = encode_records(tok, [NO_INPUT, CHAT, WITH_INPUT], plain)
    rows = [encoded] if packing else [[e] for e in encoded]
    batch = collate_masked(rows, pad_id=tok.eos_token_id)
    expected = [["Red." + EOS], ["Hello" + EOS, "Sure." + EOS], ["5" + EOS]]
    if packing:
        assert labelled_spans(tok, batch) == [s for spans in expected for s in spans]
        starts = [0, len(encoded[0][0]), len(encoded[0][0]) + len(encoded[1][0])]
        positions = batch["position_ids"][0].tolist()
        assert [i for i, p in enumerate(positions) if p == 0] == starts
        assert "attention_mask" not in batch
    else:
        assert [labelled_spans(tok, batch, r) for r in range(3)] == expected
        lengths = [len(ids) for ids, _ in encoded]
        assert batch["attention_mask"].sum(dim=1).tolist() == lengths
        for r, n in enumerate(lengths):  # the padding tail, though it is the EOS id, is never a target
            assert (batch["labels"][r, n:] == -100).all()


@pytest.mark.parametrize("chunk_chars", [50, 1 << 18], ids=["small-chunks", "one-chunk"])
def test_encoding_in_batches_equals_one_by_one(tok, monkeypatch, chunk_chars):
    """The token cache tokenizes many records per call: ids, masks and prompt lengths as `encode` and
    `prompt_ids` give them one record at a time."""
    monkeypatch.setattr(encode_module, "CHUNK_CHARS", chunk_chars)
    records = [NO_INPUT, CHAT, WITH_INPUT, Instruction("Say it.", "Yes."), CHAT]
    one_by_one = encode_records(tok, records, ALPACA)
    chunks = list(encode_chunks([render(r, ALPACA, tok) for r in records], tok, lead=True, workers=1))
    assert (len(chunks) > 1) == (chunk_chars == 50)
    ids, lengths, masks, _, prompts = (np.concatenate([c[i] for c in chunks]) for i in range(5))
    starts = np.cumsum(lengths) - lengths
    batched = [(ids[a : a + n].tolist(), masks[a : a + n].tolist()) for a, n in zip(starts, lengths, strict=True)]
    assert batched == one_by_one
    assert prompts.tolist() == [len(prompt_ids(r, ALPACA, tok)) for r in records]


def test_all_ones_masks_collate_like_plain_text():
    windows = [[0, 5, 6, 0], [0, 7, 0], [0, 8]]
    for rows in ([[w] for w in windows], [windows[:2], windows[2:]]):
        masked = collate(rows, pad_id=0, masks=[[[1] * len(w) for w in row] for row in rows])
        plain = collate(rows, pad_id=0)
        assert masked.keys() == plain.keys()
        assert all(torch.equal(masked[k], plain[k]) for k in plain)


def test_segments_are_tokenized_apart(tok):
    """Joined, "Answer: " + "the house" tokenizes as "Answer:", " the", " house": the space would be both
    prompt and response. Apart, the prompt keeps the tokens it has alone, as at generation."""
    prompt, response = "Answer: ", "the house"
    alone = [tok(t, add_special_tokens=False)["input_ids"] for t in (prompt, response)]
    assert tok(prompt + response, add_special_tokens=False)["input_ids"] != alone[0] + alone[1]
    ids, mask = encode(tok, [(prompt, False), (response, True)])
    assert ids == [tok.eos_token_id, *alone[0], *alone[1]]
    assert mask == [0] * (1 + len(alone[0])) + [1] * len(alone[1])


def test_leading_eos_is_not_doubled(tok):
    ids, mask = encode(tok, [(EOS + "Hi\n", False), ("Yes" + EOS, True)])
    assert ids[0] == tok.eos_token_id and ids[1] != tok.eos_token_id and mask[0] == 0


def test_windows_drop_long_records_whole(tmp_path, tok, caplog):
    records = [NO_INPUT, Instruction("Say it.", "Yes. " * 30), WITH_INPUT]
    encoded = encode_records(tok, records, ALPACA)
    cache = record_cache(tmp_path, tok, records, ALPACA)
    limit = max(len(encoded[0][0]), len(encoded[2][0]))
    with caplog.at_level("WARNING"):
        windows = cut_windows(cache, [0, 1, 2], limit)
    assert windows.record.tolist() == [0, 2]  # whole records, never cut
    assert [(windows.ids(k).tolist(), windows.mask(k).tolist()) for k in range(2)] == [encoded[0], encoded[2]]
    assert [r.getMessage() for r in caplog.records] == [f"left out 1 of 3 records longer than {limit} tokens"]
    everything = cut_windows(cache, [0, 1, 2], 10_000)
    assert [(everything.ids(k).tolist(), everything.mask(k).tolist()) for k in range(3)] == encoded


# ----------------------------------------------------------------------------------------------------------
# Templates as data


def test_template_round_trip(tok):
    for template in (*TEMPLATES.values(), ALPACA.for_tokenizer(tok)):
        assert Template.from_dict(json.loads(json.dumps(template.to_dict()))) == template
    resolved = ALPACA.for_tokenizer(tok)
    assert resolved.chat_template == DEFAULT_CHAT_TEMPLATE and ALPACA.chat_template is None


def test_template_from_file(tmp_path, tok):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps({
        "description": "alpaca-lora's file layout", "response_split": "A:", "stop": ["\nQ:"],
        "prompt_input": "Q: {instruction}\nContext: {input}\nA: ",
        "prompt_no_input": "Q: {instruction} {{literal}}\nA: ",
    }))  # fmt: skip
    template = get_template(str(path))
    assert template.name == "qa" and template.stop == ("\nQ:",)
    assert render(NO_INPUT, template, tok) == [("Q: Name a colour. {literal}\nA: ", False), ("Red." + EOS, True)]
    assert render(WITH_INPUT, template, tok)[0] == ("Q: Add the numbers.\nContext: 2 and 3\nA: ", False)
    assert get_template("plain") is TEMPLATES["plain"]


@pytest.mark.parametrize(
    "content, message",
    [
        ({"prompt_input": "{instruction} {input}"}, "'prompt_no_input' is missing"),
        ({"prompt_input": "{instruction}", "prompt_no_input": "{instruction}"},
         "'prompt_input' must hold the placeholders {input}, {instruction} (found {instruction})"),
        ({"prompt_input": "{instruction} {input}", "prompt_no_input": "{instruction} {input}"},
         "'prompt_no_input' must hold the placeholders {instruction}"),
        ({"prompt_input": "{instruction} {input}", "prompt_no_input": "{instruction} {"}, "Single '{'"),
        ({"prompt_input": "{instruction} {input}", "prompt_no_input": 3}, "'prompt_no_input' is int, not text"),
        ({"prompt_input": "{instruction} {input}", "prompt_no_input": "{instruction}", "promt": "x"},
         "unknown key"),
        ({"prompt_input": "{instruction} {input}", "prompt_no_input": "{instruction}", "stop": "###"},
         "'stop' must be a list of non-empty strings"),
        ([1], "a template is a JSON object, not list"),
    ],
    ids=["missing-form", "no-input-placeholder", "extra-placeholder", "lone-brace", "not-text", "unknown-key",
         "stop-not-list", "not-object"],
)  # fmt: skip
def test_bad_template_file_names_the_file(tmp_path, content, message):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UserError) as e:
        get_template(str(path))
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    with pytest.raises(UserError, match="unknown template 'nope'"):
        get_template("nope")


def test_default_chat_template_written_into_the_tokenizer(tmp_path, tok):
    """What export does for a tokenizer without one: the saved tokenizer, reloaded by transformers, prompts
    a conversation exactly as training rendered it."""
    from transformers import AutoTokenizer

    copy = build_tokenizer()
    copy.chat_template = ALPACA.for_tokenizer(copy).chat_template
    copy.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    history = [{"role": r, "content": c} for r, c in CHAT.messages[:-1]]
    prompt = loaded.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    segments = render(CHAT, ALPACA, tok)
    assert prompt == "".join(text for text, _ in segments[:-1])


def test_tokenizer_chat_template_is_used_when_present(tok):
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")  # fmt: skip
    own = build_tokenizer()
    own.chat_template = chatml
    segments = render(Chat((("user", "Hi"), ("assistant", "Hello"))), ALPACA, own)
    assert segments == [("<|im_start|>user\nHi<|im_end|>\n", False), ("<|im_start|>assistant\n", False),
                        ("Hello<|im_end|>\n", True)]  # fmt: skip
    assert ALPACA.for_tokenizer(own).chat_template == chatml


@pytest.mark.parametrize(
    "chat_template, message",
    [
        ("{{ messages[-1]['content'] }}", "record 1: the chat template rewrites earlier turns when turn 1 (assistant)"),
        ("{% for m in messages %}{{ m['content'] }", "record 0: the chat template fails on turn 0 (user): "),
        ("{{ raise_exception('roles must alternate') }}", "record 0: the chat template fails on turn 0 (user): "
                                                          "roles must alternate"),
    ],
    ids=["rewrites-turns", "syntax-error", "refuses"],
)  # fmt: skip
def test_unusable_chat_template_names_the_record(tmp_path, tok, chat_template, message):
    """As training reads chat data (into the token cache). Record 0's reply starts with its user turn, so a
    template that renders only the last message still appears to append there; record 1's does not."""
    template = Template("x", "{instruction}{input}", "{instruction}", chat_template=chat_template)
    data = tmp_path / "chat.jsonl"
    chats = [(("user", "Hi"), ("assistant", "Hi!")), (("user", "Hi"), ("assistant", "Hello"))]
    data.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in chat]}) + "\n"
                            for chat in chats))  # fmt: skip
    with pytest.raises(UserError) as e:
        open_cache(str(data), tok, Recipe("chat", template), cache_dir=tmp_path / "cache")
    assert str(e.value).startswith(f"{data}: {message}"), e.value


# ----------------------------------------------------------------------------------------------------------
# The loss over a batch counts only response tokens


def _hand_mean_loss(model, encoded) -> torch.Tensor:
    """Each record alone: -log p(token | the tokens before it), averaged over the tokens whose mask is 1."""
    total, n = torch.zeros((), dtype=torch.float64), 0
    for ids, mask in encoded:
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)  # (T, V)
        for t in range(1, len(ids)):
            if mask[t]:
                total -= logp[t - 1, ids[t]]
                n += 1
    return total / n


@torch.no_grad()
def test_batch_loss_equals_hand_computed_response_loss(tiny_model_dir, tok):
    """Through the training loop's loss (full logits, and the chunked output layer), padded and packed."""
    from transformers import AutoModelForCausalLM

    from qlora_ft.loss import forward_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    records = [NO_INPUT, WITH_INPUT, CHAT, Instruction("Say it twice.", "Elizabeth. Elizabeth.")]
    encoded = encode_records(tok, records, TEMPLATES["plain"])
    expected = float(_hand_mean_loss(model, encoded))
    n_trained = sum(sum(m) for _, m in encoded)
    for rows in ([[e] for e in encoded], [encoded[:2], encoded[2:]]):  # padded, packed
        batch = collate_masked(rows, pad_id=tok.eos_token_id)
        for head, chunk in ((None, 0), (model.get_output_embeddings(), 7)):
            loss_sum, n = forward_loss(model, batch, head, chunk)
            assert int(n) == n_trained
            assert float(loss_sum / n) == pytest.approx(expected, abs=1e-5)
    padded = collate_masked([[e] for e in encoded], pad_id=tok.eos_token_id)
    assert float(model(**padded).loss) == pytest.approx(expected, abs=1e-5)  # transformers' own loss


# ----------------------------------------------------------------------------------------------------------
# Generation and evaluation helpers


@pytest.mark.parametrize("record", [NO_INPUT, WITH_INPUT, CHAT], ids=["no-input", "with-input", "chat"])
def test_generation_prompt_is_what_training_saw_before_the_last_response(tok, record):
    prompt, reference = generation_prompt(record, ALPACA, tok)
    ids, mask = encode(tok, render(record, ALPACA, tok))
    last = max(i for i, m in enumerate(mask) if not m) + 1  # where the last trained run starts
    assert tok.decode(ids[:last]) == EOS + prompt
    assert tok.decode(ids[last:]) == reference + EOS


def test_stop_strings_and_format_checks():
    assert cut_at_stop("Paris.\n### Instruction:\nAnd Spain?\n### Response:", HEADER_STOP) == "Paris."
    assert cut_at_stop("Paris.", HEADER_STOP) == "Paris."
    assert check_format([5, 6, 0, 0], "Paris.", 0, max_new_tokens=4, stop=HEADER_STOP) == FormatCheck(True, False)
    assert check_format([5, 6, 7, 0], "Paris.", 0, max_new_tokens=3, stop=HEADER_STOP) == FormatCheck(False, False)
    repeated = check_format([5, 6, 0], "Paris.\n\n### Response:\nParis.", eos_id=0, max_new_tokens=9, stop=HEADER_STOP)
    assert repeated == FormatCheck(True, True) and not repeated.ok
    assert check_format([5, 0], "<|user|>\nMore", 0, 9, ALPACA.chat_stop).repeated_header


def test_rouge_l():
    predictions = ["the cat sat", "a dog", "Paris is the capital."]
    scores = rouge_l(predictions, ["the cat sat down", "the cat", "paris is the capital"])
    # LCS 3 of 3 predicted and 4 reference words: P = 1, R = 3/4, F1 = 2PR / (P + R) = 6/7
    assert scores == pytest.approx([6 / 7, 0.0, 1.0])
    with pytest.raises(ValueError):
        rouge_l(["a"], [])


def test_shared_instruction_data_renders_and_masks(tok):
    """Every record of the shared file: the labelled tokens are its output and EOS, the rest its prompt."""
    records = list(
        iter_records(resolve(str(shared_or_skip("data", "instructions", "instruction-data.json"))), "instruction")
    )
    encoded = encode_records(tok, records, ALPACA)
    for record, (ids, mask) in zip(records, encoded, strict=True):
        n = sum(mask)
        assert mask == [0] * (len(ids) - n) + [1] * n
        assert tok.decode(ids[len(ids) - n :]) == record.output + EOS
        assert tok.decode(ids[: len(ids) - n]) == EOS + ALPACA.prompt(record)
    assert sum("### Input:" in ALPACA.prompt(r) for r in records) == 294
