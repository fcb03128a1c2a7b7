"""
FID, Inception Score, precision and recall in pure torch with pytorch-fid's port of the TF Inception 2015-12-05 graph
and its weights (so numbers compare with pytorch-fid, and closely with the ADM evaluator); and where those weights are
missing, an offline metric: the Frechet distance in the features of a small classifier of the dataset.

    python fid.py samples.npz cifar10-train [--json]     # each side: an .npz of images or stats, a folder, a dataset
    python fid.py samples/ --save-stats samples.npz      # statistics to reuse as either side
    python fid.py samples.npz fashion-mnist --classifier  # and its floors: --classifier fashion-mnist --floors
"""
import argparse
import functools
import hashlib
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import util
from model import load_state_dict_strict

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
PSD_TOLERANCE = 1e-6  # covariance eigenvalues down to -1e-6 * trace are round-off (even stored as float32)


# ----------------------------------------------------------------------------------------------
# The FID Inception-v3, with pytorch-fid's module names so that its weights load strictly

POOLS = {"avg": lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False),  # TF: valid pixels only
         "max": lambda x: F.max_pool2d(x, 3, stride=1, padding=1),  # the 2015 graph's Mixed_7c pools by max
         "reduce": lambda x: F.max_pool2d(x, 3, stride=2)}  # the grid reductions' branch without convs
# The Mixed blocks (_A, _C, _E: pytorch-fid's InceptionA, C, E), branches in concatenation order, which is also
# pytorch-fid's module order and so the state_dict's: a name, the pool it starts with if any, then convs
# "channels:HxW[/stride]"; "a|b" is a fork whose outputs are both kept. Convs are named name_1, name_2, ..., the bare
# name when alone, name_2a and name_2b for a fork at step 2.
_A = "branch1x1 64:1x1, branch5x5 48:1x1 64:5x5, branch3x3dbl 64:1x1 96:3x3 96:3x3, branch_pool avg {}:1x1"  # 35x35
_C = ("branch1x1 192:1x1, branch7x7 {0}:1x1 {0}:1x7 192:7x1, branch7x7dbl {0}:1x1 {0}:7x1 {0}:1x7 {0}:7x1 192:1x7, "
      "branch_pool avg 192:1x1")  # 17x17, 7x7 convolutions factorised
_E = ("branch1x1 320:1x1, branch3x3 384:1x1 384:1x3|384:3x1, branch3x3dbl 448:1x1 384:3x3 384:1x3|384:3x1, "
      "branch_pool {} 192:1x1")  # 8x8
MIXED = {"5b": _A.format(32), "5c": _A.format(64), "5d": _A.format(64),
         "6a": "branch3x3 384:3x3/2, branch3x3dbl 64:1x1 96:3x3 96:3x3/2, - reduce",  # 35 -> 17
         "6b": _C.format(128), "6c": _C.format(160), "6d": _C.format(160), "6e": _C.format(192),
         "7a": "branch3x3 192:1x1 320:3x3/2, branch7x7x3 192:1x1 192:1x7 192:7x1 192:3x3/2, - reduce",  # 17 -> 8
         "7b": _E.format("avg"), "7c": _E.format("max")}


