import itertools
import json
import os
import pickle
import random
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import build_tokenizer, make_paragraphs
from qlora_ft.data.batches import collate, cut_windows, epoch_batches, epoch_rows, pack
from qlora_ft.data.prepare import Recipe, open_cache
from qlora_ft.data.records import is_heading, iter_paragraphs
from qlora_ft.data.sources import resolve
from qlora_ft.data.split import Split
from qlora_ft.data.unpickle import safe_unpickle
from qlora_ft.errors import UserError

TEXTS = ["First paragraph.", "Second one here.", "Third, with more words."]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write_pickle(path, obj):
    path.write_bytes(pickle.dumps(obj))
    return str(path)


def paragraphs(source, **options):
    """Every paragraph of `source` as training reads it (each part in turn for a pre-split source)."""
    return list(iter_paragraphs(resolve(str(source)), **options))


def parts(source, **options):
    """(train paragraphs, validation paragraphs) of a pre-split source; (paragraphs, None) of any other."""
    src = resolve(str(source))
    if src.parts() is None:
        return list(iter_paragraphs(src, **options)), None
    return tuple(list(iter_paragraphs(src, part=part, **options)) for part in src.parts())


def cache_of(tmp_path, tokenizer, texts, name="c.pkl", **recipe):
    """The token cache of `texts` written as a pickled list of paragraphs (the road every text run takes)."""
    path = write_pickle(tmp_path / name, texts)
    return open_cache(path, tokenizer, Recipe(**recipe), cache_dir=tmp_path / "cache"), path


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
    assert parts(write_pickle(tmp_path / "d.pkl", obj)) == (TEXTS, None)


@pytest.mark.slow
def test_a_list_of_paragraphs_loads_without_pandas_and_a_pickled_frame_still_does(tmp_path):
    """pandas (~0.3 s to import) is loaded only by data that needs it; in a fresh interpreter, as a run starts."""
    listed = write_pickle(tmp_path / "list.pkl", [{"sentence": t} for t in TEXTS])
    frame = write_pickle(tmp_path / "frame.pkl", pd.DataFrame({"text": [*TEXTS, pd.NA]}))
    code = ("import sys; from qlora_ft.data.records import iter_paragraphs; from qlora_ft.data.sources import resolve; "
            "read = lambda path: list(iter_paragraphs(resolve(path))); "
            f"texts = read({listed!r}); print('pandas' in sys.modules); "
            f"print(texts == read({frame!r}) == {list(TEXTS)!r})")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True"]


def test_pre_split_pickle(tmp_path, tokenizer):
    data = {"train": TEXTS[:2], "validation": [{"sentence": TEXTS[2]}]}
    cache, path = cache_of(tmp_path, tokenizer, data)
    assert parts(path) == (TEXTS[:2], [TEXTS[2]])
    split = Split.of(cache, seed=0, train_share=0.9)  # the source's own split, whatever the share
    texts = paragraphs(path)
    assert [texts[i] for i in split.train_idx] == TEXTS[:2] and [texts[i] for i in split.val_idx] == [TEXTS[2]]


def test_text_column_flag(tmp_path):
    path = write_pickle(tmp_path / "d.pkl", pd.DataFrame({"body": TEXTS, "title": ["a", "b", "c"]}))
    assert paragraphs(path, text_column="body") == TEXTS
    with pytest.raises(UserError, match="no text column"):
        paragraphs(path)
    with pytest.raises(UserError, match="no column 'nope'"):
        paragraphs(path, text_column="nope")


def test_txt_file_and_folder(tmp_path):
    book = "Chapter 1\n\nIt is a truth\nuniversally acknowledged.\n\n\n  Second para.  \r\n"
    (tmp_path / "b.txt").write_text(book)
    assert paragraphs(tmp_path / "b.txt") == ["It is a truth universally acknowledged.", "Second para."]
    assert paragraphs(tmp_path / "b.txt", keep_headings=True) == [
        "Chapter 1", "It is a truth universally acknowledged.", "Second para."]  # fmt: skip
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "1.txt").write_text("VOLUME I\n\nCHAPTER I\n\nA one.\n\nA two.")
    (folder / "2.txt").write_text("CHAPTER II.\n\nB one.")
    assert paragraphs(folder) == ["A one.", "A two.", "B one."]
    assert len(paragraphs(folder, keep_headings=True)) == 6


