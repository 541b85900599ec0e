"""Instruction and chat fine-tuning end to end: train.py on records, the labels of real batches, resume,
bad records, over-long records, --format, --validation-data, inference --instruction and export."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import WORDS, build_model_dir
from qlora_ft.cli import inference_main, main, train_main
from qlora_ft.config import SamplingArgs, TrainConfig
from qlora_ft.data.batches import epoch_batches, epoch_rows, make_batch
from qlora_ft.data.prepare import prepare_data
from qlora_ft.data.records import Chat, Instruction
from qlora_ft.loop import train
from qlora_ft.model import load_tokenizer
from qlora_ft.options import parse_config
from qlora_ft.templates import DEFAULT_CHAT_TEMPLATE, TEMPLATES, cut_at_stop


def words(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def instruction_rows(n, seed=0, long_output=None):
    """`n` distinct records, every third with an input; record `long_output` (if given) has a 300-word answer."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = {"instruction": f"{words(rng, 2, 5)} {i}?", "input": words(rng, 1, 4) if i % 3 == 0 else "",
               "output": words(rng, 300, 300) if i == long_output else f"{words(rng, 1, 6)}."}  # fmt: skip
        rows.append(row)
    return rows


def chat_rows(n, seed=0):
    rng = random.Random(seed)
    turns = [[("system", "Be brief.")] * (i % 4 == 0) + [("user", f"{words(rng, 1, 2)} {i}"),
              ("assistant", words(rng, 1, 2))] + [("user", "and"), ("assistant", "the end")] * (i % 3 == 0)
             for i in range(n)]  # fmt: skip
    return [{"messages": [{"role": r, "content": c} for r, c in t]} for t in turns]


def write(path, rows):
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """The tiny GPT-2 with a 512-token context: room for the Alpaca prompt (~120-170 tokens here)."""
    return build_model_dir(tmp_path_factory.mktemp("wide-gpt2"), n_embd=32, n_positions=512)


def argv(tmp_path, data, model_dir, *extra, run="run", ckpt="ckpt"):
    return ["--data", str(data), "--model", str(model_dir), "--batch-size", "4", "--max-input-length", "96",
            "--template", "plain", "--sample-every", "0", "--log-every", "1", "--check-dir", str(tmp_path / ckpt),
            "--output-dir", str(tmp_path / run), *map(str, extra)]  # fmt: skip


def one_error_line(capsys, entry, args) -> str:
    with pytest.raises(SystemExit) as e:
        entry(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), err
    return lines[0]


def first_batch(cfg: TrainConfig, data):
    """The loop's first training batch (epoch 0), and the train-record indices of each of its rows."""
    rows = epoch_rows(data.train.lengths, cfg.data.max_input_length, cfg.data.packing, cfg.data.seed, 0)
    batch_rows = epoch_batches(rows, data.train.lengths, cfg.data.batch_size, not cfg.data.packing, cfg.data.seed, 0)[0]
    return make_batch(batch_rows, data.train, 0), batch_rows


def responses(tokenizer, record) -> list[int]:
    """The token ids training should target for a record: each answer, tokenized alone, + EOS."""
    answers = (
        [record.output] if isinstance(record, Instruction) else [c for r, c in record.messages if r == "assistant"]
    )
    eos = tokenizer.eos_token_id
    return [t for a in answers for t in [*tokenizer(a, add_special_tokens=False)["input_ids"], eos]]


