"""A full RVPT step through the fused path (Triton kernels, interpreter on CPU) gives the same loss and
prompt gradients as the `shared` torch path, on the lab architecture."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from engine import prompted_vit as P
from engine.defenses.rvpt import RVPTConfig, rvpt_step_loss
from engine.models import load_model
from kernel_helpers import rng  # noqa: F401
from kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not importable")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("margin", [None, -0.5])
def test_rvpt_step_fused_matches_shared(margin, monkeypatch, rng):
    calls = []
    for module, name in (("kernels.prompt_attention", "prompt_attention"), ("kernels.repel_loss", "repel_ce_loss")):
        mod = importlib.import_module(module)  # count calls: the kernels must really run
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    with torch.random.fork_rng(devices=[]):  # the model's and the prompts' random init: seeded too
        torch.manual_seed(rng.seed)
        # on a CUDA machine the compiled kernels run on the GPU; here, the interpreter on CPU tensors
        clip = load_model("lab-vit", device=DEVICE)
        cfg = RVPTConfig(start=4, tokens=5, margin=margin)  # two prompted blocks keep the interpreter quick
        prompts = P.VisualPrompts.for_visual(clip.visual, cfg.start, cfg.tokens, init_std=0.5).to(DEVICE)
    x = rng.rand(3, 3, 32, 32).to(DEVICE)
    y = rng.randint(4, (3,)).to(DEVICE)
    text = F.normalize(rng.randn(4, 128), dim=-1).to(DEVICE)
    got = {}
    for backend in ("shared", "triton"):
        prompts.zero_grad()
        loss = rvpt_step_loss(clip, prompts, x, y, text, cfg, backend)
        loss.backward()
        got[backend] = (loss.detach(), prompts.prompts.grad.clone())
    assert sorted(set(calls)) == ["prompt_attention", "repel_ce_loss"]
    (l_ref, g_ref), (l, g) = got["shared"], got["triton"]
    assert abs(l.item() - l_ref.item()) <= 1e-5 * abs(l_ref.item()), f"loss {l.item()} vs {l_ref.item()} ({rng})"
    assert g_ref.abs().sum() > 0, str(rng)
    rel = ((g - g_ref).norm() / g_ref.norm()).item()
    assert rel <= 1e-4, f"prompt gradient: relative error {rel:.3g} ({rng})"
