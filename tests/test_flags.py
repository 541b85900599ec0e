"""Flags that used to do something else than asked: LoRA flags in full fine-tuning, options with no effect in
the chosen mode, warmup past the run, sampling past the run, doubled defaults in --help, errors for folders
that are not models, file modes, peft's fan_in_fan_out warning, chapter headings as training text."""

import json
import logging
import os
import pickle
import stat
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_paragraphs
from qlora_ft.cli import main, train_main
from qlora_ft.config import ModelArgs, TrainConfig, train_config_from_dict
from qlora_ft.errors import UserError
from qlora_ft.options import build_parser, options_markdown, parse_config

PARAGRAPHS = make_paragraphs(30, seed=3)
BOOK = "\n\n".join(["PRIDE AND PREJUDICE", "VOLUME I", "CHAPTER I", *PARAGRAPHS[:15], "Chapter 2", *PARAGRAPHS[15:],
                    "CHAPTER III.", "Chapter and verse were quoted at him."])  # fmt: skip
HEADINGS = {"VOLUME I", "CHAPTER I", "Chapter 2", "CHAPTER III."}


def train_cfg(*argv):
    return parse_config(TrainConfig, list(argv), "train.py")


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ----------------------------------------------------------------------------------------------------------
# 1. LoRA flags mean LoRA; other flags that would do nothing are named


@pytest.mark.parametrize("flag", [["--rank-lora", "8"], ["--alpha_lora", "8"], ["--targets-lora", "c_attn"],
                                  ["--lora-dropout", "0.1"]])  # fmt: skip
def test_lora_flags_with_qlora_false_train_lora(flag, caplog):
    caplog.set_level(logging.INFO, logger="qlora_ft")
    cfg = train_cfg("--qlora", "False", *flag)
    assert (cfg.model.qlora, cfg.model.lora) == (False, True)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and flag[0].replace("_", "-") in infos[0] and "--lora True" in infos[0]


def test_lora_flags_in_a_config_file_count_as_given(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("qlora: false\nrank_lora: 4\n")
    assert train_cfg("--config", str(path)).model.lora is True


def test_lora_flags_with_explicit_lora_false_are_an_error():
    with pytest.raises(UserError, match=r"--rank-lora --lora-dropout: LoRA options have no effect in full fine"):
        train_cfg("--qlora", "False", "--lora", "False", "--rank-lora", "8", "--lora-dropout", "0.1")


@pytest.mark.parametrize("lora", [[], ["--lora", "False"]])
@pytest.mark.parametrize("off", [["--rslora", "False"], ["--dora", "False"], ["--loraplus-ratio", "0"],
                                 ["--dora", "False", "--rslora", "False", "--loraplus-ratio", "0"]])  # fmt: skip
def test_lora_options_at_their_off_value_keep_full_fine_tuning(off, lora, caplog):
    """Asking for no rsLoRA (DoRA, LoRA+) is not asking for LoRA: full fine-tuning stays, with nothing refused."""
    caplog.set_level(logging.INFO, logger="qlora_ft")
    cfg = train_cfg("--qlora", "False", *lora, *off)
    assert cfg.model.lora is False and not (cfg.model.dora or cfg.model.rslora or cfg.optim.loraplus_ratio)
    assert not [r for r in caplog.records if "LoRA" in r.getMessage()]
    assert train_cfg("--qlora", "False", "--rslora", "False", "--rank-lora", "8").model.lora is True  # (a real one)


@pytest.mark.slow
def test_a_run_with_lora_options_off_trains_every_weight(tmp_path, tiny_model_dir):
    (tmp_path / "book.txt").write_text(BOOK)
    train_main(["--qlora", "False", "--rslora", "False", "--dora", "False", "--loraplus-ratio", "0", "--model",
                str(tiny_model_dir), "--data", str(tmp_path / "book.txt"), "--max-steps", "1", "--sample-every", "0",
                "--max-input-length", "32", "--check-dir", str(tmp_path / "ckpt"), "--output-dir",
                str(tmp_path / "out")])  # fmt: skip
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(trained.transformer.h[0].mlp.c_fc.weight, base.transformer.h[0].mlp.c_fc.weight)


def test_qlora_false_alone_is_still_full_fine_tuning_and_saved_configs_are_untouched(caplog):
    cfg = train_cfg("--qlora", "False")
    assert (cfg.model.qlora, cfg.model.lora) == (False, False)
    # a run_config.json names every option (rank_lora included): rebuilding it changes nothing, warns of nothing
    assert train_config_from_dict(cfg.to_dict()).model.lora is False
    assert not warnings_of(caplog)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--sample-every", "0", "--top-k", "5", "--sample-prompts", "A"], "--sample-prompts --top-k"),
        (["--max-steps", "3", "--epochs", "2"], "--epochs"),
        (["--keep-checkpoints", "2"], "--keep-checkpoints"),
        (["--data", "BOOK", "--text-column", "body"], "--text-column"),
    ],
)
def test_flags_without_effect_get_one_warning(argv, flag, tmp_path, caplog):
    (tmp_path / "book.txt").write_text(BOOK)
    (tmp_path / "d.pkl").write_bytes(pickle.dumps(["One.", "Two."]))
    argv = [{"BOOK": str(tmp_path / "book.txt"), "PKL": str(tmp_path / "d.pkl")}.get(a, a) for a in argv]
    train_cfg(*argv)
    (message,) = warnings_of(caplog)
    assert message.startswith(flag + ": no effect")


