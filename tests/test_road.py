"""The data road end to end: every mode through the token cache, the split's identity across versions and rules."""

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tokenizer, make_paragraphs
from qlora_ft.config import TrainConfig
from qlora_ft.data import records as rec
from qlora_ft.data.cache import fingerprint
from qlora_ft.data.encode import backend_json, encode, prompt_ids, render
from qlora_ft.data.prepare import Recipe, open_cache, prepare_data
from qlora_ft.data.split import Split
from qlora_ft.errors import UserError
from qlora_ft.options import parse_config


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def instruction_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    words = "apple river stone light quiet green tall seven".split()
    return [{"instruction": f"Task {i}: " + " ".join(rng.choices(words, k=4)),
             "input": " ".join(rng.choices(words, k=3)) if i % 3 else "",
             "output": " ".join(rng.choices(words, k=rng.randint(2, 9)))} for i in range(n)]  # fmt: skip


def chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "system", "content": ""}, {"role": "user", "content": f"Question {i}?\n"},
                          {"role": "assistant", "content": f"Answer {i}."}, {"role": "user", "content": "More?"},
                          {"role": "assistant", "content": f"Yes, {i}."}]} for i in range(n)]  # fmt: skip


def config(tmp_path, data, *flags) -> TrainConfig:
    argv = ["--data", str(data), "--model", "unused", "--cache-dir", str(tmp_path / "cache"), *map(str, flags)]
    return parse_config(TrainConfig, argv, "train.py")


@pytest.mark.parametrize("rows", [instruction_rows, chat_rows])
def test_records_train_from_the_token_cache(tmp_path, tokenizer, rows):
    """Instruction and chat records are tokenized once into the cache; a second start opens it. Each window holds
    exactly `encode(render(record))`, and its prompt is exactly what inference feeds the model (`prompt_ids`)."""
    data = tmp_path / "records.json"
    data.write_text(json.dumps(rows(40)))
    first = prepare_data(config(tmp_path, data), tokenizer)
    second = prepare_data(config(tmp_path, data), tokenizer)
    assert first.cache.built and not second.cache.built and first.cache.path == second.cache.path
    assert second.mode == ("instruction" if rows is instruction_rows else "chat")
    for windows in (second.train, second.validation):
        records = second.read(windows.record)
        for k, record in enumerate(records):
            ids, mask = encode(tokenizer, render(record, second.template, tokenizer))
            assert windows.ids(k).tolist() == ids and windows.mask(k).tolist() == mask
            assert windows.prompt(k) == prompt_ids(record, second.template, tokenizer)
    assert sorted([*second.split.train_idx, *second.split.val_idx]) == list(range(40))


def test_train_on_prompt_shares_the_cache_and_targets_every_token(tmp_path, tokenizer):
    data = tmp_path / "records.json"
    data.write_text(json.dumps(instruction_rows(20)))
    responses = prepare_data(config(tmp_path, data), tokenizer)
    every = prepare_data(config(tmp_path, data, "--train-on-prompt", "True"), tokenizer)
    assert every.cache.path == responses.cache.path and not every.cache.built
    from qlora_ft.data.batches import make_batch

    masked, whole = make_batch([[0]], responses.train, 0), make_batch([[0]], every.train, 0)
    n = len(responses.train.ids(0))
    assert int((whole["labels"] != -100).sum()) == n - 1  # every token after the leading EOS
    assert int((masked["labels"] != -100).sum()) == int(responses.train.mask(0).sum()) < n - 1


def test_the_rules_version_is_part_of_the_fingerprint(tmp_path, tokenizer, monkeypatch):
    """A cache tokenized under other paragraph rules is not reused: the rules' version is in its fingerprint."""
    (tmp_path / "book.txt").write_text("\n\n".join(["CHAPTER I", *make_paragraphs(30)]))
    before = open_cache(str(tmp_path / "book.txt"), tokenizer, Recipe(), cache_dir=tmp_path / "cache")
    monkeypatch.setattr(rec, "RULES_VERSION", rec.RULES_VERSION + 1)
    after = open_cache(str(tmp_path / "book.txt"), tokenizer, Recipe(), cache_dir=tmp_path / "cache")
    assert after.built and after.fingerprint != before.fingerprint
    assert before.meta["covers"]["rules"] == after.meta["covers"]["rules"] - 1


