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


# ---------------------------------------------------------------- non-finite models, overwrites, predict (issue 12)

def _nan_run(tmp_path, checkpoint):
    run = make_run(tmp_path / "run", checkpoint)
    prompts, meta = load_prompts(run / "prompts.safetensors")
    prompts[0, 0, 0] = float("nan")
    save_file({"prompts": prompts}, str(run / "prompts.safetensors"),
              metadata={k: json.dumps(v) for k, v in meta.items()})
    return run


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_nan_prompts_fail_the_export(tmp_path, checkpoint, verify):
    """A NaN prompt used to pass the parity check ('max abs diff nan') and ship a model serving NaN."""
    run = _nan_run(tmp_path, checkpoint)
    before = files(tmp_path)
    with pytest.raises(UserError, match=r"non-finite values \(\d+ of \d+ in block 2's prompt K/V, from the prompts\).*nothing written"):
        ex.main(["--run", str(run), "--out", str(tmp_path / "m.onnx"), *([] if verify else ["--no-verify"])])
    assert files(tmp_path) == before


def test_parity_check_refuses_non_finite_outputs(tmp_path):
    """_verify itself: NaN from ONNX Runtime or from torch is a failure, not a difference that compares
    as small (NaN > tol is False)."""
    from export_helpers import tiny_onnx
    w = tiny_onnx(tmp_path / "nan.onnx", nan=True)
    finite = w.nan_to_num(0.0)

    def twin(weights):
        return lambda x: (x.flatten(1) @ weights, x.flatten(1) @ weights)
    with pytest.raises(UserError, match="not finite .* in ONNX Runtime"):
        ex._verify(twin(finite), tmp_path / "nan.onnx", 8)
    with pytest.raises(UserError, match="not finite .* in torch"):
        ex._verify(twin(w), tmp_path / "nan.onnx", 8)
    ok = tiny_onnx(tmp_path / "ok.onnx")
    assert ex._verify(twin(ok), tmp_path / "ok.onnx", 8) < 1e-5


def test_existing_out_file_is_not_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(ex.folded, "from_run", lambda *a, **k: pytest.fail("the export started"))
    out = tmp_path / "keep.onnx"
    out.write_text("x")
    with pytest.raises(UserError, match=r"--out .*keep.onnx already exists"):
        ex.main(["--run", str(tmp_path), "--out", str(out)])
    (tmp_path / "model.onnx").write_text("y")  # the default --out, RUN/model.onnx
    with pytest.raises(UserError, match=r"model.onnx already exists"):
        ex.main(["--run", str(tmp_path)])
    assert out.read_text() == "x" and (tmp_path / "model.onnx").read_text() == "y"


def test_predict_refuses_non_finite_scores(tmp_path, capsys):
    from PIL import Image

    from export import predict
    from export.runtime import OnnxClassifier
    from export_helpers import tiny_onnx
    tiny_onnx(tmp_path / "nan.onnx", nan=True)
    Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "x.png")
    with pytest.raises(UserError, match=r"non-finite scores \(nan/inf\) for 1 of 1 images: the model .*nan.onnx"):
        predict.main([str(tmp_path / "nan.onnx"), str(tmp_path / "x.png")])
    assert "nan" not in capsys.readouterr().out.split("\n", 1)[1]  # no score line was printed
    import torch
    with pytest.raises(UserError, match="non-finite scores"):
        OnnxClassifier(tmp_path / "nan.onnx").logits(torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize("flag", ["--limit", "--top-k"])
def test_predict_counts_must_be_positive(tmp_path, flag):
    from export import predict
    args = ["--eval", "--limit", "0"] if flag == "--limit" else ["x.png", "--top-k", "0"]
    with pytest.raises(UserError, match=f"{flag} must be at least 1, not 0"):
        predict.main([str(tmp_path / "missing.onnx"), *args])


def test_predict_scales_16_bit_images(tmp_path):
    """export.predict reads images with engine.data.load_image: a 16-bit grey PNG at half range is
    mid-grey, normalised with the model's mean/std (0.5, 0.25) to 0, not to white's +2."""
    import numpy as np
    from PIL import Image

    from export.runtime import OnnxClassifier
    from export_helpers import tiny_onnx
    tiny_onnx(tmp_path / "ok.onnx")
    Image.fromarray(np.full((16, 12), 32768, np.uint16)).save(tmp_path / "g16.png")
    x = OnnxClassifier(tmp_path / "ok.onnx").preprocess([tmp_path / "g16.png"])
    assert x.shape == (1, 3, 8, 8) and x.abs().max() < 0.02


def test_bench_latency_cli_error_is_one_line(monkeypatch, capsys):
    import runpy
    monkeypatch.setattr(sys, "argv", ["bench.latency", "--models", "lab-vit", "--run", "/nonexistent-run"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("bench.latency", run_name="__main__")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "/nonexistent-run" in err[0]
