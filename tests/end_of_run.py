"""`train.py` as one process of several, with faults and records for tests/test_distributed.py's end-of-run test.

END_OF_RUN_EVENTS=FILE: each process appends `<event> <rank> <time>` lines to FILE: `outputs` when process 0 has
written the output folder (after a 1 s pause, as a slow disk would take), `destroy` when a process destroys the
process group. END_OF_RUN_FAIL=save: process 0's checkpoint save fails with a UserError (a full disk; only
process 0 writes, so no other process meets it); END_OF_RUN_FAIL=sigterm: process 1 gets a SIGTERM in its second
step. Run it as each process of `torchrun --nproc-per-node 2` would be run, with train.py's arguments.
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's qlora_ft, as train.py gets

import torch.distributed  # noqa: E402

import qlora_ft.checkpoint  # noqa: E402
import qlora_ft.training.finish  # noqa: E402
import qlora_ft.training.fit  # noqa: E402
from qlora_ft.cli import train_main  # noqa: E402
from qlora_ft.errors import UserError  # noqa: E402

RANK = int(os.environ.get("RANK", 0))  # set by the launcher; 0 when the module is only imported


def record(event: str) -> None:
    with open(os.environ["END_OF_RUN_EVENTS"], "a") as f:
        f.write(f"{event} {RANK} {time.time()}\n")


def recorded(function, event: str, pause: float = 0.0):
    def run(*args, **kwargs):
        time.sleep(pause)
        result = function(*args, **kwargs)
        record(event)
        return result

    return run


def full_disk(check_dir, name, *args, **kwargs):
    raise UserError(f"could not save checkpoint {check_dir / name}: No space left on device")


def signalled(step):
    def run(run_, group, lr, step_):
        if RANK == 1 and step_ == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(run_, group, lr, step_)

    return run


if __name__ == "__main__":
    destroy = torch.distributed.destroy_process_group
    torch.distributed.destroy_process_group = lambda *a, **k: (record("destroy"), destroy(*a, **k))[1]
    qlora_ft.training.finish.write_outputs = recorded(qlora_ft.training.finish.write_outputs, "outputs", 1.0)
    fault = os.environ.get("END_OF_RUN_FAIL")
    if fault == "save":
        qlora_ft.checkpoint.save_checkpoint = full_disk
    elif fault == "sigterm":
        qlora_ft.training.fit.optimizer_step = signalled(qlora_ft.training.fit.optimizer_step)
    train_main()
