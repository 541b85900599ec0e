"""Hostile and odd inputs: each ends in a clear UserError (exit 2 at the CLI) or is handled correctly."""

import json
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_ft.config import TrainConfig
from qlora_ft.data import Corpus, load_corpus, safe_unpickle, split_corpus, split_text, to_windows
from qlora_ft.errors import UserError
from qlora_ft.options import parse_config

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(obj=values)
def test_any_pickled_structure_loads_or_is_a_user_error(tmp_path, obj):
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps(obj))
    try:
        corpus = load_corpus(str(path))
    except UserError:
        return
    assert corpus.train or corpus.validation
    assert all(isinstance(t, str) and t and t == t.strip() for t in corpus.train + (corpus.validation or []))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_never_escape_as_anything_but_a_user_error(data):
    try:
        safe_unpickle(data, "x.pkl")
    except UserError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_any_text_file_gives_clean_paragraphs_or_a_user_error(tmp_path, text):
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    try:
        corpus = load_corpus(str(path))
    except UserError as e:
        assert "no paragraphs" in str(e)
        return
    assert corpus.train == split_text(text)
    assert all(p and "\n" not in p and "\x00" not in p for p in corpus.train)


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(st.text(min_size=1), min_size=2, max_size=40, unique=True), seed=st.integers(0, 10))
def test_split_property_no_overlap_nothing_lost(texts, seed):
    cleaned = [t for t in dict.fromkeys(" ".join(t.split()) for t in texts) if t]
    if len(cleaned) < 2:
        return
    split = split_corpus(Corpus(cleaned), 0.8, seed)
    assert not set(split.train) & set(split.validation)
    assert sorted(split.train + split.validation) == sorted(cleaned)


@given(ids=st.lists(st.integers(1, 1000), max_size=300), max_len=st.integers(2, 64))
def test_windows_property(ids, max_len):
    windows = to_windows(ids, 0, max_len)
    assert all(len(w) <= max_len for w in windows)
    assert [t for w in windows for t in w[1:]] == ids + [0]


def test_nul_bytes_and_invalid_utf8(tmp_path):
    (tmp_path / "nul.txt").write_bytes(b"One\x00 para.\n\nTwo.")
    assert load_corpus(str(tmp_path / "nul.txt")).train == ["One para.", "Two."]
    (tmp_path / "bad.txt").write_bytes(b"ok\n\n\xff\xfe broken")
    with pytest.raises(UserError, match="not UTF-8 .*offset 4"):
        load_corpus(str(tmp_path / "bad.txt"))


@pytest.mark.slow
def test_a_10_mb_paragraph_is_cut_into_windows(tmp_path, tiny_model_dir):
    from qlora_ft.data import windows_for
    from qlora_ft.model import load_tokenizer

    words = ("she said that the letter was not her fortune " * 240_000)[: 10 * 2**20]
    (tmp_path / "big.pkl").write_bytes(pickle.dumps([{"sentence": words}, {"sentence": "A short one."}]))
    corpus = load_corpus(str(tmp_path / "big.pkl"))
    assert len(corpus.train[0]) > 10_000_000
    tok = load_tokenizer(str(tiny_model_dir))
    windows = windows_for(tok, corpus.train[:1], 512)
    assert len(windows) > 1000 and all(len(w) <= 512 for w in windows)


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
