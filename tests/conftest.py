"""Shared fixtures: a tiny random GPT-2 and a tiny byte-level BPE tokenizer, built in the test session."""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# token caches go to a folder of this test session (subprocesses inherit it), never the user's ~/.cache
os.environ["QLORA_FT_CACHE"] = tempfile.mkdtemp(prefix="qlora-ft-test-cache-")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

WORDS = (
    "the a she he it was had not her his to of and in that with for as but be have said would could "
    "Elizabeth Darcy Emma Mr Mrs Miss Bennet sister letter morning evening house ball dance walk "
    "truth universally acknowledged fortune wife happy silent felt thought manner pride prejudice"
).split()


def make_paragraphs(n: int, seed: int = 0) -> list[str]:
    """`n` distinct pseudo-sentences of 3..40 words."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 40))]
        out.append(f"{' '.join(words).capitalize()} {i}.")
    return out


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(make_paragraphs(300, seed=1), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def build_model_dir(path: Path, n_layer: int = 2, n_embd: int = 64, n_positions: int = 128, tokenizer=None) -> Path:
    """A random GPT-2 (seeded) and its tokenizer (default: the tiny one of `build_tokenizer`) saved in `path`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tokenizer or build_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=2,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def paragraphs() -> list[str]:
    return make_paragraphs(60)


@pytest.fixture
def data_pkl(tmp_path, paragraphs) -> Path:
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps([{"sentence": p} for p in paragraphs]))
    return path


def shared_or_skip(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (integration data lives in ../shared beside the checkout)")
    return path


class ListWindows:
    """Windows given as lists (ids, and loss masks or None), for tests of the batch builder without a cache."""

    def __init__(self, ids, masks=None):
        self._ids, self._masks = ids, masks
        self.lengths = [len(w) for w in ids]
        self.masked = masks is not None

    def __len__(self):
        return len(self._ids)

    def __iter__(self):
        return iter(self._ids)

    def ids(self, k):
        return self._ids[k]

    def mask(self, k):
        return self._masks[k]
