"""engine.scan / engine.inversion.detect: the statistics flag a planted target (constructed numbers, and
stand-in encoders with a planted corner patch or a planted stripe signal), scan.json + trigger.png are
written atomically, bad input is a one-line error."""
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
from engine.errors import UserError
from engine.inversion import detect as det
from engine.inversion import stripes
from engine.inversion import targeted
from engine.evaluate import predict
from engine.models import Clip

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--steps", "3", "--stripe-steps", "2", "--shots", "2", "--quiet"]


# ---------------------------------------------------------------- the statistics on constructed numbers

def test_anomaly_index_flags_the_planted_class_only():
    shares = [0.02, 0.01, 0.03, 0.0, 0.01, 0.02, 0.0, 0.01, 0.9, 0.02]
    assert det.anomaly_index(shares, 8) > 50
    assert det.anomaly_index(shares, 2) < 3
    # a share spread below the measurement floor does not make a tiny difference an outlier
    assert det.anomaly_index([0.5] * 9 + [0.505], 9) < 1


def test_log_outlier_finds_the_small_mask_not_a_uniformly_small_model():
    sizes = [70.0, 90, 84, 86, 77, 80, 79, 105, 20, 95]
    k, a = targeted.log_outlier(sizes)
    assert k == 8 and a > 5
    k, a = targeted.log_outlier([66.0, 71, 93, 83, 86, 78, 84, 79, 110, 87])   # clean-like: no outlier
    assert k == 0 and a < 3
    # a hand computation: logs of the others' median / MAD
    import math
    import statistics
    logs = [math.log(v) for v in sizes]
    others = logs[:8] + logs[9:]
    med = statistics.median(others)
    mad = 1.4826 * statistics.median(abs(v - med) for v in others)
    assert targeted.log_outlier(sizes)[1] == pytest.approx((med - logs[8]) / mad)


def test_flip_shares_count_only_images_the_trigger_moves():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    clean = torch.tensor([0, 0, 1, 1, 2, 1])
    trig = torch.tensor([2, 2, 2, 1, 2, 2])
    shares = det.flip_shares(labels, clean, trig, 3)
    # class 2: images not labelled 2 and not predicted 2 when clean: 0, 1, 2, 3 -> three of four flipped
    assert shares[2] == pytest.approx(0.75) and shares[0] == 0.0


def _decide(mask_anomaly, share, stripe_anomaly, gap=0.0):
    cfg = det.DetectConfig()
    return det.decide({"anomaly_index": mask_anomaly, "log_gap": gap},
                      {"target_share": share, "anomaly_index": stripe_anomaly}, cfg)


def test_verdict_on_backdoor_and_clean_like_numbers():
    cfg = det.DetectConfig()
    big_gap, an = cfg.min_mask_gap + 0.1, cfg.min_mask_anomaly
    assert _decide(10.0, 0.3, 1.0)[::2] == ("clean", None)         # an outlier, but the mask is not much smaller
    assert _decide(10.0, 0.3, 1.0, gap=big_gap)[::2] == ("backdoored", "mask")
    assert _decide(an - 0.1, 0.3, 1.0, gap=big_gap)[::2] == ("clean", None)   # much smaller, but so are others
    assert _decide(1.0, 0.9, 6.0)[::2] == ("backdoored", "stripes")
    assert _decide(1.0, 0.9, 1.0)[::2] == ("clean", None)       # stripes push every class alike
    assert _decide(1.0, 0.3, 6.0)[::2] == ("clean", None)       # an outlier, but no class really reachable
    verdict, checks, _ = _decide(1.0, 0.3, 1.0)
    assert verdict == "clean" and set(checks) == {"mask_anomaly", "mask_gap", "stripe_share", "stripe_anomaly"}
    # a clearly smaller mask flags at a modest anomaly index (the other classes spread widely)
    assert det.decide({"anomaly_index": an + 0.1, "log_gap": big_gap}, None, cfg)[::2] == ("backdoored", "mask")
    assert det.decide({"anomaly_index": an + 0.1, "log_gap": cfg.min_mask_gap - 0.1}, None, cfg)[::2] == ("clean", None)


