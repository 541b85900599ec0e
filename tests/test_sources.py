"""Streaming readers: book and WikiText layouts, tiny read buffers, folders, JSONL, parquet, saved datasets."""

from __future__ import annotations

import json
import re

import pytest

from qlora_ft.data import sources
from qlora_ft.data.prepare import Recipe, _locate, open_cache
from qlora_ft.data.records import clean_paragraph, iter_paragraphs
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


def paragraphs(path, **options) -> list[str]:
    return list(iter_paragraphs(sources.resolve(str(path)), **options))


def raw_paragraphs(path, buffer_size: int) -> list[str]:
    """The paragraphs of a text file read `buffer_size` bytes at a time, cleaned (headings kept)."""
    return [clean_paragraph(p) for p in sources.iter_text_file(path, "auto", buffer_size=buffer_size)]


def test_wikitext_layout_gives_one_paragraph_per_line_and_drops_headings(tmp_path):
    path = _write(tmp_path / "wiki.train.raw.txt", WIKI)
    assert sources.detect_layout(path) == "wikitext"
    assert paragraphs(path) == WIKI_PARAGRAPHS
    kept = paragraphs(path, keep_headings=True)
    assert kept[0] == "= Valkyria Chronicles III =" and "= = = Story = = =" in kept and len(kept) == 7
    # read as a book, the lines of a section run together into one paragraph, with a heading inside it
    assert paragraphs(path, layout="book") == [" ".join(WIKI_PARAGRAPHS[:2]),
                                               " ".join([WIKI_PARAGRAPHS[2], "= = = Story = = =",
                                                         WIKI_PARAGRAPHS[3]])]  # fmt: skip


def test_book_layout_whitespace_lines_end_paragraphs_and_headings_drop(tmp_path):
    path = _write(tmp_path / "book.txt", BOOK)
    assert sources.detect_layout(path) == "book"
    assert paragraphs(path) == BOOK_PARAGRAPHS
    assert paragraphs(path, keep_headings=True) == ["CHAPTER I", *BOOK_PARAGRAPHS[:2], "12.",
                                                    BOOK_PARAGRAPHS[2]]  # fmt: skip


@pytest.mark.parametrize("text", [BOOK, WIKI])
def test_file_bigger_than_the_read_buffer(tmp_path, text):
    once = paragraphs(_write(tmp_path / "once.txt", text), keep_headings=True)
    path = _write(tmp_path / "big.txt", text + ("\n" + text.lstrip("\ufeff")) * 4)
    assert paragraphs(path, keep_headings=True) == once * 5
    for buffer_size in (1, 3, 7, 64):
        assert raw_paragraphs(path, buffer_size) == once * 5


def test_book_reader_matches_a_whole_file_split_on_a_shared_book():
    """Streamed in small reads, a book gives the paragraphs of the whole text split at its blank lines."""
    from conftest import shared_or_skip

    path = shared_or_skip("data", "corpora", "austen", "northanger_abbey.txt")
    streamed = raw_paragraphs(path, buffer_size=4096)
    text = sources.read_text_file(path).replace("\r\n", "\n").replace("\r", "\n")
    whole = [p for p in map(clean_paragraph, re.split(r"\n[^\S\n]*\n", text)) if p]
    assert streamed == whole == paragraphs(path, keep_headings=True)
    assert len(paragraphs(path)) < len(streamed)  # its chapter headings are dropped


def test_not_utf8_names_the_file_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"Fine line.\n\nCaf\xe9 au lait.\n")
    with pytest.raises(UserError, match=r"latin1.txt is not UTF-8 text \(invalid byte at offset 15\)"):
        list(sources.iter_text_file(path, buffer_size=4))
    with pytest.raises(UserError, match=r"latin1.txt is not UTF-8 text \(invalid byte at offset 15\)"):
        paragraphs(path)


