"""Token cache: hits and misses, damaged caches, windows and split equal to ones computed by hand from the
tokenizer and the seed, locking."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, build_tokenizer, make_paragraphs, shared_or_skip
from qlora_ft.cli import main
from qlora_ft.data import cache, encode
from qlora_ft.data.batches import cut_windows
from qlora_ft.data.prepare import Recipe, open_cache
from qlora_ft.data.split import split_records
from qlora_ft.errors import UserError


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def book(tmp_path) -> tuple[Path, list[str]]:
    paragraphs = make_paragraphs(80, seed=3)
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path, paragraphs


def _open(path, tok, cache_dir, **kw) -> cache.TokenCache:
    return open_cache(str(path), tok, Recipe(**kw), cache_dir=cache_dir, workers=1)


def expected_windows(tok, paragraphs: list[str], max_len: int) -> list[list[int]]:
    """What training must see, computed from the tokenizer alone: each paragraph as `<eos> + ids + <eos>`, cut
    into windows of at most `max_len` tokens that overlap by one token."""
    eos, out = tok.eos_token_id, []
    for p in paragraphs:
        seq = [eos, *tok(p, add_special_tokens=False).input_ids, eos]
        out += [seq[i : i + max_len] for i in range(0, len(seq) - 1, max_len - 1)]
    return out


def expected_split(paragraphs: list[str], seed: int, train_share: float) -> tuple[list[str], list[str]]:
    """(train, validation) paragraphs in reading order: the distinct paragraphs shuffled by `random.Random(seed)`,
    the first round(n * (1 - share)) of them (at least one) validating."""
    distinct = list(dict.fromkeys(paragraphs))
    n_val = max(1, round(len(distinct) * (1.0 - train_share)))
    order = list(range(len(distinct)))
    random.Random(seed).shuffle(order)
    return [distinct[i] for i in sorted(order[n_val:])], [distinct[i] for i in sorted(order[:n_val])]


def _all_ids(windows) -> list[list[int]]:
    return [windows.ids(k).tolist() for k in range(len(windows))]


def test_windows_from_the_memmap_equal_windows_cut_by_hand(tmp_path, tok, book):
    path, paragraphs = book
    c = _open(path, tok, tmp_path / "cache")
    assert c.built and c.n_records == len(paragraphs) and c.meta["dtype"] == "uint16" and not c.meta["has_mask"]
    assert [c.tokens(i).tolist() for i in range(c.n_records)] == tok(paragraphs, add_special_tokens=False).input_ids
    for max_len in (2, 5, 16, 64):
        windows = cut_windows(c, np.arange(c.n_records), max_len)
        expected = expected_windows(tok, paragraphs, max_len)
        assert _all_ids(windows) == expected
        assert windows.lengths.tolist() == [len(w) for w in expected]
    some = np.array([7, 2, 40])
    assert _all_ids(cut_windows(c, some, 16)) == expected_windows(tok, [paragraphs[i] for i in some], 16)


def test_gpt2_windows_equal_on_a_shared_book(tmp_path):
    from transformers import AutoTokenizer

    gpt2 = AutoTokenizer.from_pretrained(shared_or_skip("data", "gpt2-tokenizer"))
    path = shared_or_skip("data", "corpora", "austen", "northanger_abbey.txt")
    # the book's paragraphs by hand: blocks between blank lines, wrapped lines joined, whitespace runs one space
    blocks = re.split(r"\n[^\S\n]*\n", path.read_text(encoding="utf-8-sig").replace("\r\n", "\n"))
    paragraphs = [p for p in (" ".join(b.split()) for b in blocks) if p]
    c = _open(path, gpt2, tmp_path, keep_headings=True)
    assert c.n_records == len(paragraphs)
    windows = cut_windows(c, np.arange(c.n_records), 128)
    expected = expected_windows(gpt2, paragraphs, 128)
    assert len(windows) == len(expected)
    assert all(windows.ids(k).tolist() == expected[k] for k in range(len(expected)))


def test_hit_and_miss_when_data_tokenizer_or_options_change(tmp_path, tok, book):
    path, _ = book
    where = tmp_path / "cache"
    first = _open(path, tok, where)
    assert first.built and not _open(path, tok, where).built
    # the same size and modification time, other bytes: only a content hash notices
    stat, original = path.stat(), path.read_bytes()
    path.write_bytes(original.replace(b"a", b"e", 1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _open(path, tok, where).built
    path.write_bytes(original)
    assert not _open(path, tok, where).built
    other = build_tokenizer()
    other.add_tokens(["Elizabeth Darcy"])
    assert _open(path, other, where).built
    assert _open(path, tok, where, keep_headings=True).built
    assert not _open(path, tok, where).built
    assert len(cache.list_caches(where)) == 4


def test_a_damaged_cache_is_rebuilt(tmp_path, tok, book):
    path, where = book[0], tmp_path / "cache"
    c = _open(path, tok, where)
    expected = [c.tokens(i).tolist() for i in range(c.n_records)]
    ids = c.path / "ids.bin"
    ids.write_bytes(ids.read_bytes()[:-10])  # truncated, as by a full disk or a killed copy
    rebuilt = _open(path, tok, where)
    assert rebuilt.built and [rebuilt.tokens(i).tolist() for i in range(rebuilt.n_records)] == expected
    (rebuilt.path / "meta.json").unlink()  # incomplete: meta.json is written last
    assert _open(path, tok, where).built
    for junk in ("{", "[]", '{"format_version": 1}'):
        (rebuilt.path / "meta.json").write_text(junk)
        assert _open(path, tok, where).built
    assert [p.name for p in where.iterdir() if not p.name.startswith(".")] == [c.fingerprint]


def test_split_is_the_seeded_shuffle_of_the_distinct_paragraphs(tmp_path, tok):
    paragraphs = make_paragraphs(50, seed=5)
    paragraphs += paragraphs[3:9]  # duplicates are kept once
    c = cache.open_or_build({"t": 1}, tok, lambda: ([(p, True)] for p in paragraphs), cache_dir=tmp_path, workers=1)
    train, val = split_records(c, seed=7, train_share=0.8)
    expected_train, expected_val = expected_split(paragraphs, seed=7, train_share=0.8)
    assert [paragraphs[i] for i in train] == expected_train and [paragraphs[i] for i in val] == expected_val
    assert (len(train), len(val)) == (40, 10) and max(val.max(), train.max()) < 50  # first occurrences only
    stored = c.path / "split-7-0.8.npy"
    assert stored.exists()
    stored.unlink()
    again = split_records(c, seed=7, train_share=0.8)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)


def test_pre_split_source_keeps_its_parts(tmp_path, tok):
    import datasets

    train = ["Alpha one.", "Beta two.", "Shared.", "Alpha one."]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                          "validation": datasets.Dataset.from_dict({"text": ["Shared.", "Gamma."]})}
                         ).save_to_disk(str(tmp_path / "dd"))  # fmt: skip
    c = _open(tmp_path / "dd", tok, tmp_path / "cache")
    assert c.n_records == 6 and c.meta["n_train_fixed"] == 4
    tr, va = split_records(c, seed=0, train_share=0.5)
    assert tr.tolist() == [0, 1] and va.tolist() == [4, 5]


def test_instruction_records_store_a_loss_mask(tmp_path, tok):
    records = [[("Say hello.", False), (" Hello there.", True)], [("Plain text", True)]]
    c = cache.open_or_build({"t": "inst"}, tok, lambda: iter(records), cache_dir=tmp_path, workers=1)
    assert c.meta["has_mask"] and (c.path / "mask.bin").exists()
    n_prompt = len(tok("Say hello.", add_special_tokens=False)["input_ids"])
    assert c.mask(0).tolist() == [0] * n_prompt + [1] * (c.lengths[0] - n_prompt)
    assert c.mask(1).tolist() == [1] * c.lengths[1]
    w = cut_windows(c, [0], 64)
    assert w.mask(0).tolist() == [0, *c.mask(0).tolist(), 1]  # leading <eos> is context, closing <eos> trained
    assert w.ids(0).tolist() == [tok.eos_token_id, *c.tokens(0).tolist(), tok.eos_token_id]
    # as instruction records are cached (`lead`): stored with their leading <eos>, one window each, never cut
    lead = cache.open_or_build({"t": "lead"}, tok, lambda: iter(records[:1]), cache_dir=tmp_path, workers=1,
                               lead=True)  # fmt: skip
    prompt, response = (tok(t, add_special_tokens=False).input_ids for t in ("Say hello.", " Hello there."))
    assert lead.whole_records and lead.tokens(0).tolist() == [tok.eos_token_id, *prompt, *response]
    assert lead.mask(0).tolist() == [0] * (1 + n_prompt) + [1] * len(response)
    assert lead.prompts.tolist() == [1 + n_prompt]
    assert cut_windows(lead, [0], 64).ids(0).tolist() == lead.tokens(0).tolist()
    assert len(cut_windows(lead, [0], len(lead.tokens(0)) - 1)) == 0


def test_a_chat_prompt_ends_before_the_last_answer_and_an_earlier_count_is_rebuilt(tmp_path, tok):
    """prompts.npy counts the tokens before a record's last response, also when a user turn follows it; a cache
    whose prompts were counted by the earlier rule (up to the last segment) is rebuilt under the same name."""
    record = [("<|user|>\nHi\n", False), ("<|assistant|>\n", False), ("Hello<|endoftext|>", True),
              ("<|user|>\nThanks\n", False)]  # fmt: skip
    c = cache.open_or_build({"t": "chat"}, tok, lambda: iter([record]), cache_dir=tmp_path, workers=1, lead=True)
    prompt = [tok.eos_token_id, *(t for text, _ in record[:2] for t in tok(text, add_special_tokens=False).input_ids)]
    assert c.tokens(0)[: int(c.prompts[0])].tolist() == prompt
    meta = json.loads((c.path / "meta.json").read_text())
    del meta["prompts_version"]
    (c.path / "meta.json").write_text(json.dumps(meta))
    again = cache.open_or_build({"t": "chat"}, tok, lambda: iter([record]), cache_dir=tmp_path, workers=1, lead=True)
    assert again.built and again.path == c.path and again.prompts.tolist() == [len(prompt)]


def test_disk_space_check_is_a_user_error(tmp_path, tok, book, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(UserError, match="not enough disk space for the token cache"):
        _open(book[0], tok, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]


def test_a_disk_filling_up_mid_build_is_a_user_error_and_leaves_nothing(tmp_path, tok):
    import errno

    def records():
        yield [("Some text.", True)]
        raise OSError(errno.ENOSPC, "No space left on device")  # what a write to a full disk raises

    with pytest.raises(UserError, match="filled up while building the token cache"):
        cache.open_or_build({"t": "full"}, tok, records, cache_dir=tmp_path, workers=1)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_empty_data_is_a_user_error(tmp_path, tok):
    with pytest.raises(UserError, match="no records"):
        cache.open_or_build({"t": "empty"}, tok, lambda: iter([]), cache_dir=tmp_path, workers=1)
    assert not list(tmp_path.glob("*tmp*"))


BUILDER = """
import logging, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import build_tokenizer, make_paragraphs
from qlora_ft.data import cache

