"""The precision policy: which dtype autocast computes in, and whether the loss is scaled.

Every part of the package that depends on the training precision asks `precision_policy` (the loop, its
accelerator, the method name in the summary and the start-up log), so that they cannot disagree. Trainable
weights are always float32 (the optimizer's master copy); the 16-bit dtype is only what autocast and the
4-bit matmuls compute in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """How a run computes: `autocast_dtype` None means plain float32 (no autocast)."""

    name: Literal["fp32", "bf16", "fp16"]
    autocast_dtype: torch.dtype | None
    use_scaler: bool  # fp16 only: its 5 exponent bits underflow small gradients without loss scaling

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the autocast dtype, or float32."""
        return self.autocast_dtype or torch.float32

    @property
    def accelerate_name(self) -> str:
        """accelerate's `mixed_precision` value: "no", "bf16" or "fp16"."""
        return "no" if self.autocast_dtype is None else self.name

    def describe(self) -> str:
        """For logs: e.g. "fp16 autocast with loss scaling, float32 trainable weights"."""
        if self.autocast_dtype is None:
            return "float32"
        scaling = " with loss scaling" if self.use_scaler else ""
        return f"{self.name} autocast{scaling}, float32 trainable weights"


FP32 = Precision("fp32", None, False)
BF16 = Precision("bf16", torch.bfloat16, False)
FP16 = Precision("fp16", torch.float16, True)
_BY_REQUEST = {"float32": FP32, "bfloat16": BF16, "float16": FP16}


def native_bf16(device: torch.device) -> bool:
    """Whether this CUDA device runs bf16 matmuls in hardware (compute capability 8.0+: Ampere and later).

    `torch.cuda.is_bf16_supported()` is also true on older GPUs (T4, V100), where bf16 is emulated and slow.
    """
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def precision_policy(request: str, device: torch.device) -> Precision:
    """The precision for `--compute-dtype request` on `device`.

    `auto`: bf16 on GPUs with native bf16 (compute capability >= 8.0), fp16 with loss scaling on older GPUs,
    float32 on CPU (where most CPUs lack bf16 units: ~3x slower matmuls). An explicit choice is honoured;
    bf16 on a GPU without native bf16 is warned about (it runs, slowly).
    """
    if request != "auto":
        if request not in _BY_REQUEST:
            raise ValueError(f"unknown compute dtype {request!r}: one of auto, {', '.join(_BY_REQUEST)}")
        if request == "bfloat16" and device.type == "cuda" and not native_bf16(device):
            log.warning("this GPU has no native bf16 (compute capability < 8.0): bf16 is emulated and slow; "
                        "--compute-dtype float16 uses its fp16 units with loss scaling")  # fmt: skip
        return _BY_REQUEST[request]
    if device.type == "cuda":
        return BF16 if native_bf16(device) else FP16
    return FP32
