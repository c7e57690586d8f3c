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


# ---------------------------------------------------------------- bad input (issue 12)

def _class_folders(root, counts, colour=(200, 40, 40)):
    """root/NAME/i.png for each NAME: count; returns root."""
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            _write_png(root / name / f"{i}.png", colour)
    return root


def test_empty_class_folder_is_named(tmp_path):
    _class_folders(tmp_path, {"bag": 6, "coat": 0})
    for split in ("train", "test"):
        with pytest.raises(UserError, match=r"coat has no images"):
            D.load_dataset(f"folder:{tmp_path}", split, 8)


def test_class_without_training_images_is_named(tmp_path):
    _class_folders(tmp_path / "train", {"bag": 3, "coat": 0})
    _class_folders(tmp_path / "test", {"bag": 2, "coat": 2})
    with pytest.raises(UserError, match=r"'coat' has no training images"):
        D.load_dataset(f"folder:{tmp_path}", "train", 8)
    assert D.load_dataset(f"folder:{tmp_path}", "test", 8).classes == ["bag", "coat"]  # the test split may lack one


def test_csv_label_only_in_the_test_split_is_named(tmp_path):
    for i in range(3):
        _write_png(tmp_path / f"{i}.png", (0, 255, 0))
    (tmp_path / "d.csv").write_text("path,label,split\n0.png,bag,train\n1.png,bag,test\n2.png,coat,test\n")
    with pytest.raises(UserError, match=r"'coat' has no training images"):
        D.load_dataset(f"csv:{tmp_path / 'd.csv'}", "train", 8)


def test_few_shots_name_a_class_with_no_images():
    """A class in the class list but without one image is an error too, not a class tuned on nothing."""
    labels = np.array([0, 0, 1, 1])
    assert len(D.few_shot_indices(labels, 2, 0)) == 4  # without the class list: the old sampler
    with pytest.raises(UserError, match=r"class 'coat' has only 0 training images, fewer than --shots 1"):
        D.few_shot_indices(labels, 1, 0, ["bag", "dress", "coat"])
    assert D.few_shot_indices(labels, 2, 0, ["bag", "dress"]) == D.few_shot_indices(labels, 2, 0)


def _csv(tmp_path, text, n=4):
    for i in range(n):
        _write_png(tmp_path / f"{i}.png", (0, 255, 0))
    (tmp_path / "d.csv").write_text(text)
    return f"csv:{tmp_path / 'd.csv'}"


def test_csv_header_is_detected_by_name(tmp_path):
    spec = _csv(tmp_path, "file,class,split\n0.png,a,train\n1.png,b,train\n2.png,a,test\n3.png,b,test\n")
    with pytest.raises(UserError, match=r"line 1: header 'file,class,split' is not path,label"):
        D.load_dataset(spec, "train", 8)
    spec = _csv(tmp_path, "Path, Label ,SPLIT\n0.png,a,train\n1.png,b,train\n2.png,a,test\n3.png,b,test\n")
    assert D.load_dataset(spec, "train", 8).classes == ["a", "b"]


def test_csv_rows_need_the_same_columns(tmp_path):
    spec = _csv(tmp_path, "path,label,split\n0.png,a,train\n1.png,b\n2.png,a,test\n3.png,b,test\n")
    with pytest.raises(UserError, match=r"d.csv line 3: 2 columns .* every row needs the same columns"):
        D.load_dataset(spec, "train", 8)
    spec = _csv(tmp_path, "# no header\n0.png,a\n\n1.png,b,test\n")
    with pytest.raises(UserError, match=r"line 4: 3 columns"):
        D.load_dataset(spec, "test", 8)