def held_records(signals):
    (signals / "started").touch()
    for _ in range(600):  # hold the build open until the test says the other process is waiting
        if (signals / "release").exists():
            break
        time.sleep(0.1)
    for p in make_paragraphs(40):
        yield [(p, True)]

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    signals = Path(sys.argv[2])
    c = cache.open_or_build({{"t": "race"}}, build_tokenizer(), lambda: held_records(signals), cache_dir=sys.argv[1],
                            workers=1)
    print("built" if c.built else "reused", c.n_records, c.n_tokens)
"""


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_concurrent_builders_end_with_one_valid_cache(tmp_path):
    """The second builder starts while the first is mid-build: it waits on the lock, then reuses the cache."""
    script = tmp_path / "builder.py"
    script.write_text(BUILDER.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs, logs = [], []
    for i in range(2):
        logs.append(open(tmp_path / f"log{i}", "w+"))  # closed below
        runs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / "c"), str(tmp_path)],
                                     stdout=subprocess.PIPE, stderr=logs[i], text=True, env=env))  # fmt: skip
        if i == 0:
            _wait_for(lambda: (tmp_path / "started").exists(), "the first build to start")
    _wait_for(lambda: "waiting for it" in (tmp_path / "log1").read_text(), "the second builder to wait on the lock")
    (tmp_path / "release").touch()
    outs = [r.communicate(timeout=300)[0].split() for r in runs]
    for f in logs:
        f.close()
    assert [r.returncode for r in runs] == [0, 0]
    assert outs[0][0] == "built" and outs[1][0] == "reused"
    assert outs[0][1] == "40" and outs[0][1:] == outs[1][1:]  # the same records and tokens
    (folder,) = [p for p in (tmp_path / "c").iterdir() if not p.name.startswith(".")]
    assert cache.TokenCache(folder).n_records == 40


@pytest.mark.slow
def test_worker_processes_and_threads_give_the_same_ids(tmp_path, tok):
    paragraphs = make_paragraphs(300, seed=9)
    one = cache.open_or_build({"w": 1}, tok, lambda: ([(p, True)] for p in paragraphs), cache_dir=tmp_path, workers=1)
    monkey_chunk = encode.CHUNK_CHARS
    encode.CHUNK_CHARS = 500  # many work items, so the order of results matters
    try:
        two = cache.open_or_build({"w": 2}, tok, lambda: ([(p, True)] for p in paragraphs), cache_dir=tmp_path,
                                  workers=2, parallel="processes")  # fmt: skip
        threads = cache.open_or_build({"w": 3}, tok, lambda: ([(p, True)] for p in paragraphs), cache_dir=tmp_path,
                                      workers=2, parallel="threads")  # fmt: skip
    finally:
        encode.CHUNK_CHARS = monkey_chunk
    assert np.array_equal(one.index, two.index) and np.array_equal(one.hashes, two.hashes)
    assert all(np.array_equal(one.tokens(i), two.tokens(i)) for i in range(one.n_records))
    assert np.array_equal(np.asarray(one._ids), np.asarray(threads._ids))
    assert os.environ.get("TOKENIZERS_PARALLELISM") == "false"  # as conftest set it: restored after the build


def test_cache_list_and_clear_commands(tmp_path, tok, book, capsys):
    c = _open(book[0], tok, tmp_path)
    main(["cache", "list", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"{c.fingerprint}" in out and "80 records" in out and "book.txt" in out
    with pytest.raises(SystemExit) as e:
        main(["cache", "clear", "nosuchcache", "--cache-dir", str(tmp_path)])
    assert e.value.code == 2 and "no token cache nosuchcache" in capsys.readouterr().err
    main(["cache", "clear", "--cache-dir", str(tmp_path)])
    assert not c.path.exists() and cache.list_caches(tmp_path) == []


def test_a_build_fsyncs_every_file_and_the_rename(tmp_path, tok, book, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    opened = open_cache(str(book[0]), tok, Recipe(), cache_dir=tmp_path / "c")
    written = {p.name for p in opened.path.iterdir()}
    assert written <= set(synced), f"not fsynced: {written - set(synced)}"
    assert "c" in synced, "the cache folder's parent was not fsynced after the rename"


def test_token_ids_past_the_storage_type_are_refused_not_wrapped(tmp_path):
    class Tokenizer:  # a slow tokenizer whose ids run past what its size promised
        eos_token_id = 0

        def __len__(self):
            return 300

        def __call__(self, texts, **kwargs):
            return {"input_ids": [[5, 70_000] for _ in texts]}

        def get_vocab(self):
            return {"a": 0}

    with pytest.raises(UserError, match="token id 70000, past its vocabulary size 300"):
        cache.open_or_build({"x": 1}, Tokenizer(), lambda: [[("text", True)]], cache_dir=tmp_path)
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]


def test_a_reader_meeting_a_rebuild_waits_for_it_instead_of_failing(tmp_path, tok, book, monkeypatch):
    """An unlocked reader that finds meta.json but then misses the data files (a builder swapping the folder
    in `_publish`) treats the cache as incomplete: it takes the lock, and opens what the builder published."""
    first = open_cache(str(book[0]), tok, Recipe(), cache_dir=tmp_path)
    real_read_meta = cache._read_meta
    calls = []

    def read_meta_then_vanish(path):
        meta = real_read_meta(path)
        if not calls:  # the first open: the folder goes away right after its meta.json was read
            calls.append(path)
            (path / "ids.bin").rename(path.parent / "ids.bin.away")
        return meta

    monkeypatch.setattr(cache, "_read_meta", read_meta_then_vanish)
    again = open_cache(str(book[0]), tok, Recipe(), cache_dir=tmp_path)
    assert calls and again.fingerprint == first.fingerprint
    assert np.array_equal(again.tokens(0), first.tokens(0))


class Serialized:
    """`tok` as `cache.tokenizer_digest` reads it, its pipeline written as `pipeline` (as another `tokenizers`
    release might write the same one)."""

    def __init__(self, tok, pipeline: dict):
        self.backend_tokenizer = type("Backend", (), {"to_str": lambda _: json.dumps(pipeline)})()
        self.eos_token_id, self.bos_token_id, self.size, self.tok = tok.eos_token_id, tok.bos_token_id, len(tok), tok

    def __len__(self) -> int:
        return self.size

    def __call__(self, *args, **kwargs):  # the rest (the leading token's rule) as `tok` reads it
        return self.tok(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.tok, name)


def test_the_tokenizer_digest_is_what_decides_the_ids(tmp_path, tok, book):
    """The same pipeline written another way (merges as "a b" strings, fields in another order, a switch added at
    off, truncation, decoder, post-processor) or in a renamed class keeps the digest; another merge order,
    normalizer or special token changes it."""
    import copy

    pipeline = json.loads(tok.backend_tokenizer.to_str())
    digest = cache.tokenizer_digest(Serialized(tok, pipeline))
    same = copy.deepcopy(pipeline)
    same["model"] = {"new_switch": False, **{k: v for k, v in reversed(pipeline["model"].items())}}
    same["model"]["merges"] = [" ".join(pair) for pair in pipeline["model"]["merges"]]
    same["model"].pop("ignore_merges")  # written by later releases only
    same.update(truncation={"max_length": 8}, decoder=None, post_processor={"type": "ByteLevel"})
    assert cache.tokenizer_digest(Serialized(tok, same)) == digest
    renamed = copy.copy(tok)
    renamed.__class__ = type("RenamedTokenizer", (type(tok),), {})  # as transformers 5 renamed GPT2TokenizerFast
    assert cache.tokenizer_digest(renamed) == cache.tokenizer_digest(tok)
    assert open_cache(str(book[0]), tok, Recipe(), cache_dir=tmp_path).built
    assert not open_cache(str(book[0]), renamed, Recipe(), cache_dir=tmp_path).built
    swapped, lower, special = (copy.deepcopy(pipeline) for _ in range(3))
    swapped["model"]["merges"][:2] = swapped["model"]["merges"][1::-1]
    lower["normalizer"] = {"type": "Lowercase"}
    special["added_tokens"].append({**special["added_tokens"][0], "id": len(tok), "content": "<|im_start|>"})
    others = {cache.tokenizer_digest(Serialized(tok, p))["sha256"] for p in (swapped, lower, special)}
    assert len(others) == 3 and digest["sha256"] not in others


def test_the_fingerprint_covers_the_tokenizers_merges(tmp_path, tok, book):
    """Two tokenizers of one class, size and EOS that differ only in their merges give different caches."""
    import json as json_

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json_.loads(tok.backend_tokenizer.to_str())
    merges = spec["model"]["merges"]
    merges[0], merges[-1] = merges[-1], merges[0]  # same vocabulary, another order of merging
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json_.dumps(spec)), eos_token="<|endoftext|>")
    assert (type(other), len(other), other.eos_token_id) == (type(tok), len(tok), tok.eos_token_id)
    a = open_cache(str(book[0]), tok, Recipe(), cache_dir=tmp_path)
    b = open_cache(str(book[0]), other, Recipe(), cache_dir=tmp_path)
    assert a.fingerprint != b.fingerprint