class BasicConv2d(nn.Module):  # conv (no bias) -> batch norm -> relu; the default padding keeps the size at stride 1
    def __init__(self, cin, cout, kernel, stride=1, padding=None):
        super().__init__()
        same = (kernel[0] // 2, kernel[1] // 2) if stride == 1 else 0
        self.conv = nn.Conv2d(cin, cout, kernel, stride, same if padding is None else padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)  # the TF graph's epsilon
        # Set by FIDInceptionV3.fold_batchnorm(): buffers so .to() moves them, kept out of pytorch-fid's state_dict
        self.register_buffer("folded_weight", None, persistent=False)
        self.register_buffer("folded_bias", None, persistent=False)

    def _load_from_state_dict(self, *args):  # a fold of the old weights must not outlive them
        self.folded_weight = self.folded_bias = None
        super()._load_from_state_dict(*args)

    def forward(self, x):
        if self.folded_weight is None or self.training:
            return F.relu(self.bn(self.conv(x)))
        return F.relu(F.conv2d(x, self.folded_weight, self.folded_bias, self.conv.stride, self.conv.padding))


class Mixed(nn.Module):  # one block of MIXED: its branches side by side, outputs concatenated
    def __init__(self, cin, spec):
        super().__init__()
        self.branches, self.out_channels = [], 0
        for name, *steps in (branch.split() for branch in spec.split(", ")):
            pool, names, c = steps.pop(0) if steps[0] in POOLS else None, [], cin
            for i, step in enumerate(steps, 1):
                convs = [[int(n) for n in re.split("[:x/]", conv)] for conv in step.split("|")]
                names.append([name if len(steps) == 1 else f"{name}_{i}" + "ab"[j] * (len(convs) > 1)
                              for j in range(len(convs))])
                for n, (cout, h, w, *stride) in zip(names[-1], convs):
                    self.add_module(n, BasicConv2d(c, cout, (h, w), *stride))
                c = sum(conv[0] for conv in convs)
            self.branches.append((pool, names))
            self.out_channels += c

    def forward(self, x):
        out = []
        for pool, steps in self.branches:
            ys = [POOLS[pool](x) if pool else x]
            for names in steps:
                ys = [getattr(self, n)(ys[0]) for n in names]
            out += ys
        return torch.cat(out, 1)


class FIDInceptionV3(nn.Module):
    """Images (B, 3, H, W), uint8 or floats in [0, 1] -> (pool3 (B, 2048), logits (B, 1008))."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, (3, 3), stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, (3, 3), padding=0)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, (3, 3))
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, (1, 1))
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, (3, 3), padding=0)
        cin = 192
        for name, spec in MIXED.items():
            self.add_module("Mixed_" + name, Mixed(cin, spec))
            cin = getattr(self, "Mixed_" + name).out_channels
        self.fc = nn.Linear(2048, 1008)  # 1008 classes: the 2015 graph's ImageNet labels plus padding

    def forward(self, x):
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in MIXED:
            x = getattr(self, "Mixed_" + name)(x)
        pool3 = x.mean(dim=(2, 3))
        return pool3, self.fc(pool3)

    @torch.no_grad()
    def fold_batchnorm(self):
        """Fold each eval-mode batch norm into its conv: a pass less over every activation map, ~10% faster on CPU."""
        for m in self.modules():
            if isinstance(m, BasicConv2d):
                scale = m.bn.weight * torch.rsqrt(m.bn.running_var + m.bn.eps)
                m.folded_weight = m.conv.weight * scale.view(-1, 1, 1, 1)
                m.folded_bias = m.bn.bias - m.bn.running_mean * scale
        return self


def load_inception(weights=None, device="cpu", download=True):
    """The FID network in eval mode on `device`, its weights from `weights` or the torch hub cache (downloaded there
    if missing). FileNotFoundError says where to put them; ValueError, what is wrong with the file."""
    if weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"--inception-weights {weights} does not exist.")
    path = weights or os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)
    if not os.path.isfile(path) and not download:
        raise FileNotFoundError(f"FID Inception weights not found: download {WEIGHTS_URL} to {path} (or pass its "
                                "path with --inception-weights).")
    if not os.path.isfile(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            data.download_file(WEIGHTS_URL, path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"FID Inception weights not found and {e}") from None
    try:
        state = util.read_checkpoint(path, "the FID Inception weights")
    except ValueError as e:
        raise ValueError(f"{e}: delete it and download {WEIGHTS_URL} again.") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not the FID Inception state_dict.")
    model = FIDInceptionV3()
    load_state_dict_strict(model, state, f"{path} ({WEIGHTS_NAME}?)")
    return model.eval().to(device, memory_format=torch.channels_last).fold_batchnorm()


# ----------------------------------------------------------------------------------------------
# Features and metrics

def _as_nchw(batch):  # uint8 NHWC (as in .npz files) or float/uint8 NCHW, numpy or torch -> torch NCHW, 3 channels
    x = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
    x = x.unsqueeze(-1) if x.dim() == 3 else x  # grayscale (N, H, W)
    if x.dim() != 4:
        raise ValueError(f"images must be a 4-d batch (N, H, W, C) or (N, C, H, W); got shape {tuple(x.shape)}.")
    x = x.permute(0, 3, 1, 2) if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3) else x
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    if x.shape[1] != 3:
        raise ValueError(f"images must have 1 or 3 channels; got shape {tuple(batch.shape)}.")
    if x.is_floating_point() and (x.min() < 0 or x.max() > 1):  # a [-1, 1] batch would pass silently
        raise ValueError(f"float images must lie in [0, 1], got values in [{x.min():.3g}, {x.max():.3g}]; "
                         "map [-1, 1] images with (x + 1) / 2 and clamp.")
    return x


class _Lazy:  # images read one at a time when a slice of them is asked for, so that no set need fit in memory
    def __init__(self, count, read):
        self.count, self.read = count, read

    def __len__(self):
        return self.count

    def __getitem__(self, part):
        return np.stack([self.read(i) for i in range(*part.indices(self.count))])


@torch.inference_mode()
def extract(model, images, batch_size=50, device=None, progress=True):
    """pool3 features (N, 2048) and IS logits (N, 1008), float32 numpy, of uint8 NHWC images (or NCHW, or floats in
    [0, 1]): an array, a tensor or a _Lazy. The logits lack fc's bias, as the ADM evaluator's softmax takes them."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pool3, logits = [], []
    with tqdm(total=len(images), unit="img", desc="inception", disable=not progress, leave=False) as bar:
        for i in range(0, len(images), batch_size):
            x = _as_nchw(images[i:i + batch_size]).to(device, non_blocking=True)
            p, _ = model(x.contiguous(memory_format=torch.channels_last))
            pool3.append(p.float().cpu())
            logits.append((p @ model.fc.weight.t()).float().cpu())
            bar.update(len(p))
    if not pool3:
        raise ValueError("no images to extract features from.")
    return torch.cat(pool3).numpy(), torch.cat(logits).numpy()


def stats(pool3, chunk=8192):
    """Mean and covariance (unbiased, as numpy's cov) in float64, without a float64 copy of all rows."""
    if len(pool3) < 2:
        raise ValueError(f"statistics need at least 2 images, got {len(pool3)}.")
    chunks = [pool3[i:i + chunk] for i in range(0, len(pool3), chunk)]
    mu = sum(c.astype(np.float64).sum(0) for c in chunks) / len(pool3)
    return mu, sum(c.T @ c for c in (c.astype(np.float64) - mu for c in chunks)) / (len(pool3) - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), exact for PSD inputs (where sqrtm of the product needs
    an eps fudge, pytorch-fid, or drops an imaginary part, ADM); ValueError for what is no mean and covariance."""
    mu1, mu2, s1, s2 = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}.")
    if not (torch.isfinite(mu1).all() and torch.isfinite(mu2).all()):
        raise ValueError("a mean (mu) holds NaN or infinite values.")
    distance = (mu1 - mu2) @ (mu1 - mu2) + s1.trace() + s2.trace()
    # One thread: the eigensolvers gain little from more and lose several-fold on shared cores (1.7 s vs 8 s for a
    # 2048 eigh on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, s in (("sigma of the first set", s1), ("sigma of the second set", s2)):
            scale = s.abs().max()  # NaN or inf if any entry is
            if not torch.isfinite(scale):
                raise ValueError(f"{name} holds NaN or infinite values.")
            if (s - s.T).abs().max() > PSD_TOLERANCE * scale:
                raise ValueError(f"{name} is not symmetric, so it is not a covariance matrix.")
            # Cholesky of the matrix shifted by the tolerance: direct, it cannot fail to converge as an eigh can.
            shifted = s.clone()
            shifted.diagonal().add_(PSD_TOLERANCE * s.diagonal().clamp_min(0).sum() + torch.finfo(s.dtype).tiny)
            if torch.linalg.cholesky_ex(shifted).info != 0:
                raise ValueError(f"{name} has negative eigenvalues beyond round-off, so it is not a covariance matrix.")
        # S1 S2 is similar to A S2 A, A = S1^(1/2): tr sqrt(S1 S2) is the sum of the roots of eigvalsh(A S2 A). MKL's
        # eigh may not converge on the zero rows of low-rank covariances; a PSD matrix is zero in the row and column of
        # a zero diagonal entry and tr sqrt(S1 S2) = tr sqrt(S2 S1), so decompose the side of smaller support,
        # restricted to it, keeping only its range (w > 0). If that still fails: numpy's LAPACK, then eigvals(S1 S2).
        if (s2.diagonal() > 0).sum() < (s1.diagonal() > 0).sum():
            s1, s2 = s2, s1
        support = s1.diagonal() > 0
        s1, s2 = s1[support][:, support], s2[support][:, support]
        numpy_solvers = (lambda m: [torch.from_numpy(a) for a in np.linalg.eigh(m.numpy())],
                         lambda m: torch.from_numpy(np.linalg.eigvalsh(m.numpy())))
        for eigh, eigvalsh in ((torch.linalg.eigh, torch.linalg.eigvalsh), numpy_solvers):
            try:
                w, v = eigh(s1)
                root, v = w[w > 0].sqrt(), v[:, w > 0]
                inner = root[:, None] * (v.T @ s2 @ v) * root
                return float(distance - 2 * eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum())
            except (RuntimeError, np.linalg.LinAlgError):  # torch.linalg.LinAlgError is a RuntimeError
                pass
        return float(distance - 2 * torch.linalg.eigvals(s1 @ s2).real.clamp_min(0).sqrt().sum())
    finally:
        torch.set_num_threads(threads)


def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) || p(y))), averaged over `splits` consecutive chunks (ADM: 50k samples, 10 splits)."""
    logp = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=1)
    scores = []
    for part in logp.split(math.ceil(len(logp) / splits)):
        log_marginal = torch.logsumexp(part, 0) - math.log(len(part))  # finite where every p(y|x) underflows
        scores.append((part.exp() * (part - log_marginal)).sum(1).mean().exp().item())
    return float(np.mean(scores))


