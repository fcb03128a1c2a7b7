"""
FID, Inception Score, precision and recall with the standard FID Inception network, in pure torch.

The network is the TF Inception 2015-12-05 graph as ported by pytorch-fid, with its own weights
(pt_inception-2015-12-05-6726825d.pth, loaded strictly), so numbers are comparable with pytorch-fid
and close to the ADM evaluator. No scipy: the matrix square root of the Frechet distance goes through
symmetric eigendecompositions, which are exact for covariance matrices.

    python fid.py samples.npz cifar10-train            # FID, IS, precision, recall as a table
    python fid.py samples.npz ref_stats.npz --json     # ... as JSON
    python fid.py samples/ --save-stats samples.npz    # store statistics to reuse

From Python (what train.py / tokenizer.py / bench.py call):

    model = load_inception(device="cuda")              # FileNotFoundError with a hint if no weights
    pool3, logits = extract(model, images_uint8_nhwc)
    metrics = evaluate(images_uint8_nhwc, "cifar10-train", model=model)
"""
import argparse
import hashlib
import json
import math
import os
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
INPUT_SIZE = 299
BN_EPS = 1e-3             # the TF graph's batch-norm epsilon
IS_SPLITS = 10            # ADM evaluator: 50k samples in splits of 5000
PR_NEIGHBOURS = 3         # Kynkaanniemi et al. 2019
MAX_STORED_FEATURES = 10_000  # pool3 rows kept in a stats file, enough for precision/recall (as ADM's ref batches)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ----------------------------------------------------------------------------------------------
# Building blocks of the FID Inception-v3. Names follow pytorch-fid's port so its weights load.

class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm -> relu."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        # Filled by FIDInceptionV3.fold_batchnorm(); buffers so .to() moves them, outside the state_dict.
        self.register_buffer("folded_weight", None, persistent=False)
        self.register_buffer("folded_bias", None, persistent=False)

    def forward(self, x):
        if self.folded_weight is None or self.training:
            return F.relu(self.bn(self.conv(x)))
        return F.relu(F.conv2d(x, self.folded_weight, self.folded_bias, self.conv.stride, self.conv.padding))


def avg_pool_3x3(x):
    # The TF graph averages over the valid pixels only at the border.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_3x3(x)),
        ], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """Factorised 7x7 convolutions as 1x7 and 7x1 pairs."""

    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = conv(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Expanded filter bank. The 2015 graph pools by average in Mixed_7b, by max in Mixed_7c."""

    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool_3x3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
            self.branch_pool(pooled),
        ], 1)


# ----------------------------------------------------------------------------------------------
# The network

class FIDInceptionV3(nn.Module):
    """Images (B, 3, H, W), uint8 or floats in [0, 1] -> (pool3 (B, 2048), logits (B, 1008))."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # 1008 classes: the 2015 graph's ImageNet labels plus padding

    def forward(self, x):
        if x.dtype == torch.uint8:
            x = x.float() / 255
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        pool3 = x.mean(dim=(2, 3))
        return pool3, self.fc(pool3)

    @torch.no_grad()
    def fold_batchnorm(self):
        """Fold each eval-mode batch norm into its conv: one pass less over every activation map
        (~10% faster on CPU). Weights loaded afterwards undo it; call it again then."""
        for m in self.modules():
            if isinstance(m, BasicConv2d):
                scale = m.bn.weight * torch.rsqrt(m.bn.running_var + m.bn.eps)
                m.folded_weight = m.conv.weight * scale.view(-1, 1, 1, 1)
                m.folded_bias = m.bn.bias - m.bn.running_mean * scale
        return self

    def load_state_dict(self, state_dict, strict=True, assign=False):
        for m in self.modules():  # a fold of the old weights must not outlive them
            if isinstance(m, BasicConv2d):
                m.folded_weight = m.folded_bias = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def weights_path(weights=None, download=True):
    """The weights file: `weights` if given, else the torch hub cache, else downloaded into it."""
    if weights:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"--inception-weights {weights} does not exist.")
        return weights
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)
    if os.path.isfile(cached):
        return cached
    hint = (f"FID Inception weights not found: download {WEIGHTS_URL} to {cached} "
            "(or pass its path with --inception-weights).")
    if not download:
        raise FileNotFoundError(hint)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    from data import download_file  # the one downloader: progress bar, .part file, resumable

    try:
        return download_file(WEIGHTS_URL, cached)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"FID Inception weights not found and {e}") from None


