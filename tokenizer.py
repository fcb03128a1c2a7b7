"""The VQ tokenizer: LlamaGen's VQ model, its training, and encoding a dataset to codes.

    python tokenizer.py train --dataset fashion-mnist --image-size 32 --vq-model VQ-S --results-dir runs/vq
    python tokenizer.py extract --vq-ckpt runs/vq/checkpoints/0005000.pt --dataset fashion-mnist \
        --image-size 32 --views flip --code-path codes/fmnist

The model keeps LlamaGen's parameter names and numerics, so LlamaGen's `vq_ds16_c2i.pt` loads strictly
(`load_vq(path, preset="VQ-16")`). The one deliberate difference: `quantize.codebook_used` is a plain
buffer (LlamaGen wraps it in an nn.Parameter, which breaks in-place updates on a CPU in training).
There is no perceptual (LPIPS) loss: it needs VGG weights, which we do not ship.
"""
import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from data import (NONNEG, NONNEG_INT, POSITIVE, POSITIVE_INT, PROBABILITY, Logger, add_options, arg_type,
                  atomic_write, barrier, cleanup_distributed, option, read_checkpoint, save_atomic, save_grid, setup_distributed)
from model import load_state_dict_strict

# ----------------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------------


@dataclass
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: tuple = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple = (1, 1, 2, 2, 4)
    z_channels: int = 256
    dropout_p: float = 0.0
    ch: int = 128
    num_res_blocks: int = 2

    def __post_init__(self):
        # json round-trips turn tuples into lists; keep one form so configs compare equal
        self.encoder_ch_mult = tuple(self.encoder_ch_mult)
        self.decoder_ch_mult = tuple(self.decoder_ch_mult)
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError("encoder_ch_mult and decoder_ch_mult must have the same length "
                             f"(got {self.encoder_ch_mult} and {self.decoder_ch_mult})")


VQ_PRESETS = {
    "VQ-16": VQConfig(encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4)),  # 256 px -> 16x16
    "VQ-8": VQConfig(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4)),  # 256 px -> 32x32
    # CIFAR scale: 32 px -> 8x8 tokens; narrow enough to train on a laptop CPU in minutes.
    # GroupNorm(32) needs every width to be a multiple of 32.
    "VQ-S": VQConfig(codebook_size=1024, codebook_embed_dim=8, encoder_ch_mult=(1, 2, 2),
                     decoder_ch_mult=(1, 2, 2), z_channels=64, ch=32),
}

USAGE_WINDOW = 65536  # LlamaGen remembers the last 65536 code indices to measure codebook usage


def get_config(preset):
    """A VQConfig from a preset name (or a VQConfig passed through)."""
    if isinstance(preset, VQConfig):
        return preset
    if preset not in VQ_PRESETS:
        raise ValueError(f"unknown VQ preset {preset!r}; expected one of {', '.join(VQ_PRESETS)}")
    return VQConfig(**asdict(VQ_PRESETS[preset]))

# ----------------------------------------------------------------------------------------------------
# Building blocks (LlamaGen / taming-transformers layout and names)
# ----------------------------------------------------------------------------------------------------


def swish(x):
    return x * torch.sigmoid(x)


