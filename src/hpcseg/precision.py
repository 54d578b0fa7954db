"""Which floating-point precision a job trains in, per card, and the gradient scaler fp16 needs.

`train.precision = "auto"` (the default) picks bf16 where the card computes it in hardware (A100, H100, H200) and
fp16 elsewhere (V100: DTU's gpuv100); the CPU always runs fp32. fp16's narrow exponent lets small gradients
underflow to zero, so fp16 training scales the loss with `torch.amp.GradScaler`; bf16 has fp32's range and needs none.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def bf16_supported() -> bool:
    """Whether the current CUDA card computes bf16 in hardware (not emulated: a V100 emulates it, slowly)."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.4 has no emulation flag: bf16 tensor cores came with compute capability 8.0
        return torch.cuda.get_device_capability() >= (8, 0)


def choose_precision(requested: str, device: torch.device) -> str:
    """The precision `requested` ("auto", "bf16", "fp16" or "fp32") resolves to on `device`: fp32 off CUDA;
    "auto" is bf16 where the card supports it, else fp16."""
    if torch.device(device).type != "cuda" or requested == "fp32":
        return "fp32"
    if requested == "auto":
        return "bf16" if bf16_supported() else "fp16"
    return requested


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to the precision the job asks for (resolved for `device`); fp32 and the CPU run without it."""
    chosen = choose_precision(precision, device)
    if chosen == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[chosen])


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 training (`precision` already resolved), else None: bf16 and fp32 need none."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def scaler_state(scaler: torch.amp.GradScaler | None) -> dict[str, Any] | None:
    """The scaler's state as plain floats and ints (a checkpoint loads with weights_only=True), or None."""
    return dict(scaler.state_dict()) if scaler is not None else None


def restore_scaler(scaler: torch.amp.GradScaler | None, state: Any) -> None:
    """Continue the scale and its growth count from a checkpoint; a run that trained in another precision (another
    card) saved none, and the scaler then starts afresh."""
    if scaler is not None and isinstance(state, dict) and state:
        scaler.load_state_dict(state)