def load_inception(weights=None, device="cpu", download=True):
    """The FID network with the standard weights, in eval mode on `device`.

    Raises FileNotFoundError (weights missing, with where to put them) or ValueError (unusable file).
    """
    path = weights_path(weights, download)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to unpickle means the same thing to the user
        raise ValueError(f"{path} is not a readable weights file ({type(e).__name__}), probably truncated "
                         f"or corrupt: delete it and download {WEIGHTS_URL} again.") from None
    model = FIDInceptionV3()
    expected = model.state_dict()
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not the FID Inception state_dict.")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"{path} is not {WEIGHTS_NAME}: {len(missing)} keys missing, {len(unexpected)} unexpected "
                         f"and {len(wrong)} of the wrong shape (first: {(missing + unexpected + wrong)[0]}).")
    model.load_state_dict(state, strict=True)
    return model.eval().to(device, memory_format=torch.channels_last).fold_batchnorm()


# ----------------------------------------------------------------------------------------------
# Features

def _as_nchw(batch):
    """uint8 NHWC (as in .npz files) or float/uint8 NCHW, numpy or torch -> torch NCHW, 3 channels."""
    x = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
    if x.dim() == 3:  # grayscale (N, H, W)
        x = x.unsqueeze(-1)
    if x.dim() != 4:
        raise ValueError(f"images must be a 4-d batch (N, H, W, C) or (N, C, H, W); got shape {tuple(x.shape)}.")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"images must have 1 or 3 channels; got shape {tuple(batch.shape)}.")
    if x.is_floating_point() and (x.min() < 0 or x.max() > 1):  # a [-1, 1] batch would pass silently
        raise ValueError(f"float images must lie in [0, 1], got values in [{x.min():.3g}, {x.max():.3g}]; "
                         "map [-1, 1] images with (x + 1) / 2 and clamp.")
    return x


