"""`qlora-ft eval` / `compare`, the report, and TensorBoard files, on a tiny model trained in the test."""

import json
import math

import pytest
import torch

from conftest import make_paragraphs
from qlora_ft.cli import main
from qlora_ft.config import ModelArgs, TrainConfig
from qlora_ft.errors import UserError
from qlora_ft.loop import train
from qlora_ft.model import load_for_inference
from qlora_ft.options import parse_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """A QLoRA run of 6 steps at a high learning rate, so the adapter is far from zero."""
    import pickle

    work = tmp_path_factory.mktemp("eval-run")
    (work / "data.pkl").write_bytes(pickle.dumps([{"sentence": p} for p in make_paragraphs(60)]))
    argv = ["--data", str(work / "data.pkl"), "--model", str(tiny_model_dir), "--batch-size", "4",
            "--max-input-length", "24", "--rank-lora", "4", "--alpha-lora", "8", "--lr", "2e-2",
            "--warmup-steps", "1", "--max-steps", "6", "--sample-every", "3", "--max-output-length", "6",
            "--log-every", "1", "--eval-every", "3", "--check-dir", str(work / "ckpt"),
            "--output-dir", str(work / "run")]  # fmt: skip
    train(parse_config(TrainConfig, argv, "train.py"))
    return work / "run"


def contrast_file(tmp_path):
    """Paragraphs in a different 'style': another vocabulary altogether."""
    import random

    rng = random.Random(3)
    vocab = "forge marsh convict blacksmith coach river fog lamplighter Pip Joe Estella".split()
    path = tmp_path / "contrast.txt"
    paras = [" ".join(rng.choice(vocab) for _ in range(rng.randint(20, 40))) + "." for _ in range(60)]
    path.write_text("\n\n".join(paras), encoding="utf-8")
    return path


@pytest.mark.slow
def test_training_writes_curves_report_and_tensorboard_events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert (run_dir / "training.png").stat().st_size > 1000
    report = (run_dir / "report.md").read_text()
    assert "![training curves](training.png)" in report and "final_val_loss" in report
    events = list((run_dir / "tb").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent)).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "val_loss", "tokens_per_second"} <= tags
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("val_loss")] == [0, 3, 6]
    metrics_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first_loss = next(r["loss"] for r in metrics_rows if "loss" in r)
    assert acc.Scalars("loss")[0].value == pytest.approx(first_loss, rel=1e-6)


@pytest.mark.slow
def test_eval_writes_every_metric_and_picks_the_exact_merge(run_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    main(["eval", "--model_path", str(run_dir), "--contrast", str(contrast_file(tmp_path)), "--n-generations", "8",
          "--max-length", "12", "--out-dir", str(out)])  # fmt: skip
    result = json.loads((out / "eval.json").read_text())
    ppl = result["perplexity"]
    # The unmerged adapter is the model training validated last, on the same split: the training loop's
    # validation and eval's scorer, two separate code paths, must agree on its perplexity.
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert ppl["trained"] == pytest.approx(summary["final_val_perplexity"], rel=1e-4)
    assert 0 < ppl["fine_tuned"] < ppl["base"]  # 6 steps at a high learning rate lower it
    parity = result["merge_parity"]["variants"]
    # Merging into the dequantised NF4 weights reproduces the trained model; the original weights do not.
    assert parity["merged_dequantized"]["kl_from_trained"] < 1e-6
    assert parity["merged_original"]["kl_from_trained"] > 100 * parity["merged_dequantized"]["kl_from_trained"]
    assert result["merge_parity"]["closest"] == result["merge_parity"]["default"] == "merged_dequantized"
    assert parity["merged_dequantized"]["perplexity"] == pytest.approx(ppl["trained"], rel=1e-4)
    assert len(result["generations"]["base"]) == len(result["generations"]["fine_tuned"]) == 8  # 2 per prompt
    style = result["style"]
    assert style["cv_accuracy_mean"] == 1.0  # two vocabularies: a perfectly separable case
    assert style["judged_target"]["held_out_text"]["share"] == 1.0
    for key in ("base", "fine_tuned"):
        copied = result["copied_8gram_share"][key]
        assert math.isnan(copied) or 0.0 <= copied <= 1.0  # nan: no 8-gram in 12 tokens; values: test_metrics.py
        assert set(result["distinct_n"][key]) == {"1", "2", "3"}
    assert (out / "eval.png").stat().st_size > 1000
    md = (out / "eval.md").read_text()
    assert "Merge parity" in md and "Closest to the trained model: **merged_dequantized**" in md
    assert "![evaluation](eval.png)" in (out / "report.md").read_text()


@pytest.mark.slow
def test_inference_default_merge_matches_the_trained_model(run_dir):
    from peft import PeftModel

    from qlora_ft.model import keep_training_layout, load_base

    base = load_base(json.loads((run_dir / "run_config.json").read_text())["model"]["model"], True, torch.float32, CPU)
    keep_training_layout(base)
    trained = PeftModel.from_pretrained(base, str(run_dir)).eval()
    ids = torch.randint(1, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    merged, _ = load_for_inference(str(run_dir), None, False, CPU)  # auto: a QLoRA run -> dequantised base
    original, _ = load_for_inference(str(run_dir), None, False, CPU, merge_into="original")
    with torch.no_grad():
        want, got, other = trained(ids).logits, merged(ids).logits, original(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (other - want).abs().max() > 10 * (got - want).abs().max()


@pytest.mark.slow
def test_compare_writes_markdown_with_both_models(run_dir, tmp_path):
    out = tmp_path / "cmp.md"
    main(["compare", "--model_path", str(run_dir), "--prompt", "She was", "--prompt", "", "--n_return_seqs", "2",
          "--max_length", "8", "--out", str(out)])  # fmt: skip
    text = out.read_text()
    assert text.count("**Base**") == 2 and text.count("**Fine-tuned**") == 2
    assert "## Prompt 1: 'She was'" in text and "dequantised NF4" in text
    assert text.count("> She was") == 4  # two per model for the first prompt


@pytest.mark.slow
def test_eval_bad_inputs_exit_2_in_one_line(tmp_path, tiny_model_dir, run_dir, capsys):
    cases = [
        (["eval", "--model_path", str(tiny_model_dir)], "is not a qlora-ft run's output dir"),
        (["eval", "--model_path", str(tmp_path / "nope")], "run directory not found"),
        (["eval", "--model_path", str(run_dir), "--contrast", str(tmp_path / "nope.txt")], "not found"),
        (["eval", "--model_path", str(run_dir), "--n-generations", "0"], "--n-generations"),
        (["compare", "--model_path", str(tiny_model_dir)], "is not a directory holding an adapter"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], (argv, err)
    assert not (run_dir / "eval.json").exists()  # nothing written by the failed runs


def test_lora_on_a_full_precision_base(tmp_path, data_pkl, tiny_model_dir):
    argv = ["--data", str(data_pkl), "--model", str(tiny_model_dir), "--qlora", "False", "--lora", "True",
            "--rank-lora", "4", "--max-steps", "2", "--sample-every", "0", "--max-input-length", "24",
            "--check-dir", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "run")]  # fmt: skip
    result = train(parse_config(TrainConfig, argv, "train.py"))
    assert result.summary["method"] == "32-bit LoRA"
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(UserError, match="--lora False needs --qlora False"):
        ModelArgs(qlora=True, lora=False)
    assert ModelArgs(qlora=False).lora is False and ModelArgs().lora is True
