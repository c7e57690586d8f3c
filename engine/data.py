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

# Zero-shot classification prompts; the first is the one docs/ALGORITHMS.md ("Metrics") names.
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

    def __len__(self):
        return len(self.labels)

    def subset(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageSet(self.images[idx], self.labels[idx], self.classes)


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
    images, _ = render(grey, seed, LAB_SIZE)  # the colour attributes only matter to engine.lab's captions
    if size != LAB_SIZE:
        images = resize(images, size)
    return ImageSet(images, torch.from_numpy(labels), list(FASHION_CLASSES))


# ---------------------------------------------------------------- user data

def resize(images, size):
    """Bilinear resize (n, 3, h, w) -> (n, 3, size, size); CLIP-style centre crop happens at load."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp_(0, 1)


# PIL modes with more than 8 bits per sample: convert("RGB") would clip them (a 16-bit grey PNG read
# as almost white), so they are scaled to [0, 1] by their own range instead.
_INT16_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def _high_bit_grey(im):
    """A 16-bit / 32-bit integer or float grey PIL image -> mode 'F' with values in [0, 1]."""
    arr = np.asarray(im).astype(np.float64)
    if im.mode in _INT16_MODES:
        top = 65535.0
    elif im.mode == "I":  # 32-bit ints: PNG/TIFF 16-bit grey in older Pillow, rarely wider
        top = 65535.0 if arr.size == 0 or arr.max() <= 65535 else float(2 ** 31 - 1)
    else:  # "F": floats, taken as [0, 1] unless they are plainly 8- or 16-bit values
        peak = arr.max() if arr.size else 0.0
        top = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
    from PIL import Image
    return Image.fromarray(np.clip(arr / top, 0.0, 1.0).astype(np.float32), mode="F")


def _fit(im, size):
    """Shorter side resized to `size` (bicubic), centre-cropped to size x size."""
    from PIL import Image
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def image_array(im, size):
    """An open PIL image -> (size, size, 3) float32 in [0, 1]. 8-bit modes (L, P, RGB, RGBA, CMYK, ...) go
    through convert("RGB"); 16-bit and float modes are scaled by their own range first."""
    if im.mode in _INT16_MODES or im.mode in ("I", "F"):
        grey = np.asarray(_fit(_high_bit_grey(im), size), dtype=np.float32).clip(0.0, 1.0)  # bicubic overshoot
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(_fit(im.convert("RGB"), size), dtype=np.float32) / 255.0


def load_image(path, size):
    """One image file -> (3, size, size) in [0, 1]: shorter side resized to `size`, centre-cropped."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            arr = image_array(im, size)
    except FileNotFoundError as e:
        raise UserError(f"image file not found: {path}") from e
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {path}: corrupt or not an image ({e})") from e
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".gif", ".tif", ".tiff"}


def _folder_items(root):
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [(f, c) for c, name in enumerate(classes)
             for f in sorted((root / name).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    return items, classes


def _display(classes):
    return [c.replace("_", " ") for c in classes]


def _stack(items, classes, size, where):
    if not items:
        raise UserError(f"{where} has no images")
    images = torch.stack([load_image(p, size) for p, _ in items])
    labels = torch.tensor([c for _, c in items], dtype=torch.long)
    return ImageSet(images, labels, _display(classes))


def _every_class_present(items, classes, where):
    """The train split must hold every class: the few shots are drawn from it, and a class without them
    would be tuned on nothing (its name still in the classifier)."""
    counts = np.bincount([c for _, c in items], minlength=len(classes))
    empty = [name for name, n in zip(_display(classes), counts) if n == 0]
    if empty:
        raise UserError(f"{where}: class{'es' if len(empty) > 1 else ''} {', '.join(repr(c) for c in empty)} "
                        f"{'have' if len(empty) > 1 else 'has'} no training images")


def _holdout(n, split, seed, test_fraction=0.2):
    """A seeded train/test split for sources without one; the two never overlap."""
    perm = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * test_fraction))
    return sorted(perm[:cut] if split == "test" else perm[cut:])


