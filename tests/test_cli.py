"""train.py / inference.py / qlora-ft as users run them: subprocesses end to end, and every bad input."""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from qlora_ft.cli import inference_main, main, train_main

SMALL = ["--batch-size", "4", "--max-input-length", "24", "--rank_lora", "4", "--sample-every", "0",
         "--warmup-steps", "1", "--lr", "5e-3"]  # fmt: skip


def run(script, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def tree_digest(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*")
            if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory, tiny_model_dir, paragraphs):
    """One finished run for the module (in-process): Checkpoints/Epoch_1, Epoch_2, GPT2_fine_tuned_Austen/."""
    work = tmp_path_factory.mktemp("trained")
    (work / "austen_dataset.pkl").write_bytes(pickle.dumps([{"sentence": p} for p in paragraphs]))
    argv = ["--qlora", "True", "--model", str(tiny_model_dir), "--data", str(work / "austen_dataset.pkl"),
            "--epochs", "2", "--check-dir", str(work / "Checkpoints"),
            "--output-dir", str(work / "GPT2_fine_tuned_Austen"), *SMALL]  # fmt: skip
    train_main(argv)
    return work, argv


@pytest.fixture
def trained(tmp_path, trained_once):
    """A copy of that run in tmp_path, so a test may change it; returns its train.py arguments."""
    work, argv = trained_once
    shutil.copytree(work, tmp_path, dirs_exist_ok=True)
    return [arg.replace(str(work), str(tmp_path)) for arg in argv]


@pytest.mark.slow
def test_train_resume_and_generate_through_the_scripts(tmp_path, tiny_model_dir, data_pkl):
    shutil.copy(data_pkl, tmp_path / "austen_dataset.pkl")
    common = ["--qlora", "True", "--model", tiny_model_dir, "--data", "austen_dataset.pkl", *SMALL]
    first = run("train.py", *common, "--epochs", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (tmp_path / "Checkpoints").iterdir()) == [
        ".qlora-ft",  # the marker: a folder qlora-ft made
        "Epoch_1",
        "Epoch_2",
        "latest",
    ]
    resumed = run("train.py", *common, "--epochs", "3", "--restore-file", "Epoch_2", "--load-checkpoint", "True",
                  cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from Checkpoints/Epoch_2" in resumed.stderr
    summary = json.loads((tmp_path / "GPT2_fine_tuned_Austen" / "train_summary.json").read_text())
    assert summary["epochs"] == pytest.approx(3.0)

    prompt = "It is a truth universally acknowledged"
    out = run("inference.py", "--model_path", "GPT2_fine_tuned_Austen", "--prompt", prompt, "--max_length", "5",
              cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    numbered = [line for line in out.stdout.splitlines() if line.startswith("[")]
    assert [line[:4] for line in numbered] == ["[1] ", "[2] ", "[3] "]
    assert all(line[4:].startswith(prompt) for line in numbered)


def test_console_command_prepare(tmp_path):
    exe = shutil.which("qlora-ft")
    if exe is None:
        pytest.skip("the qlora-ft console script is not installed (pip install -e .)")
    book = tmp_path / "book.txt"
    book.write_text("Chapter 1\n\nIt is a truth\nuniversally acknowledged.\n\nAnother paragraph.\n")
    done = subprocess.run([exe, "prepare", book, "--out", tmp_path / "book.pkl"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert pickle.loads((tmp_path / "book.pkl").read_bytes())[0] == {  # the heading "Chapter 1" is dropped
        "sentence": "It is a truth universally acknowledged."
    }


def test_generate_subcommand_and_stream(tmp_path, trained, capsys):
    out_dir = str(tmp_path / "GPT2_fine_tuned_Austen")
    main(["generate", "--model_path", out_dir, "--prompt", "She was", "--n_return_seqs", "2", "--max_length", "4"])
    batch = capsys.readouterr().out
    inference_main(["--model_path", out_dir, "--prompt", "She was", "--n_return_seqs", "2", "--max_length", "4",
                    "--stream", "True"])  # fmt: skip
    streamed = capsys.readouterr().out
    assert batch.count("She was") == 2 and streamed.count("She was") == 2
    assert "[1] She was" in streamed and "[2] She was" in streamed


def expect_exit_2(capsys, entry, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        entry(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and "error:" in line]
    assert len(lines) == 1 and message in lines[0], err


def test_bad_inputs_exit_2_and_damage_nothing(tmp_path, trained, capsys, tiny_model_dir):
    before = tree_digest(tmp_path)
    good = list(trained)

    def with_(**changes):
        argv = list(good)
        if not {"restore_file", "load_checkpoint"} & changes.keys():  # a fresh run: into unused folders
            changes = {"output_dir": str(tmp_path / "new-out"), "check_dir": str(tmp_path / "new-ckpt"), **changes}
        for flag, value in changes.items():
            flag = "--" + flag.replace("_", "-")
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value]
        return argv

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "wrong.pkl").write_bytes(pickle.dumps({"rows": [1, 2, 3]}))  # columns, none of text
    (tmp_path / "bad" / "shapeless.pkl").write_bytes(pickle.dumps({"rows": 3}))
    (tmp_path / "bad" / "empty.pkl").write_bytes(pickle.dumps([]))
    (tmp_path / "bad" / "one.pkl").write_bytes(pickle.dumps([{"sentence": "Just one."}]))
    (tmp_path / "bad" / "latin1.txt").write_bytes("Caf\xe9 society.\n\nMore.".encode("latin-1"))
    (tmp_path / "bad" / "zero.pkl").write_bytes(b"")
    before = tree_digest(tmp_path)
    cases = [
        (with_(data=str(tmp_path / "missing.pkl")), "data file not found"),
        (with_(data=str(tmp_path / "bad" / "wrong.pkl")), "no text column"),
        (with_(data=str(tmp_path / "bad" / "shapeless.pkl")), "expected a list of records or paragraphs"),
        (with_(data=str(tmp_path / "bad" / "empty.pkl")), "no paragraphs found"),
        (with_(data=str(tmp_path / "bad" / "zero.pkl")), "corrupt or truncated"),
        (with_(data=str(tmp_path / "bad" / "one.pkl")), "too few paragraphs"),
        (with_(data=str(tmp_path / "bad" / "latin1.txt")), "not UTF-8"),
        (with_(qlora="perhaps"), "expected a boolean"),
        (with_(batch_size="-3"), "--batch-size must be at least 1"),
        (with_(epochs="two"), "invalid int value"),
        (with_(restore_file="Epoch_7"), "'Epoch_7' not found"),
        (with_(model="gpt2-medium"), "cannot load model 'gpt2-medium'"),
        (with_(model="./not/a/model"), "model directory not found"),
        (with_(rank_lora="8", load_checkpoint="True"), "rank_lora 4 (this run: 8)"),
        (with_(targets_lora="q_proj"), "q_proj: no such module"),
        (good, f"--output-dir {tmp_path / 'GPT2_fine_tuned_Austen'} is not empty"),  # a fresh run into a used one
    ]
    for argv, message in cases:
        expect_exit_2(capsys, train_main, argv, message)
    out_dir = str(tmp_path / "GPT2_fine_tuned_Austen")
    expect_exit_2(capsys, inference_main, ["--model_path", str(tmp_path / "nope")], "model path not found")
    expect_exit_2(capsys, inference_main, ["--model_path", out_dir, "--top_p", "2"], "--top-p")
    expect_exit_2(capsys, inference_main, ["--model_path", out_dir, "--base_model", "gpt2-xl"], "cannot load model")
    expect_exit_2(capsys, main, ["prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x.pkl")],
                  "data file not found")  # fmt: skip
    assert tree_digest(tmp_path) == before  # no checkpoint, output or data file was touched


@pytest.mark.slow
def test_subprocess_errors_have_no_traceback(tmp_path, tiny_model_dir):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'touch PWNED'\ntR.")  # a classic pickle payload calling os.system
    result = run("train.py", "--model", tiny_model_dir, "--data", evil, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"train.py: error: {evil}: refusing to load os.system: only lists/dicts of text and pandas "
        "DataFrames/Series are accepted (nothing in the file was executed)"
    ]
    assert not (tmp_path / "PWNED").exists()
    result = run("inference.py", "--model_path", tmp_path / "none", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_entry_points_leave_the_last_objects_to_the_os(tmp_path):
    """The interpreter's final collections over everything torch & co. loaded take 1-2 s after a run's last line:
    an entry point freezes the objects at exit (after its work is written), so that exit skips them."""
    code = ("import atexit, gc, sys; atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0)); "
            "from qlora_ft.cli import main; main(sys.argv[1:])")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code, "cache", "list", "--cache-dir", str(tmp_path)],
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert result.stdout.splitlines() == [f"0 token cache(s) in {tmp_path}", "frozen True"]
    # not one process of several: that one ends without finalization (end_launched_process)
    env = {**os.environ, "WORLD_SIZE": "2"}
    result = subprocess.run([sys.executable, "-c", code, "cache", "list", "--cache-dir", str(tmp_path)],
                            capture_output=True, text=True, check=True, env=env)  # fmt: skip
    assert result.stdout.splitlines()[-1] == "frozen False"


def test_a_launched_process_ends_after_its_logs_without_finalization():
    """One process of several ends at once when its run is complete (finalization is where the distributed back
    ends abort), exit 0, its last log line flushed; the exit hooks of finalization never run."""
    code = (
        "import atexit, logging; atexit.register(lambda: print('finalized')); "
        "from qlora_ft.cli import end_launched_process, setup_logging; setup_logging(); "
        "logging.getLogger('qlora_ft').info('done'); print('written'); end_launched_process(); print('after')"
    )
    for world, expected in (("2", ["written"]), ("1", ["written", "after", "finalized"])):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env={**os.environ, "WORLD_SIZE": world})  # fmt: skip
        assert result.returncode == 0 and result.stdout.splitlines() == expected, result
        assert "INFO done" in result.stderr
