"""
The Mirai losses: foresight targets aligned with an intermediate hidden state of the GPT.

Sequence [class, x_0 .. x_{N-2}]: the GPT's position p >= 1 has read cell p-1 of the H x W grid, in
raster order. The student is the residual stream after block d at those positions, through one
projector per target; each target k pairs the student that read cell (r, c) with a teacher feature
at cell (r, c) + offset_k, and the loss is the mean negative cosine over the valid pairs:

  Mirai-E (explicit): the EMA model's own hidden state after block d at the position that read the
                      neighbour cell (the EMA is the teacher; nothing is copied).
  Mirai-I (implicit): a frozen bidirectional encoder's patch feature at the cell (DINOv2, or the
                      tokenizer's own encoder where there is no internet).
  output level:       instead of aligning hidden states, extra heads predict the token the neighbour
                      position predicts, with cross-entropy (the paper's "injection level" diagnostic).

Pairs whose neighbour falls off the grid are masked out, never wrapped to the next row. None of this
is used at sampling time: the GPT's weights stay LlamaGen's.
"""
import argparse
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from util import NONNEG

# The 2D neighbour order for K = 1..9 (row offset, column offset).
NEIGHBOURS_2D = ((0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_DIMS = {"s": 384, "b": 768, "l": 1024, "g": 1536}


def default_depth(n_layer):
    return max(1, round(2 * n_layer / 3))


def default_proj_dim(dim):
    # the paper's 2048 is sized for GPT-B (dim 768) and up; three such heads would outweigh a small model
    return 2048 if dim >= 768 else 2 * dim


# ----------------------------------------------------------------------------------------------------
# Grid neighbourhoods


def neighbour_pairs(grid, k, layout="2d", num_targets=None):
    """For each of the k targets, (student_cells, target_cells): LongTensors of equal length.

    Students are the cells 0..N-2 (cell N-1 is never read, so no position holds it). Targets are the
    cells below num_targets: N-1 for the EMA (only read cells have a hidden state), N for an image encoder.
    2d: neighbour (dy, dx) of (r, c) is (r+dy, c+dx) when inside the grid; 1d: the cell j steps later in
    raster order (the next k-1 tokens, the flat sequence's own future).
    """
    H, W = (grid, grid) if isinstance(grid, int) else grid
    N = H * W
    num_targets = N - 1 if num_targets is None else num_targets
    if layout not in ("2d", "1d"):
        raise ValueError(f"--foresight-layout {layout!r} is unknown; expected 2d or 1d")
    if layout == "2d" and not 1 <= k <= len(NEIGHBOURS_2D):
        raise ValueError(f"--foresight-k {k} is out of range: the 2d layout has 1..{len(NEIGHBOURS_2D)} targets")
    if k < 1:
        raise ValueError(f"--foresight-k {k} must be at least 1")
    cells = torch.arange(N - 1)
    r, c = cells // W, cells % W
    pairs = []
    for j in range(k):
        if layout == "2d":
            dy, dx = NEIGHBOURS_2D[j]
            tr, tc = r + dy, c + dx
            target = tr * W + tc
            valid = (tr < H) & (tc < W) & (target < num_targets)
        else:
            target = cells + j
            valid = target < num_targets
        pairs.append((cells[valid], target[valid]))
    return pairs


# ----------------------------------------------------------------------------------------------------
# Projector heads


def projector(dim, hidden, out_dim):
    """The paper's head: Linear(dim, P) - SiLU - Linear(P, P) - SiLU - Linear(P, out)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))


# ----------------------------------------------------------------------------------------------------
# The loss


class Foresight(nn.Module):
    """Projector heads plus the pairing; forward(student hidden, teacher targets) -> per-target losses.

    mode "explicit": targets are EMA hidden states (B, N, dim) at sequence positions (position 0 is the
    class token); "implicit": encoder features (B, N, C) at cells; "output": the token ids (B, N).
    """

    def __init__(self, mode, dim, grid, k=3, layout="2d", proj_dim=None, target_dim=None, vocab_size=None):
        super().__init__()
        if mode not in ("explicit", "implicit", "output"):
            raise ValueError(f"foresight mode {mode!r} is unknown")
        self.mode = mode
        N = grid * grid if isinstance(grid, int) else grid[0] * grid[1]
        proj_dim = proj_dim or default_proj_dim(dim)
        if mode == "explicit":
            out, num_targets = dim, N - 1
        elif mode == "implicit":
            if not target_dim:
                raise ValueError("implicit foresight needs the encoder's feature size")
            out, num_targets = target_dim, N
        else:
            # the (0,0) neighbour's token is the model's own next token: its own head already predicts it
            out, num_targets = vocab_size, N - 1
        pairs = neighbour_pairs(grid, k, layout, num_targets)
        if mode == "output":
            pairs = pairs[1:]
            if not pairs:
                raise ValueError("output-level foresight needs --foresight-k >= 2 (target 1 is the model's own next token)")
        self.k = len(pairs)
        self.projectors = nn.ModuleList(projector(dim, proj_dim, out) for _ in pairs)
        # pairs live as buffers so they follow .to(device); not persistent: they are derived from the config
        for j, (s, t) in enumerate(pairs):
            self.register_buffer(f"student_{j}", s, persistent=False)
            self.register_buffer(f"target_{j}", t, persistent=False)

    def pairs(self, j):
        return getattr(self, f"student_{j}"), getattr(self, f"target_{j}")

    def forward(self, hidden, targets):
        """hidden: (B, N, dim) residual stream after block d (position 0 = class token).
        Returns a (k,) tensor of losses: mean -cos per target, or cross-entropy at the output level."""
        student = hidden[:, 1:]  # position p read cell p-1
        losses = []
        for j, head in enumerate(self.projectors):
            s, t = self.pairs(j)
            p = head(student[:, s])  # only students with a valid pair: the edge-masked rows cost nothing
            if self.mode == "explicit":
                tgt = targets[:, t + 1]  # the position that read cell t
            elif self.mode == "implicit":
                tgt = targets[:, t]
            else:  # that position predicts token x_{t+1}
                losses.append(F.cross_entropy(p.reshape(-1, p.shape[-1]).float(), targets[:, t + 1].reshape(-1)))
                continue
            losses.append(-F.cosine_similarity(p.float(), tgt.float(), dim=-1).mean())
        return torch.stack(losses)


def coef_schedule(step, total_steps, warmup_steps, schedule="constant"):
    """Multiplier of the foresight coefficients at `step`: 0 during the warm-up of plain next-token
    training, then constant, or a cosine decay to 0 at the last step, or piecewise constant given as
    'step:scale,step:scale,...' (the scale of the last milestone reached, 1 before the first)."""
    if step < warmup_steps:
        return 0.0
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))
    scale = 1.0
    for point in schedule.split(","):
        at, value = point.split(":")
        if step >= int(at):
            scale = float(value)
    return scale


def parse_schedule(text):
    """Validate a --foresight-schedule value; returns it unchanged."""
    if text in ("constant", "cosine"):
        return text
    try:
        points = [p.split(":") for p in text.split(",")]
        assert all(len(p) == 2 for p in points)
        [(int(a), float(b)) for a, b in points]
    except (AssertionError, ValueError):
        raise ValueError(f"--foresight-schedule {text!r}: expected constant, cosine, or 'step:scale,step:scale'") from None
    return text


# The flags' forms: lambda per target, the warm-up in steps, epochs or a share of the run

WARMUP = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ep|%)?\s*")


def warmup_text(text):
    if not WARMUP.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected steps (500), epochs (15ep) or a share of the run (10%), got {text!r}")
    return text


def coef_list(text):
    """--foresight-coef: one lambda for all targets or one per target, each finite and >= 0."""
    return [NONNEG(c) for c in str(text).split(",")]


def expand_coefs(coefs, k):
    coefs = coef_list(coefs) if isinstance(coefs, str) else list(coefs)  # older checkpoints stored the text
    if len(coefs) not in (1, k):
        raise ValueError(f"--foresight-coef has {len(coefs)} values for {k} targets: give one, or one per target")
    return coefs * k if len(coefs) == 1 else coefs


def warmup_flag(a):
    """--foresight-warmup of a run's flags (a dict), its default filled in: 15 epochs for Mirai-E."""
    return a.get("foresight_warmup") or ("15ep" if a.get("foresight") == "explicit" else "0")


def parse_warmup(text, steps_per_epoch, total_steps):
    value, unit = WARMUP.fullmatch(text).groups()
    value = float(value)
    return int(value * steps_per_epoch) if unit == "ep" else int(value / 100 * total_steps) if unit == "%" else int(value)


# ----------------------------------------------------------------------------------------------------
# Teachers


@torch.no_grad()
def ema_targets(ema, idx, cond, depth):
    """Mirai-E's targets: the EMA model's residual stream after block `depth`, in eval mode, computed
    only up to that block. Runs under whatever autocast the caller (the student's step) has on."""
    was_training = ema.training
    ema.eval()
    _, _, hidden = ema(idx, cond, hidden_layer=depth, drop_labels=False, stop_at_hidden=True)
    ema.train(was_training)
    return hidden


class ImageEncoderTeacher(nn.Module):
    """Mirai-I's frozen encoder: uint8 images (B, 3, S, S) -> features (B, H*W, C) at the token grid."""

    def __init__(self, encoder, grid, feature_dim, input_size, mean=None, std=None, kind="encoder"):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.grid, self.feature_dim, self.input_size, self.kind = grid, feature_dim, input_size, kind
        # images arrive in [0, 1]; mean/std map them to what the encoder was trained on
        self.register_buffer("mean", torch.tensor(mean or (0.5, 0.5, 0.5)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or (0.5, 0.5, 0.5)).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):  # frozen: always eval (no dropout, fixed norm statistics)
        return super().train(False)

    @torch.no_grad()
    def forward(self, images):
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        if self.kind == "dinov2":
            feats = self.encoder.forward_features(x)["x_norm_patchtokens"]
        else:
            feats = self.encoder.encoder_features(x).flatten(2).transpose(1, 2)
        if feats.shape[1] != self.grid * self.grid:
            raise ValueError(f"the {self.kind} teacher gives {feats.shape[1]} patches, the tokens are a {self.grid}x{self.grid} grid")
        return feats


def dinov2_teacher(name, grid):
    """DINOv2 from torch.hub (downloads on first use): dinov2_vit{s,b,l,g}14[_reg]; the input is resized
    (bicubic) to 14*grid pixels so its patch grid equals the token grid."""
    size = name.removeprefix("dinov2_vit")[:1]
    if not name.startswith("dinov2_vit") or size not in DINO_DIMS or not name.removeprefix(f"dinov2_vit{size}").startswith("14"):
        raise ValueError(f"--foresight-encoder {name!r}: expected dinov2_vit{{s,b,l,g}}14 (optionally _reg) or vq")
    try:
        model = torch.hub.load("facebookresearch/dinov2", name)
    except Exception as e:
        raise RuntimeError(
            f"could not load {name} from torch.hub ({type(e).__name__}: {e}); it needs internet once, then it is "
            f"cached in {torch.hub.get_dir()}; offline, use --foresight-encoder vq"
        ) from None
    return ImageEncoderTeacher(model, grid, DINO_DIMS[size], 14 * grid, IMAGENET_MEAN, IMAGENET_STD, kind="dinov2")


def vq_teacher(vq, grid):
    """The tokenizer's own encoder as an offline Mirai-I teacher: its features at the token grid, the
    image resized so that the encoder's grid equals the token grid (or refused if it cannot be)."""
    ds = vq.downsample_factor
    feats = vq.encoder_features(torch.zeros(1, 3, grid * ds, grid * ds, device=next(vq.parameters()).device))
    return ImageEncoderTeacher(vq, grid, feats.shape[1], grid * ds, kind="vq")


# ----------------------------------------------------------------------------------------------------
# The training step: what train.py calls, so the teacher, K and depth are each chosen in one place


def build(mode, gpt, level="representation", k=None, depth=None, layout="2d", proj_dim=None, encoder="vq", vq=None):
    """-> (Foresight heads or None, teacher or None, depth). mode: none, explicit or implicit; the teacher
    of Mirai-I is DINOv2 (`encoder` dinov2_vit*14) or the tokenizer's encoder ("vq", needs `vq`)."""
    if mode == "none":
        return None, None, None
    cfg = gpt.config
    depth = depth if depth is not None else default_depth(cfg.n_layer)
    if not 1 <= depth <= cfg.n_layer:
        raise ValueError(f"--foresight-depth {depth} is outside the model's 1..{cfg.n_layer} blocks")
    if level == "output" and mode == "implicit":
        raise ValueError("--foresight-level output predicts the neighbours' own tokens: use it with --foresight explicit")
    k = k if k is not None else (3 if mode == "explicit" else 1)
    proj_dim = proj_dim if proj_dim is not None else default_proj_dim(cfg.dim)
    teacher = None
    if mode == "implicit":
        if encoder == "vq":
            if vq is None:
                raise ValueError("--foresight-encoder vq needs --vq-ckpt (the tokenizer whose encoder is the teacher)")
            teacher = vq_teacher(vq, cfg.grid_size)
        else:
            teacher = dinov2_teacher(encoder, cfg.grid_size)
    kind = "output" if level == "output" else mode
    heads = Foresight(kind, cfg.dim, cfg.grid_size, k=k, layout=layout, proj_dim=proj_dim,
                      target_dim=teacher.feature_dim if teacher is not None else None, vocab_size=cfg.vocab_size)
    # what a resumed run must share with the checkpoint for the heads to mean the same thing
    heads.setup = dict(mode=heads.mode, k=heads.k, depth=depth, layout=layout, encoder=encoder if mode == "implicit" else None)
    return heads, teacher, depth


class Student(nn.Module):
    """The GPT plus its foresight heads: one module, so DDP syncs both in one backward."""

    def __init__(self, gpt, foresight=None, depth=None):
        super().__init__()
        self.gpt, self.foresight, self.depth = gpt, foresight, depth

    def forward(self, x, cond, fs_targets=None):
        layer = self.depth if self.foresight is not None else None
        _, ntp, hidden = self.gpt(x[:, :-1], cond, targets=x, hidden_layer=layer, drop_labels=False)
        if self.foresight is None:
            return ntp, None
        if fs_targets is None:
            # warm-up: the heads sit out, but DDP wants every parameter in the graph; this costs nothing
            return ntp, sum(p.sum() for p in self.foresight.parameters()) * 0.0
        return ntp, self.foresight(hidden, fs_targets)


def step_losses(student, fs, depth, teacher, ema, x, cond, images, coefs, scale):
    """One micro-batch of training: (total loss, NTP loss, per-target foresight losses or None).
    student: the Student (or its DDP / compiled wrapper); fs, depth: its heads and block; x: (B, N) codes;
    cond: the class ids after label dropout, which student and teacher share; images: the crops that
    made the codes (Mirai-I); coefs: (K,) lambdas; scale: the schedule's factor (0 in the warm-up, when
    no teacher runs)."""
    targets = None
    if fs is not None and scale > 0:
        if fs.mode == "explicit":
            targets = ema_targets(ema, x[:, :-1], cond, depth)
        elif fs.mode == "implicit":
            targets = teacher(images)
        else:
            targets = x
    ntp, fs_losses = student(x, cond, targets)
    if fs_losses is None:
        return ntp, ntp, None
    return ntp + ((coefs * scale * fs_losses).sum() if scale > 0 else fs_losses), ntp, fs_losses
