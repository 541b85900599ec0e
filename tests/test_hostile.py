"""Hostile and odd inputs: each ends in a clear UserError (exit 2 at the CLI) or is handled correctly."""

import json
import pickle
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import build_tokenizer, make_paragraphs
from qlora_ft.config import TrainConfig
from qlora_ft.data.batches import cut_windows
from qlora_ft.data.prepare import Recipe, open_cache
from qlora_ft.data.records import clean_paragraph, iter_paragraphs
from qlora_ft.data.sources import detect_layout, resolve
from qlora_ft.data.split import Split
from qlora_ft.data.unpickle import safe_unpickle
from qlora_ft.errors import UserError
from qlora_ft.options import parse_config


def fuzz(examples: int = 100) -> settings:
    """`examples` examples, no deadline; fixtures (tmp_path, the tokenizer) are shared by the examples of a test."""
    return settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def paragraphs(path, **options) -> list[str]:
    """Every paragraph of a source, each part in turn."""
    return list(iter_paragraphs(resolve(str(path)), **options))


values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@fuzz(200)
@given(obj=values)
def test_any_pickled_structure_loads_or_is_a_user_error(tmp_path, tokenizer, obj):
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps(obj))
    try:
        texts = paragraphs(path)
    except UserError:
        return
    assert all(isinstance(t, str) and t and t == t.strip() for t in texts)
    if not texts:  # nothing to train on: refused on the way into the token cache
        with pytest.raises(UserError, match="the data is empty"):
            open_cache(str(path), tokenizer, Recipe(), cache_dir=tmp_path / "cache")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_never_escape_as_anything_but_a_user_error(data):
    try:
        safe_unpickle(data, "x.pkl")
    except UserError:
        pass


def reference_paragraphs(text: str, layout: str) -> list[str]:
    """The layouts' rules, written plainly: lines end at LF, CRLF or CR (a leading BOM is not text); a book's
    paragraphs are the runs of lines that are not blank, WikiText's every line that is not blank; each cleaned."""
    lines = re.split(r"\r\n|\r|\n", text.removeprefix("\ufeff"))
    if layout == "wikitext":
        blocks = [line for line in lines if line.strip()]
    else:
        blocks, block = [], []
        for line in [*lines, ""]:
            if line.strip():
                block.append(line)
            elif block:
                blocks, block = [*blocks, "\n".join(block)], []
    return [p for p in map(clean_paragraph, blocks) if p]


@fuzz(200)
@given(text=st.text())
def test_any_text_file_gives_clean_paragraphs_or_a_user_error(tmp_path, text):
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8", newline="")
    expected = reference_paragraphs(text, detect_layout(path))
    if not expected:  # nothing but whitespace: one line saying so
        with pytest.raises(UserError, match="no paragraphs found"):
            paragraphs(path, keep_headings=True)
        return
    texts = paragraphs(path, keep_headings=True)
    assert texts == expected
    assert paragraphs(path, keep_headings=True, layout="book") == reference_paragraphs(text, "book")
    assert all(p and "\n" not in p and "\x00" not in p and p == p.strip() for p in texts)


@fuzz(40)
@given(texts=st.lists(st.text(min_size=1), min_size=2, max_size=40, unique=True), seed=st.integers(0, 10))
def test_split_property_no_overlap_nothing_lost(tmp_path, tokenizer, texts, seed):
    """Through the token cache, as training splits: the sides share no paragraph and together hold each once."""
    cleaned = [t for t in dict.fromkeys(clean_paragraph(t) for t in texts) if t]
    if len(cleaned) < 2:
        return
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps(texts))
    cache = open_cache(str(path), tokenizer, Recipe(keep_headings=True), cache_dir=tmp_path / "cache")
    split = Split.of(cache, seed, 0.8)
    read = paragraphs(path, keep_headings=True)
    train, validation = [read[i] for i in split.train_idx], [read[i] for i in split.val_idx]
    assert not set(train) & set(validation)
    assert sorted(train + validation) == sorted(cleaned)


@pytest.fixture(scope="module")
def paragraph_cache(tmp_path_factory, tokenizer):
    """A cache of paragraphs from 1 token to a few hundred."""
    path = tmp_path_factory.mktemp("windows") / "d.pkl"
    path.write_bytes(pickle.dumps(["a", "She said.", *make_paragraphs(30, seed=5), " ".join(make_paragraphs(9))]))
    return open_cache(str(path), tokenizer, Recipe(), cache_dir=path.parent / "cache")