def test_headings_are_dropped_from_every_source_by_one_rule(tmp_path, caplog, tokenizer):
    """Books, tables, pickles and saved datasets lose their heading-only paragraphs alike, read on their own or
    into the token cache; --keep-headings keeps them from every source."""
    import datasets

    caplog.set_level("INFO", logger="qlora_ft")
    (tmp_path / "b.txt").write_text("CHAPTER I\n\nIV\n\nI said so.\n\nCHAPTER 2. I OBSERVE\n\nBook I: Boy and Girl"
                                    "\n\nChapter and verse were quoted.\n\nPart of it was true.")  # fmt: skip
    assert paragraphs(tmp_path / "b.txt") == ["I said so.", "Chapter and verse were quoted.",
                                              "Part of it was true."]  # fmt: skip
    assert "b.txt: dropped 4 heading-only paragraphs" in caplog.text
    rows = ["CHAPTER I", "Text.", "IV", "12.", "Book two.", "More text."]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(saved))
    pd.DataFrame({"text": rows}).to_csv(tmp_path / "d.csv", index=False)
    for source in (write_pickle(tmp_path / "d.pkl", rows), str(tmp_path / "d.csv"), str(saved)):
        assert paragraphs(source) == ["Text.", "More text."], source
        assert paragraphs(source, keep_headings=True) == rows, source
        for keep, expected in ((False, ["Text.", "More text."]), (True, rows)):
            cache = open_cache(source, tokenizer, Recipe(keep_headings=keep), cache_dir=tmp_path / "cache")
            cached = [tokenizer.decode(cache.tokens(i)) for i in range(cache.n_records)]
            assert cached == expected, (source, keep)


# One-line paragraphs of novels (words, not numerals) that the heading rule must keep, and headings it drops
SHORT_PARAGRAPHS = ["Did.", "Mild.", "Civil.", "Vivid.", "Part ways.", "Volume up.", "Mix.", "Dim.", "Lid.", "Vim.",
                    "Ill.", "Mill.", "Indeed.", "I did.", "Civil, I hope.", "Book it.", "Part of it.", "Chapter and "
                    "verse.", "Part the first.", "Dixi.", "Livid.", "cd", "mix", "Chapter the Last"]  # fmt: skip
HEADINGS = ["CHAPTER IV", "IV.", "Chapter 12.", "= Title =", "VOLUME II", "Book Two", "Part One.", "1984", "12.",
            "Chapter Twenty-First", "Vol. 3", "Chap. XII.", "CHAPTER XLII.", "MDCCCXII", "CHAPTER 1. I AM BORN",
            "Book I: Boy and Girl", "CHAPTER II\u2014A DEAN, AND A CHAPTER ALSO"]  # fmt: skip


def test_short_paragraphs_stay_and_headings_go(tmp_path):
    """The heading rule drops numerals and numbered headings, not words made of the letters Roman numerals use,
    nor "Part"/"Volume" without a number: read from a book and from a table alike."""
    assert [p for p in SHORT_PARAGRAPHS if is_heading(p)] == []
    assert [p for p in HEADINGS if not is_heading(p)] == []
    mixed = [p for pair in itertools.zip_longest(HEADINGS, SHORT_PARAGRAPHS) for p in pair if p]
    (tmp_path / "b.txt").write_text("\n\n".join(mixed))
    pd.DataFrame({"text": mixed}).to_csv(tmp_path / "d.csv", index=False)
    for source in (tmp_path / "b.txt", tmp_path / "d.csv"):
        assert paragraphs(source) == [p for p in mixed if p in SHORT_PARAGRAPHS], source


def test_austen_chapter_headings_are_gone_and_paragraphs_stay():
    from conftest import shared_or_skip

    austen = str(shared_or_skip("data", "corpora", "austen"))
    kept, everything = paragraphs(austen), paragraphs(austen, keep_headings=True)
    kept_set = set(kept)
    dropped = [p for p in everything if p not in kept_set]
    assert {p.split()[0] for p in dropped} == {"CHAPTER", "Chapter", "VOLUME"} and len(dropped) > 200
    assert not [p for p in kept if re.fullmatch(r"(?i)(chapter|volume)\s+\w+\.?", p)]
    assert "CHAPTER I" in everything and "CHAPTER I" not in kept
    assert any(p.startswith("It is a truth universally acknowledged") for p in kept)
    assert kept == [p for p in everything if p in kept_set]  # every other paragraph stays, in order