def group_norm(channels):
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch, out_ch, dropout=0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convolutions as projections."""

    def __init__(self, ch):
        super().__init__()
        self.norm = group_norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (t(y).reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c), as LlamaGen
        return x + self.proj_out(y.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        # asymmetric padding (right and bottom only) keeps LlamaGen's pixel alignment
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, mult, n_res = cfg.ch, cfg.encoder_ch_mult, cfg.num_res_blocks
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        ch_in = ch
        for level, m in enumerate(mult):
            block, ch_out = nn.Module(), ch * m
            block.res = nn.ModuleList()
            block.attn = nn.ModuleList()
            for _ in range(n_res):
                block.res.append(ResnetBlock(ch_in, ch_out, cfg.dropout_p))
                ch_in = ch_out
                if level == len(mult) - 1:  # attention only at the lowest resolution
                    block.attn.append(AttnBlock(ch_in))
            if level != len(mult) - 1:
                block.downsample = Downsample(ch_in)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList([ResnetBlock(ch_in, ch_in, cfg.dropout_p), AttnBlock(ch_in),
                                  ResnetBlock(ch_in, ch_in, cfg.dropout_p)])
        self.norm_out = group_norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn) > 0:
                    h = block.attn[i](h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for layer in self.mid:
            h = layer(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, mult, n_res = cfg.ch, cfg.decoder_ch_mult, cfg.num_res_blocks
        ch_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch_in, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(ch_in, ch_in, cfg.dropout_p), AttnBlock(ch_in),
                                  ResnetBlock(ch_in, ch_in, cfg.dropout_p)])
        self.conv_blocks = nn.ModuleList()
        for level, m in enumerate(reversed(mult)):
            block, ch_out = nn.Module(), ch * m
            block.res = nn.ModuleList()
            block.attn = nn.ModuleList()
            for _ in range(n_res + 1):  # the decoder has one residual block more per level
                block.res.append(ResnetBlock(ch_in, ch_out, cfg.dropout_p))
                ch_in = ch_out
                if level == 0:
                    block.attn.append(AttnBlock(ch_in))
            if level != len(mult) - 1:
                block.upsample = Upsample(ch_in)
            self.conv_blocks.append(block)
        self.norm_out = group_norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for layer in self.mid:
            h = layer(h)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn) > 0:
                    h = block.attn[i](h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


def entropy_loss(affinity, temperature=0.01):
    """Low per-token entropy (confident assignments) minus high codebook-wide entropy (use all codes)."""
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits + 1e-5, dim=-1)
    avg_probs = probs.mean(dim=0)
    avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
    sample_entropy = -(probs * log_probs).sum(dim=-1).mean()
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_e, self.e_dim, self.l2_norm = cfg.codebook_size, cfg.codebook_embed_dim, cfg.codebook_l2_norm
        self.beta, self.entropy_ratio = cfg.commit_loss_beta, cfg.entropy_loss_ratio
        self.show_usage = cfg.codebook_show_usage
        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)
            if self.l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # a ring of the most recent code indices; -1 marks "never filled" (LlamaGen starts at 0,
        # which counts code 0 as used from the start)
        self.register_buffer("codebook_used", torch.full((USAGE_WINDOW,), -1.0))

    def codebook(self):
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def usage(self):
        """Fraction of the codebook seen among the last 65536 codes produced in training mode."""
        seen = self.codebook_used[self.codebook_used >= 0]
        return seen.unique().numel() / self.n_e

    def forward(self, z):
        """z (B, C, H, W) -> (z_q (B, C, H, W), codes (B, H, W), losses dict; empty in eval mode)."""
        z = z.float().permute(0, 2, 3, 1)  # distances in float32 even under bf16 autocast
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        emb = self.codebook().float()
        flat = z.reshape(-1, self.e_dim)
        d = flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * flat @ emb.t()
        idx = d.argmin(dim=1)
        z_q = emb[idx].view(z.shape)
        losses = {}
        if self.training:
            if self.show_usage:
                with torch.no_grad():
                    n = min(idx.numel(), USAGE_WINDOW)
                    used = torch.cat([self.codebook_used[n:], idx[-n:].to(self.codebook_used.dtype)])
                    self.codebook_used.copy_(used)
            losses["codebook"] = (z_q - z.detach()).pow(2).mean()
            losses["commit"] = self.beta * (z_q.detach() - z).pow(2).mean()
            if self.entropy_ratio > 0:
                losses["entropy"] = self.entropy_ratio * entropy_loss(-d)
            z_q = z + (z_q - z).detach()  # straight-through: the decoder's gradient goes to the encoder
        return z_q.permute(0, 3, 1, 2).contiguous(), idx.view(z.shape[:-1]), losses

# ----------------------------------------------------------------------------------------------------
# The VQ model
# ----------------------------------------------------------------------------------------------------


class VQModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    @property
    def downsample_factor(self):
        return 2 ** (len(self.config.encoder_ch_mult) - 1)

    def grid_size(self, image_size):
        """Side of the token grid for square images of side image_size."""
        f = self.downsample_factor
        if image_size % f != 0:
            raise ValueError(f"image size {image_size} is not a multiple of the tokenizer's stride {f}")
        return image_size // f

    def forward(self, x):
        """Training pass: x in [-1, 1] -> (reconstruction, codes (B, H, W), quantizer losses dict)."""
        z_q, codes, losses = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decode(z_q), codes, losses

    def decode(self, z_q):
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def encode(self, x):
        """Images (B, 3, S, S) float in [-1, 1] -> codes (B, S/f, S/f) long."""
        return self.quantize(self.quant_conv(self.encoder(x)))[1]

    @torch.no_grad()
    def decode_code(self, codes, grid=None):
        """Codes (B, H, W) or (B, N) (square grid unless grid=(H, W)) -> images (B, 3, fH, fW), ~[-1, 1]."""
        if codes.dim() == 2:
            n = codes.shape[1]
            h, w = grid if grid is not None else (math.isqrt(n), math.isqrt(n))
            if h * w != n:
                raise ValueError(f"cannot lay {n} codes on a square grid; pass grid=(H, W)")
            codes = codes.reshape(-1, h, w)
        z_q = self.quantize.codebook()[codes.long()].permute(0, 3, 1, 2).contiguous()
        return self.decode(z_q)

    @torch.no_grad()
    def encoder_features(self, x):
        """The offline Mirai-I teacher: the encoder output (B, z_channels, H, W) at the token grid,
        before quant_conv. It is wider than the 8-dim code space and not yet squeezed onto the
        codebook, so it carries more of the image than the codes do."""
        return self.encoder(x)

# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def load_vq(path, preset=None, device="cpu"):
    """A VQModel in eval mode from our checkpoint (which stores its config) or from LlamaGen's
    (`{"model": sd}` or a bare state_dict), whose architecture `preset` names (e.g. "VQ-16")."""
    ckpt = read_checkpoint(path, "VQ checkpoint")
    if not isinstance(ckpt, dict):
        raise ValueError(f"VQ checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    if "config" in ckpt:  # our own format: the stored config wins over any preset
        try:
            cfg = VQConfig(**ckpt["config"])
        except TypeError:
            raise ValueError(f"VQ checkpoint {path} stores a config that is not a VQ tokenizer's "
                             f"(keys {', '.join(sorted(ckpt['config']))[:200]})") from None
    elif preset is not None:
        cfg = get_config(preset)
    else:
        raise ValueError(f"VQ checkpoint {path} stores no config; name its architecture with a preset "
                         f"(one of {', '.join(VQ_PRESETS)}), e.g. VQ-16 for LlamaGen's vq_ds16_c2i.pt")
    sd = ckpt.get("model", ckpt)
    model = VQModel(cfg)
    load_state_dict_strict(model, sd, f"VQ checkpoint {path}")
    return model.to(device).eval()

# ----------------------------------------------------------------------------------------------------
# Discriminator and image helpers for training
# ----------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming): every output logit judges one patch of the image."""

    def __init__(self, n_layers=3, ndf=64):
        super().__init__()
        layers = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # DCGAN init, as the PatchGAN papers use
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def disc_layers_for(image_size):
    """LlamaGen's 3 layers leave a 2x2 map at 32 px; keep the map at least 6x6 (3 layers from 64 px up)."""
    return max(1, min(3, int(math.log2(image_size / 8))))