def text_data(tmp_path, tokenizer, *flags):
    paragraphs = make_paragraphs(60)  # and one twice: cache indices then differ from indices of distinct ones
    (tmp_path / "book.txt").write_text(
        "\n\n".join(["CHAPTER I", *paragraphs[:30], "IV", paragraphs[3], *paragraphs[30:]])
    )
    return prepare_data(config(tmp_path, tmp_path / "book.txt", *flags), tokenizer)


def earlier_covers(covers: dict, tokenizer) -> dict:
    """`covers` as earlier versions wrote them: the tokenizer as a hash of its whole serialized pipeline."""
    digest = hashlib.sha256(backend_json(tokenizer).encode("utf-8")).hexdigest()
    return {**covers, "tokenizer": {"class": type(tokenizer).__name__, "eos_id": tokenizer.eos_token_id,
                                    "vocab_size": len(tokenizer), "sha256": digest}}  # fmt: skip


def test_checkpoints_of_earlier_versions_still_resume(tmp_path, tokenizer):
    """Checkpoints of earlier versions name the fingerprint of their tokenizer digest, and for text the rules
    version (2; unnamed in the cache's first version): the same ids, so they resume; any other fingerprint, seed
    or share is refused."""
    records = tmp_path / "records.json"
    records.write_text(json.dumps(instruction_rows(30)))
    keys = lambda: pytest.fail("the records are not read for a fingerprinted split")  # noqa: E731
    data = text_data(tmp_path, tokenizer)
    then = earlier_covers(data.cache.meta["covers"], tokenizer)
    for covers in ({**then, "rules": 2}, {k: v for k, v in then.items() if k != "rules"}):
        data.split.check({**data.split.to_json(), "cache_fingerprint": fingerprint(covers)}, data.cache, keys)
    instructions = prepare_data(config(tmp_path, records), tokenizer)
    then = earlier_covers(instructions.cache.meta["covers"], tokenizer)
    instructions.split.check({**instructions.split.to_json(), "cache_fingerprint": fingerprint(then)},
                             instructions.cache, keys)  # fmt: skip
    saved = {**data.split.to_json(), "cache_fingerprint": fingerprint(then)}
    with pytest.raises(UserError, match="fingerprint changed"):
        data.split.check({**saved, "cache_fingerprint": "0" * 24}, data.cache, keys)
    with pytest.raises(UserError, match="--seed 7 \\(this run: 42\\)"):
        data.split.check({**saved, "seed": 7}, data.cache, keys)


def test_a_checkpoint_of_the_earlier_heading_rule_resumes_where_no_paragraph_changed(tmp_path, tokenizer):
    """A checkpoint whose text was read by the paragraph rules of version 2 resumes when no paragraph of the data
    reads differently now, and is refused in one line naming the change when one does ("Did." is kept now)."""
    data = text_data(tmp_path, tokenizer)
    covers = data.cache.meta["covers"]
    saved = {
        **data.split.to_json(),
        "cache_fingerprint": fingerprint({**earlier_covers(covers, tokenizer), "rules": 2}),
    }
    keys = lambda: pytest.fail("the records are not read for a fingerprinted split")  # noqa: E731
    data.split.check(saved, data.cache, keys)  # accepted: the same records
    (tmp_path / "book.txt").write_text((tmp_path / "book.txt").read_text() + "\n\nDid.")
    changed = prepare_data(config(tmp_path, tmp_path / "book.txt"), tokenizer)
    covers = {**earlier_covers(changed.cache.meta["covers"], tokenizer), "rules": 2}
    then = {
        **changed.split.to_json(),
        "cache_fingerprint": fingerprint(covers),
        "n_train": len(changed.split.train_idx) - 1,
    }
    with pytest.raises(UserError, match="paragraph rules of version 2") as e:
        changed.split.check(then, changed.cache, keys)
    assert "'Did.'" in str(e.value) and "\n" not in str(e.value)


