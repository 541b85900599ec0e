"""`qlora-ft eval` on instruction and chat runs: response perplexity, greedy answers, ROUGE-L, format adherence."""

import json
import math
import random

import pytest
import torch

from conftest import WORDS, ListWindows, shared_or_skip
from qlora_ft.cli import inference_main, main, train_main

CPU = torch.device("cpu")
EOS = "<|endoftext|>"
# the `plain` template, written out here so the hand computations below do not depend on the package's copy
PLAIN = "### Instruction:\n{instruction}\n\n### Response:\n"
PLAIN_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
HEADERS = ("### Instruction:", "### Input:", "### Response:")


def words(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def instruction_rows(n, seed=0):
    rng = random.Random(seed)
    return [{"instruction": f"{words(rng, 2, 5)} {i}?", "input": words(rng, 1, 4) if i % 3 == 0 else "",
             "output": f"{words(rng, 1, 6)}."} for i in range(n)]  # fmt: skip


def chat_rows(n, seed=0):
    rng = random.Random(seed)
    turns = [[("user", f"{words(rng, 1, 3)} {i}"), ("assistant", words(rng, 1, 3))]
             + [("user", "and"), ("assistant", words(rng, 1, 2))] * (i % 2) for i in range(n)]  # fmt: skip
    return [{"messages": [{"role": r, "content": c} for r, c in t]} for t in turns]


def train_run(work, rows, model_dir, *extra):
    """A tiny QLoRA run on `rows` through the CLI: 4 steps at a high learning rate, a quarter held out."""
    work.mkdir(parents=True, exist_ok=True)
    data = work / "records.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    train_main(["--data", str(data), "--model", str(model_dir), "--batch-size", "4", "--max-input-length", "96",
                "--train-size", "0.75", "--max-steps", "4", "--lr", "1e-2", "--warmup-steps", "1",
                "--sample-every", "0", "--check-dir", str(work / "ckpt"), "--output-dir", str(work / "run"),
                *extra])  # fmt: skip
    return work / "run"


def as_row(record):
    """An instruction or chat record as the row it was read from."""
    if hasattr(record, "messages"):
        return {"messages": [{"role": role, "content": content} for role, content in record.messages]}
    return {"instruction": record.instruction, "input": record.input, "output": record.output}


def validation_rows(run, rows):
    """The run's validation records as training reads them: its saved configuration through the data road,
    checked against the split its checkpoint saved. The rows are distinct, so record i of the cache is rows[i]."""
    from qlora_ft.config import train_config_from_dict
    from qlora_ft.data.prepare import prepare_data, read_template
    from qlora_ft.model import load_tokenizer

    latest = (run.parent / "ckpt" / "latest").read_text().strip()
    split = json.loads((run.parent / "ckpt" / latest / "split.json").read_text())
    cfg = train_config_from_dict(json.loads((run / "run_config.json").read_text()))
    data = prepare_data(cfg, load_tokenizer(str(run)), split, read_template(run))
    held_out = [rows[i] for i in data.split.val_idx]
    assert len(held_out) == split["n_validation"]
    assert [as_row(r) for r in data.read(data.split.val_idx)] == held_out
    return held_out


@pytest.fixture(scope="module")
def instruction_run(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("instruction-eval")
    rows = instruction_rows(24)
    return train_run(work, rows, tiny_model_dir, "--template", "plain"), rows


def response_nll(model, tokenizer, prompt: str, response: str) -> tuple[float, int]:
    """(summed next-token loss over the response and its EOS, their count) by hand: `<eos>` + prompt + response."""
    prompt_ids = [tokenizer.eos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    target_ids = [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + target_ids])
    with torch.no_grad():
        log_p = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)  # (T-1, V)
    positions = range(len(prompt_ids) - 1, ids.shape[1] - 1)  # each predicts the next token, a target
    return -sum(float(log_p[t, ids[0, t + 1]]) for t in positions), len(target_ids)


