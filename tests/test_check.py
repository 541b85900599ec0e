"""`qlora-ft check`: the report reads train's own road, so its counts equal what a training run of the same options
logs, for every data kind; a warm start logs the reader's drop counts too; bad data exits 2 as train does."""

from __future__ import annotations

import json
import logging
import re

import pytest

from qlora_ft.check import format_report, run_check
from qlora_ft.cli import main
from qlora_ft.config import CheckConfig
from qlora_ft.options import parse_config
from tests.conftest import make_paragraphs

PARAGRAPHS = make_paragraphs(40, seed=3)
LONG = " ".join(PARAGRAPHS[:12])  # over 128 tokens: cut into windows, or a record left out


def book() -> str:
    parts = ["CHAPTER I", *PARAGRAPHS[:20], "VOLUME II", PARAGRAPHS[3], LONG, *PARAGRAPHS[20:], PARAGRAPHS[7]]
    return "\n\n".join(parts)


def alpaca() -> list[dict]:
    rows = [{"instruction": f"Say {p}", "input": "", "output": p.split()[0]} for p in PARAGRAPHS[:30]]
    return rows + [rows[4], {"instruction": "Repeat.", "input": LONG, "output": LONG}]


def prompt_completion() -> list[dict]:
    rows = [{"prompt": f"Q: {p}", "completion": " yes"} for p in PARAGRAPHS[:30]]
    return rows + [rows[2], rows[5], {"prompt": LONG, "completion": " no"}]


def chat() -> list[dict]:
    rows = [{"messages": [{"role": "user", "content": p[:30]}, {"role": "assistant", "content": p.split()[-1]}]}
            for p in PARAGRAPHS[:30]]  # fmt: skip
    return rows + [rows[1], {"messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": "x"}]}]


