import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ListWindows
from qlora_ft.checkpoint import list_checkpoints
from qlora_ft.config import TrainConfig
from qlora_ft.data.batches import collate, make_batch
from qlora_ft.engines import Engine
from qlora_ft.errors import UserError
from qlora_ft.loop import train
from qlora_ft.loss import accumulate_gradients, forward_loss, output_layer, token_loss
from qlora_ft.options import parse_config
from qlora_ft.training.plan import lr_at
from qlora_ft.training.setup import packing_is_isolated


def config(tmp_path, data, model_dir, *argv: str, run: str = "run", lora: bool = True) -> TrainConfig:
    """`lora=False`: without the LoRA options (with --qlora False they would turn LoRA on)."""
    base = ["--data", str(data), "--model", str(model_dir), "--batch-size", "4", "--max-input-length", "24",
            *(["--rank-lora", "4", "--alpha-lora", "8"] if lora else []), "--lr", "1e-2", "--warmup-steps", "2",
            "--sample-every", "0", "--max-output-length", "8", "--log-every", "1",
            "--check-dir", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / run)]  # fmt: skip
    return parse_config(TrainConfig, base + list(argv), "train.py")


def adapter(path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def assert_same_adapter(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0), k


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_lr_schedule():
    assert [lr_at(s, 1.0, 2, 6) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert lr_at(0, 1.0, 0, 4) == 1.0


def test_token_loss_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    a = collate([[[1, 2, 3, 4, 5]], [[6, 7]]], pad_id=0)
    total, n = token_loss(logits, a["labels"])
    one, n1 = token_loss(logits[:1], collate([[[1, 2, 3, 4, 5]]], 0)["labels"])
    two, n2 = token_loss(logits[1:, :2], collate([[[6, 7]]], 0)["labels"])
    assert int(n) == 5 == int(n1) + int(n2)
    torch.testing.assert_close(total, one + two)


def test_qlora_trains_only_lora_weights_and_writes_outputs(tmp_path, data_pkl, tiny_model_dir, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_ft.model import add_lora, load_base
    from qlora_ft.training import fit

    real, copies = fit.sampling_copy, []  # samples on CPU come from a dequantised float copy of the weights

    def spy(model, device):
        copies.append(real(model, device))
        return copies[-1]

    monkeypatch.setattr(fit, "sampling_copy", spy)

    cfg = config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "4", "--sample-every", "2", "--eval-every", "2")
    torch.manual_seed(cfg.data.seed)
    fresh = add_lora(load_base(str(tiny_model_dir), True, torch.float32, torch.device("cpu")), cfg.model)
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    result = train(cfg)
    after = dict(result.model.named_parameters())
    assert before.keys() == after.keys()
    lora = [n for n in before if "lora_" in n]
    assert lora and all(after[n].requires_grad for n in lora)
    for name, value in before.items():
        if "lora_" in name:
            assert not torch.equal(value, after[name].detach()), f"{name} did not train"
        else:
            assert torch.equal(value, after[name].detach()), f"{name} changed"

    out = tmp_path / "run"
    summary = json.loads((out / "train_summary.json").read_text())
    for key in ("train_tokens", "train_seconds", "tokens_per_second", "final_val_loss", "final_val_perplexity",
                "peak_memory_bytes", "device"):  # fmt: skip
        assert key in summary
    assert summary["train_tokens"] > 0 and summary["device"] == "cpu" and summary["steps"] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4]  # 0: the base model
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {2, 4} and len(samples) == 2 * len(cfg.sample.sample_prompts)
    assert all(s["text"].startswith(s["prompt"]) for s in samples)
    assert len(copies) == 2 and None not in copies
    assert list((out / "tb").rglob("events.out.tfevents.*"))
    assert set(adapter(out)) == {k for k in adapter(out) if "lora_" in k}

    # the output dir is a PEFT adapter: it loads onto the base with PeftModel.from_pretrained
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, out)
    assert any("lora_A" in n for n, _ in loaded.named_parameters())
    assert list_checkpoints(tmp_path / "ckpt") == ["step-000004"]


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path, data_pkl, tiny_model_dir):
    """N steps == N/2 steps, then a new run resumed from the checkpoint for N/2 more: same adapter, same losses.
    With dropout, gradient accumulation, sampling and an epoch boundary in between."""
    args = ("--max-steps", "8", "--save-every-steps", "4", "--grad-accum-steps", "2", "--lora-dropout", "0.1",
            "--sample-every", "3", "--batch-size", "3")  # fmt: skip
    train(config(tmp_path, data_pkl, tiny_model_dir, *args, run="full"))
    assert list_checkpoints(tmp_path / "ckpt") == ["step-000004", "step-000008"]
    (tmp_path / "ckpt" / "step-000008").rename(tmp_path / "full-step8")  # so the resumed run cannot reuse it
    train(config(tmp_path, data_pkl, tiny_model_dir, *args, "--restore-file", "step-000004", run="resumed"))
    assert_same_adapter(adapter(tmp_path / "full"), adapter(tmp_path / "resumed"))
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(full[s] == resumed[s] for s in resumed)


