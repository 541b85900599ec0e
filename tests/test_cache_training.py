"""Training on plain text through the token cache: the split, windows and batches computed by hand from the seed
and the tokenizer, checkpoints that record (fingerprint, seed, train share), a resume that survives a deleted
cache, and a bounded validation subset (--eval-max-tokens)."""

import hashlib
import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from test_cache import expected_split, expected_windows
from test_loop import adapter, assert_same_adapter, losses

from conftest import ListWindows
from qlora_ft.checkpoint import list_checkpoints
from qlora_ft.config import TrainConfig
from qlora_ft.data import records, sources
from qlora_ft.data.batches import make_batch, validation_subset
from qlora_ft.data.prepare import prepare_data
from qlora_ft.errors import UserError
from qlora_ft.loop import train
from qlora_ft.model import load_tokenizer
from qlora_ft.options import parse_config
from qlora_ft.training.plan import EpochPlan
from qlora_ft.training.setup import validation_batches


def config(tmp_path, data, model_dir, *argv, run="run"):
    base = ["--data", str(data), "--model", str(model_dir), "--batch-size", "3", "--max-input-length", "24",
            "--rank-lora", "4", "--lr", "5e-3", "--warmup-steps", "1", "--sample-every", "0", "--log-every", "1",
            "--check-dir", str(tmp_path / f"ckpt-{run}"), "--output-dir", str(tmp_path / run),
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    return parse_config(TrainConfig, base + list(argv), "train.py")


def _all_ids(windows) -> list[list[int]]:
    return [windows.ids(k).tolist() for k in range(len(windows))]


def test_the_cache_gives_the_seeded_split_and_the_windows_plan_and_batches_cut_by_hand(
    tmp_path, data_pkl, tiny_model_dir, paragraphs
):
    cfg = config(tmp_path, data_pkl, tiny_model_dir)
    tok = load_tokenizer(str(tiny_model_dir))
    cached = prepare_data(cfg, tok)
    assert (tmp_path / "cache" / cached.split.fingerprint / "ids.bin").is_file()  # it really read the cache
    train, val = expected_split(paragraphs, seed=42, train_share=0.9)
    # no duplicates here: record i = paragraph i
    assert [paragraphs[i] for i in cached.split.train_idx] == train == cached.read(cached.split.train_idx)
    assert [paragraphs[i] for i in cached.split.val_idx] == val == cached.read(cached.split.val_idx)
    by_hand = {"train": expected_windows(tok, train, 24), "validation": expected_windows(tok, val, 24)}
    for part, expected in by_hand.items():
        windows = getattr(cached, part)
        assert _all_ids(windows) == expected and windows.lengths.tolist() == [len(w) for w in expected]
        assert not windows.masked
    memory = ListWindows(by_hand["train"])
    plans = [EpochPlan(w.lengths, 24, True, 3, 1, 1, 42) for w in (cached.train, memory)]
    assert plans[0].batches(1) == plans[1].batches(1)
    for rows in plans[0].batches(1)[:4]:
        a, b = make_batch(rows, cached.train, 0), make_batch(rows, memory, 0)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_records_the_split_as_fingerprint_seed_and_share(tmp_path, data_pkl, tiny_model_dir):
    train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "2", "--seed", "5"))
    split = json.loads((tmp_path / "ckpt-run" / "step-000002" / "split.json").read_text())
    (cache,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert split["cache_fingerprint"] == cache.name and split["seed"] == 5 and split["train_size"] == 0.9
    assert "train" not in split  # no list of indices
    assert split["n_train"] + split["n_validation"] == json.loads((cache / "meta.json").read_text())["n_records"]


def test_resume_through_the_cache_is_bit_exact_even_after_the_cache_is_deleted(tmp_path, data_pkl, tiny_model_dir):
    args = ("--max-steps", "6", "--save-every-steps", "3", "--lora-dropout", "0.1")
    train(config(tmp_path, data_pkl, tiny_model_dir, *args, run="full"))
    shutil.copytree(tmp_path / "ckpt-full", tmp_path / "ckpt-resumed")
    shutil.rmtree(tmp_path / "ckpt-resumed" / "step-000006")
    (tmp_path / "ckpt-resumed" / "latest").write_text("step-000003\n")
    shutil.rmtree(tmp_path / "cache")  # rebuilt from the data: the same fingerprint, hence the same split
    train(config(tmp_path, data_pkl, tiny_model_dir, *args, "--restore-file", "step-000003", run="resumed"))
    assert_same_adapter(adapter(tmp_path / "full"), adapter(tmp_path / "resumed"))
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6] and all(full[s] == resumed[s] for s in resumed)
    assert list_checkpoints(tmp_path / "ckpt-resumed")[-1] == "step-000006"