def listed_split(paragraphs: list[str], seed: int, share: float) -> dict:
    """split.json as versions before the token cache wrote it: indices into the distinct paragraphs."""
    distinct = list(dict.fromkeys(paragraphs))
    order = list(range(len(distinct)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(distinct) * (1 - share)))
    digest = hashlib.sha256()
    for p in distinct:
        digest.update(p.encode() + b"\x00")
    return {"data_sha256": digest.hexdigest(), "n_paragraphs": len(distinct), "train": sorted(order[n_val:]),
            "validation": sorted(order[:n_val])}  # fmt: skip


def test_a_listed_split_of_earlier_versions_maps_onto_the_cache(tmp_path, tokenizer):
    """split.json of versions before the token cache listed indices into the distinct records: checked against the
    records read now and mapped onto the cache (where a record repeats, the indices differ), then kept as this
    version's split, which later checkpoints record by fingerprint, seed and share."""
    data = text_data(tmp_path, tokenizer)
    paragraphs = data.read(np.arange(data.cache.n_records))
    distinct = list(dict.fromkeys(paragraphs))
    assert len(distinct) < len(paragraphs)
    saved = listed_split(paragraphs, seed=42, share=0.9)  # the run's own seed and share
    resumed = prepare_data(config(tmp_path, tmp_path / "book.txt"), tokenizer, saved)
    assert data.read(resumed.split.val_idx) == [distinct[i] for i in saved["validation"]]
    assert data.read(resumed.split.train_idx) == [distinct[i] for i in saved["train"]]
    assert resumed.split.to_json() == data.split.to_json()
    other = listed_split(paragraphs, seed=3, share=0.9)  # same records, another split: not this version's
    with pytest.raises(UserError, match="split differs"):
        prepare_data(config(tmp_path, tmp_path / "book.txt"), tokenizer, other)
    changed = listed_split([*paragraphs, "IV"], seed=42, share=0.9)  # headings kept, as hub data once was
    with pytest.raises(UserError, match="rules") as e:
        prepare_data(config(tmp_path, tmp_path / "book.txt"), tokenizer, changed)
    assert "hub datasets" in str(e.value)


@pytest.mark.parametrize("mode", ["text", "instruction"])
def test_the_split_is_recomputed_from_the_data_seed_and_share_alone(tmp_path, tokenizer, mode):
    """The split, worked out from the records without the cache: distinct records (first occurrences), shuffled
    by `random.Random(seed)`, the first round(n x (1 - share)) validate. The same data, seed and share give it
    again in a fresh cache folder; another seed, or another share, gives another split."""
    rows = instruction_rows(40)
    rows[-1] = rows[5]  # a duplicate: kept once, at its first occurrence
    paragraphs = make_paragraphs(40)
    paragraphs[-1] = paragraphs[5]
    data = tmp_path / ("records.json" if mode == "instruction" else "book.txt")
    data.write_text(json.dumps(rows) if mode == "instruction" else "\n\n".join(paragraphs))

    def split(seed, share, cache):
        prepared = prepare_data(config(tmp_path, data, "--seed", seed, "--train-size", share, "--cache-dir",
                                       tmp_path / cache), tokenizer)  # fmt: skip
        return prepared.split.train_idx.tolist(), prepared.split.val_idx.tolist()

    first = {}
    for i, row in enumerate(rows if mode == "instruction" else paragraphs):
        first.setdefault(json.dumps(row, sort_keys=True), i)
    distinct = list(first.values())
    for seed, share in ((0, 0.8), (7, 0.8), (7, 0.5)):
        order = list(range(len(distinct)))
        random.Random(seed).shuffle(order)
        n_val = round(len(distinct) * (1 - share))
        expected = sorted(distinct[i] for i in order[n_val:]), sorted(distinct[i] for i in order[:n_val])
        assert split(seed, share, "cache") == expected == split(seed, share, f"fresh-{seed}-{share}")
    assert split(0, 0.8, "cache") != split(7, 0.8, "cache")


def test_one_split_type(tmp_path, tokenizer):
    """Text and records split into the same type, a function of (fingerprint, seed, share)."""
    records = tmp_path / "records.json"
    records.write_text(json.dumps(instruction_rows(30)))
    for data in (text_data(tmp_path, tokenizer), prepare_data(config(tmp_path, records), tokenizer)):
        again = Split.of(data.cache, data.split.seed, data.split.train_share)
        assert type(data.split) is Split and data.split.to_json() == again.to_json()
        assert (data.split.val_idx == again.val_idx).all() and (data.split.train_idx == again.train_idx).all()


