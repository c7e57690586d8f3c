"""What both kernel test modules need: where the kernels run, the dtypes, NaN-poisoned output buffers.

Without CUDA the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Tolerance rule of the kernel tests: max |kernel - fp64 reference| <= 2 * max |torch in the same dtype - fp64
reference| + FLOOR[dtype] * max(1, max |fp64 reference|): an absolute floor for O(1) values, a few ulps of
larger ones (a purely absolute fp32 floor is below the rounding step of a loss around 10)."""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
SKIP_REASON = None if DEVICE == "cuda" or INTERPRET else "needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)"
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        INTERPRET, reason="bf16 is wrong under the Triton interpreter (stored as uint16, upstream bug)")),
]


def poison_buffers(monkeypatch):
    """Every buffer the kernels should fully write starts as NaN: an unwritten element fails. All op
    modules allocate their outputs through kernels._common.empty."""
    common = pytest.importorskip("kernels._common")
    monkeypatch.setattr(common, "empty",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
