"""bench.defense_matrix --quick end to end (the CI smoke run): every defense runs, the table and the JSON
agree, and the no-defense cell is the bundled model's own measurement on the same images."""
import json

import pytest

from bench import defense_matrix


@pytest.mark.slow
def test_quick_matrix_writes_consistent_results(tmp_path):
    prefix = str(tmp_path / "dm")
    defense_matrix.main(["--quick", "--out", prefix])
    saved = json.loads((tmp_path / "dm.json").read_text())
    assert saved["quick"] and len(saved["results"]) == 1
    row = saved["results"][0]
    assert set(row["cells"]) == set(defense_matrix.ORDER)
    for name, cell in row["cells"].items():
        assert 0 <= cell["ca"] <= 100 and 0 <= cell["asr"] <= 100, name
        assert (cell["tuned_params"] > 0) == (name != "none")
    table = (tmp_path / "dm.md").read_text()
    none = row["cells"]["none"]
    assert f"| no defense | {none['asr']:.2f} ({none['ca']:.2f}) |" in table
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(defense_matrix.ORDER)
    assert table.strip().splitlines()[-1] == f"Whole matrix: {saved['seconds']:.0f} s (`{saved['command']}`)."
    try:
        import matplotlib  # noqa: F401  (the plot extra)
        assert (tmp_path / "dm.png").stat().st_size > 1000
    except ImportError:
        assert not (tmp_path / "dm.png").exists()


def test_cells_are_cached_so_a_shard_run_resumes_and_cached_only_merges(tmp_path, monkeypatch):
    prefix = str(tmp_path / "dm")
    args = ["--quick", "--defenses", "linear-probe", "--out", prefix]
    assert defense_matrix.main(args + ["--shard", "0/1"]) is None        # cells only, no tables
    assert not (tmp_path / "dm.md").exists()
    cells = sorted(p.name for p in (tmp_path / "dm_cells").rglob("*.json"))
    assert cells == ["linear-probe.json", "none.json"]

    def no_tuning(*a, **k):
        raise AssertionError("a cached cell was tuned again")
    monkeypatch.setattr(defense_matrix, "defend", no_tuning)
    monkeypatch.setattr(defense_matrix, "prepare", no_tuning)
    defense_matrix.main(args + ["--cached-only"])
    saved = json.loads((tmp_path / "dm.json").read_text())
    assert set(saved["results"][0]["cells"]) == {"none", "linear-probe"}
    # other settings make the cached cells stale: they would be run again
    with pytest.raises(AssertionError, match="tuned again"):
        defense_matrix.main(args + ["--seed", "1"])