def test_log_gap_is_the_log_ratio_to_the_median_of_the_others():
    import math
    sizes = [100.0, 120, 80, 40, 110]
    assert targeted.log_gap(sizes, 3) == pytest.approx(math.log(105 / 40))
    assert targeted.log_gap([50.0] * 4, 0) == pytest.approx(0.0)


def test_stripe_patterns_are_bounded_one_dimensional_signals():
    z = torch.randn(4, 3, 63) * 5
    p = stripes.stripe_patterns(z, 0.1)
    assert set(p) == set(stripes.ORIENTATIONS)
    for o, q in p.items():
        full = q.expand(3, 1, 32, 32)[:, 0]
        assert full.abs().max() <= 0.1 + 1e-6
        if o == "vertical":
            assert (full == full[:, :1, :]).all()                      # constant down each column
        if o == "horizontal":
            assert (full == full[:, :, :1]).all()
        if o == "diagonal":                                            # constant along each anti-diagonal
            assert full[0, 3, 5] == full[0, 5, 3] == full[0, 0, 8]
        if o == "antidiagonal":                                        # constant along each diagonal
            assert full[0, 3, 5] == full[0, 0, 2] == full[0, 29, 31]


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


def _cfg(mask_steps, stripe_steps):
    # the stand-ins have 4 classes, so one naturally easy class moves the median-based gap by a lot (the
    # unplanted stripe tower's easiest class sits 0.33 below the others): they keep a gap cut of their own,
    # the lab cut being chosen on the zoo's 10-class dev split
    return det.DetectConfig(mask=targeted.TargetedConfig(steps=mask_steps), stripes=stripes.StripeConfig(steps=stripe_steps),
                            min_mask_gap=0.5)


@pytest.mark.parametrize("planted", [2, None])
def test_scan_finds_a_planted_corner_trigger_and_passes_the_unplanted_model(planted):
    clip, few, held, text = _stand_in(planted)
    res = scan.scan(clip, few, held, text, _cfg(60, 30), log=lambda *a: None)
    if planted is None:
        assert res["verdict"] == "clean", (res["mask"], res["stripes"])
        for o in ("vertical", "horizontal"):                # the row/column-centred tower ignores these
            assert max(res["stripes"]["shares"][o].values()) < 0.1
    else:
        assert res["verdict"] == "backdoored" and res["flagged_by"] == "mask", res["mask"]
        assert res["mask"]["target"] == "c" and res["mask"]["target_share"] > 0.9
        assert res["suspected_target"] == "c"
        mask = res["mask_trigger"][0][0]
        blocks = torch.nn.functional.avg_pool2d(mask[None, None], 4)[0, 0]
        assert blocks.argmax() == 0 and blocks[0, 0] > 2 * mask.mean()  # the mask sits on the planted corner


@pytest.mark.parametrize("planted", [2, None])
def test_scan_finds_a_planted_stripe_signal(planted):
    clip, few, held, text = _stand_in(planted, StripeBackdoor)
    res = scan.scan(clip, few, held, text, _cfg(30, 30), log=lambda *a: None)
    st = res["stripes"]
    if planted is None:
        assert res["verdict"] == "clean", (res["mask"], st)
        assert max(st["shares"]["vertical"].values()) < 0.1
    else:
        # the stand-in's signal is simple enough for the mask inversion too; the stripe check must flag alone
        assert res["verdict"] == "backdoored" and res["suspected_target"] == "c", st
        assert res["checks"]["stripe_share"] and res["checks"]["stripe_anomaly"]
        assert (st["orientation"], st["target"]) == ("vertical", "c") and st["target_share"] > 0.9
        assert st["shares"]["horizontal"]["c"] < 0.1     # horizontal stripes do not correlate with the wave
        stripe = res["stripe_pattern"][0, 0]               # the recovered columns follow the planted sinusoid
        wave = torch.sin(2 * torch.pi * 3 * torch.arange(32) / 32)
        assert torch.corrcoef(torch.stack([stripe - stripe.mean(), wave]))[0, 1] > 0.8


