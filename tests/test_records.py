import json
import pickle
from typing import Any, NamedTuple

import datasets
import pandas as pd
import pytest

from conftest import build_tokenizer, shared_or_skip
from qlora_ft.data.records import Chat, Instruction, as_chat, data_mode, iter_paragraphs, iter_records, record_key
from qlora_ft.data.sources import resolve
from qlora_ft.errors import UserError


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


class Records(NamedTuple):
    format: str
    train: list[Any]
    validation: list[Any] | None = None


def load_records(path: str, format: str = "auto", text_column: str | None = None) -> Records:
    """A source's records as a run reads them: the mode --format names or its columns imply, then its records
    (paragraphs for text), each part of a pre-split source in turn."""
    src = resolve(path)
    mode = data_mode(src, format, text_column)

    def read(part):
        if mode == "text":
            return list(iter_paragraphs(src, text_column=text_column, part=part))
        return list(iter_records(src, mode, part))

    parts = src.parts()
    return Records(mode, read(None)) if parts is None else Records(mode, read(parts[0]), read(parts[1]))


ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Red."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]
INSTRUCTIONS = [Instruction("Name a colour.", "Red."), Instruction("Add the numbers.", "5", "2 and 3")]
CHATS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
                  {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 3+4?"},
                  {"role": "assistant", "content": "7"}]},
]  # fmt: skip
CHAT_RECORDS = [
    Chat((("user", "Hi"), ("assistant", "Hello"))),
    Chat((("system", "Be brief."), ("user", "2+3?"), ("assistant", "5"), ("user", "And 3+4?"), ("assistant", "7"))),
]


def write(path, rows):
    """`rows` written in the format `path`'s suffix names; a folder name ending in `.hf` is a saved dataset."""
    name = path.name
    if name.endswith(".json"):
        path.write_text(json.dumps(rows))
    elif name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif name.endswith(".csv"):
        pd.DataFrame([{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]).to_csv(
            path, index=False
        )
    elif name.endswith(".parquet"):
        pd.DataFrame(rows).to_parquet(path)
    elif name.endswith(".pkl"):
        path.write_bytes(pickle.dumps(rows))
    elif name.endswith(".df.pickle"):
        path.write_bytes(pickle.dumps(pd.DataFrame(rows)))
    elif name.endswith(".hf"):
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


FILE_KINDS = ["d.json", "d.jsonl", "d.csv", "d.parquet", "d.pkl", "d.df.pickle", "d.hf"]


@pytest.mark.parametrize("name", FILE_KINDS)
def test_instruction_records_from_every_file_type(tmp_path, name):
    assert load_records(write(tmp_path / name, ROWS)) == Records("instruction", INSTRUCTIONS)


@pytest.mark.parametrize("name", ["d.json", "d.jsonl", "d.csv", "d.parquet", "d.pkl", "d.hf"])
def test_chat_records_from_every_file_type(tmp_path, name):
    """CSV cells hold the message list as JSON text; parquet and saved datasets hold it as nested lists."""
    assert load_records(write(tmp_path / name, CHATS)) == Records("chat", CHAT_RECORDS)


@pytest.mark.parametrize("name", ["d.json", "d.jsonl", "d.parquet", "d.hf"])
def test_prompt_completion_columns_are_instructions(tmp_path, name):
    rows = [{"prompt": "Capital of France?", "completion": "Paris."}]
    assert load_records(write(tmp_path / name, rows)).train == [Instruction("Capital of France?", "Paris.")]


@pytest.mark.parametrize("name", FILE_KINDS)
def test_text_columns_are_read_as_paragraphs(tmp_path, name):
    path = write(tmp_path / name, [{"text": "First  paragraph."}, {"text": "Second one."}])
    assert load_records(path) == Records("text", ["First paragraph.", "Second one."])


def test_txt_is_text_and_cannot_be_forced_to_instructions(tmp_path):
    (tmp_path / "b.txt").write_text("It is a truth\nuniversally acknowledged.\n\nSecond.")
    assert load_records(str(tmp_path / "b.txt")) == Records("text", ["It is a truth universally acknowledged.",
                                                                     "Second."])  # fmt: skip
    with pytest.raises(UserError, match="plain text holds no instruction records"):
        load_records(str(tmp_path / "b.txt"), format="instruction")


def test_forced_formats(tmp_path):
    path = write(tmp_path / "d.json", [{**r, "text": r["output"]} for r in ROWS])
    assert load_records(path).format == "instruction"  # instruction columns win over a text column
    # as text, "5" is a heading-only paragraph (a lone numeral), dropped as from any text source
    assert load_records(path, format="text") == Records("text", ["Red."])
    assert load_records(path, text_column="instruction") == Records("text", ["Name a colour.", "Add the numbers."])
    # a chat run reads instruction records as one exchange each
    assert load_records(path, format="chat") == Records("chat", [as_chat(r) for r in INSTRUCTIONS])
    path = write(tmp_path / "t.json", [{"text": r["output"]} for r in ROWS])
    with pytest.raises(UserError, match=r"t\.json: record 0: 'messages' is missing"):
        load_records(path, format="chat")
    with pytest.raises(UserError, match="unknown data format 'alpaca'"):
        load_records(path, format="alpaca")


def test_split_sources_keep_their_split(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"train": ROWS[:1], "validation": ROWS[1:]}))
    assert load_records(str(path)) == Records("instruction", INSTRUCTIONS[:1], INSTRUCTIONS[1:])
    folder = tmp_path / "dd.hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(CHATS[:1]),
                          "validation": datasets.Dataset.from_list(CHATS[1:])}).save_to_disk(str(folder))  # fmt: skip
    assert load_records(str(folder)) == Records("chat", CHAT_RECORDS[:1], CHAT_RECORDS[1:])
    bad = {"train": ROWS, "validation": [{"instruction": "x"}]}
    path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match=r"^.*d\.json: validation record 0: 'output' is missing$"):
        load_records(str(path))


