"""Backdoor triggers. Each acts on [0, 1] images (n, 3, S, S) before normalisation and is fully
determined by (image size, seed)."""
from ..errors import UserError
from .badnet import BadNet
from .blended import Blended
from .sig import SIG
from .wanet import WaNet

TRIGGERS = {"badnet": BadNet, "blended": Blended, "wanet": WaNet, "sig": SIG}


def make_trigger(name, size, seed=0):
    if name not in TRIGGERS:
        raise UserError(f"unknown attack '{name}'; known: {sorted(TRIGGERS)}")
    return TRIGGERS[name](size, seed)