def test_folder_of_text_files_in_name_order(tmp_path):
    _write(tmp_path / "b.txt", "Second book.\n")
    _write(tmp_path / "a.txt", "First book,\nwrapped.\n\nStill first.\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert paragraphs(tmp_path) == ["First book, wrapped.", "Still first.", "Second book."]


def test_jsonl_objects_and_strings(tmp_path):
    lines = [json.dumps({"text": "One  two.", "id": 1}), "", json.dumps({"text": None}), json.dumps({"text": "Three."})]
    path = _write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    assert paragraphs(path) == ["One two.", "Three."]
    _write(path, json.dumps("A string record.") + "\n{bad json\n")
    with pytest.raises(UserError, match=r"d.jsonl: line 2 is not valid JSON"):
        paragraphs(path)
    _write(path, json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match="no text column found among body"):
        paragraphs(path)


def test_parquet_read_in_batches(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"Paragraph number {i}." for i in range(25)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": list(range(25)), "paragraph": texts}), path, row_group_size=10)
    monkeypatch.setattr(sources, "BATCH_ROWS", 3)
    assert [row["paragraph"] for row in sources.iter_parquet(path, None)] == texts
    assert list(sources.iter_parquet(path, ["paragraph"])) == [{"paragraph": t} for t in texts]  # only that column
    assert paragraphs(path) == texts
    with pytest.raises(UserError, match="no column 'body'"):
        paragraphs(path, text_column="body")


def test_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["Alpha one.", "CHAPTER II", "Beta  two."], "n": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "flat"))
    assert paragraphs(tmp_path / "flat") == ["Alpha one.", "Beta two."]
    assert sources.resolve(str(tmp_path / "flat")).parts() is None
    dd = datasets.DatasetDict({"train": ds, "valid": datasets.Dataset.from_dict({"text": ["Gamma.", "Delta."]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    source = sources.resolve(str(tmp_path / "dict"))
    assert source.parts() == ("train", "valid")  # "valid" names the validation part too
    assert list(iter_paragraphs(source, part="train")) == ["Alpha one.", "Beta two."]
    assert list(iter_paragraphs(source, part="valid")) == ["Gamma.", "Delta."]


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
    from conftest import build_tokenizer

    assert sources.resolve(str(path)).parts() is None
    assert paragraphs(path, text_column="body") == list(frame["body"])
    tokenizer = build_tokenizer()
    cache = open_cache(str(path), tokenizer, Recipe(text_column="body"), cache_dir=tmp_path / "cache")
    assert [tokenizer.decode(cache.tokens(i)) for i in range(cache.n_records)] == list(frame["body"])
    with pytest.raises(UserError, match="no text column"):
        open_cache(str(path), tokenizer, Recipe(), cache_dir=tmp_path / "cache")


def test_a_csv_file_is_read_in_chunks_of_rows(tmp_path):
    """A CSV file streams: its first rows come before a bad row far down the file is parsed (then named)."""
    path = tmp_path / "d.csv"
    path.write_text("text\n" + "".join(f"Row {i}.\n" for i in range(20_000)) + "one,two,three\n")
    src = sources.resolve(str(path))
    read = sources.rows(src)
    assert next(read) == {"text": "Row 0."} and sources.columns(src) == ["text"]
    with pytest.raises(UserError, match="cannot read .*d.csv"):
        list(read)


def test_the_demo_source_is_a_book_shipped_with_the_package(tmp_path):
    src = sources.resolve("demo:austen")
    assert src.kind == "text" and src.plain_text and src.files[0].is_file()
    paragraphs = list(iter_paragraphs(src))
    assert len(paragraphs) > 700 and paragraphs[0] == "NORTHANGER ABBEY"
    assert any(p.startswith("No one who had ever seen Catherine Morland") for p in paragraphs)
    with pytest.raises(UserError, match=r"unknown demo data 'demo:dickens' \(known: demo:austen\)"):
        sources.resolve("demo:dickens")
    assert _locate("demo:austen", tmp_path / "run") == "demo:austen"  # eval finds a demo run's data from anywhere
