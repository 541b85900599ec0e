"""`--batch-size auto`: the control logic with a fake step that runs out of memory above a size; refused on CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from qlora_ft import engines
from qlora_ft.cli import main
from qlora_ft.config import TrainConfig
from qlora_ft.errors import UserError
from qlora_ft.training.batch_size import choose, largest_fitting
from qlora_ft.training.setup import take_auto_batch


def fits_up_to(limit: int, tried: list[int]):
    def step(micro: int) -> None:
        tried.append(micro)
        if micro > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {micro} GiB")

    return step


def test_the_largest_divisor_that_fits_is_chosen_the_global_batch_kept():
    tried: list[int] = []
    assert choose(12, fits_up_to(5, tried)) == (4, 3)
    assert tried == [12, 6, 4]
    assert choose(8, fits_up_to(100, [])) == (8, 1)
    assert choose(8, fits_up_to(1, [])) == (1, 8)


def test_other_errors_pass_and_nothing_fitting_is_one_line():
    def broken(micro: int) -> None:
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        largest_fitting(8, broken)
    with pytest.raises(UserError, match="even one sequence"):
        largest_fitting(4, fits_up_to(0, []))


def test_a_resume_takes_the_checkpoint_choice():
    cfg, saved = TrainConfig(), TrainConfig()
    cfg.data.batch_size, saved.data.batch_size, saved.optim.grad_accum_steps = "auto", 2, 4
    engine = engines.Engine.__new__(engines.Engine)
    engine.accelerator = SimpleNamespace(num_processes=1)
    assert take_auto_batch(cfg, engine, SimpleNamespace(config=saved)) is False
    assert (cfg.data.batch_size, cfg.optim.grad_accum_steps) == (2, 4)
    cfg.data.batch_size = "auto"
    assert take_auto_batch(cfg, engine, None) is True


@pytest.mark.parametrize("command", ["train", "check"])
def test_refused_on_cpu_in_one_line(command, tmp_path, capsys):
    (tmp_path / "d.txt").write_text("Some text.\n\nMore text.")
    with pytest.raises(SystemExit) as e:
        main([command, "--data", str(tmp_path / "d.txt"), "--batch-size", "auto", "--output-dir", str(tmp_path / "o"),
              "--check-dir", str(tmp_path / "c")])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size auto finds the largest micro-batch" in err[0] and "on CPU" in err[0]


def test_a_number_or_auto_only(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--batch-size", "big"])
    assert "--batch-size" in capsys.readouterr().err