def test_json_lines_in_a_json_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert load_records(str(path)).train == INSTRUCTIONS


def test_column_dict_json(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"instruction": ["Name a colour."], "output": ["Red."]}))
    assert load_records(str(path)).train == INSTRUCTIONS[:1]


def _with(i, **change):
    """ROWS-like records, 20 of them, where record `i` has `change` applied (a None value removes the key)."""
    rows = [dict(ROWS[k % 2]) for k in range(20)]
    rows[i].update(change)
    rows[i] = {k: v for k, v in rows[i].items() if v is not None}
    return rows


@pytest.mark.parametrize(
    "name, rows, message",
    [
        ("d.json", _with(17, output=None), "record 17: 'output' is missing"),
        ("d.jsonl", _with(17, output=None), "record 17: 'output' is missing"),
        ("d.parquet", _with(17, output=None), "record 17: 'output' is missing"),
        ("d.json", _with(3, instruction=None), "record 3: 'instruction' is missing"),
        ("d.csv", _with(5, output=""), "record 5: 'output' is empty"),
        ("d.json", _with(4, output=5), "record 4: 'output' is int, not text"),
        ("d.json", _with(9, input=["a", "b"]), "record 9: 'input' is list, not text"),
        ("d.jsonl", [{"prompt": "Q?", "completion": 1.5}], "record 0: 'completion' is float, not text"),
        ("d.json", [ROWS[0], "just a string"], "record 1: a record must be an object with fields, not text"),
    ],
    ids=["missing-output-json", "missing-output-jsonl", "missing-output-parquet", "missing-instruction",
         "empty-output-csv", "int-output", "list-input", "float-completion", "not-an-object"],
)  # fmt: skip
def test_bad_instruction_record_names_index_and_field(tmp_path, name, rows, message):
    path = write(tmp_path / name, rows)
    with pytest.raises(UserError) as e:
        load_records(path)
    assert str(e.value) == f"{path}: {message}"


def _chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


@pytest.mark.parametrize(
    "rows, message",
    [
        ([CHATS[0], _chat(("user", "Hi"), ("bot", "Hello"))],
         "record 1: 'messages'[1]: 'role' 'bot' is not one of system, user, assistant"),
        ([_chat(("user", "Hi"), ("assistant", 3))], "record 0: 'messages'[1]: 'content' is int, not text"),
        ([{"messages": [{"role": "user"}]}], "record 0: 'messages'[0]: 'content' is missing"),
        ([{"messages": [{"content": "Hi"}]}], "record 0: 'messages'[0]: 'role' is missing"),
        ([CHATS[1], _chat(("system", "S"), ("user", "Hi"))], "record 1: 'messages' has no assistant turn (nothing "
                                                               "to train on)"),
        ([_chat(("assistant", "Hello"), ("user", "Hi"))],
         "record 0: 'messages'[0]: 'role' 'assistant' cannot open a conversation"),
        ([{"messages": "Hi"}], "record 0: 'messages' is text that is not a JSON list of {role, content}"),
        ([{"messages": {"role": "user"}}], "record 0: 'messages' is dict, not a list of {role, content}"),
    ],
    ids=["unknown-role", "non-string-content", "missing-content", "missing-role", "no-assistant-turn",
         "assistant-first", "string-messages", "dict-messages"],
)  # fmt: skip
def test_bad_chat_record_names_index_and_field(tmp_path, rows, message):
    path = write(tmp_path / "chats.json", rows)
    with pytest.raises(UserError) as e:
        load_records(path)
    assert str(e.value) == f"{path}: {message}"


