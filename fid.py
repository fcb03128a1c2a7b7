"""
FID, Inception Score, precision and recall with the standard FID Inception network, in pure torch.

The network is the TF Inception 2015-12-05 graph as ported by pytorch-fid, with its own weights
(pt_inception-2015-12-05-6726825d.pth, loaded strictly), so numbers are comparable with pytorch-fid
and close to the ADM evaluator. No scipy: the matrix square root of the Frechet distance goes through
symmetric eigendecompositions, which are exact for covariance matrices.

    python fid.py samples.npz cifar10-train            # FID, IS, precision, recall as a table
    python fid.py samples.npz ref_stats.npz --json     # ... as JSON
    python fid.py samples/ --save-stats samples.npz    # store statistics to reuse
    python fid.py samples.npz fashion-mnist --classifier  # offline: a small classifier of the dataset's own
    python fid.py --classifier fashion-mnist --floors --vq-ckpt vq.pt  # its accuracy, the best numbers to expect

From Python (what train.py / tokenizer.py / bench.py call):

    model = load_inception(device="cuda")              # FileNotFoundError with a hint if no weights
    pool3, logits = extract(model, images_uint8_nhwc)
    metrics = evaluate(images_uint8_nhwc, "cifar10-train", model=model)
    clf = load_classifier("fashion-mnist")             # trained on first use (minutes on a CPU), then cached
    metrics = classifier_metrics(images_uint8_nhwc, labels, "fashion-mnist", classifier=clf)
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from data import IMAGE_EXTENSIONS, atomic_write
from model import load_state_dict_strict

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
INPUT_SIZE = 299
BN_EPS = 1e-3             # the TF graph's batch-norm epsilon
IS_SPLITS = 10            # ADM evaluator: 50k samples in splits of 5000
PR_NEIGHBOURS = 3         # Kynkaanniemi et al. 2019
MAX_STORED_FEATURES = 10_000  # pool3 rows kept in a stats file, enough for precision/recall (as ADM's ref batches)
PSD_TOLERANCE = 1e-6      # covariance eigenvalues down to -1e-6 * trace are round-off (even stored as float32)


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
        state = data.read_checkpoint(path, "the FID Inception weights")
    except ValueError as e:
        raise ValueError(f"{e}: delete it and download {WEIGHTS_URL} again.") from None
    model = FIDInceptionV3()
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not the FID Inception state_dict.")
    load_state_dict_strict(model, state, f"{path} ({WEIGHTS_NAME}?)")
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


def _check_covariance(name, sigma):
    """ValueError unless sigma is a covariance: finite, symmetric, no eigenvalue below -PSD_TOLERANCE * trace."""
    scale = sigma.abs().max()  # NaN or inf if any entry is
    if not torch.isfinite(scale):
        raise ValueError(f"{name} holds NaN or infinite values.")
    if (sigma - sigma.T).abs().max() > PSD_TOLERANCE * scale:
        raise ValueError(f"{name} is not symmetric, so it is not a covariance matrix.")
    # Cholesky of the shifted matrix: a direct method, which cannot fail to converge, at a tenth of an eigh.
    shifted = sigma.clone()
    shifted.diagonal().add_(PSD_TOLERANCE * sigma.diagonal().clamp_min(0).sum() + torch.finfo(sigma.dtype).tiny)
    if torch.linalg.cholesky_ex(shifted).info != 0:
        raise ValueError(f"{name} has negative eigenvalues beyond round-off, so it is not a covariance matrix.")


def _trace_sqrt_product(s1, s2):
    """tr((S1 S2)^(1/2)) of PSD S1, S2. S1 S2 is similar to A S2 A with A = S1^(1/2), symmetric PSD: the
    trace is the sum of the square roots of eigvalsh(A S2 A), round-off negatives clipped to 0."""
    # MKL's eigh can fail to converge on the exactly-zero rows of low-rank covariances. A PSD matrix is zero
    # in the row and column of a zero diagonal entry, and tr sqrt(S1 S2) = tr sqrt(S2 S1): so decompose the
    # side of smaller support, restricted to it, and keep only its range (w > 0) in A S2 A.
    if (s2.diagonal() > 0).sum() < (s1.diagonal() > 0).sum():
        s1, s2 = s2, s1
    support = s1.diagonal() > 0
    s1, s2 = s1[support][:, support], s2[support][:, support]

    def via(eigh, eigvalsh):
        w, v = eigh(s1)
        root, v = w[w > 0].sqrt(), v[:, w > 0]
        inner = root[:, None] * (v.T @ s2 @ v) * root
        return eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()

    numpy_solvers = (lambda m: [torch.from_numpy(a) for a in np.linalg.eigh(m.numpy())],  # another LAPACK build
                     lambda m: torch.from_numpy(np.linalg.eigvalsh(m.numpy())))
    for solvers in ((torch.linalg.eigh, torch.linalg.eigvalsh), numpy_solvers):
        try:
            return via(*solvers)
        except (RuntimeError, np.linalg.LinAlgError):  # torch.linalg.LinAlgError is a RuntimeError
            pass
    return torch.linalg.eigvals(s1 @ s2).real.clamp_min(0).sqrt().sum()  # last resort: slower, less exact


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) of two Gaussians' statistics.

    Exact for PSD inputs, where sqrtm of the product needs an eps fudge (pytorch-fid) or drops an
    imaginary part (ADM). Raises ValueError for statistics that are no mean and covariance.
    """
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(sigma1.shape)} vs {tuple(sigma2.shape)}.")
    if not (torch.isfinite(mu1).all() and torch.isfinite(mu2).all()):
        raise ValueError("a mean (mu) holds NaN or infinite values.")
    # One thread: the eigensolvers gain little from more and lose several-fold when the cores are
    # shared (measured 1.7 s vs 8 s for a 2048 eigh on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_covariance("sigma of the first set", sigma1)
        _check_covariance("sigma of the second set", sigma2)
        trace_sqrt = _trace_sqrt_product(sigma1, sigma2)
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
        atomic_write(path, lambda f: np.savez(f, **arrays))


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