def precision_recall(real, fake, k=3, block_size=4096, device="cpu"):
    """Improved precision and recall (Kynkaanniemi et al. 2019): the share of fake points inside the real manifold
    (balls around each real point reaching its k-th nearest real neighbour), and the same with roles swapped."""
    real, fake = (torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device) for a in (real, fake))
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} need more than {k} images on each side.")

    def distances(a, b):  # squared, block by block, so that 50k x 50k never sits in memory
        for i in range(0, len(a), block_size):
            for j in range(0, len(b), block_size):
                x, y = a[i:i + block_size], b[j:j + block_size]
                yield i, j, ((x * x).sum(1, keepdim=True) + (y * y).sum(1) - 2 * x @ y.t()).clamp_min_(0)

    def covered(query, ref):  # the share of query points within some ref point's distance to its k-th neighbour
        nearest = {}  # per block of ref: the k + 1 smallest distances so far, the point itself being the 0-th
        for i, _, d in distances(ref, ref):
            d = torch.cat([nearest[i], d], 1) if i in nearest else d
            nearest[i] = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii = torch.cat([n[:, k] for n in nearest.values()])
        hit = torch.zeros(len(query), dtype=torch.bool, device=device)
        for i, j, d in distances(query, ref):
            hit[i:i + block_size] |= (d <= radii[j:j + block_size]).any(1)
        return hit.float().mean().item()

    return covered(fake, real), covered(real, fake)


