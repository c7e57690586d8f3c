"""The defenses beyond RVPT/CBPT's own tests: the baselines (linear probe, CleanCLIP, CoOp, VPT), the
rvpt+cbpt combination, what each run directory holds, and that the export folds each of them into the
same classifier the run evaluated."""
import json

import pytest
import torch

from engine.metrics import clean_accuracy

from engine import data as D
from engine import prompted_vit, runs, tune
from engine.defenses import cbpt, cleanclip, linear_probe
from engine.evaluate import image_features, predict
from engine.models import bundled_checkpoint, load_model

TINY = ["--epochs", "2", "--shots", "2", "--eval-limit", "100", "--quiet"]


@pytest.fixture(scope="module")
def lab():
    return load_model("lab-vit", checkpoint=bundled_checkpoint("badnet"))


@pytest.fixture(scope="module")
def few_shot():
    train = D.load_dataset("fashion-mnist", "train", 32, limit=3000)
    return train.subset(D.few_shot_indices(train.labels, 8, 0))


def test_linear_probe_fits_its_training_features(lab, few_shot):
    zero_shot = (predict(lab, few_shot.images, lab.text_features(few_shot.classes, D.DEFAULT_TEMPLATES))
                 == few_shot.labels).float().mean()
    weight, hist = linear_probe.tune(lab, few_shot, linear_probe.LinearProbeConfig(epochs=30), progress=False)
    assert weight.shape == (10, 128) and hist[-1] < hist[0]
    fitted = (predict(lab, few_shot.images, weight) == few_shot.labels).float().mean()
    assert fitted > zero_shot and fitted > 0.8, (fitted, zero_shot)


def test_cleanclip_tunes_a_copy_and_lowers_its_loss(lab, few_shot):
    before = {k: v.clone() for k, v in lab.model.state_dict().items()}
    tuned, hist = cleanclip.tune(lab, few_shot, cleanclip.CleanCLIPConfig(lr=1e-4, epochs=4), progress=False)
    assert tuned.model is not lab.model and hist[-1] < hist[0]
    assert all(torch.equal(v, lab.model.state_dict()[k]) for k, v in before.items())  # original untouched
    moved = [k for k, v in tuned.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("visual.") for k in moved) and any(k.startswith("transformer.") for k in moved)
    assert not any(p.requires_grad for p in tuned.model.parameters())


def test_coop_skips_the_inversion(lab, few_shot):
    text = lab.text_features(few_shot.classes, D.DEFAULT_TEMPLATES)
    res = cbpt.tune(lab, few_shot, text, cbpt.CBPTConfig(epochs=3, invert=False), progress=False)
    assert res["mask"] is None and res["inversion_history"] == [] and res["text"].shape == (10, 128)


def test_cbpt_features_follow_the_given_encoder(lab, few_shot):
    """rvpt+cbpt caches features through the prompted encoder, not the plain image tower."""
    torch.manual_seed(0)
    vp = prompted_vit.VisualPrompts.for_visual(lab.visual, 0, 4, init_std=1.0)
    encode = prompted_vit.encoder(lab.visual, vp, "shared")
    x = few_shot.images[:6]
    plain, _ = cbpt.cache_features(lab, x)
    prompted, _ = cbpt.cache_features(lab, x, encode=encode)
    assert torch.allclose(prompted, image_features(lab, x, encode), atol=1e-6)
    assert (plain - prompted).abs().max() > 1e-2


@pytest.mark.parametrize("defense,files", [
    ("vpt", ["prompts.safetensors", "results.json"]),
    ("coop", ["classifier.safetensors", "results.json"]),
    ("linear-probe", ["classifier.safetensors", "results.json"]),
    ("rvpt+cbpt", ["classifier.safetensors", "prompts.safetensors", "results.json", "trigger.png"]),
    ("cleanclip", ["model.safetensors", "results.json"]),
])
def test_run_directory_and_export_agree_with_the_run(tmp_path, monkeypatch, defense, files):
    """Each defense writes its own files, and export.folded rebuilds the classifier the run measured:
    the folded model's CA on the run's test images equals results.json's 'after' CA."""
    from export import folded
    default = cbpt.default_config
    monkeypatch.setattr(cbpt, "default_config", lambda model=None, **kw: default(model, inv_steps=3, **kw))
    out = tmp_path / "run"
    res = tune.main(["--defense", defense, "--out", str(out), *TINY])
    assert sorted(p.name for p in out.iterdir()) == files
    saved = json.loads((out / "results.json").read_text())
    assert saved["defense"] == defense and saved["tuned_params"] == res["tuned_params"] > 0
    assert runs.read(out).meta["defense"] == defense

    source = folded.from_run(out)
    test = D.load_dataset("fashion-mnist", "test", 32, limit=100)
    with torch.no_grad():
        logits, _ = source.module(source.clip.normalise(test.images))
    assert clean_accuracy(logits.argmax(1), test.labels) == saved["after"]["ca"], saved["after"]


def test_run_without_tuned_files_is_refused(tmp_path):
    from engine.errors import UserError
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(UserError, match="not an engine.tune run directory"):
        runs.read(tmp_path)