def write(tmp_path, kind: str):
    if kind == "text":
        (tmp_path / "book.txt").write_text(book())
        return tmp_path / "book.txt"
    rows = {"alpaca": alpaca, "prompt_completion": prompt_completion, "chat": chat}[kind]()
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def options(tmp_path, model, data, max_len: int = 128) -> list[str]:
    return ["--data", str(data), "--model", str(model), "--qlora", "False", "--lora", "True", "--rank-lora", "2",
            "--max-input-length", str(max_len), "--batch-size", "2", "--template", "plain", "--seed", "1",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip


def check(argv: list[str]) -> dict:
    return run_check(parse_config(CheckConfig, argv, "qlora-ft check"))


def train_log(tmp_path, argv: list[str], length: tuple[str, str] = ("--max-steps", "1")) -> list[str]:
    """The log messages of a training run with `argv`, of 1 step unless `length` says otherwise."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("qlora_ft")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        main(["train", *argv, *length, "--sample-every", "0", "--check-dir", str(tmp_path / "ckpt"),
              "--output-dir", str(tmp_path / "out")])  # fmt: skip
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return [r.getMessage() for r in records]


def logged(messages: list[str], pattern: str) -> list[tuple[int, ...]]:
    return [tuple(map(int, m.groups())) for m in (re.search(pattern, line) for line in messages) if m]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "alpaca", "prompt_completion", "chat"])
def test_counts_equal_what_training_logs(tmp_path, tiny_model_dir, kind, capsys):
    argv = options(tmp_path, tiny_model_dir, write(tmp_path, kind), 32 if kind == "text" else 128)
    report = check(argv)  # first: it builds the token cache, so training below is a warm start
    assert report["source"]["cache_built_now"]
    messages = train_log(tmp_path, argv)
    assert not any("built in" in m for m in messages)  # a warm start indeed
    r, split = report["read"], report["split"]
    ((n_train, n_val, w_train, w_val),) = logged(messages, r"data: (\d+) train / (\d+) validation .* -> (\d+) / (\d+)")
    assert (split["train_records"], split["validation_records"]) == (n_train, n_val)
    assert (split["train_sequences"], split["validation_sequences"]) == (w_train, w_val)
    assert [(r["duplicates"],)] == logged(messages, r"dropped (\d+) duplicate records")
    if kind == "text":  # the reader's counts, logged on this warm start from the cache's meta.json
        assert [(r["headings"],)] == logged(messages, r"dropped (\d+) heading-only paragraphs") == [(2,)]
        assert r["duplicates"] == 2 and r["heading_example"] == "CHAPTER I"
        assert r["cut"] > 0 and r["cut_example"]["windows"] > 1 and r["windows"] == w_train + w_val
        assert r["windows_from_cut"] == r["windows"] - (n_train + n_val - r["cut"])
        assert report["eos"]["responses"] == report["eos"]["ending_with_eos"] == n_train + n_val
    else:
        left_out = logged(messages, r"left out (\d+) of \d+ records longer than 128 tokens")
        over = r["over_length"]["train"] + r["over_length"]["validation"]
        assert over == sum(n for (n,) in left_out) == 1
        assert r["over_length_example"]["tokens"] > 128
        assert report["eos"]["ending_with_eos"] == report["eos"]["responses"] > 0
    assert 0 < report["loss_mask"]["trained_share"] <= 1


def test_report_text_json_and_markers(tmp_path, tiny_model_dir, capsys):
    """The CLI prints the report; --json the same data; trained tokens between [[ ]] in a pipe."""
    argv = options(tmp_path, tiny_model_dir, write(tmp_path, "alpaca"))
    main(["check", *argv, "--show", "1"])
    text = capsys.readouterr().out
    assert "format instruction (detected)" in text and "split:" in text and "responses end with <|endoftext|>" in text
    assert re.search(r"### Response:\n\[\[.+<\|endoftext\|>\]\]", text), text
    main(["check", *argv, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["source"]["format"] == "instruction" and len(report["examples"]) == 3
    assert format_report(report).splitlines()[0] == text.splitlines()[0]
    prompt, response = report["examples"][0][:2]
    assert not prompt[1] and response[1]  # (text, trained) runs
    assert "\x1b[1;32m" in format_report(report, colour=True)


def test_warns_when_few_tokens_are_trained(tmp_path, tiny_model_dir, caplog):
    rows = [{"instruction": f"{p} {p}", "output": "x"} for p in PARAGRAPHS[:20]]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = options(tmp_path, tiny_model_dir, tmp_path / "d.jsonl")
    report = check(argv)
    assert report["loss_mask"]["trained_share"] < 0.05
    assert any("of the training tokens are trained on" in w for w in report["warnings"])


def test_refuses_what_train_refuses(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"instruction": "Hi"}) + "\n")
    argv = options(tmp_path, tiny_model_dir, tmp_path / "bad.jsonl")
    with pytest.raises(SystemExit) as e:
        main(["check", *argv])
    assert e.value.code == 2
    assert "bad.jsonl: record 0: 'output' is missing" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_counts_what_the_run_does(tmp_path, tiny_model_dir):
    """train's plan line: steps, validations, sample rounds and checkpoints as the run then makes them."""
    argv = options(tmp_path, tiny_model_dir, write(tmp_path, "alpaca"))
    messages = train_log(tmp_path, [*argv, "--eval-every", "2", "--save-every-steps", "3"], ("--epochs", "1"))
    ((total, per_epoch, validations, samples, saves),) = logged(
        messages, r"plan: (\d+) optimizer steps \((\d+) an epoch\).* (\d+) validations, (\d+) sample rounds, (\d+) ch"
    )
    assert [(total,)] == [(per_epoch,)] == logged(messages, r"done: (\d+) steps") and total > 3
    assert validations == sum("| validation loss" in m for m in messages) == 1 + total // 2 + total % 2
    assert saves == sum(m.startswith("saved checkpoint") for m in messages) == total // 3 + 1
    assert samples == 0  # (--sample-every 0 in train_log)


@pytest.mark.slow
def test_plan_probe_reports_time_and_memory(tmp_path, tiny_model_dir, capsys):
    argv = options(tmp_path, tiny_model_dir, write(tmp_path, "text"), 32)
    main(["check", *argv, "--plan", "--probe-steps", "2", "--json", "--epochs", "2"])
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["total_steps"] == 2 * plan["steps_per_epoch"] > 0 and plan["tokens_per_step"] > 0
    assert plan["seconds"]["step"] > 0 and plan["expected_wall_seconds"] > plan["total_steps"] * plan["seconds"]["step"]
    assert 0 < plan["peak_memory_bytes"] < plan["device_memory_bytes"]
    assert plan["validations"] == 3 and plan["saves"] == 2  # base model, 2 epoch ends; Epoch_1, Epoch_2