def test_flags_with_effect_get_no_warning(tmp_path, caplog):
    (tmp_path / "book.txt").write_text(BOOK)
    (tmp_path / "d.pkl").write_bytes(pickle.dumps(["One.", "Two."]))
    train_cfg("--data", str(tmp_path / "book.txt"), "--keep-headings", "--sample-every", "5", "--top-k", "5",
              "--max-steps", "3", "--keep-checkpoints", "2", "--save-every-steps", "1")  # fmt: skip
    train_cfg("--data", str(tmp_path / "d.pkl"), "--keep-headings")  # headings are dropped from tables too
    train_cfg("--data", str(tmp_path / "book.txt"), "--epochs", "2")
    assert not warnings_of(caplog)


# ----------------------------------------------------------------------------------------------------------
# 4. --help and the README table show each default once


def test_help_shows_each_default_once():
    parser = build_parser(TrainConfig, "train.py", "")
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings and a.dest != "help"}
    helps.pop("--config")
    assert all(text.count("(default:") == 1 for text in helps.values()), helps
    assert "(default: None)" not in helps["--lora"] and "(default: the --qlora value," in helps["--lora"]
    assert helps["--rank-lora"].endswith("(default: 64 for text, 16 for instruction and chat data)")  # per mode
    assert "(default: None)" not in parser.format_help().split("--lora ")[1].split("--rank-lora")[0]
    row = next(line for line in options_markdown(TrainConfig).splitlines() if line.startswith("| `--lora`"))
    assert row.split(" | ")[1] == "the --qlora value, or True with LoRA options"  # what --help says
    rank = next(line for line in options_markdown(TrainConfig).splitlines() if line.startswith("| `--rank-lora`"))
    assert rank.count("64 for text") == 1  # in the default column only


# ----------------------------------------------------------------------------------------------------------
# tiny runs through train.py's entry point


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """One 2-step run: --qlora False with a LoRA flag, warmup and sampling longer than the run, umask 022,
    a book with headings. Returns (tmp dir, log messages)."""
    tmp = tmp_path_factory.mktemp("flags-run")
    (tmp / "book.txt").write_text(BOOK)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("qlora_ft")
    old_level, old_umask = logger.level, os.umask(0o022)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        train_main(["--qlora", "False", "--rank-lora", "4", "--model", str(tiny_model_dir), "--data",
                    str(tmp / "book.txt"), "--max-steps", "2", "--warmup-steps", "10", "--sample-every", "50",
                    "--sample-prompts", "She", "--max-output-length", "3", "--batch-size", "4",
                    "--max-input-length", "32", "--lr", "1e-2", "--check-dir", str(tmp / "ckpt"),
                    "--output-dir", str(tmp / "out")])  # fmt: skip
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        os.umask(old_umask)
    return tmp, [r.getMessage() for r in records]


def test_lora_flag_with_qlora_false_trains_an_adapter(run):
    tmp, _ = run
    config = json.loads((tmp / "out" / "adapter_config.json").read_text())
    assert config["r"] == 4 and not (tmp / "out" / "model.safetensors").exists()
    assert config["use_rslora"] is True  # the text mode's default (docs/quality.md)


def test_warmup_longer_than_the_run_warns_once(run):
    _, messages = run
    (line,) = [m for m in messages if m.startswith("--warmup-steps")]
    assert "--warmup-steps 10 >= the run's 2 steps" in line and "0.002 of 0.01" in line and "never decays" in line


