"""
Images and codes on disk.

    open_dataset("cifar10", "data")         -> raw images (CIFAR-10, MNIST, Fashion-MNIST, image folders)
    make_view(img, 256, "tencrop", v=3)     -> uint8 (256, 256, 3): LlamaGen's / ADM's crops, the same every time
    ViewDataset(source, 32, "flip")         -> images in [-1, 1] for the tokenizer
    CodeDataset("codes/", with_images=True) -> (codes, label, view, the crop that made the codes)

`python data.py cifar10 --data-path data` fetches a dataset and says what it holds.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from util import POSITIVE_INT, run_command, save_grid

# -----------------------------------------------------------------------------
# where datasets live, and downloads (a .part file that takes the real name only once its MD5 is right)

DEFAULT_DATA_ROOT = "data"  # downloads land here when no --data-path is given
SYSTEM_DATASETS = "/usr/share/datasets"  # Debian's dataset-* packages install here
CIFAR_URL, CIFAR_MD5 = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"
CIFAR_FILE, CIFAR_DIR = "cifar-10-python.tar.gz", "cifar-10-batches-py"
CIFAR_BATCHES = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}
CIFAR_CLASSES = "airplane automobile bird cat deer dog frog horse ship truck".split()
IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
IDX_COUNTS = {"train": 60000, "test": 10000}
IDX_MAGIC = {"images": 2051, "labels": 2049}  # 0x0800 (unsigned bytes) + the number of dimensions
MNIST_LIKE = {  # url, MD5 of the four files in IDX_FILES' order (train images, labels, test images, labels), classes
    "mnist": ("https://storage.googleapis.com/cvdf-datasets/mnist/",
              ["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
               "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"], [str(d) for d in range(10)]),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                      ["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                       "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"],
                      "t-shirt trouser pullover dress coat sandal shirt sneaker bag ankle-boot".split()),
}
DATASETS = {  # name: what --data-path holds (the help of `python data.py`)
    "cifar10": "CIFAR-10, 32x32 RGB: cifar-10-python.tar.gz or cifar-10-batches-py/ (downloaded there when missing)",
    "mnist": "MNIST, 28x28 gray: the IDX .gz files, else /usr/share/datasets/mnist/ (downloaded when missing)",
    "fashion-mnist": "Fashion-MNIST, 28x28 gray: the IDX .gz files, else /usr/share/datasets/fashion-mnist/ (apt "
                     "install dataset-fashion-mnist; downloaded when missing)",
    "folder": "one sub-folder of images per class (ImageNet's train/ layout), or a <split>/ of those; alias: imagenet",
}
SPLITS = ("train", "test", "val")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def file_md5(path, chunk=1 << 20):
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_file(url, dest, md5=None):
    """Fetch url to dest (making its folder) with a progress bar; resumes a left-over dest.part when the server can."""
    part, manual = dest + ".part", f"download {url} by hand and put it at {dest}"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            have = have if getattr(response, "status", None) == 206 else 0  # not resumed: the whole file again
            size = response.headers.get("Content-Length")
            bar = tqdm(total=have + int(size) if size else None, initial=have, unit="B", unit_scale=True,
                       desc=os.path.basename(dest))
            with open(part, "ab" if have else "wb") as f, bar:
                while block := response.read(1 << 20):
                    bar.update(f.write(block))
    except urllib.error.HTTPError as e:
        if not (e.code == 416 and have):  # 416: the .part was already whole; the MD5 decides below
            raise FileNotFoundError(f"could not download {url} (HTTP {e.code}); {manual}.") from None
    except (urllib.error.URLError, OSError) as e:  # the .part stays: the next attempt resumes it
        raise FileNotFoundError(f"could not download {url} ({getattr(e, 'reason', e)}); {manual}.") from None
    if md5 is not None and (got := file_md5(part)) != md5:
        os.remove(part)
        raise ValueError(f"the download of {url} has MD5 {got}, expected {md5}, so it was deleted; "
                         f"run again or {manual}.")
    os.replace(part, dest)
    return dest

# -----------------------------------------------------------------------------
# readers for the raw formats


class _ArrayUnpickler(pickle.Unpickler):
    # CIFAR batches are pickles; letting only numpy's array rebuilders through means a foreign pickle dropped
    # into --data-path cannot run code (_codecs.encode: how Python 3 writes bytes at protocol 2)
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")
        return super().find_class(module, name)


def _cifar_batch(raw, where):
    try:  # the official batches were pickled by Python 2: latin1 keeps the numpy bytes intact
        d = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
        d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}  # bytes keys: pickled by Python 3
        data, labels = np.asarray(d["data"], dtype=np.uint8), np.asarray(d["labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{where} is not a readable CIFAR-10 batch, a pickled dict of 'data' and 'labels' "
                         f"({type(e).__name__}: {e})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"{where} holds data of shape {data.shape} and {len(labels)} labels, expected (n, 3072) and n")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_cifar(path, split):
    """(images uint8 (N, 32, 32, 3), labels int64 (N,)) from the tarball or the extracted folder."""
    names, parts = CIFAR_BATCHES[split], {}  # each batch is decoded as soon as it is read
    if os.path.isdir(path):
        for n in names:
            if os.path.isfile(f := os.path.join(path, n)):
                with open(f, "rb") as fh:
                    parts[n] = _cifar_batch(fh.read(), f)
    else:
        try:
            with tarfile.open(path, "r:gz") as tar:
                for member in tar:  # one pass: a gzip stream is slow to seek backwards
                    if (n := os.path.basename(member.name)) in names and member.isfile():
                        parts[n] = _cifar_batch(tar.extractfile(member).read(), f"{path}:{n}")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ValueError(f"{path} is not a readable cifar-10-python.tar.gz ({e}); delete it and run again to "
                             f"download it afresh") from None
    if missing := [n for n in names if n not in parts]:
        raise FileNotFoundError(f"{path} lacks the CIFAR-10 batches {', '.join(missing)}")
    return np.concatenate([parts[n][0] for n in names]), np.concatenate([parts[n][1] for n in names])


def read_idx(path, what, count=None):
    """A uint8 IDX array (.gz or raw) of "images" or "labels", checked against its header: magic, sizes, (count)."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable IDX file ({e})") from None
    magic, ndim = IDX_MAGIC[what], IDX_MAGIC[what] & 0xFF
    got = struct.unpack(">i", raw[:4])[0] if len(raw) >= 4 else None
    if got != magic:
        raise ValueError(f"{path} has IDX magic number {got}, expected {magic} ({what})")
    shape, body = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim]), raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise ValueError(f"{path} holds {len(body)} bytes after its header, expected {int(np.prod(shape))} for shape "
                         f"{tuple(shape)}: is it truncated?")
    if count is not None and shape[0] != count:
        raise ValueError(f"{path} holds {shape[0]} items, expected {count}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)

# -----------------------------------------------------------------------------
# source datasets: raw images of their original size, image(i) an RGB PIL image and label(i) an int


class ArraySource:
    """Datasets small enough to hold in memory: uint8 (N, H, W) gray or (N, H, W, 3) RGB."""

    def __init__(self, name, images, labels, classes):
        self.name, self.images, self.labels, self.classes = name, images, labels, list(classes)
        self.num_classes = len(self.classes)

    def __len__(self):
        return len(self.labels)

    def image(self, i):
        a = self.images[i]
        return Image.fromarray(a, "L").convert("RGB") if a.ndim == 2 else Image.fromarray(a, "RGB")

    def label(self, i):
        return int(self.labels[i])


class FolderSource(ArraySource):
    """One sub-folder per class; `images` holds the file names, each image is read when asked for."""

    def __init__(self, root):
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not classes:
            raise FileNotFoundError(f"--data-path {root} has no class sub-folders; expected an ImageNet-style "
                                    f"folder, one sub-folder of images per class")
        files, labels = [], []
        for c, cls in enumerate(tqdm(classes, desc="scanning classes", leave=False, disable=len(classes) < 100)):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls), followlinks=True):
                dirnames.sort()
                found = [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
                files += found
                labels += [c] * len(found)
        if not files:
            raise FileNotFoundError(f"--data-path {root} has class folders but no images in them "
                                    f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
        super().__init__("folder", files, np.asarray(labels, dtype=np.int64), classes)

    def image(self, i):
        try:
            with Image.open(self.images[i]) as im:
                return im.convert("RGB")
        except OSError as e:
            raise ValueError(f"cannot read the image {self.images[i]} ({e})") from None


def _open_cifar(data_path, split, download_ok):
    root = data_path or DEFAULT_DATA_ROOT
    tarball = os.path.join(root, CIFAR_FILE)
    found = next((p for p in (root, os.path.join(root, CIFAR_DIR), tarball)
                  if (os.path.isfile(p) and p.endswith(".tar.gz")) or os.path.isfile(os.path.join(p, "batches.meta"))
                  or os.path.isfile(os.path.join(p, CIFAR_BATCHES[split][0]))), None)
    if found is None:
        if not download_ok or os.path.isfile(root):
            raise FileNotFoundError(f"CIFAR-10 not found in {root}: download {CIFAR_URL} (MD5 {CIFAR_MD5}) into that "
                                    f"folder, or allow the download")
        found = download_file(CIFAR_URL, tarball, CIFAR_MD5)
    return ArraySource("cifar10", *read_cifar(found, split), CIFAR_CLASSES)


def _open_idx(name, data_path, split, download_ok):
    url, md5s, classes = MNIST_LIKE[name]
    files = IDX_FILES[split]

    def find(folder):  # a file or its uncompressed twin
        paths = [next((q for q in (os.path.join(folder, f), os.path.join(folder, f[:-3])) if os.path.isfile(q)), None)
                 for f in files]
        return None if None in paths else paths

    folders = [data_path, os.path.join(data_path, name)] if data_path else []
    paths, count = next((p for folder in folders if (p := find(folder))), None), None
    if paths is None:  # Debian recompressed the files, so their MD5s differ: the headers and counts vouch instead
        paths, count = find(os.path.join(SYSTEM_DATASETS, name)), IDX_COUNTS[split]
    if paths is None:
        if not download_ok:
            raise FileNotFoundError(f"{name} ({split}) not found in {data_path or '(no --data-path)'} or "
                                    f"{os.path.join(SYSTEM_DATASETS, name)}: put {files[0]} and {files[1]} from {url} "
                                    f"there, or allow the download")
        md5 = dict(zip(IDX_FILES["train"] + IDX_FILES["test"], md5s))
        paths = [download_file(url + f, os.path.join(data_path or DEFAULT_DATA_ROOT, name, f), md5[f]) for f in files]
    images, labels = read_idx(paths[0], "images", count), read_idx(paths[1], "labels", count).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{paths[0]} holds {len(images)} images but {paths[1]} {len(labels)} labels")
    return ArraySource(name, images, labels, classes)


def open_dataset(name, data_path=None, split="train", download=True):
    """A source dataset by name ("cifar10", "mnist", "fashion-mnist", "folder"; "name-split" too)."""
    name, split = next(((name[:-len(s) - 1], s) for s in SPLITS if name.endswith("-" + s)), (name, split))
    name = "folder" if name == "imagenet" else name
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if name == "folder":
        if not data_path or not os.path.isdir(data_path):
            raise FileNotFoundError(f"dataset 'folder' needs --data-path to be a folder with one sub-folder of images "
                                    f"per class; got {data_path!r}")
        sub = os.path.join(data_path, split)
        return FolderSource(sub if os.path.isdir(sub) else data_path)
    split = "test" if split == "val" else split  # the small datasets have no separate val split
    if split not in IDX_FILES:
        raise ValueError(f"unknown split {split!r} for {name}; expected train or test")
    return _open_cifar(data_path, split, download) if name == "cifar10" else _open_idx(name, data_path, split, download)

# -----------------------------------------------------------------------------
# views: the crops of LlamaGen / ADM, each re-made exactly from (image, view index)

VIEWS = {"none": 1, "flip": 2, "tencrop": 10}
TENCROP_RANGE = 1.1  # LlamaGen centre-crops 1.1x the size before its ten-crop


def num_views(views):
    if views not in VIEWS:
        raise ValueError(f"views must be one of {', '.join(VIEWS)}, got {views!r}")
    return VIEWS[views]


def center_crop_arr(img, size):
    """ADM's centre crop: halve with BOX while far too big, BICUBIC to size, cut the middle."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    a = np.asarray(img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC))
    y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[y:y + size, x:x + size]


def make_view(img, image_size, views, v):
    """View v of img as uint8 (S, S, 3): "none" the ADM crop, "flip" v=1 its mirror, "tencrop" v = 0..9 LlamaGen's
    ten-crop (corners tl, tr, bl, br, centre, as torchvision's TenCrop; then the same on the mirrored image)."""
    n = num_views(views)
    if not 0 <= v < n:
        raise ValueError(f"view index {v} is out of range for views={views!r} ({n} views)")
    img, (w, h), S = img.convert("RGB"), img.size, image_size
    if (w, h) != (S, S) and S * 7 / 8 <= min(w, h) and max(w, h) <= S:
        # 28x28 digits into 32x32: a black border keeps every pixel, where a 14% bicubic upscale would blur them
        canvas = Image.new("RGB", (S, S))
        canvas.paste(img, ((S - w) // 2, (S - h) // 2))
        img = canvas
    if views != "tencrop":
        a = center_crop_arr(img, S)
        return np.array(a[:, ::-1] if v == 1 else a)  # a fresh, writable copy: PIL's buffer is read-only
    a = center_crop_arr(img, int(S * TENCROP_RANGE))
    if v >= 5:
        a, v = a[:, ::-1], v - 5
    H, W = a.shape[:2]
    top, left = [(0, 0), (0, W - S), (H - S, 0), (H - S, W - S), (int(round((H - S) / 2)), int(round((W - S) / 2)))][v]
    return np.array(a[top:top + S, left:left + S])


class ViewDataset(torch.utils.data.Dataset):
    """Crops of a source dataset as float tensors in [-1, 1], with where they came from: item k is view v of
    image i, k = i * views + v."""

    def __init__(self, source, image_size, views="none"):
        self.source, self.image_size, self.views, self.num_views = source, image_size, views, num_views(views)

    def __len__(self):
        return len(self.source) * self.num_views

    def __getitem__(self, k):
        i, v = divmod(k, self.num_views)
        a = make_view(self.source.image(i), self.image_size, self.views, v)
        return torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1.0, self.source.label(i), i, v

# -----------------------------------------------------------------------------
# code datasets written by `tokenizer.py extract`

REMAKE = "make it again with `python tokenizer.py extract ... --overwrite`"


def check_range(array, limit, path, what, name, rows=1 << 16):
    """Refuse any value outside [0, limit): vectorised over chunks of rows, so a memory-mapped ImageNet code
    file (1.28M x 10 x 256) is read once in seconds and never held in memory."""
    for start in range(0, len(array), rows):
        chunk = np.asarray(array[start:start + rows])
        if chunk.size and (chunk.min() < 0 or chunk.max() >= limit):
            bad = np.argwhere((chunk < 0) | (chunk >= limit))[0]
            index = (start + int(bad[0]), *map(int, bad[1:]))
            raise ValueError(f"{path} holds the {what} {int(chunk[tuple(bad)])} at index {index}, outside "
                             f"0..{limit - 1} ({name} in meta.json); {REMAKE}")


class CodeDataset(torch.utils.data.Dataset):
    """Memory-mapped codes (N, A, H*W), one view per item (k = i * views + v), optionally with the crop itself.

    Opening one checks it whole (shapes against meta.json, every code below the vocabulary, every label below
    the number of classes), so a bad file stops a run before its first step.
    """

    def __init__(self, root, with_images=False, data_path=None):
        files = [os.path.join(root, f) for f in ("codes.npy", "labels.npy", "meta.json")]
        if missing := [os.path.basename(f) for f in files if not os.path.isfile(f)]:
            raise FileNotFoundError(f"{root} is not a code dataset: it lacks {', '.join(missing)} "
                                    f"(make one with `python tokenizer.py extract`)")
        try:
            with open(files[2]) as f:
                self.meta = json.load(f)
            (H, W), N, A = self.meta["grid"], self.meta["num_images"], self.meta["num_views"]
            vocab, classes = self.meta["vocab_size"], self.meta["num_classes"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{files[2]} is not a valid code-dataset description ({type(e).__name__}: {e}); "
                             f"{REMAKE}") from None
        for path, shape in ((files[0], (N, A, H * W)), (files[1], (N,))):
            try:
                array = np.load(path, mmap_mode="r")
            except (ValueError, OSError, EOFError) as e:
                raise ValueError(f"{path} cannot be read ({e}): it is truncated or not a .npy file; {REMAKE}") from None
            if array.shape != shape or array.dtype.kind not in "iu":
                raise ValueError(f"{path} holds {array.dtype} {array.shape}, but meta.json says integers of shape "
                                 f"{shape} (images, views, tokens); {REMAKE}")
        self.codes_path, self.codes, self.labels = files[0], np.load(files[0], mmap_mode="r"), np.load(files[1])
        check_range(self.codes, vocab, files[0], "code", "the vocabulary")
        check_range(self.labels, classes, files[1], "label", "the number of classes")
        self.num_views, self.source = A, None
        if with_images:
            path = data_path if data_path is not None else self.meta.get("data_path")
            self.source = open_dataset(self.meta["dataset"], path, self.meta["split"])
            if len(self.source) != N or any(self.source.label(i) != self.labels[i] for i in {0, N // 2, N - 1}):
                raise ValueError(f"the images of {self.meta['dataset']} at {path} do not match {root} "
                                 f"({len(self.source)} images vs {N} codes, or other labels): pass the --data-path "
                                 f"the codes were extracted from")

    def __getstate__(self):  # pickling a memmap copies the whole array into each DataLoader worker: reopen instead
        return {**self.__dict__, "codes": None}

    def __len__(self):
        return len(self.labels) * self.num_views

    def __getitem__(self, k):
        i, v = divmod(k, self.num_views)
        if self.codes is None:
            self.codes = np.load(self.codes_path, mmap_mode="r")
        out = (torch.from_numpy(self.codes[i, v].astype(np.int64)), torch.tensor(self.labels[i], dtype=torch.int64),
               torch.tensor(v, dtype=torch.int64))
        if self.source is None:
            return out
        a = make_view(self.source.image(i), self.meta["image_size"], self.meta["views"], v)
        return out + (torch.from_numpy(a).permute(2, 0, 1).contiguous(),)


def main(argv=None):
    p = argparse.ArgumentParser(description="Fetch a dataset, say what it holds, optionally save a PNG of its views.")
    p.add_argument("dataset", help="; ".join(f"{k}: {v}" for k, v in DATASETS.items()) + "; append -train / -test "
                                   "to pick the split (e.g. cifar10-test)")
    p.add_argument("--data-path", default=None)
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--image-size", type=POSITIVE_INT, default=32)
    p.add_argument("--views", default="none", choices=list(VIEWS))
    p.add_argument("--preview", default=None, help="PNG file: 8 images, one row per image")
    p.add_argument("--force", action="store_true", help="overwrite an existing --preview")
    args = p.parse_args(argv)
    if args.preview and os.path.exists(args.preview) and not args.force:  # refused before the dataset is read
        raise FileExistsError(f"--preview {args.preview} exists; pass --force to replace it")
    ds = open_dataset(args.dataset, args.data_path, args.split, download=not args.no_download)
    print(f"{ds.name}: {len(ds)} images, {ds.num_classes} classes, first image {ds.image(0).size}")
    print("per class:", dict(zip(ds.classes[:20], np.bincount(ds.labels, minlength=ds.num_classes)[:20].tolist())))
    if args.preview:
        n = num_views(args.views)
        views = [make_view(ds.image(i), args.image_size, args.views, v)
                 for i in range(min(8, len(ds))) for v in range(n)]
        save_grid(views, args.preview, nrow=n, padding=0)
        print(f"wrote {args.preview}")


if __name__ == "__main__":
    run_command(main)
