"""The library API: engine.purify's registry and configs, engine.job; the CLI is a thin layer over them."""
import json

import pytest

from engine import purify, tune
from engine.defenses import rvpt
from engine.job import JobConfig, defend, prepare


def test_configs_hold_each_defenses_defaults_and_take_overrides():
    lab = purify.config("rvpt", "lab-vit")
    assert (lab.start, lab.tokens, lab.lr, lab.epochs) == tuple(rvpt.LAB_DEFAULTS[k] for k in ("start", "tokens", "lr", "epochs"))
    paper = purify.config("rvpt", "ViT-B-32")
    assert (paper.start, paper.tokens) == (3, 50)
    assert purify.config("vpt", "lab-vit", alpha=5.0).alpha == 0.0          # vpt is rvpt without repelling
    assert purify.config("rvpt", "lab-vit", epochs=None, lr=0.5).epochs == lab.epochs   # None keeps the default
    assert purify.config("cbpt", epochs=7).epochs == 7 and purify.config("coop").invert is False
    both = purify.config("rvpt+cbpt", "lab-vit", epochs=3, seed=4)
    assert both.rvpt.epochs == 3 and both.cbpt.epochs == purify.config("cbpt").epochs and both.cbpt.seed == 4
    assert purify.config("repair", batch=8).batch == 8


def test_config_and_tune_reject_what_they_do_not_know():
    with pytest.raises(TypeError, match="inv_steps"):
        purify.config("cbpt", inv_steps=3)
    with pytest.raises(ValueError, match="unknown defense 'nope'"):
        purify.config("nope")


def test_the_cli_is_a_thin_layer_over_the_library(tmp_path):
    """engine.tune's numbers equal engine.job.defend's for the same settings (linear probe: fast, deterministic)."""
    out = tmp_path / "run"
    tune.main(["--defense", "linear-probe", "--epochs", "3", "--shots", "2", "--eval-limit", "200", "--quiet",
               "--out", str(out)])
    cli = json.loads((out / "results.json").read_text())
    job = prepare(JobConfig(shots=2, eval_limit=200), log=lambda *a: None)
    tuned = defend(job, "linear-probe", purify.config("linear-probe", job.model, epochs=3))
    assert tuned.after == pytest.approx(cli["after"])
    assert tuned.config == cli["config"] and tuned.tuned_params == cli["tuned_params"]
