import shutil

import pytest
import torch

from engine import data as D
from engine.errors import UserError
from engine.models import load_model
from engine.triggers import BUILT, TRIGGERS, build_artifact, make_trigger
from engine.triggers import artifacts
from engine.triggers.badnet import BadNet
from engine.triggers.optimised_patch import embed, patch_losses, target_anchors, towards_target_text
from engine.triggers.ssba import EPS, bit_accuracy

BUNDLED_ARTIFACTS = artifacts.ARTIFACT_DIR
TARGET = D.FASHION_CLASSES.index("bag")


@pytest.fixture(scope="module")
def tiny_lab():
    """A random-weight lab CLIP and a few rendered training images."""
    torch.manual_seed(0)
    return load_model("lab-vit"), D.load_fashion_mnist("train", limit=300)


@pytest.fixture(autouse=True)
def tiny_artifacts(tiny_lab, tmp_path_factory, monkeypatch):
    """Every built trigger, built in a few steps on the tiny lab into a temp folder (built once per module),
    so the tests neither read nor write checkpoints/lab/triggers."""
    folder = tmp_path_factory.getbasetemp() / "tiny-triggers"
    monkeypatch.setattr(artifacts, "ARTIFACT_DIR", folder)
    if not folder.is_dir():
        clip, data = tiny_lab
        for name in BUILT:
            build_artifact(name, clip, data, TARGET, 0, "test", steps=8, batch=16, progress=False)
    return folder


@pytest.mark.parametrize("name", sorted(TRIGGERS))
def test_trigger_is_deterministic_changes_images_and_stays_in_range(name):
    x = torch.rand(6, 3, 32, 32)
    x0 = x.clone()
    a, b = make_trigger(name, 32, seed=0)(x), make_trigger(name, 32, seed=0)(x)
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert (a - x).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every image carries it
    assert torch.equal(x, x0)  # the input is not modified in place


@pytest.mark.parametrize("name", ["badnet", "blended", "wanet"])
def test_seed_changes_the_pattern(name):
    x = torch.rand(2, 3, 32, 32)
    assert not torch.equal(make_trigger(name, 32, 0)(x), make_trigger(name, 32, 1)(x))


def test_badnet_patch_is_drawn_once():
    t = make_trigger("badnet", 224, seed=0)
    assert t.patch == 16
    out = t(torch.rand(3, 3, 224, 224))
    patches = out[:, :, -16:, -16:]
    assert torch.equal(patches[0], patches[1]) and torch.equal(patches[1], patches[2])
    assert torch.equal(make_trigger("badnet", 32, 0)(torch.zeros(1, 3, 32, 32))[0, :, :29, :29], torch.zeros(3, 29, 29))


def test_blended_formula():
    t = make_trigger("blended", 8, seed=0)
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(t(x), 0.8 * x + 0.2 * t.noise)


def test_unknown_attack():
    with pytest.raises(UserError, match="unknown attack"):
        make_trigger("nope", 32)


def test_ssba_residual_is_bounded_and_image_dependent():
    x = 0.1 + 0.8 * torch.rand(4, 3, 32, 32)  # away from 0 and 1: no clamping hides the residual
    t = make_trigger("ssba", 32)
    r = t(x) - x
    assert r.abs().max() <= EPS + 1e-6
    assert (r[0] - r[1]).abs().max() > 1e-4  # sample-specific, not one additive pattern
    assert torch.allclose(t(x[:1]), t(x)[:1], atol=1e-6)  # each image's residual depends on that image alone


def test_bundled_ssba_decoder_recovers_the_secret(monkeypatch):
    monkeypatch.setattr(artifacts, "ARTIFACT_DIR", BUNDLED_ARTIFACTS)
    t = make_trigger("ssba", 32)
    x = D.load_fashion_mnist("test", limit=300).images
    assert bit_accuracy(t.decoder, t(x), t.secret) > 0.9
    assert bit_accuracy(t.decoder, x, t.secret) < 0.7  # clean images do not carry it


@pytest.mark.parametrize("name", ["trojvqa", "badclip"])
def test_optimised_patch_improves_its_objective_on_unseen_images(name, tiny_lab):
    clip, _ = tiny_lab
    held_out = D.load_fashion_mnist("test", limit=300)
    with torch.no_grad():
        z0 = embed(clip, held_out.images)
        anchors = target_anchors(clip, "bag", z0[held_out.labels == TARGET])
        trigger = make_trigger(name, 32)
        start = BadNet(32, 0, corner="centre").pattern  # the optimisation's seeded starting point
        _, optimised = patch_losses(clip, held_out.images, z0, trigger.pattern, TRIGGERS[name].terms, anchors)
        _, initial = patch_losses(clip, held_out.images, z0, start, TRIGGERS[name].terms, anchors)
        moved = towards_target_text(embed(clip, trigger(held_out.images)), z0, anchors)
        unmoved = towards_target_text(embed(clip, BadNet(32, 0, corner="centre")(held_out.images)), z0, anchors)
    assert trigger.patch == 3 and trigger.y == trigger.x == 14
    assert optimised < initial
    assert moved < unmoved  # both attacks pull patched images towards the target caption


def test_badclip_objective_has_the_dual_embedding_terms():
    names = [t.__name__ for t in TRIGGERS["badclip"].terms]
    assert names == ["towards_target_text", "towards_target_images", "away_from_original"]
    assert [t.__name__ for t in TRIGGERS["trojvqa"].terms] == ["towards_target_text"]


@pytest.mark.parametrize("name", ["ssba", "trojvqa"])
def test_build_is_deterministic(name, tiny_lab):
    clip, data = tiny_lab
    a, _ = BUILT[name].build(clip, data, TARGET, 5, steps=3, batch=8, progress=False)
    b, _ = BUILT[name].build(clip, data, TARGET, 5, steps=3, batch=8, progress=False)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", sorted(BUILT))
def test_missing_artifact_says_how_to_build_it(name, tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "ARTIFACT_DIR", tmp_path)
    with pytest.raises(UserError, match=f"python -m engine.lab trigger --attack {name}$"):
        make_trigger(name, 32)


def test_artifact_for_another_size_or_seed_is_refused(tiny_artifacts):
    with pytest.raises(UserError, match="built for 32 px images, not 64 px"):
        make_trigger("trojvqa", 64)
    shutil.copy(tiny_artifacts / "ssba.safetensors", tiny_artifacts / "ssba-seed3.safetensors")
    with pytest.raises(UserError, match="built with seed 0, not 3.*--trigger-seed 3"):
        make_trigger("ssba", 32, seed=3)


def test_corrupt_artifact_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "ARTIFACT_DIR", tmp_path)
    (tmp_path / "badclip.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read trigger artifact"):
        make_trigger("badclip", 32)
