"""--precision: resolution per device, and bf16 evaluation that stays close to fp32."""
import pytest
import torch

from engine import precision as P
from engine.errors import UserError
from engine.job import JobConfig, measure, prepare

CPU = torch.device("cpu")


def test_resolve(monkeypatch):
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: True)
    assert P.resolve("auto", CPU) == "bf16"
    monkeypatch.setattr(P, "cpu_has_bf16", lambda: False)
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
    hook = job.clip.model.visual.transformer.resblocks[0].mlp.register_forward_hook(
        lambda m, i, o: seen.append((o.dtype, m[0].weight.dtype, torch.is_autocast_enabled("cpu"))))
    bf16 = measure(job)
    hook.remove()
    # autocast over the fp32 weights (engine.job.measure): the matmuls' outputs are bf16
    assert seen and all(s == (torch.bfloat16, torch.float32, True) for s in seen)
    assert abs(bf16["ca"] - fp32["ca"]) <= 2.0 and abs(bf16["asr"] - fp32["asr"]) <= 2.0


def test_bf16_evaluation_of_gated_prompts_stays_close_to_fp32():
    """Tuned fp32 prompts under autocast; the gate compares the frozen model's bf16-computed features."""
    from engine import prompted_vit
    from engine.runs import Tuned
    job = prepare(JobConfig(shots=1, eval_limit=300), log=lambda *a: None)
    torch.manual_seed(2)
    prompts = prompted_vit.VisualPrompts.for_visual(job.clip.model.visual, 0, 4, init_std=0.5)
    tuned = Tuned("repair", {}, 0.0, 0, {}, [], backend="shared", prompts=prompts, start=0, gate=int(job.target))
    out = {}
    for prec in ("fp32", "bf16"):
        job.eval_precision = prec
        out[prec] = measure(job, tuned)
    assert prompts.prompts.dtype == torch.float32
    assert abs(out["bf16"]["ca"] - out["fp32"]["ca"]) <= 2.0 and abs(out["bf16"]["asr"] - out["fp32"]["asr"]) <= 2.0


def test_stored_in_casts_the_frozen_weights_once_and_puts_the_fp32_ones_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    before = [t.clone() for t in model.state_dict().values()]
    with P.stored_in(model, "bf16"):
        assert model[0].weight.dtype == torch.bfloat16                 # the matmul weight ...
        assert model[0].bias.dtype == model[1].weight.dtype == torch.float32   # ... not biases and norms
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))   # bit-exact, not re-cast
    with P.stored_in(model, "fp32"):
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_run_in_bf16_keeps_fp32_prompts_trainable():
    """The frozen layer in bf16, an fp32 prompt added before it: the prompt's gradient stays fp32 and
    within bf16 rounding of the fp32 run's."""
    torch.manual_seed(1)
    model = torch.nn.Linear(16, 4).requires_grad_(False)
    x = torch.randn(32, 16)
    grads = {}
    for prec in ("fp32", "bf16"):
        prompt = torch.zeros(16, requires_grad=True)
        with P.run(prec, CPU, model):
            loss = model(x + prompt).float().square().mean()
            loss.backward()
        grads[prec] = prompt.grad
    assert grads["bf16"].dtype == torch.float32 and model.weight.dtype == torch.float32
    torch.testing.assert_close(grads["bf16"], grads["fp32"], rtol=0.05, atol=0.01)