def test_titled_chapter_headings_are_gone_too():
    from conftest import shared_or_skip

    drood = paragraphs(shared_or_skip("data", "corpora", "dickens", "edwin_drood.txt"))
    assert not [p for p in drood if p.startswith("CHAPTER")]  # "CHAPTER I—THE DAWN", ...
    assert len(drood) > 1000


def test_tables(tmp_path):
    frame = pd.DataFrame({"text": TEXTS})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"sentence": t}) + "\n" for t in TEXTS))
    for name in ("d.csv", "d.parquet", "d.jsonl"):
        assert parts(tmp_path / name) == (TEXTS, None), name


def test_saved_datasets_dir(tmp_path):
    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": TEXTS[:2]}),
         "validation": datasets.Dataset.from_dict({"text": TEXTS[2:]})}
    ).save_to_disk(tmp_path / "ds")  # fmt: skip
    assert parts(tmp_path / "ds") == (TEXTS[:2], TEXTS[2:])
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(tmp_path / "flat")
    assert parts(tmp_path / "flat") == (TEXTS, None)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_MARKER",))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_pickle(tmp_path / "evil.pkl", [{"sentence": "fine"}, _Evil()])
    with pytest.raises(UserError, match="refusing to load .*system.*nothing in the file was executed"):
        paragraphs(path)
    assert not (tmp_path / "PWNED_MARKER").exists()


@pytest.mark.parametrize(
    "payload, message",
    [(b"", "corrupt or truncated"), (pickle.dumps(TEXTS)[:-5], "corrupt or truncated"),
     (random.Random(0).randbytes(64), "pickle"), (pickle.dumps(torch.zeros(2)), "refusing")],
)  # fmt: skip
def test_bad_pickles(payload, message):
    with pytest.raises(UserError, match=message):
        safe_unpickle(payload, "x.pkl")


def calling(module: str, name: str, *args: str) -> bytes:
    """A protocol-0 pickle that calls `module.name(*args)` as it loads (GLOBAL, MARK, strings, TUPLE, REDUCE)."""
    return b"c%s\n%s\n(%stR." % (module.encode(), name.encode(), b"".join(b"V%s\n" % a.encode() for a in args))


@pytest.mark.parametrize(
    "module, name, args",
    [("builtins", "eval", ["open('PWNED_MARKER', 'w').close()"]), ("builtins", "exec", ["open('PWNED_MARKER', 'w')"]),
     ("builtins", "open", ["PWNED_MARKER", "w"]), ("builtins", "getattr", ["text", "upper"]),
     ("builtins", "__import__", ["os"]), ("__builtin__", "eval", ["1"]), ("collections", "namedtuple", ["T", "a"]),
     ("numpy", "fromfile", ["PWNED_MARKER"]), ("pandas", "read_pickle", ["PWNED_MARKER"]),
     ("pandas.core.frame", "eval", ["1"])],
)  # fmt: skip
def test_names_beside_the_allowed_ones_in_their_modules_are_refused(tmp_path, monkeypatch, module, name, args):
    """The unpickler allows names, not modules: builtins.slice loads, builtins.eval (and the other callables of the
    allowed modules) is refused before anything runs."""
    monkeypatch.chdir(tmp_path)
    assert safe_unpickle(calling("builtins", "slice", "1"), "x.pkl") == slice("1")
    with pytest.raises(UserError, match=rf"refusing to load {re.escape(module)}\.{name}\b.*nothing .* executed"):
        safe_unpickle(calling(module, name, *args), "x.pkl")
    assert not (tmp_path / "PWNED_MARKER").exists()


@pytest.mark.parametrize(
    "obj, message",
    [([1, 2], "row 0: the text is int, not a string"), ([], "the data is empty"), (42, "expected a list"),
     ({"train": ["a"]}, "validation"), ([{"title": "x"}], "no text column")],
)  # fmt: skip
def test_wrong_structures(tmp_path, tokenizer, obj, message):
    """Each is refused in one line on the way into the token cache (an empty source only once it is read whole)."""
    with pytest.raises(UserError, match=message):
        cache_of(tmp_path, tokenizer, obj)