# ----------------------------------------------------------------------------------------------
# The two sides of a comparison: images (in memory, .npz, folder, data.py dataset) or their saved statistics

class Side:
    """One image set: its statistics; its pool3 features and IS when its images were seen."""

    def __init__(self, name, mu, sigma, num_images=None, pool3=None, inception_score=None, image_size=None):
        self.name, self.mu, self.sigma, self.num_images = name, mu, sigma, num_images
        self.pool3, self.inception_score, self.image_size = pool3, inception_score, image_size

    def save(self, path):  # pool3 rows evenly spaced, up to 10k: enough for precision/recall (as ADM's ref batches)
        keep = None if self.pool3 is None else np.linspace(0, len(self.pool3) - 1, 10_000).round().astype(np.int64)
        arrays = dict(mu=self.mu, sigma=self.sigma, num_images=self.num_images, inception_score=self.inception_score,
                      pool3=None if keep is None else self.pool3[np.unique(keep)].astype(np.float32))
        util.atomic_write(path, lambda f: np.savez(f, **{k: v for k, v in arrays.items() if v is not None}))


def cache_dir(name="", data_path=None):  # another --data-path may hold other data under the same name
    tag = hashlib.sha1(os.path.abspath(data_path).encode()).hexdigest()[:8] + "-" if data_path else ""
    root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mirai", "fid")
    return os.path.join(root, tag + name) if name else root


