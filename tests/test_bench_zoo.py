"""bench.zoo --quick and bench.resistivity --quick run end to end (the CI smoke runs of the zoo bench)."""
import json

import pytest

from bench import resistivity
from bench import zoo as bench_zoo


@pytest.mark.slow
def test_zoo_bench_quick_writes_tables_and_resumes(tmp_path):
    agg = bench_zoo.main(["--quick", "--results", str(tmp_path)])
    out = json.loads((tmp_path / "zoo_quick.json").read_text())
    names = [m["name"] for m in out["models"]]
    assert names == ["bundled-clean", "bundled-badnet"] or sorted(names) == ["bundled-badnet", "bundled-clean"]
    assert agg["scan"]["backdoored"] == 1 and agg["scan"]["controls"] == 1
    assert set(agg["defenses"]) == set(bench_zoo.DEFENSE_ORDER)
    md = (tmp_path / "zoo_quick.md").read_text()
    assert "| bundled-badnet |" in md and "false positives" in md
    cells = sorted(p.name for p in (tmp_path / "zoo" / "quick" / "bundled-badnet").iterdir())
    assert cells == sorted(["none.json", "scan.json", "scan.safetensors"] + [f"{d}.json" for d in bench_zoo.DEFENSE_ORDER])
    # a second run reads every cell from the cache
    again = bench_zoo.main(["--quick", "--results", str(tmp_path), "--cached-only"])
    assert again == agg
    # a scan cached under other mask settings: its mask evidence is inverted again, its stripe and warp
    # evidence kept, and the repair that read the old mask trigger tuned again
    cell_dir = tmp_path / "zoo" / "quick" / "bundled-badnet"
    scan = json.loads((cell_dir / "scan.json").read_text())
    old = json.loads(json.dumps(scan))
    old["inversion"]["mask"]["steps"] = 4
    old["mask"]["sizes"] = {c: -1.0 for c in old["mask"]["sizes"]}     # a marker the remask must replace
    old["verdict"] = "backdoored"       # the repair then read a trigger that the remask replaces: tune again
    (cell_dir / "scan.json").write_text(json.dumps(old))
    repair_before = (cell_dir / "repair.json").stat().st_mtime_ns
    bench_zoo.main(["--quick", "--results", str(tmp_path), "--defenses", "repair"])
    redone = json.loads((cell_dir / "scan.json").read_text())
    assert redone["inversion"] == scan["inversion"]
    assert redone["stripes"] == scan["stripes"] and redone["warp"] == scan["warp"]
    assert all(v > 0 for v in redone["mask"]["sizes"].values())
    assert (cell_dir / "repair.json").stat().st_mtime_ns != repair_before


@pytest.mark.slow
def test_resistivity_quick(tmp_path):
    resistivity.main(["--quick", "--out", str(tmp_path / "pr")])
    rows = json.loads((tmp_path / "pr.json").read_text())["rows"]
    models = {r["model"] for r in rows}
    assert {"clean", "badnet"} <= models
    assert all(-1 <= v <= 1 for r in rows for v in r["per_layer"])
