"""The backdoor zoo: seeded, reproducible specs with disjoint dev/test splits covering every family; spec
triggers do what their spec says; the zoo builder's claim lock; bench.zoo's aggregation on a tiny zoo."""
import json

import pytest
import torch

from bench import zoo as bench_zoo
from engine import zoo
from engine.errors import UserError
from engine.triggers.spec import SpecTrigger, spec_trigger


def test_specs_are_reproducible_and_the_splits_disjoint():
    assert zoo.specs("test") == zoo.specs("test") and zoo.specs("dev") == zoo.specs("dev")
    dev, test = zoo.specs("dev"), zoo.specs("test")
    assert not {s["seed"] for s in dev} & {s["seed"] for s in test}
    assert not {s["name"] for s in dev} & {s["name"] for s in test}
    assert json.dumps(dev) != json.dumps(test)
    every = [s for split in zoo.SPLITS for s in zoo.specs(split)]       # no seed or name shared by two splits
    assert len({s["seed"] for s in every}) == len({s["name"] for s in every}) == len(every)
    backdoored = [s for s in test if s["trigger"]]
    assert len(backdoored) >= 20 and sum(s["trigger"] is None for s in test) >= 5
    assert {s["trigger"]["family"] for s in backdoored} == set(zoo.FAMILIES)
    assert len({s["target"] for s in backdoored}) >= 4          # targets are drawn, not fixed


@pytest.mark.parametrize("spec", [s["trigger"] for s in zoo.specs("test") if s["trigger"]
                                  and s["trigger"]["family"] != "optimised"], ids=lambda t: t["family"])
def test_spec_triggers_stay_in_range_and_are_deterministic(spec):
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    a, b = SpecTrigger(32, spec)(x), SpecTrigger(32, spec)(x)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b)
    assert (a - x).abs().max() > 0.01


def test_a_fixed_patch_changes_exactly_its_pixels():
    spec = {"family": "patch", "size": 3, "position": [5, 20], "pattern": "checker", "seed": 3}
    x = torch.zeros(2, 3, 32, 32)
    y = SpecTrigger(32, spec)(x)
    changed = (y != x).any(1)
    assert changed[:, 5:8, 20:23].all() and changed.sum() == 2 * 9


def test_a_random_position_patch_moves_between_images():
    spec = {"family": "patch", "size": 2, "position": "random", "pattern": "solid", "seed": 3}
    y = SpecTrigger(32, spec)(torch.zeros(8, 3, 32, 32))
    where = [tuple(torch.nonzero((img != 0).any(0))[0].tolist()) for img in y]
    assert len(set(where)) > 1


def test_periodic_spec_is_the_sinusoid_it_names():
    spec = {"family": "periodic", "orientation": "horizontal", "frequency": 4, "amplitude": 0.1, "phase": 0.0}
    y = SpecTrigger(32, spec)(torch.full((1, 3, 32, 32), 0.5))
    rows = y[0, 0, :, 0] - 0.5
    expect = 0.1 * torch.sin(2 * torch.pi * 4 * torch.arange(32) / 32)
    torch.testing.assert_close(rows, expect, atol=1e-6, rtol=0)
    assert (y[0, :, 3] == y[0, :, 3, :1]).all()              # constant along each row


def test_spec_trigger_bad_input():
    with pytest.raises(UserError, match="unknown trigger family"):
        spec_trigger('{"family": "lightning"}', 32)
    with pytest.raises(UserError, match="not valid JSON"):
        spec_trigger("{family", 32)
    with pytest.raises(UserError, match="missing or bad field"):
        spec_trigger('{"family": "blend"}', 32)
    record = {"name": "x", "trigger": {"family": "blend", "alpha": 0.1, "pattern": "noise", "seed": 1}}
    assert spec_trigger(json.dumps(record), 32).family == "blend"


def test_claim_is_exclusive_and_stale_locks_are_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_PURIFY_ZOO", str(tmp_path))
    lock = zoo.claim("m")
    assert lock is not None and zoo.claim("m") is None
    lock.write_text("999999999")                               # a builder that died
    assert zoo.claim("m") is not None


def _row(name, kind, none_ca, cells, target="bag", verdict="backdoored", score=2.0, suspected="bag"):
    return {"name": name, "family": "patch", "target": target, "kind": kind,
            "cells": {"none": {"ca": none_ca, "asr": 99.0}, "scan": {"verdict": verdict, "score": score, "seconds": 10,
                                                                     "suspected_target": suspected},
                      **{d: {"ca": ca, "asr": asr, "seconds": 5} for d, (ca, asr) in cells.items()}}}


