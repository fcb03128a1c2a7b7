"""
FID, Inception Score, precision and recall in pure torch with pytorch-fid's port of the TF Inception 2015-12-05 graph
and its weights (so numbers compare with pytorch-fid, and closely with the ADM evaluator); and where those weights are
missing, quality.py's offline metric.

    python fid.py samples.npz cifar10-train [--json]     # each side: an .npz of images or stats, a folder, a dataset
    python fid.py samples/ --save-stats samples.npz      # statistics to reuse as either side
"""
import argparse
import functools
import hashlib
import json
import math
import os
import re
import sys

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

def as_nchw(batch):  # uint8 NHWC (as in .npz files) or float/uint8 NCHW, numpy or torch -> torch NCHW, 3 channels
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
            x = as_nchw(images[i:i + batch_size]).to(device, non_blocking=True)
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
        name, images, size = "samples", source, as_nchw(source[:1]).shape[2]
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
# CLI

def show(value, fmt=".4f"):
    return "n/a" if value is None else format(value, fmt)


def parse_device(text):
    try:
        device = torch.device(text)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDA is not available")
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device {text} is not usable here ({e}).") from None
    return device


def main(argv=None):
    p = argparse.ArgumentParser(description="FID, IS, precision and recall of generated images (pytorch-fid's "
                                            "Inception).")
    p.add_argument("samples", help=".npz of images (arr_0, uint8 NHWC) or stats (mu, sigma), a folder, or a dataset")
    p.add_argument("reference", nargs="?", help="the same kinds as SAMPLES; dataset stats are cached in " + cache_dir())
    p.add_argument("--save-stats", metavar="PATH", help="write the statistics of SAMPLES to this new .npz")
    p.add_argument("--batch-size", type=util.POSITIVE_INT, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inception-weights", metavar="PATH",
                   help=WEIGHTS_NAME + " (default: the torch hub cache, downloaded there if missing)")
    p.add_argument("--image-size", type=util.POSITIVE_INT,
                   help="crop size for a dataset (default: the samples' size)")
    p.add_argument("--data-path", help="data folder for a dataset name (data.py's data_path)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    return util.run_command(measure, p.parse_args(argv))


def measure(args):
    """The command line's work: the metrics of SAMPLES against REFERENCE, printed; refusals raise."""
    if args.reference is None and args.save_stats is None:
        raise ValueError("give a REFERENCE to compare with, or --save-stats PATH to store the statistics of SAMPLES.")
    if args.save_stats and os.path.exists(args.save_stats):
        raise ValueError(f"--save-stats {args.save_stats} already exists; remove it or choose another path.")
    device = parse_device(args.device)
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
    rows = [(k, f"{s.name} ({show(s.num_images, 'd')} images)") for k, s in sides]
    rows += [(k, show(metrics[k.lower()])) for k in ("FID", "IS", "precision", "recall")]
    print(json.dumps(metrics) if args.json else "\n".join(f"{k:<10} {v}" for k, v in rows))


if __name__ == "__main__":
    main()
