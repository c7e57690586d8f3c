"""What the kernel test modules need: where the kernels run, the dtypes, NaN-poisoned output buffers, and
fresh seeded random inputs.

Without CUDA the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Tolerance rule of the kernel tests: max |kernel - fp64 reference| <= 2 * max |torch in the same dtype - fp64
reference| + FLOOR[dtype] * max(1, max |fp64 reference|): an absolute floor for O(1) values, a few ulps of
larger ones (a purely absolute fp32 floor is below the rounding step of a loss around 10).

Random inputs: every test draws them from its own generator (the `rng` fixture), seeded with a fresh seed
per test and run, so that each run tries new inputs. The seed is printed (pytest shows it under
"Captured stdout setup" for a failing test) and is part of every assertion message of the helpers;
CLIP_PURIFY_TEST_SEED=<seed> reruns with it."""
import os
import secrets

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


class Seeded:
    """A CPU torch.Generator seeded with `seed`; str() names the seed and how to rerun with it."""

    def __init__(self, seed):
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen)

    def rand(self, *shape):
        return torch.rand(*shape, generator=self.gen)

    def randint(self, high, shape):
        return torch.randint(0, high, shape, generator=self.gen)

    def __str__(self):
        return f"seed {self.seed} (rerun with CLIP_PURIFY_TEST_SEED={self.seed})"


def fresh_seed():
    env = os.environ.get("CLIP_PURIFY_TEST_SEED")
    return int(env) if env else secrets.randbelow(2 ** 31)


@pytest.fixture
def rng(request):
    """Fresh seeded inputs for one test; the seed is printed and recorded as a user property."""
    seeded = Seeded(fresh_seed())
    request.node.user_properties.append(("seed", seeded.seed))
    print(f"{request.node.nodeid}: {seeded}")
    return seeded