def test_resume_refuses_changed_data_or_seed(tmp_path, data_pkl, tiny_model_dir, paragraphs):
    train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "2"))
    with pytest.raises(UserError, match="--seed 42 \\(this run: 7\\)"):
        train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "4", "--seed", "7", "--restore-file",
                     "step-000002"))  # fmt: skip
    data_pkl.write_bytes(pickle.dumps([{"sentence": p} for p in paragraphs[:-1]] + [{"sentence": "Changed."}]))
    with pytest.raises(UserError, match="the data differs from the data this checkpoint was trained on"):
        train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "4", "--restore-file", "step-000002"))


def test_validation_subset_is_seeded_bounded_and_whole_when_small():
    lengths = [10] * 100
    subset = validation_subset(lengths, 95, seed=3)
    assert len(subset) == 9 and subset == sorted(subset) and subset == validation_subset(lengths, 95, seed=3)
    assert subset != validation_subset(lengths, 95, seed=4)
    assert validation_subset(lengths, 0, seed=3) == validation_subset(lengths, 1000, seed=3) == list(range(100))
    assert validation_subset([50, 60], 10, seed=0) in ([0], [1])  # never empty


def test_eval_max_tokens_bounds_validation_and_keeps_the_same_subset(tmp_path, data_pkl, tiny_model_dir, caplog):
    tok = load_tokenizer(str(tiny_model_dir))
    cfg = config(tmp_path, data_pkl, tiny_model_dir, "--eval-max-tokens", "40")
    data = prepare_data(cfg, tok)
    with caplog.at_level(logging.INFO, logger="qlora_ft"):
        batches = validation_batches(cfg, data, tok.pad_token_id)
    scored = sum(int(b["n_tokens"]) for b in batches)
    assert 0 < scored <= 40 < sum(data.validation.lengths)
    assert any(m.startswith("validation: ") and "--eval-max-tokens 40" in m for m in caplog.messages)
    again = validation_batches(cfg, data, tok.pad_token_id)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again, strict=True))
    everything = validation_batches(config(tmp_path, data_pkl, tiny_model_dir, "--eval-max-tokens", "0"), data,
                                    tok.pad_token_id)  # fmt: skip
    assert sum(int(b["n_tokens"]) for b in everything) == sum(data.validation.lengths)


def test_mode_detection_reads_a_sample_of_large_formats_not_all_of_it(tmp_path):
    import pandas as pd

    rows = [json.dumps({"instruction": f"Say {i}.", "output": str(i)}) for i in range(1500)]
    jsonl = tmp_path / "big.jsonl"
    jsonl.write_text("\n".join(rows[:1200] + ["not json: beyond the sample"] + rows[1200:]) + "\n")
    assert records.data_mode(sources.resolve(str(jsonl)), "auto", None) == "instruction"
    parquet = tmp_path / "t.parquet"
    pd.DataFrame({"text": ["a b c", "d e f"]}).to_parquet(parquet)
    table = sources.resolve(str(parquet))
    assert sources.columns(table) == ["text"] and records.data_mode(table, "auto", None) == "text"


def test_eval_holds_out_the_paragraphs_training_validated_on_for_a_wikitext_file(tmp_path, tiny_model_dir, paragraphs):
    from qlora_ft.evaluate import _held_out

    lines = [" = Title = ", " "]
    for i, p in enumerate(paragraphs):
        lines += ([" = = Section = = ", " "] if i % 10 == 0 else []) + [f" {p} ", " "]
    wiki = tmp_path / "wiki.train.raw.txt"
    wiki.write_text("\n".join(lines) + "\n")
    cfg = config(tmp_path, wiki, tiny_model_dir)
    tok = load_tokenizer(str(tiny_model_dir))
    trained = prepare_data(cfg, tok)
    assert len(trained.split.train_idx) + len(trained.split.val_idx) == len(paragraphs)  # headings dropped
    args = parse_config(TrainConfig, ["--data", str(wiki)], "train.py").data  # stands in for eval's options
    args.data, args.contrast, args.batch_size = None, None, 4
    held = _held_out(args, cfg, tmp_path, tok)
    assert expected_windows(tok, held["texts"], 24) == _all_ids(trained.validation)
    assert held["texts"] == expected_split(paragraphs, seed=42, train_share=0.9)[1]


def test_text_validation_data_is_the_validation_side(tmp_path, data_pkl, tiny_model_dir, paragraphs):
    val = tmp_path / "val.txt"
    val.write_text("\n\n".join(paragraphs[:5] + ["A paragraph only the validation file holds."]) + "\n")
    cfg = config(tmp_path, data_pkl, tiny_model_dir, "--validation-data", str(val))
    data = prepare_data(cfg, load_tokenizer(str(tiny_model_dir)))
    # the 5 paragraphs in both files are kept on the validation side only
    assert (len(data.split.train_idx), len(data.split.val_idx)) == (len(paragraphs) - 5, 6)