def _cache_path(name, data_path):
    tag = hashlib.sha1(os.path.abspath(data_path).encode()).hexdigest()[:8] + "-" if data_path else ""
    return os.path.join(cache_dir(), tag + name)


def _dataset_side(name, get_model, batch_size, device, image_size=None, data_path=None):
    """Statistics of every image of a data.py dataset (ADM centre crop), computed once and cached."""
    source = data.open_dataset(name, data_path=data_path)
    size = image_size or min(source.image(0).size)
    path = _cache_path(f"{name}-{size}px.npz", data_path)
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
# An offline metric: a small classifier trained on the dataset's own training split. Where the
# Inception weights cannot be had (and on MNIST-like data, which Inception features fit poorly), the
# Frechet distance of its features to the test split's, and the share of samples it assigns their
# conditioning class, tell a better generator from a worse one.

CLASSIFIER_WIDTHS = (32, 64, 128, 128)  # conv blocks, a 2x2 max pool between each; the last is the feature size
CLASSIFIER_EPOCHS, CLASSIFIER_BATCH, CLASSIFIER_LR = 3, 128, 3e-3
CLASSIFIER_META = ("num_classes", "widths", "dataset", "image_size", "test_accuracy", "num_test")


class SmallClassifier(nn.Module):
    """Images (B, 3, S, S) in [-1, 1] -> (features (B, widths[-1]), logits). The features, means of the last
    block's ReLUs, are rarely exactly zero; ref_mu and ref_sigma are their statistics on the test split."""

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


def _classifier_input(batch, size):
    """What _as_nchw takes (uint8 NHWC, any size, 1 or 3 channels) -> floats NCHW in [-1, 1], size x size."""
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


def _views(source, size, indices=None, progress=True):
    """Images of a data.py dataset as the generator trains on them (uint8 NHWC), and their labels."""
    indices = range(len(source)) if indices is None else indices
    images = [data.make_view(source.image(i), size, "none", 0)
              for i in tqdm(indices, "reading images", disable=not progress, leave=False)]
    return np.stack(images), np.array([source.label(i) for i in indices], dtype=np.int64)


def _base_name(dataset):  # the classifier learns from the training split, whichever split is named
    return next((dataset[:-len(s)] for s in ("-train", "-test", "-val") if dataset.endswith(s)), dataset)


