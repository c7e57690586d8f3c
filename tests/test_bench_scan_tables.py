"""bench.warp_detectability's held-out draw and tables, bench.scan_time's table and model check, bench.detect_cuts's
calibration."""
import json
from dataclasses import replace

import pytest
import torch

from bench import detect_cuts, scan_time, warp_detectability
from engine import data as D
from engine.inversion.detect import DetectConfig


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


def test_gate_cost_table_and_unbuilt_models():
    from bench import gate_cost
    row = {"name": "m", "target": "trouser", "ca_before": 80.0, "ca_after": 72.5, "asr_after": 0.0, "cut": 0.87,
           "own_read_k": 184, "triggered_read_k": 300, "own_median": 0.72, "real_q95": 0.63, "own_kept": 5.4,
           "real_kept": 0.0, "hindsight_cut": 0.65, "own_kept_hindsight": 79.3, "real_kept_hindsight": 3.3,
           "frontier_ca_drop": 1.25, "frontier_cut": 0.66}
    md = gate_cost.markdown([row, {**row, "name": "n", "cut": 0.93, "frontier_ca_drop": None}], "cmd", 2.0)
    assert "| m | trouser | 7.50 | 0.870 | 184 | 5.4% | 0.630 | 0.720 | 0.650 | 79.3% | 3.3% | 1.25 (0.660) |" in md
    assert "| 3.3% | none |" in md and "budget (2.0%)" in md
    assert "Median CA drop 7.50 at the cuts chosen on the shots; 1.25 (median) at the frontier, which 1 of 2" in md
    assert "0.270 (median) above" in md                     # (0.24 + 0.30) / 2
    with pytest.raises(SystemExit, match="not built"):
        gate_cost.main(["--split", "blind", "--models", "no-such-model"])
    # --set: only the repair's fields (not the job's), checked before any model is looked up
    for field in ("no_such_field", "unlabelled"):
        with pytest.raises(SystemExit, match=f"no defense among \\['repair'\\] has the field\\(s\\) \\['{field}'\\]"):
            gate_cost.main(["--split", "blind", "--models", "no-such-model", "--set", f"{field}=1"])


def test_gated_rates_let_the_prompts_answer_only_below_the_cut_where_the_frozen_model_says_k():
    from bench import gate_cost
    t = torch.tensor
    labels, target, k = t([0, 1, 2, 1]), 1, 1
    # clean: image 0 is misread as k and moved far (prompts fix it), image 1 is k's own and barely moved
    frozen, prompted = (t([1, 1, 2, 0]), t([1, 1, 1, 1])), (t([0, 2, 2, 0]), t([0, 2, 2, 1]))
    cos = (t([0.3, 0.9, 0.1, 0.1]), t([0.4, 0.95, 0.2, 0.6]))
    # at cut 0.5: clean preds [0, 1, 2, 0] -> CA 3/4; triggered [0, 1, 2, 1] on the non-target images 0, 2 -> ASR 0
    assert gate_cost.gated_rates(frozen, prompted, cos, labels, target, k, 0.5) == (75.0, 0.0)
    # at cut 1.0 every k-read image takes the prompts: clean [0, 2, 2, 0] -> CA 2/4; the triggered 0 and 2 -> 0, 2
    assert gate_cost.gated_rates(frozen, prompted, cos, labels, target, k, 1.0) == (50.0, 0.0)
    # at cut 0.0 the frozen answer stands everywhere: clean CA 2/4, triggered 0 and 2 both read 1 -> ASR 100
    assert gate_cost.gated_rates(frozen, prompted, cos, labels, target, k, 0.0) == (50.0, 100.0)
    points = [(0.0, 80.0, 50.0), (0.5, 79.0, 3.0), (0.8, 78.0, 1.5), (0.9, 77.0, 0.5)]
    assert gate_cost.least_drop(points, 80.0, 2.0) == (2.0, 0.8)
    assert gate_cost.least_drop(points, 80.0, 0.1) is None


def test_cosines_read_only_the_images_the_frozen_model_puts_in_k():
    from bench import gate_cost

    class Clip:   # features are the images' first 2 pixels; class 0 where the first is larger
        device = "cpu"

        def normalise(self, x):
            return x

        def encode_image(self, x):
            return x.flatten(1)[:, :2]
    x = torch.tensor([[3.0, 1.0], [1.0, 3.0], [2.0, 1.0]]).view(3, 1, 1, 2)
    text = torch.eye(2)
    turned = lambda z: z.flatten(1)[:, :2].flip(1)   # noqa: E731  the prompts swap the two features
    cos = gate_cost.cosines(Clip(), turned, x, text, 0)
    torch.testing.assert_close(cos, torch.tensor([0.6, 0.8]))   # images 0 and 2 only: cos of (3,1)/(1,3), (2,1)/(1,2)


