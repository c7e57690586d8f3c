"""CBPT: the context text encoder reproduces the hand-written prompts, the trigger inversion optimises,
image features are cached once, and `engine.tune --defense cbpt` writes a run directory."""
import json

import pytest
import torch
from safetensors.torch import load_file

from engine import data as D
from engine import tune
from engine.defenses import cbpt
from engine.models import bundled_checkpoint, load_model

CLASSES = ["t-shirt", "ankle boot", "bag"]


@pytest.fixture(scope="module")
def lab():
    return load_model("lab-vit", checkpoint=bundled_checkpoint("badnet"))


def _check_reproduces_hand_prompt(clip):
    prompts = cbpt.ClassPrompts(clip, CLASSES, n_ctx=4)
    with torch.no_grad():
        tuned = prompts()
    plain = clip.text_features(CLASSES, ["a photo of a {}."])
    assert prompts.ctx.shape == (len(CLASSES), 4, clip.model.token_embedding.weight.shape[1])
    assert torch.allclose(tuned, plain, atol=1e-5), (tuned - plain).abs().max()


def test_context_encoder_reproduces_plain_prompt_lab(lab):
    _check_reproduces_hand_prompt(lab)


def test_context_encoder_reproduces_plain_prompt_vit_b32():
    torch.manual_seed(0)
    clip = load_model("ViT-B-32")
    assert clip.model.positional_embedding.shape[0] == 77
    _check_reproduces_hand_prompt(clip)


def test_random_context_for_other_lengths(lab):
    prompts = cbpt.ClassPrompts(lab, CLASSES, n_ctx=6, generator=torch.Generator().manual_seed(0))
    assert prompts.ctx.shape == (3, 6, 128) and prompts.ctx.std() < 0.05
    out = prompts()
    assert out.shape == (3, 128) and torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    out.sum().backward()
    assert prompts.ctx.grad is not None and prompts.ctx.grad.abs().sum() > 0


def _few_shot(shots=4):
    train = D.load_dataset("fashion-mnist", "train", 32, limit=2000)
    return train.subset(D.few_shot_indices(train.labels, shots, 0))


def test_inversion_reduces_loss_and_mask_in_unit_range(lab):
    train = _few_shot()
    cfg = cbpt.CBPTConfig(inv_steps=15, inv_batch=32, lam=1.0)
    mask, pattern, hist = cbpt.invert_trigger(lab, train.images, cfg)
    assert mask.shape == (1, 1, 32, 32) and pattern.shape == (1, 3, 32, 32)
    assert 0 <= mask.min() and mask.max() <= 1 and 0 <= pattern.min() and pattern.max() <= 1
    assert hist[-1] < hist[0]


def test_inversion_loss_prefers_clustered_triggered_embeddings():
    torch.manual_seed(0)
    clean = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    cluster = torch.nn.functional.normalize(torch.randn(1, 16) + 0.01 * torch.randn(8, 16), dim=-1)
    assert cbpt.inversion_loss(cluster, clean) < cbpt.inversion_loss(clean, clean)


def test_image_features_are_computed_once(lab, monkeypatch):
    train = _few_shot(2)
    calls = {"n": 0}
    real = lab.encode_image     # the frozen image tower every feature goes through

    def counting(x, *a, **k):
        calls["n"] += 1
        return real(x, *a, **k)

    monkeypatch.setattr(lab, "encode_image", counting)
    mask, pattern = torch.full((1, 1, 32, 32), 0.05), torch.rand(1, 3, 32, 32)
    clean, trig = cbpt.cache_features(lab, train.images, mask, pattern)
    after_cache = calls["n"]
    assert after_cache == 2 and clean.shape == trig.shape == (20, 128)
    hand = lab.text_features(train.classes, D.DEFAULT_TEMPLATES)
    cfg = cbpt.CBPTConfig(epochs=5)
    prompts, hist = cbpt.tune_prompts(lab, train.classes, clean, trig, train.labels, hand, cfg)
    assert calls["n"] == after_cache and len(hist) == 5 and all(map(torch.isfinite, map(torch.tensor, hist)))


def test_nan_features_raise_user_error(lab):
    from engine.errors import UserError
    feats = torch.full((4, 128), float("nan"))
    hand = lab.text_features(CLASSES, D.DEFAULT_TEMPLATES)
    with pytest.raises(UserError, match="loss became nan"):
        cbpt.tune_prompts(lab, CLASSES, feats, feats, torch.tensor([0, 1, 2, 0]), hand, cbpt.CBPTConfig(epochs=2))


def test_save_trigger_png(tmp_path):
    from PIL import Image
    path = tmp_path / "t.png"
    cbpt.save_trigger_png(path, torch.rand(1, 1, 32, 32), torch.rand(1, 3, 32, 32))
    with Image.open(path) as im:
        assert im.size == (3 * 32 * 4, 32 * 4)
    assert [p.name for p in tmp_path.iterdir()] == ["t.png"]


def test_tune_cli_cbpt(tmp_path, monkeypatch):
    default = cbpt.default_config
    monkeypatch.setattr(cbpt, "default_config", lambda model=None, **kw: default(model, inv_steps=5, **kw))
    out = tmp_path / "run"
    res = tune.main(["--defense", "cbpt", "--attack", "badnet", "--out", str(out), "--epochs", "5",
                     "--shots", "2", "--eval-limit", "200", "--quiet"])
    saved = json.loads((out / "results.json").read_text())
    for key in ("defense", "model", "attack", "target", "shots", "backend", "seconds", "before", "after",
                "tuned_params", "total_params"):
        assert key in saved
    assert saved["defense"] == "cbpt" and saved["target"] == "bag" and saved["shots"] == 2
    for phase in ("before", "after"):
        assert 0 <= saved[phase]["ca"] <= 100 and 0 <= saved[phase]["asr"] <= 100
    assert saved["before"] == res["before"]
    text = load_file(str(out / "classifier.safetensors"))["classifier"]
    assert text.shape == (10, 128)
    assert saved["tuned_params"] == 10 * saved["config"]["ctx"] * 128
    assert sorted(p.name for p in out.iterdir()) == ["classifier.safetensors", "results.json", "trigger.png"]