def test_aggregation_on_a_tiny_zoo():
    rows = [_row("a", "backdoored", 80, {"repair": (78, 1.0)}),
            _row("b", "backdoored", 80, {"repair": (74, 30.0)}, suspected="coat"),
            _row("c", "backdoored", 80, {"repair": (79, 4.0)}, verdict="clean", score=0.5),
            _row("k", "clean", 81, {"repair": (80, 2.0)}, target=None, verdict="clean", score=0.4),
            _row("f", "failed", 80, {"repair": (80, 2.0)}, verdict="backdoored", score=1.5),
            _row("w", "weak", 80, {"repair": (70, 12.0)}, verdict="backdoored", score=3.0)]
    agg = bench_zoo.aggregate(rows, ["repair"])
    s, d = agg["scan"], agg["defenses"]["repair"]
    assert (s["backdoored"], s["controls"], s["detected"], s["false_positives"], s["target_right"]) == (3, 2, 2, 1, 1)
    # the weak backdoor is neither a control (its flag is no false positive) nor counted in the targets
    assert (s["weak"], s["weak_flagged"], d["weak_median_asr"]) == (1, 1, 12.0)
    assert s["tpr"] == pytest.approx(2 / 3)
    # backdoored scores 2, 2, 0.5 vs controls 0.4, 1.5: 5 wins of 6 pairs
    assert s["auroc"] == pytest.approx(5 / 6)
    assert d["asr_ok_share"] == pytest.approx(2 / 3) and d["median_asr"] == 4.0 and d["worst_asr"] == 30.0
    assert d["median_ca_drop"] == 2 and d["worst_ca_drop"] == 6
    assert d["control_median_ca_drop"] == pytest.approx(0.5) and d["control_worst_ca_drop"] == 1
    md = bench_zoo.markdown("test", rows, agg, ["repair"], ["z"], "python -m bench.zoo", 1.0)
    assert "2/3" in md and "1/2" in md and "Not built yet (skipped): z" in md
    # six models: scans 10 s, defenses 5 s each, no-defense cells untimed
    assert agg["cell_minutes"] == pytest.approx({"none": 0.0, "scan": 1.0, "repair": 0.5})
    assert "Cells' seconds summed: 2 min (none 0, scan 1, repair 0;" in md


def test_kind_splits_poisoned_models_by_their_no_defense_asr():
    poisoned = lambda asr: {"record": {"trigger": {"family": "patch"}}, "no_defense_asr": asr}  # noqa: E731
    assert [bench_zoo.kind(poisoned(a)) for a in (99.0, 80.0, 79.9, 20.0, 19.9, None)] == \
        ["backdoored", "backdoored", "weak", "weak", "failed", "failed"]
    assert bench_zoo.kind({"record": {"trigger": None}, "no_defense_asr": None}) == "clean"


def test_auroc_edge_cases():
    assert bench_zoo.auroc([1.0], []) is None
    assert bench_zoo.auroc([2.0, 3.0], [1.0]) == 1.0 and bench_zoo.auroc([1.0], [1.0]) == 0.5


def test_cached_settings_stay_valid_when_only_a_new_field_appears():
    stored = {"steps": 100, "mask": {"lr": 0.1}}
    assert bench_zoo._same(stored, {"steps": 100, "mask": {"lr": 0.1, "blend_alpha": 0.2}, "gate": False})
    # a cell from before the gate existed was ungated: today's default (gated) is another setting
    assert not bench_zoo._same(stored, {"steps": 100, "mask": {"lr": 0.1}, "gate": True})
    assert not bench_zoo._same(stored, {"steps": 100, "mask": {"lr": 0.1, "blend_alpha": 0.3}})
    assert not bench_zoo._same(stored, {"steps": 100, "mask": {"lr": 0.1}, "unknown_new_field": 1})
    assert not bench_zoo._same(stored, {"steps": 50, "mask": {"lr": 0.1}})
    assert not bench_zoo._same(stored, {"mask": {"lr": 0.1}})              # a field gone is a change