def test_a_run_shorter_than_sample_every_still_samples_at_the_end(run):
    tmp, _ = run
    rows = [json.loads(line) for line in (tmp / "out" / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(2, "She")] and rows[0]["text"].startswith("She")


def test_startup_line_says_what_auto_chose(run):
    _, messages = run
    (line,) = [m for m in messages if m.startswith("setup:")]
    assert line == ("setup: single process, device cpu, compute dtype float32, loss scaling none, 32-bit LoRA, "
                    "packing on, gradient checkpointing off")  # fmt: skip
    (why,) = [m for m in messages if m.startswith("gradient checkpointing off by default")]
    assert "do not outweigh" in why and "--gradient-checkpointing True/False" in why


def test_plain_text_headings_are_dropped_in_training(run):
    _, messages = run
    assert any("book.txt: dropped 4 heading-only paragraphs" in m for m in messages)


def test_output_files_follow_the_umask(run):
    tmp, _ = run
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp / "out").iterdir() if p.is_file()}
    assert modes["adapter_model.safetensors"] == 0o644
    assert set(modes.values()) == {0o644}, modes
    checkpoint_files = [p for p in (tmp / "ckpt").rglob("*") if p.is_file()]
    assert checkpoint_files and {stat.S_IMODE(p.stat().st_mode) for p in checkpoint_files} == {0o644}


def test_the_adapter_loads_without_a_fan_in_fan_out_warning_and_merges_exactly(run, tiny_model_dir):
    from peft import PeftModel

    tmp, _ = run
    assert json.loads((tmp / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp / "out").eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    assert any(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)  # it trained
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        unmerged = model(ids).logits
        merged = model.merge_and_unload()(ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# 8. fan_in_fan_out is set from the layers, not corrected by peft


def test_add_lora_sets_fan_in_fan_out_like_peft_would_without_warning(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from qlora_ft.model import add_lora

    args = ModelArgs(qlora=False, lora=True, rank_lora=4, lora_dropout=0.0)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), args)
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    assert ours.peft_config["default"].fan_in_fan_out is True
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old setting: peft corrects fan_in_fan_out per layer, warning
        corrected = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                   LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn", "c_proj"],
                                              task_type="CAUSAL_LM", fan_in_fan_out=False))  # fmt: skip
    for (name, a), (_, b) in zip(ours.state_dict().items(), corrected.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_add_lora_on_a_4bit_base_keeps_fan_in_fan_out_off(tiny_model_dir):
    from qlora_ft.model import add_lora, load_base

    base = load_base(str(tiny_model_dir), True, torch.float32, torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = add_lora(base, ModelArgs(rank_lora=4))
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    assert model.peft_config["default"].fan_in_fan_out is False  # bitsandbytes made the Conv1Ds Linear4bit


# ----------------------------------------------------------------------------------------------------------
# 5. a folder that is not a model: one whole line, naming the path as given


def test_a_folder_that_is_not_a_model_is_named_as_given(tmp_path, monkeypatch, capsys):
    (tmp_path / "book.txt").write_text(BOOK)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        train_main(["--model", "notes", "--data", "book.txt"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("train.py: error: notes is not a model directory (no config.json")
    assert str(tmp_path) not in err


def test_a_broken_model_folder_is_named_as_given(tmp_path, monkeypatch, capsys, tiny_model_dir):
    import shutil

    (tmp_path / "book.txt").write_text(BOOK)
    shutil.copytree(tiny_model_dir, tmp_path / "broken")
    (tmp_path / "broken" / "config.json").write_text("{not json")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        train_main(["--model", "broken", "--data", "book.txt", "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'broken'" in err and str(tmp_path) not in err


# ----------------------------------------------------------------------------------------------------------
# 6, 9. `qlora-ft prepare`: headings dropped (or kept), the pickle follows the umask


@pytest.mark.parametrize("keep", [False, True])
def test_prepare_drops_headings_unless_kept_and_follows_the_umask(tmp_path, keep):
    (tmp_path / "book.txt").write_text(BOOK)
    old = os.umask(0o022)
    try:
        main(["prepare", str(tmp_path / "book.txt"), "--out", str(tmp_path / "d.pkl"),
              *(["--keep-headings"] if keep else [])])  # fmt: skip
    finally:
        os.umask(old)
    texts = [row["sentence"] for row in pickle.loads((tmp_path / "d.pkl").read_bytes())]
    assert (HEADINGS <= set(texts)) if keep else not (HEADINGS & set(texts))
    assert "Chapter and verse were quoted at him." in texts and len(texts) == 32 + 4 * keep
    assert stat.S_IMODE((tmp_path / "d.pkl").stat().st_mode) == 0o644