def hub_snapshot(hub: Path, name: str, revision: str, files: dict[str, bytes]) -> None:
    """A commit of hub dataset `name` as the Hugging Face cache holds it (files linked to blobs named by their
    hash), made the one refs/main names."""
    repo = hub / f"datasets--{name.replace('/', '--')}"
    for path, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = repo / "snapshots" / revision / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)


def test_a_hub_datasets_fingerprint_is_its_data_files_content(tmp_path, tokenizer, monkeypatch):
    """A hub dataset read again after a commit that changed only its README (or from elsewhere: the same data
    files) keeps its token cache; a commit that changed a data file gets another."""
    import huggingface_hub.constants

    from qlora_ft.data import sources

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    csv = "text\n" + "".join(f'"{p}"\n' for p in make_paragraphs(20))

    def read(revision: str, files: dict[str, str]):
        hub_snapshot(tmp_path / "hub", "someone/books", revision, {k: v.encode() for k, v in files.items()})
        monkeypatch.setattr(sources, "_HUB", {})  # a new process
        return open_cache("someone/books", tokenizer, Recipe(), cache_dir=tmp_path / "cache")

    first = read("a" * 40, {"data/train.csv": csv, "README.md": "# Books\n"})
    again = read("b" * 40, {"data/train.csv": csv, "README.md": "# Books\n\nNow with a licence.\n"})
    assert not again.built and again.fingerprint == first.fingerprint
    blob = hashlib.sha256(csv.encode()).hexdigest()  # the cache's name for the file: it is not read to be hashed
    assert first.meta["covers"]["data"]["parts"]["train"] == [
        {"name": "data/train.csv", "bytes": len(csv), "blob": blob}
    ]
    changed = read("c" * 40, {"data/train.csv": csv + '"One more paragraph."\n', "README.md": "# Books\n"})
    assert changed.built and changed.n_records == first.n_records + 1


def write_table(path: Path, rows) -> Path:
    """`rows` (a list, or {"train": ..., "validation": ...}) as a .csv, .json or pickle file."""
    import pickle

    import pandas as pd

    if path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_bytes(pickle.dumps(rows))
    return path


@pytest.mark.parametrize("name", ["d.csv", "d.json", "d.pkl"])
def test_a_warm_start_reads_a_table_only_to_hash_it(tmp_path, tokenizer, monkeypatch, name):
    """On a second start the token cache holds the table's records, and the cache folder its columns and parts:
    the file is hashed, not parsed (a CSV file's header alone is read)."""
    from qlora_ft.data import sources

    records = instruction_rows(20)
    rows = records if name == "d.csv" else {"train": records[:15], "validation": records[15:]}
    path = write_table(tmp_path / name, rows)
    first = prepare_data(config(tmp_path, path), tokenizer)

    def parse(*args, **kwargs):
        pytest.fail(f"{name} was parsed on a warm start")

    monkeypatch.setattr(sources, "_table", parse)
    monkeypatch.setattr(sources, "iter_csv", parse, raising=False)
    again = prepare_data(config(tmp_path, path), tokenizer)
    assert first.cache.built and not again.cache.built and again.cache.path == first.cache.path
    assert again.mode == "instruction" and again.split.to_json() == first.split.to_json()
    assert len(again.split.val_idx) == (2 if name == "d.csv" else 5)  # a pre-split table keeps its parts


def test_a_table_is_read_as_it_is_now_in_a_long_lived_process(tmp_path, tokenizer):
    """A table rewritten with the same size and modification time is read anew: its rows are not kept between
    reads, so the cache built for its new bytes holds its new text."""
    path = write_table(tmp_path / "d.json", [f"The first text, number {i:02}." for i in range(20)])
    first = prepare_data(config(tmp_path, path), tokenizer)
    stat = path.stat()
    write_table(path, [f"The other text, number {i:02}." for i in range(20)])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    again = prepare_data(config(tmp_path, path), tokenizer)
    assert again.cache.built and again.cache.fingerprint != first.cache.fingerprint
    texts = [tokenizer.decode(again.cache.tokens(i)) for i in range(again.cache.n_records)]
    assert texts == [f"The other text, number {i:02}." for i in range(20)]
