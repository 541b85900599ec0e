"""Run folders: a fresh run never mixes with an earlier one; --overwrite; one TensorBoard run; pruning; resume
of checkpoints whose packing the probe switched off, and of checkpoints in the earlier trainer_state layout."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from qlora_ft.checkpoint import list_checkpoints
from qlora_ft.cli import inference_main, train_main
from qlora_ft.config import TrainConfig
from qlora_ft.loop import train
from qlora_ft.options import parse_config

TINY = ["--batch-size", "4", "--max-input-length", "24", "--rank-lora", "4", "--lr", "5e-3", "--warmup-steps", "1",
        "--sample-every", "0", "--log-every", "1"]  # fmt: skip


def argv(tmp_path, data, model_dir, *extra, run="run", ckpt="ckpt"):
    return ["--data", str(data), "--model", str(model_dir), *TINY, "--check-dir", str(tmp_path / ckpt),
            "--output-dir", str(tmp_path / run), *map(str, extra)]  # fmt: skip


def digest(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def refused(capsys, args) -> str:
    """The one stderr line of a train.py run that must stop with exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    return err[0]


def rows(run_dir, name="metrics.jsonl"):
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def adapter(path):
    return load_file(path / "adapter_model.safetensors")


def assert_same_adapter(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_fresh_run_refuses_a_used_output_folder_and_changes_nothing(tmp_path, data_pkl, tiny_model_dir, capsys):
    train_main(argv(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "2"))
    before = digest(tmp_path)
    line = refused(capsys, argv(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "3"))
    assert line.startswith(f"train.py: error: --output-dir {tmp_path / 'run'} is not empty (")
    assert "--load-checkpoint True" in line and "--overwrite" in line
    assert digest(tmp_path) == before
    # a new output folder, but the checkpoints of the first run in --check-dir: refused too
    line = refused(capsys, argv(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "3", run="other"))
    assert f"--check-dir {tmp_path / 'ckpt'} is not empty (latest, step-000002)" in line
    assert digest(tmp_path) == before and not (tmp_path / "other").exists()
    # --overwrite belongs to fresh runs only
    line = refused(capsys, argv(tmp_path, data_pkl, tiny_model_dir, "--overwrite", "--load-checkpoint", "True"))
    assert "--overwrite starts a new run" in line


def test_two_runs_with_the_default_check_dir(tmp_path, data_pkl, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--data", str(data_pkl), "--model", str(tiny_model_dir), *TINY, "--max-steps", "2"]
    train_main([*common, "--output-dir", "first"])
    assert list_checkpoints(tmp_path / "Checkpoints") == ["step-000002"]
    before = digest(tmp_path)
    line = refused(capsys, [*common, "--output-dir", "second"])
    assert "--check-dir Checkpoints is not empty" in line  # the path as the user gave it
    assert digest(tmp_path) == before and not (tmp_path / "second").exists()
    train_main([*common, "--output-dir", "second", "--check-dir", "Checkpoints-second"])  # its own: fine
    assert (tmp_path / "Checkpoints" / "latest").read_text() == "step-000002\n"
    assert list_checkpoints(tmp_path / "Checkpoints-second") == ["step-000002"]


def test_overwrite_removes_only_what_qlora_ft_wrote(tmp_path, data_pkl, tiny_model_dir, caplog):
    first = argv(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "3", "--save-every-steps", "1", "--eval-every", "2")
    train_main(first)
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    (out / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    (out / "plots" / "a.png").write_bytes(b"png")
    (ckpt / "old-experiment").mkdir()  # a folder qlora-ft did not make, named like nothing it writes
    (ckpt / "old-experiment" / "trainer_state.json").write_text("{}")
    caplog.clear()
    with caplog.at_level(logging.INFO, "qlora_ft"):
        train_main(argv(tmp_path, data_pkl, tiny_model_dir, "--max-steps", "2", "--overwrite"))
    removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--overwrite: removed")]
    assert removed == [
        "--overwrite: removed .qlora-ft, README.md, adapter_config.json, adapter_model.safetensors, metrics.jsonl, "
        "report.md, run_config.json, tb, tokenizer.json, tokenizer_config.json, train_summary.json, training.png "
        f"from {out}",
        f"--overwrite: removed .qlora-ft, latest, step-000001, step-000002, step-000003 from {ckpt}",
    ]
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "plots" / "a.png").read_bytes() == b"png"
    assert (ckpt / "old-experiment" / "trainer_state.json").read_text() == "{}"
    assert list_checkpoints(ckpt) == ["step-000002"]  # the first run's are gone
    metrics = rows(out)
    assert [r["step"] for r in metrics if "val_loss" in r] == [0, 2]  # one step-0 row: this run's
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2]
    assert [p.name for p in (out / "tb").iterdir() if p.is_dir()] == []  # one run: the folder itself
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2


def test_overwrite_never_touches_the_current_folder(tmp_path, data_pkl, tiny_model_dir, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.pkl").write_bytes(data_pkl.read_bytes())
    monkeypatch.chdir(work)
    args = ["--data", "data.pkl", "--model", str(tiny_model_dir), *TINY, "--max-steps", "2", "--output-dir", "."]
    assert "--output-dir . is not empty (data.pkl)" in refused(capsys, args)
    assert sorted(p.name for p in work.iterdir()) == ["data.pkl"]
    for _ in range(2):
        train_main([*args, "--overwrite"])
        assert (work / "data.pkl").read_bytes() == data_pkl.read_bytes()
        assert [r["step"] for r in rows(work) if "val_loss" in r] == [0, 2]
    assert (work / "adapter_model.safetensors").is_file() and list_checkpoints(work / "Checkpoints")


def test_resume_continues_the_one_tensorboard_run(tmp_path, data_pkl, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ("--max-steps", "4", "--save-every-steps", "2", "--eval-every", "2")
    train_main(argv(tmp_path, data_pkl, tiny_model_dir, *args))
    (tmp_path / "ckpt" / "latest").write_text("step-000002\n")  # as if the run had died after step 3
    train_main(argv(tmp_path, data_pkl, tiny_model_dir, *args, "--load-checkpoint", "True"))
    tb = tmp_path / "run" / "tb"
    assert [p.name for p in tb.iterdir() if p.is_dir()] == []
    acc = EventAccumulator(str(tb)).Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]  # steps 3, 4 of the first launch purged
    assert [e.step for e in acc.Scalars("val_loss")] == [0, 2, 4]
    assert [r["step"] for r in rows(tmp_path / "run") if "val_loss" in r] == [0, 2, 4]


def test_keep_checkpoints_prunes_epoch_and_step_checkpoints_alike(tmp_path, data_pkl, tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, "qlora_ft"):
        train_main(argv(tmp_path, data_pkl, tiny_model_dir, "--batch-size", "32", "--epochs", "3",
                        "--save-every-steps", "4", "--keep-checkpoints", "2"))  # fmt: skip
    metrics = rows(tmp_path / "run")
    epoch_end = {r["epoch"]: r["step"] for r in metrics if "loss" in r}  # the last step of each epoch
    assert epoch_end == {1: 3, 2: 6, 3: 9}  # so saved: Epoch_1 (3), step-4, Epoch_2 (6), step-8, Epoch_3 (9)
    val = {r["step"]: r["val_loss"] for r in metrics if "val_loss" in r}  # validated at each epoch's end
    saved = {"Epoch_1": val[3], "step-000004": val[3], "Epoch_2": val[6], "step-000008": val[6], "Epoch_3": val[9]}
    best = min(saved, key=saved.get)  # a step-N checkpoint holds the validation loss last measured
    ckpt = tmp_path / "ckpt"
    assert set(list_checkpoints(ckpt)) == {"step-000008", "Epoch_3", best}
    err = caplog.text
    assert err.count(f"checkpoints go to {ckpt} (keeping the newest 2 and the best)") == 1
    assert f"deleted checkpoint {ckpt / 'step-000004'} (--keep-checkpoints 2)" in err
    # every checkpoint's trainer_state.json numbers its epoch as metrics.jsonl does
    for name in list_checkpoints(ckpt):
        meta = json.loads((ckpt / name / "trainer_state.json").read_text())
        row = next(r for r in metrics if r["step"] == meta["step"] and "loss" in r)
        assert meta["epoch"] == row["epoch"] and meta["epochs_completed"] == meta["epoch"] - name.startswith("step-")


def test_resume_after_the_packing_probe_switched_packing_off(tmp_path, data_pkl, tiny_model_dir, monkeypatch):
    import qlora_ft.training.setup

    # the probe's outcome for a model whose attention would cross packed paragraphs
    monkeypatch.setattr(qlora_ft.training.setup, "packing_is_isolated", lambda model, device: False)
    args = ("--max-steps", "4", "--save-every-steps", "2")
    train_main(argv(tmp_path, data_pkl, tiny_model_dir, *args, run="full"))
    assert json.loads((tmp_path / "full" / "run_config.json").read_text())["data"]["packing"] is False
    (tmp_path / "ckpt" / "step-000004").rename(tmp_path / "full-step4")
    cfg = parse_config(TrainConfig, argv(tmp_path, data_pkl, tiny_model_dir, *args, "--restore-file", "step-000002",
                                         run="resumed"), "train.py")  # fmt: skip
    train(cfg)  # was refused: "--packing False (this run: True)"
    assert_same_adapter(adapter(tmp_path / "full"), adapter(tmp_path / "resumed"))
    assert cfg.data.packing is True  # the probe's outcome stays inside train(): the caller's config is as given


def test_a_checkpoint_in_the_earlier_layout_resumes(tmp_path, data_pkl, tiny_model_dir, capsys, caplog):
    args = ("--batch-size", "32", "--epochs", "2")
    train_main(argv(tmp_path, data_pkl, tiny_model_dir, *args, run="full"))
    ckpt = tmp_path / "ckpt"
    (ckpt / "Epoch_2").rename(tmp_path / "full-epoch2")
    state = ckpt / "Epoch_1" / "trainer_state.json"
    meta = json.loads(state.read_text())
    assert (meta["epoch"], meta["position"], meta["epochs_completed"]) == (1, meta["batches_in_epoch"], 1)
    old = {k: v for k, v in meta.items() if k not in ("format", "epochs_completed")}
    state.write_text(json.dumps({**old, "epoch": 0}))  # earlier versions: the 0-based epoch index
    (ckpt / "Epoch_1" / "manifest.json").unlink()  # and no manifest
    with caplog.at_level(logging.INFO, "qlora_ft"):
        train_main(argv(tmp_path, data_pkl, tiny_model_dir, *args, "--restore-file", "Epoch_1", run="resumed"))
    n = meta["batches_in_epoch"]
    assert f"resumed from {ckpt / 'Epoch_1'}: step {meta['step']}, epoch 1, {n} of {n} micro-batches done" in (
        caplog.text
    )
    assert_same_adapter(adapter(tmp_path / "full"), adapter(tmp_path / "resumed"))

    # one this version cannot resume says so in one line, and still serves inference
    state.write_text(json.dumps({**meta, "format": 99}))
    line = refused(capsys, argv(tmp_path, data_pkl, tiny_model_dir, *args, "--restore-file", "Epoch_1", run="r2"))
    assert line == (f"train.py: error: checkpoint {ckpt / 'Epoch_1'} cannot be resumed by this version "
                    "(trainer_state.json format 99); it still serves inference and export: start a new run to train "
                    "further")  # fmt: skip
    inference_main(["--model_path", str(ckpt / "Epoch_1"), "--prompt", "She was", "--max_length", "3",
                    "--n_return_seqs", "1"])  # fmt: skip
    assert capsys.readouterr().out.startswith("[1] She was")