# ----------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.slow
def test_train_py_on_instruction_json_then_inference(tmp_path, wide_model_dir, capsys):
    """The user's command lines: Alpaca by default, the mode's defaults, adapter + template saved; inference
    --instruction prompts through the stored template and prints only the (greedy, repeatable) response."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write(tmp_path / "instruction-data.json", instruction_rows(24))
    train_main(["--qlora", "True", "--model", str(wide_model_dir), "--data", str(data), "--max-input-length", "256",
                "--batch-size", "4", "--sample-every", "2", "--max-output-length", "4", "--max-steps", "2",
                "--check-dir", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "run")])  # fmt: skip
    out = tmp_path / "run"
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["data"]["template_used"] == {**TEMPLATES["alpaca"].to_dict(), "chat_template": None}
    saved = json.loads((tmp_path / "ckpt" / "step-000002" / "run_config.json").read_text())
    assert saved["data"]["template_used"] == run_config["data"]["template_used"]
    # unset per-mode options took the instruction defaults
    assert (run_config["model"]["rank_lora"], run_config["model"]["alpha_lora"]) == (16, 32)
    assert (run_config["optim"]["lr"], run_config["optim"]["epochs"]) == (1e-3, 2)
    assert run_config["model"]["targets_lora"] == ["all-linear"]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["use_rslora"] is False  # rsLoRA is a text default only
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all("### Instruction:" in s["prompt"] and "### Response:" in s["prompt"] for s in samples)
    capsys.readouterr()

    instruction = "Describe the letter."
    inference_main(["--model_path", str(out), "--instruction", instruction, "--max_length", "6"])
    printed = capsys.readouterr().out
    inference_main(["--model_path", str(out), "--instruction", instruction, "--max_length", "6"])
    assert capsys.readouterr().out == printed  # greedy: the same response every time
    assert "###" not in printed and "Below is" not in printed and not printed.startswith("[1]")

    # the same greedy continuation by hand, with transformers + peft on the Alpaca prompt: only its response
    tokenizer = load_tokenizer(str(out))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(wide_model_dir), out).merge_and_unload()
    prompt = TEMPLATES["alpaca"].prompt(Instruction(instruction, "-"))
    ids = torch.tensor([[tokenizer.eos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
    new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1] :]  # fmt: skip
    expected = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), TEMPLATES["alpaca"].stop).strip()
    assert printed.strip() == expected


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("kind", ["instruction", "prompt-completion", "chat"])
def test_labels_of_a_training_batch_are_exactly_the_responses(tmp_path, tiny_model_dir, kind, packing):
    if kind == "chat":
        rows = chat_rows(20)
    elif kind == "prompt-completion":
        rows = [{"prompt": r["instruction"], "completion": r["output"]} for r in instruction_rows(20)]
    else:
        rows = instruction_rows(20)  # with and without input: both prompt forms
    data_path = write(tmp_path / "d.json", rows)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    cfg = parse_config(TrainConfig, argv(tmp_path, data_path, tiny_model_dir, "--packing", packing), "train.py")
    data = prepare_data(cfg, tokenizer)
    assert data.mode == ("chat" if kind == "chat" else "instruction")
    batch, batch_rows = first_batch(cfg, data)
    records = data.read(data.train.record)  # window k's record is records[k]
    assert packing == ("position_ids" in batch) and any(len(r) > 1 for r in batch_rows) == packing
    for r, row in enumerate(batch_rows):
        labelled = batch["labels"][r][batch["labels"][r] != -100].tolist()
        assert labelled == [t for i in row for t in responses(tokenizer, records[i])]
    if kind == "instruction":  # both prompt forms are in the data
        assert {bool(r.input) for r in records} == {True, False}

    # --train-on-prompt: every token of each record is a target, except its leading <eos>
    cfg = parse_config(TrainConfig, argv(tmp_path, data_path, tiny_model_dir, "--packing", packing,
                                         "--train-on-prompt", "True"), "train.py")  # fmt: skip
    data = prepare_data(cfg, tokenizer)
    records = data.read(data.train.record)
    batch, batch_rows = first_batch(cfg, data)
    for r, row in enumerate(batch_rows):
        labelled = batch["labels"][r][batch["labels"][r] != -100].tolist()
        assert labelled == [t for i in row for t in data.train.ids(i).tolist()[1:]]
        assert len(labelled) > sum(len(responses(tokenizer, records[i])) for i in row)


def test_chat_sample_prompts_are_the_training_ids_before_the_last_answer(tmp_path, tiny_model_dir, monkeypatch):
    """In-training samples of a chat run prompt with the ids training saw before the conversation's last answer,
    ending at its assistant header, also when the conversation goes on with a user turn after that answer; the
    model gets those ids, not their text tokenized again."""
    from transformers import AutoModelForCausalLM

    from qlora_ft.data.encode import prompt_ids
    from qlora_ft.generate import sample

    rows = chat_rows(16)
    for row in rows[::2]:  # half the conversations end in a user turn
        row["messages"].append({"role": "user", "content": "thank you"})
    data_path = write(tmp_path / "d.json", rows)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    cfg = parse_config(TrainConfig, argv(tmp_path, data_path, tiny_model_dir, "--train-size", "0.5"), "train.py")
    data = prepare_data(cfg, tokenizer)
    records = data.read(data.validation.record)
    assert {r.messages[-1][0] for r in records} == {"user", "assistant"}
    prompts = data.sample_prompts(n=len(records))
    expected = [prompt_ids(r, data.template, tokenizer) for r in records]
    assert sorted(map(tuple, prompts)) == sorted(map(tuple, expected))
    header = tokenizer("<|assistant|>\n", add_special_tokens=False).input_ids
    assert all(list(p[-len(header) :]) == header for p in prompts)

    fed = []  # what the model is given: the ids as they are (the rows' unmasked tokens: prompts go together)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    real = model.generate

    def generate(input_ids, attention_mask, **kw):
        fed.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True))
        return real(input_ids=input_ids, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(model, "generate", generate)
    texts = sample(model, tokenizer, prompts, SamplingArgs(), 2, seed=0)
    assert fed == [list(p) for p in prompts] and len(texts) == len(prompts)


@pytest.mark.slow
def test_resume_is_bit_exact_in_instruction_mode(tmp_path, tiny_model_dir):
    """8 steps == 4 steps + 4 resumed, with dropout, accumulation, instruction samples and an epoch boundary."""
    data = write(tmp_path / "d.json", instruction_rows(40))
    extra = ("--max-steps", "8", "--save-every-steps", "4", "--grad-accum-steps", "2", "--lora-dropout", "0.1",
             "--sample-every", "3", "--max-output-length", "4", "--batch-size", "3", "--rank-lora", "4",
             "--lr", "1e-2")  # fmt: skip

    def config(*more, run):
        return parse_config(TrainConfig, argv(tmp_path, data, tiny_model_dir, *extra, *more, run=run), "train.py")

    train(config(run="full"))
    (tmp_path / "ckpt" / "step-000008").rename(tmp_path / "full-step8")
    train(config("--restore-file", "step-000004", run="resumed"))
    full, resumed = (load_file(tmp_path / r / "adapter_model.safetensors") for r in ("full", "resumed"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert sorted(losses("resumed")) == [5, 6, 7, 8]
    assert all(losses("full")[s] == loss for s, loss in losses("resumed").items())


@pytest.mark.slow
def test_a_resume_refuses_another_seed_or_template_content_and_takes_a_moved_template(tmp_path, tiny_model_dir,
                                                                                       capsys):  # fmt: skip
    """The seed orders every epoch and the template renders every record: a resume that changes either would
    train other sequences from the saved position, so it is refused in one line; the template is compared by
    content (a copy at another path resumes)."""
    data = write(tmp_path / "d.json", instruction_rows(24))
    template = tmp_path / "t.json"
    spec = {"name": "mine", "prompt_input": "Q: {instruction} {input}\nA:", "prompt_no_input": "Q: {instruction}\nA:"}
    template.write_text(json.dumps(spec))
    base = argv(tmp_path, data, tiny_model_dir, "--max-steps", "2", "--save-every-steps", "1", "--rank-lora", "2",
                "--template", str(template))  # fmt: skip
    train_main(base)
    capsys.readouterr()
    resume = [*base, "--max-steps", "3", "--restore-file", "step-000002", "--load-checkpoint", "True"]
    assert "--seed 42 (this run: 7)" in one_error_line(capsys, train_main, [*resume, "--seed", "7"])
    template.write_text(json.dumps({**spec, "prompt_no_input": "Question: {instruction}\nAnswer:"}))
    line = one_error_line(capsys, train_main, resume)
    assert "template 'mine' (same name, other content)" in line
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(spec))
    train_main([*resume, "--template", str(moved)])
    assert (tmp_path / "ckpt" / "step-000003").is_dir()


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"instruction": "Say hi."}, {"instruction": "x", "output": "y"}], "record 0: 'output' is missing"),
        ([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": 5}], "record 1: 'output' is int"),
        ([{"prompt": "a", "completion": ""}], "record 0: 'completion' is empty"),
        ([{"messages": [{"role": "user", "content": "Hi"}]}], "record 0: 'messages' has no assistant turn"),
        ([{"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]}],
         "record 0: 'messages'[1]: 'role' 'bot' is not one of"),
    ],
)  # fmt: skip
def test_a_bad_record_stops_train_py_with_one_line(tmp_path, tiny_model_dir, capsys, rows, message):
    data = write(tmp_path / "d.json", rows)
    line = one_error_line(capsys, train_main, argv(tmp_path, data, tiny_model_dir))
    assert f"{data}: {message}" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "ckpt").exists()


def test_over_long_records_are_dropped_and_counted(tmp_path, tiny_model_dir, caplog):
    """(`prepare_data` is train's data step; the run itself is covered above.)"""
    data = write(tmp_path / "d.json", instruction_rows(30, long_output=4))
    cfg = parse_config(TrainConfig, argv(tmp_path, data, tiny_model_dir), "train.py")
    with caplog.at_level("INFO"):
        prepared = prepare_data(cfg, load_tokenizer(str(tiny_model_dir)))
    dropped = [r.getMessage() for r in caplog.records if "longer than 96 tokens" in r.getMessage()]
    n_train, n_val = len(prepared.split.train_idx), len(prepared.split.val_idx)
    n_side = n_val if 4 in prepared.split.val_idx else n_train  # the side where record 4 fell
    assert dropped == [f"left out 1 of {n_side} records longer than 96 tokens"], dropped
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")]
    windows = f"{n_train} / {n_val - 1}" if 4 in prepared.split.val_idx else f"{n_train - 1} / {n_val}"
    head = f"data: {n_train} train / {n_val} validation instruction records -> {windows} windows"
    assert len(summary) == 1 and summary[0].startswith(head), summary
    kept = prepared.read(prepared.train.record) + prepared.read(prepared.validation.record)
    assert len(kept) == 29 and all(len(r.output.split()) < 300 for r in kept)
    assert max(*prepared.train.lengths, *prepared.validation.lengths) <= 96


def test_format_forcing(tmp_path, tiny_model_dir, capsys):
    rows = [{"prompt": r["instruction"], "completion": r["output"], "text": f"{r['instruction']} {r['output']}"}
            for r in instruction_rows(20)]  # fmt: skip
    data = write(tmp_path / "d.json", rows)
    tokenizer = load_tokenizer(str(tiny_model_dir))

    def mode(*flags):
        return prepare_data(parse_config(TrainConfig, argv(tmp_path, data, tiny_model_dir, *flags), "train.py"),
                            tokenizer)  # fmt: skip

    assert mode().mode == "instruction"  # auto: prompt/completion columns
    as_text = mode("--format", "text")
    assert as_text.mode == "text" and as_text.template is None and not as_text.train.masked
    as_chat = mode("--format", "chat")  # an instruction record put to a chat run is one exchange
    assert as_chat.mode == "chat" and as_chat.train.masked
    every = [*as_chat.read(as_chat.split.train_idx), *as_chat.read(as_chat.split.val_idx)]
    assert sorted(r.messages for r in every) == sorted(
        (("user", r["prompt"]), ("assistant", r["completion"])) for r in rows
    )
    text_only = write(tmp_path / "t.json", [{"text": r["text"]} for r in rows])
    line = one_error_line(capsys, train_main, argv(tmp_path, text_only, tiny_model_dir, "--format", "chat"))
    assert "record 0: 'messages' is missing" in line


def test_validation_data_file(tmp_path, tiny_model_dir):
    train_rows, val_rows = instruction_rows(20, seed=1), instruction_rows(6, seed=2)
    data, val = write(tmp_path / "d.json", train_rows), tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in val_rows))
    train_main(argv(tmp_path, data, tiny_model_dir, "--validation-data", val, "--max-steps", "1", "--rank-lora", "4"))
    split = json.loads((tmp_path / "ckpt" / "step-000001" / "split.json").read_text())
    assert (split["n_train"], split["n_validation"]) == (20, 6)
    cfg = parse_config(TrainConfig, argv(tmp_path, data, tiny_model_dir, "--validation-data", val), "train.py")
    prepared = prepare_data(cfg, load_tokenizer(str(tiny_model_dir)))
    assert [r.instruction for r in prepared.read(prepared.split.val_idx)] == [r["instruction"] for r in val_rows]
    assert [r.instruction for r in prepared.read(prepared.split.train_idx)] == [r["instruction"] for r in train_rows]


