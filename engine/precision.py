"""--precision: the frozen model's matrix work in bf16/fp16 (torch.autocast), while prompts, context
vectors, optimiser state and the losses stay fp32 (autocast keeps parameters fp32 and runs losses and
reductions in fp32).

`auto` picks bf16 where the hardware runs it natively (CPUs with AMX or AVX512-BF16; CUDA sm80+) and
fp32 elsewhere. On this project's 2-core AMX machine the bf16 forward is several times faster, but the
autocast backward is slower than fp32 (bench/results/precision.json), so `auto` means bf16 for inference
(evaluation) and fp32 for tuning on CPUs; on GPUs both run in bf16."""
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


def resolve(precision, device, training=False):
    """The precision a run uses: fp32, bf16 or fp16 (auto resolved for this device and kind of work)."""
    if precision not in CHOICES:
        raise UserError(f"--precision {precision}: one of {', '.join(CHOICES)}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise UserError("--precision fp16 needs a CUDA device (CPU autocast supports bf16); use bf16 or fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() and not training else "fp32"


def autocast(precision, device):
    """A context running the frozen model's matmuls in `precision` (resolved); a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])
