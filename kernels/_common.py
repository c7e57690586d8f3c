"""What every op module of the package shares: the interpreter switch, the accepted dtypes, the output
buffer allocator, the input checks common to the ops, the device's SM count, and the launch that falls
back to smaller kernel configs when one does not fit the device."""
import functools
import os

import torch

from triton.runtime.errors import OutOfResources

try:
    from triton.runtime.errors import PTXASError
except ImportError:  # older triton
    PTXASError = OutOfResources

# Read once, like triton itself: it must be set before triton is first imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_NAMES = "float16, bfloat16 or float32"

# A config that needs more shared memory (or registers, threads) than the device has fails to compile or
# load, before any of its programs runs.
TOO_BIG = (OutOfResources, PTXASError)


def empty(shape, dtype, device):
    """Every buffer the kernels fully overwrite comes from here (tests patch it to fill with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def check_tensors(op, names, tensors):
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError(f"{op}: {', '.join(names)} must be torch tensors")


def check_float_dtypes(op, names, tensors, same):
    """Each tensor float16, bfloat16 or float32; with `same`, all of one dtype."""
    if same:
        if tensors[0].dtype not in DTYPES or any(t.dtype != tensors[0].dtype for t in tensors):
            raise ValueError(f"{op}: all inputs must have one dtype among float16, bfloat16, float32; "
                             f"got {[str(t.dtype) for t in tensors]}")
        return
    for n, t in zip(names, tensors):
        if t.dtype not in DTYPES:
            raise ValueError(f"{op}: {n} must be {_DTYPE_NAMES}; got {t.dtype}")


def check_device(op, tensors):
    """One device for all; a CPU device only under the interpreter."""
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        raise ValueError(f"{op}: all inputs must be on one device; got {[str(t.device) for t in tensors]}")
    if dev.type != "cuda" and not INTERPRET:
        raise ValueError(f"{op}: tensors on {dev} need TRITON_INTERPRET=1 (set before importing kernels); "
                         "the compiled kernels run on CUDA")


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device):
    """Streaming multiprocessors of a CUDA device; None for any other device (the interpreter's CPU)."""
    if device.type != "cuda":
        return None
    return _sm_count(torch.cuda.current_device() if device.index is None else device.index)


def launch_first_fit(configs, launch, fits, key):
    """launch(config) with the first of `configs` (preferred first, smaller ones after) that fits the
    device, starting from the one `fits[key]` remembers. A config too big for the device raises before
    any of its programs runs; `launch` allocates its own outputs, so a retry starts clean (atomic
    buffers included). The last config's error propagates."""
    start = fits.get(key, 0)
    for i in range(start if start < len(configs) else 0, len(configs)):
        try:
            out = launch(configs[i])
        except TOO_BIG:
            if i == len(configs) - 1:
                raise
            continue
        fits[key] = i
        return out
    raise ValueError("launch_first_fit: no configs")
