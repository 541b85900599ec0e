import json
import os
import pickle
import random
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch

from qlora_ft.data import (
    Corpus,
    collate,
    epoch_batches,
    epoch_rows,
    load_corpus,
    pack,
    safe_unpickle,
    split_corpus,
    split_from_json,
    split_text,
    to_windows,
    write_pickle_dataset,
)
from qlora_ft.errors import UserError

TEXTS = ["First paragraph.", "Second one here.", "Third, with more words."]


def write_pickle(path, obj):
    path.write_bytes(pickle.dumps(obj))
    return str(path)


@pytest.mark.parametrize(
    "obj",
    [
        [{"sentence": t} for t in TEXTS],
        list(TEXTS),
        [{"text": t} for t in TEXTS],
        [{"paragraph": t} for t in TEXTS],
        pd.DataFrame({"sentence": TEXTS, "n": [1, 2, 3]}),
        pd.DataFrame({"text": TEXTS}),
        pd.Series(TEXTS, name="whatever"),
        {"text": list(TEXTS)},
    ],
    ids=["list-of-sentence-dicts", "list-of-str", "text-key", "paragraph-key", "dataframe", "dataframe-text",
         "series", "column-dict"],
)  # fmt: skip
def test_pickle_formats(tmp_path, obj):
    assert load_corpus(write_pickle(tmp_path / "d.pkl", obj)) == Corpus(TEXTS)


@pytest.mark.slow
def test_a_list_of_paragraphs_loads_without_pandas_and_a_pickled_frame_still_does(tmp_path):
    """pandas (~0.3 s to import) is loaded only by data that needs it; in a fresh interpreter, as a run starts."""
    paragraphs = write_pickle(tmp_path / "list.pkl", [{"sentence": t} for t in TEXTS])
    frame = write_pickle(tmp_path / "frame.pkl", pd.DataFrame({"text": [*TEXTS, pd.NA]}))
    code = ("import sys; from qlora_ft.data import load_corpus; "
            f"texts = load_corpus({paragraphs!r}).train; print('pandas' in sys.modules); "
            f"print(texts == load_corpus({frame!r}).train == {list(TEXTS)!r})")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True"]


def test_pre_split_pickle(tmp_path):
    corpus = load_corpus(write_pickle(tmp_path / "d.pkl", {"train": TEXTS[:2], "validation": [{"sentence": TEXTS[2]}]}))
    assert corpus == Corpus(TEXTS[:2], [TEXTS[2]])
    split = split_corpus(corpus, 0.9, seed=0)
    assert split.train == TEXTS[:2] and split.validation == [TEXTS[2]]


def test_text_column_flag(tmp_path):
    path = write_pickle(tmp_path / "d.pkl", pd.DataFrame({"body": TEXTS, "title": ["a", "b", "c"]}))
    assert load_corpus(path, text_column="body").train == TEXTS
    with pytest.raises(UserError, match="no text column"):
        load_corpus(path)
    with pytest.raises(UserError, match="no column 'nope'"):
        load_corpus(path, text_column="nope")


def test_txt_file_and_folder(tmp_path):
    book = "Chapter 1\n\nIt is a truth\nuniversally acknowledged.\n\n\n  Second para.  \r\n"
    (tmp_path / "b.txt").write_text(book)
    assert load_corpus(str(tmp_path / "b.txt")).train == ["It is a truth universally acknowledged.", "Second para."]
    assert load_corpus(str(tmp_path / "b.txt"), keep_headings=True).train == [
        "Chapter 1", "It is a truth universally acknowledged.", "Second para."]  # fmt: skip
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "1.txt").write_text("VOLUME I\n\nCHAPTER I\n\nA one.\n\nA two.")
    (folder / "2.txt").write_text("CHAPTER II.\n\nB one.")
    assert load_corpus(str(folder)).train == ["A one.", "A two.", "B one."]
    assert len(load_corpus(str(folder), keep_headings=True).train) == 6


def test_headings_are_dropped_from_every_source_by_one_rule(tmp_path, caplog):
    """Books, tables, pickles and saved datasets lose their heading-only paragraphs alike, read whole or streamed
    for the token cache; --keep-headings keeps them from every source."""
    import datasets

    from qlora_ft import sources

    caplog.set_level("INFO", logger="qlora_ft")
    (tmp_path / "b.txt").write_text("CHAPTER I\n\nIV\n\nI said so.\n\nCHAPTER 2. I OBSERVE\n\nBook I: Boy and Girl"
                                    "\n\nChapter and verse were quoted.\n\nPart of it was true.")  # fmt: skip
    assert load_corpus(str(tmp_path / "b.txt")).train == ["I said so.", "Chapter and verse were quoted.",
                                                         "Part of it was true."]  # fmt: skip
    assert "b.txt: dropped 4 heading-only paragraphs" in caplog.text
    rows = ["CHAPTER I", "Text.", "IV", "12.", "Book two.", "More text."]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(saved))
    pd.DataFrame({"text": rows}).to_csv(tmp_path / "d.csv", index=False)
    for source in (write_pickle(tmp_path / "d.pkl", rows), str(tmp_path / "d.csv"), str(saved)):
        assert load_corpus(source).train == ["Text.", "More text."], source
        assert sources.read_corpus(source).train == ["Text.", "More text."], source
        assert load_corpus(source, keep_headings=True).train == rows, source
        assert sources.read_corpus(source, keep_headings=True).train == rows, source


