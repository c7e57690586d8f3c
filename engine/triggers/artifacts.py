"""Stored trigger artifacts (optimised patches, the SSBA encoder): small fp16 safetensors in
checkpoints/lab/triggers/, built by `python -m engine.lab trigger` and read by the trigger classes.
Each file's metadata names the command, seed and image size it was built for."""
import json

from ..errors import UserError
from ..io import atomic_path
from ..models import LAB_CHECKPOINTS

ARTIFACT_DIR = LAB_CHECKPOINTS / "triggers"  # read at call time, so tests can point it elsewhere


def artifact_path(name, seed=0):
    return ARTIFACT_DIR / (f"{name}.safetensors" if seed == 0 else f"{name}-seed{seed}.safetensors")


def build_command(name, seed=0):
    return f"python -m engine.lab trigger --attack {name}" + (f" --trigger-seed {seed}" if seed else "")


def save_artifact(path, tensors, metadata):
    """fp16 tensors + string metadata (safetensors keeps str -> str), written atomically."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().half().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})


def load_artifact(name, size, seed=0):
    """(float32 tensors, metadata) of attack `name`'s artifact for `size` px images and `seed`."""
    from safetensors import safe_open
    path, how = artifact_path(name, seed), build_command(name, seed)
    if not path.is_file():
        raise UserError(f"attack '{name}' needs its trigger artifact {path}, which does not exist; build it with: {how}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise UserError(f"cannot read trigger artifact {path} ({type(e).__name__}: {e}); rebuild it with: {how}") from e
    if metadata.get("image_size") != size:
        raise UserError(f"trigger artifact {path} was built for {metadata.get('image_size')} px images, not {size} px; "
                        f"`{how}` builds it for the lab model only, so use another attack for this model")
    if metadata.get("seed") != seed:
        raise UserError(f"trigger artifact {path} was built with seed {metadata.get('seed')}, not {seed}; rebuild it with: {how}")
    return tensors, metadata