def perplexity_by_hand(model, tokenizer, records) -> float:
    nll, n = 0.0, 0
    for r in records:
        prompt = (PLAIN_INPUT if r["input"] else PLAIN).format(**r)
        loss, count = response_nll(model, tokenizer, prompt, r["output"])
        nll, n = nll + loss, n + count
    return math.exp(nll / n)


def test_response_perplexity_of_a_bf16_model_sums_in_float32(tiny_model_dir):
    """A 16-bit model scored without autocast (eval's merged model on a GPU) still sums its log-probabilities
    in float32: the same loss as cross-entropy over its logits upcast first."""
    from transformers import AutoModelForCausalLM

    from qlora_ft.data.batches import held_out_batches
    from qlora_ft.evaluate import _response_perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    rng = random.Random(0)
    ids = [[rng.randrange(1, 300) for _ in range(rng.randint(20, 60))] for _ in range(8)]
    masks = [[0] * 8 + [1] * (len(s) - 8) for s in ids]  # a prompt of 8 tokens, then the response
    batches = held_out_batches(ListWindows(ids, masks), pad_id=0, batch_size=4)
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            targets = b["labels"][:, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits[:, :-1][targets != -100], targets[targets != -100],
                                                           reduction="sum"))  # fmt: skip
            n += int((targets != -100).sum())
    result = {}
    _response_perplexity({"base": model, "fine_tuned": model}, batches, result)
    assert result["response_loss"]["base"] == pytest.approx(nll / n, rel=1e-5)  # bf16 sums were ~0.5% off
    assert result["response_perplexity"]["base"] == pytest.approx(math.exp(nll / n), rel=1e-5)


