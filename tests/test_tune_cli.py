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
# RVPT: the plumbing tests need a defense that tunes in a second (the default repair runs the detector)
TINY = ["--defense", "rvpt", "--epochs", "1", "--shots", "2", "--eval-limit", "200", "--quiet"]


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


# ---------------------------------------------------------------- bad input on a tiny folder data set (issue 12)

CLASSES = {8: "bag", 7: "sneaker", 1: "trouser"}  # words the lab tokenizer knows


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """folder:ROOT with train/ and test/, 10 + 10 rendered Fashion-MNIST test images of three classes:
    the in-process CLI tests below run in about a second each."""
    from PIL import Image

    from engine import data as D
    root = tmp_path_factory.mktemp("tiny")
    grey, labels = D.load_fashion_mnist_raw("test")
    idx = [i for i in range(len(labels)) if labels[i] in CLASSES][:60]
    images, _ = D.render(grey[idx], seed=0)
    for j, (i, im) in enumerate(zip(idx, images)):
        folder = root / ("train" if j % 2 else "test") / CLASSES[int(labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(folder / f"{j}.png")
    return root


def tiny(root, out, *extra):
    return ["--defense", "rvpt", "--dataset", f"folder:{root}", "--target", "bag", "--shots", "2", "--epochs", "1",
            "--quiet",
            "--out", str(out), *extra]


def cli_error(capsys, argv):
    """engine.tune's CLI entry in-process: (exit code, stderr lines)."""
    from engine.cli import run_cli
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: tune.main(argv))
    return exit_.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("args,message", [
    (["--batch", "0"], "--batch must be at least 1, not 0"),
    (["--eval-limit", "0"], "--eval-limit must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--shots", "0"], "--shots must be at least 1"),
    (["--lr", "0"], "--lr must be positive"),
    (["--keep-quantile", "1", "--defense", "repair"], "must be in [0, 1)"),
    (["--keep-quantile", "0.9", "--defense", "rvpt"], "has no gate"),
    (["--keep-weight", "-1", "--defense", "repair"], "must be 0 or more"),
    (["--keep-weight", "0.25", "--defense", "cbpt"], "has no gate"),
    (["--keep-from", "flagged", "--defense", "rvpt"], "has no gate"),
    (["--keep-cap", "1.5", "--defense", "repair"], "--keep-cap must be in [0, 1]"),
    (["--keep-cap", "0.5", "--defense", "rvpt"], "has no gate"),
    (["--device", "tpu9"], "--device tpu9 is not a device"),
    (["--device", "meta"], "only cpu, cuda"),
])
def test_bad_flags_are_one_line_before_any_work(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(tune, "prepare", lambda *a, **k: pytest.fail("work started before the flags were checked"))
    code, err = cli_error(capsys, [*TINY, "--out", str(tmp_path / "out"), *args])
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_bad_out_is_refused_before_any_work_and_names_the_users_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tune, "prepare", lambda *a, **k: pytest.fail("work started before --out was checked"))
    (tmp_path / "plain_file").write_text("x")
    for out, message in ((tmp_path / "plain_file" / "run", "is a file, not a folder"),
                         (Path("/proc/clip-purify-run"), "/proc is not a writable folder")):
        code, err = cli_error(capsys, [*TINY, "--out", str(out)])
        assert code == 2 and len(err) == 1 and str(out) in err[0] and message in err[0], err
        assert f"/.{out.name}." not in err[0]  # never the hidden temp name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain_file"]


def test_a_late_write_failure_names_the_users_path_not_the_temp_dir():
    from engine.io import atomic_dir, atomic_path
    with pytest.raises(UserError, match=r"^cannot write /proc/clip-purify-x: ") as e:
        with atomic_dir("/proc/clip-purify-x"):
            pass
    assert "/proc/.clip-purify-x." not in str(e.value)
    with pytest.raises(UserError, match=r"^cannot write /proc/clip-purify-y.json: "):
        with atomic_path("/proc/clip-purify-y.json"):
            pass


def test_eval_limit_on_class_sorted_data_keeps_other_classes(tiny_folder, tmp_path):
    """--eval-limit 4 on folder data (read class by class, 'bag' first) used to keep only target images:
    'ASR is undefined'. Now a class-balanced subset: it runs."""
    res = tune.main(tiny(tiny_folder, tmp_path / "run", "--eval-limit", "4"))
    assert res["test_images"] == 4 and 0 <= res["before"]["asr"] <= 100