def test_a_scan_whose_mask_settings_moved_is_remasked_not_rescanned():
    import json
    now = bench_zoo.inversion_settings(bench_zoo.detect_config(False))
    assert not bench_zoo.needs_remask({"inversion": now}, False)            # current: nothing to redo
    before = json.loads(json.dumps(now))
    for key in ("recheck_top", "recheck_seeds", "warp_steps"):             # cached before those fields existed
        del before["mask"][key]
    before["mask"]["steps"] = 100                                           # ... when the warps ran the mask's steps
    assert bench_zoo.needs_remask({"inversion": before}, False)
    warp_moved = json.loads(json.dumps(before))
    warp_moved["mask"]["warp_pixels"] += 1    # the warp evidence is out of date too: scan again
    assert not bench_zoo.needs_remask({"inversion": warp_moved}, False)
    stripes_moved = json.loads(json.dumps(before))
    stripes_moved["stripes"]["steps"] += 1
    assert not bench_zoo.needs_remask({"inversion": stripes_moved}, False)
    warp_ran_longer = json.loads(json.dumps(now))
    warp_ran_longer["mask"]["warp_steps"] += 1
    assert not bench_zoo.needs_remask({"inversion": warp_ran_longer}, False)
    assert not bench_zoo.needs_remask({"mask": {}}, False)                  # no settings stored: scan again
    shorter = json.loads(json.dumps(before))
    shorter["mask"]["steps"] = 50             # its warps ran 50 steps, today's 100: scan again
    assert not bench_zoo.needs_remask({"inversion": shorter}, False)
    # a repair's config differs only by the recheck: the same repair (its scan cell decides)
    cfg = json.loads(json.dumps(bench_zoo.defense_config("repair", False, 0).as_dict()))
    old_cfg = json.loads(json.dumps(cfg))
    del old_cfg["detect"]["mask"]["recheck_top"]
    assert bench_zoo._same(bench_zoo._without_cuts(old_cfg), bench_zoo._without_cuts(cfg))
    # also_mask changes only a repair flagged by another family than the mask
    cached = {"config": {**old_cfg, "also_mask": False}}
    also = {"also_mask": True}
    assert not bench_zoo.stale_defense("repair", cached, False, 0, also, flagged_by="mask")
    assert not bench_zoo.stale_defense("repair", cached, False, 0, also, flagged_by=None)
    assert bench_zoo.stale_defense("repair", cached, False, 0, also, flagged_by="stripes")
    assert bench_zoo.stale_defense("repair", cached, False, 0, also)
    # keep_each (pooled before it existed) changes only a repair with more than one stand-in
    pooled = {k: v for k, v in old_cfg.items() if k != "keep_each"}
    single, each = {"extra": []}, {"keep_each": True}
    assert not bench_zoo.stale_defense("repair", {"config": {**pooled, **single}}, False, 0, {**single, **each},
                                       flagged_by="mask")
    assert bench_zoo.stale_defense("repair", {"config": {**pooled, **single}}, False, 0, {**single, **each},
                                   flagged_by="stripes")
    blend = {"extra": ["blend"]}
    assert bench_zoo.stale_defense("repair", {"config": {**pooled, **blend}}, False, 0, {**blend, **each},
                                   flagged_by="mask")
    assert not bench_zoo.stale_defense("repair", {"config": {**pooled, **blend}}, False, 0, blend, flagged_by="mask")


def test_an_untuned_repair_cell_stays_current_whatever_the_tuning_settings():
    cfg = json.loads(json.dumps(bench_zoo.defense_config("repair", False, 0).as_dict()))
    old = {k: v for k, v in cfg.items() if k != "keep_weight"}   # cached before the field existed
    assert not bench_zoo.stale_defense("repair", {"config": old, "repaired": True}, False, 0, {"keep_weight": 0.0})
    assert bench_zoo.stale_defense("repair", {"config": old, "repaired": True}, False, 0, {"keep_weight": 0.25})
    # the scan read the model clean: nothing was tuned, so no tuning setting makes the cell stale ...
    assert not bench_zoo.stale_defense("repair", {"config": old, "repaired": False}, False, 0,
                                       {"keep_weight": 0.25, "w_trigger": 1.0})
    # ... but `always` does (then a clean-read model is repaired too)
    assert bench_zoo.stale_defense("repair", {"config": old, "repaired": False}, False, 0, {"always": True})


