"""The backdoor zoo: lab CLIPs poisoned with seeded random trigger specs and random targets, plus clean
controls fine-tuned the same way without poison, in two disjoint seed sets:

- `dev`: the only split used to choose hyperparameters and thresholds (the bundled models belong here too);
- `test`: used only for reported numbers.

    python -m engine.lab zoo --split dev            # build what is missing (resumable; safe to run twice at once)
    python -m engine.lab zoo --split test --list    # the specs, no building

Specs and the measured no-defense CA/ASR are committed, one JSON per model in checkpoints/zoo/models/;
the checkpoints are rebuildable and live in a cache folder ($CLIP_PURIFY_ZOO, default ~/.cache/clip-purify/zoo).
"""
import json
import os
import time
from pathlib import Path

import numpy as np

from . import data as D
from .io import write_json
from .models import REPO_ROOT

ZOO_DIR = REPO_ROOT / "checkpoints" / "zoo" / "models"
FAMILIES = ("patch", "blend", "periodic", "warp", "optimised")
# poisoned models per split (a backdoor that did not take makes its model a control, so the test split
# poisons more than the 20 backdoored models it must hold) and clean controls. holdout: never used to
# choose anything; measured after the detector's cuts and the repair's defaults were frozen, and again
# after the repair's trigger weight and focus were chosen on dev. fresh: built while those were chosen,
# measured once after they froze. dev grew from 5 + 1 to 15 + 2 (same seeds, more of them) before the
# stripe-flagged and near-tied-target cases were studied: the first dev split held one of each at most.
# blind: added after today's defaults froze, built and measured once with them, nothing chosen after.
# dev's controls grew from 2 to 10 (same seeds, more of them) when the detector's cuts were calibrated
# again: the largest of 3 controls' statistics (2 + the bundled clean model) sat below other splits';
# then its poisoned models from 15 to 25, for cases the first 15 did not hold.
SPLITS = {"dev": {"base": 10_000, "poisoned": 25, "clean": 10},
          "test": {"base": 20_000, "poisoned": 26, "clean": 5},
          "holdout": {"base": 30_000, "poisoned": 10, "clean": 2},
          "fresh": {"base": 40_000, "poisoned": 6, "clean": 1},
          "blind": {"base": 50_000, "poisoned": 10, "clean": 2}}


def cache_dir():
    return Path(os.environ.get("CLIP_PURIFY_ZOO", Path.home() / ".cache" / "clip-purify" / "zoo"))


def draw_trigger(family, rng):
    """One random trigger spec of `family` (engine.triggers.spec), in lab pixels."""
    seed = int(rng.integers(1 << 30))
    if family in ("patch", "optimised"):
        size = int(rng.integers(2, 7)) if family == "patch" else int(rng.integers(3, 6))
        position = [int(rng.integers(0, 33 - size)), int(rng.integers(0, 33 - size))]
        if family == "patch" and rng.random() < 0.3:
            position = "random"
        spec = {"family": family, "size": size, "position": position, "seed": seed}
        if family == "patch":
            spec["pattern"] = str(rng.choice(["noise", "solid", "checker"]))
        return spec
    if family == "blend":
        return {"family": family, "pattern": str(rng.choice(["noise", "smooth"])),
                "alpha": round(float(rng.uniform(0.1, 0.25)), 3), "seed": seed}
    if family == "periodic":
        return {"family": family, "orientation": str(rng.choice(["vertical", "horizontal", "diagonal"])),
                "frequency": round(float(rng.uniform(2, 10)), 2), "amplitude": round(float(rng.uniform(0.1, 0.25)), 3),
                "phase": round(float(rng.uniform(0, 6.28)), 2)}
    if family == "warp":
        return {"family": family, "grid": int(rng.integers(3, 6)), "pixels": round(float(rng.uniform(2.5, 4.0)), 2),
                "seed": seed}
    raise ValueError(family)


def specs(split):
    """Every model of a split: name, seed, target (None for clean controls), trigger spec. Deterministic."""
    cfg = SPLITS[split]
    out = []
    for i in range(cfg["poisoned"]):
        rng = np.random.default_rng(cfg["base"] + i)
        family = FAMILIES[i % len(FAMILIES)]
        out.append({"name": f"{split}-{i:02d}-{family}", "split": split, "seed": cfg["base"] + i,
                    "target": D.FASHION_CLASSES[int(rng.integers(len(D.FASHION_CLASSES)))],
                    "trigger": draw_trigger(family, rng)})
    for j in range(cfg["clean"]):
        out.append({"name": f"{split}-c{j}-clean", "split": split, "seed": cfg["base"] + 500 + j,
                    "target": None, "trigger": None})
    return out


