"""bench/gpu_check.py without a GPU: its inputs, its runner (a failing check is recorded and hides no other,
the reports are written whatever happens) and its exit status. CI also runs its CPU dry run
(`python bench/gpu_check.py --device cpu OUT_DIR`), every check at tiny sizes."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_ft.errors import UserError, exits_cleanly

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def reports(out: Path) -> tuple[dict, str]:
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_a_failing_check_is_recorded_and_hides_no_other(gpu_check, tmp_path, monkeypatch, capsys):
    """A check ended by an entry point's exit 2 (a UserError, as for a non-finite loss) and one that raises are
    both recorded with their errors; the checks after them still run; the exit status is 1."""
    ran = []

    @exits_cleanly("train.py")
    def not_finite():
        ran.append("not_finite")
        raise UserError("the loss is not finite at step 3")

    def crashes():
        ran.append("crashes")
        raise RuntimeError("boom | with a\nsecond line")

    def passes():
        ran.append("passes")
        return {"ok": True, "n": 3}

    checks = {"not_finite": not_finite, "crashes": crashes, "passes": passes}
    monkeypatch.setattr(gpu_check, "plan_checks", lambda s: (checks, {"cuda_only": "needs CUDA's allocator"}))
    assert gpu_check.main(["--device", "cpu", str(tmp_path / "out")]) == 1
    assert ran == ["not_finite", "crashes", "passes"]
    result, md = reports(tmp_path / "out")
    assert result["checks"]["not_finite"]["error"] == "SystemExit(2) after UserError: the loss is not finite at step 3"
    assert result["checks"]["crashes"]["error"] == "RuntimeError: boom | with a\nsecond line"
    assert "RuntimeError" in result["checks"]["crashes"]["traceback"]
    assert result["checks"]["passes"] == {"ok": True, "n": 3, "seconds": pytest.approx(0, abs=1)}
    assert result["skipped"] == {"cuda_only": "needs CUDA's allocator"} and result["not_run"] == []
    assert "1 passed, 2 failed (not_finite, crashes), 1 skipped" in md
    assert "| not_finite | NO |" in md and "`SystemExit(2) after UserError: the loss is not finite at step 3`" in md
    assert "`RuntimeError: boom \\| with a second line` |" in md  # one table row, whatever the message holds
    assert '| passes | yes | 0.0 | `{"n": 3}` |' in md and "| cuda_only | skipped | - | needs CUDA's allocator |" in md
    assert "not_finite: FAILED" in capsys.readouterr().out

    monkeypatch.setattr(gpu_check, "plan_checks", lambda s: ({"passes": passes}, {}))
    assert gpu_check.main(["--device", "cpu", str(tmp_path / "out")]) == 0  # and a rerun into the same folder


def test_ctrl_c_stops_the_check_and_still_writes_the_reports(gpu_check, tmp_path, monkeypatch):
    """Ctrl-C inside an entry point (which turns it into exit 130) is not taken for a failed check: the run stops,
    exits 130, and both reports name the interrupted check and those not run."""

    @exits_cleanly("train.py")
    def ctrl_c():
        raise KeyboardInterrupt

    checks = {"passes": lambda: {"ok": True}, "ctrl_c": ctrl_c, "later": lambda: {"ok": True}}
    monkeypatch.setattr(gpu_check, "plan_checks", lambda s: (checks, {}))
    assert gpu_check.main(["--device", "cpu", str(tmp_path / "out")]) == 130
    result, md = reports(tmp_path / "out")
    assert result["checks"]["passes"]["ok"] and not result["checks"]["ctrl_c"]["ok"]
    assert result["not_run"] == ["later"] and "| later | not run | - | interrupted |" in md


def test_the_cpu_plan_skips_only_the_cuda_only_checks(gpu_check, tmp_path):
    setup = gpu_check.Setup("cpu", gpu_check.CPU, tmp_path)
    checks, skipped = gpu_check.plan_checks(setup)
    assert set(skipped) == {"precision_policy", "memory_gpt2_medium_8x512", "batch_size_auto"} and all(skipped.values())
    assert list(checks)[0] == "inputs" and len(checks) == 8 and not set(checks) & set(skipped)
    _, none_skipped = gpu_check.plan_checks(gpu_check.Setup("cuda", gpu_check.GPU, tmp_path))
    assert none_skipped == {}


def test_the_random_model_it_builds_loads_with_transformers(gpu_check, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gpu_check.build_model(tmp_path / "m", **gpu_check.CPU.small)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    ids = tokenizer(gpu_check.paragraphs(1, 20)[0], return_tensors="pt").input_ids
    assert 0 < ids.max() < model.config.vocab_size and model(ids).logits.isfinite().all()


@pytest.mark.slow
def test_without_cuda_it_says_so_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: run bench/gpu_check.py itself")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0] and "--device cpu" in lines[0] and not proc.stdout
    assert not (tmp_path / "out").exists()
