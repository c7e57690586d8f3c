"""Bad input to export.onnx: a clear UserError (one line, exit 2 from the CLI), and nothing left behind,
neither the output nor a temporary file."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import save_file

from engine.errors import UserError
from engine.runs import load_prompts
from export import onnx as ex

from export_helpers import ROOT, lab_checkpoint, make_run


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return lab_checkpoint(tmp_path_factory.mktemp("weights"))


def test_run_without_prompts(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    with pytest.raises(UserError, match="no prompts.safetensors"):
        ex.main(["--run", str(run)])
    assert files(tmp_path) == ["run", "run/results.json"]
    with pytest.raises(UserError, match="does not exist"):
        ex.main(["--run", str(tmp_path / "missing"), "--out", str(tmp_path / "m.onnx")])
    assert files(tmp_path) == ["run", "run/results.json"]


@pytest.mark.parametrize("kind", ["width", "depth"])
def test_prompt_shape_mismatch(tmp_path, checkpoint, kind):
    if kind == "width":  # prompts for a 64-wide ViT
        run = make_run(tmp_path / "run", checkpoint, width=64)
    else:  # 4 prompted blocks' prompts, metadata claiming D=4 on a 6-block ViT (2 blocks)
        run = make_run(tmp_path / "run", checkpoint, start=2)
        prompts, meta = load_prompts(run / "prompts.safetensors")
        meta["start"] = 4
        save_file({"prompts": prompts}, str(run / "prompts.safetensors"),
                  metadata={k: json.dumps(v) for k, v in meta.items()})
    before = files(tmp_path)
    with pytest.raises(UserError, match="do not match the model"):
        ex.main(["--run", str(run), "--out", str(tmp_path / "out" / "m.onnx")])
    assert files(tmp_path) == before


def test_unwritable_output(tmp_path, checkpoint):
    run = make_run(tmp_path / "run", checkpoint)
    (tmp_path / "plain_file").write_text("x")
    before = files(tmp_path)
    with pytest.raises(UserError, match="not a writable directory"):
        ex.main(["--run", str(run), "--out", str(tmp_path / "plain_file" / "sub" / "m.onnx")])
    with pytest.raises(UserError, match="is a directory"):
        ex.main(["--run", str(run), "--out", str(tmp_path)])
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match="not a writable directory"):
            ex.main(["--run", str(run), "--out", str(locked / "m.onnx")])
        locked.rmdir()
    assert files(tmp_path) == before


def test_failed_export_leaves_nothing(tmp_path, checkpoint, monkeypatch):
    """A failure after the exporter has written its file (here: the ORT check) removes the temp file."""
    run = make_run(tmp_path / "run", checkpoint)
    before = files(tmp_path)

    def fail(*_):
        raise UserError("exported graph disagrees with torch")
    monkeypatch.setattr(ex, "_verify", fail)
    with pytest.raises(UserError, match="disagrees"):
        ex.main(["--run", str(run), "--out", str(tmp_path / "new" / "dir" / "m.onnx"), "--exporter", "legacy"])
    assert files(tmp_path) == before


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "export.onnx", "--run", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "no prompts.safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