@pytest.mark.slow
def test_eval_of_an_instruction_run(instruction_run, tiny_model_dir, tmp_path, capsys):
    """Through the CLI: the run's own validation records, response perplexity as computed by hand with
    transformers + peft, greedy answers as `generate --instruction` gives them, ROUGE-L and format
    consistent with the answers, and eval.md / report.md with every reference."""
    from peft import PeftModel
    from rouge_score import rouge_scorer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_ft.model import keep_training_layout, load_base

    run, rows = instruction_run
    out = tmp_path / "eval"
    main(["eval", "--model_path", str(run), "--n-prompts", "4", "--max-length", "12", "--out-dir", str(out),
          "--contrast", str(tmp_path / "unused.txt")])  # fmt: skip
    assert "ignored for instruction runs: --contrast" in capsys.readouterr().err
    result = json.loads((out / "eval.json").read_text())
    held_out = validation_rows(run, rows)
    assert result["mode"] == "instruction" and result["template"] == "plain"
    assert result["held_out"]["records"] == len(held_out) == 6 and result["held_out"]["dropped_too_long"] == 0
    answered = result["responses"]
    assert [(a["instruction"], a["input"], a["reference"]) for a in answered] == [
        (r["instruction"], r["input"], r["output"]) for r in held_out[:4]
    ]

    # response perplexity by hand: the base, and the model as trained (NF4 base + the unmerged adapter)
    tokenizer = AutoTokenizer.from_pretrained(run)
    ppl = result["response_perplexity"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert ppl["base"] == pytest.approx(perplexity_by_hand(base, tokenizer, held_out), rel=1e-5)
    nf4 = load_base(str(tiny_model_dir), True, torch.float32, CPU)
    keep_training_layout(nf4)
    trained = PeftModel.from_pretrained(nf4, str(run)).eval()
    assert ppl["fine_tuned"] == pytest.approx(perplexity_by_hand(trained, tokenizer, held_out), rel=1e-4)
    summary = json.loads((run / "train_summary.json").read_text())
    assert ppl["fine_tuned"] == pytest.approx(summary["final_val_perplexity"], rel=1e-4)  # training's validation
    assert ppl["fine_tuned"] < ppl["base"]  # 4 steps at a high learning rate

    # answers: the fine-tuned one is what `qlora-ft generate --instruction` prints
    first = held_out[0]
    inference_main(["--model_path", str(run), "--instruction", first["instruction"], "--input", first["input"],
                    "--max_length", "12"])  # fmt: skip
    assert capsys.readouterr().out.strip() == answered[0]["fine_tuned"]["response"]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for name in ("base", "fine_tuned"):
        answers = [a[name] for a in answered]
        for a, item in zip(answers, answered, strict=True):
            assert a["rouge_l"] == pytest.approx(scorer.score(item["reference"], a["response"])["rougeL"].fmeasure)
            assert a["repeated_header"] == any(h in a["generated"] for h in HEADERS)
            assert a["new_tokens"] == 12 if not a["ended_with_eos"] else a["new_tokens"] <= 12  # stops at EOS
            assert a["format_ok"] == (a["ended_with_eos"] and not a["repeated_header"])
            assert a["response"] == a["generated"].split("\n###")[0].strip()
        assert result["rouge_l"][name] == pytest.approx(sum(a["rouge_l"] for a in answers) / 4)
        shares = result["format"][name]
        assert shares["adherence"] == sum(a["format_ok"] for a in answers) / 4
        assert shares["ended_with_eos"] == sum(a["ended_with_eos"] for a in answers) / 4
        assert all(0.0 <= v <= 1.0 for v in [*shares.values(), result["rouge_l"][name]])

    md = (out / "eval.md").read_text()
    assert "| response perplexity (held-out responses) |" in md and "| format adherence |" in md
    for item in answered:
        assert f"> {item['reference']}" in md and f"> {item['instruction']}" in md
    assert "## Evaluation" in (out / "report.md").read_text() and (out / "eval.png").stat().st_size > 1000
    assert not (run / "eval.json").exists()  # --out-dir was given


@pytest.mark.slow
@pytest.mark.slow
def test_eval_of_a_fully_fine_tuned_instruction_run(tmp_path, tiny_model_dir, capsys):
    """A fully fine-tuned run (no adapter: its output folder is a model) is scored like an adapter run: the base
    named in its configuration, the model loaded as transformers loads it; a text run without an adapter is
    refused in one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = instruction_rows(24)
    run = train_run(tmp_path / "full", rows, tiny_model_dir, "--qlora", "False", "--lora", "False", "--template",
                    "plain")  # fmt: skip
    main(["eval", "--model_path", str(run), "--n-prompts", "2", "--max-length", "8"])
    result = json.loads((run / "eval.json").read_text())
    assert result["method"] == "full fine-tuning" and result["base_model"] == str(tiny_model_dir)
    assert result["generation"]["fine_tuned_model"] == "fully fine-tuned model"
    tuned = AutoModelForCausalLM.from_pretrained(run).eval()
    held_out = validation_rows(run, rows)
    tokenizer = AutoTokenizer.from_pretrained(run)
    by_hand = perplexity_by_hand(tuned, tokenizer, held_out)
    assert result["response_perplexity"]["fine_tuned"] == pytest.approx(by_hand, rel=1e-4)

    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(f"{words(random.Random(i), 6, 12)}." for i in range(30)))
    train_main(["--data", str(text), "--model", str(tiny_model_dir), "--qlora", "False", "--lora", "False",
                "--max-steps", "1", "--max-input-length", "64", "--sample-every", "0", "--check-dir",
                str(tmp_path / "ckpt-text"),
                "--output-dir", str(tmp_path / "text")])  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model_path", str(tmp_path / "text")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "fully fine-tuned text run" in err[0], err


def test_eval_with_data_holds_out_every_record(instruction_run, tmp_path):
    """--data: every distinct record of the file, through the run's template; over-long ones left out, counted."""
    run, _ = instruction_run
    rows = instruction_rows(5, seed=7)
    rows.append(dict(rows[0]))  # a duplicate, kept once
    rows.append({"instruction": "Retell it.", "input": "", "output": " ".join(["the letter"] * 80)})  # > 96 tokens
    data = tmp_path / "held.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    main(["eval", "--model_path", str(run), "--data", str(data), "--n-prompts", "2", "--max-length", "4",
          "--out-dir", str(tmp_path / "eval")])  # fmt: skip
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["held_out"] == {**result["held_out"], "source": str(data), "records": 5, "dropped_too_long": 1}
    assert [a["instruction"] for a in result["responses"]] == [r["instruction"] for r in rows[:2]]


