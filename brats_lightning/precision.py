"""Devices and precisions, for training and inference alike.

Training: the paper's fp16 mixed precision on GPU, bf16 (or fp32) autocast on CPU (:func:`resolve_precision`).
Inference: the device (:func:`resolve_device`) and the autocast dtype of TTA (:func:`resolve_amp_dtype`).

Paper section 2.5 / docs/method.md "Training": both pipelines train with 16-mixed precision (fp16 autocast
+ grad
scaling) on GPU. fp16 autocast does not exist on CPU; docs/method.md "CPU demo recipe" measured bf16
autocast at
2.5x the speed of fp32 on this kind of CPU, so on CPU a half-precision request becomes ``bf16-mixed`` where
the CPU supports bf16 natively (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``), else ``32-true``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

HALF_PRECISIONS = ("16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true")


def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bf16 natively (oneDNN AVX512-BF16 / AMX); False when the check is unavailable."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def runs_on_cpu(accelerator: str | None) -> bool:
    """Whether a Trainer with this ``accelerator`` setting trains on the CPU ("auto" -> no CUDA / MPS)."""
    accelerator = (accelerator or "auto").lower()
    if accelerator == "cpu":
        return True
    if accelerator in ("auto", "gpu"):
        mps = getattr(torch.backends, "mps", None)
        return not torch.cuda.is_available() and not (mps is not None and mps.is_available())
    return False


def _bf16_conv_bug(crop_size: int | Sequence[int] | None) -> bool:
    """Whether training crops reach a 2x2x2 feature map at the U-Net's lowest level (crop side 16).

    Measured with torch 2.13 (oneDNN 3.12) on this CPU: under bf16 autocast, Conv3d's weight gradient is
    garbage (up to 1e35) when the input is 2x2x2 with 16 or more channels, so training diverges to NaN after
    one step. 1x1x1 and 3x3x3 or larger inputs are correct, and so is the forward pass.
    """
    if crop_size is None:
        return False
    sides = [crop_size] * 3 if isinstance(crop_size, int) else list(crop_size)
    return any(int(s) // 8 == 2 for s in sides)


def resolve_precision(
    requested: str | int, accelerator: str | None = "auto", crop_size: int | Sequence[int] | None = None
) -> str:
    """The Lightning ``precision`` to use for ``requested`` on the machine that will train.

    On GPU the request is returned unchanged. On CPU, any half-precision request becomes ``bf16-mixed`` when
    the CPU supports bf16, else ``32-true``; exactly one INFO log line says so. Full-precision requests
    pass through. (bf16 is also avoided for 16-voxel crops, see :func:`_bf16_conv_bug`.)

    Args:
        requested: the configured precision (``trainer.precision``, e.g. "16-mixed").
        accelerator: the configured accelerator ("auto", "cpu", "gpu", "cuda", ...).
        crop_size: the training crop size (only used to avoid the CPU bf16 conv bug).

    Returns:
        A Lightning precision string.
    """
    requested = str(requested)
    if requested not in HALF_PRECISIONS or not runs_on_cpu(accelerator):
        return requested
    if not cpu_supports_bf16():
        resolved, why = "32-true", "this CPU has no native bf16 support"
    elif _bf16_conv_bug(crop_size):
        resolved, why = "32-true", (f"crop {crop_size} gives 2x2x2 feature maps, where CPU bf16 Conv3d "
                                    "weight gradients are wrong in this torch build; crops of 24, 32 or more "
                                    "train in bf16")
    else:
        resolved, why = "bf16-mixed", "this CPU supports bf16 natively, about 2.5x faster than fp32"
    if resolved != requested:
        log.info("precision: %s requested but training runs on the CPU; using %s (%s)",
                 requested, resolved, why)
    return resolved


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; other strings are passed to torch.device (checked)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu/auto")
    return resolved


def resolve_amp_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype | None:
    """Autocast dtype for inference on ``device``.

    Args:
        device: where the network runs.
        precision: "auto" (fp16 on CUDA, bf16 on a CPU that supports it, else fp32), "fp32", "bf16" or "fp16".

    Returns:
        The autocast dtype, or None for plain fp32.
    """
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ValueError(f"precision={precision!r}: expected auto, fp32, bf16 or fp16")
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu":
        if cpu_supports_bf16():
            return torch.bfloat16
        log.info("this CPU has no native bf16: inference runs in fp32")
    return None
