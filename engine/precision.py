"""--precision: the frozen model's weights stored and its matrix work run in bf16/fp16, while prompts,
context vectors, optimiser state and the losses stay fp32. `run(precision, device, model)` stores the
frozen model's floating weights in the low precision for the block (one cast, kept fp32 outside it)
under torch.autocast, which casts the fp32 prompts and activations into the matmuls and keeps reductions
and losses in fp32; features leave the image tower as fp32 (engine.evaluate).

Evaluation (no gradients) uses autocast alone over the fp32 weights (engine.job.measure): side by side
it was faster than the stored bf16 matrices (bench/results/precision.md).

`auto` picks bf16 on CUDA sm80+ and on CPUs with AMX or AVX512-BF16, fp32 elsewhere: on the project's CPUs
a ViT-B-32 forward and RVPT step in bf16 are faster than fp32 (bench/results/precision.md,
tune_step.md); the small lab model's matmuls are too small to gain (the same files)."""
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
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(precision, device):
    """A context running the frozen model's matmuls in `precision` (resolved); a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


@contextlib.contextmanager
def stored_in(module, precision):
    """Within the block, `module`'s floating weight matrices (parameters and buffers of 2+ dimensions:
    linear, convolution, projection and embedding weights, the matmul work) are stored in `precision`
    (fp32: as they are); the fp32 tensors are put back after, untouched. Norm weights and biases stay fp32
    (the CPU layer_norm takes low-precision inputs only with fp32 parameters). For frozen weights: no
    gradient reaches them inside the block."""
    if precision == "fp32":
        yield module
        return
    dtype, kept = DTYPES[precision], []
    try:
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point() and t.dim() >= 2 and t.dtype != dtype:
                kept.append((t, t.data))
                t.data = t.data.to(dtype)
        yield module
    finally:
        for t, data in kept:
            t.data = data


@contextlib.contextmanager
def run(precision, device, model):
    """The frozen `model` stored in `precision` (resolved) and its matmuls autocast there; fp32: no-op."""
    with stored_in(model, precision), autocast(precision, device):
        yield

