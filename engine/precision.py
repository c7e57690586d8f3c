"""--precision: the frozen model's matrix work in bf16/fp16 (torch.autocast), while prompts, context
vectors, optimiser state and the losses stay fp32 (autocast keeps parameters fp32 and runs losses and
reductions in fp32).

`auto` picks bf16 on CUDA sm80+ and fp32 elsewhere: on this project's AMX CPU, torch.autocast's bf16
ViT-B-32 forward is slower than fp32 (it casts the fp32 weights at every call), while a model whose
weights are stored in bf16 is faster (bench/results/precision.json measures both). bf16 on the CPU is
therefore only what you ask for with --precision bf16."""
import contextlib
from functools import cache

import torch

from .errors import UserError

CHOICES = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@cache
def cpu_has_bf16():
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve(precision, device):
    """The precision a run uses: fp32, bf16 or fp16 (auto resolved for this device)."""
    if precision not in CHOICES:
        raise UserError(f"--precision {precision}: one of {', '.join(CHOICES)}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise UserError("--precision fp16 needs a CUDA device (CPU autocast supports bf16); use bf16 or fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"   # CPU autocast measured slower than fp32 (see the module docstring), with or without AMX


def autocast(precision, device):
    """A context running the frozen model's matmuls in `precision` (resolved); a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])
