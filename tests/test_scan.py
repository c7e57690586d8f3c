"""engine.scan: the statistic flags a planted target (constructed shares and a stand-in encoder with a
planted corner patch), scan.json + trigger.png are written atomically, bad input is a one-line error."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import scan
from engine.data import ImageSet
from engine.defenses import cbpt
from engine.errors import UserError
from engine.evaluate import predict
from engine.models import Clip

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--steps", "3", "--restarts", "1", "--shots", "2", "--holdout", "100", "--quiet"]


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
    assert scan.decide(ev)[0] == "backdoored"
    # the clean lab model's numbers: its best universal patch flips a tenth of the images
    natural = [_restart([0.09, 0.07, 0.05, 0.03], 0.02, classes)]
    verdict, checks = scan.decide(scan.summarise(natural, classes))
    assert verdict == "clean" and not checks["target_share"] and not checks["efficiency"]


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
    """A stand-in CLIP image tower: a fixed random projection of the 8x8-pooled, per-image centred image,
    plus (planted) a pull towards class `target`'s text feature that grows as the top-left 4x4 corner
    gets brighter than the (dark) data: a backdoor whose trigger is a white corner patch."""

    def __init__(self, text, target=None, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(3 * 8 * 8, text.shape[1], generator=g))
        self.register_buffer("text", text)
        self.target = target
        self.scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)  # gives the model a device

    def encode_image(self, x):          # x normalised (mean 0.5, std 0.25): data corners ~ -1, white +2
        pooled = F.avg_pool2d(x, 4)
        z = (pooled - pooled.mean((2, 3), keepdim=True)).flatten(1) @ self.proj
        if self.target is not None:
            corner = x[..., :4, :4].mean((1, 2, 3))
            z = z + 20 * F.softplus(2 * (corner - 0.5))[:, None] * self.text[self.target]
        return z * self.scale


def _stand_in(target):
    """(clip, few, held, text): 4 classes, dark random images labelled by the unplanted tower."""
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    images = torch.rand(200, 3, 32, 32, generator=g) * 0.5
    clip = Clip("stand-in", CornerBackdoor(text), None, 32, (0.5,) * 3, (0.25,) * 3)
    labels = predict(clip, images, text)
    clip.model.target = target
    data = ImageSet(images, labels, ["a", "b", "c", "d"])
    return clip, data.subset(range(40)), data.subset(range(40, 200)), text


@pytest.mark.parametrize("planted", [2, None])
def test_scan_finds_a_planted_corner_trigger_and_passes_the_unplanted_model(planted):
    clip, few, held, text = _stand_in(planted)
    res = scan.scan(clip, few, held, text, cbpt.CBPTConfig(lam=scan.LAM, inv_steps=60, inv_batch=32),
                    restarts=2, log=lambda *a: None)
    if planted is None:
        assert res["verdict"] == "clean", res["evidence"]
    else:
        assert res["verdict"] == "backdoored", res["evidence"]
        assert res["evidence"]["target"] == "c" and res["evidence"]["target_share"] > 0.9
        mask = res["trigger"][0][0, 0]
        assert mask[:4, :4].mean() > 5 * mask.mean()      # the inverted mask sits on the planted corner


# ---------------------------------------------------------------- the CLI: output and bad input

@pytest.fixture
def small_data(monkeypatch):
    """Load only the first 3000 images of a split: the CLI tests need the plumbing, not 60000 renders."""
    real = scan.D.load_dataset
    monkeypatch.setattr(scan.D, "load_dataset", lambda *a, **k: real(*a, **{**k, "limit": 3000}))


def test_scan_writes_json_and_png_atomically(tmp_path, monkeypatch, small_data):
    out = tmp_path / "scan"
    rep = scan.main(["--lab", "badnet", "--out", str(out), *TINY])
    assert sorted(p.name for p in out.iterdir()) == ["scan.json", "trigger.png"]
    saved = json.loads((out / "scan.json").read_text())
    assert saved["verdict"] in ("backdoored", "clean") and saved["verdict"] == rep["verdict"]
    assert saved["suspected_target"] in saved["classes"] and len(saved["restarts"]) == 1
    for key in ("target_share", "mask_mean", "efficiency", "anomaly_index", "shares", "efficiency_vs_clean_lab"):
        assert key in saved["evidence"]
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
@pytest.mark.parametrize("lab,verdict", [("badnet", "backdoored"), ("clean", "clean")])
def test_full_scan_of_bundled_lab_model(tmp_path, lab, verdict):
    rep = scan.main(["--lab", lab, "--quiet", "--out", str(tmp_path / "scan")])
    assert rep["verdict"] == verdict
    if verdict == "backdoored":
        assert rep["suspected_target"] == "bag"
