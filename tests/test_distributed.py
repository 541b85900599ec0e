"""Data-parallel training with several processes: 2 CPU processes (torchrun, gloo) against one."""

import pickle
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, ListWindows, make_paragraphs
from qlora_ft.checkpoint import load_checkpoint
from qlora_ft.config import TrainConfig, apply_mode_defaults
from qlora_ft.errors import UserError
from qlora_ft.options import parse_config
from qlora_ft.training.resume import check_compatible

# the shipped config of each engine, and the script that runs train.py under it on CPU processes
ENGINES = {"fsdp": ("configs/fsdp_qlora.yaml", "tests/fsdp_on_cpu.py"),
           "deepspeed": ("configs/deepspeed_zero2.yaml", "tests/deepspeed_on_cpu.py")}  # fmt: skip


def launch(n_proc: int, tmp_path, data, model_dir, run: str, *extra: str, engine: str | None = None,
           launcher: tuple[str, ...] = ()):  # fmt: skip
    full = "--lora" in extra and extra[extra.index("--lora") + 1] == "False"  # LoRA options are an error there
    lora = [] if full else ["--rank-lora", "4", "--lora-dropout", "0"]
    args = ["--data", str(data), "--model", str(model_dir), "--max-input-length", "24", *lora,
            "--lr", "1e-2", "--warmup-steps", "1", "--max-steps", "3", "--sample-every", "2",
            "--max-output-length", "4", "--log-every", "1", "--check-dir", str(tmp_path / f"ckpt-{run}"),
            "--output-dir", str(tmp_path / run), *extra]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n_proc}",
           str(ROOT / "train.py"), *args]  # fmt: skip
    if engine:  # the shipped config, through accelerate's own launcher
        config, script = ENGINES[engine]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / config), *launcher,
               "--num_processes", str(n_proc), "--mixed_precision", "no", str(ROOT / script), *args]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "QLORA_FT_CACHE": str(tmp_path / "token-cache")}  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_bad_data_under_two_processes_fails_in_one_line_without_hanging(tmp_path, tiny_model_dir):
    """Process 0 loads the data first while the others wait: its failure must release them, not hang them."""
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(ROOT / "train.py"),
           "--data", str(bad), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o"),
           "--check-dir", str(tmp_path / "c")]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
           "QLORA_FT_CACHE": str(tmp_path / "token-cache")}  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    # our one line (the launcher then reports the failed process in its own words)
    assert done.returncode != 0 and f"train.py: error: {bad}: not a readable pickle" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "status"), [("", 0), ("save", 2), ("sigterm", 143)])
