"""Atomic file and directory writes: a failed run never leaves a half-written result behind."""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def check_creatable(path, flag="output"):
    """UserError unless `path` could be created: its nearest existing ancestor must be a folder this
    process can create entries in (tried with an empty probe folder, removed at once: root passes
    os.access checks on read-only file systems such as /proc). CLIs call it before any work."""
    path = Path(path)
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create {flag} {path}: {parent} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=parent))
    except OSError as e:
        raise UserError(f"cannot create {flag} {path}: {parent} is not a writable folder "
                        f"({e.strerror or e})") from e


def _cannot_write(path, e):
    """An OSError about one of our hidden temp names, restated about the user's own path."""
    return UserError(f"cannot write {path}: {e.strerror or e}")


@contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds. The
    temporary file gets the permissions of any new file (0666 minus the umask), as `path` will keep."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _cannot_write(path, e) from e
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # writers that replace the file (safetensors) reset the mode
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise _cannot_write(path, e) from e
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_png(path, image, scale=None):
    """Write a (3, H, W) tensor in [0, 1] as a PNG, `scale`x nearest-neighbour enlarged (default: to about
    128 pixels high, so a 32-pixel trigger is visible), atomically."""
    from PIL import Image
    scale = scale or max(1, 128 // image.shape[-2])
    arr = (image.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    im = Image.fromarray(arr)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def occupied(path):
    """True when `path` exists and is not an empty directory: atomic_dir will not replace it. CLIs check
    it before any work, so a long run does not fail at the very end."""
    path = Path(path)
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


@contextmanager
def atomic_dir(path):
    """Yield a temporary directory; it becomes `path` (which must not exist) only on success."""
    path = Path(path)
    if occupied(path):
        raise FileExistsError(f"output directory {path} already exists and is not empty")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise _cannot_write(path, e) from e
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a run directory should read like any other
    try:
        yield tmp
        try:
            if path.exists():
                path.rmdir()
            os.replace(tmp, path)
        except OSError as e:
            raise _cannot_write(path, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