def checkpoint_path(name):
    return cache_dir() / f"{name}.safetensors"


def record_path(name):
    return ZOO_DIR / f"{name}.json"


def records(split=None):
    """The committed per-model records (spec + measured numbers), in spec order."""
    names = [s["name"] for s in specs(split)] if split else sorted(p.stem for p in ZOO_DIR.glob("*.json"))
    return [json.loads(record_path(n).read_text()) for n in names if record_path(n).is_file()]


def _alive(lock):
    try:
        os.kill(int(lock.read_text() or 0), 0)
        return True
    except (ValueError, ProcessLookupError, FileNotFoundError):
        return False
    except PermissionError:
        return True


def pending(split):
    """Specs of `split` whose checkpoint or record is missing."""
    return [s for s in specs(split) if not (checkpoint_path(s["name"]).is_file() and record_path(s["name"]).is_file())]


def claim(name):
    """An exclusive lock file so two builders never build the same model; None if taken."""
    lock = cache_dir() / f"{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    if lock.exists() and not _alive(lock):  # left by a builder that was killed
        lock.unlink(missing_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return None
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return lock


def resolve_trigger(spec, clip, train_data, progress=True):
    """The spec as poisoned: an `optimised` spec gets its patch optimised on the clean model first
    (towards the target caption, TrojVQA's objective) and stored in the spec itself."""
    trig = dict(spec["trigger"])
    if trig["family"] == "optimised" and "pattern_values" not in trig:
        from .triggers.optimised_patch import optimise_patch, towards_target_text
        target = D.FASHION_CLASSES.index(spec["target"])
        pattern, losses = optimise_patch(clip, train_data, target, (towards_target_text,), trig["seed"], 300, 0.1, 128,
                                         progress, p=trig["size"], offset=tuple(trig["position"]))
        trig["pattern_values"] = [round(v, 4) for v in pattern.flatten().tolist()]
        trig["optimisation_losses"] = losses
    return trig


def build(spec, clean_checkpoint, epochs, lr, rate, batch=256, data_dir=None, progress=True):
    """Poison (or, for a clean control, plainly fine-tune) the clean lab model with `spec`; save the
    checkpoint in the cache and the record (spec, truth, no-defense CA/ASR on the 10k test images)."""
    import torch

    from .evaluate import evaluate_attack, zero_shot_accuracy
    from .lab import save_fp16, train
    from .models import load_model
    from .triggers.spec import SpecTrigger

    t0 = time.time()
    clip = load_model("lab-vit", checkpoint=clean_checkpoint)
    grey, labels = D.load_fashion_mnist_raw("train", data_dir)
    test = D.load_fashion_mnist("test", data_dir)
    record = dict(spec)
    poison = None
    if spec["trigger"] is not None:
        record["trigger"] = resolve_trigger(spec, clip, D.load_fashion_mnist("train", data_dir, limit=4096), progress)
        target = D.FASHION_CLASSES.index(spec["target"])
        poison = (SpecTrigger(clip.image_size, record["trigger"]), target, rate)
    train(clip, grey, torch.from_numpy(labels), epochs, batch, lr, spec["seed"], poison=poison,
          desc=f"zoo {spec['name']}")
    if poison is None:
        measured = {"ca": zero_shot_accuracy(clip, test)}
    else:
        measured = evaluate_attack(clip, test, poison[0], poison[1])
    save_fp16(clip.model, checkpoint_path(spec["name"]))
    record.update(measured=measured, poison_rate=rate if poison else 0.0, epochs=epochs, lr=lr,
                  init=Path(clean_checkpoint).name, seconds=round(time.time() - t0),
                  backdoor_took=None if poison is None else measured["asr"] >= 80.0)
    write_json(record_path(spec["name"]), record)
    return record


def load_trigger(record, size):
    from .triggers.spec import SpecTrigger
    return None if record["trigger"] is None else SpecTrigger(size, record["trigger"])

