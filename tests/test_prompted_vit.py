"""The prompt-aware `shared` path must equal the torch.cat reference: same loss, same prompt gradients.

The inputs are fresh every run (a new seed, printed in any failure); CLIP_PURIFY_TEST_SEED=N replays one."""
import os

import pytest
import torch
import torch.nn.functional as F

from engine import prompted_vit as P
from engine.defenses.rvpt import RVPTConfig, rvpt_step_loss
from engine.models import load_model

CASES = [("lab-vit", 2, 8, 4), ("lab-vit", 0, 16, 3), ("ViT-B-32", 3, 50, 2)]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def models():
    return {name: load_model(name) for name, *_ in CASES}


@pytest.mark.parametrize("name,start,tokens,batch", CASES)
@pytest.mark.parametrize("alpha", [2.0, 0.0])
def test_shared_matches_naive(models, name, start, tokens, batch, alpha):
    clip = models[name]
    seed = int(os.environ.get("CLIP_PURIFY_TEST_SEED", torch.seed() % 2**31))  # fresh inputs every run
    torch.manual_seed(seed)
    replay = f"inputs from seed {seed}: CLIP_PURIFY_TEST_SEED={seed} reproduces them"
    x = torch.rand(batch, 3, clip.image_size, clip.image_size)
    y = torch.randint(0, 5, (batch,))
    text = F.normalize(torch.randn(5, clip.model.text_projection.shape[1]), dim=-1)
    cfg = RVPTConfig(start=start, tokens=tokens, alpha=alpha)
    prompts = P.VisualPrompts.for_visual(clip.visual, start, tokens, init_std=0.5)
    got = {}
    for backend in ("naive", "shared"):
        prompts.zero_grad()
        loss = rvpt_step_loss(clip, prompts, x, y, text, cfg, backend)
        loss.backward()
        got[backend] = (loss.detach(), prompts.prompts.grad.clone())
    (l_ref, g_ref), (l, g) = got["naive"], got["shared"]
    assert abs((l - l_ref) / l_ref).item() <= 1e-5, replay
    assert g_ref.abs().sum() > 0, replay
    assert rel_err(g, g_ref) <= 1e-5, replay


def test_the_input_seed_can_be_replayed(models, monkeypatch):
    """The seed of a failing run, set in CLIP_PURIFY_TEST_SEED, gives the same inputs again."""
    monkeypatch.setenv("CLIP_PURIFY_TEST_SEED", "1234")
    seen = []
    real = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    for _ in range(2):
        test_shared_matches_naive(models, "lab-vit", 2, 8, 4, 0.0)
    assert torch.equal(seen[0], seen[1])


def test_prompts_change_the_features_and_frozen_pass_is_unprompted(models):
    clip = models["lab-vit"]
    x = torch.rand(3, 3, 32, 32)
    prompts = P.VisualPrompts.for_visual(clip.visual, 2, 4, init_std=1.0)
    with torch.no_grad():
        out = P.forward(clip.visual, prompts, x, "shared", with_frozen=True)
        plain = clip.model.encode_image(x)
    assert out["cls"].shape == (3, 4, 128) and out["frozen_cls"].shape == (3, 4, 128)
    assert not torch.allclose(out["feature"], plain, atol=1e-3)
    # the frozen class tokens are the unprompted model's: their last one gives the plain feature
    frozen_feature = clip.visual.ln_post(out["frozen_cls"][:, -1]) @ clip.visual.proj
    assert torch.allclose(frozen_feature, plain, atol=1e-5)


def test_prompt_count_matches_the_paper_for_vit_b32(models):
    prompts = P.VisualPrompts.for_visual(models["ViT-B-32"].visual, 3, 50)
    assert P.parameter_count(prompts) == 345_600  # 9 x 50 x 768, docs/ALGORITHMS.md


@pytest.mark.parametrize("name", ["lab-vit", "ViT-B-32"])
def test_frozen_forward_matches_open_clip(models, name):
    """Clip.encode_image runs the unprompted tower through shared_block: open_clip's numbers, fp32."""
    clip = models[name]
    seed = int(os.environ.get("CLIP_PURIFY_TEST_SEED", torch.seed() % 2**31))
    torch.manual_seed(seed)
    x = clip.normalise(torch.rand(3, 3, clip.image_size, clip.image_size))
    with torch.no_grad():
        got, want = clip.encode_image(x), clip.model.encode_image(x)
    assert P.supports(clip.visual)
    assert rel_err(got, want) < 1e-5, f"inputs from seed {seed}: CLIP_PURIFY_TEST_SEED={seed} reproduces them"
