"""Serving an export with `transformers serve` (transformers' OpenAI-compatible server): asked through the `openai`
client at temperature 0, it answers as the package does on the run, `inference.py --instruction` for an instruction
run and `qlora-ft chat --do-sample False` for a chat run (docs/serving.md)."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import shared_or_skip
from qlora_ft.chat import chat_prompt, pipe_block
from qlora_ft.cli import main, train_main
from qlora_ft.data.prepare import read_template
from qlora_ft.generate import complete, stop_strings
from qlora_ft.model import load_for_inference
from qlora_ft.templates import cut_at_stop

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai", reason="the serving extra is not installed (pip install -e '.[serving]')")
if not pytest.importorskip("transformers.utils.import_utils").is_serve_available():
    pytest.skip("transformers serve's dependencies are missing (pip install -e '.[serving]')", allow_module_level=True)

MAX_TOKENS = 24  # --max_length on the package's side, max_tokens on the server's: the same greedy tokens
SYSTEM = "You are a helpful assistant."
N_TRAIN = 48  # records each tiny run trains on
# Where the package's prompt and the exported chat template (rendered as one text by the server) may give different
# token ids: none since training tokenizes the rendered template whole (the empty system prompt and the user turn
# ending in a newline, which differed before, are kept as cases).
KNOWN_DIFFERENCES: set[str] = set()


def _records() -> list[dict]:
    path = shared_or_skip("data", "instructions", "instruction-data.json")
    return json.loads(path.read_text())


def _as_chat(record: dict, system: str | None) -> dict:
    """An Alpaca record as a one-turn conversation (the input on its own paragraph after the instruction)."""
    user = f"{record['instruction']}\n\n{record['input']}" if record["input"].strip() else record["instruction"]
    turns = [("system", system)] * (system is not None) + [("user", user), ("assistant", record["output"])]
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def _train_and_export(tmp: Path, name: str, data: Path) -> tuple[Path, Path]:
    model = shared_or_skip("models", "mini-gpt2-fiction")
    train_main(["--data", str(data), "--model", str(model), "--max-steps", "2", "--batch-size", "2",
                "--max-input-length", "256", "--eval-max-tokens", "256", "--sample-every", "0",
                "--output-dir", str(tmp / name), "--check-dir", str(tmp / f"{name}-checkpoints"),
                "--cache-dir", str(tmp / "cache")])  # fmt: skip
    main(["export", "--model_path", str(tmp / name), "--out", str(tmp / f"{name}-export")])
    return tmp / name, tmp / f"{name}-export"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(run, export) of an instruction run and of a chat run (with and without a system prompt) on the mini model."""
    tmp = tmp_path_factory.mktemp("serving")
    records = _records()[:N_TRAIN]
    (tmp / "instructions.json").write_text(json.dumps(records))
    chats = [_as_chat(r, SYSTEM if i % 2 else None) for i, r in enumerate(records)]
    (tmp / "chats.json").write_text(json.dumps(chats))
    return {"instruction": _train_and_export(tmp, "instruction", tmp / "instructions.json"),
            "chat": _train_and_export(tmp, "chat", tmp / "chats.json")}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`transformers serve` on CPU on a free local port (models loaded by the path a request names); killed at the
    end, whatever happens."""
    transformers_cli = Path(sys.executable).parent / "transformers"
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen([str(transformers_cli), "serve", "--device", "cpu", "--host", "127.0.0.1",
                                    "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"transformers serve did not start:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=300, max_retries=0)
    finally:
        process.kill()
        process.wait(timeout=30)


def _served(client, export: Path, messages: list[dict], stop: tuple[str, ...]) -> str:
    """The server's greedy answer as a client takes it: the template's stop strings sent as `stop`, and the
    answer cut at them (the server stops generating there but keeps the stop string in the text)."""
    answer = client.chat.completions.create(model=str(export), messages=messages, temperature=0,
                                            max_tokens=MAX_TOKENS, stop=list(stop))  # fmt: skip
    return cut_at_stop(answer.choices[0].message.content, stop).strip()


def test_an_instruction_export_serves_the_answers_of_inference_py(runs, server, capsys):
    """Three instructions, and two records with an input, which an instruction run's export prompts as one
    instruction (its chat template has no place for an input): the instruction, a blank line, the input."""
    run, export = runs["instruction"]
    stop = read_template(run).stop  # an instruction template's
    held_out = _records()[N_TRAIN:]
    asked = [r["instruction"] for r in held_out if not r["input"]][:3]
    asked += [f"{r['instruction']}\n\n{r['input']}" for r in held_out if r["input"]][:2]
    for instruction in asked:
        capsys.readouterr()
        main(["generate", "--model_path", str(run), "--instruction", instruction, "--max_length", str(MAX_TOKENS)])
        package = capsys.readouterr().out
        served = _served(server, export, [{"role": "user", "content": instruction}], stop)
        assert served + "\n" == package, instruction


def _chat_cli(monkeypatch, capsys, run: Path, lines: list[str], *flags: str) -> list[str]:
    """`qlora-ft chat --do-sample False` from a pipe, one conversation a line (`/reset` between): each reply."""
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n/reset\n" for line in lines)))
    capsys.readouterr()
    main(["chat", "--model_path", str(run), "--do-sample", "False", "--max_length", str(MAX_TOKENS), *flags])
    replies, body = [], []
    for line in capsys.readouterr().out.splitlines():  # each reply: its non-blank lines, then a blank line
        if line:
            body.append(line)
        else:
            replies.append(pipe_block("\n".join(body)))
            body = []
    assert len(replies) == len(lines) and not body
    return replies


def test_a_chat_export_serves_the_replies_of_qlora_ft_chat(runs, server, monkeypatch, capsys):
    run, export = runs["chat"]
    template = read_template(run)
    users = [r["instruction"] for r in _records()[N_TRAIN:] if not r["input"]][:5]
    cases = {}  # name -> (messages, the package's reply as the chat prints it to a pipe)
    for system, chosen, flags in ((None, users[:3], ()), (SYSTEM, users[3:], ("--system", SYSTEM)),
                                  ("", users[:1], ("--system", ""))):  # fmt: skip
        for user, reply in zip(chosen, _chat_cli(monkeypatch, capsys, run, chosen, *flags), strict=True):
            name = "an empty system prompt" if system == "" else f"{user!r}, system prompt {system!r}"
            turns = [("system", system)] * (system is not None) + [("user", user)]
            cases[name] = (turns, reply)
    # a line read by `qlora-ft chat` cannot end in a newline: the reply its session gives such a turn
    model, tokenizer = load_for_inference(str(run), None, False, torch.device("cpu"))
    turns = [("user", users[0] + "\n")]
    reply = complete(model, tokenizer, chat_prompt(turns, template, tokenizer), stop_strings(template, tokenizer),
                     MAX_TOKENS, truncate=True)[0]  # fmt: skip
    cases["a user turn ending in a newline"] = (turns, pipe_block(reply))

    stop = stop_strings(template, tokenizer)
    differing = set()
    for name, (turns, package) in cases.items():
        messages = [{"role": role, "content": content} for role, content in turns]
        if pipe_block(_served(server, export, messages, stop)) != package:
            differing.add(name)
    print(f"the server answers differently for {sorted(differing) or 'none'}")  # shown by pytest -rP
    assert differing <= KNOWN_DIFFERENCES, f"the server answers differently for {sorted(differing)}"