def to_uint8(x):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 numpy."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sample_images(gpt, vq, labels, cfg_scale=1.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0,
                  generator=None):
    """Class labels (B,) -> (B, H, W, 3) uint8 images: GPT tokens decoded by the tokenizer."""
    device = gpt.tok_embeddings.weight.device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    tokens = gpt.generate(labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature,
                          top_k=top_k, top_p=top_p, generator=generator)
    g = gpt.config.grid_size
    vq_device = next(vq.parameters()).device
    return to_uint8(vq.decode_code(tokens.to(vq_device), grid=(g, g)))


def psnr(x, y):
    """Mean PSNR in dB of images in [-1, 1], measured on the [0, 1] scale."""
    mse = ((x.float().clamp(-1, 1) - y.float()) / 2).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()


def save_recon_grid(x, recon, path, per_row=8):
    """Rows alternate: originals, then their reconstructions right below."""
    a, b = to_uint8(x), to_uint8(recon)
    n = (len(a) // per_row) * per_row or len(a)
    per_row = min(per_row, n)
    rows = [img for i in range(0, n, per_row) for img in (*a[i:i + per_row], *b[i:i + per_row])]
    save_grid(rows, path, nrow=per_row, padding=0)

def make_rfid(args, model, device, log):
    """A function computing rFID (reconstructions vs originals of held-out images), or None with one
    notice when the Inception weights or the held-out split are not to be had."""
    import fid

    try:
        inception = fid.load_inception(args.inception_weights, device, download=False)
        source = data.open_dataset(args.dataset, args.data_path, split=args.rfid_split, download=False)
    except (FileNotFoundError, ValueError) as e:
        log(f"rFID skipped: {e}")
        return None
    held_out = data.ViewDataset(source, args.image_size, views="none")
    images = torch.stack([held_out[i][0] for i in range(min(args.rfid_images, len(held_out)))])
    real = fid.stats(fid.extract(inception, to_uint8(images), device=device, progress=False)[0])

    def rfid():
        model.eval()
        with torch.no_grad():
            recon = torch.cat([model(b.to(device))[0].float().cpu() for b in images.split(64)])
        model.train()
        fake = fid.stats(fid.extract(inception, to_uint8(recon), device=device, progress=False)[0])
        return fid.frechet_distance(*fake, *real)

    return rfid


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def find_resume(args):
    ckpt_dir = os.path.join(args.results_dir, "checkpoints")
    existing = sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".pt")) if os.path.isdir(ckpt_dir) else []
    if args.resume is None:
        if existing:
            raise ValueError(f"--results-dir {args.results_dir} already holds checkpoints; pass "
                             "--resume auto to continue that run or choose another folder.")
        return None
    if args.resume == "auto":
        return os.path.join(ckpt_dir, existing[-1]) if existing else None
    if not os.path.isfile(args.resume):
        raise ValueError(f"--resume {args.resume}: no such checkpoint file.")
    return args.resume


