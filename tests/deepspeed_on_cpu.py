"""`train.py` under DeepSpeed on CPU processes, for tests/test_distributed.py.

accelerate turns DeepSpeed on only when it is not told to use the CPU, and then picks its process-group
backend from an accelerator device; DeepSpeed itself runs on CPU (its CPU accelerator, gloo). So this script
builds the Accelerator with cpu=False and the gloo backend and runs the real train.py entry point: the engine,
ZeRO's partitioning and the checkpoints are DeepSpeed's and accelerate's. Run it as `accelerate launch
--config_file configs/deepspeed_zero2.yaml --num_processes 2 --mixed_precision no tests/deepspeed_on_cpu.py
<train.py arguments>`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's qlora_ft, as train.py gets

import accelerate  # noqa: E402
from accelerate.utils import InitProcessGroupKwargs  # noqa: E402

import qlora_ft.engines  # noqa: E402
from qlora_ft.cli import train_main  # noqa: E402


def deepspeed_accelerator(out_dir, precision):
    return accelerate.Accelerator(
        cpu=False,
        mixed_precision=precision,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
        log_with="tensorboard",
        project_dir=str(out_dir),
    )


if __name__ == "__main__":
    qlora_ft.engines.make_accelerator = deepspeed_accelerator
    train_main()