@pytest.mark.slow
def test_eval_of_a_chat_run_answers_the_last_assistant_turn(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    rows = chat_rows(24)
    run = train_run(tmp_path / "chat", rows, tiny_model_dir)
    main(["eval", "--model_path", str(run), "--max-length", "6", "--out-dir", str(tmp_path / "eval")])
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    held_out = validation_rows(run, rows)
    assert result["mode"] == "chat" and result["generation"]["n_prompts"] == len(held_out) == 6
    for item, row in zip(result["responses"], held_out, strict=True):
        assert item["messages"] == row["messages"][:-1] and item["reference"] == row["messages"][-1]["content"]
        assert item["prompt"].endswith("<|assistant|>\n")  # the conversation so far + the assistant header
    # every assistant turn of every held-out conversation is scored, each with its EOS
    tokenizer = AutoTokenizer.from_pretrained(run)
    targets = sum(len(tokenizer(m["content"])["input_ids"]) + 1 for r in held_out for m in r["messages"]
                  if m["role"] == "assistant")  # fmt: skip
    assert result["held_out"]["response_tokens"] == targets
    assert 1 < result["response_perplexity"]["fine_tuned"] < result["response_perplexity"]["base"]
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert all(f"> {item['reference']}" in md for item in result["responses"]) and "**user:**" in md


def test_eval_bad_data_on_an_instruction_run_exits_2_in_one_line(instruction_run, tmp_path, capsys):
    run, _ = instruction_run
    text = tmp_path / "paragraphs.txt"
    text.write_text("One paragraph of text.\n\nAnother paragraph.\n", encoding="utf-8")
    no_output = tmp_path / "no-output.json"
    no_output.write_text(json.dumps([{"instruction": "Say hi.", "input": ""}]), encoding="utf-8")
    chats = tmp_path / "chats.json"
    chats.write_text(json.dumps(chat_rows(3)), encoding="utf-8")
    cases = [(text, "holds plain text, not instruction records"), (no_output, "record 0: 'output' is missing"),
             (chats, "holds chat records, but this run was trained on instruction records")]  # fmt: skip
    for data, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--model_path", str(run), "--data", str(data), "--out-dir", str(tmp_path / "eval")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and message in err[0] and str(data) in err[0], err
    assert not (tmp_path / "eval").exists()  # nothing written


@pytest.mark.slow
def test_eval_on_the_shared_instruction_data(tmp_path):
    """mini-gpt2-fiction briefly tuned on the shared Alpaca-style records: its validation split scored."""
    model = shared_or_skip("models", "mini-gpt2-fiction")
    data = shared_or_skip("data", "instructions", "instruction-data.json")
    train_main(["--data", str(data), "--model", str(model), "--max-steps", "1", "--batch-size", "2",
                "--max-input-length", "160", "--train-size", "0.98", "--sample-every", "0",
                "--check-dir", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "run")])  # fmt: skip
    main(["eval", "--model_path", str(tmp_path / "run"), "--n-prompts", "2", "--max-length", "16",
          "--batch-size", "8"])  # fmt: skip
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert result["template"] == "alpaca" and len(result["responses"]) == 2
    latest = (tmp_path / "ckpt" / "latest").read_text().strip()
    split = json.loads((tmp_path / "ckpt" / latest / "split.json").read_text())
    assert result["held_out"]["records"] + result["held_out"]["dropped_too_long"] == split["n_validation"]
    assert result["response_perplexity"]["fine_tuned"] == pytest.approx(summary["final_val_perplexity"], rel=1e-3)
    assert "### Held-out records" in (tmp_path / "run" / "eval.md").read_text()