def load_side(source, get_model, batch_size=50, device="cpu", image_size=None, data_path=None):
    """Images (uint8 NHWC), an .npz (images or statistics), a folder of images, or a dataset name -> Side; a dataset's
    statistics (of every image, ADM centre crop) are computed once and cached."""
    given = cache = None
    source = os.fspath(source) if isinstance(source, os.PathLike) else source
    if isinstance(source, (np.ndarray, torch.Tensor)):
        name, images, size = "samples", source, _as_nchw(source[:1]).shape[2]
    elif os.path.isfile(source):
        try:
            name, npz = os.path.basename(source), np.load(source)
            keys = set(npz.files)
        except Exception as e:
            raise ValueError(f"{source} is not a readable .npz file ({type(e).__name__}).") from None
        if {"mu", "sigma"} <= keys:  # beside images, as in an ADM reference batch, they cover more than the images
            given = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
        if "arr_0" not in keys:
            if given is None:
                raise ValueError(f"{source} has neither images (arr_0) nor statistics (mu, sigma); it holds "
                                 f"{sorted(keys)}.")
            get = lambda key, kind: kind(npz[key]) if key in keys else None  # noqa: E731
            return Side(name, *given, get("num_images", int), get("pool3", np.asarray), get("inception_score", float))
        images = npz["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"{source}: arr_0 must hold uint8 images (N, H, W, 3); got {images.dtype} {images.shape}.")
        size = images.shape[1]
    elif os.path.isdir(source):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(source) for f in names
                       if f.lower().endswith(data.IMAGE_EXTENSIONS))
        if not files:
            raise ValueError(f"folder {source} holds no images ({', '.join(data.IMAGE_EXTENSIONS)}).")
        from PIL import Image

        def read(i):
            with Image.open(files[i]) as img:
                a = np.asarray(img.convert("RGB"))
            if i and a.shape != first.shape:
                raise ValueError(f"{files[i]} is {a.shape[1]}x{a.shape[0]} but {files[0]} is {first.shape[1]}x"
                                 f"{first.shape[0]}: a folder of samples must hold images of one size.")
            return a

        first = read(0)
        name, images, size = os.path.basename(os.path.normpath(source)), _Lazy(len(files), read), len(first)
    else:
        if source.endswith(".npz") or os.sep in source:
            raise FileNotFoundError(f"{source} does not exist.")
        dataset = data.open_dataset(source, data_path=data_path)
        name, size = source, image_size or min(dataset.image(0).size)
        cache = cache_dir(f"{source}-{size}px.npz", data_path)
        if os.path.isfile(cache):
            side = load_side(cache, get_model)
            side.name, side.image_size = source, size
            return side
        images = _Lazy(len(dataset), lambda i: data.make_view(dataset.image(i), size, "none", 0))
    pool3, logits = extract(get_model(), images, batch_size, device)
    side = Side(name, *(given or stats(pool3)), len(pool3), pool3, inception_score(logits), size)
    if cache:
        side.save(cache)
    return side


def compare(samples, reference, device="cpu"):
    """FID, IS (of the samples), precision and recall of two Sides; None where a side lacks features."""
    both = samples.pool3 is not None and reference.pool3 is not None
    precision, recall = precision_recall(reference.pool3, samples.pool3, device=device) if both else (None, None)
    return {"fid": frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma),
            "is": samples.inception_score, "precision": precision, "recall": recall,
            "num_samples": samples.num_images, "num_reference": reference.num_images}


_references = {}  # reference Sides already loaded in this process, for training loops


def evaluate(samples, reference, model, batch_size=50, data_path=None):
    """compare()'s metrics of uint8 NHWC `samples` against `reference` (.npz, folder or dataset name, loaded once per
    process), on the FID network `model`'s device."""
    device = next(model.parameters()).device
    side = load_side(samples, lambda: model, batch_size, device)
    key = (str(reference), side.image_size, data_path)
    if key not in _references:
        _references[key] = load_side(reference, lambda: model, batch_size, device, side.image_size, data_path)
    return compare(side, _references[key], device)


# ----------------------------------------------------------------------------------------------
# The offline metric: a small classifier trained on the dataset's own training split. Where the Inception weights
# cannot be had (and on MNIST-like data, which Inception features fit poorly), the Frechet distance of its features to
# the test split's, and the share of samples it assigns their class, still tell a better generator from a worse.