@fuzz()
@given(picked=st.lists(st.integers(0, 31), min_size=1, max_size=8, unique=True), max_len=st.integers(2, 64))
def test_windows_property(paragraph_cache, picked, max_len):
    windows = cut_windows(paragraph_cache, picked, max_len)
    assert all(2 <= n <= max_len for n in windows.lengths.tolist())
    for r in dict.fromkeys(picked):
        mine = np.flatnonzero(windows.record == r)
        ids = [windows.ids(k).tolist() for k in mine]
        assert [len(w) for w in ids] == windows.lengths[mine].tolist()
        assert [t for w in ids for t in w[1:]] == [*paragraph_cache.tokens(r).tolist(), paragraph_cache.eos_id]


def test_nul_bytes_and_invalid_utf8(tmp_path):
    (tmp_path / "nul.txt").write_bytes(b"One\x00 para.\n\nTwo.")
    assert paragraphs(tmp_path / "nul.txt") == ["One para.", "Two."]
    (tmp_path / "bad.txt").write_bytes(b"ok\n\n\xff\xfe broken")
    with pytest.raises(UserError, match="not UTF-8 .*offset 4"):
        paragraphs(tmp_path / "bad.txt")


@pytest.mark.slow
def test_a_10_mb_paragraph_is_cut_into_windows(tmp_path, tiny_model_dir):
    from qlora_ft.model import load_tokenizer

    words = ("she said that the letter was not her fortune " * 240_000)[: 10 * 2**20]
    (tmp_path / "big.pkl").write_bytes(pickle.dumps([{"sentence": words}, {"sentence": "A short one."}]))
    assert len(paragraphs(tmp_path / "big.pkl")[0]) > 10_000_000
    tok = load_tokenizer(str(tiny_model_dir))
    cache = open_cache(str(tmp_path / "big.pkl"), tok, Recipe(), cache_dir=tmp_path / "cache")
    windows = cut_windows(cache, [0], 512)
    assert len(windows) > 1000 and all(n <= 512 for n in windows.lengths.tolist())
    assert sum(len(windows.ids(k)) - 1 for k in range(len(windows))) == len(cache.tokens(0)) + 1


def test_conflicting_flags():
    with pytest.raises(UserError, match="conflicts"):
        parse_config(TrainConfig, ["--restore-file", "Epoch_2", "--load-checkpoint", "False"], "train.py")


def test_adapter_dir_with_a_wrong_adapter_config(tmp_path, tiny_model_dir):
    import torch

    from qlora_ft.config import ModelArgs
    from qlora_ft.model import add_lora, load_base, load_for_inference

    add_lora(load_base(str(tiny_model_dir), False, torch.float32, torch.device("cpu")), ModelArgs(rank_lora=4)
             ).save_pretrained(tmp_path / "a")  # fmt: skip
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    for broken in ({**config, "r": 16}, {**config, "target_modules": ["nope"]}, {**config, "peft_type": "???"}):
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(broken))
        with pytest.raises(UserError, match="cannot apply the adapter"):
            load_for_inference(str(tmp_path / "a"), None, False, torch.device("cpu"))


def test_an_error_exit_flushes_the_logs_and_closes_no_stream(capsys):
    """The error line follows the log lines, and no handler is closed: a library's handler may close the stream
    it was made with (absl's does), which an in-process caller may still be using."""
    import io
    import logging

    from qlora_ft.errors import UserError, exits_cleanly

    class ClosesItsStream(logging.StreamHandler):
        def close(self):
            self.stream.close()
            super().close()

    stream = io.StringIO()
    handler = ClosesItsStream(stream)
    logger = logging.getLogger("qlora_ft.test_errors")
    logger.addHandler(handler)

    @exits_cleanly("prog")
    def entry():
        logger.warning("before the error")
        raise UserError("bad input")

    try:
        with pytest.raises(SystemExit) as stop:
            entry()
        assert stop.value.code == 2 and not stream.closed
        assert stream.getvalue() == "before the error\n"
        assert capsys.readouterr().err == "prog: error: bad input\n"
    finally:
        logger.removeHandler(handler)
