"""The C++ runner (export/cpp/runner.cpp) builds with CMake and prints what Python ONNX Runtime computes:
same top-1, logits within 1e-4, for a raw preprocessed batch and for PPM files it preprocesses itself."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from export.runtime import OnnxClassifier

from export_helpers import ROOT, lab_export

ORT_ROOT = ROOT / ".third_party" / "onnxruntime"
TOL = 1e-4


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    if not shutil.which("cmake") or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("cmake or a C++ compiler is not installed")
    if not (ORT_ROOT / "include" / "onnxruntime_cxx_api.h").is_file():
        got = subprocess.run(["bash", str(ROOT / "export/cpp/get_onnxruntime.sh")], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "PYTHON": sys.executable}, timeout=600)
        if got.returncode != 0:
            pytest.skip(f"ONNX Runtime headers unavailable and could not be fetched: {got.stderr.strip()[-300:]}")
    build = tmp_path_factory.mktemp("build")
    cfg = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}"],
                         capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stderr
    make = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True)
    assert make.returncode == 0, make.stdout + make.stderr
    return build / "runner"


def run(runner, *args):
    proc = subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        if line.startswith("image "):
            head, logits = line.split(" logits ")
            rows[head.split()[2]] = (int(head.split()[4]), np.array(logits.split(), dtype=np.float64))
    assert "median" in proc.stdout.splitlines()[-1]
    return rows


def write_ppm(path, hwc):
    h, w, _ = hwc.shape
    path.write_bytes(f"P6\n# test image\n{w} {h}\n255\n".encode() + hwc.astype(np.uint8).tobytes())


def check(rows, names, want):
    for name, row in zip(names, want):
        top1, logits = rows[str(name)]
        assert top1 == int(row.argmax())
        assert np.abs(logits - row).max() <= TOL


def test_raw_batch_matches_python(runner, tmp_path):
    _, path, _ = lab_export()
    model = OnnxClassifier(path, "cpu")
    x = torch.randn(5, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(1))
    raw = tmp_path / "batch.f32"
    x.numpy().astype(np.float32).tofile(raw)
    rows = run(runner, path, "--raw", raw, "--repeat", "2")
    check(rows, [f"{raw}[{i}]" for i in range(5)], model.run(x)[0])


@pytest.mark.parametrize("size,mode", [(None, "bilinear"), (64, "bilinear"), (16, "nearest")])
def test_ppm_preprocessing_matches_python(runner, tmp_path, size, mode):
    """At the model's size no resize happens (PIL's is a no-op too); other sizes follow torch's
    interpolate (pixel centres, no antialiasing), then the metadata's mean/std."""
    _, path, _ = lab_export()
    model = OnnxClassifier(path, "cpu")
    s = size or model.image_size
    rng = np.random.default_rng(s)
    imgs = [rng.integers(0, 256, (s, s, 3)) for _ in range(2)]
    files = [tmp_path / f"img{i}.ppm" for i in range(2)]
    for f, img in zip(files, imgs):
        write_ppm(f, img)
    if size is None:
        x = model.preprocess(files)
    else:
        t = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
        kw = {"align_corners": False} if mode == "bilinear" else {}
        x = model.normalise(F.interpolate(t, size=(model.image_size,) * 2, mode=mode, **kw))
    rows = run(runner, path, *files, "--resize", mode, "--repeat", "1")
    check(rows, files, model.run(x)[0])


def test_bad_input_is_an_error(runner, tmp_path):
    _, path, _ = lab_export()
    bad = tmp_path / "bad.f32"
    bad.write_bytes(b"\0" * 100)
    proc = subprocess.run([str(runner), str(path), "--raw", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "whole number" in proc.stderr
    proc = subprocess.run([str(runner)], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr
    for flag, value in (("--threads", "abc"), ("--repeat", "4x"), ("--threads", "")):
        proc = subprocess.run([str(runner), str(path), "--raw", str(bad), flag, value], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == f"error: {flag} needs a whole number, got '{value}'"  # not 'error: stoi'
    proc = subprocess.run([str(runner), str(path), "--raw", str(bad), "--threads", "-1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--threads must be 0" in proc.stderr


def test_cmake_skips_runner_without_onnxruntime(tmp_path):
    if not shutil.which("cmake"):
        pytest.skip("cmake is not installed")
    proc = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-DONNXRUNTIME_ROOT={tmp_path}/none"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Skipping the C++ runner" in proc.stdout