def load_folder(root, split, size, seed=0):
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist")
    has = {s: (root / s).is_dir() for s in ("train", "test")}
    if has["train"] != has["test"]:
        there, missing = ("train", "test") if has["train"] else ("test", "train")
        raise UserError(f"image folder {root} has {there}/ but no {missing}/: give both ({root}/train/CLASS and "
                        f"{root}/test/CLASS), or put the class folders directly in {root} for a seeded 80/20 split")
    if has["train"]:
        items, classes = _folder_items(root / split)
        _, other = _folder_items(root / ("test" if split == "train" else "train"))
        if other != classes:
            raise UserError(f"{root}: train and test class folders differ: {classes} vs {other}")
        where = root / split
    else:
        items, classes = _folder_items(root)
        empty = [c for i, c in enumerate(classes) if not any(label == i for _, label in items)]
        if empty:
            raise UserError(f"image folder {root}: class folder{'s' if len(empty) > 1 else ''} "
                            f"{', '.join(str(root / c) for c in empty)} ha{'ve' if len(empty) > 1 else 's'} no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        items = [items[i] for i in _holdout(len(items), split, seed)]
        where = f"the {split} part (seeded 80/20 split) of {root}"
    if not classes:
        raise UserError(f"image folder {root} has no class sub-folders")
    if split == "train":
        _every_class_present(items, classes, where)
    return _stack(items, classes, size, where)


CSV_HEADER = ["path", "label", "split"]
SPLITS = ("train", "test")
# Names a header row may use for its columns: a first row made of them is a header, never data.
_HEADER_WORDS = {"path", "file", "filename", "filepath", "file_path", "image", "img", "image_path", "label",
                 "class", "classname", "class_name", "category", "target", "split", "set", "subset", "fold"}


def _csv_rows(path):
    """[(line number, stripped cells)] of the non-blank, non-comment rows."""
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            rows = []
            for r in reader:
                cells = [c.strip() for c in r]
                if any(cells) and not cells[0].startswith("#"):
                    rows.append((reader.line_num, cells))
            return rows
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read CSV {path}: {e}") from e


def load_csv(path, split, size, seed=0):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"CSV file {path} does not exist")
    rows = _csv_rows(path)
    if rows:
        line, first = rows[0]
        names = [c.lower() for c in first]
        if names in (CSV_HEADER[:2], CSV_HEADER):
            rows = rows[1:]
            width = len(names)
        elif all(n in _HEADER_WORDS for n in names) and not (path.parent / first[0]).is_file():
            raise UserError(f"{path} line {line}: header '{','.join(first)}' is not path,label or "
                            f"path,label,split (columns are read in that order; rename the header)")
        else:
            width = len(first)
    if not rows:
        raise UserError(f"{path} has no data rows (path,label[,split])")
    if width not in (2, 3):
        raise UserError(f"{path} line {rows[0][0]}: each row needs path,label[,split]; got {len(rows[0][1])} "
                        f"columns: {','.join(rows[0][1])}")
    for line, r in rows:
        if len(r) != width:
            raise UserError(f"{path} line {line}: {len(r)} columns ({','.join(r)}), but the file's rows have "
                            f"{width} ({','.join(CSV_HEADER[:width])}): every row needs the same columns")
        if not r[0] or not r[1]:
            raise UserError(f"{path} line {line}: empty {'path' if not r[0] else 'label'}")
        if width == 3:
            r[2] = r[2].lower()
            if r[2] not in SPLITS:
                raise UserError(f"{path} line {line}: split '{r[2]}' is neither train nor test")
    classes = sorted({r[1] for _, r in rows})
    if width == 3:
        picked = [r for _, r in rows if r[2] == split]
        if not picked:
            counts = ", ".join(f"{s} {sum(r[2] == s for _, r in rows)}" for s in SPLITS)
            raise UserError(f"{path}: the {split} split is empty (rows per split: {counts})")
        where = f"{path} (split {split})"
    else:
        picked = [rows[i][1] for i in _holdout(len(rows), split, seed)]
        where = f"the {split} part (seeded 80/20 split) of {path}"
    items = [(path.parent / r[0], classes.index(r[1])) for r in picked]
    if split == "train":
        _every_class_present(items, classes, where)
    return _stack(items, classes, size, where)


def balanced_subset(labels, limit, seed=0):
    """`limit` indices spread evenly over the classes (each class's images in a seeded random order,
    taken round-robin), in ascending order: a limit on class-sorted data still sees every class."""
    labels = np.asarray(labels)
    if limit >= len(labels):
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    queues = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
    picked, depth = [], 0
    while len(picked) < limit:
        for q in queues:
            if depth < len(q) and len(picked) < limit:
                picked.append(q[depth])
        depth += 1
    return sorted(picked)


def load_dataset(spec, split, size, data_dir=None, limit=None):
    """`fashion-mnist`, `folder:PATH` or `csv:PATH` -> ImageSet of the split at `size` px. `limit`: at most
    that many images: Fashion-MNIST's first N (its files are in mixed class order), a class-balanced
    seeded subset of folder and CSV data (read in class order)."""
    if limit is not None and limit < 1:
        raise UserError(f"an image limit must be at least 1, not {limit}")
    if spec == "fashion-mnist":
        return load_fashion_mnist(split, data_dir, size=size, limit=limit)
    kind, _, path = spec.partition(":")
    if kind == "folder" and path:
        data = load_folder(path, split, size)
    elif kind == "csv" and path:
        data = load_csv(path, split, size)
    else:
        raise UserError(f"unknown data set '{spec}': use fashion-mnist, folder:PATH or csv:PATH")
    return data if limit is None else data.subset(balanced_subset(data.labels, limit))


def few_shot_indices(labels, shots, seed, classes=None):
    """`shots` indices per class, drawn with `seed`; an error if a class has fewer. With `classes` (the
    data set's class names) every one of them must have `shots` images, and errors name the class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for c in (np.unique(labels) if classes is None else range(len(classes))):
        idx = np.flatnonzero(labels == c)
        if len(idx) < shots:
            name = c if classes is None else f"'{classes[c]}'"
            raise UserError(f"class {name} has only {len(idx)} training images, fewer than --shots {shots}")
        picked.extend(rng.choice(idx, shots, replace=False).tolist())
    return sorted(picked)