def test_missing_file_and_unknown_format_and_bad_utf8(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        paragraphs(tmp_path / "nope.pkl")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(UserError, match="unknown data format"):
        paragraphs(tmp_path / "d.xlsx")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(UserError, match="not UTF-8"):
        paragraphs(tmp_path / "bad.txt")


def test_split_is_seeded_disjoint_and_complete(tmp_path, tokenizer):
    texts = [f"paragraph {i}" for i in range(100)] + ["paragraph 3", "paragraph 7"]  # two duplicates
    cache, _ = cache_of(tmp_path, tokenizer, texts)
    a, b = Split.of(cache, 1, 0.9), Split.of(cache, 1, 0.9)
    assert a.train_idx.tolist() == b.train_idx.tolist() and a.val_idx.tolist() == b.val_idx.tolist()
    train, validation = [texts[i] for i in a.train_idx], [texts[i] for i in a.val_idx]
    assert len(validation) == 10 and len(train) == 90
    assert not set(train) & set(validation)
    assert sorted(train + validation) == sorted(set(texts))
    assert Split.of(cache, 2, 0.9).val_idx.tolist() != a.val_idx.tolist()


def test_split_needs_two_paragraphs(tmp_path, tokenizer):
    cache, _ = cache_of(tmp_path, tokenizer, ["only one"])
    with pytest.raises(UserError, match="too few paragraphs"):
        Split.of(cache, 0, 0.9)


def test_saved_split_is_checked_against_the_data(tmp_path, tokenizer):
    cache, path = cache_of(tmp_path, tokenizer, [f"p{i}" for i in range(20)])
    split = Split.of(cache, 0, 0.8)
    saved = json.loads(json.dumps(split.to_json()))
    keys = lambda: iter(paragraphs(path))  # noqa: E731
    split.check(saved, cache, keys)  # the same data, seed and share: accepted
    other, other_path = cache_of(tmp_path, tokenizer, [f"q{i}" for i in range(20)], name="other.pkl")
    with pytest.raises(UserError, match="differs"):
        Split.of(other, 0, 0.8).check(saved, other, lambda: iter(paragraphs(other_path)))


@pytest.fixture(scope="module")
def paragraph_cache(tmp_path_factory, tokenizer):
    """A cache of paragraphs from 1 token to a few hundred."""
    texts = ["a", "Mr", "She said.", *make_paragraphs(40, seed=3), " ".join(make_paragraphs(12, seed=4))]
    cache, _ = cache_of(tmp_path_factory.mktemp("windows"), tokenizer, texts)
    assert min(cache.lengths) == 1 and max(cache.lengths) > 200
    return cache


def check_windows(cache, records, max_len):
    """Every window of each record fits, opens the record with <eos>, and together they predict every token of the
    record and the closing <eos> once, in order."""
    windows = cut_windows(cache, records, max_len)
    assert windows.record.tolist() == sorted(windows.record.tolist(), key=list(records).index)
    for r in records:
        mine = [windows.ids(k).tolist() for k in np.flatnonzero(windows.record == r)]
        assert mine and all(2 <= len(w) <= max_len for w in mine)
        assert [len(w) for w in mine] == [int(windows.lengths[k]) for k in np.flatnonzero(windows.record == r)]
        assert mine[0][0] == cache.eos_id
        targets = [t for w in mine for t in w[1:]]  # what each window predicts
        assert targets == [*cache.tokens(int(r)).tolist(), cache.eos_id]


@pytest.mark.parametrize("max_len", [2, 3, 4, 16, 100, 1000])
def test_windows_predict_every_token_exactly_once(paragraph_cache, max_len):
    check_windows(paragraph_cache, list(range(paragraph_cache.n_records)), max_len)


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


def test_book_text_handles_crlf_and_nul(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"a\r\nb\r\n\r\nc\x00d")
    assert paragraphs(tmp_path / "b.txt", keep_headings=True) == ["a b", "cd"]


def test_prepare_writes_the_pickle_dataset_atomically(tmp_path):
    from qlora_ft.cli import run_prepare

    (tmp_path / "b.txt").write_text("\n\n".join(TEXTS))
    out = tmp_path / "sub" / "austen_dataset.pkl"
    run_prepare([str(tmp_path / "b.txt")], str(out), None)
    assert pickle.loads(out.read_bytes()) == [{"sentence": t} for t in TEXTS]
    assert [p.name for p in out.parent.iterdir()] == ["austen_dataset.pkl"]  # no temp file left


@pytest.mark.parametrize("source", ["my books", "data/", "books/austen/", "./austen", "a/b/c"])
def test_a_missing_path_that_is_no_repository_id_is_a_missing_file(source):
    with pytest.raises(UserError, match=f"data file not found: {re.escape(source)}"):
        paragraphs(source)


def test_a_hub_dataset_missing_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot load dataset 'someone/absent'.*HF_HUB_OFFLINE"):
        paragraphs("someone/absent")
