import math
from types import SimpleNamespace

import pytest
import torch

from qlora_ft import metrics
from qlora_ft.data.batches import collate


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are the same row at every position."""

    def __init__(self, row):
        super().__init__()
        self.row = torch.nn.Parameter(torch.tensor(row, dtype=torch.float32))

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.row.expand(*input_ids.shape, -1))


def test_kl_of_identical_models_is_zero_and_matches_hand_computation():
    batch = collate([[[0, 1, 0, 1]], [[0, 1]]], pad_id=0)  # 3 + 1 target tokens
    models = {"uniform": FixedLogits([0.0, 0.0]), "same": FixedLogits([0.0, 0.0]),
              "skewed": FixedLogits([math.log(0.9), math.log(0.1)])}  # fmt: skip
    got = metrics.compare_models(models, [batch, batch], reference="uniform")
    assert got.tokens == 8
    assert got.kl["uniform"] == got.kl["same"] == 0.0
    assert got.kl["skewed"] == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-6)
    # targets: 1, 0, 1 in the first row, 1 in the second -> three at p=0.1, one at p=0.9
    assert got.nll["skewed"] == pytest.approx((3 * -math.log(0.1) - math.log(0.9)) / 4, rel=1e-6)
    assert got.perplexity("uniform") == pytest.approx(2.0)
    assert metrics.compare_models(models, [batch]).kl == {}  # no reference: losses only


def test_loss_matches_the_models_own_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = collate([[[0, 5, 9, 12, 0]], [[0, 7, 3]]], pad_id=0)
    got = metrics.compare_models({"m": model}, [batch], reference="m")
    with torch.no_grad():
        expected = model(**batch).loss  # transformers: mean over labels != -100
    assert got.tokens == 6 and got.kl["m"] == 0.0
    assert got.nll["m"] == pytest.approx(float(expected), rel=1e-5)


def test_copied_ngram_share():
    train = ["It is a truth universally acknowledged, that a single man in possession of a good fortune."]
    index = metrics.NgramIndex(train, n=8)
    assert index.copied_share(train) == 1.0  # a verbatim copy
    assert index.copied_share(["Nothing here comes from the training text at all, not one phrase."]) == 0.0
    half = "It is a truth universally acknowledged, that a dog barked loudly at the moon all night long"
    share = index.copied_share([half])
    assert 0.0 < share < 1.0
    assert math.isnan(index.copied_share(["too short"]))


def test_distinct_n():
    assert metrics.distinct_n(["a b a b"], 1) == 0.5
    assert metrics.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert metrics.distinct_n(["a b c", "d e f"], 2) == 1.0
    assert math.isnan(metrics.distinct_n(["a"], 2))


def test_wilson_interval():
    low, high = metrics.wilson_interval(8, 10)
    z = 1.959963984540054
    centre, half = (8 + z * z / 2) / (10 + z * z), z * math.sqrt(10 * 0.8 * 0.2 + z * z / 4) / (10 + z * z)
    assert (low, high) == (pytest.approx(centre - half), pytest.approx(centre + half))
    assert metrics.wilson_interval(0, 50)[0] == 0.0 and metrics.wilson_interval(50, 50)[1] == 1.0


def test_style_classifier_perfect_case():
    import random

    rng = random.Random(0)
    a = "parlour sensible amiable felicity civility ladyship rectory engagement".split()
    b = "forge marsh convict blacksmith coach river fog lamplighter".split()

    def texts(vocab, n):
        return [" ".join(rng.choice(vocab) for _ in range(30)) for _ in range(n)]

    clf = metrics.StyleClassifier(max_per_class=60).fit(texts(a, 80), texts(b, 80))
    assert clf.n_per_class == 60 and clf.cv_accuracy == [1.0] * 5
    assert clf.target_share(texts(a, 10))["share"] == 1.0
    judged = clf.target_share(texts(b, 10))
    assert judged["share"] == 0.0 and judged["n"] == 10 and judged["ci_low"] == 0.0 < judged["ci_high"]


def test_style_classifier_needs_enough_long_paragraphs():
    with pytest.raises(ValueError, match="too few paragraphs"):
        metrics.StyleClassifier().fit(["short one"] * 10, ["another short"] * 10)
