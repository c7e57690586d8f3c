"""engine.scan: the statistic flags a planted target (constructed shares, and stand-in encoders with a
planted corner patch or a planted stripe signal), scan.json + trigger.png + stripes.png are written
atomically, bad input is a one-line error."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import scan
from engine import stripe_inversion as stripes
from engine.data import ImageSet
from engine.defenses import cbpt
from engine.errors import UserError
from engine.evaluate import predict
from engine.models import Clip

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--steps", "3", "--stripe-steps", "2", "--restarts", "1", "--shots", "2", "--holdout", "100", "--quiet"]


# ---------------------------------------------------------------- the statistic on constructed numbers

def test_anomaly_index_flags_the_planted_class_only():
    shares = [0.02, 0.01, 0.03, 0.0, 0.01, 0.02, 0.0, 0.01, 0.9, 0.02]
    assert scan.anomaly_index(shares, 8) > 50
    assert scan.anomaly_index(shares, 2) < 3
    flat = [0.1, 0.12, 0.09, 0.11, 0.1, 0.08, 0.1, 0.13, 0.11, 0.1]
    assert max(scan.anomaly_index(flat, k) for k in range(10)) < scan.MIN_ANOMALY


def test_flip_shares_count_only_images_the_trigger_moves():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    clean = torch.tensor([0, 2, 1, 1, 2, 2])      # image 1 is already predicted 2 without the trigger
    trig = torch.tensor([2, 2, 2, 1, 2, 0])
    shares = scan.flip_shares(labels, clean, trig, 3)
    # class 2: pool = images 0, 2, 3 (not labelled 2, not predicted 2 when clean); 0 and 2 go to 2
    assert shares == pytest.approx([1 / 4, 0.0, 2 / 3])


def _restart(shares, mask, classes):
    top = max(range(len(shares)), key=shares.__getitem__)
    return {"shares": shares, "mask_mean": mask, "top": classes[top]}


def test_summary_and_verdict_on_backdoor_and_clean_like_numbers():
    classes = ["a", "b", "c", "d"]
    planted = [_restart([0.0, 0.02, 0.97, 0.01], 0.015, classes), _restart([0.01, 0.0, 0.9, 0.0], 0.02, classes)]
    ev = scan.summarise(planted, classes)
    assert ev["target"] == "c" and ev["agreement"] == 1.0 and ev["target_share"] == pytest.approx(0.935)
    assert scan.decide(ev) == ("backdoored", {"target_share": True, "efficiency": True, "anomaly_index": True},
                               "mask")
    # the clean lab model's numbers: its best universal patch flips a tenth of the images
    natural = [_restart([0.09, 0.07, 0.05, 0.03], 0.02, classes)]
    verdict, checks, family = scan.decide(scan.summarise(natural, classes))
    assert verdict == "clean" and family is None and not checks["target_share"] and not checks["efficiency"]


def test_stripe_evidence_flags_one_easy_class_not_every_class():
    classes = list("abcdefghij")
    natural = [0.14, 0.38, 0.40, 0.13, 0.01, 0.16, 0.11, 0.0, 0.21, 0.05]   # clean lab model, vertical
    keyed = [0.07, 0.26, 0.35, 0.17, 0.02, 0.19, 0.10, 0.02, 0.80, 0.04]    # SIG model, vertical
    flat = [0.03] * 10
    mask = scan.summarise([_restart([0.01] * 10, 0.003, classes)], classes)  # the mask finds nothing
    st = scan.summarise_stripes({"vertical": keyed, "horizontal": flat}, classes)
    assert (st["orientation"], st["target"], st["target_share"]) == ("vertical", "i", 0.80)
    assert st["shares"]["horizontal"]["a"] == 0.03
    verdict, checks, family = scan.decide(mask, st)
    assert (verdict, family) == ("backdoored", "stripes") and checks["stripe_anomaly"]
    st = scan.summarise_stripes({"vertical": natural, "horizontal": flat}, classes)
    assert st["target"] == "c" and scan.decide(mask, st)[0] == "clean"
    # a model that stripes push anywhere: high shares, but no class stands out
    pliable = [0.7, 0.65, 0.72, 0.68, 0.66, 0.7, 0.69, 0.71, 0.75, 0.67]
    verdict, checks, _ = scan.decide(mask, scan.summarise_stripes({"vertical": pliable, "horizontal": flat}, classes))
    assert verdict == "clean" and checks["stripe_share"] and not checks["stripe_anomaly"]


def test_stripe_patterns_are_bounded_one_dimensional_signals():
    z = torch.randn(2, 3, 8) * 5
    p = stripes.stripe_patterns(z, 0.1)
    images = torch.rand(4, 3, 8, 8)
    v, h = stripes.add_pattern(images, p["vertical"][1]), stripes.add_pattern(images, p["horizontal"][2])
    assert v.shape == h.shape == images.shape and 0 <= v.min() and v.max() <= 1
    assert p["vertical"].abs().max() <= 0.1 and p["horizontal"].abs().max() <= 0.1
    # vertical stripes: one value per column, the same down every row and in every channel
    dv = (stripes.add_pattern(torch.full_like(images, 0.5), p["vertical"][1]) - 0.5)[0]
    assert torch.allclose(dv, dv[0, 0].expand(3, 8, 8)) and dv[0, 0].std() > 0
    dh = (stripes.add_pattern(torch.full_like(images, 0.5), p["horizontal"][2]) - 0.5)[0]
    assert torch.allclose(dh, dh[0, :, :1].expand(3, 8, 8)) and dh[0, :, 0].std() > 0


def test_pinned_clean_reference_is_the_benchmarked_clean_scan():
    """CLEAN_LAB_REFERENCE (and so MIN_EFFICIENCY) is copied from bench.scan_lab's clean row: a rebuilt
    clean model must re-pin it."""
    rows = json.loads((ROOT / "bench" / "results" / "scan_lab.json").read_text())["results"]
    clean = next(r["evidence"] for r in rows if r["model"] == "clean")
    ref = scan.CLEAN_LAB_REFERENCE
    assert ref["target"] == clean["target"]
    assert ref["target_share"] == pytest.approx(clean["target_share"], abs=5e-4)
    assert ref["mask_mean"] == pytest.approx(clean["mask_mean"], abs=5e-5)
    assert ref["efficiency"] == pytest.approx(clean["efficiency"], abs=0.05)


# ---------------------------------------------------------------- the whole scan on a stand-in model

class CornerBackdoor(torch.nn.Module):
    """A stand-in CLIP image tower: a fixed random projection of the 8x8-pooled image, centred per row and
    per column (so an additive stripe pattern cannot move it), plus (planted) a pull towards class
    `target`'s text feature that grows as the top-left 4x4 corner gets brighter than the (dark) data: a
    backdoor whose trigger is a white corner patch."""

    def __init__(self, text, target=None, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(3 * 8 * 8, text.shape[1], generator=g))
        self.register_buffer("text", text)
        self.target = target
        self.scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)  # gives the model a device

    def encode_image(self, x):          # x normalised (mean 0.5, std 0.25): data corners ~ -0.4, white +2
        pooled = F.avg_pool2d(x, 4)
        centred = pooled - pooled.mean(2, keepdim=True) - pooled.mean(3, keepdim=True) + pooled.mean((2, 3), keepdim=True)
        z = centred.flatten(1) @ self.proj
        if self.target is not None:
            z = z + 20 * F.softplus(2 * (self.signal(x) - 0.5))[:, None] * self.text[self.target]
        return z * self.scale

    def signal(self, x):
        return x[..., :4, :4].mean((1, 2, 3))


class StripeBackdoor(CornerBackdoor):
    """The same tower with a SIG-like backdoor: the pull grows with the images' correlation with a
    vertical-stripe sinusoid (3 periods across the width)."""

    def signal(self, x):
        wave = torch.sin(2 * torch.pi * 3 * torch.arange(x.shape[-1], device=x.device) / x.shape[-1])
        columns = x.mean((1, 2))
        return 10 * ((columns - columns.mean(1, keepdim=True)) * wave).mean(1) - 1   # at rest: a weak pull


def _stand_in(target, tower=CornerBackdoor):
    """(clip, few, held, text): 4 classes, mid-dark random images (0.2-0.6: stripes of 0.1 never clip)
    labelled by the unplanted tower."""
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    images = 0.2 + torch.rand(200, 3, 32, 32, generator=g) * 0.4
    clip = Clip("stand-in", tower(text), None, 32, (0.5,) * 3, (0.25,) * 3)
    labels = predict(clip, images, text)
    clip.model.target = target
    data = ImageSet(images, labels, ["a", "b", "c", "d"])
    return clip, data.subset(range(40)), data.subset(range(40, 200)), text


@pytest.mark.parametrize("planted", [2, None])
def test_scan_finds_a_planted_corner_trigger_and_passes_the_unplanted_model(planted):
    clip, few, held, text = _stand_in(planted)
    res = scan.scan(clip, few, held, text, cbpt.CBPTConfig(lam=scan.LAM, inv_steps=60, inv_batch=32),
                    restarts=2, log=lambda *a: None, stripe_cfg=stripes.StripeConfig(steps=30))
    if planted is None:
        assert res["verdict"] == "clean", (res["evidence"], res["stripes"])
        assert res["stripes"]["target_share"] < 0.1        # the tower ignores additive stripes
    else:
        assert res["verdict"] == "backdoored" and res["flagged_by"] == "mask", res["evidence"]
        assert res["evidence"]["target"] == "c" and res["evidence"]["target_share"] > 0.9
        assert res["suspected_target"] == "c"
        mask = res["trigger"][0][0, 0]
        assert mask[:4, :4].mean() > 5 * mask.mean()      # the inverted mask sits on the planted corner


@pytest.mark.parametrize("planted", [2, None])
def test_scan_finds_a_planted_stripe_signal(planted):
    clip, few, held, text = _stand_in(planted, StripeBackdoor)
    res = scan.scan(clip, few, held, text, cbpt.CBPTConfig(lam=scan.LAM, inv_steps=30, inv_batch=32),
                    restarts=1, log=lambda *a: None, stripe_cfg=stripes.StripeConfig(steps=30))
    st = res["stripes"]
    if planted is None:
        assert res["verdict"] == "clean" and st["target_share"] < 0.1, (res["evidence"], st)
    else:
        # the stand-in's signal is simple enough for the mask inversion too; the stripe check must flag alone
        assert res["verdict"] == "backdoored" and res["suspected_target"] == "c", st
        assert res["checks"]["stripe_share"] and res["checks"]["stripe_anomaly"]
        assert (st["orientation"], st["target"]) == ("vertical", "c") and st["target_share"] > 0.9
        assert st["shares"]["horizontal"]["c"] < 0.1     # horizontal stripes do not correlate with the wave
        stripe = res["stripe_pattern"][0, 0]               # the recovered columns follow the planted sinusoid
        wave = torch.sin(2 * torch.pi * 3 * torch.arange(32) / 32)
        assert torch.corrcoef(torch.stack([stripe - stripe.mean(), wave]))[0, 1] > 0.8


def test_stripe_inversion_gradients_do_not_depend_on_the_chunking():
    clip, few, _, text = _stand_in(2, StripeBackdoor)
    whole, h1 = stripes.invert_stripes(clip, few.images, text, stripes.StripeConfig(steps=5, chunk=4096))
    chunked, h2 = stripes.invert_stripes(clip, few.images, text, stripes.StripeConfig(steps=5, chunk=16))
    assert h1 == pytest.approx(h2, rel=1e-5)
    for o in stripes.ORIENTATIONS:
        torch.testing.assert_close(whole[o], chunked[o], rtol=1e-4, atol=1e-5)


def test_stripe_inversion_stops_on_a_nan_loss():
    clip, few, _, text = _stand_in(2, StripeBackdoor)
    clip.model.scale.data.fill_(float("nan"))
    with pytest.raises(UserError, match="stripe inversion step 1"):
        stripes.invert_stripes(clip, few.images, text, stripes.StripeConfig(steps=3))


# ---------------------------------------------------------------- the CLI: output and bad input

@pytest.fixture
def small_data(monkeypatch):
    """Load only the first 3000 images of a split: the CLI tests need the plumbing, not 60000 renders."""
    real = scan.D.load_dataset
    monkeypatch.setattr(scan.D, "load_dataset", lambda *a, **k: real(*a, **{**k, "limit": 3000}))


def test_scan_writes_json_and_png_atomically(tmp_path, monkeypatch, small_data):
    out = tmp_path / "scan"
    rep = scan.main(["--lab", "badnet", "--out", str(out), *TINY])
    assert sorted(p.name for p in out.iterdir()) == ["scan.json", "stripes.png", "trigger.png"]
    saved = json.loads((out / "scan.json").read_text())
    assert saved["verdict"] in ("backdoored", "clean") and saved["verdict"] == rep["verdict"]
    assert saved["suspected_target"] in saved["classes"] and len(saved["restarts"]) == 1
    for key in ("target_share", "mask_mean", "efficiency", "anomaly_index", "shares", "efficiency_vs_clean_lab"):
        assert key in saved["evidence"]
    assert set(saved["stripes"]["shares"]) == {"vertical", "horizontal"} and saved["stripe_inversion"]["steps"] == 2
    assert set(saved["checks"]) == set(saved["thresholds"])
    assert saved["shots"] == 2 and saved["holdout_images"] == 100 and saved["checkpoint"].endswith("badnet.safetensors")

    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(scan.cbpt, "save_trigger_png", fail)
    broken = tmp_path / "broken"
    with pytest.raises(OSError):
        scan.main(["--lab", "badnet", "--out", str(broken), *TINY])
    assert not broken.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["scan"]


@pytest.mark.parametrize("args,message", [
    (["--model", "ViT-Q-99"], "unknown model"),
    (["--checkpoint", "/nonexistent.safetensors"], "does not exist"),
    (["--lab", "nosuch"], "no bundled lab checkpoint"),
    (["--lab", "clean", "--checkpoint", "x.safetensors"], "not several"),
    (["--shots", "100000"], "fewer than --shots"),
    (["--restarts", "0"], "at least 1"),
    (["--stripe-steps", "-1"], "0 \\(skip\\) or more"),
])
def test_bad_input_raises_user_error_and_writes_nothing(tmp_path, small_data, args, message):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        scan.main([*TINY, *args, "--out", str(out)])
    assert not out.exists()


def test_shots_that_leave_no_held_out_images():
    data = ImageSet(torch.rand(6, 3, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2]), ["a", "b", "c"])
    with pytest.raises(UserError, match="none left"):
        scan.split_shots(data, 2, 100, 0)
    few, held = scan.split_shots(data, 1, 100, 0)
    assert len(few) == 3 and len(held) == 3
    assert not set(few.images[:, 0, 0, 0].tolist()) & set(held.images[:, 0, 0, 0].tolist())


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "engine.scan", "--lab", "nosuch", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "nosuch" in lines[-1] and "Traceback" not in proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------- full scans of bundled models

@pytest.mark.slow
@pytest.mark.parametrize("lab,verdict", [("badnet", "backdoored"), ("sig", "backdoored"), ("clean", "clean")])
def test_full_scan_of_bundled_lab_model(tmp_path, lab, verdict):
    rep = scan.main(["--lab", lab, "--quiet", "--out", str(tmp_path / "scan")])
    assert rep["verdict"] == verdict
    if verdict == "backdoored":
        assert rep["suspected_target"] == "bag"