def test_austen_chapter_headings_are_gone_and_paragraphs_stay():
    from conftest import shared_or_skip

    austen = str(shared_or_skip("data", "corpora", "austen"))
    kept, everything = load_corpus(austen).train, load_corpus(austen, keep_headings=True).train
    kept_set = set(kept)
    dropped = [p for p in everything if p not in kept_set]
    assert {p.split()[0] for p in dropped} == {"CHAPTER", "Chapter", "VOLUME"} and len(dropped) > 200
    assert not [p for p in kept if re.fullmatch(r"(?i)(chapter|volume)\s+\w+\.?", p)]
    assert "CHAPTER I" in everything and "CHAPTER I" not in kept
    assert any(p.startswith("It is a truth universally acknowledged") for p in kept)
    assert kept == [p for p in everything if p in kept_set]  # every other paragraph stays, in order


def test_titled_chapter_headings_are_gone_too():
    from conftest import shared_or_skip

    drood = load_corpus(str(shared_or_skip("data", "corpora", "dickens", "edwin_drood.txt"))).train
    assert not [p for p in drood if p.startswith("CHAPTER")]  # "CHAPTER I—THE DAWN", ...
    assert len(drood) > 1000


def test_tables(tmp_path):
    frame = pd.DataFrame({"text": TEXTS})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"sentence": t}) + "\n" for t in TEXTS))
    for name in ("d.csv", "d.parquet", "d.jsonl"):
        assert load_corpus(str(tmp_path / name)).train == TEXTS, name


def test_saved_datasets_dir(tmp_path):
    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": TEXTS[:2]}),
         "validation": datasets.Dataset.from_dict({"text": TEXTS[2:]})}
    ).save_to_disk(tmp_path / "ds")  # fmt: skip
    assert load_corpus(str(tmp_path / "ds")) == Corpus(TEXTS[:2], TEXTS[2:])
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(tmp_path / "flat")
    assert load_corpus(str(tmp_path / "flat")) == Corpus(TEXTS)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_MARKER",))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_pickle(tmp_path / "evil.pkl", [{"sentence": "fine"}, _Evil()])
    with pytest.raises(UserError, match="refusing to load .*system.*nothing in the file was executed"):
        load_corpus(path)
    assert not (tmp_path / "PWNED_MARKER").exists()


@pytest.mark.parametrize(
    "payload, message",
    [(b"", "corrupt or truncated"), (pickle.dumps(TEXTS)[:-5], "corrupt or truncated"),
     (random.Random(0).randbytes(64), "pickle"), (pickle.dumps(torch.zeros(2)), "refusing")],
)  # fmt: skip
def test_bad_pickles(payload, message):
    with pytest.raises(UserError, match=message):
        safe_unpickle(payload, "x.pkl")


@pytest.mark.parametrize(
    "obj, message",
    [([1, 2], "item 0 is int"), ([], "no paragraphs"), (42, "expected a list"), ({"train": ["a"]}, "validation"),
     ([{"title": "x"}], "no text column")],
)  # fmt: skip
def test_wrong_structures(tmp_path, obj, message):
    with pytest.raises(UserError, match=message):
        load_corpus(write_pickle(tmp_path / "d.pkl", obj))


