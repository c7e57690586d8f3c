"""The main job end to end on the bundled lab model (tiny settings), and its bad-input contract:
a one-line error, a non-zero exit, nothing written to --out."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import runs, tune
from engine.errors import UserError
from engine.models import bundled_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--epochs", "1", "--shots", "2", "--eval-limit", "200", "--quiet"]


def test_tune_writes_results_and_prompts(tmp_path):
    out = tmp_path / "run"
    res = tune.main(["--fused", "--attack", "badnet", "--out", str(out), *TINY])
    saved = json.loads((out / "results.json").read_text())
    for key in ("defense", "model", "attack", "target", "shots", "backend", "seconds", "before", "after",
                "tuned_params", "total_params"):
        assert key in saved
    assert saved["backend"] == "shared" and saved["target"] == "bag" and saved["shots"] == 2
    for phase in ("before", "after"):
        assert 0 <= saved[phase]["ca"] <= 100 and 0 <= saved[phase]["asr"] <= 100
    assert saved["before"] == res["before"]
    prompts, meta = runs.load_prompts(out / "prompts.safetensors")
    assert prompts.shape[0] * prompts.shape[1] * prompts.shape[2] == saved["tuned_params"]
    assert meta["classes"][8] == "bag" and meta["start"] == saved["config"]["start"]
    assert sorted(p.name for p in out.iterdir()) == ["prompts.safetensors", "results.json"]


def run_cli(tmp_path, *args):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "engine.tune", "--out", str(out), *TINY, *args],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc, out


@pytest.mark.parametrize("args,message", [
    (["--data-dir", "/nonexistent"], "dataset-fashion-mnist"),
    (["--model", "ViT-Q-99"], "unknown model"),
    (["--shots", "100000"], "fewer than --shots"),
    (["--target", "banana"], "not in the class list"),
    (["--checkpoint", "/nonexistent.safetensors"], "does not exist"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, args, message):
    proc, out = run_cli(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"{garbage")
    proc, out = run_cli(tmp_path, "--checkpoint", str(bad))
    assert proc.returncode == 2 and "corrupt" in proc.stderr and not out.exists()


def test_nan_loss_stops_the_run_and_leaves_nothing(tmp_path):
    sd = load_file(str(bundled_checkpoint("badnet")))
    sd["visual.proj"] = torch.full_like(sd["visual.proj"], float("nan"))
    save_file(sd, str(tmp_path / "nan.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="loss became nan"):
        tune.main(["--checkpoint", str(tmp_path / "nan.safetensors"), "--out", str(out), *TINY])
    assert not out.exists()


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        tune.main(["--out", str(tmp_path), *TINY])
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_fused_backend_choice_on_cpu():
    backend, note = tune.pick_backend(True, None, torch.device("cpu"))
    assert backend == "shared" and "CPU" in note
    assert tune.pick_backend(False, None, torch.device("cpu"))[0] == "naive"
    with pytest.raises(UserError, match="CUDA"):
        tune.pick_backend(False, "triton", torch.device("cpu"))