@pytest.mark.slow
def test_resume_across_epoch_boundary_with_latest(tmp_path, data_pkl, tiny_model_dir):
    # 54 train paragraphs / batch 8 -> a few windows over 7 batches per epoch: 3 epochs, resume after epoch 1
    args = ("--epochs", "3", "--batch-size", "8", "--save-interval", "1")
    train(config(tmp_path, data_pkl, tiny_model_dir, *args, run="full"))
    assert "Epoch_1" in list_checkpoints(tmp_path / "ckpt")
    for name in list_checkpoints(tmp_path / "ckpt"):
        if name != "Epoch_1":
            (tmp_path / "ckpt" / name).rename(tmp_path / f"moved-{name}")
    (tmp_path / "ckpt" / "latest").write_text("Epoch_1\n")
    train(config(tmp_path, data_pkl, tiny_model_dir, *args, "--load-checkpoint", "True", run="resumed"))
    assert_same_adapter(adapter(tmp_path / "full"), adapter(tmp_path / "resumed"))


@pytest.mark.slow
def test_sampling_does_not_change_the_trajectory(tmp_path, data_pkl, tiny_model_dir):
    args = ("--max-steps", "4", "--lora-dropout", "0.2")
    train(config(tmp_path, data_pkl, tiny_model_dir, *args, run="quiet"))
    train(config(tmp_path, data_pkl, tiny_model_dir, *args, "--sample-every", "1", "--overwrite", run="chatty"))
    assert_same_adapter(adapter(tmp_path / "quiet"), adapter(tmp_path / "chatty"))


def test_gradient_accumulation_matches_the_bigger_batch(tiny_model_dir):
    """The loss is normalised by the real tokens of the whole optimizer step, so 2 x 4 sequences == 1 x 8."""
    from accelerate import Accelerator

    from qlora_ft.config import ModelArgs
    from qlora_ft.model import add_lora, load_base

    model = add_lora(load_base(str(tiny_model_dir), True, torch.float32, torch.device("cpu")),
                     ModelArgs(rank_lora=4, lora_dropout=0.0))  # fmt: skip
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # as after some training, so every LoRA weight gets a gradient
    g = torch.Generator().manual_seed(0)
    windows = ListWindows(
        [torch.randint(1, 300, (int(n),), generator=g).tolist() for n in torch.randint(3, 20, (8,), generator=g)]
    )
    engine = Engine(Accelerator(cpu=True))

    def grads(micro):
        model.zero_grad()
        loss, n_targets, n_tokens = accumulate_gradients(model, micro, engine)
        return loss, n_targets, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_big, n_big, big = grads([make_batch([[i] for i in range(8)], windows, 0)])
    loss_acc, n_acc, acc = grads([make_batch([[i] for i in range(4)], windows, 0),
                                  make_batch([[i] for i in range(4, 8)], windows, 0)])  # fmt: skip
    assert n_big == n_acc == sum(len(w) - 1 for w in windows)
    assert loss_big == pytest.approx(loss_acc, rel=1e-5)
    for name in big:
        torch.testing.assert_close(big[name], acc[name], atol=1e-6, rtol=1e-4)


def test_resume_refuses_a_different_lora_shape_and_lists_checkpoints(tmp_path, data_pkl, tiny_model_dir):
    train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "2"))
    with pytest.raises(UserError, match="rank_lora 4 \\(this run: 8\\)"):
        train(config(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "4", "--rank-lora", "8",
                     "--load-checkpoint", "True"))  # fmt: skip
    with pytest.raises(UserError, match="'Epoch_9' not found .*available: step-000002"):
        train(config(tmp_path, data_pkl, tiny_model_dir, "--restore-file", "Epoch_9"))


@pytest.mark.slow
def test_full_fine_tuning_with_qlora_false(tmp_path, data_pkl, tiny_model_dir):
    full = ("--qlora", "False", "--lr", "1e-3")
    result = train(config(tmp_path, data_pkl, tiny_model_dir, *full, "--max-steps", "2", lora=False))
    assert all(p.requires_grad for p in result.model.parameters())
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "adapter_config.json").exists()
    # resume works for full fine-tuning too
    train(config(tmp_path, data_pkl, tiny_model_dir, *full, "--max-steps", "3", "--load-checkpoint", "True",
                 run="run2", lora=False))  # fmt: skip
    assert json.loads((tmp_path / "run2" / "train_summary.json").read_text())["steps"] == 3


