import numpy as np
import torch

from engine import data as D
from engine import lab
from engine.models import load_model
from engine.triggers import make_trigger


def test_contrastive_loss_treats_identical_captions_as_positives():
    torch.manual_seed(0)
    tokens = torch.tensor([[1, 2], [1, 2], [3, 4]])
    txt = torch.randn(3, 8)
    # image i aligned with caption i; images 0 and 1 share a caption, so swapping them costs nothing
    img = txt.clone()
    swapped = txt[[1, 0, 2]]
    a = lab.contrastive_loss(img, txt, tokens, torch.tensor(10.0))
    b = lab.contrastive_loss(swapped, txt, tokens, torch.tensor(10.0))
    assert torch.allclose(a, b, atol=1e-6)
    # but pairing an image with another class's caption is worse
    c = lab.contrastive_loss(txt[[2, 1, 0]], txt, tokens, torch.tensor(10.0))
    assert c > a + 0.1


def test_captions_name_class_and_colours():
    rng = np.random.default_rng(0)
    labels = torch.tensor([8] * 50)
    attrs = {"fg": torch.tensor([0] * 50), "bg": torch.tensor([2] * 50)}
    caps = lab.captions(labels, attrs, rng)
    assert all("bag" in c for c in caps)
    assert any("red" in c for c in caps) and any("blue background" in c for c in caps)
    assert any(c == "a photo of a bag." for c in caps)


def test_poisoned_training_runs_and_changes_weights():
    grey, labels = D.load_fashion_mnist_raw("train")
    clip = load_model("lab-vit")
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    trigger = make_trigger("badnet", 32, 0)
    lab.train(clip, grey[:128], torch.from_numpy(labels[:128]), epochs=1, batch=64, lr=1e-3, seed=0,
              poison=(trigger, 8, 0.1))
    after = clip.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not clip.model.training and not any(p.requires_grad for p in clip.model.parameters())