def test_eval_of_a_run_with_validation_data_holds_out_that_data(tmp_path, data_pkl, tiny_model_dir, paragraphs):
    """A text run trained with --validation-data is evaluated on the windows it validated on (that file's
    paragraphs), not on a seeded share of --data that it trained on."""
    from qlora_ft.evaluate import _held_out

    val = tmp_path / "val.txt"
    val.write_text("\n\n".join(paragraphs[:5] + ["A paragraph only the validation file holds."]) + "\n")
    cfg = config(tmp_path, data_pkl, tiny_model_dir, "--validation-data", str(val))
    tok = load_tokenizer(str(tiny_model_dir))
    trained = prepare_data(cfg, tok)
    args = parse_config(TrainConfig, ["--data", str(data_pkl)], "train.py").data  # stands in for eval's options
    args.data, args.contrast, args.batch_size = None, None, 4
    held = _held_out(args, cfg, tmp_path, tok)
    assert held["texts"] == paragraphs[:5] + ["A paragraph only the validation file holds."]
    assert expected_windows(tok, held["texts"], 24) == _all_ids(trained.validation)
    assert not set(held["texts"]) & set(held["train"])


def listed_split_json(paragraphs: list[str], seed: int, train_share: float) -> dict:
    """split.json as earlier versions wrote it: indices into the distinct paragraphs (load order) of each side,
    with a SHA-256 of those paragraphs, each followed by a NUL byte."""
    distinct = list(dict.fromkeys(paragraphs))
    digest = hashlib.sha256(b"".join(p.encode("utf-8") + b"\x00" for p in distinct)).hexdigest()
    train, val = expected_split(paragraphs, seed, train_share)
    return {"data_sha256": digest, "n_paragraphs": len(distinct), "train": [distinct.index(p) for p in train],
            "validation": [distinct.index(p) for p in val]}  # fmt: skip


def test_a_checkpoint_whose_split_lists_indices_resumes_exactly(tmp_path, data_pkl, tiny_model_dir, paragraphs):
    """Checkpoints of earlier versions list paragraph indices in split.json: they resume on the same split,
    bit-exact."""
    from qlora_ft import checkpoint

    args = ("--max-steps", "4", "--save-every-steps", "2")
    train(config(tmp_path, data_pkl, tiny_model_dir, *args, run="full"))
    shutil.copytree(tmp_path / "ckpt-full", tmp_path / "ckpt-old")
    folder = tmp_path / "ckpt-old" / "step-000002"
    shutil.rmtree(tmp_path / "ckpt-old" / "step-000004")
    (tmp_path / "ckpt-old" / "latest").write_text("step-000002\n")
    old = listed_split_json(paragraphs, 42, 0.9)  # what an earlier version wrote
    resumed = prepare_data(config(tmp_path, data_pkl, tiny_model_dir), load_tokenizer(str(tiny_model_dir)), old)
    assert resumed.split.train_idx.tolist() == old["train"] and resumed.split.val_idx.tolist() == old["validation"]
    (folder / "split.json").write_text(json.dumps(old))
    checkpoint.write_manifest(folder, json.loads((folder / "run_config.json").read_text()), old)
    train(config(tmp_path, data_pkl, tiny_model_dir, *args, "--check-dir", str(tmp_path / "ckpt-old"),
                 "--restore-file", "step-000002", run="resumed"))  # fmt: skip
    assert_same_adapter(adapter(tmp_path / "full"), adapter(tmp_path / "resumed"))
    saved = [json.loads((tmp_path / d / "step-000004" / "split.json").read_text()) for d in ("ckpt-full", "ckpt-old")]
    assert saved[0] == saved[1] and (saved[1]["n_train"], saved[1]["n_validation"]) == (54, 6)


def cached_hub_dataset(cache: Path, name: str, rows: list[str]) -> None:
    """`name` as the Hugging Face cache holds a downloaded hub dataset: a snapshot of its data files under a
    revision that refs/main points at."""
    import pandas as pd

    repo = cache / f"datasets--{name.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    pd.DataFrame({"text": rows}).to_csv(snapshot / "train.csv", index=False)


def test_hub_validation_data_beside_local_text(tmp_path, data_pkl, tiny_model_dir, paragraphs, monkeypatch):
    """--validation-data naming a hub dataset (here one in the local cache, loaded offline) beside local --data
    is the validation side, as a local file would be."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    held = ["A paragraph only the hub dataset holds.", "And a second one, also only there."]
    cached_hub_dataset(tmp_path / "hub", "someone/held-out", held)
    cfg = config(tmp_path, data_pkl, tiny_model_dir, "--validation-data", "someone/held-out")
    data = prepare_data(cfg, load_tokenizer(str(tiny_model_dir)))
    assert data.read(data.split.val_idx) == held and len(data.split.train_idx) == len(paragraphs)