def qlora_tiny(model_dir, **kw):
    from qlora_ft.config import ModelArgs
    from qlora_ft.model import add_lora, keep_training_layout, load_base

    torch.manual_seed(0)
    base = load_base(str(model_dir), True, torch.float32, torch.device("cpu"))
    keep_training_layout(base)
    model = add_lora(base, ModelArgs(rank_lora=4, lora_dropout=0.0, **kw))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_packed_batch_gives_the_same_per_paragraph_loss_as_one_by_one(tiny_model_dir):
    model = qlora_tiny(tiny_model_dir).eval()
    assert packing_is_isolated(model, torch.device("cpu"))
    assert output_layer(model) is model.get_output_embeddings()  # the chunked-loss probe passes for GPT-2
    g = torch.Generator().manual_seed(1)
    windows = ListWindows([[399, *torch.randint(1, 300, (n,), generator=g).tolist(), 399] for n in (5, 17, 2, 30, 9)])
    packed = make_batch([[0, 1, 2], [3, 4]], windows, pad_id=399)  # two rows, padded to 43 tokens
    assert "position_ids" in packed
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), packed["labels"][:, 1:], ignore_index=-100, reduction="none"
        )  # (B, T-1)
        for (row, at), index in zip([(0, 0), (0, 7), (0, 26), (1, 0), (1, 32)], range(5), strict=True):
            n = len(windows.ids(index))
            assert packed["input_ids"][row, at : at + n].tolist() == windows.ids(index)  # laid out in order
            assert packed["position_ids"][row, at : at + n].tolist() == list(range(n))  # restarts at each window
            alone = make_batch([[index]], windows, pad_id=399)
            expected, _ = token_loss(model(input_ids=alone["input_ids"], use_cache=False).logits, alone["labels"])
            got = per_token[row, at : at + n - 1].sum()
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_chunked_loss_equals_the_plain_loss_with_gradients(tiny_model_dir):
    from qlora_ft.loss import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    plain = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (gh, gw) = torch.autograd.grad(plain * 0.5, (hidden, weight))
    chunked = linear_cross_entropy(hidden, weight, targets, chunk=8)
    (ch, cw) = torch.autograd.grad(chunked * 0.5, (hidden, weight))
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(ch, gh)
    torch.testing.assert_close(cw, gw)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk=5), plain)

    # and through the model: the same loss and LoRA gradients as computing the full logits
    model = qlora_tiny(tiny_model_dir).eval()  # eval: no dropout, so both passes see the same network
    windows = ListWindows([torch.randint(1, 300, (n,), generator=g).tolist() for n in (12, 40, 7, 25)])
    for rows in ([[0], [1], [2], [3]], [[0, 1, 2], [3]]):
        batch = make_batch(rows, windows, pad_id=0)
        results = []
        for chunk in (0, 16):
            model.zero_grad()
            loss, n = forward_loss(model, batch, output_layer(model), chunk)
            loss.backward()
            results.append((loss.detach(), int(n), {k: p.grad.clone() for k, p in model.named_parameters()
                                                    if p.requires_grad}))  # fmt: skip
        (plain_loss, n0, plain_grads), (chunk_loss, n1, chunk_grads) = results
        assert n0 == n1
        torch.testing.assert_close(chunk_loss, plain_loss, atol=1e-4, rtol=1e-5)
        for k in plain_grads:
            torch.testing.assert_close(chunk_grads[k], plain_grads[k], atol=1e-5, rtol=1e-4)


def test_unwrap_asks_accelerate_only_for_a_model_that_prepare_wrapped():
    """accelerate's unwrap_model imports DeepSpeed, where installed, to look for its wrapper: a one-process
    model, which `prepare` leaves as it was, is returned as is."""

    class Prepares:  # accelerate's prepare: the objects given (one process), or the model in a container (DDP)
        def __init__(self, wrap: bool):
            self.wrap = wrap

        def prepare(self, model, optimizer):
            return (torch.nn.Sequential(model) if self.wrap else model), optimizer

        def unwrap_model(self, model):
            assert self.wrap, "unwrap_model called for a model that was not wrapped"
            return model[0]

    for wrap in (False, True):
        model = torch.nn.Linear(2, 2)
        engine = Engine(Prepares(wrap))
        engine.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        assert engine.unwrap() is model and (engine.model is not model) == wrap