def test_csv_split_names_ignore_case_and_an_empty_split_is_named(tmp_path):
    spec = _csv(tmp_path, "0.png,a,Train\n1.png,b,TRAIN\n2.png,a,Test\n3.png,b, test\n")
    test = D.load_dataset(spec, "test", 8)
    assert len(test) == 2 and test.classes == ["a", "b"]
    spec = _csv(tmp_path, "0.png,a,train\n1.png,b,train\n")
    with pytest.raises(UserError, match=r"the test split is empty \(rows per split: train 2, test 0\)"):
        D.load_dataset(spec, "test", 8)
    spec = _csv(tmp_path, "0.png,a,train\n1.png,b,val\n")
    with pytest.raises(UserError, match=r"line 2: split 'val' is neither train nor test"):
        D.load_dataset(spec, "train", 8)


def _write_raw_png(path, array, bit_depth, colour_type):
    """A PNG written by hand (PIL cannot write 16-bit RGB): array (H, W[, C]) of unsigned ints."""
    import struct
    import zlib
    h, w = array.shape[:2]
    raw = array.astype(">u2" if bit_depth == 16 else "u1").reshape(h, -1).tobytes()
    rows = b"".join(b"\0" + raw[i * len(raw) // h:(i + 1) * len(raw) // h] for i in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16_bit_and_other_modes_scale_to_unit_range(tmp_path):
    """A 16-bit grey PNG at half range is mid-grey, not white (convert('RGB') clips 16-bit values)."""
    from PIL import Image
    half = np.full((12, 20), 32768, np.uint16)
    _write_raw_png(tmp_path / "g16.png", half, 16, 0)
    rgb16 = np.zeros((12, 20, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 2] = 65535, 16384
    _write_raw_png(tmp_path / "rgb16.png", rgb16, 16, 2)
    Image.fromarray(np.full((12, 20), 0.25, np.float32), mode="F").save(tmp_path / "f.tif")
    Image.fromarray(np.full((12, 20), 16384, np.int32), mode="I").save(tmp_path / "i.tif")
    Image.new("LA", (20, 12), (128, 255)).save(tmp_path / "la.png")
    Image.new("P", (20, 12), 0).save(tmp_path / "p.png")
    want = {"g16.png": (0.5, 0.5, 0.5), "rgb16.png": (1.0, 0.0, 0.25), "f.tif": (0.25,) * 3,
            "i.tif": (0.25,) * 3, "la.png": (128 / 255,) * 3, "p.png": (0.0,) * 3}
    for name, rgb in want.items():
        x = D.load_image(tmp_path / name, 8)
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32
        assert torch.allclose(x, torch.tensor(rgb).view(3, 1, 1).expand(3, 8, 8), atol=1 / 255), (name, x[:, 0, 0])


def test_a_limit_keeps_every_class_of_class_sorted_data(tmp_path):
    """Folder data is read class by class: a limit must not be its first N (all one class)."""
    _class_folders(tmp_path / "train", {"bag": 2, "coat": 2, "dress": 2})
    _class_folders(tmp_path / "test", {"bag": 6, "coat": 6, "dress": 6})
    small = D.load_dataset(f"folder:{tmp_path}", "test", 8, limit=4)
    assert len(small) == 4 and sorted(set(small.labels.tolist())) == [0, 1, 2]
    again = D.load_dataset(f"folder:{tmp_path}", "test", 8, limit=4)
    assert torch.equal(small.labels, again.labels)  # seeded
    labels = np.array([0] * 5 + [1] * 2)
    assert np.bincount(labels[D.balanced_subset(labels, 4)]).tolist() == [2, 2]
    assert np.bincount(labels[D.balanced_subset(labels, 6)]).tolist() == [4, 2]  # the small class all in
    with pytest.raises(UserError, match="at least 1"):
        D.load_dataset(f"folder:{tmp_path}", "test", 8, limit=0)


def test_train_folder_without_test_folder(tmp_path):
    _class_folders(tmp_path / "train", {"bag": 3, "coat": 3})
    with pytest.raises(UserError, match=r"has train/ but no test/"):
        D.load_dataset(f"folder:{tmp_path}", "train", 8)
