"""`train.py` under FSDP (version 2) on CPU processes, for tests/test_distributed.py.

accelerate turns FSDP on only for accelerator devices (a CPU run becomes plain DDP), while torch's FSDP itself
shards over gloo on CPU. So this script builds the FSDP plugin from the settings `accelerate launch` took from
the config file, switches the Accelerator's engine to FSDP, and runs the real train.py entry point: everything
after that (wrapping, sharding, gathering, checkpoints) is accelerate's and torch's. Run it as
`accelerate launch --config_file configs/fsdp_qlora.yaml --num_processes 2 --mixed_precision no
tests/fsdp_on_cpu.py <train.py arguments>`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's qlora_ft, as train.py gets

import accelerate  # noqa: E402
from accelerate import FullyShardedDataParallelPlugin  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

import qlora_ft.engines  # noqa: E402
from qlora_ft.cli import train_main  # noqa: E402


def fsdp_accelerator(out_dir, precision):
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables `accelerate launch` sets
    accelerator = accelerate.Accelerator(
        cpu=True, mixed_precision=precision, fsdp_plugin=plugin, log_with="tensorboard", project_dir=str(out_dir)
    )
    for state in (AcceleratorState._shared_state, PartialState._shared_state):  # the two shared-state singletons
        state["distributed_type"] = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return accelerator


if __name__ == "__main__":
    qlora_ft.engines.make_accelerator = fsdp_accelerator
    train_main()