def test_recheck_averages_the_closest_candidates_and_can_change_the_target():
    """A first run whose smallest mask (class a, 1 px) is a fluke the restarts do not reproduce: the recheck
    averages the three smallest classes' sizes over the runs and moves the target to the planted class."""
    import statistics
    clip, few, held, text = _stand_in(2)
    cfg = targeted.TargetedConfig(steps=40, recheck_top=3, recheck_seeds=2, strengthen_steps=5)
    first_sizes = {"a": 1.0, "b": 900.0, "c": 20.0, "d": 800.0}
    first = {"target": "a", "target_index": 0, "anomaly_index": 9.0, "target_share": 0.0, "log_gap": 6.0,
             "mask_size": 1.0, "trigger_size": 1.0, "sizes": first_sizes, "seconds": 1.0}
    trigger = (torch.zeros(1, 32, 32), torch.zeros(3, 32, 32))
    clean_pred = predict(clip, held.images, text)
    assert det.recheck_mask(clip, few, text, targeted.TargetedConfig(recheck_top=0), held, clean_pred, first,
                            trigger) == (first, trigger)
    ev, (m, p) = det.recheck_mask(clip, few, text, cfg, held, clean_pred, first, trigger)
    assert set(ev["restart_sizes"]) == {"a", "c", "d"} and all(len(v) == 2 for v in ev["restart_sizes"].values())
    for c in ("a", "c", "d"):
        assert ev["sizes"][c] == pytest.approx(statistics.fmean([first_sizes[c], *ev["restart_sizes"][c]]))
    assert ev["sizes"]["b"] == 900.0 and ev["first_run"] == {"target": "a", "sizes": first_sizes}
    assert (ev["target"], ev["target_index"]) == ("c", 2) and ev["mask_size"] == ev["sizes"]["c"]
    assert ev["target_share"] > 0.9 and m.shape == (1, 32, 32) and m.sum() > 0   # the restart's trigger works


def test_stripe_inversion_gradients_do_not_depend_on_the_chunking():
    clip, few, _, text = _stand_in(2, StripeBackdoor)
    whole, h1 = stripes.invert_stripes(clip, few.images, text, stripes.StripeConfig(steps=5, batch=32, chunk=4096))
    chunked, h2 = stripes.invert_stripes(clip, few.images, text, stripes.StripeConfig(steps=5, batch=32, chunk=16))
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
    assert sorted(p.name for p in out.iterdir()) == ["scan.json", "trigger.png", "triggers.safetensors"]
    saved = json.loads((out / "scan.json").read_text())
    # the stored evidence and triggers give the same verdict again without inverting (bench.zoo's reuse)
    again = det.conclude(saved, det.load_tensors(out / "triggers.safetensors"), det.DetectConfig(), 32)
    assert (again["verdict"], again["flagged_by"]) == (saved["verdict"], saved["flagged_by"])
    assert saved["verdict"] in ("backdoored", "clean") and saved["verdict"] == rep["verdict"]
    assert saved["suspected_target"] in saved["classes"]
    for key in ("target", "anomaly_index", "mask_size", "target_share", "sizes"):
        assert key in saved["mask"]
    assert set(saved["stripes"]["shares"]) == set(stripes.ORIENTATIONS)
    assert saved["inversion"]["stripes"]["steps"] == 2 and saved["inversion"]["mask"]["steps"] == 3
    assert len(saved["checks"]) == len(saved["thresholds"])
    assert saved["shots"] == 2 and saved["holdout_images"] == 0 and saved["checkpoint"].endswith("badnet.safetensors")

    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(scan, "save_png", fail)
    broken = tmp_path / "broken"
    with pytest.raises(OSError):
        scan.main(["--lab", "badnet", "--out", str(broken), *TINY])
    assert not broken.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["scan"]


def test_warp_steps_reach_the_warp_inversion_and_zero_skips_the_warp_check(tmp_path, small_data):
    saved = {}
    for n in (2, 0):
        scan.main(["--lab", "badnet", "--out", str(tmp_path / str(n)), *TINY, "--warp-steps", str(n)])
        saved[n] = json.loads((tmp_path / str(n) / "scan.json").read_text())
    assert saved[2]["inversion"]["mask"]["warp_steps"] == 2 and "target_share" in saved[2]["warp"]
    assert {"warp_share", "warp_anomaly"} <= set(saved[2]["checks"])
    assert saved[0]["warp"] is None and not {"warp_share", "warp_anomaly"} & set(saved[0]["checks"])