def test_one_class_data_set_is_a_clear_error(tmp_path, tiny_folder):
    import shutil
    one = tmp_path / "one"
    for split in ("train", "test"):
        shutil.copytree(tiny_folder / split / "bag", one / split / "bag")
    with pytest.raises(UserError, match=r"single class \['bag'\].*at least two"):
        tune.main(tiny(one, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_undefined_asr_names_the_target_class(tiny_folder):
    """Any test set without a non-target image (here: a subset of bags) says so with the class name."""
    from engine.data import load_dataset
    from engine.evaluate import evaluate_attack
    from engine.models import load_model
    from engine.triggers import make_trigger
    test = load_dataset(f"folder:{tiny_folder}", "test", 32)
    bags = test.subset((test.labels == 0).nonzero().flatten())
    clip = load_model("lab-vit", checkpoint=bundled_checkpoint("badnet"))
    with pytest.raises(UserError, match=r"ASR is undefined: all \d+ test images are of the target class 'bag'"):
        evaluate_attack(clip, bags, make_trigger("badnet", 32), 0)


def test_empty_class_folder_stops_the_run_naming_the_class(tmp_path, tiny_folder):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(tiny_folder, root)
    for f in (root / "train" / "sneaker").iterdir():
        f.unlink()
    with pytest.raises(UserError, match=r"'sneaker' has no training images"):
        tune.main(tiny(root, tmp_path / "run"))


def test_lab_model_refuses_class_names_it_cannot_read(tmp_path, tiny_folder):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(tiny_folder, root)
    for split in ("train", "test"):
        (root / split / "trouser").rename(root / split / "kitten")
    with pytest.raises(UserError, match=r"does not know 'kitten'"):
        tune.main(tiny(root, tmp_path / "run"))


def test_diverged_tuning_warns(tiny_folder, tmp_path, capsys):
    """A learning rate that wrecks the prompts without a NaN loss: CA on the shots falls far below
    zero-shot. The run still finishes (exit 0), with a warning on stderr and in results.json."""
    res = tune.main(tiny(tiny_folder, tmp_path / "bad", "--lr", "1e4", "--shots", "4", "--epochs", "3"))
    err = capsys.readouterr().err
    assert res["shots_ca"]["after"] < res["shots_ca"]["before"] - tune.SHOTS_CA_DROP_WARN
    assert "warning: CA on the tuning images fell" in err and "--lr" in err
    assert json.loads((tmp_path / "bad" / "results.json").read_text())["warnings"] == res["warnings"] != []
    res = tune.main(tiny(tiny_folder, tmp_path / "good", "--lr", "1e-3", "--shots", "4", "--epochs", "3"))
    assert res["warnings"] == [] and "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_every_run_file_follows_the_umask(tiny_folder, tmp_path, umask):
    """prompts.safetensors used to be 0600 (safetensors' own mode) beside a 0644 results.json."""
    old = os.umask(umask)
    try:
        tune.main(tiny(tiny_folder, tmp_path / "run"))
    finally:
        os.umask(old)
    out = tmp_path / "run"
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == {"prompts.safetensors": 0o666 & ~umask, "results.json": 0o666 & ~umask}
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_tuning_a_few_epochs_is_deterministic(tiny_folder, tmp_path):
    """Two runs with the same flags and seed, three epochs of mini-batches (2 steps each), augmentation
    on: bit-identical prompts, losses and numbers. A different seed gives different prompts."""
    runs_ = [tune.main(tiny(tiny_folder, tmp_path / name, "--epochs", "3", "--shots", "4", "--batch", "8",
                            "--seed", seed))
             for name, seed in (("a", "3"), ("b", "3"), ("c", "4"))]
    prompts = [runs.load_prompts(tmp_path / name / "prompts.safetensors")[0] for name in "abc"]
    assert len(runs_[0]["loss_history"]) == 3
    assert torch.equal(prompts[0], prompts[1]) and not torch.equal(prompts[0], prompts[2])
    for key in ("loss_history", "before", "after", "shots_ca"):
        assert runs_[0][key] == runs_[1][key]


def test_gate_flags_reach_the_repair_config_and_unset_ones_keep_its_defaults():
    from engine.defenses.repair import RepairConfig
    cfg = tune.defense_config(tune.parse_args(["--defense", "repair", "--keep-weight", "0.5"]))
    assert cfg.keep_weight == 0.5 and cfg.keep_quantile == RepairConfig().keep_quantile
    cfg = tune.defense_config(tune.parse_args(["--defense", "repair", "--keep-quantile", "0.9"]))
    assert cfg.keep_quantile == 0.9 and cfg.keep_weight == RepairConfig().keep_weight
    cfg = tune.defense_config(tune.parse_args(["--defense", "repair", "--keep-from", "flagged"]))
    assert cfg.keep_from == "flagged" and cfg.keep_weight == RepairConfig().keep_weight
    cfg = tune.defense_config(tune.parse_args(["--defense", "repair", "--keep-cap", "0.25"]))
    assert cfg.keep_cap == 0.25 != RepairConfig().keep_cap and cfg.keep_from == RepairConfig().keep_from
    cfg = tune.defense_config(tune.parse_args(["--defense", "repair", "--keep-cap", "0"]))
    assert cfg.keep_cap == 0.0   # off
