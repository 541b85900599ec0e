"""Sequences past the model's context (128 tokens for the tiny GPT-2): one error line and exit 2 at the start
of training or generation, never an IndexError mid-way; `--truncate-prompt` keeps the prompt's last tokens."""

import logging

import pytest

from qlora_ft.cli import inference_main, train_main

LONG_PROMPT = "She was " * 100  # 200 tokens and more with the tiny tokenizer


def one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def train_argv(data, model, tmp_path, *extra):
    return ["--data", str(data), "--model", str(model), "--max-steps", "1", "--batch-size", "2",
            "--output-dir", str(tmp_path / "run"), "--check-dir", str(tmp_path / "ckpt"), *extra]  # fmt: skip


def test_training_sequences_past_the_context_fail_at_start(tiny_model_dir, data_pkl, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(train_argv(data_pkl, tiny_model_dir, tmp_path, "--max-input-length", "1000"))
    assert e.value.code == 2
    line = one_error_line(capsys, "train.py")
    assert "--max-input-length 1000" in line and "context of 128 tokens" in line
    assert not (tmp_path / "run").exists()  # failed before anything was written


def test_in_training_samples_past_the_context_fail_at_start(tiny_model_dir, data_pkl, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(train_argv(data_pkl, tiny_model_dir, tmp_path, "--max-input-length", "32", "--sample-every", "1",
                              "--sample-prompts", "It was", "--max-output-length", "128"))  # fmt: skip
    assert e.value.code == 2
    line = one_error_line(capsys, "train.py")
    assert "--max-output-length 128" in line and "context of 128 tokens" in line


@pytest.mark.parametrize(
    "flags", [["--prompt", LONG_PROMPT], ["--max_length", "128"]], ids=["long-prompt", "too-many-new-tokens"]
)
def test_generation_past_the_context_is_one_error_line(tiny_model_dir, capsys, flags):
    with pytest.raises(SystemExit) as e:
        inference_main(["--model_path", str(tiny_model_dir), "--n_return_seqs", "1", "--max_length", "10", *flags])
    assert e.value.code == 2
    assert "context of 128" in one_error_line(capsys, "inference.py")


def test_truncate_prompt_keeps_the_last_tokens_and_warns_once(tiny_model_dir, capsys, caplog):
    from transformers import AutoTokenizer

    caplog.set_level(logging.WARNING)
    prompt = LONG_PROMPT + "Elizabeth Darcy"
    inference_main(["--model_path", str(tiny_model_dir), "--prompt", prompt, "--max_length", "8",
                    "--n_return_seqs", "1", "--truncate-prompt"])  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "kept its last 120 of" in warnings[0], warnings
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[1] ")]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tail = tokenizer.decode(tokenizer(prompt, add_special_tokens=False)["input_ids"][-120:]).strip()
    assert tail.endswith("Elizabeth Darcy") and line[4:].startswith(tail)  # the prompt's last 120 tokens, continued
