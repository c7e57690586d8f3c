"""Backdoor triggers. Each acts on [0, 1] images (n, 3, S, S) before normalisation and is fully
determined by (image size, seed); the optimised ones (BUILT) also read an artifact that
`python -m engine.lab trigger` builds into checkpoints/lab/triggers/ (see artifacts.py)."""
from ..errors import UserError
from .artifacts import artifact_path, save_artifact
from .badclip import BadCLIP
from .badnet import BadNet
from .blended import Blended
from .sig import SIG
from .ssba import SSBA
from .trojvqa import TrojVQA
from .wanet import WaNet

TRIGGERS = {"badnet": BadNet, "blended": Blended, "wanet": WaNet, "sig": SIG,
            "ssba": SSBA, "trojvqa": TrojVQA, "badclip": BadCLIP}
# attacks whose trigger is built (trained or optimised) and stored: name -> class with build(...)
BUILT = {name: cls for name, cls in TRIGGERS.items() if hasattr(cls, "build")}


def make_trigger(name, size, seed=0):
    if name not in TRIGGERS:
        raise UserError(f"unknown attack '{name}'; known: {sorted(TRIGGERS)}")
    return TRIGGERS[name](size, seed)


def build_artifact(name, clip, data, target, seed, command, steps=None, lr=None, batch=None, progress=True):
    """Build attack `name`'s trigger for `clip` (the clean model) from the training ImageSet `data`
    and store it where make_trigger(name, clip.image_size, seed) looks; returns (path, build info)."""
    tensors, info = BUILT[name].build(clip, data, target, seed, steps, lr, batch, progress)
    path = artifact_path(name, seed)
    save_artifact(path, tensors, {"attack": name, "command": command, "seed": seed,
                                  "image_size": clip.image_size, "model": clip.name, **info})
    return path, info
