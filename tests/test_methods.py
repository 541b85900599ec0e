"""The training methods beside plain LoRA: DoRA, rsLoRA, LoRA+, NEFTune, --output-best; per-mode batch size."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from qlora_ft.cli import main, train_main
from qlora_ft.config import TrainConfig, apply_mode_defaults, take_unset_from, train_config_from_dict
from qlora_ft.loop import train
from qlora_ft.options import parse_config
from qlora_ft.training.methods import add_neftune
from qlora_ft.training.plan import lr_at


def argv(tmp_path, data, model_dir, *extra: str, run: str = "run") -> list[str]:
    return ["--data", str(data), "--model", str(model_dir), "--max-input-length", "24", "--rank-lora", "4",
            "--alpha-lora", "8", "--lr", "1e-2", "--warmup-steps", "2", "--batch-size", "4", "--sample-every", "0",
            "--log-every", "1", "--check-dir", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / run),
            *extra]  # fmt: skip


def val_losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


@pytest.mark.parametrize(
    "flags",
    [["--dora"], ["--rslora", "True"], ["--loraplus-ratio", "16"], ["--neftune-alpha", "-1"]],
)
def test_method_flags_are_refused_in_one_line_where_they_cannot_work(capsys, flags):
    lora_off = [] if flags[0] == "--neftune-alpha" else ["--qlora", "False", "--lora", "False"]
    with pytest.raises(SystemExit) as e:
        train_main(["--data", "x.pkl", *lora_off, *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and flags[0] in err[0], err


def test_the_batch_size_is_per_mode_and_a_resume_keeps_what_the_checkpoint_trained_with():
    text, instruction = TrainConfig(), TrainConfig()
    apply_mode_defaults(text, "text")
    apply_mode_defaults(instruction, "instruction")
    assert (text.data.batch_size, instruction.data.batch_size) == (8, 4)
    assert (text.model.rslora, instruction.model.rslora) == (True, False)  # measured per mode: docs/quality.md
    full = parse_config(TrainConfig, ["--qlora", "False", "--lora", "False"], "train.py")
    apply_mode_defaults(full, "text")  # a LoRA option stays off in full fine-tuning, and its config reloads
    assert full.model.rslora is False and train_config_from_dict(full.to_dict()) == full
    given = parse_config(TrainConfig, ["--batch-size", "2"], "train.py")
    apply_mode_defaults(given, "instruction")
    assert given.data.batch_size == 2

    saved = parse_config(TrainConfig, ["--batch-size", "3", "--lr", "5e-3", "--rank-lora", "4"], "train.py")
    apply_mode_defaults(saved, "text")
    resumed = parse_config(TrainConfig, ["--rank-lora", "8"], "train.py")  # given: stays; unset: the checkpoint's
    assert take_unset_from(resumed, saved) == {"batch_size": 3, "lr": 5e-3, "alpha_lora": 16, "targets_lora": ["auto"],
                                               "rslora": True, "epochs": 3, "warmup_steps": 100}  # fmt: skip
    assert (resumed.data.batch_size, resumed.optim.lr, resumed.model.rank_lora) == (3, 5e-3, 8)

    # a checkpoint saved before rsLoRA was a text default trained without it, and its resume goes on so
    old = saved.to_dict()
    del old["model"]["rslora"]
    resumed = parse_config(TrainConfig, [], "train.py")
    take_unset_from(resumed, train_config_from_dict(old))
    apply_mode_defaults(resumed, "text")
    assert resumed.model.rslora is False


def test_neftune_noises_the_embeddings_in_the_training_forward_only(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_ft.config import SamplingArgs
    from qlora_ft.generate import sample
    from qlora_ft.training.validate import validation_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    batch = [{"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}]
    plain_emb, plain_val = model.get_input_embeddings()(ids), validation_loss(model, batch)
    plain_text = sample(model, tokenizer, ["She was"], SamplingArgs(), 6, seed=1)

    handle = add_neftune(model, 5.0)
    model.train()
    noise = model.get_input_embeddings()(ids) - plain_emb  # (1, T, d)
    bound = 5.0 / math.sqrt(ids.shape[1] * plain_emb.shape[-1])  # alpha / sqrt(T d): T is the row's length
    assert 0 < noise.abs().max() <= bound
    assert validation_loss(model, batch) == plain_val and model.training  # eval mode inside, restored after
    assert sample(model, tokenizer, ["She was"], SamplingArgs(), 6, seed=1) == plain_text
    model.eval()
    assert torch.equal(model.get_input_embeddings()(ids), plain_emb)
    handle.remove()
    model.train()
    assert torch.equal(model.get_input_embeddings()(ids), plain_emb)


@pytest.mark.parametrize("dora", [False, True])
def test_loraplus_groups_learn_at_their_ratio_of_the_schedules_rate(tiny_model_dir, dora):
    """With --loraplus-ratio 4, every step's rate reaches the B matrices (and DoRA's magnitudes) x 4 and the A
    matrices x 1: the optimizer's groups as the loop sets them (`set_learning_rate`) at two rates."""
    from transformers import AutoModelForCausalLM

    from qlora_ft.model import add_lora
    from qlora_ft.training.methods import make_optimizer, set_learning_rate

    flags = ["--qlora", "False", "--lora", "True", "--rank-lora", "2", "--loraplus-ratio", "4", "--lr", "1e-2"]
    cfg = parse_config(TrainConfig, [*flags, *(["--dora"] if dora else [])], "train.py")
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg.model)
    optimizer = make_optimizer(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    for lr in (3e-3, 7e-4):
        set_learning_rate(optimizer, lr)
        rates = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
        assert len(rates) == sum(p.requires_grad for p in model.parameters())
        for name, rate in rates.items():
            assert rate == pytest.approx(lr * (1 if "lora_A" in name else 4), rel=1e-12), name
        assert any("lora_B" in n for n in rates) and any("magnitude" in n for n in rates) == dora


@pytest.mark.slow
def test_dora_and_rslora_train_load_with_peft_and_export_to_transformers(tmp_path, data_pkl, tiny_model_dir):
    """QLoRA with DoRA and rsLoRA: peft's magnitude vectors train, the scaling is alpha / sqrt(r), the adapter
    loads with PeftModel, and the export (merged into the dequantised base) computes what the adapter does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_ft.model import add_lora, load_base, load_for_inference

    cfg = parse_config(TrainConfig, argv(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "2", "--dora", "--rslora",
                                         "--lr", "5e-2"), "train.py")  # fmt: skip
    trained = train(cfg).model
    layer = trained.base_model.model.transformer.h[0].attn.c_attn
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r), not alpha / r
    fresh = dict(add_lora(load_base(str(tiny_model_dir), True, torch.float32, torch.device("cpu")),
                          cfg.model).named_parameters())  # fmt: skip
    magnitudes = {n: p for n, p in trained.named_parameters() if "lora_magnitude_vector" in n}
    assert magnitudes and all(p.requires_grad for p in magnitudes.values())
    assert all(not torch.equal(p.detach(), fresh[n].detach()) for n, p in magnitudes.items()), "magnitudes froze"
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"]

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "run")
    assert any("lora_magnitude_vector" in n for n, _ in loaded.named_parameters())
    main(["export", "--model_path", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    unmerged, _ = load_for_inference(str(tmp_path / "run"), None, True, torch.device("cpu"))  # NF4 + adapter
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_every_method_resumes_exactly_and_loraplus_keeps_its_ratio_at_every_step(
    tmp_path, data_pkl, tiny_model_dir, monkeypatch
):
    """16-bit LoRA with DoRA, rsLoRA, LoRA+ (ratio 4), NEFTune and --output-best, dropout on: 4 steps, or 2 and a
    resume (given none of the per-mode options) for 2 more, give the same adapter, losses and best step; at every
    step the B matrices learned at 4 x the schedule's rate, the A matrices at the rate."""
    seen: list[list[tuple[float, set[int]]]] = []  # per optimizer step: (lr, parameter ids) of each group
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append([(g["lr"], {id(p) for p in g["params"]}) for g in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    methods = ("--qlora", "False", "--lora", "True", "--dora", "--rslora", "--loraplus-ratio", "4",
               "--neftune-alpha", "5", "--output-best", "--lora-dropout", "0.1", "--eval-every", "1",
               "--save-every-steps", "2", "--max-steps", "4")  # fmt: skip
    full = train(parse_config(TrainConfig, argv(tmp_path, data_pkl, tiny_model_dir, *methods, run="full"), "t"))
    (tmp_path / "ckpt" / "step-000004").rename(tmp_path / "full-step4")  # so the resumed run cannot reuse it
    unset = [a for a in argv(tmp_path, data_pkl, tiny_model_dir, *methods, run="resumed")]
    for flag in ("--rank-lora", "--alpha-lora", "--lr", "--warmup-steps", "--batch-size"):  # the checkpoint's
        del unset[unset.index(flag) : unset.index(flag) + 2]
    resumed = train(parse_config(TrainConfig, [*unset, "--restore-file", "step-000002"], "t"))

    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("full", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_losses, resumed_losses = val_losses(tmp_path / "full"), val_losses(tmp_path / "resumed")
    assert sorted(resumed_losses) == [3, 4] and all(resumed_losses[s] == full_losses[s] for s in (3, 4))
    assert full.summary["output_step"] == resumed.summary["output_step"]
    names = {id(p): n for n, p in full.model.named_parameters()}
    names.update({id(p): n for n, p in resumed.model.named_parameters()})
    assert len(seen) == 6  # 4 steps, then steps 3 and 4 again
    for i, groups in enumerate(seen):
        expected = lr_at(i if i < 4 else i - 2, 1e-2, 2, 4)
        for lr, ids in groups:
            b_group = all("lora_B" in names[p] or "magnitude" in names[p] for p in ids)
            assert b_group or all("lora_A" in names[p] for p in ids)
            assert lr == pytest.approx(expected * (4 if b_group else 1), rel=1e-12), (i, names[next(iter(ids))])


@pytest.mark.slow
def test_output_best_keeps_the_best_validations_adapter_and_names_its_step(tmp_path, data_pkl, tiny_model_dir):
    extra = ("--qlora", "False", "--lora", "True", "--lr", "0.3", "--max-steps", "5", "--eval-every", "1",
             "--save-every-steps", "1", "--keep-checkpoints", "0", "--output-best", "--sample-every", "2",
             "--max-output-length", "4")  # fmt: skip
    summary = train(parse_config(TrainConfig, argv(tmp_path, data_pkl, tiny_model_dir, *extra), "t")).summary
    losses = {s: v for s, v in val_losses(tmp_path / "run").items() if s > 0}
    best = min(losses, key=losses.get)
    assert best < 5, f"validation kept improving ({losses}): pick a larger --lr so the test checks something"
    assert summary["output_step"] == best and summary["steps"] == 5
    out = load_file(tmp_path / "run" / "adapter_model.safetensors")
    at_best = load_file(tmp_path / "ckpt" / f"step-{best:06d}" / "adapter_model.safetensors")
    assert out.keys() == at_best.keys() and all(torch.equal(out[k], at_best[k]) for k in out)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert best in {r["step"] for r in samples}
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"step {best}'s, the best validation loss" in report
    assert f"In-training samples at step {best} (the weights in this folder)" in report


def test_neftune_without_the_transformers_hook_is_one_line(monkeypatch):
    import sys

    from qlora_ft.errors import UserError
    from qlora_ft.training.methods import add_neftune

    monkeypatch.setitem(sys.modules, "transformers.integrations.neftune", None)  # as a release without it
    with pytest.raises(UserError, match="--neftune-alpha needs transformers' NEFTune hook"):
        add_neftune(object(), 5.0)


@pytest.mark.slow
def test_output_best_after_a_resume_ships_the_step_the_summary_names(tmp_path, data_pkl, tiny_model_dir):
    """Validation worsens after its best (at step 3 or before); a resume from step 3 into a new output folder, and
    one into a folder holding later weights (a crashed launch's), ship the best step's adapter, as the summary,
    the returned result and `compare` say, and it loads."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    extra = ("--qlora", "False", "--lora", "True", "--lr", "0.3", "--max-steps", "6", "--eval-every", "1",
             "--save-every-steps", "3", "--output-best")  # fmt: skip
    full = train(parse_config(TrainConfig, argv(tmp_path, data_pkl, tiny_model_dir, *extra, run="full"), "t"))
    losses = {s: v for s, v in val_losses(tmp_path / "full").items() if s > 0}
    best = min(losses, key=losses.get)
    assert best <= 3, f"validation improved after step 3 ({losses}): pick a larger --lr so the test checks something"
    assert full.summary["output_step"] == full.output_step == best
    shipped = load_file(tmp_path / "full" / "adapter_model.safetensors")
    later = tmp_path / "crashed"  # a launch that wrote step 6's weights there, then died
    later.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (later / name).write_bytes((tmp_path / "ckpt" / "step-000006" / name).read_bytes())
    for run in ("resumed", "crashed"):
        args = [*argv(tmp_path, data_pkl, tiny_model_dir, *extra, run=run), "--restore-file", "step-000003"]
        result = train(parse_config(TrainConfig, args, "t"))
        summary = json.loads((tmp_path / run / "train_summary.json").read_text())
        assert summary["output_step"] == result.output_step == best and summary["steps"] == 6, run
        got = load_file(tmp_path / run / "adapter_model.safetensors")
        assert got.keys() == shipped.keys() and all(torch.equal(got[k], shipped[k]) for k in got), run
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "resumed")
    main(["compare", "--model_path", str(tmp_path / "resumed"), "--max_length", "4"])
    text = (tmp_path / "resumed" / "compare.md").read_text()
    assert f"-> {losses[best]:.3f}; the weights of step {best} of 6 (--output-best)" in text


@pytest.mark.slow
def test_gradient_checkpointing_is_on_where_activations_outweigh_the_rest(tmp_path, data_pkl, tiny_model_dir):
    """The default follows `memory_estimate`: the tiny model at 4 x 24 tokens with a 1024-token loss chunk holds
    more logits than activations (off); with the whole batch's logits at once (--loss-chunk 0) the activations
    weigh more (on). Given, the flag wins; a resume keeps what the checkpoint trained with."""
    from qlora_ft.model import ACTIVATION_BYTES_PER_TOKEN_WIDTH, add_lora, load_base, memory_estimate

    cfg = parse_config(TrainConfig, argv(tmp_path, data_pkl, tiny_model_dir), "train.py")
    apply_mode_defaults(cfg, "text")
    model = add_lora(load_base(str(tiny_model_dir), True, torch.float32, torch.device("cpu")), cfg.model)
    activations, rest = memory_estimate(model, 96, 1024, torch.float32)
    assert activations == 96 * 2 * 64 * ACTIVATION_BYTES_PER_TOKEN_WIDTH  # tokens x layers x width x bytes
    assert memory_estimate(model, 96, 1024, torch.bfloat16)[0] == activations // 2
    assert rest > activations > memory_estimate(model, 96, 0, torch.float32)[1] - rest + 2 * 96 * 400 * 4

    def checkpointing(*extra: str, run: str, check: str = "") -> bool:
        flags = argv(tmp_path, data_pkl, tiny_model_dir, *extra, "--check-dir", str(tmp_path / (check or run)), run=run)
        return train(parse_config(TrainConfig, flags, "t")).model.get_base_model().is_gradient_checkpointing

    assert not checkpointing("--max-steps", "1", run="a")
    assert checkpointing("--max-steps", "1", "--loss-chunk", "0", run="b")
    assert not checkpointing("--max-steps", "1", "--loss-chunk", "0", "--gradient-checkpointing", "False", run="c")
    resumed = ("--max-steps", "2", "--loss-chunk", "0", "--restore-file", "step-000001")
    assert not checkpointing(*resumed, run="d", check="c")
