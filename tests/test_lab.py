import numpy as np
import pytest
import torch

from engine import data as D
from engine import lab
from engine.errors import UserError
from engine.evaluate import evaluate_attack
from engine.models import bundled_checkpoint, load_model
from engine.triggers import TRIGGERS, artifacts, make_trigger


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


def test_poisoned_training_plants_a_backdoor():
    """Poisoned contrastive fine-tuning of the clean lab model, in about two seconds (128 images, half
    poisoned, three epochs): the trigger's ASR on 200 test images rises far above the clean model's
    (measured: 0.5% -> 32%). Fixed seeds: the same numbers every run."""
    grey, labels = D.load_fashion_mnist_raw("train")
    test = D.load_fashion_mnist("test", limit=200)
    clip = load_model("lab-vit", checkpoint=bundled_checkpoint("clean"))
    trigger = make_trigger("badnet", 32, 0)
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    clean_asr = evaluate_attack(clip, test, trigger, 8)["asr"]
    lab.train(clip, grey[:128], torch.from_numpy(labels[:128]), epochs=3, batch=64, lr=3e-4, seed=0,
              poison=(trigger, 8, 0.5))
    after = clip.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not clip.model.training and not any(p.requires_grad for p in clip.model.parameters())
    asr = evaluate_attack(clip, test, trigger, 8)["asr"]
    assert clean_asr < 5 and asr > clean_asr + 20, (clean_asr, asr)


def test_trigger_command_builds_an_artifact_make_trigger_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "ARTIFACT_DIR", tmp_path)
    lab.main(["trigger", "--attack", "ssba", "--steps", "3", "--batch", "8", "--limit", "100", "--trigger-seed", "2"])
    t = make_trigger("ssba", 32, seed=2)
    assert t.metadata["command"] == ("python -m engine.lab trigger --attack ssba --steps 3 --batch 8 "
                                     "--limit 100 --trigger-seed 2")
    assert t.metadata["seed"] == 2 and t.metadata["image_size"] == 32
    assert (tmp_path / "ssba-seed2.safetensors").stat().st_size < 100_000


def test_poison_refuses_a_patch_optimised_towards_another_target():
    class Optimised:
        metadata = {"attack": "trojvqa", "seed": 0, "target": "bag", "command": "python -m engine.lab trigger"}
    assert lab.artifact_record(Optimised(), "bag")["trigger"] == {
        "file": "triggers/trojvqa.safetensors", "command": "python -m engine.lab trigger"}
    with pytest.raises(UserError, match="--attack trojvqa --target coat"):
        lab.artifact_record(Optimised(), "coat")
    assert lab.artifact_record(make_trigger("badnet", 32), "coat") == {}


def test_every_attack_has_a_poison_rate_and_lab_all_builds_triggers_first(monkeypatch):
    assert set(lab.POISON_RATE) == set(TRIGGERS) and set(lab.ATTACKS) == set(TRIGGERS)
    calls = []
    monkeypatch.setattr(lab, "cmd_pretrain", lambda args: calls.append("pretrain"))
    monkeypatch.setattr(lab, "cmd_trigger", lambda args: calls.append(f"trigger {args.attack}"))
    monkeypatch.setattr(lab, "cmd_poison", lambda args: calls.append(f"poison {args.attack}"))
    lab.main(["all", "--attacks", "badnet", "badclip"])
    assert calls == ["pretrain", "poison badnet", "trigger badclip", "poison badclip"]


def test_unbundled_attack_names_the_command_that_builds_it():
    with pytest.raises(UserError, match="build it with: python -m engine.lab poison --attack wanet"):
        bundled_checkpoint("wanet")