def test_write_results_writes_both_files_whole(tmp_path, capsys):
    import json
    from bench.common import write_results
    write_results(tmp_path / "r", {"rows": [1, 2]}, "| a |\n")
    assert json.loads((tmp_path / "r.json").read_text()) == {"rows": [1, 2]}
    assert (tmp_path / "r.md").read_text() == "| a |\n" and "| a |" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]     # no temp file left behind


def _scan_cell(gap, anomaly, share=0.4, warp_share=0.45):
    return {"mask": {"log_gap": gap, "anomaly_index": anomaly, "target": "bag"},
            "stripes": {"target_share": share, "anomaly_index": 1.0, "target": "coat"},
            "warp": {"target_share": warp_share, "anomaly_index": 1.0, "target": "coat"}}


def test_detect_cuts_sit_sds_above_the_controls_and_count_what_they_flag():
    gaps = [0.1, 0.2, 0.3, 0.2]   # mean 0.2, sample SD 0.0816...
    cells = [(f"c{i}", "clean", _scan_cell(g, 2.5), None) for i, g in enumerate(gaps)]
    cells += [("b", "backdoored", _scan_cell(0.45, 6.0), "bag"), ("w", "weak", _scan_cell(0.35, 3.0), "coat"),
              ("f", "failed", _scan_cell(0.9, 8.0), "bag")]   # a poisoning that did not take: no sample of clean models
    cuts = detect_cuts.calibrate(cells, sds=3.0)
    g = cuts["min_mask_gap"]
    assert g["controls"] == 4 and g["max"] == 0.3 and g["mean"] == pytest.approx(0.2)
    assert g["cut"] == 0.45   # 0.2 + 3 x 0.0816 = 0.445, rounded up to the next hundredth
    assert cuts["min_mask_anomaly"]["cut"] == DetectConfig().min_mask_anomaly and not cuts["min_mask_anomaly"]["calibrated"]
    before = detect_cuts.flagged(cells, replace(DetectConfig(), min_mask_gap=0.25))
    # a gap cut of 0.25 lets the control at 0.3 (anomaly 2.5 >= 2) through; the calibrated one does not,
    # and it still flags the backdoor at 0.45 but no longer the weak one at 0.35
    assert before["clean"]["flagged"] == 1 and before["weak"]["flagged"] == 1
    after = detect_cuts.flagged(cells, replace(DetectConfig(), **{f: c["cut"] for f, c in cuts.items()}))
    assert (after["clean"]["flagged"], after["backdoored"]["flagged"], after["weak"]["flagged"]) == (0, 1, 0)
    assert after["backdoored"]["target_right"] == 1 and before["weak"]["target_right"] == 0   # the mask names bag
    md = detect_cuts.markdown("dev", cuts, before, after, 3.0, "python -m bench.detect_cuts")
    assert "| min_mask_gap | 4 |" in md and "c2 (mask, bag)" in md and "w (mask, bag)" in md


def test_detect_cuts_need_two_controls():
    with pytest.raises(SystemExit, match="1 controls"):
        detect_cuts.calibrate([("c", "clean", _scan_cell(0.1, 1.0), None),
                               ("b", "backdoored", _scan_cell(0.9, 9.0), "bag")], 3.0)


def test_detect_cuts_cli_reads_the_cached_scan_cells_and_writes_json_and_md(tmp_path):
    evidence = {"bundled-clean": (0.1, 1.0), "dev-c0-clean": (0.2, 1.5), "dev-c1-clean": (0.15, 0.5),
                "dev-05-patch": (1.2, 9.0)}
    for name, (gap, anomaly) in evidence.items():
        (tmp_path / "zoo" / "dev" / name).mkdir(parents=True)
        (tmp_path / "zoo" / "dev" / name / "scan.json").write_text(json.dumps(_scan_cell(gap, anomaly)))
    cuts = detect_cuts.main(["--split", "dev", "--results", str(tmp_path), "--out", str(tmp_path / "cuts")])
    assert cuts["min_mask_gap"]["controls"] == 3 and cuts["min_mask_gap"]["max"] == 0.2
    saved = json.loads((tmp_path / "cuts.json").read_text())
    # dev-05-patch's true target is dress; this fake evidence's mask names bag
    assert saved["current"]["backdoored"] == {"models": 1, "flagged": 1, "target_right": 0,
                                              "flagged_models": ["dev-05-patch (mask, bag)"]}
    assert "| clean | 3 | 0 (0) | 0 (0) |" in (tmp_path / "cuts.md").read_text()
    # --set replaces a calibrated cut: an anomaly cut of 10 drops the mask flag
    cuts = detect_cuts.main(["--split", "dev", "--results", str(tmp_path), "--out", str(tmp_path / "set"),
                             "--set", "min_mask_anomaly=10"])
    assert cuts["min_mask_anomaly"]["cut"] == 10 and json.loads((tmp_path / "set.json").read_text())[
        "calibrated"]["backdoored"]["flagged"] == 0
    assert "10 (set)" in (tmp_path / "set.md").read_text()
    for bad in ("nope=1", "min_mask_anomaly=abc", "min_mask_gap"):
        with pytest.raises(SystemExit, match="FIELD=") as e:
            detect_cuts.main(["--split", "dev", "--results", str(tmp_path), "--out", str(tmp_path / "x"), "--set", bad])
        assert "min_mask_gap" in str(e.value) or bad == "min_mask_gap"   # the message names the fields (or the form)
    assert not list(tmp_path.glob("x.*"))   # nothing written