def test_missing_file_and_unknown_format_and_bad_utf8(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        load_corpus(str(tmp_path / "nope.pkl"))
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(UserError, match="unknown data format"):
        load_corpus(str(tmp_path / "d.xlsx"))
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(UserError, match="not UTF-8"):
        load_corpus(str(tmp_path / "bad.txt"))


def test_split_is_seeded_disjoint_and_complete():
    texts = [f"paragraph {i}" for i in range(100)] + ["paragraph 3", "paragraph 7"]  # two duplicates
    a, b = split_corpus(Corpus(texts), 0.9, seed=1), split_corpus(Corpus(texts), 0.9, seed=1)
    assert a.train_idx == b.train_idx and a.val_idx == b.val_idx
    assert len(a.validation) == 10 and len(a.train) == 90
    assert not set(a.train) & set(a.validation)
    assert sorted(a.train + a.validation) == sorted(set(texts))
    assert split_corpus(Corpus(texts), 0.9, seed=2).val_idx != a.val_idx


def test_split_needs_two_paragraphs():
    with pytest.raises(UserError, match="too few paragraphs"):
        split_corpus(Corpus(["only one"]), 0.9, seed=0)


def test_saved_split_is_checked_against_the_data():
    split = split_corpus(Corpus([f"p{i}" for i in range(20)]), 0.8, seed=0)
    saved = json.loads(json.dumps(split.to_json()))
    assert split_from_json(split, saved).val_idx == split.val_idx
    other = split_corpus(Corpus([f"q{i}" for i in range(20)]), 0.8, seed=0)
    with pytest.raises(UserError, match="differs"):
        split_from_json(other, saved)


@pytest.mark.parametrize("n, max_len", [(0, 4), (1, 2), (5, 4), (10, 3), (97, 16), (200, 100)])
def test_windows_predict_every_token_exactly_once(n, max_len):
    ids = list(range(1, n + 1))
    windows = to_windows(ids, eos_id=0, max_len=max_len)
    assert all(2 <= len(w) <= max_len for w in windows)
    targets = [t for w in windows for t in w[1:]]  # what each window predicts
    assert targets == ids + [0]  # every token and the final <eos>, once, in order
    assert windows[0][0] == 0


def test_collate_masks_padding_by_position_and_keeps_eos():
    eos = 9
    batch = collate([[[eos, 1, 2, eos]], [[eos, 3]]], pad_id=eos)
    assert batch["input_ids"].tolist() == [[9, 1, 2, 9], [9, 3, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 1, 2, 9], [-100, 3, -100, -100]]  # the real final eos is a target
    assert "position_ids" not in batch


def test_collate_packed_rows_restart_positions_and_never_predict_across_windows():
    batch = collate([[[9, 1, 2, 9], [9, 3, 9]], [[9, 4, 9]]], pad_id=9)
    assert batch["input_ids"].tolist() == [[9, 1, 2, 9, 9, 3, 9], [9, 4, 9, 9, 9, 9, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, 1, 2, 9, -100, 3, 9], [-100, 4, 9, -100, -100, -100, -100]]
    assert "attention_mask" not in batch  # transformers derives the block-diagonal mask from the positions


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_places_every_window_once_within_the_block(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(2, 100) for _ in range(2000)]
    rows = pack(lengths, list(range(len(lengths))), block_len=128)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    assert sum(lengths) / (128 * len(rows)) > 0.97  # best-fit decreasing leaves little room unused


def sorted_list_best_fit(lengths, order, block_len):
    """Best-fit decreasing over a sorted list of (room, row): the plain reference `pack` must equal."""
    import bisect

    rows, free = [], []
    for i in sorted(order, key=lambda i: -lengths[i]):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            room, row = block_len - lengths[i], len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pack_equals_the_reference_best_fit(seed):
    rng = random.Random(seed)
    block = rng.choice([8, 64, 256])
    lengths = [rng.randint(1, block) for _ in range(3000)]
    order = list(range(len(lengths)))
    rng.shuffle(order)
    assert pack(lengths, order, block) == sorted_list_best_fit(lengths, order, block)


def test_epoch_rows_and_batches_are_a_function_of_seed_and_epoch():
    lengths = [random.Random(i).randint(2, 50) for i in range(300)]
    for packing in (True, False):
        a = epoch_rows(lengths, 64, packing, seed=3, epoch=0)
        assert a == epoch_rows(lengths, 64, packing, seed=3, epoch=0)
        assert a != epoch_rows(lengths, 64, packing, seed=3, epoch=1)
        assert sorted(i for r in a for i in r) == list(range(300))
        batches = epoch_batches(a, lengths, 8, not packing, seed=3, epoch=0)
        assert sorted(map(tuple, (r for b in batches for r in b))) == sorted(map(tuple, a))


def test_padded_batches_grouped_by_length_waste_little():
    rng = random.Random(0)
    lengths = [min(100, int(rng.lognormvariate(4, 0.8)) + 2) for _ in range(4000)]
    rows = epoch_rows(lengths, 100, packing=False, seed=0, epoch=0)

    def padding_share(batches):
        slots = sum(len(b) * max(lengths[r[0]] for r in b) for b in batches)
        return 1 - sum(lengths) / slots

    grouped = padding_share(epoch_batches(rows, lengths, 8, True, seed=0, epoch=0))
    shuffled = padding_share(epoch_batches(rows, lengths, 8, False, seed=0, epoch=0))
    assert grouped < 0.05 < 0.3 < shuffled


def test_split_text_handles_crlf_and_nul():
    assert split_text("a\r\nb\r\n\r\nc\x00d") == ["a b", "cd"]


def test_write_pickle_dataset_round_trip(tmp_path):
    out = tmp_path / "sub" / "austen_dataset.pkl"
    write_pickle_dataset(TEXTS, str(out))
    assert pickle.loads(out.read_bytes()) == [{"sentence": t} for t in TEXTS]
    assert [p.name for p in out.parent.iterdir()] == ["austen_dataset.pkl"]  # no temp file left


@pytest.mark.parametrize("source", ["my books", "data/", "books/austen/", "./austen", "a/b/c"])
def test_a_missing_path_that_is_no_repository_id_is_a_missing_file(source):
    with pytest.raises(UserError, match=f"data file not found: {re.escape(source)}"):
        load_corpus(source)


def test_a_hub_dataset_missing_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot load dataset 'someone/absent'.*HF_HUB_OFFLINE"):
        load_corpus("someone/absent")
