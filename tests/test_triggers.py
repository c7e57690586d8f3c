import pytest
import torch

from engine.errors import UserError
from engine.triggers import TRIGGERS, make_trigger


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