def test_every_process_ends_with_the_runs_status_after_the_outputs(tmp_path, data_pkl, tiny_model_dir, fault, status):
    """2 processes, started as torchrun starts them (each one's status seen here, not the launcher's summary): a
    complete run ends 0 on both, neither leaving the process group before process 0 has written the outputs; a
    UserError that only process 0 meets (its checkpoint save fails) ends both with 2, in one line each; a SIGTERM
    to process 1 saves a checkpoint and ends both with 143. Never a traceback (tests/end_of_run.py: the faults)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    events = tmp_path / "events.txt"
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "QLORA_FT_CACHE": str(tmp_path / "token-cache"), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "END_OF_RUN_EVENTS": str(events),
           "END_OF_RUN_FAIL": fault}  # fmt: skip
    args = [sys.executable, str(ROOT / "tests" / "end_of_run.py"), "--data", str(data_pkl), "--model",
            str(tiny_model_dir), "--max-input-length", "24", "--rank-lora", "4", "--batch-size", "2", "--max-steps",
            "3", "--save-every-steps", "2", "--sample-every", "0", "--output-dir", str(tmp_path / "run"),
            "--check-dir", str(tmp_path / "ckpt")]  # fmt: skip
    logs = [tmp_path / f"rank{rank}.log" for rank in range(2)]
    procs = [subprocess.Popen(args, cwd=tmp_path, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.DEVNULL, stderr=log.open("w"))
             for rank, log in enumerate(logs)]  # fmt: skip
    statuses = [proc.wait(timeout=400) for proc in procs]
    errs = [log.read_text() for log in logs]
    assert statuses == [status, status], "\n".join(e[-3000:] for e in errs)
    assert not any("Traceback" in e for e in errs), "\n".join(errs)
    if fault == "save":
        lines = [[line for line in e.splitlines() if "error:" in line] for e in errs]
        assert all(len(found) == 1 and found[0].startswith("train.py: error: ") for found in lines), lines
        assert "No space left on device" in lines[0][0]
        return
    if fault == "sigterm":
        assert all("stopped by SIGTERM after step 2" in e for e in errs)
        assert load_checkpoint(tmp_path / "ckpt" / "step-000002")[0]["step"] == 2
        return
    out = tmp_path / "run"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "run_config.json",
                 "train_summary.json", "report.md", "metrics.jsonl"):  # fmt: skip
        assert (out / name).is_file(), name
    times = {(event, int(rank)): float(t) for event, rank, t in map(str.split, events.read_text().splitlines())}
    assert times[("destroy", 0)] >= times[("outputs", 0)] and times[("destroy", 1)] >= times[("outputs", 0)], times


def no_dropout_copy(model_dir, out):
    """The tiny model without dropout (GPT-2 configs default to 0.1): runs on different processes draw
    different masks, so only a dropout-free model can be compared across process counts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.update({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


@pytest.mark.slow
def test_two_processes_equal_one_with_the_double_batch_and_resume_on_either(tmp_path, tiny_model_dir):
    """2 processes x batch 2 train what 1 process x batch 4 does, and each one's step-2 checkpoint resumes on the
    other count (and on its own) to the same adapter. Unpacked, the epoch's first global batch holds one row,
    so the second of 2 processes takes that step without one."""
    tiny_model_dir = no_dropout_copy(tiny_model_dir, tmp_path / "model")
    data = tmp_path / "small.pkl"
    data.write_bytes(pickle.dumps([{"sentence": p} for p in make_paragraphs(12)]))  # 21 rows: 1 + 5 x 4
    common = ("--packing", "False", "--save-every-steps", "2")
    two = launch(2, tmp_path, data, tiny_model_dir, "two", "--batch-size", "2", *common)
    # process 0 built the token cache while process 1 waited, then both mapped it: one build, one cache
    assert two.stderr.count("token cache") and two.stderr.count(" built in ") == 1
    assert len([p for p in (tmp_path / "token-cache").iterdir() if not p.name.startswith(".")]) == 1
    one = launch(1, tmp_path, data, tiny_model_dir, "one", "--batch-size", "4", *common)
    assert "setup: single process, device cpu" in one.stderr and "setup: DDP on 2 processes, device cpu" in two.stderr
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("two", "one"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    # only the main process writes: one set of metrics rows, one checkpoint folder, one samples file
    rows = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in rows if '"loss"' in r]) == 3
    names = sorted(p.name for p in (tmp_path / "ckpt-two").iterdir())
    assert names == [".qlora-ft", "latest", "step-000002", "step-000003"]
    two, one = (
        [line for line in rows if '"val_loss"' in line],
        [line for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in line],
    )
    assert len(two) == len(one) == 2  # step 0 and the end, scored on all validation paragraphs by both

    # resume step 2 -> 3 with the same global batch: 2 -> 1, 2 -> 2 (each process takes back its own RNG
    # state) and 1 -> 2 (the second process, which the checkpoint lacks, gets a stream of its own)
    for n_proc, batch, saved in ((1, "4", "two"), (2, "2", "two"), (2, "2", "one")):
        run = f"resumed-{saved}-on-{n_proc}"
        done = launch(n_proc, tmp_path, data, tiny_model_dir, run, "--batch-size", batch, "--packing", "False",
                      "--check-dir", str(tmp_path / f"ckpt-{saved}"), "--restore-file", "step-000002")  # fmt: skip
        assert ("processes 1 to 1 draw fresh dropout RNG streams" in done.stderr) == (saved == "one" and n_proc == 2)
        c = load_file(tmp_path / run / "adapter_model.safetensors")
        for k in a:
            torch.testing.assert_close(c[k], a[k], atol=1e-5, rtol=1e-4)


def test_resume_refuses_a_different_global_batch(tmp_path):
    cfg = parse_config(TrainConfig, ["--data", "x.pkl", "--batch-size", "2"], "train.py")
    same = parse_config(TrainConfig, ["--data", "x.pkl", "--batch-size", "4"], "train.py")
    for c in (cfg, same):  # as training compares them: with the data's mode defaults filled in
        apply_mode_defaults(c, "text")
    check_compatible(cfg, same, tmp_path, saved_world=2, world=1)  # 2 x 2 == 4 x 1
    with pytest.raises(UserError, match=r"--batch-size 2 on 2 process\(es\) \(this run: 2 on 1\)"):
        check_compatible(cfg, cfg, tmp_path, saved_world=2, world=1)


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_and_resume_anywhere(tmp_path, data_pkl, tiny_model_dir):
    """QLoRA sharded with FSDP 2 over 2 CPU processes (tests/fsdp_on_cpu.py) trains the adapter that one
    unsharded process does; its checkpoints (gathered weights and optimizer state) resume unsharded and sharded."""
    tiny_model_dir = no_dropout_copy(tiny_model_dir, tmp_path / "model")
    fsdp = launch(2, tmp_path, data_pkl, tiny_model_dir, "fsdp", "--batch-size", "2", "--save-every-steps", "2",
                  engine="fsdp")  # fmt: skip
    assert "FSDP: computing full logits" in fsdp.stderr
    launch(1, tmp_path, data_pkl, tiny_model_dir, "one", "--batch-size", "4")
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("fsdp", "one"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    step2 = load_file(tmp_path / "ckpt-fsdp" / "step-000002" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in step2.items()} == {k: v.shape for k, v in b.items()}  # gathered, not a shard

    # step 2 -> 3 again, from the FSDP checkpoint: on one unsharded process, and sharded on two
    for n_proc, batch, sharded, run in ((1, "4", False, "resumed-one"), (2, "2", True, "resumed-fsdp")):
        launch(n_proc, tmp_path, data_pkl, tiny_model_dir, run, "--batch-size", batch, "--check-dir",
               str(tmp_path / "ckpt-fsdp"), "--restore-file", "step-000002", "--output-dir", str(tmp_path / run),
               engine="fsdp" if sharded else None)  # fmt: skip
        c = load_file(tmp_path / run / "adapter_model.safetensors")
        for k in a:
            torch.testing.assert_close(c[k], a[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_deepspeed_two_processes_equal_one_and_resume_anywhere(tmp_path, data_pkl, tiny_model_dir):
    """QLoRA under DeepSpeed ZeRO-2 on 2 CPU processes (tests/deepspeed_on_cpu.py), accumulating 2 micro-batches
    per step, trains the adapter that one process does without DeepSpeed; its checkpoints (float32 masters and
    AdamW moments gathered from ZeRO's slices) equal a one-process run's and resume under ZeRO-1."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
    tiny_model_dir = no_dropout_copy(tiny_model_dir, tmp_path / "model")
    common = ("--grad-accum-steps", "2", "--max-grad-norm", "0.05")  # clipping on: DeepSpeed clips in its step
    ds = launch(2, tmp_path, data_pkl, tiny_model_dir, "ds", "--batch-size", "2", "--save-every-steps", "2", *common,
                engine="deepspeed")  # fmt: skip
    assert "engine: DeepSpeed ZeRO-2 on 2 processes" in ds.stderr
    launch(1, tmp_path, data_pkl, tiny_model_dir, "one", "--batch-size", "4", "--save-every-steps", "2", *common)
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("ds", "one"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    saved = {run: load_checkpoint(tmp_path / f"ckpt-{run}" / "step-000002")[1]["optimizer"] for run in ("ds", "one")}
    assert saved["ds"]["param_groups"][0]["params"] == saved["one"]["param_groups"][0]["params"]
    for i, state in saved["one"]["state"].items():  # the same moments, gathered whole, by parameter position
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(saved["ds"]["state"][i][key], state[key], atol=1e-6, rtol=1e-4)
    step2 = [load_file(tmp_path / f"ckpt-{run}" / "step-000002" / "adapter_model.safetensors") for run in ("ds", "one")]
    for k in step2[1]:  # and the same weights
        torch.testing.assert_close(step2[0][k], step2[1][k], atol=1e-5, rtol=1e-4)

    # so the ZeRO-2 checkpoint resumes wherever the one-process checkpoint does; here, under ZeRO-1
    done = launch(2, tmp_path, data_pkl, tiny_model_dir, "resumed", "--batch-size", "2", *common, "--check-dir",
                  str(tmp_path / "ckpt-ds"), "--restore-file", "step-000002", "--output-dir", str(tmp_path / "resumed"),
                  engine="deepspeed", launcher=("--zero_stage", "1"))  # fmt: skip
    assert "engine: DeepSpeed ZeRO-1 on 2 processes" in done.stderr
    c = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(c[k], a[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_deepspeed_bf16_resumes_exactly(tmp_path, data_pkl, tiny_model_dir):
    """With bf16, DeepSpeed casts the model to 16 bits and keeps float32 masters; checkpoints hold the masters
    and resuming restores them, so an interrupted run ends with the very adapter of an uninterrupted one."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
    bf16 = ("--batch-size", "2", "--compute-dtype", "bfloat16")  # train.py asks accelerate for bf16
    launch(2, tmp_path, data_pkl, tiny_model_dir, "ds", *bf16, "--save-every-steps", "2", engine="deepspeed")
    launch(2, tmp_path, data_pkl, tiny_model_dir, "resumed", *bf16, "--check-dir", str(tmp_path / "ckpt-ds"),
           "--restore-file", "step-000002", "--output-dir", str(tmp_path / "resumed"), engine="deepspeed")  # fmt: skip
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("ds", "resumed"))
    for k in a:
        assert a[k].dtype == torch.float32
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_deepspeed_loraplus_equals_one_process_and_resumes_exactly(tmp_path, data_pkl, tiny_model_dir):
    """LoRA+ under DeepSpeed: its flat parameter groups keep each group's learning-rate ratio through the schedule,
    and their optimizer state saves and restores group by group, so 2 processes match one and an interrupted
    run ends with the adapter of an uninterrupted one."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
    tiny_model_dir = no_dropout_copy(tiny_model_dir, tmp_path / "model")
    plus = ("--loraplus-ratio", "4")
    launch(2, tmp_path, data_pkl, tiny_model_dir, "ds", "--batch-size", "2", *plus, "--save-every-steps", "2",
           engine="deepspeed")  # fmt: skip
    launch(1, tmp_path, data_pkl, tiny_model_dir, "one", "--batch-size", "4", *plus)
    launch(2, tmp_path, data_pkl, tiny_model_dir, "resumed", "--batch-size", "2", *plus, "--check-dir",
           str(tmp_path / "ckpt-ds"), "--restore-file", "step-000002", "--output-dir", str(tmp_path / "resumed"),
           engine="deepspeed")  # fmt: skip
    ds, one, resumed = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("ds", "one", "resumed"))
    for k in ds:
        torch.testing.assert_close(ds[k], one[k], atol=1e-5, rtol=1e-4)
        assert torch.equal(ds[k], resumed[k]), k


@pytest.mark.slow
def test_deepspeed_full_fine_tuning_equals_one_process(tmp_path, data_pkl, tiny_model_dir):
    """Full fine-tuning (every weight trained, ZeRO-2 splitting its AdamW state) on 2 processes matches one
    process; the tied output layer is saved once."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
    tiny_model_dir = no_dropout_copy(tiny_model_dir, tmp_path / "model")
    full = ("--qlora", "False", "--lora", "False")
    launch(2, tmp_path, data_pkl, tiny_model_dir, "ds", "--batch-size", "2", *full, engine="deepspeed")
    launch(1, tmp_path, data_pkl, tiny_model_dir, "one", "--batch-size", "4", *full)
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("ds", "one"))
    assert a.keys() == b.keys() and "lm_head.weight" not in a
    for k in a:  # Adam turns float noise in near-zero gradients into whole updates of lr: a looser bound
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)


def test_engines_this_loop_does_not_drive_are_refused():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from qlora_ft.engines import check_engine

    cfg = parse_config(TrainConfig, ["--data", "x.pkl"], "train.py")
    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2,
                            state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))  # fmt: skip
    with pytest.raises(UserError, match="FSDP version 1 is not supported"):
        check_engine(fsdp1, cfg)
    fsdp1.state.fsdp_plugin.fsdp_version = 2
    assert check_engine(fsdp1, cfg) == "fsdp"
    assert check_engine(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU), cfg) is None
    cfg.model.lora = False
    with pytest.raises(UserError, match="full fine-tuning"):
        check_engine(fsdp1, cfg)


