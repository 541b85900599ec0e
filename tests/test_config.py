import json

import pytest

from qlora_ft.config import TrainConfig, apply_mode_defaults, parse_bool, train_config_from_dict
from qlora_ft.errors import UserError
from qlora_ft.options import parse_config
from qlora_ft.run_options import GenerateConfig


def train_cfg(*argv: str) -> TrainConfig:
    return parse_config(TrainConfig, list(argv), "train.py")


@pytest.mark.parametrize("text", ["True", "true", "1", "yes", "YES", "on"])
def test_parse_bool_true(text):
    assert parse_bool(text) is True


@pytest.mark.parametrize("text", ["False", "false", "0", "no", "off"])
def test_parse_bool_false(text):
    assert parse_bool(text) is False


def test_qlora_false_is_false_and_bare_flag_is_true():
    assert train_cfg("--qlora", "False").model.qlora is False
    assert train_cfg("--qlora", "0").model.qlora is False
    assert train_cfg("--qlora").model.qlora is True
    assert train_cfg().model.qlora is True  # the default: this is a QLoRA package


def test_bad_bool_is_a_user_error():
    with pytest.raises(UserError, match="expected a boolean"):
        train_cfg("--qlora", "maybe")


def test_defaults_equal_the_dataclass_defaults():
    assert train_cfg() == TrainConfig()
    cfg = TrainConfig()
    assert (cfg.data.train_size, cfg.model.rank_lora, cfg.model.alpha_lora) == (0.9, None, None)  # per mode
    apply_mode_defaults(cfg, "text")
    assert (cfg.model.rank_lora, cfg.model.alpha_lora, cfg.optim.lr, cfg.optim.epochs) == (64, 16, 2e-4, 3)
    assert cfg.model.targets_lora == ["auto"]
    assert (cfg.ckpt.check_dir, cfg.ckpt.output_dir) == ("Checkpoints", "GPT2_fine_tuned_Austen")


def test_both_spellings_of_every_flag():
    a = train_cfg("--rank_lora", "8", "--batch_size", "3", "--max_input_length", "50", "--check_dir", "c")
    b = train_cfg("--rank-lora", "8", "--batch-size", "3", "--max-input-length", "50", "--check-dir", "c")
    assert a == b
    assert (a.model.rank_lora, a.data.batch_size, a.data.max_input_length, a.ckpt.check_dir) == (8, 3, 50, "c")


def test_list_flags():
    cfg = train_cfg("--targets_lora", "c_attn", "--sample-prompts", "One", "--sample-prompts", "")
    assert cfg.model.targets_lora == ["c_attn"]
    assert cfg.sample.sample_prompts == ["One", ""]


def test_load_checkpoint_alone_means_latest():
    assert train_cfg("--load-checkpoint", "True").ckpt.restore_file == "latest"
    assert train_cfg("--restore-file", "Epoch_2", "--load-checkpoint", "True").ckpt.restore_file == "Epoch_2"
    assert train_cfg().ckpt.restore_file is None


@pytest.mark.parametrize(
    "argv",
    [("--train-size", "1.5"), ("--batch-size", "0"), ("--lr", "-1"), ("--top-p", "0"), ("--epochs", "x"),
     ("--compute-dtype", "int3"), ("--unknown-flag", "1"), ("--max-steps", "0")],
)  # fmt: skip
def test_bad_values_are_user_errors(argv):
    with pytest.raises(UserError):
        train_cfg(*argv)


def test_config_file_json_and_yaml_with_cli_override(tmp_path):
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"lr": 0.001, "rank-lora": 4, "optim": {"epochs": 7}, "qlora": "false"}))
    cfg = train_cfg("--config", str(j), "--rank_lora", "16")
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.model.qlora) == (0.001, 7, False)
    assert cfg.model.rank_lora == 16  # the flag wins over the file
    y = tmp_path / "c.yaml"
    y.write_text("batch_size: 2\ntargets_lora: [c_attn]\nmax_steps: 5\n")
    cfg = train_cfg("--config", str(y))
    assert (cfg.data.batch_size, cfg.model.targets_lora, cfg.optim.max_steps) == (2, ["c_attn"], 5)


@pytest.mark.parametrize(
    "content, message",
    [('{"nonsense": 1}', "unknown option"), ('{"batch_size": "many"}', "bad value"), ("[1, 2]", "mapping"),
     ("{not json", "cannot parse"), ('{"batch_size": 2.5}', "bad value")],
)  # fmt: skip
def test_bad_config_files(tmp_path, content, message):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        train_cfg("--config", str(path))


def test_missing_config_file():
    with pytest.raises(UserError, match="not found"):
        train_cfg("--config", "/nonexistent/c.yaml")


def test_run_config_round_trip():
    cfg = train_cfg("--lr", "0.01", "--targets-lora", "c_attn", "--restore-file", "Epoch_1")
    assert train_config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_generate_flags():
    cfg = parse_config(GenerateConfig, ["--model_path", "d", "--prompt", "A", "--prompt", "B", "--top_k", "5",
                                        "--n_return_seqs", "2", "--stream"], "inference.py")  # fmt: skip
    g = cfg.gen
    assert (g.model_path, g.prompt, g.top_k, g.n_return_seqs, g.stream, g.qlora) == ("d", ["A", "B"], 5, 2, True, False)
