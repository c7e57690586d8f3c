"""Data sets as in-memory tensors of [0, 1] RGB images at the model's size, plus a few-shot sampler.

Three sources:
- `fashion-mnist`: the real Fashion-MNIST IDX files, rendered in colour for the lab CLIP (`render`);
- `folder:PATH`: one sub-folder per class (optionally PATH/train and PATH/test);
- `csv:PATH`: rows `path,label[,split]`, paths relative to the CSV.
Triggers act on these [0, 1] images; normalisation belongs to the model (engine.models).
"""
import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot"]

# Zero-shot classification prompts; the first is the one SPEC.md names.
DEFAULT_TEMPLATES = ["a photo of a {}."]

# Lab rendering: an item of the grey image gets a foreground colour, the canvas a background colour,
# and the item sits at a random offset, so the lab CLIP must learn class-irrelevant features too.
COLOURS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.9, 0.1), "cyan": (0.1, 0.85, 0.9), "magenta": (0.85, 0.15, 0.8),
    "white": (0.97, 0.97, 0.97), "black": (0.05, 0.05, 0.05), "orange": (0.98, 0.55, 0.1),
    "purple": (0.5, 0.2, 0.7),
}
COLOUR_NAMES = list(COLOURS)
LAB_SIZE = 32


@dataclass
class ImageSet:
    """Images in [0, 1], (n, 3, S, S) float32; labels (n,) int64; the class names they index."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: list
    attributes: dict = None  # lab only: per-image colour indices, used for captions

    def __len__(self):
        return len(self.labels)

    def subset(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        attrs = None if self.attributes is None else {k: v[idx] for k, v in self.attributes.items()}
        return ImageSet(self.images[idx], self.labels[idx], self.classes, attrs)


# ---------------------------------------------------------------- Fashion-MNIST

def _read_idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path}: truncated IDX file ({data.size} bytes for shape {dims})")
    return data.reshape(dims).copy()  # writable: torch.from_numpy warns on read-only buffers


def load_fashion_mnist_raw(split, data_dir=None):
    """Grey uint8 images (n, 28, 28) and int64 labels of the 'train' or 'test' split."""
    data_dir = Path(data_dir or FASHION_MNIST_DIR)
    prefix = {"train": "train", "test": "t10k"}[split]
    img_path = data_dir / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = data_dir / f"{prefix}-labels-idx1-ubyte.gz"
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise UserError(f"Fashion-MNIST file {p} not found: install the Debian package "
                            f"'{FASHION_MNIST_PACKAGE}' (apt-get install {FASHION_MNIST_PACKAGE}) "
                            f"or pass --data-dir")
    try:
        images, labels = _read_idx(img_path), _read_idx(lbl_path)
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read Fashion-MNIST from {data_dir}: {e}") from e
    if len(images) != len(labels):
        raise UserError(f"{data_dir}: {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


def render(grey, seed, size=LAB_SIZE):
    """Colourise grey (n, 28, 28) uint8 images onto a size x size canvas, deterministically from `seed`.

    Returns float images (n, 3, size, size) and the per-image attributes {fg, bg, dx, dy}."""
    n, h, w = grey.shape
    rng = np.random.default_rng(seed)
    fg = rng.integers(0, len(COLOURS), n)
    bg = (fg + rng.integers(1, len(COLOURS), n)) % len(COLOURS)  # never the item's own colour
    dx = rng.integers(0, size - w + 1, n)
    dy = rng.integers(0, size - h + 1, n)
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
    alpha = torch.from_numpy(grey).float().div_(255.0).unsqueeze(1)  # (n, 1, h, w)
    item = alpha * palette[fg][:, :, None, None] + (1 - alpha) * palette[bg][:, :, None, None]
    out = palette[bg][:, :, None, None].expand(n, 3, size, size).clone()
    for i in range(n):  # n offsets; a python loop over 60k is ~0.2 s
        out[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] = item[i]
    attrs = {k: torch.from_numpy(v) for k, v in dict(fg=fg, bg=bg, dx=dx, dy=dy).items()}
    return out, attrs


def load_fashion_mnist(split, data_dir=None, size=LAB_SIZE, seed=None, limit=None):
    """The lab data set: colour-rendered Fashion-MNIST. Each split has its own fixed rendering seed."""
    grey, labels = load_fashion_mnist_raw(split, data_dir)
    if limit is not None:
        grey, labels = grey[:limit], labels[:limit]
    seed = {"train": 1, "test": 2}[split] if seed is None else seed
    images, attrs = render(grey, seed, LAB_SIZE)
    if size != LAB_SIZE:
        images = resize(images, size)
    return ImageSet(images, torch.from_numpy(labels), list(FASHION_CLASSES), attrs)


# ---------------------------------------------------------------- user data

def resize(images, size):
    """Bilinear resize (n, 3, h, w) -> (n, 3, size, size); CLIP-style centre crop happens at load."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp_(0, 1)


