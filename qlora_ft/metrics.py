"""Evaluation metrics: next-token KL between models, n-gram copying and diversity, and a style classifier.

Pure functions of models, batches and texts, each tested on hand-made cases; `evaluate.py` runs them on a
training run.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Words and punctuation marks, case kept: the units of the n-gram metrics.

    >>> words("Mr. Darcy's pride!")
    ['Mr', '.', 'Darcy', "'", 's', 'pride', '!']
    """
    return _WORD.findall(text)


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct n-grams over all n-grams in `texts` (1.0: no n-gram repeats; nan when there are none)."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else math.nan


class NgramIndex:
    """The n-grams of a corpus (the training split), for looking up whether generated n-grams are copies.

    Stored as hashes of the joined n-gram: ~40 bytes per n-gram instead of a tuple of n strings."""

    def __init__(self, texts: Iterable[str], n: int = 8):
        self.n = n
        self._hashes = {hash("\x00".join(g)) for t in texts for g in ngrams(words(t), n)}

    def copied_share(self, texts: Iterable[str]) -> float:
        """Share of the n-grams in `texts` that occur verbatim in the indexed corpus (nan when none)."""
        grams = [g for t in texts for g in ngrams(words(t), self.n)]
        if not grams:
            return math.nan
        return sum(hash("\x00".join(g)) in self._hashes for g in grams) / len(grams)


@torch.no_grad()
def token_log_probs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities over the vocabulary, next-token targets) at the target positions of `batch`:
    shapes (N, V) and (N,), float32."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1]
    labels = batch["labels"][:, 1:].to(device)
    keep = labels != -100
    return F.log_softmax(logits[keep].float(), dim=-1), labels[keep]


@dataclass
class Comparison:
    """Models scored on the same held-out tokens (token-weighted means over all target positions)."""

    nll: dict[str, float]  # mean negative log-likelihood per model (nats per token)
    kl: dict[str, float]  # KL(reference || model) of next-token distributions: 0 for identical models
    tokens: int

    def perplexity(self, name: str) -> float:
        return math.exp(self.nll[name])


def compare_models(models: dict[str, Any], batches: Iterable[dict[str, torch.Tensor]], reference: str | None = None):
    """Every model's loss on `batches` (with `labels`), and each one's KL divergence from `reference`.

    One pass over the data, each model run once per batch: the reference's log-probabilities are computed
    once and compared with every other model while both are in memory."""
    nll = dict.fromkeys(models, 0.0)
    kl = {name: 0.0 for name in models if reference is not None}
    n = 0
    for batch in batches:
        log_ref = None
        if reference is not None:
            log_ref, targets = token_log_probs(models[reference], batch)
        for name, model in models.items():
            log_p, targets = (log_ref, targets) if name == reference else token_log_probs(model, batch)
            log_p = log_p.to(targets.device)
            nll[name] -= float(log_p.gather(1, targets[:, None]).sum())
            if log_ref is not None and name != reference:
                kl[name] += float(F.kl_div(log_p, log_ref.to(log_p.device), log_target=True, reduction="sum"))
        n += len(targets)
    if n == 0:
        raise ValueError("no target tokens")
    return Comparison({k: v / n for k, v in nll.items()}, {k: max(v / n, 0.0) for k, v in kl.items()}, n)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Confidence interval of a proportion k/n (Wilson score, via scipy)."""
    from scipy.stats import binomtest

    if n == 0:
        return math.nan, math.nan
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


class StyleClassifier:
    """Target style vs contrast style: character 2-4-gram and word 1-2-gram TF-IDF features into a logistic
    regression (scikit-learn), trained on equal numbers of paragraphs from each side."""

    def __init__(self, max_per_class: int = 4000, min_words: int = 20, seed: int = 0):
        self.max_per_class, self.min_words, self.seed = max_per_class, min_words, seed
        self.pipeline = None
        self.cv_accuracy: list[float] = []
        self.n_per_class = 0

    def _make(self):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline, make_union

        features = make_union(
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, min_df=2, max_features=200_000),
            TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=2, max_features=200_000),
        )
        return make_pipeline(features, LogisticRegression(C=4.0, max_iter=2000))

    def fit(self, target: Sequence[str], contrast: Sequence[str], folds: int = 5) -> StyleClassifier:
        """Fit on paragraphs of at least `min_words` words (headings and one-liners say little about style),
        after `folds`-fold cross-validation of the same pipeline (accuracy per fold in `cv_accuracy`)."""
        from sklearn.model_selection import StratifiedKFold, cross_val_score

        rng = random.Random(self.seed)
        sides = []
        for texts in (target, contrast):
            kept = [t for t in texts if len(t.split()) >= self.min_words]
            rng.shuffle(kept)
            sides.append(kept)
        n = min(len(sides[0]), len(sides[1]), self.max_per_class)
        if n < folds:
            raise ValueError(f"too few paragraphs of {self.min_words}+ words to train the style classifier: {n}")
        x = sides[0][:n] + sides[1][:n]
        y = [1] * n + [0] * n
        cv = StratifiedKFold(folds, shuffle=True, random_state=self.seed)
        self.cv_accuracy = [float(a) for a in cross_val_score(self._make(), x, y, cv=cv)]
        self.pipeline = self._make().fit(x, y)
        self.n_per_class = n
        return self

    def is_target(self, texts: Sequence[str]) -> list[bool]:
        if self.pipeline is None:
            raise RuntimeError("fit the classifier first")
        return [bool(v) for v in self.pipeline.predict(list(texts))]

    def target_share(self, texts: Sequence[str]) -> dict[str, float]:
        """Share of `texts` judged the target style, with its 95% Wilson interval."""
        hits = self.is_target(texts)
        k, n = sum(hits), len(hits)
        low, high = wilson_interval(k, n)
        return {"share": k / n if n else math.nan, "ci_low": low, "ci_high": high, "judged_target": k, "n": n}
