import gzip
import struct

import numpy as np
import pytest
import torch

from engine import data as D
from engine.errors import UserError


def write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 8, arr.ndim) + b"".join(struct.pack(">I", s) for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


@pytest.fixture
def tiny_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_idx_reader_round_trip(tiny_fmnist):
    images, labels = D.load_fashion_mnist_raw("train", tiny_fmnist)
    assert images.shape == (40, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == (np.arange(40) % 10).tolist()


def test_missing_data_names_the_package(tmp_path):
    with pytest.raises(UserError, match="dataset-fashion-mnist"):
        D.load_fashion_mnist_raw("train", tmp_path)


def test_truncated_idx_is_an_error(tiny_fmnist):
    p = tiny_fmnist / "train-images-idx3-ubyte.gz"
    raw = gzip.open(p).read()
    with gzip.open(p, "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(UserError, match="truncated"):
        D.load_fashion_mnist_raw("train", tiny_fmnist)


def test_render_is_deterministic_and_in_range(tiny_fmnist):
    grey, _ = D.load_fashion_mnist_raw("train", tiny_fmnist)
    a, attrs = D.render(grey, seed=3)
    b, _ = D.render(grey, seed=3)
    c, _ = D.render(grey, seed=4)
    assert a.shape == (40, 3, D.LAB_SIZE, D.LAB_SIZE)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert (attrs["fg"] != attrs["bg"]).all()
    # a blank item is pure background colour everywhere
    blank, battrs = D.render(np.zeros((1, 28, 28), np.uint8), seed=0)
    bg = torch.tensor(list(D.COLOURS.values()))[battrs["bg"][0]]
    assert torch.allclose(blank[0], bg.view(3, 1, 1).expand(3, 32, 32))


def test_few_shot_sampler():
    labels = np.repeat(np.arange(5), 30)
    idx = D.few_shot_indices(labels, 4, seed=0)
    assert len(idx) == 20 and len(set(idx)) == 20
    assert np.bincount(labels[idx]).tolist() == [4] * 5
    assert idx == D.few_shot_indices(labels, 4, seed=0)
    assert idx != D.few_shot_indices(labels, 4, seed=1)
    with pytest.raises(UserError, match="fewer than --shots"):
        D.few_shot_indices(labels, 31, seed=0)


def _write_png(path, colour):
    from PIL import Image
    Image.new("RGB", (40, 30), colour).save(path)


def test_image_folder_with_holdout_split(tmp_path):
    for name, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / name).mkdir()
        for i in range(10):
            _write_png(tmp_path / name / f"{i}.png", colour)
    train = D.load_dataset(f"folder:{tmp_path}", "train", 16)
    test = D.load_dataset(f"folder:{tmp_path}", "test", 16)
    assert train.classes == test.classes == ["cat", "dog"]
    assert len(train) + len(test) == 20 and len(test) == 4
    assert train.images.shape[1:] == (3, 16, 16)
    red = train.images[train.labels == 0]
    assert torch.allclose(red[:, 0], torch.ones_like(red[:, 0]), atol=1e-3)


def test_corrupt_image_is_a_clear_error(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="corrupt"):
        D.load_folder(tmp_path, "train", 16)


def test_csv_dataset_with_split_column(tmp_path):
    for i in range(4):
        _write_png(tmp_path / f"{i}.png", (0, 255, 0))
    (tmp_path / "d.csv").write_text("path,label,split\n0.png,a,train\n1.png,b,train\n2.png,a,test\n3.png,b,test\n")
    train = D.load_dataset(f"csv:{tmp_path / 'd.csv'}", "train", 8)
    assert train.classes == ["a", "b"] and train.labels.tolist() == [0, 1]
    with pytest.raises(UserError, match="path,label"):
        (tmp_path / "e.csv").write_text("0.png\n")
        D.load_csv(tmp_path / "e.csv", "train", 8)


def test_unknown_dataset_spec():
    with pytest.raises(UserError, match="unknown data set"):
        D.load_dataset("imagenet", "train", 32)