def test_cached_only_tables_need_no_checkpoint_and_never_compute_a_stale_cell(tmp_path, monkeypatch):
    import shutil
    monkeypatch.setenv("CLIP_PURIFY_ZOO", str(tmp_path / "no-checkpoints"))
    monkeypatch.setattr(bench_zoo, "prepare", lambda *a, **k: pytest.fail("a --cached-only run loaded a model"))
    src = bench_zoo.RESULTS / "zoo" / "holdout"
    now = bench_zoo.inversion_settings(bench_zoo.detect_config(False))
    detect_now = json.loads(json.dumps(bench_zoo.defense_config("repair", False, 0).detect.as_dict()))
    for name in ("holdout-08-warp", "holdout-00-patch"):   # read clean (nothing tuned) / flagged and repaired
        shutil.copytree(src / name, tmp_path / "zoo" / "holdout" / name)
        # as if cached under today's inversion settings (the committed cells may predate them)
        scan_path, repair_path = (tmp_path / "zoo" / "holdout" / name / f"{c}.json" for c in ("scan", "repair"))
        scan_path.write_text(json.dumps({**json.loads(scan_path.read_text()), "inversion": now}))
        tuned_cell = json.loads(repair_path.read_text())
        if "config" in tuned_cell:
            tuned_cell["config"]["detect"] = detect_now
            repair_path.write_text(json.dumps(tuned_cell))
    args = ["--split", "holdout", "--defenses", "repair", "--results", str(tmp_path), "--cached-only",
            "--models", "holdout-08-warp", "holdout-00-patch"]
    tuned = json.loads((src / "holdout-00-patch" / "repair.json").read_text())["config"]
    # the settings the cells were tuned with (a field absent there: the value it ran with): both cells current
    as_tuned = {k: tuned.get(k, bench_zoo.ADDED_FIELDS[k]) for k in ("keep_weight", "keep_cap")}
    bench_zoo.main(args + ["--set", *(f"{k}={v}" for k, v in as_tuned.items())])
    rows = {m["name"] for m in json.loads((tmp_path / "zoo_holdout.json").read_text())["models"]}
    assert rows == {"holdout-08-warp", "holdout-00-patch"}
    moved = {**as_tuned, "keep_weight": as_tuned["keep_weight"] + 1}
    bench_zoo.main(args + ["--set", *(f"{k}={v}" for k, v in moved.items())])   # the repaired cell is stale: listed, not run
    out = json.loads((tmp_path / "zoo_holdout.json").read_text())
    assert [m["name"] for m in out["models"]] == ["holdout-08-warp"]
    assert any(m.startswith("holdout-00-patch (cached cells stale") for m in out["missing"])
    assert (tmp_path / "zoo" / "holdout" / "holdout-00-patch" / "repair.json").is_file()   # left as it was


def test_a_scan_under_moved_cuts_is_decided_again_from_its_evidence(tmp_path):
    cuts = bench_zoo.detect_config(False)
    mask = {"target": "bag", "anomaly_index": cuts.min_mask_anomaly + 1, "log_gap": cuts.min_mask_gap - 0.05}
    stripes = {"target": "coat", "target_share": 0.0, "anomaly_index": 0.0}
    cell = {"verdict": "backdoored", "flagged_by": "mask", "suspected_target": "bag", "mask": mask,
            "stripes": stripes, "warp": None}
    repair = tmp_path / "repair.json"
    repair.write_text("{}")
    again = bench_zoo.recut(cell, False, repair)          # the gap now misses the cut: read clean
    assert (again["verdict"], again["flagged_by"], again["suspected_target"]) == ("clean", None, "bag")
    assert not repair.exists()
    repair.write_text("{}")
    assert bench_zoo.recut(again, False, repair) is again and repair.exists()   # unchanged: the repair stays


def test_sweep_configs_split_on_commas_outside_json_values():
    from bench.zoo_sweep import parse_config
    assert parse_config('b:extra=["blend","mask"],adv_steps=3') == ("b", ['extra=["blend","mask"]', "adv_steps=3"])
    assert parse_config("default:") == ("default", [])
    with pytest.raises(SystemExit, match="NAME:FIELD=VALUE"):
        parse_config("no-colon")


def test_zoo_set_refuses_malformed_and_unknown_fields():
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        bench_zoo.main(["--set", "epochs"])
    with pytest.raises(SystemExit, match="no defense among"):
        bench_zoo.main(["--defenses", "repair", "--set", "no_such_field=1"])
    assert bench_zoo.parse_setting("extra=[\"blend\"]") == ("extra", ["blend"]) and bench_zoo.parse_setting("x=abc") == ("x", "abc")
