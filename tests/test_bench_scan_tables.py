"""bench.warp_detectability's held-out draw and tables, bench.scan_time's table and model check."""
import pytest
import torch

from bench import scan_time, warp_detectability
from engine import data as D


def _imageset(per_class, n_classes=3):
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return D.ImageSet(torch.rand(len(labels), 3, 4, 4), labels, [f"c{i}" for i in range(n_classes)])


def test_held_out_images_are_not_shots_and_balanced():
    data = _imageset(40)
    shots = set(D.few_shot_indices(data.labels, 5, 7, data.classes))
    held = warp_detectability.held_out(data, 5, 10, 7)
    assert torch.bincount(held.labels).tolist() == [10, 10, 10]
    # the held-out images are other images than the shots (rows are unique random tensors)
    shot_rows = {tuple(data.images[i].flatten()[:4].tolist()) for i in shots}
    assert not shot_rows & {tuple(x.flatten()[:4].tolist()) for x in held.images}
    again = warp_detectability.held_out(data, 5, 10, 7)
    assert torch.equal(again.images, held.images)


def _row(name, target, shares, true_share=None):
    sizes = {c: 6.0 - v for c, v in shares.items()}
    row = {"name": name, "target": target, "budgets": {"3.0": {"shots": shares, "held_out": shares}},
           "smallest_warp": {"sizes": sizes, "smallest": min(sizes, key=sizes.get), "anomaly": 1.5, "log_gap": 0.2},
           "random_warps": shares}
    if target:
        row["true_trigger_share"] = true_share
    return row


def test_warp_table_names_the_true_target_and_the_best_other_class():
    rows = [_row("m-warp", "coat", {"coat": 0.5, "bag": 0.6, "shirt": 0.1}, 0.7),
            _row("m-clean", None, {"coat": 0.2, "bag": 0.45, "shirt": 0.1})]
    md = warp_detectability.markdown(rows, [3.0], "cmd")
    assert "| m-warp (coat) | 0.70 | 3 | shots | bag (0.60) | 0.50 | 0.60 |" in md
    assert "| m-clean (clean) | - | 3 | held-out | bag (0.45) | - | - |" in md
    # the size test and the random warps: the smallest class and the true target's own size and share
    assert "| m-warp (coat) | bag (5.40) | 5.50 | 1.50 | 0.20 | bag (0.60) | 0.50 |" in md
    assert "| m-clean (clean) | bag (5.55) | - | 1.50 | 0.20 | bag (0.45) | - |" in md


def test_scan_time_table_and_unknown_model():
    rows = [{"model": "a", "verdict": "clean", "target": "bag", "mask_seconds": 40, "stripes_seconds": 25,
             "warp_seconds": 20, "seconds": 90.0},
            {"model": "b", "verdict": "backdoored", "target": "bag", "mask_seconds": 50, "stripes_seconds": 30,
             "warp_seconds": 21, "seconds": 110.0}]
    md = scan_time.markdown(rows, "cmd", 2)
    assert "| b | backdoored (bag) | 50 | 30 | 21 | 110 |" in md
    assert "Median 100 s, max 110 s" in md
    with pytest.raises(SystemExit, match="not a bundled lab model"):
        scan_time.main(["--models", "no-such-model"])