@pytest.mark.slow
def test_full_fine_tuning_on_chat_then_export(tmp_path, tiny_model_dir, capsys):
    """--qlora False on chat records (the default chat template, GPT-2 has none); export carries the template:
    the tokenizer's chat_template prompts as training did, and inference --instruction works on the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write(tmp_path / "chat.json", chat_rows(20))
    train_main(argv(tmp_path, data, tiny_model_dir, "--qlora", "False", "--max-steps", "1"))
    out = tmp_path / "run"
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "run_config.json").read_text())["data"]["template_used"]["chat_template"] == (
        DEFAULT_CHAT_TEMPLATE
    )
    capsys.readouterr()
    inference_main(["--model_path", str(out), "--instruction", "Say hi", "--max_length", "5"])
    assert "<|user|>" not in capsys.readouterr().out

    # an instruction run's adapter, exported: the Alpaca-style prompt through apply_chat_template
    data = write(tmp_path / "d.json", instruction_rows(20))
    train_main(argv(tmp_path, data, tiny_model_dir, "--max-steps", "1", "--rank-lora", "4", run="lora", ckpt="ckpt2"))
    main(["export", "--model_path", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi"}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    assert text == tokenizer.eos_token + TEMPLATES["plain"].prompt(Instruction("Say hi", "-"))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").generation_config.eos_token_id == (
        tokenizer.eos_token_id
    )
    capsys.readouterr()
    inference_main(["--model_path", str(tmp_path / "merged"), "--instruction", "Say hi", "--max_length", "5"])
    assert "###" not in capsys.readouterr().out


def test_instruction_flags_are_checked(tmp_path, capsys):
    for args, message in [(["--instruction", "a", "--prompt", "b"], "exclude each other"),
                          (["--input", "x"], "give --instruction too")]:  # fmt: skip
        with pytest.raises(SystemExit) as e:
            inference_main(["--model_path", str(tmp_path), *args])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_chat_record_rendering_is_the_record(tmp_path, tiny_model_dir):
    """Chat data renders through the tokenizer's template (the default here) and keeps every turn."""
    data = write(tmp_path / "chat.json", chat_rows(12))
    cfg = parse_config(TrainConfig, argv(tmp_path, data, tiny_model_dir), "train.py")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prepared = prepare_data(cfg, tokenizer)
    record, ids = prepared.read(prepared.train.record[:1])[0], prepared.train.ids(0).tolist()
    assert isinstance(record, Chat)
    text = tokenizer.decode(ids)
    assert text == tokenizer.eos_token + tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in record.messages], chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False
    )