def train_classifier(dataset, data_path=None, device="cpu", image_size=32, seed=0, progress=True):
    """Adam with a one-cycle schedule on the training split; accuracy and reference statistics from the
    test split. The same seed gives the same network (on one device and thread count)."""
    train, test = (data.open_dataset(dataset, data_path, split) for split in ("train", "test"))
    images, labels = (torch.from_numpy(a) for a in _views(train, image_size, progress=progress))
    steps = CLASSIFIER_EPOCHS * math.ceil(len(images) / CLASSIFIER_BATCH)
    with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream alone
        torch.manual_seed(seed)
        net = SmallClassifier(max(train.num_classes, int(labels.max()) + 1), dataset=_base_name(dataset),
                              image_size=image_size).to(device, memory_format=torch.channels_last)
        opt = torch.optim.Adam(net.parameters(), lr=CLASSIFIER_LR)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, CLASSIFIER_LR, total_steps=steps)
        with tqdm(total=steps, desc=f"training the {net.dataset} classifier", disable=not progress) as bar:
            for _ in range(CLASSIFIER_EPOCHS):
                for idx in torch.randperm(len(images)).split(CLASSIFIER_BATCH):
                    logits = net(_classifier_input(images[idx], image_size).to(device))[1]
                    F.cross_entropy(logits, labels[idx].to(device)).backward()
                    opt.step()
                    opt.zero_grad()
                    schedule.step()
                    bar.update()
    test_images, test_labels = _views(test, image_size, progress=progress)
    features, predicted = classify(net.eval(), test_images)
    net.test_accuracy, net.num_test = float((predicted == test_labels).mean()), len(test_images)
    net.ref_mu, net.ref_sigma = (torch.from_numpy(a).to(device) for a in stats(features))
    return net


def load_classifier(dataset, data_path=None, device="cpu", image_size=32, seed=0, train_if_missing=True,
                    progress=True):
    """The dataset's SmallClassifier in eval mode on `device`, from the cache or trained (minutes on a CPU)
    and cached; it carries .dataset, .image_size, .test_accuracy and the reference .ref_mu, .ref_sigma."""
    seed_tag = f"-seed{seed}" if seed else ""
    path = _cache_path(f"{_base_name(dataset)}-{image_size}px-classifier{seed_tag}.pt", data_path)
    if not os.path.isfile(path):
        if not train_if_missing:
            raise FileNotFoundError(f"no classifier for {dataset} at {path}; train it with "
                                    f"`python fid.py --classifier {_base_name(dataset)} --floors`.")
        start = time.time()
        net = train_classifier(dataset, data_path, device, image_size, seed, progress)
        ckpt = {"state_dict": net.state_dict(), **{k: getattr(net, k) for k in CLASSIFIER_META}}
        atomic_write(path, lambda f: torch.save(ckpt, f))
        print(f"classifier of {net.dataset} at {image_size}px: test accuracy {net.test_accuracy:.4f}, trained in "
              f"{time.time() - start:.0f} s, saved to {path}", file=sys.stderr)
    try:
        ckpt = data.read_checkpoint(path, "the cached classifier")
        net = SmallClassifier(ckpt["num_classes"], ckpt["widths"])
        net.load_state_dict(ckpt["state_dict"])
    except Exception as e:  # a stale or broken cache file, which retraining replaces
        raise ValueError(f"{path} is not a readable classifier ({type(e).__name__}); delete it to retrain.") from None
    net.__dict__.update({k: ckpt[k] for k in CLASSIFIER_META})
    return net.eval().to(device, memory_format=torch.channels_last)


def classifier_metrics(images_uint8_nhwc, labels, dataset, data_path=None, classifier=None, device="cpu",
                       image_size=32):
    """{"fd_classifier": Frechet distance of the classifier's features to those of the test split,
    "class_agreement": share of the images classified as their `labels`, None without labels}."""
    classifier = classifier or load_classifier(dataset, data_path, device, image_size)
    if classifier.dataset != _base_name(dataset):
        raise ValueError(f"the classifier was trained on {classifier.dataset}, not on {_base_name(dataset)}.")
    if len(images_uint8_nhwc) < 2 or (labels is not None and len(labels) != len(images_uint8_nhwc)):
        raise ValueError(f"the classifier metric needs 2 images or more and one label per image, got "
                         f"{len(images_uint8_nhwc)} images and {'no' if labels is None else len(labels)} labels.")
    features, predicted = classify(classifier, images_uint8_nhwc)
    return {"fd_classifier": frechet_distance(*stats(features), classifier.ref_mu.cpu(), classifier.ref_sigma.cpu()),
            "class_agreement": None if labels is None else float((predicted == np.asarray(labels)).mean())}