def deepspeed_accelerator(stage: int, **config):
    """A stand-in for the Accelerator, with the plugin accelerate builds from a config file's settings."""
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin, DistributedType

    plugin = DeepSpeedPlugin(zero_stage=stage, gradient_accumulation_steps=1)
    plugin.deepspeed_config.update(config)
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=4,
                           state=SimpleNamespace(deepspeed_plugin=plugin))  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "config", "error"),
    [
        (3, {}, "ZeRO stage 3 is not supported.*configs/fsdp_qlora.yaml"),
        (0, {}, "ZeRO stage 0 is not supported"),
        (2, {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
        (2, {"optimizer": {"type": "AdamW"}}, "remove 'optimizer'.*--lr"),
        (2, {"scheduler": {"type": "WarmupLR"}}, "remove 'scheduler'"),
        (2, {"gradient_accumulation_steps": 4}, "--grad-accum-steps"),
    ],
)
def test_deepspeed_configs_this_loop_does_not_drive_are_refused(stage, config, error):
    from qlora_ft.engines import check_engine

    cfg = parse_config(TrainConfig, ["--data", "x.pkl"], "train.py")
    with pytest.raises(UserError, match=error):
        check_engine(deepspeed_accelerator(stage, **config), cfg)


def test_deepspeed_config_takes_the_batch_and_clipping_from_the_flags():
    from qlora_ft.engines import DeepSpeedEngine, check_engine

    args = ["--data", "x.pkl", "--batch-size", "3", "--grad-accum-steps", "5", "--max-grad-norm", "0.5"]
    accelerator, cfg = deepspeed_accelerator(2), parse_config(TrainConfig, args, "train.py")
    assert check_engine(accelerator, cfg) == "deepspeed"
    DeepSpeedEngine(accelerator).configure(cfg)  # the batch size, once the data's mode has settled it
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")
    assert [ds[k] for k in keys] == [3, 1, 12, 0.5]  # 3 rows x 4 processes per micro-batch; the loop accumulates 5


# --- resuming under another process count --------------------------------------------------------------


def test_every_process_gets_defined_rng_state_under_any_process_count():
    """A one-process checkpoint resumed on 4 processes: process 0 takes back the saved state; the others, which
    the checkpoint did not have, get fresh streams, distinct and the same at every resume. 2 -> 1 keeps row 0."""
    from qlora_ft.training.state import TrainState

    def draws(state, world, seed=0):
        out = []
        for rank in range(world):
            state.restore_rng(rank, torch.device("cpu"), seed)
            out.append(torch.rand(4))
        return out

    torch.manual_seed(123)
    saved = torch.get_rng_state()
    expected = torch.rand(4)  # what the saved state draws next
    one = TrainState(step=2, rng={"rng_cpu": saved[None]})
    four = draws(one, 4)
    torch.testing.assert_close(four[0], expected, rtol=0, atol=0)
    assert len({tuple(d.tolist()) for d in four}) == 4  # four distinct streams
    for a, b in zip(four, draws(one, 4), strict=True):  # the same ones at every resume
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(draws(one, 2, seed=1)[1], four[1])  # ... and another seed, another stream
    torch.manual_seed(7)
    two = TrainState(step=2, rng={"rng_cpu": torch.stack([saved, torch.get_rng_state()])})
    torch.testing.assert_close(draws(two, 1)[0], expected, rtol=0, atol=0)
    earlier = TrainState(step=2, rng={"rng_cpu": saved})  # earlier versions: one state, process 0's
    torch.testing.assert_close(draws(earlier, 2)[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("packing", [False, True])
def test_the_plan_holds_the_same_global_batches_under_any_process_count(packing):
    """With the same global batch, 1, 2 and 4 processes train the same global batches in the same order, an
    epoch's short batch (fewer rows than processes) included: a checkpoint's position means the same data."""
    from qlora_ft.training.plan import EpochPlan

    lengths = [5 + i % 7 for i in range(37)]  # 37 rows: batches of 4, and one of 1 (shuffled in, unpacked)
    plans = [EpochPlan(lengths, 12, packing, 4 // world, world, 2, seed=3) for world in (1, 2, 4)]
    for epoch in (0, 1):
        assert min(len(b) for b in plans[0].batches(epoch)) < 4  # a short batch the other counts must keep
        assert plans[1].batches(epoch) == plans[0].batches(epoch) == plans[2].batches(epoch)
        assert plans[1].steps_in(epoch) == plans[0].steps_in(epoch)


def test_a_process_without_a_row_steps_with_no_targets():
    from types import SimpleNamespace

    from qlora_ft.training.run import Run

    train = ListWindows([[9, 5, 6], [9, 7]])
    runs = [SimpleNamespace(data=SimpleNamespace(train=train), pad_id=0, engine=SimpleNamespace(rank=r, world=2))
            for r in (0, 1)]  # fmt: skip
    mine, none = (Run.micro_batch(run, [[1]]) for run in runs)  # a global batch of one row, on 2 processes
    assert mine["input_ids"].tolist() == [[9, 7]] and int(mine["n_tokens"]) == 2
    assert none["input_ids"].shape == mine["input_ids"].shape  # a forward like the others'
    assert (none["labels"] == -100).all() and int(none["n_tokens"]) == 0  # that trains and counts nothing


def test_deepspeed_loss_scaler_state_round_trips_through_a_checkpoint(tmp_path, monkeypatch):
    """DeepSpeed's fp16 loss scaler (its own, not accelerate's): the scale and its counters go into
    trainer_state.pt and come back, so the resumed scaler moves exactly as the uninterrupted one."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
    from types import SimpleNamespace

    from deepspeed.runtime.fp16 import loss_scaler
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler

    from qlora_ft.engines import DeepSpeedEngine

    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda: 0)  # it logs overflows on process 0; no group here

    def engine():  # DeepSpeed's dynamic scaler as ZeRO-1/2 holds it, behind accelerate's optimizer wrapper
        args = {"init_scale": 2.0**16, "scale_window": 2, "min_scale": 1.0, "delayed_shift": 2,
                "consecutive_hysteresis": False}  # fmt: skip
        scaler = CreateLossScaler(torch.float16, 0, True, args)
        ds = DeepSpeedEngine(accelerator=None)
        ds.optimizer = SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=scaler, optimizer=None))
        return ds, scaler

    overflows = [False, True, True, False, False, False, True, False, False, False]
    run, scaler = engine()
    for overflow in overflows[:5]:
        scaler.update_scale(overflow)
    torch.save({run.scaler_key: run.scaler_state()}, tmp_path / "state.pt")
    resumed, fresh = engine()
    resumed.restore_scaler(torch.load(tmp_path / "state.pt", weights_only=True)[resumed.scaler_key])
    for overflow in overflows[5:]:
        scaler.update_scale(overflow)
        fresh.update_scale(overflow)
        assert fresh.cur_scale == scaler.cur_scale and fresh.cur_hysteresis == scaler.cur_hysteresis
    assert vars(fresh) == vars(scaler) and scaler.cur_scale != 2.0**16


def cpu_fp16_or_skip():
    """DeepSpeed trains fp16 on CPU only where its CPU accelerator says the CPU supports it."""
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        pytest.skip("this CPU has no fp16 support in DeepSpeed's CPU accelerator (is_fp16_supported() is False)")


@pytest.mark.slow
def test_deepspeed_fp16_resumes_exactly(tmp_path, data_pkl, tiny_model_dir):
    """With fp16, DeepSpeed scales the loss with its own dynamic loss scaler (accelerate's is None there):
    checkpoints hold its scale and counters, so a resumed run ends with the uninterrupted run's adapter and
    scaler state (without them, the resumed scaler would count from 0 again)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
    cpu_fp16_or_skip()
    # one process: the scaler is the same on every process, and one is the cheaper launch
    fp16 = ("--batch-size", "4", "--compute-dtype", "float16", "--save-every-steps", "2")
    ds = launch(1, tmp_path, data_pkl, tiny_model_dir, "ds", *fp16, engine="deepspeed")
    assert "loss scaling dynamic (fp16 DeepSpeed's loss scaler)" in ds.stderr
    launch(1, tmp_path, data_pkl, tiny_model_dir, "resumed", *fp16, "--restore-file",
           str(tmp_path / "ckpt-ds" / "step-000002"), engine="deepspeed")  # fmt: skip
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("ds", "resumed"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    scalers = [load_checkpoint(tmp_path / f"ckpt-{run}" / "step-000003")[1]["deepspeed_loss_scaler"]
               for run in ("ds", "resumed")]  # fmt: skip
    assert scalers[0] == scalers[1] and scalers[0]["cur_iter"] == 3, scalers
