import gzip
import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data

# ----------------------------------------------------------------------------- helpers


def write_cifar(root, per_batch=2, seed=0):
    """cifar-10-python.tar.gz in the official layout; returns (tarball, {batch: (data, labels)})."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, data.CIFAR_DIR)
    os.makedirs(folder)
    batches = {}
    for name in data.CIFAR_BATCHES["train"] + data.CIFAR_BATCHES["test"]:
        d = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        batches[name] = (d, labels)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": d,
                         "filenames": [f"{k}.png" for k in range(per_batch)]}, f, protocol=2)
    tarball = os.path.join(root, data.CIFAR_FILE)
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname=data.CIFAR_DIR)
    return tarball, batches


def write_idx(folder, split, images, labels, image_magic=2051):
    os.makedirs(folder, exist_ok=True)
    img_file, lbl_file = data.IDX_FILES[split]
    with gzip.open(os.path.join(folder, img_file), "wb") as f:
        f.write(struct.pack(">iiii", image_magic, *images.shape) + images.tobytes())
    with gzip.open(os.path.join(folder, lbl_file), "wb") as f:
        f.write(struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def write_folder(root, sizes=((40, 30), (25, 50), (64, 64), (33, 33))):
    """Two classes of PNGs of various sizes; returns [(path, label)] in the expected order."""
    rng = np.random.default_rng(1)
    out = []
    for k, (w, h) in enumerate(sizes):
        cls = ["cat", "dog"][k % 2]
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        p = os.path.join(root, cls, f"img{k}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        out.append((p, k % 2))
    return sorted(out, key=lambda t: (t[1], t[0]))


@pytest.fixture
def no_system(tmp_path, monkeypatch):
    # keep the machine's own /usr/share/datasets out of the tests that expect a miss
    monkeypatch.setattr(data, "SYSTEM_DATASETS", str(tmp_path / "system"))


# ----------------------------------------------------------------------------- CIFAR-10


def test_cifar_tarball_and_folder_load_pixels_and_labels(tmp_path):
    tarball, batches = write_cifar(str(tmp_path))
    for path in (str(tmp_path), tarball, os.path.join(str(tmp_path), data.CIFAR_DIR)):
        train = data.open_dataset("cifar10", path)
        assert len(train) == 10 and train.num_classes == 10 and train.name == "cifar10"
        d, labels = batches["data_batch_3"]
        img = train.image(5)  # second image of the third batch
        assert img.mode == "RGB" and img.size == (32, 32) and train.label(5) == labels[1]
        assert np.array_equal(np.asarray(img), d[1].reshape(3, 32, 32).transpose(1, 2, 0))
    # every image, in batch order
    train = data.open_dataset("cifar10", tarball)
    for b, name in enumerate(data.CIFAR_BATCHES["train"]):
        d, labels = batches[name]
        for j in range(2):
            i = 2 * b + j
            want = d[j].reshape(3, 32, 32).transpose(1, 2, 0)
            assert np.array_equal(np.asarray(train.image(i)), want)
            assert train.label(i) == labels[j]
    test = data.open_dataset("cifar10-test", str(tmp_path))
    d, labels = batches["test_batch"]
    assert len(test) == 2 and [test.label(0), test.label(1)] == labels
    assert np.array_equal(np.asarray(test.image(1))[:, :, 2], d[1, 2048:].reshape(32, 32))


def test_cifar_download_checks_md5(tmp_path, monkeypatch):
    tarball, batches = write_cifar(str(tmp_path / "src"))
    md5 = hashlib.md5(open(tarball, "rb").read()).hexdigest()
    monkeypatch.setattr(data, "CIFAR_URL", "file://" + tarball)
    # a corrupted download (MD5 mismatch) is deleted, never kept as the dataset
    monkeypatch.setattr(data, "CIFAR_MD5", "0" * 32)
    dest = tmp_path / "dl"
    with pytest.raises(ValueError, match="MD5"):
        data.open_dataset("cifar10", str(dest))
    assert os.listdir(dest) == []
    # the right MD5: downloaded, renamed from .part, and readable
    monkeypatch.setattr(data, "CIFAR_MD5", md5)
    ds = data.open_dataset("cifar10-test", str(dest))
    assert sorted(os.listdir(dest)) == [data.CIFAR_FILE]
    assert ds.label(0) == batches["test_batch"][1][0]


def test_download_restarts_stale_part_and_reports_offline(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    assert data.file_md5(str(src)) == "900150983cd24fb0d6963f7d28e17f72"
    dest = str(tmp_path / "dest.bin")
    with open(dest + ".part", "wb") as f:
        f.write(b"junk that is not a prefix")
    # file:// cannot resume (no 206), so the stale .part is rewritten rather than appended to
    data.download_file("file://" + str(src), dest, "900150983cd24fb0d6963f7d28e17f72")
    assert open(dest, "rb").read() == b"abc" and not os.path.exists(dest + ".part")
    with pytest.raises(FileNotFoundError, match="by hand") as e:
        data.download_file("file://" + str(tmp_path / "nowhere.tar.gz"), str(tmp_path / "x"))
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "x")


# ----------------------------------------------------------------------------- MNIST-style IDX


def test_idx_files_load_and_bad_headers_are_refused(tmp_path, no_system):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    write_idx(str(tmp_path / "fashion-mnist"), "test", images, labels)
    ds = data.open_dataset("fashion-mnist-test", str(tmp_path))  # found in data_path/<name>/
    assert len(ds) == 5 and ds.num_classes == 10
    img = ds.image(2)
    assert img.mode == "RGB" and img.size == (28, 28)
    assert all(np.array_equal(np.asarray(img)[:, :, c], images[2]) for c in range(3))
    assert [ds.label(i) for i in range(5)] == labels.tolist()

    write_idx(str(tmp_path / "bad"), "train", images, labels, image_magic=2049)
    with pytest.raises(ValueError, match="magic number 2049, expected 2051"):
        data.open_dataset("mnist", str(tmp_path / "bad"))
    lbl = os.path.join(tmp_path, "fashion-mnist", data.IDX_FILES["test"][1])
    with gzip.open(lbl, "wb") as f:  # truncated: header says 5, body has 3
        f.write(struct.pack(">ii", 2049, 5) + bytes(3))
    with pytest.raises(ValueError, match="truncated"):
        data.open_dataset("fashion-mnist", str(tmp_path), split="test")


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_copy():
    ds = data.open_dataset("fashion-mnist-test", None, download=False)
    assert len(ds) == 10000 and ds.image(0).size == (28, 28)
    assert sorted(set(ds.labels.tolist())) == list(range(10))


# ----------------------------------------------------------------------------- image folders


def test_image_folder(tmp_path):
    expected = write_folder(str(tmp_path / "train"))
    for path in (str(tmp_path), str(tmp_path / "train")):  # root with train/, or the folder itself
        ds = data.open_dataset("folder", path)
        assert ds.classes == ["cat", "dog"] and len(ds) == 4 and ds.num_classes == 2
        for i, (p, label) in enumerate(expected):
            assert ds.label(i) == label
            assert np.array_equal(np.asarray(ds.image(i)), np.asarray(Image.open(p).convert("RGB")))
    assert data.open_dataset("folder", str(tmp_path)).image(3).size == (33, 33)


def test_missing_datasets_say_how_to_get_them(tmp_path, no_system):
    cases = [("cifar10", "cifar-10-python.tar.gz"), ("mnist", "t10k-images-idx3-ubyte.gz"),
             ("fashion-mnist", "fashion-mnist")]
    for name, hint in cases:
        with pytest.raises(FileNotFoundError, match="not found") as e:
            data.open_dataset(name + "-test", str(tmp_path / "empty"), download=False)
        assert hint in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="--data-path"):
        data.open_dataset("folder", None)
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        data.open_dataset("folder", str(tmp_path))
    with pytest.raises(ValueError, match="known: cifar10, mnist"):
        data.open_dataset("svhn")
    r = subprocess.run([sys.executable, "data.py", "mnist", "--data-path", str(tmp_path / "e"),
                        "--no-download"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.abspath(data.__file__)),
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode != 0 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- views


def random_image(w, h, seed=3):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_views_are_reproducible_and_well_formed():
    img = random_image(50, 41)
    for views, n in (("none", 1), ("flip", 2), ("tencrop", 10)):
        assert data.num_views(views) == n
        crops = [data.make_view(img, 32, views, v) for v in range(n)]
        for v, c in enumerate(crops):
            assert c.shape == (32, 32, 3) and c.dtype == np.uint8
            assert np.array_equal(c, data.make_view(img.copy(), 32, views, v))
        assert len({c.tobytes() for c in crops}) == n  # all distinct
    none = data.make_view(img, 32, "none", 0)
    assert np.array_equal(data.make_view(img, 32, "flip", 1), none[:, ::-1])
    assert np.array_equal(data.make_view(img, 32, "flip", 0), none)
    # ten-crop: the mirrored top-left is the mirror of the top-right (torchvision's order)
    assert np.array_equal(data.make_view(img, 32, "tencrop", 5),
                          data.make_view(img, 32, "tencrop", 1)[:, ::-1])
    with pytest.raises(ValueError, match="views must be one of"):
        data.make_view(img, 32, "fivecrop", 0)
    with pytest.raises(ValueError, match="out of range"):
        data.make_view(img, 32, "flip", 2)


def test_adm_crop_halves_with_box_and_small_images_are_padded():
    img = random_image(64, 80)
    a = np.asarray(img).astype(np.float64)
    # 64x80 -> BOX halving to 32x40 (2x2 means), no further resize, then the middle 32 rows
    box = a.reshape(40, 2, 32, 2, 3).mean((1, 3))
    got = data.make_view(img, 32, "none", 0).astype(np.float64)
    assert np.abs(got - box[4:36]).max() <= 1
    digit = Image.fromarray(np.random.default_rng(4).integers(1, 256, (28, 28), dtype=np.uint8))
    v = data.make_view(digit.convert("RGB"), 32, "none", 0)
    assert np.array_equal(v[2:30, 2:30, 0], np.asarray(digit)) and v[:2].max() == 0
    assert data.make_view(digit.convert("RGB"), 64, "none", 0).shape == (64, 64, 3)  # resized


def test_view_dataset(tmp_path):
    write_folder(str(tmp_path))
    src = data.open_dataset("folder", str(tmp_path))
    all_views = data.ViewDataset(src, 16, "flip", random_view=False)
    assert len(all_views) == 8
    x, label, i, v = all_views[3]
    assert (i, v, label) == (1, 1, src.label(1)) and x.dtype == torch.float32
    assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1
    want = torch.from_numpy(data.make_view(src.image(1), 16, "flip", 1)).permute(2, 0, 1)
    assert torch.allclose((x + 1) * 127.5, want.float(), atol=1e-4)
    rnd = data.ViewDataset(src, 16, "tencrop")
    assert len(rnd) == 4
    torch.manual_seed(0)
    first = [rnd[k][3] for k in range(4)] + [rnd[0][3] for _ in range(8)]
    torch.manual_seed(0)
    assert [rnd[k][3] for k in range(4)] + [rnd[0][3] for _ in range(8)] == first
    assert len(set(first)) > 1


# ----------------------------------------------------------------------------- code datasets


def write_codes(root, src_path, n=4, views="flip", image_size=16):
    A = data.num_views(views)
    os.makedirs(root)
    codes = np.arange(n * A * 4, dtype=np.int16).reshape(n, A, 4)
    np.save(os.path.join(root, "codes.npy"), codes)
    np.save(os.path.join(root, "labels.npy"), np.array([0, 0, 1, 1], dtype=np.int64)[:n])
    meta = {"grid": [2, 2], "vocab_size": 100, "num_classes": 2, "image_size": image_size,
            "views": views, "num_views": A, "dataset": "folder", "split": "train",
            "data_path": src_path, "tokenizer": "vq.pt", "tokenizer_config": {}, "num_images": n}
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump(meta, f)
    return codes


def test_code_dataset_reads_codes_and_remakes_the_crop(tmp_path):
    write_folder(str(tmp_path / "imgs"))
    codes = write_codes(str(tmp_path / "codes"), str(tmp_path / "imgs"))
    ds = data.CodeDataset(str(tmp_path / "codes"), random_view=False)
    assert len(ds) == 8 and ds.meta["grid"] == [2, 2]
    c, label, view = ds[5]
    assert c.dtype == torch.int64 and c.tolist() == codes[2, 1].tolist()
    assert label.item() == 1 and view.item() == 1 and label.dtype == torch.int64
    clone = pickle.loads(pickle.dumps(ds))  # as a spawned DataLoader worker gets it
    assert clone.codes is None and clone[5][0].tolist() == codes[2, 1].tolist()

    ds = data.CodeDataset(str(tmp_path / "codes"), with_images=True)
    src = data.open_dataset("folder", str(tmp_path / "imgs"))
    torch.manual_seed(1)
    seen = set()
    for _ in range(6):
        c, label, view, img = ds[3]
        seen.add(view.item())
        assert c.tolist() == codes[3, view.item()].tolist()
        assert img.dtype == torch.uint8 and img.shape == (3, 16, 16)
        want = data.make_view(src.image(3), 16, "flip", view.item())
        assert np.array_equal(img.permute(1, 2, 0).numpy(), want)
    assert seen == {0, 1}


def test_code_dataset_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="codes.npy, labels.npy, meta.json"):
        data.CodeDataset(str(tmp_path))
    write_folder(str(tmp_path / "imgs"))
    write_codes(str(tmp_path / "codes"), str(tmp_path / "imgs"))
    np.save(tmp_path / "codes" / "codes.npy", np.zeros((4, 2, 9), dtype=np.int16))
    with pytest.raises(ValueError, match=r"\(4, 2, 4\)"):
        data.CodeDataset(str(tmp_path / "codes"))
    write_codes(str(tmp_path / "codes2"), str(tmp_path / "imgs"))
    other = tmp_path / "other"
    write_folder(str(other), sizes=((20, 20),) * 3)
    with pytest.raises(ValueError, match="do not match"):
        data.CodeDataset(str(tmp_path / "codes2"), with_images=True, data_path=str(other))