@torch.inference_mode()
def extract(model, images, batch_size=50, device=None, progress=True):
    """pool3 features (N, 2048) and IS logits (N, 1008), both float32 numpy.

    `images`: a uint8 NHWC array (or NCHW, or floats in [0, 1]), or an iterable of such batches.
    The logits are fc(pool3) without the bias, as the ADM evaluator feeds its softmax.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if isinstance(images, (np.ndarray, torch.Tensor)):
        total = len(images)
        batches = (images[i:i + batch_size] for i in range(0, total, batch_size))
    else:
        total, batches = getattr(images, "__len__", lambda: None)(), images
    pool3, logits = [], []
    with tqdm(total=total, unit="img", desc="inception", disable=not progress, leave=False) as bar:
        for batch in batches:
            x = _as_nchw(batch).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            p, _ = model(x)
            pool3.append(p.float().cpu())
            logits.append((p @ model.fc.weight.t()).float().cpu())
            bar.update(len(x))
    if not pool3:
        raise ValueError("no images to extract features from.")
    return torch.cat(pool3).numpy(), torch.cat(logits).numpy()


def stats(pool3, chunk=8192):
    """Mean and covariance (unbiased, as numpy's cov) in float64, without a float64 copy of all rows."""
    n = len(pool3)
    if n < 2:
        raise ValueError(f"statistics need at least 2 images, got {n}.")
    mu = sum(pool3[i:i + chunk].astype(np.float64).sum(0) for i in range(0, n, chunk)) / n
    sigma = np.zeros((pool3.shape[1],) * 2)
    for i in range(0, n, chunk):
        centred = pool3[i:i + chunk].astype(np.float64) - mu
        sigma += centred.T @ centred
    return mu, sigma / (n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    S1 S2 is not symmetric, but it is similar to A S2 A with A = S1^(1/2), which is symmetric PSD:
    so its square root's trace is the sum of the square roots of eigvalsh(A S2 A). Clipping the
    round-off negatives to 0 is exact for PSD inputs, where sqrtm of the product needs an eps fudge
    (pytorch-fid) or drops an imaginary part (ADM).
    """
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(sigma1.shape)} vs {tuple(sigma2.shape)}.")
    # One thread: the eigensolvers gain little from more and lose several-fold when the cores are
    # shared (measured 1.7 s vs 8 s for a 2048 eigh on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w, v = torch.linalg.eigh(sigma1)
        root_w = w.clamp_min(0).sqrt()
        inner = root_w[:, None] * (v.T @ sigma2 @ v) * root_w  # A S2 A in the eigenbasis of S1
        trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    finally:
        torch.set_num_threads(threads)
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


def inception_score(logits, splits=IS_SPLITS):
    """exp(E_x KL(p(y|x) || p(y))), averaged over `splits` consecutive chunks (the ADM evaluator's way)."""
    logp = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=1)
    size = math.ceil(len(logp) / splits)
    scores = []
    for part in logp.split(size):
        # log of the marginal through logsumexp: stays finite where every p(y|x) underflows
        log_marginal = torch.logsumexp(part, 0) - math.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


def _sq_dists(a, b):
    return ((a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2 * a @ b.t()).clamp_min_(0)


def precision_recall(real, fake, k=PR_NEIGHBOURS, block_size=4096, device="cpu"):
    """Improved precision and recall (Kynkaanniemi et al. 2019) of pool3 features.

    Precision: share of fake points inside the real manifold (the union of balls around each real
    point reaching its k-th nearest real neighbour); recall: the same with the roles swapped.
    Distances are computed in blocks, so 50k x 50k never sits in memory.
    """
    real = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} need more than {k} images on each side.")

    def radii(x):  # squared distance to the k-th neighbour, the point itself being the 0-th
        out = []
        for i in range(0, len(x), block_size):
            best = None
            for j in range(0, len(x), block_size):
                d = _sq_dists(x[i:i + block_size], x[j:j + block_size])
                best = d if best is None else torch.cat([best, d], 1)
                best = best.topk(min(k + 1, best.shape[1]), dim=1, largest=False).values
            out.append(best[:, k])
        return torch.cat(out)

    def covered(query, ref, ref_radii):
        hits = []
        for i in range(0, len(query), block_size):
            hit = torch.zeros(len(query[i:i + block_size]), dtype=torch.bool, device=device)
            for j in range(0, len(ref), block_size):
                d = _sq_dists(query[i:i + block_size], ref[j:j + block_size])
                hit |= (d <= ref_radii[j:j + block_size]).any(1)
            hits.append(hit)
        return torch.cat(hits).float().mean().item()

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


# ----------------------------------------------------------------------------------------------
# Image sets: .npz files, folders, data.py datasets, and their statistics on disk

class Side:
    """What is known about one image set: stats always, features/logits when images were seen."""

    def __init__(self, name, mu, sigma, num_images, pool3=None, logits=None, score=None, image_size=None):
        self.name, self.mu, self.sigma, self.num_images = name, mu, sigma, num_images
        self.pool3, self.image_size = pool3, image_size
        self.inception_score = score if logits is None else inception_score(logits)

    @classmethod
    def from_features(cls, name, pool3, logits=None, image_size=None):
        mu, sigma = stats(pool3)
        return cls(name, mu, sigma, len(pool3), pool3, logits, image_size=image_size)

    def save(self, path):
        """mu, sigma (float64), num_images, a subset of pool3 rows and the IS, written atomically."""
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.num_images is not None:
            arrays["num_images"] = np.int64(self.num_images)
        if self.pool3 is not None:
            keep = np.unique(np.linspace(0, len(self.pool3) - 1, MAX_STORED_FEATURES).round().astype(np.int64))
            arrays["pool3"] = self.pool3[keep].astype(np.float32)
        if self.inception_score is not None:
            arrays["inception_score"] = np.float64(self.inception_score)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def _npz_side(path, get_model, batch_size, device):
    try:
        npz = np.load(path)
        keys = set(npz.files)
    except Exception as e:
        raise ValueError(f"{path} is not a readable .npz file ({type(e).__name__}).") from None
    name = os.path.basename(path)
    if "arr_0" in keys:
        images = npz["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"{path}: arr_0 must hold uint8 images (N, H, W, 3); got {images.dtype} {images.shape}.")
        pool3, logits = extract(get_model(), images, batch_size, device)
        side = Side.from_features(name, pool3, logits, image_size=images.shape[1])
        if {"mu", "sigma"} <= keys:  # an ADM reference batch: its stats cover more than its images
            side.mu, side.sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
        return side
    if {"mu", "sigma"} <= keys:
        return Side(name, npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64),
                    int(npz["num_images"]) if "num_images" in keys else None,
                    npz["pool3"] if "pool3" in keys else None,
                    score=float(npz["inception_score"]) if "inception_score" in keys else None)
    raise ValueError(f"{path} has neither images (arr_0) nor statistics (mu, sigma); it holds {sorted(keys)}.")


class _Batches:
    """Batches made on demand that know how many images they hold (for the progress bar)."""

    def __init__(self, count, make):
        self.count, self.make = count, make

    def __len__(self):
        return self.count

    def __iter__(self):
        return self.make()


def _folder_side(path, get_model, batch_size, device):
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    from PIL import Image

    def read(f):
        with Image.open(f) as img:
            return np.asarray(img.convert("RGB"))

    first = read(files[0])

    def batches():
        for i in range(0, len(files), batch_size):
            arrays = [read(f) for f in files[i:i + batch_size]]
            for f, a in zip(files[i:i + batch_size], arrays):
                if a.shape != first.shape:
                    raise ValueError(f"{f} is {a.shape[1]}x{a.shape[0]} but {files[0]} is {first.shape[1]}x"
                                     f"{first.shape[0]}: a folder of samples must hold images of one size.")
            yield np.stack(arrays)

    pool3, logits = extract(get_model(), _Batches(len(files), batches), batch_size, device)
    return Side.from_features(os.path.basename(os.path.normpath(path)), pool3, logits, image_size=first.shape[0])


def cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mirai", "fid")


def _dataset_side(name, get_model, batch_size, device, image_size=None, data_path=None):
    """Statistics of every image of a data.py dataset (ADM centre crop), computed once and cached."""
    try:
        import data  # only here: the rest of fid.py needs nothing of the project
    except ImportError as e:
        raise ValueError(f"{name} is not a file or folder, and data.py cannot be imported to read it "
                         f"as a dataset ({e}).") from None
    source = data.open_dataset(name, data_path=data_path)
    size = image_size or min(source.image(0).size)
    tag = hashlib.sha1(os.path.abspath(data_path).encode()).hexdigest()[:8] + "-" if data_path else ""
    path = os.path.join(cache_dir(), f"{tag}{name}-{size}px.npz")
    if os.path.isfile(path):
        side = _npz_side(path, get_model, batch_size, device)
        side.name, side.image_size = name, size
        return side

    def batches():
        for i in range(0, len(source), batch_size):
            yield np.stack([data.make_view(source.image(j), size, "none", 0)
                            for j in range(i, min(i + batch_size, len(source)))])

    pool3, logits = extract(get_model(), _Batches(len(source), batches), batch_size, device)
    side = Side.from_features(name, pool3, logits, image_size=size)
    side.save(path)
    return side


def load_side(source, get_model, batch_size=50, device="cpu", image_size=None, data_path=None):
    """An .npz (images or stats), a folder of images, or a dataset name data.py knows -> Side."""
    source = str(source)
    if os.path.isfile(source):
        return _npz_side(source, get_model, batch_size, device)
    if os.path.isdir(source):
        return _folder_side(source, get_model, batch_size, device)
    if source.endswith(".npz") or os.sep in source:
        raise FileNotFoundError(f"{source} does not exist.")
    return _dataset_side(source, get_model, batch_size, device, image_size, data_path)


def compare(samples, reference, device="cpu"):
    """FID, IS (of the samples), precision and recall of two Sides; None where a side lacks features."""
    both = samples.pool3 is not None and reference.pool3 is not None
    precision, recall = precision_recall(reference.pool3, samples.pool3, device=device) if both else (None, None)
    return {"fid": frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma),
            "is": samples.inception_score, "precision": precision, "recall": recall,
            "num_samples": samples.num_images, "num_reference": reference.num_images}


_references = {}  # reference Sides already loaded in this process, for training loops


def evaluate(samples, reference, model=None, weights=None, batch_size=50, device=None, data_path=None):
    """Metrics of uint8 NHWC `samples` against `reference` (.npz, folder or dataset name).

    Returns {"fid", "is", "precision", "recall", "num_samples", "num_reference"}; None where the
    reference gives statistics only. The reference is loaded once per process. Runs on `model`'s
    device, or loads the network (FileNotFoundError if its weights are nowhere) onto `device`.
    """
    model = model or load_inception(weights, device or "cpu")
    device = next(model.parameters()).device
    pool3, logits = extract(model, samples, batch_size, device)
    side = Side.from_features("samples", pool3, logits, image_size=_as_nchw(samples[:1]).shape[2])
    key = (str(reference), side.image_size, data_path)
    if key not in _references:
        _references[key] = load_side(reference, lambda: model, batch_size, device, side.image_size, data_path)
    return compare(side, _references[key], device)


# ----------------------------------------------------------------------------------------------
# CLI

def format_table(metrics, samples, reference):
    def show(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    rows = [("samples", f"{samples.name} ({show(samples.num_images, 'd')} images)"),
            ("reference", f"{reference.name} ({show(reference.num_images, 'd')} images)"),
            ("FID", show(metrics["fid"], ".4f")), ("IS", show(metrics["is"], ".4f")),
            ("precision", show(metrics["precision"], ".4f")), ("recall", show(metrics["recall"], ".4f"))]
    return "\n".join(f"{k:<10} {v}" for k, v in rows)


def main(argv=None):
    p = argparse.ArgumentParser(description="FID, IS, precision and recall of generated images "
                                            "(pytorch-fid's Inception).")
    p.add_argument("samples", help=".npz of images (arr_0, uint8 NHWC) or of stats (mu, sigma), a folder of images, "
                                   "or a dataset name (cifar10-train, ...)")
    p.add_argument("reference", nargs="?",
                   help="the same kinds as SAMPLES; dataset statistics are cached in " + cache_dir())
    p.add_argument("--save-stats", metavar="PATH",
                   help="write the statistics of SAMPLES to this .npz (refuses to overwrite)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inception-weights", metavar="PATH",
                   help=f"{WEIGHTS_NAME} (default: torch hub cache, downloaded if missing)")
    p.add_argument("--image-size", type=int,
                   help="crop size for a dataset reference (default: the size of the samples)")
    p.add_argument("--data-path", help="data folder for a dataset name (data.py's data_path)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    args = p.parse_args(argv)
    if args.reference is None and args.save_stats is None:
        raise SystemExit("give a REFERENCE to compare with, or --save-stats PATH to store the statistics of SAMPLES.")
    if args.save_stats and os.path.exists(args.save_stats):
        raise SystemExit(f"--save-stats {args.save_stats} already exists; remove it or choose another path.")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be a positive integer, got {args.batch_size}.")
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDA is not available")
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"--device {args.device} is not usable here ({e}).")

    model = None

    def get_model():  # stats-only comparisons never need the weights
        nonlocal model
        model = model or load_inception(args.inception_weights, device)
        return model

    try:
        samples = load_side(args.samples, get_model, args.batch_size, device, args.image_size, args.data_path)
        if args.save_stats:
            samples.save(args.save_stats)
            print(f"saved statistics of {samples.num_images} images to {args.save_stats}", file=sys.stderr)
        if args.reference is None:
            return
        reference = load_side(args.reference, get_model, args.batch_size, device,
                              args.image_size or samples.image_size, args.data_path)
        metrics = compare(samples, reference, device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e))
    print(json.dumps(metrics) if args.json else format_table(metrics, samples, reference))


if __name__ == "__main__":
    main()
