"""Integration on ../shared: the real GPT-2 tokenizer and mini-gpt2-fiction (a GPT-2 pretrained on non-Austen
fiction) fine-tuned on Austen paragraphs. Skipped with a reason when ../shared is absent."""

import json
import pickle
import subprocess
import sys

import pytest

from conftest import ROOT, shared_or_skip
from qlora_ft.data.records import iter_paragraphs
from qlora_ft.data.sources import resolve


@pytest.fixture(scope="module")
def austen_subset(tmp_path_factory):
    """The first 600 paragraphs of Pride and Prejudice in the original pickle format, made with `prepare`."""
    books = shared_or_skip("data", "corpora", "austen")
    book = next(p for p in sorted(books.glob("*.txt")) if "ride" in p.name)
    work = tmp_path_factory.mktemp("austen")
    done = subprocess.run([sys.executable, "-m", "qlora_ft", "prepare", book, "--out", work / "full.pkl"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = pickle.loads((work / "full.pkl").read_bytes())
    assert len(rows) > 1000 and all(set(r) == {"sentence"} for r in rows)
    (work / "austen_dataset.pkl").write_bytes(pickle.dumps(rows[:600]))
    return work


def test_all_austen_books_load(tmp_path):
    books = resolve(str(shared_or_skip("data", "corpora", "austen")))
    paragraphs = sum(1 for _ in iter_paragraphs(books, keep_headings=True))
    assert paragraphs == 9261  # the paragraph count ../shared/README.md gives (headings included)


def test_gpt2_tokenizer_files():
    from qlora_ft.model import load_tokenizer

    tok = load_tokenizer(str(shared_or_skip("data", "gpt2-tokenizer")))
    assert len(tok) == 50257 and tok.eos_token_id == 50256 and tok.pad_token_id == 50256


@pytest.mark.slow
def test_mini_gpt2_learns_austen_and_generates(austen_subset):
    model = shared_or_skip("models", "mini-gpt2-fiction")
    common = ["--qlora", "True", "--model", str(model), "--data", "austen_dataset.pkl", "--max-steps", "24",
              "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "4", "--sample-every", "12",
              "--max-output-length", "20", "--save-every-steps", "12", "--log-every", "4"]  # fmt: skip
    train = subprocess.run([sys.executable, str(ROOT / "train.py"), *common], cwd=austen_subset, capture_output=True,
                           text=True, timeout=900)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    out = austen_subset / "GPT2_fine_tuned_Austen"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.2, summary  # a real style shift
    assert "4-bit NF4 base + LoRA" in train.stderr

    resume = subprocess.run([sys.executable, str(ROOT / "train.py"), *common, "--restore-file", "step-000012",
                             "--load-checkpoint", "True", "--output-dir", "resumed"], cwd=austen_subset,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert resume.returncode == 0, resume.stderr[-3000:]
    resumed = json.loads((austen_subset / "resumed" / "train_summary.json").read_text())
    assert resumed["final_val_loss"] == summary["final_val_loss"]  # bit-exact resume on the real model

    gen = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--model_path", "GPT2_fine_tuned_Austen",
                          "--prompt", "It is a truth universally acknowledged", "--max_length", "20"],
                         cwd=austen_subset, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.count("It is a truth universally acknowledged") == 3