def train(args):
    rank, world, device = setup_distributed()
    torch.manual_seed(args.seed * world + rank)
    try:
        cfg = get_config(args.vq_model)
    except ValueError as e:
        raise ValueError(f"--vq-model: {e}.")
    cfg.commit_loss_beta, cfg.entropy_loss_ratio = args.commit_loss_beta, args.entropy_loss_ratio
    cfg.dropout_p = args.dropout_p
    if args.codebook_size:
        cfg.codebook_size = args.codebook_size
    if args.codebook_embed_dim:
        cfg.codebook_embed_dim = args.codebook_embed_dim
    if args.global_batch_size % world != 0:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by the "
                         f"{world} processes.")
    batch = args.global_batch_size // world

    resume_path = find_resume(args)
    ckpt = None
    if resume_path:
        ckpt = read_checkpoint(resume_path, "--resume")
        needed = ("model", "config", "optimizer", "disc", "disc_optimizer", "steps")
        if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
            raise ValueError(f"--resume {resume_path} is not a checkpoint of `tokenizer.py train` "
                             f"(it lacks some of {', '.join(needed)}).")
        if VQConfig(**ckpt["config"]) != cfg:
            raise ValueError(f"--resume {resume_path} was trained with another tokenizer config than "
                             f"--vq-model {args.vq_model} and the flags given now: {ckpt['config']}.")

    model = VQModel(cfg).to(device)
    disc = PatchDiscriminator(args.disc_layers or disc_layers_for(args.image_size), args.disc_dim).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    step = 0
    if ckpt is not None:
        load_state_dict_strict(model, ckpt["model"], resume_path)
        disc.load_state_dict(ckpt["disc"])
        opt.load_state_dict(ckpt["optimizer"])
        opt_d.load_state_dict(ckpt["disc_optimizer"])
        step = ckpt["steps"]
    raw_model, raw_disc = model, disc
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        disc = nn.parallel.DistributedDataParallel(disc, device_ids=ids)

    try:
        source = data.open_dataset(args.dataset, args.data_path, split=args.split)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--dataset {args.dataset}: {e}")
    dataset = data.ViewDataset(source, args.image_size, views=args.views)  # item = image * views + view
    try:
        raw_model.grid_size(args.image_size)
    except ValueError as e:
        raise ValueError(f"--image-size: {e}.")
    per_epoch = len(source) // args.global_batch_size
    if per_epoch == 0:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is larger than the dataset "
                         f"({len(source)} images).")
    total = args.steps if args.steps is not None else args.epochs * per_epoch
    fixed = torch.stack([dataset[i * dataset.num_views][0] for i in range(min(args.grid_images, len(source)))]).to(device)

    use_bf16 = device.type == "cuda" and args.mixed_precision == "bf16"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16)
    if rank == 0:
        os.makedirs(os.path.join(args.results_dir, "checkpoints"), exist_ok=True)
        os.makedirs(os.path.join(args.results_dir, "samples"), exist_ok=True)
    log = Logger(args.results_dir, rank)
    rfid = make_rfid(args, raw_model, device, log) if rank == 0 and args.rfid_images > 0 else None
    n_params = sum(p.numel() for p in raw_model.parameters())
    side = raw_model.grid_size(args.image_size)
    log(f"VQ {args.vq_model}: {n_params / 1e6:.2f}M parameters, "
        f"codebook {cfg.codebook_size}x{cfg.codebook_embed_dim}, grid {side}x{side}; "
        f"{len(source)} images x {dataset.num_views} views, {total} steps"
        + (f", resuming from {resume_path} at step {step}" if ckpt else ""))
    model.train()
    disc.train()
    bar = log.bar = tqdm(total=total, initial=step, disable=rank != 0, desc="train vq", dynamic_ncols=True)
    sums, t0, last_good = {}, time.time(), resume_path
    sampler = data.EpochSampler(len(source), dataset.num_views, per_epoch * batch, args.seed, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True,
                                         num_workers=args.num_workers, generator=torch.Generator())
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        sampler.set_epoch(epoch, skip * batch)  # a resumed run skips what it has seen of this epoch
        for x, *_ in loader:
            x = x.to(device, non_blocking=True)
            gan_on = 0 <= args.disc_start <= step
            with autocast:
                recon, _, q_losses = model(x)
                recon = recon.float()
                rec = F.mse_loss(recon, x)
                loss = (args.reconstruction_weight * rec + args.codebook_weight * q_losses["codebook"]
                        + q_losses["commit"])
                if args.l1_weight > 0:
                    loss = loss + args.l1_weight * (recon - x).abs().mean()
                if "entropy" in q_losses:
                    loss = loss + q_losses["entropy"]
                if gan_on:  # hinge generator loss: push the discriminator's logits on fakes up
                    g_loss = -disc(recon).float().mean()
                    loss = loss + args.disc_weight * g_loss
            if not torch.isfinite(loss):
                bar.close()
                raise FloatingPointError(f"the loss became {loss.item()} at step {step}; the last good checkpoint "
                                 f"is {last_good}.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()

            stats = {"loss": loss.item(), "rec": rec.item(), "psnr": psnr(recon.detach(), x),
                     "codebook": q_losses["codebook"].item(), "commit": q_losses["commit"].item()}
            if gan_on:  # hinge discriminator loss on real images and detached reconstructions
                with autocast:
                    real, fake = disc(x).float(), disc(recon.detach()).float()
                    d_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                if args.max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(disc.parameters(), args.max_grad_norm)
                opt_d.step()
                stats.update(g_loss=g_loss.item(), d_loss=d_loss.item())
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            sums["n"] = sums.get("n", 0) + 1
            step += 1
            bar.update(1)

            if step % args.log_every == 0 or step == total:
                n = sums.pop("n")
                avg = {k: v / n for k, v in sums.items()}
                avg.update(step=step, usage=raw_model.quantize.usage(), steps_per_s=n / (time.time() - t0))
                bar.set_postfix(psnr=f"{avg['psnr']:.2f}", usage=f"{avg['usage']:.3f}")
                log(f"step {step:7d} " + " ".join(f"{k} {v:.4f}" for k, v in avg.items() if k != "step"))
                log.record(avg)
                sums, t0 = {}, time.time()
            if rank == 0 and (step % args.sample_every == 0 or step == total):
                raw_model.eval()
                with torch.no_grad(), autocast:
                    fixed_recon = raw_model(fixed)[0].float()
                raw_model.train()
                grid_path = os.path.join(args.results_dir, "samples", f"recon_{step:07d}.png")
                save_recon_grid(fixed, fixed_recon, grid_path)
                log(f"step {step:7d} fixed-batch psnr {psnr(fixed_recon, fixed):.2f} dB -> {grid_path}")
            if step % args.ckpt_every == 0 or step == total:
                if rank == 0:
                    last_good = os.path.join(args.results_dir, "checkpoints", f"{step:07d}.pt")
                    save_atomic({"model": raw_model.state_dict(), "config": asdict(cfg), "optimizer": opt.state_dict(),
                                 "disc": raw_disc.state_dict(), "disc_optimizer": opt_d.state_dict(), "steps": step,
                                 "args": vars(args)}, last_good)
                if rfid is not None:
                    value = rfid()
                    log(f"step {step:7d} rFID {value:.3f} on {args.rfid_images} held-out images")
                    log.record({"step": step, "rfid": value})
                barrier(world)
            if step >= total:
                break
    bar.close()
    log(f"done: {step} steps; checkpoint {last_good}")
    cleanup_distributed(world)
    return last_good

# ----------------------------------------------------------------------------------------------------
# Extraction: a dataset -> codes.npy (N, A, H*W), labels.npy (N,), meta.json
# ----------------------------------------------------------------------------------------------------


def extract(args):
    rank, world, device = setup_distributed()
    out = args.code_path
    codes_path, labels_path, meta_path = (os.path.join(out, f)
                                          for f in ("codes.npy", "labels.npy", "meta.json"))
    if os.path.exists(codes_path) and not args.overwrite:
        raise ValueError(f"--code-path {out} already holds codes.npy; pass --overwrite to replace it.")
    try:
        vq = load_vq(args.vq_ckpt, preset=args.vq_model, device=device)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--vq-ckpt: {e}")
    try:
        grid = vq.grid_size(args.image_size)
    except ValueError as e:
        raise ValueError(f"--image-size: {e}.")
    try:
        source = data.open_dataset(args.dataset, args.data_path, split=args.split)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--dataset {args.dataset}: {e}")
    split = next((s for s in ("train", "test", "val") if args.dataset.endswith("-" + s)), args.split)
    n, a = len(source), data.num_views(args.views)
    vocab = vq.config.codebook_size
    dtype = np.int16 if vocab <= np.iinfo(np.int16).max + 1 else np.int32
    barrier(world)  # every rank has checked the output folder before rank 0 touches it

    if rank == 0:
        os.makedirs(out, exist_ok=True)
        if os.path.exists(meta_path):  # an overwrite in progress must not look complete
            os.remove(meta_path)
        np.lib.format.open_memmap(codes_path, mode="w+", dtype=dtype, shape=(n, a, grid * grid)).flush()
        np.lib.format.open_memmap(labels_path, mode="w+", dtype=np.int64, shape=(n,)).flush()
    barrier(world)

    lo, hi = n * rank // world, n * (rank + 1) // world
    views = data.ViewDataset(source, args.image_size, views=args.views)
    mine = torch.utils.data.Subset(views, range(lo * a, hi * a))  # item k is view k % a of image k // a
    loader = torch.utils.data.DataLoader(mine, batch_size=args.batch_size, num_workers=args.num_workers)
    codes = np.lib.format.open_memmap(codes_path, mode="r+")
    labels = np.lib.format.open_memmap(labels_path, mode="r+")
    try:
        for x, y, idx, v in tqdm(loader, disable=rank != 0, desc=f"extract {args.views}", dynamic_ncols=True):
            c = vq.encode(x.to(device)).flatten(1).cpu().numpy()
            codes[idx.numpy(), v.numpy()] = c.astype(dtype)
            labels[idx.numpy()] = y.numpy()
        codes.flush()
        labels.flush()
        del codes, labels
        barrier(world)
        if rank == 0:  # what training checks, checked before meta.json declares the codes complete
            data.check_range(np.load(codes_path, mmap_mode="r"), vocab, codes_path, "code", "the vocabulary")
            data.check_range(np.load(labels_path), source.num_classes, labels_path, "label", "the number of classes")
    except BaseException:  # an unreadable image, Ctrl-C: no codes.npy is left that looks like a dataset
        for path in (codes_path, labels_path):
            if os.path.exists(path):
                os.remove(path)
        raise

    if rank == 0:
        meta = {"grid": [grid, grid], "vocab_size": vocab, "num_classes": source.num_classes,
                "image_size": args.image_size, "views": args.views, "num_views": a, "dataset": args.dataset,
                "split": split, "data_path": args.data_path and os.path.abspath(args.data_path),
                "tokenizer": os.path.abspath(args.vq_ckpt),
                "tokenizer_config": asdict(vq.config), "num_images": n}
        # written last: its presence means the codes are complete
        atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
        print(f"wrote {n} x {a} x {grid * grid} codes to {out}")
    cleanup_distributed(world)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


VIEWS = ["none", "flip", "tencrop"]


@dataclass
class TrainSettings:
    """What `tokenizer.py train` takes: every flag, with its default (train.py's one command builds one)."""
    dataset: str = option(required=True, help="cifar10, mnist, fashion-mnist or folder")
    results_dir: str = option(required=True)
    data_path: str = option()
    split: str = option("train")
    image_size: int = option(32, type=POSITIVE_INT)
    views: str = option("flip", choices=VIEWS, help="augmentation: a random view per image")
    vq_model: str = option("VQ-S", choices=VQ_PRESETS)
    codebook_size: int = option(type=POSITIVE_INT, help="override the preset's")
    codebook_embed_dim: int = option(type=POSITIVE_INT, help="override the preset's")
    commit_loss_beta: float = option(0.25, type=NONNEG)
    entropy_loss_ratio: float = option(0.0, type=NONNEG)
    dropout_p: float = option(0.0, type=PROBABILITY)
    resume: str = option(help="'auto' (newest checkpoint in --results-dir) or a checkpoint path")
    steps: int = option(type=POSITIVE_INT, help="total training steps (default: from --epochs)")
    epochs: int = option(40, type=POSITIVE_INT)
    global_batch_size: int = option(128, type=POSITIVE_INT)
    lr: float = option(1e-4, type=POSITIVE)
    beta1: float = option(0.9, type=PROBABILITY)
    beta2: float = option(0.95, type=PROBABILITY)
    max_grad_norm: float = option(1.0, type=POSITIVE)
    reconstruction_weight: float = option(1.0, type=NONNEG, help="weight of the L2 loss")
    l1_weight: float = option(0.0, type=NONNEG)
    codebook_weight: float = option(1.0, type=NONNEG)
    disc_start: int = option(20000, type=arg_type(int, -1), help="step that switches the GAN loss on; -1: never")
    disc_weight: float = option(0.5, type=NONNEG)
    disc_layers: int = option(type=POSITIVE_INT, help="PatchGAN depth; default: suited to --image-size")
    disc_dim: int = option(64, type=POSITIVE_INT)
    mixed_precision: str = option("bf16", choices=["bf16", "none"], help="bf16 applies on GPU only")
    log_every: int = option(100, type=POSITIVE_INT)
    sample_every: int = option(1000, type=POSITIVE_INT)
    ckpt_every: int = option(5000, type=POSITIVE_INT)
    grid_images: int = option(16, type=POSITIVE_INT)
    rfid_images: int = option(1000, type=NONNEG_INT, help="rFID on this many held-out (--rfid-split) images at each "
                              "checkpoint, when the FID Inception weights are available; 0: never")
    rfid_split: str = option("test")
    inception_weights: str = option(help="pt_inception-2015-12-05-6726825d.pth (fid.py)")
    num_workers: int = option(0, type=NONNEG_INT)
    seed: int = option(0, type=NONNEG_INT)


@dataclass
class ExtractSettings:
    """What `tokenizer.py extract` takes."""
    vq_ckpt: str = option(required=True)
    dataset: str = option(required=True)
    image_size: int = option(type=POSITIVE_INT, required=True)
    code_path: str = option(required=True)
    vq_model: str = option(choices=VQ_PRESETS, help="architecture of a LlamaGen checkpoint (ours store their config)")
    data_path: str = option()
    split: str = option("train")
    views: str = option("none", choices=VIEWS)
    overwrite: bool = option(False, action="store_true")
    batch_size: int = option(64, type=POSITIVE_INT)
    num_workers: int = option(0, type=NONNEG_INT)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    add_options(sub.add_parser("train", help="train a VQ tokenizer"), TrainSettings)
    add_options(sub.add_parser("extract", help="encode a dataset into a code dataset"), ExtractSettings)
    return p


def main(argv=None):
    args = vars(build_parser().parse_args(argv))
    try:
        if args.pop("command") == "train":
            return train(TrainSettings(**args))
        return extract(ExtractSettings(**args))
    except (ValueError, OSError, RuntimeError, FloatingPointError) as e:
        if os.environ.get("MIRAI_DEBUG"):
            raise
        raise SystemExit(f"error: {data.one_line(e)}") from None


if __name__ == "__main__":
    main()
