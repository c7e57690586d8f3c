"""Perturbation resistivity: the class tokens are the ones the model's own head reads, identity gives 1,
and the per-layer mean matches a hand computation."""
import torch
import torch.nn.functional as F

from engine import diagnostics, prompted_vit
from engine.models import load_model


def _model_and_images():
    torch.manual_seed(0)
    clip = load_model("lab-vit")           # random weights: the plumbing, not the numbers
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return clip, images


def test_last_class_token_is_what_the_image_feature_reads():
    clip, images = _model_and_images()
    tokens = diagnostics.class_tokens(clip, images)
    assert tokens.shape == (6, len(clip.visual.transformer.resblocks), clip.visual.transformer.width)
    with torch.no_grad():
        head = prompted_vit._head(clip.visual, tokens[:, -1:].expand(-1, 2, -1).contiguous())
        torch.testing.assert_close(head, clip.model.encode_image(clip.normalise(images)), rtol=1e-4, atol=1e-5)


def test_resistivity_is_one_for_identity_and_matches_a_hand_computation():
    clip, images = _model_and_images()
    shift = lambda x: (x + 0.1).clamp(0, 1)
    pr = diagnostics.resistivity(clip, images, {"identity": lambda x: x, "shift": shift}, batch=4)
    assert all(abs(v - 1) < 1e-5 for v in pr["identity"])
    a, b = diagnostics.class_tokens(clip, images), diagnostics.class_tokens(clip, shift(images))
    for layer, value in enumerate(pr["shift"]):
        hand = sum(F.cosine_similarity(a[i, layer], b[i, layer], dim=0).item() for i in range(6)) / 6
        assert abs(value - hand) < 1e-5
    assert min(pr["shift"]) < 0.9999


def test_prompted_tokens_and_the_default_perturbations():
    clip, images = _model_and_images()
    prompts = prompted_vit.VisualPrompts.for_visual(clip.visual, 2, 4)
    pr = diagnostics.resistivity(clip, images, diagnostics.perturbations(lambda x: x * 0.5), prompts=prompts)
    assert set(pr) == {"noise", "blur", "colour jitter", "flip", "trigger"}
    assert all(len(v) == len(clip.visual.transformer.resblocks) - 2 for v in pr.values())