CLASSIFIER_WIDTHS = (32, 64, 128, 128)  # conv blocks, a 2x2 max pool between each; the last is the feature size
CLASSIFIER_EPOCHS, CLASSIFIER_BATCH, CLASSIFIER_LR = 3, 128, 3e-3
CLASSIFIER_META = ("num_classes", "widths", "dataset", "image_size", "test_accuracy", "num_test")


class SmallClassifier(nn.Module):
    """Images (B, 3, S, S) in [-1, 1] -> (features, logits). Features, the means of the last block's ReLUs, are rarely
    exactly zero; ref_mu and ref_sigma are their statistics on the test split."""

    def __init__(self, num_classes, widths=CLASSIFIER_WIDTHS, dataset=None, image_size=32):
        super().__init__()
        layers, cin = [], 3
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            cin = w
        self.body, self.head = nn.Sequential(*layers[:-1]), nn.Linear(cin, num_classes)
        self.num_classes, self.widths, self.dataset, self.image_size = num_classes, tuple(widths), dataset, image_size
        self.test_accuracy = self.num_test = None
        self.register_buffer("ref_mu", torch.zeros(cin, dtype=torch.float64))
        self.register_buffer("ref_sigma", torch.zeros(cin, cin, dtype=torch.float64))

    def forward(self, x):
        features = self.body(x).mean((2, 3))
        return features, self.head(features)


def _classifier_input(batch, size):  # what _as_nchw takes, any size -> floats NCHW in [-1, 1], size x size
    x = _as_nchw(batch)
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (2 * x - 1).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def classify(classifier, images, batch_size=250):
    """Features (N, D) float32 and predicted classes (N,) of a batch of images, as numpy."""
    device = next(classifier.parameters()).device
    out = [classifier(_classifier_input(images[i:i + batch_size], classifier.image_size).to(device))
           for i in range(0, len(images), batch_size)]
    return torch.cat([f for f, _ in out]).float().cpu().numpy(), torch.cat([y.argmax(1) for _, y in out]).cpu().numpy()


def _views(source, size, indices=None, progress=True):  # images as the generator trains on them, and their labels
    indices = range(len(source)) if indices is None else indices
    images = [data.make_view(source.image(i), size, "none", 0)
              for i in tqdm(indices, "reading images", disable=not progress, leave=False)]
    return np.stack(images), np.array([source.label(i) for i in indices], dtype=np.int64)


def _base_name(dataset):  # the classifier learns from the training split, whichever split is named
    return re.sub("-(train|test|val)$", "", dataset)


def train_classifier(dataset, data_path=None, device="cpu", image_size=32, seed=0, progress=True):
    """Adam with a one-cycle schedule on the training split; accuracy and reference statistics from the test split.
    The same seed gives the same network (on one device and thread count)."""
    train, test = (data.open_dataset(dataset, data_path, split) for split in ("train", "test"))
    images, labels = (torch.from_numpy(a) for a in _views(train, image_size, progress=progress))
    steps = CLASSIFIER_EPOCHS * math.ceil(len(images) / CLASSIFIER_BATCH)
    with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream alone
        torch.manual_seed(seed)
        net = SmallClassifier(max(train.num_classes, int(labels.max()) + 1), dataset=_base_name(dataset),
                              image_size=image_size).to(device, memory_format=torch.channels_last)
        opt = torch.optim.Adam(net.parameters(), lr=CLASSIFIER_LR)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, CLASSIFIER_LR, total_steps=steps)
        batches = (i for _ in range(CLASSIFIER_EPOCHS) for i in torch.randperm(len(images)).split(CLASSIFIER_BATCH))
        for idx in tqdm(batches, f"training the {net.dataset} classifier", total=steps, disable=not progress):
            logits = net(_classifier_input(images[idx], image_size).to(device))[1]
            F.cross_entropy(logits, labels[idx].to(device)).backward()
            opt.step()
            opt.zero_grad()
            schedule.step()
    test_images, test_labels = _views(test, image_size, progress=progress)
    features, predicted = classify(net.eval(), test_images)
    net.test_accuracy, net.num_test = float((predicted == test_labels).mean()), len(test_images)
    net.ref_mu, net.ref_sigma = (torch.from_numpy(a).to(device) for a in stats(features))
    return net