def classifier_floors(classifier, data_path=None, sizes=(2000, 10000), vq=None, progress=True):
    """The best numbers to expect, [(what, n, metrics)]: n random training images against the test split
    ("real") and, given a VQ tokenizer (encode, decode_code), their reconstructions ("recon")."""
    train = data.open_dataset(classifier.dataset, data_path, "train")
    sizes = sorted({min(n, len(train)) for n in sizes})
    order = np.random.default_rng(0).permutation(len(train))[:sizes[-1]]  # nested subsets
    images, labels = _views(train, classifier.image_size, order, progress)
    kinds = [("real", images)]
    if vq is not None:
        device = next(vq.parameters()).device
        with torch.inference_mode():
            recon = torch.cat([vq.decode_code(vq.encode(_classifier_input(b, classifier.image_size).to(device))).cpu()
                               for b in tqdm(np.array_split(images, math.ceil(len(images) / 100)), "reconstructing",
                                             disable=not progress, leave=False)])
        from tokenizer import to_uint8  # tokenizer.py imports fid.py for rFID: not at the top

        kinds.append(("recon", to_uint8(recon)))  # as samples are made
    return [(kind, n, classifier_metrics(x[:n], labels[:n], classifier.dataset, classifier=classifier))
            for kind, x in kinds for n in sizes]


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


def classifier_report(args, device):
    """What --classifier prints: SAMPLES (an .npz, labels beside arr_0) against the test split of the
    dataset REFERENCE names, or with --floors the floors of the dataset SAMPLES names."""
    if args.save_stats:
        raise ValueError("--save-stats stores Inception statistics; it does not go with --classifier.")
    dataset = args.samples if args.floors else args.reference
    clf = load_classifier(dataset, args.data_path, device, args.image_size or 32)
    if args.floors:
        from tokenizer import load_vq  # here, not at the top: tokenizer.py imports fid.py for rFID

        vq = load_vq(args.vq_ckpt, device=device) if args.vq_ckpt else None
        rows = [(f"{kind} ({n} training images)", m) for kind, n, m in classifier_floors(clf, args.data_path, vq=vq)]
    else:
        try:
            npz = np.load(args.samples)
            images, labels = npz["arr_0"], npz["labels"] if "labels" in npz.files else None
        except Exception as e:
            raise ValueError(f"{args.samples} is not an .npz of images (arr_0) ({type(e).__name__}).") from None
        rows = [(f"{os.path.basename(args.samples)} ({len(images)} images)",
                 classifier_metrics(images, labels, clf.dataset, classifier=clf))]
    head = (f"classifier of {clf.dataset} at {clf.image_size}px (test accuracy {clf.test_accuracy:.4f}); "
            f"reference: its {clf.num_test} test images")
    if args.json:
        return json.dumps({"classifier": head, "test_accuracy": clf.test_accuracy, "num_reference": clf.num_test,
                           "rows": [{"images": k, **m} for k, m in rows]})
    return "\n".join([head] + [f"{k:<32} fd_classifier {m['fd_classifier']:.4f}  class_agreement "
                               f"{'n/a' if m['class_agreement'] is None else format(m['class_agreement'], '.4f')}"
                               for k, m in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description="FID, IS, precision and recall of generated images "
                                            "(pytorch-fid's Inception).")
    p.add_argument("samples", help=".npz of images (arr_0, uint8 NHWC) or of stats (mu, sigma), a folder of images, "
                                   "or a dataset name (cifar10-train, ...)")
    p.add_argument("reference", nargs="?",
                   help="the same kinds as SAMPLES; dataset statistics are cached in " + cache_dir())
    p.add_argument("--save-stats", metavar="PATH",
                   help="write the statistics of SAMPLES to this .npz (refuses to overwrite)")
    p.add_argument("--batch-size", type=data.POSITIVE_INT, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inception-weights", metavar="PATH",
                   help=f"{WEIGHTS_NAME} (default: torch hub cache, downloaded if missing)")
    p.add_argument("--image-size", type=data.POSITIVE_INT,
                   help="crop size for a dataset reference (default: the size of the samples; 32 with --classifier)")
    p.add_argument("--data-path", help="data folder for a dataset name (data.py's data_path)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--classifier", action="store_true",
                   help="offline metric: Frechet distance in the features of a small classifier trained (minutes, then "
                        "cached) on the dataset REFERENCE names, against its test split, and share of samples "
                        "classified as their labels")
    p.add_argument("--floors", action="store_true", help="with --classifier: the classifier's test accuracy and the "
                   "metric of 2000 and 10000 training images of the dataset SAMPLES names (and their reconstructions)")
    p.add_argument("--vq-ckpt", metavar="PATH", help="with --floors: the tokenizer whose reconstructions to score")
    args = p.parse_args(argv)
    if args.reference is None and args.save_stats is None and not args.floors:
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
    if args.classifier or args.floors:
        try:
            return print(classifier_report(args, device))
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(str(e))

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
