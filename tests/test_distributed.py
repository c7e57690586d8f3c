"""torchrun with gloo on the CPU: 2 ranks give one process's results (same global batch and seed)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from engine import distributed, tune


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bounds_split_every_item_once():
    assert distributed.bounds(7) == (0, 7) and distributed.shard(torch.arange(5))[1] == 1.0


ARGS = ["--defense", "rvpt", "--fused", "--epochs", "2", "--shots", "3", "--eval-limit", "300", "--quiet"]


@pytest.mark.slow
def test_two_gloo_ranks_tune_and_evaluate_like_one_process(tmp_path):
    one = tmp_path / "one"
    tune.main(ARGS + ["--out", str(one)])
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "-m", "engine.tune", *ARGS, "--out", str(two)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert b["ranks"] == 2 and a["ranks"] == 1
    assert a["before"] == b["before"]                      # counts summed over ranks: identical
    assert a["after"] == b["after"]
    assert a["loss_history"] == pytest.approx(b["loss_history"], rel=1e-5)
    pa, pb = (load_file(str(d / "prompts.safetensors")) for d in (one, two))
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_failing_rank_stops_the_job_and_writes_nothing(tmp_path):
    """Rank 1 fails during tuning (a sitecustomize makes its RVPT step raise a UserError): torchrun
    stops, the error names the rank, and no run directory appears."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import engine.defenses.rvpt as r\n"
        "    from engine.errors import UserError\n"
        "    def boom(*a, **k):\n"
        "        raise UserError('injected failure on this rank')\n"
        "    r.rvpt_step_loss = boom\n")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "-m", "engine.tune", *ARGS, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=os.getcwd())
    assert proc.returncode != 0
    assert "error (rank 1 of 2): injected failure on this rank" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists() and not list(tmp_path.glob(".run*"))


SCAN_ARGS = ["--lab", "badnet", "--shots", "3", "--steps", "4", "--stripe-steps", "2", "--warp-steps", "4",
             "--quiet"]


@pytest.mark.slow
def test_two_gloo_ranks_scan_like_one_process(tmp_path):
    """Each rank inverts its share of the classes (and stripe candidates); the gradients and the
    per-class measurements are gathered, so the evidence is one process's."""
    from engine import scan
    one = tmp_path / "one"
    scan.main(SCAN_ARGS + ["--out", str(one)])
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), "-m", "engine.scan", *SCAN_ARGS, "--out", str(two)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((d / "scan.json").read_text()) for d in (one, two))
    assert (a["ranks"], b["ranks"]) == (1, 2)
    assert (a["verdict"], a["suspected_target"], a["flagged_by"]) == (b["verdict"], b["suspected_target"], b["flagged_by"])
    for family, key in (("mask", "sizes"), ("warp", "shares")):
        assert a[family][key] == pytest.approx(b[family][key], rel=1e-4, abs=1e-4)
    for o in a["stripes"]["shares"]:
        assert a["stripes"]["shares"][o] == pytest.approx(b["stripes"]["shares"][o], abs=1e-6)
    ta, tb = (load_file(str(d / "triggers.safetensors")) for d in (one, two))
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=1e-4, rtol=1e-4)