def load_classifier(dataset, data_path=None, device="cpu", image_size=32, seed=0, train_if_missing=True,
                    progress=True):
    """The dataset's SmallClassifier in eval mode on `device`, from the cache or trained (minutes on a CPU) and cached;
    it carries .dataset, .image_size, .test_accuracy, .num_test and the reference .ref_mu, .ref_sigma."""
    path = cache_dir(f"{_base_name(dataset)}-{image_size}px-classifier{f'-seed{seed}' if seed else ''}.pt", data_path)
    if not os.path.isfile(path):
        if not train_if_missing:
            raise FileNotFoundError(f"no classifier for {dataset} at {path}; train it with "
                                    f"`python fid.py --classifier {_base_name(dataset)} --floors`.")
        start = time.time()
        net = train_classifier(dataset, data_path, device, image_size, seed, progress)
        ckpt = {"state_dict": net.state_dict(), **{k: getattr(net, k) for k in CLASSIFIER_META}}
        util.atomic_write(path, lambda f: torch.save(ckpt, f))
        print(f"classifier of {net.dataset} at {image_size}px: test accuracy {net.test_accuracy:.4f}, trained in "
              f"{time.time() - start:.0f} s, saved to {path}", file=sys.stderr)
    try:
        ckpt = util.read_checkpoint(path, "the cached classifier")
        net = SmallClassifier(ckpt["num_classes"], ckpt["widths"])
        net.load_state_dict(ckpt["state_dict"])
    except Exception as e:  # a stale or broken cache file, which retraining replaces
        raise ValueError(f"{path} is not a readable classifier ({type(e).__name__}); delete it to retrain.") from None
    net.__dict__.update({k: ckpt[k] for k in CLASSIFIER_META})
    return net.eval().to(device, memory_format=torch.channels_last)


def classifier_metrics(images_uint8_nhwc, labels, dataset, data_path=None, classifier=None, device="cpu",
                       image_size=32):
    """{"fd_classifier": Frechet distance of the classifier's features to the test split's, "class_agreement": share
    of the images classified as their `labels`, None without labels}."""
    classifier, n = classifier or load_classifier(dataset, data_path, device, image_size), len(images_uint8_nhwc)
    if classifier.dataset != _base_name(dataset):
        raise ValueError(f"the classifier was trained on {classifier.dataset}, not on {_base_name(dataset)}.")
    if n < 2 or (labels is not None and len(labels) != n):
        raise ValueError(f"the classifier metric needs 2 images or more and one label per image, got {n} images and "
                         f"{'no' if labels is None else len(labels)} labels.")
    features, predicted = classify(classifier, images_uint8_nhwc)
    return {"fd_classifier": frechet_distance(*stats(features), classifier.ref_mu.cpu(), classifier.ref_sigma.cpu()),
            "class_agreement": None if labels is None else float((predicted == np.asarray(labels)).mean())}


# ----------------------------------------------------------------------------------------------
# CLI

def _show(value, fmt=".4f"):
    return "n/a" if value is None else format(value, fmt)


