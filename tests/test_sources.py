"""Streaming readers: book and WikiText layouts, tiny read buffers, folders, JSONL, parquet, saved datasets."""

from __future__ import annotations

import json

import pytest

from qlora_ft import sources
from qlora_ft.data import load_corpus, read_text_file, split_text
from qlora_ft.errors import UserError

WIKI = (
    " \n = Valkyria Chronicles III = \n \n"
    " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game . \n"
    " The game began development in 2010 , carrying over a large portion of the work . \n \n"
    " = = Gameplay = = \n \n"
    " As with previous Valkyira Chronicles games , it is a tactical role @-@ playing game . \n"
    " = = = Story = = = \n"
    " The game takes place during the Second Europan War . \n \n"
)
WIKI_PARAGRAPHS = [
    "Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game .",
    "The game began development in 2010 , carrying over a large portion of the work .",
    "As with previous Valkyira Chronicles games , it is a tactical role @-@ playing game .",
    "The game takes place during the Second Europan War .",
]
BOOK = (
    "\ufeffCHAPTER I\r\n\r\nIt is a truth universally\r\nacknowledged, that a single man — in possession\r\n"
    "of a good fortune, must be in want of a wife.\r\n   \r\nHowever little known the feelings — “or views”\r\n"
    "of such a man may be.\r\n\r\n\r\n12.\r\n\r\nMr. Bennet replied that he had not.\r\n"
)
BOOK_PARAGRAPHS = [
    "It is a truth universally acknowledged, that a single man — in possession of a good fortune, must be in "
    "want of a wife.",
    "However little known the feelings — “or views” of such a man may be.",
    "Mr. Bennet replied that he had not.",
]


def _write(path, text: str):
    path.write_bytes(text.encode("utf-8"))
    return path


def test_wikitext_layout_gives_one_paragraph_per_line_and_drops_headings(tmp_path):
    path = _write(tmp_path / "wiki.train.raw.txt", WIKI)
    assert sources.detect_layout(path) == "wikitext"
    assert list(sources.iter_paragraphs(str(path))) == WIKI_PARAGRAPHS
    kept = list(sources.iter_paragraphs(str(path), keep_headings=True))
    assert kept[0] == "= Valkyria Chronicles III =" and "= = = Story = = =" in kept and len(kept) == 7
    assert len(load_corpus(str(path)).train) == 1  # the old reader: one paragraph for the whole file


def test_book_layout_whitespace_lines_end_paragraphs_and_headings_drop(tmp_path):
    path = _write(tmp_path / "book.txt", BOOK)
    assert sources.detect_layout(path) == "book"
    assert list(sources.iter_paragraphs(str(path))) == BOOK_PARAGRAPHS
    assert list(sources.iter_paragraphs(str(path), keep_headings=True)) == ["CHAPTER I", *BOOK_PARAGRAPHS[:2], "12.",
                                                                           BOOK_PARAGRAPHS[2]]  # fmt: skip


@pytest.mark.parametrize("text", [BOOK, WIKI])
def test_file_bigger_than_the_read_buffer(tmp_path, text):
    once = list(sources.iter_paragraphs(str(_write(tmp_path / "once.txt", text)), keep_headings=True))
    path = _write(tmp_path / "big.txt", text + ("\n" + text.lstrip("\ufeff")) * 4)
    for buffer_size in (1, 3, 7, 64):
        assert list(sources.iter_paragraphs(str(path), keep_headings=True, buffer_size=buffer_size)) == once * 5


def test_book_reader_matches_split_text_on_a_shared_book():
    from conftest import shared_or_skip

    path = shared_or_skip("data", "corpora", "austen", "northanger_abbey.txt")
    streamed = list(sources.iter_paragraphs(str(path), keep_headings=True, buffer_size=4096))
    assert streamed == split_text(read_text_file(path))
    assert len(list(sources.iter_paragraphs(str(path)))) < len(streamed)  # its chapter headings are dropped


def test_not_utf8_names_the_file_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"Fine line.\n\nCaf\xe9 au lait.\n")
    with pytest.raises(UserError, match=r"latin1.txt is not UTF-8 text \(invalid byte at offset 15\)"):
        list(sources.iter_paragraphs(str(path), buffer_size=4))


def test_folder_of_text_files_in_name_order(tmp_path):
    _write(tmp_path / "b.txt", "Second book.\n")
    _write(tmp_path / "a.txt", "First book,\nwrapped.\n\nStill first.\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert list(sources.iter_paragraphs(str(tmp_path))) == ["First book, wrapped.", "Still first.", "Second book."]


def test_jsonl_objects_and_strings(tmp_path):
    lines = [json.dumps({"text": "One  two.", "id": 1}), "", json.dumps({"text": None}), json.dumps({"text": "Three."})]
    path = _write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    assert list(sources.iter_paragraphs(str(path))) == ["One two.", "Three."]
    _write(path, json.dumps("A string record.") + "\n{bad json\n")
    with pytest.raises(UserError, match=r"d.jsonl: line 2 is not valid JSON"):
        list(sources.iter_paragraphs(str(path)))
    _write(path, json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match="no text column found among body"):
        list(sources.iter_paragraphs(str(path)))


def test_parquet_read_in_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"Paragraph number {i}." for i in range(25)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": list(range(25)), "paragraph": texts}), path, row_group_size=10)
    assert list(sources.iter_parquet(path, None, batch_rows=3)) == texts
    assert list(sources.iter_paragraphs(str(path))) == texts
    with pytest.raises(UserError, match="no column 'body'"):
        list(sources.iter_paragraphs(str(path), text_column="body"))


def test_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["Alpha one.", "CHAPTER II", "Beta  two."], "n": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "flat"))
    assert list(sources.iter_paragraphs(str(tmp_path / "flat"))) == ["Alpha one.", "Beta two."]
    assert sources.source_splits(str(tmp_path / "flat")) is None
    dd = datasets.DatasetDict({"train": ds, "valid": datasets.Dataset.from_dict({"text": ["Gamma.", "Delta."]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    source = str(tmp_path / "dict")
    assert sources.source_splits(source) == ("train", "validation")
    assert list(sources.iter_paragraphs(source, split="train")) == ["Alpha one.", "Beta two."]
    assert list(sources.iter_paragraphs(source, split="validation")) == ["Gamma.", "Delta."]


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(UserError, match="data file not found: nowhere/x.txt"):
        sources.resolve("nowhere/x.txt")
    with pytest.raises(UserError, match="unknown data format '.docx'"):
        sources.resolve(str(_write(tmp_path / "x.docx", "hi")))


@pytest.mark.parametrize("suffix", [".csv", ".json", ".pkl"])
def test_a_table_read_for_the_cache_uses_the_named_text_column(tmp_path, suffix):
    """`--data reviews.csv --text-column body`: a table whose columns match no known text name is read through
    the column the user named, when the cache checks whether it is pre-split as well as when it reads it."""
    import pandas as pd

    frame = pd.DataFrame({"id": [1, 2, 3], "body": ["First review.", "Second review.", "Third review."]})
    path = tmp_path / f"reviews{suffix}"
    {".csv": lambda: frame.to_csv(path, index=False), ".json": lambda: frame.to_json(path, orient="records"),
     ".pkl": lambda: frame.to_pickle(path)}[suffix]()  # fmt: skip
    assert sources.source_splits(str(path), text_column="body") is None
    assert sources.read_corpus(str(path), text_column="body").train == list(frame["body"])
    with pytest.raises(UserError, match="no text column"):
        sources.source_splits(str(path))