@pytest.mark.parametrize("args,message", [
    (["--model", "ViT-Q-99"], "unknown model"),
    (["--checkpoint", "/nonexistent.safetensors"], "does not exist"),
    (["--lab", "nosuch"], "no bundled lab checkpoint"),
    (["--lab", "clean", "--checkpoint", "x.safetensors"], "not several"),
    (["--shots", "100000"], "fewer than --shots"),
    (["--steps", "0"], "at least 1"),
    (["--stripe-steps", "-1"], "0 \\(skip\\) or more"),
    (["--warp-steps", "-1"], "0 \\(skip\\) or more"),
    (["--recheck", "-2"], "0 \\(one inversion run\\) or more"),
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


# ---------------------------------------------------------------- the warp family

def test_warp_family_is_identity_at_zero_and_its_shift_is_bounded():
    cfg = targeted.TargetedConfig(warp_pixels=2.0)
    fam = targeted.WarpFamily(3, 32, cfg, torch.Generator().manual_seed(0), "cpu")
    x = torch.rand(3, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fam.z.zero_()
        torch.testing.assert_close(fam.apply(x), x, atol=1e-5, rtol=0)
        fam.z.fill_(100.0)                                   # saturated: the largest shift everywhere
        grids = fam.grids()
    ramp = torch.linspace(-1, 1, 32)
    yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
    shift_px = (grids - torch.stack([xx, yy], -1)).abs() * 32 / 2
    assert shift_px.max() <= 2.0 + 1e-4 and shift_px[:, 8:24, 8:24].min() > 1.9   # inside: not clamped
    moved = targeted.warp(x[0], grids[0])
    assert moved.shape == x[0].shape and (moved - x[0]).abs().mean() > 0.05


def test_warp_size_is_the_mean_control_shift_in_pixels_and_gets_the_size_schedule():
    cfg = targeted.TargetedConfig(warp_pixels=4.0, warp_grid=2)
    fam = targeted.WarpSizeFamily(2, 32, cfg, torch.Generator().manual_seed(0), "cpu")
    with torch.no_grad():
        fam.z.copy_(torch.tensor([[[[100.0, -100.0], [0.0, 0.0]]] * 2, [[[0.0, 0.0], [0.0, 0.0]]] * 2]))
    torch.testing.assert_close(fam.size(), torch.tensor([2.0, 0.0]))     # half the points at 4 px, half at 0
    assert isinstance(fam, targeted.WarpFamily) and "warp_size" in targeted.ADAPTIVE and "warp" not in targeted.ADAPTIVE


def test_warp_checks_join_the_verdict():
    cfg = det.DetectConfig()
    mask, stripes_ev = {"anomaly_index": 1.0}, {"target_share": 0.3, "anomaly_index": 1.0}
    assert det.decide(mask, stripes_ev, cfg, {"target_share": 0.9, "anomaly_index": 6.0})[::2] == ("backdoored", "warp")
    assert det.decide(mask, stripes_ev, cfg, {"target_share": 0.9, "anomaly_index": 1.0})[::2] == ("clean", None)
    assert set(det.decide(mask, stripes_ev, cfg, {"target_share": 0.1, "anomaly_index": 0})[1]) >= {"warp_share",
                                                                                                  "warp_anomaly"}


@pytest.mark.parametrize("family", ["mask", "warp"])
def test_targeted_inversion_stops_on_a_nan_loss(family):
    clip, few, _, text = _stand_in(2)
    clip.model.scale.data.fill_(float("nan"))
    with pytest.raises(UserError, match=f"{family} trigger inversion step 1"):
        targeted.invert(clip, few.images, few.labels, text, targeted.TargetedConfig(steps=3), family=family)


def test_targeted_inversion_needs_two_classes():
    clip, few, _, text = _stand_in(2)
    one = few.subset(torch.nonzero(few.labels == few.labels[0]).flatten())
    with pytest.raises(UserError, match="at least two classes"):
        targeted.invert(clip, one.images, one.labels, text, targeted.TargetedConfig(steps=1))