def classifier_report(args, device):
    """--classifier: SAMPLES (an .npz, labels beside arr_0) against the test split of the dataset REFERENCE. --floors:
    the best numbers to expect, 2000 and 10000 random training images of the dataset SAMPLES against its test split
    ("real") and, with --vq-ckpt, their reconstructions by that tokenizer ("recon"), made as samples are."""
    if args.save_stats:
        raise ValueError("--save-stats stores Inception statistics; it does not go with --classifier.")
    dataset = args.samples if args.floors else args.reference
    clf = load_classifier(dataset, args.data_path, device, args.image_size or 32)
    if args.floors:
        from tokenizer import load_vq, to_uint8  # here, not at the top: tokenizer.py imports fid.py for rFID

        vq = load_vq(args.vq_ckpt, device=device) if args.vq_ckpt else None
        train = data.open_dataset(clf.dataset, args.data_path, "train")
        sizes = sorted({min(n, len(train)) for n in (2000, 10000)})
        order = np.random.default_rng(0).permutation(len(train))[:sizes[-1]]  # nested subsets
        images, labels = _views(train, clf.image_size, order)
        kinds = {"real": images}
        if vq is not None:
            batches = np.array_split(images, math.ceil(len(images) / 100))
            with torch.inference_mode():
                recon = [vq.decode_code(vq.encode(_classifier_input(b, clf.image_size).to(device))).cpu()
                         for b in tqdm(batches, "reconstructing", leave=False)]
            kinds["recon"] = to_uint8(torch.cat(recon))  # as samples are made
        sets = [(f"{kind} ({n} training images)", x[:n], labels[:n]) for kind, x in kinds.items() for n in sizes]
    else:
        try:
            npz = np.load(args.samples)
            images, labels = npz["arr_0"], npz["labels"] if "labels" in npz.files else None
        except Exception as e:
            raise ValueError(f"{args.samples} is not an .npz of images (arr_0) ({type(e).__name__}).") from None
        sets = [(f"{os.path.basename(args.samples)} ({len(images)} images)", images, labels)]
    rows = [(what, classifier_metrics(x, y, clf.dataset, classifier=clf)) for what, x, y in sets]
    head = (f"classifier of {clf.dataset} at {clf.image_size}px (test accuracy {clf.test_accuracy:.4f}); "
            f"reference: its {clf.num_test} test images")
    if args.json:
        return json.dumps({"classifier": head, "test_accuracy": clf.test_accuracy, "num_reference": clf.num_test,
                           "rows": [{"images": k, **m} for k, m in rows]})
    return "\n".join([head] + [f"{k:<32} fd_classifier {m['fd_classifier']:.4f}  class_agreement "
                               f"{_show(m['class_agreement'])}" for k, m in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description="FID, IS, precision and recall of generated images (pytorch-fid's "
                                            "Inception), or an offline metric from a small classifier.")
    p.add_argument("samples", help=".npz of images (arr_0, uint8 NHWC) or stats (mu, sigma), a folder, or a dataset")
    p.add_argument("reference", nargs="?", help="the same kinds as SAMPLES; dataset stats are cached in " + cache_dir())
    p.add_argument("--save-stats", metavar="PATH", help="write the statistics of SAMPLES to this new .npz")
    p.add_argument("--batch-size", type=util.POSITIVE_INT, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inception-weights", metavar="PATH",
                   help=WEIGHTS_NAME + " (default: the torch hub cache, downloaded there if missing)")
    p.add_argument("--image-size", type=util.POSITIVE_INT,
                   help="crop size for a dataset (default: the samples' size; 32 with --classifier)")
    p.add_argument("--data-path", help="data folder for a dataset name (data.py's data_path)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--classifier", action="store_true", help="offline: FD in the features of a small classifier of "
                   "the dataset REFERENCE to its test split, and the share of samples classified as their labels")
    p.add_argument("--floors", action="store_true", help="with --classifier: the best numbers to expect, from 2000 "
                   "and 10000 training images of the dataset SAMPLES (and their reconstructions, with --vq-ckpt)")
    p.add_argument("--vq-ckpt", metavar="PATH", help="with --floors: the tokenizer whose reconstructions to score")
    return util.run_command(measure, p.parse_args(argv))


def measure(args):
    """The command line's work: the metrics of SAMPLES against REFERENCE, printed; refusals raise."""
    if args.reference is None and args.save_stats is None and not args.floors:
        raise ValueError("give a REFERENCE to compare with, or --save-stats PATH to store the statistics of SAMPLES.")
    if args.save_stats and os.path.exists(args.save_stats):
        raise ValueError(f"--save-stats {args.save_stats} already exists; remove it or choose another path.")
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDA is not available")
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device {args.device} is not usable here ({e}).") from None
    if args.classifier or args.floors:
        return print(classifier_report(args, device))
    get_model = functools.cache(lambda: load_inception(args.inception_weights, device))  # stats alone need none
    samples = load_side(args.samples, get_model, args.batch_size, device, args.image_size, args.data_path)
    if args.save_stats:
        samples.save(args.save_stats)
        print(f"saved statistics of {samples.num_images} images to {args.save_stats}", file=sys.stderr)
    if args.reference is None:
        return
    reference = load_side(args.reference, get_model, args.batch_size, device,
                          args.image_size or samples.image_size, args.data_path)
    metrics = compare(samples, reference, device)
    sides = (("samples", samples), ("reference", reference))
    rows = [(k, f"{s.name} ({_show(s.num_images, 'd')} images)") for k, s in sides]
    rows += [(k, _show(metrics[k.lower()])) for k in ("FID", "IS", "precision", "recall")]
    print(json.dumps(metrics) if args.json else "\n".join(f"{k:<10} {v}" for k, v in rows))


if __name__ == "__main__":
    main()
