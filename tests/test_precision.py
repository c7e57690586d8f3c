"""--precision: resolution per device, and bf16 evaluation that stays close to fp32."""
import pytest
import torch

from engine import precision as P
from engine.errors import UserError
from engine.job import JobConfig, measure, prepare

CPU = torch.device("cpu")


def test_resolve(monkeypatch):
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: True)   # autocast is slower on the CPU even with AMX
    assert P.resolve("auto", CPU) == "fp32"
    assert P.resolve("bf16", CPU) == "bf16"
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        P.resolve("fp16", CPU)
    with pytest.raises(UserError, match="one of"):
        P.resolve("int4", CPU)


def test_bf16_evaluation_runs_in_bf16_and_stays_close_to_fp32():
    job = prepare(JobConfig(shots=1, eval_limit=300), log=lambda *a: None)
    fp32 = measure(job)
    job.eval_precision = "bf16"
    seen = []
    hook = job.clip.model.visual.transformer.resblocks[0].register_forward_hook(
        lambda m, i, o: seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
    bf16 = measure(job)
    hook.remove()
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert abs(bf16["ca"] - fp32["ca"]) <= 2.0 and abs(bf16["asr"] - fp32["asr"]) <= 2.0