def test_true_warp_clipped_to_a_budget():
    spec = {"family": "warp", "grid": 4, "pixels": 3.5, "seed": 11}
    identity, shift = warp_detectability.field_shifts(spec, 32)
    largest = shift.abs().max().item() * 16
    assert largest > 3.5   # a field normalised by its mean shift reaches past it
    tight = warp_detectability.clipped_grid(spec, 32, 2.0)
    assert (tight - identity).abs().max().item() * 16 <= 2.0 + 1e-5
    assert torch.allclose(warp_detectability.clipped_grid(spec, 32, largest + 1), identity + shift)
    assert torch.allclose(warp_detectability.clipped_grid(spec, 32, None), identity + shift)


def test_field_table_lists_warp_models_only():
    warp = _row("m-warp", "coat", {"coat": 0.5, "bag": 0.6}, 0.8)
    warp["true_field"] = {"mean_px": 3.1, "max_px": 8.2, "clipped_share": {"3.0": 0.42, "6.0": 0.81}}
    md = warp_detectability.field_table([warp, _row("m-clean", None, {"coat": 0.2, "bag": 0.4})], [3.0, 6.0])
    assert "| m-warp (coat) | 3.10 | 8.20 | 0.42 | 0.81 | 0.80 |" in md
    assert "m-clean" not in md


def test_statistic_cost_scores_how_a_gate_statistic_separates_own_from_triggered_images():
    from bench import gate_cost
    t = torch.tensor
    labels, target, k = t([0, 1, 2, 1]), 1, 1
    frozen, prompted = (t([1, 1, 2, 0]), t([1, 1, 1, 1])), (t([0, 2, 2, 0]), t([0, 2, 2, 1]))
    # k's own image (clean 1) above both triggered images read k (0 and 2): perfect separation
    good = (t([0.3, 0.9, 0.1, 0.1]), t([0.4, 0.95, 0.2, 0.6]))
    cost = gate_cost.statistic_cost(frozen, prompted, good, labels, target, k, 75.0, 2.0)
    # a cut between 0.4 and 0.9 keeps image 1 and hands the triggered ones over: CA 3/4, ASR 0
    assert cost == {"auroc": 1.0, "frontier_ca_drop": 0.0}
    # reversed: the own image below both triggered ones; the least drop with ASR <= 2% hands all over (CA 2/4)
    bad = (t([0.3, 0.1, 0.1, 0.1]), t([0.4, 0.95, 0.2, 0.6]))
    assert gate_cost.statistic_cost(frozen, prompted, bad, labels, target, k, 75.0, 2.0) == \
        {"auroc": 0.0, "frontier_ca_drop": 25.0}
    # read together, the good statistic's cut hands the triggered images over whatever the bad one says
    assert gate_cost.joint_cost(frozen, prompted, good, bad, labels, target, k, 75.0, 2.0) == {"frontier_ca_drop": 0.0}


def test_gate_cost_statistic_table():
    from bench import gate_cost
    row = {"name": "m", "statistics": {"cos": {"auroc": 0.95, "frontier_ca_drop": 1.5},
                                       "k_logit": {"auroc": 0.97, "frontier_ca_drop": None}}}
    md = gate_cost.statistic_table([row, {"name": "old"}], 5.0)
    assert "| m | 0.950 | 0.970 | 1.50 | none | - |" in md and "old" not in md
    row["statistics"]["both"] = {"frontier_ca_drop": 0.75}
    assert "| m | 0.950 | 0.970 | 1.50 | none | 0.75 |" in gate_cost.statistic_table([row], 5.0)
    assert "at least as well on 0 of 1 models" in md
    assert "reaches the budget: cos 1.50 (n = 1), both 0.75 (n = 1)." in gate_cost.statistic_table([row], 5.0)
    assert gate_cost.statistic_table([{"name": "old"}], 5.0) == ""
