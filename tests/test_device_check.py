"""bench.device_check's config sweep, run here on the CPU under the Triton interpreter at a tiny shape:
every forward config (autotuned and pinned) and the backward against fp64, and a wrong kernel fails."""
import pytest
import torch

from bench import device_check as DC
from tests.kernel_helpers import DEVICE, SKIP_REASON

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
TINY = [("tiny", 2, 2, 9, 5, 16)]


def test_every_forward_config_and_the_backward_match_fp64():
    from kernels import prompt_attention as PA
    rows = DC.check_attention_configs(TINY, {"fp32": torch.float32}, device=DEVICE)
    fwd = {r["config"] for r in rows if r["pass"] == "fwd"}
    assert set(PA._FWD_TUNED) <= fwd                           # the autotuner's candidates, each launched
    assert {r["deterministic"] for r in rows if r["pass"] == "bwd"} == {True, False}
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


def test_a_wrong_kernel_is_past_tolerance(monkeypatch):
    from kernels import prompt_attention as PA
    real = PA._backward_with

    def off_by_a_bit(*a, **k):
        dq, *rest = real(*a, **k)
        return (dq * 1.01, *rest)
    monkeypatch.setattr(PA, "_backward_with", off_by_a_bit)
    rows = DC.check_attention_configs(TINY, {"fp32": torch.float32}, device=DEVICE)
    bad = [r for r in rows if not r["ok"]]
    assert bad and all(r["pass"] in ("bwd", "op") and r["errors"]["dq"] > r["tolerance"] for r in bad)