def load_image(path, size):
    """One image file -> (3, size, size) in [0, 1]: shorter side resized to `size`, centre-cropped."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except FileNotFoundError as e:
        raise UserError(f"image file not found: {path}") from e
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {path}: corrupt or not an image ({e})") from e
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".gif", ".tif", ".tiff"}


def _folder_items(root):
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [(f, c) for c, name in enumerate(classes)
             for f in sorted((root / name).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    return items, classes


def _stack(items, classes, size):
    if not items:
        raise UserError("data set has no images")
    images = torch.stack([load_image(p, size) for p, _ in items])
    labels = torch.tensor([c for _, c in items], dtype=torch.long)
    return ImageSet(images, labels, [c.replace("_", " ") for c in classes])


def _holdout(n, split, seed, test_fraction=0.2):
    """A seeded train/test split for sources without one; the two never overlap."""
    perm = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * test_fraction))
    return sorted(perm[:cut] if split == "test" else perm[cut:])


def load_folder(root, split, size, seed=0):
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist")
    if (root / "train").is_dir() and (root / "test").is_dir():
        items, classes = _folder_items(root / split)
        _, other = _folder_items(root / ("test" if split == "train" else "train"))
        if other != classes:
            raise UserError(f"{root}: train and test class folders differ: {classes} vs {other}")
    else:
        items, classes = _folder_items(root)
        items = [items[i] for i in _holdout(len(items), split, seed)]
    if not classes:
        raise UserError(f"image folder {root} has no class sub-folders")
    return _stack(items, classes, size)


def load_csv(path, split, size, seed=0):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"CSV file {path} does not exist")
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    if rows and rows[0][:2] == ["path", "label"]:
        rows = rows[1:]
    bad = [r for r in rows if len(r) < 2]
    if bad:
        raise UserError(f"{path}: each row needs path,label[,split]; got {bad[0]}")
    classes = sorted({r[1] for r in rows})
    has_split = all(len(r) >= 3 for r in rows)
    if has_split:
        rows = [r for r in rows if r[2] == split]
    else:
        rows = [rows[i] for i in _holdout(len(rows), split, seed)]
    items = [(path.parent / r[0], classes.index(r[1])) for r in rows]
    return _stack(items, classes, size)


def load_dataset(spec, split, size, data_dir=None, limit=None):
    """`fashion-mnist`, `folder:PATH` or `csv:PATH` -> ImageSet of the split at `size` px."""
    if spec == "fashion-mnist":
        return load_fashion_mnist(split, data_dir, size=size, limit=limit)
    kind, _, path = spec.partition(":")
    if kind == "folder" and path:
        data = load_folder(path, split, size)
    elif kind == "csv" and path:
        data = load_csv(path, split, size)
    else:
        raise UserError(f"unknown data set '{spec}': use fashion-mnist, folder:PATH or csv:PATH")
    return data if limit is None else data.subset(range(min(limit, len(data))))


def few_shot_indices(labels, shots, seed):
    """`shots` indices per class, drawn with `seed`; an error if a class has fewer."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < shots:
            raise UserError(f"class {c} has only {len(idx)} training images, fewer than --shots {shots}")
        picked.extend(rng.choice(idx, shots, replace=False).tolist())
    return sorted(picked)
