"""checkpoints/lab/manifest.json, the record of the lab CLIPs: per model its checkpoint file, the command
and seeds that built it and its measured no-defense CA/ASR (written by `python -m engine.lab`). Every
reader and writer goes through here.

    read()               -> the whole manifest {"model", "data", "models": {name: entry}}
    entry(name)          -> one model's entry, or None
    record(name, entry)  -> add or replace one model's entry (atomic write)
    checkpoint(entry)    -> the entry's checkpoint path; bundled(entry): whether that file ships

The manifest also keeps models left out of the bundle (their file is absent): bundled() tells them apart."""
import json

from .errors import UserError
from .io import write_json
from .models import LAB_CHECKPOINTS

PATH = LAB_CHECKPOINTS / "manifest.json"  # read at call time, so tests can point it elsewhere


def _empty():
    return {"model": "lab-vit", "data": "Fashion-MNIST, colour-rendered by engine.data.render", "models": {}}


def read():
    """The whole manifest; an empty one (no models) when the file does not exist yet."""
    if not PATH.is_file():
        return _empty()
    try:
        manifest = json.loads(PATH.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the lab manifest {PATH} ({type(e).__name__}: {e}); restore it with "
                        f"git checkout -- {PATH.name} or rebuild the models with python -m engine.lab") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("models"), dict):
        raise UserError(f"the lab manifest {PATH} has no 'models' object; restore it with git checkout")
    return manifest


def models():
    """{name: entry} of every model the manifest lists, in its order."""
    return read()["models"]


def entry(name):
    """Model `name`'s entry (file, command, seeds, measured ca/asr/pa, ...), or None if it is not listed."""
    return models().get(name)


def record(name, entry):
    """Add or replace model `name`'s entry, keeping every other one; written atomically."""
    manifest = read()
    manifest["models"][name] = entry
    write_json(PATH, manifest)


def checkpoint(entry):
    """Path of an entry's checkpoint file (next to the manifest)."""
    return PATH.parent / entry["file"]


def bundled(entry):
    """Whether an entry's checkpoint is present (ships with the repository or was rebuilt)."""
    return checkpoint(entry).is_file()