@pytest.mark.parametrize("name, content", [("e.json", "[]"), ("e.jsonl", "\n"), ("s.json", '{"train": [], "val": []}')])
def test_empty_data_is_refused(tmp_path, tokenizer, name, content):
    from qlora_ft.config import TrainConfig
    from qlora_ft.data.prepare import prepare_data
    from qlora_ft.options import parse_config

    (tmp_path / name).write_text(content)
    cfg = parse_config(TrainConfig, ["--data", str(tmp_path / name), "--cache-dir", str(tmp_path / "c")], "train.py")
    with pytest.raises(UserError, match="the data is empty"):
        prepare_data(cfg, tokenizer)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("d.json", '[{"instruction": "x",', r"d\.json: not valid JSON \(line 1"),
        ("d.jsonl", '{"instruction": "x", "output": "y"}\n{oops}\n', r"d\.jsonl: line 2 is not valid JSON"),
        ("d.json", '[{"title": "x"}]', r"d\.json: no text column found among title"),
        ("d.pkl", None, r"d\.pkl: refusing to load os\.system"),
        ("d.xml", "<a/>", r"unknown data format '\.xml'"),
    ],
    ids=["bad-json", "bad-jsonl-line", "unknown-columns", "hostile-pickle", "unknown-suffix"],
)
def test_unreadable_sources(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:  # a pickle that would run a shell command if loaded with pickle.load
        path.write_bytes(b"cos\nsystem\n(S'echo owned'\ntR.")
    else:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_records(str(path))
    with pytest.raises(UserError, match="data file not found: nope/d.json"):
        load_records("nope/d.json")


def test_shared_instruction_data():
    path = shared_or_skip("data", "instructions", "instruction-data.json")
    records = load_records(str(path))
    assert records.format == "instruction" and records.validation is None
    assert len(records.train) == 1000
    assert sum(1 for r in records.train if r.input) == 294
    first = Instruction("Edit the following sentence for grammar.", "He goes to the park every day.",
                        input="He go to the park every day.")  # fmt: skip
    assert records.train[0] == first


def test_record_keys_tell_records_apart():
    keys = {record_key(r) for r in [*INSTRUCTIONS, *CHAT_RECORDS, Instruction("Name a colour.", "Red.", "x"), "Red."]}
    assert len(keys) == 6
    chat = Chat((("user", "Hi"), ("assistant", "Hé")))
    assert record_key(chat) == '{"messages": [["user", "Hi"], ["assistant", "Hé"]]}'


def test_a_bad_jsonl_line_among_the_first_is_named_not_taken_for_text(tmp_path, tiny_model_dir, capsys):
    """Format detection reads a sample of a JSONL file; a line in it that does not parse is named (file and
    line), not taken as a sign of plain text and then reported as a missing text column."""
    from qlora_ft.cli import train_main

    good = json.dumps({"instruction": "Name a colour.", "input": "", "output": "Blue."})
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\n{good}\n{{oops\n{good}\n")
    with pytest.raises(SystemExit) as stop:
        train_main(["--data", str(path), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "out"),
                    "--check-dir", str(tmp_path / "ck")])  # fmt: skip
    assert stop.value.code == 2
    assert "d.jsonl: line 3 is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()


def test_keep_headings_on_records_warns_that_it_does_nothing(tmp_path, caplog, tokenizer):
    from qlora_ft.config import TrainConfig
    from qlora_ft.data.prepare import prepare_data
    from qlora_ft.options import parse_config

    path = write(tmp_path / "d.json", ROWS * 3)
    cfg = parse_config(TrainConfig, ["--data", path, "--keep-headings", "--template", "plain"], "train.py")
    caplog.set_level("WARNING", logger="qlora_ft")
    prepare_data(cfg, tokenizer)
    assert "--keep-headings: no effect" in caplog.text and "instruction records" in caplog.text
