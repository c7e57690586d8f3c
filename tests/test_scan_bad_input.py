"""engine.scan on data it cannot scan: a clear UserError before any inversion, nothing in --out."""
import pytest
from PIL import Image

from engine import scan
from engine.errors import UserError


def test_one_class_data_set_is_a_clear_error(tmp_path, monkeypatch):
    """A one-class data set used to end in 'StatisticsError: no median' after the inversions."""
    (tmp_path / "bag").mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(tmp_path / "bag" / f"{i}.png")
    monkeypatch.setattr(scan, "split_shots", lambda *a, **k: pytest.fail("the scan started on one class"))
    with pytest.raises(UserError, match=r"single class \['bag'\].*at least two"):
        scan.main(["--dataset", f"folder:{tmp_path}", "--shots", "2", "--quiet", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
