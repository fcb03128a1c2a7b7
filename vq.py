"""
The VQ tokenizer's model: LlamaGen's VQ-VAE (encoder, quantizer, decoder) with its parameter names and numerics, so
that LlamaGen's `vq_ds16_c2i.pt` loads strictly (`load_vq(path, preset="VQ-16")`); and images from GPT tokens.
The one deliberate difference: `quantize.codebook_used` is a plain buffer (LlamaGen wraps it in an nn.Parameter,
which breaks in-place updates on a CPU in training). tokenizer.py trains it and encodes datasets with it.
"""
import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from util import read_checkpoint
from model import load_state_dict_strict
# ----------------------------------------------------------------------------------------------------
# Config and presets


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
        self.encoder_ch_mult, self.decoder_ch_mult = tuple(self.encoder_ch_mult), tuple(self.decoder_ch_mult)
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError("encoder_ch_mult and decoder_ch_mult must have the same length "
                             f"(got {self.encoder_ch_mult} and {self.decoder_ch_mult})")


VQ_PRESETS = {
    "VQ-16": VQConfig(encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4)),  # 256 px -> 16x16
    "VQ-8": VQConfig(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4)),  # 256 px -> 32x32
    # CIFAR scale: 32 px -> 8x8 tokens, trains on a laptop CPU in minutes; GroupNorm(32) needs widths of 32n
    "VQ-S": VQConfig(codebook_size=1024, encoder_ch_mult=(1, 2, 2), decoder_ch_mult=(1, 2, 2), z_channels=64, ch=32),
}
USAGE_WINDOW = 65536  # LlamaGen remembers the last 65536 code indices to measure codebook usage


def get_config(preset):
    """A VQConfig from a preset name (a copy: callers may change it), or a VQConfig passed through."""
    if isinstance(preset, VQConfig):
        return preset
    if preset not in VQ_PRESETS:
        raise ValueError(f"unknown VQ preset {preset!r}; expected one of {', '.join(VQ_PRESETS)}")
    return replace(VQ_PRESETS[preset])

# ----------------------------------------------------------------------------------------------------
# Building blocks: LlamaGen's (taming-transformers') names and order of construction, so that a seed
# draws the same initial weights


def swish(x):
    return x * torch.sigmoid(x)


Norm = functools.partial(nn.GroupNorm, 32, eps=1e-6)  # Norm(channels)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch, out_ch, dropout=0.0):
        super().__init__()
        self.norm1, self.conv1 = Norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.dropout = Norm(out_ch), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv2(self.dropout(swish(self.norm2(self.conv1(swish(self.norm1(x)))))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convolutions as projections."""

    def __init__(self, ch):
        super().__init__()
        self.norm = Norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (t(y).reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c), as LlamaGen
        return x + self.proj_out(y.transpose(2, 3).reshape(b, c, h, w))


class Level(nn.Module):
    """One resolution: residual blocks, each followed by attention where `attn`, then `resample`: a
    stride-2 conv ("downsample"), x2 nearest upsampling and a conv ("upsample"), or None."""

    def __init__(self, in_ch, out_ch, n_res, dropout, attn, resample):
        super().__init__()
        self.res, self.attn, self.resample = nn.ModuleList(), nn.ModuleList(), resample
        for i in range(n_res):
            self.res.append(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, dropout))
            if attn:
                self.attn.append(AttnBlock(out_ch))
        if resample:  # LlamaGen's key: {downsample,upsample}.conv
            up = resample == "upsample"
            self.add_module(resample, nn.ModuleDict({"conv": nn.Conv2d(out_ch, out_ch, 3, 1 if up else 2, int(up))}))

    def forward(self, h):
        for i, res in enumerate(self.res):
            h = self.attn[i](res(h)) if self.attn else res(h)
        if self.resample == "downsample":  # padding right and bottom only: LlamaGen's pixel alignment
            h = self.downsample.conv(F.pad(h, (0, 1, 0, 1)))
        elif self.resample == "upsample":
            h = self.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return h


def middle(ch, dropout):
    return nn.Sequential(ResnetBlock(ch, ch, dropout), AttnBlock(ch), ResnetBlock(ch, ch, dropout))


class Encoder(nn.Module):
    """Image (B, 3, S, S) -> (B, z_channels, S/f, S/f); attention only at the lowest resolution."""

    def __init__(self, cfg):
        super().__init__()
        chs, p, last = [cfg.ch] + [cfg.ch * m for m in cfg.encoder_ch_mult], cfg.dropout_p, len(cfg.encoder_ch_mult) - 1
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.Sequential(*(Level(chs[i], chs[i + 1], cfg.num_res_blocks, p, attn=i == last,
                                                 resample=None if i == last else "downsample")
                                           for i in range(last + 1)))
        self.mid, self.norm_out = middle(chs[-1], p), Norm(chs[-1])
        self.conv_out = nn.Conv2d(chs[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x):
        return self.conv_out(swish(self.norm_out(self.mid(self.conv_blocks(self.conv_in(x))))))


class Decoder(nn.Module):
    """The encoder's mirror: the middle first, attention at the first level, one residual block more per level."""

    def __init__(self, cfg):
        super().__init__()
        chs, p, last = [cfg.ch * m for m in reversed(cfg.decoder_ch_mult)], cfg.dropout_p, len(cfg.decoder_ch_mult) - 1
        self.conv_in = nn.Conv2d(cfg.z_channels, chs[0], 3, padding=1)
        self.mid = middle(chs[0], p)
        self.conv_blocks = nn.Sequential(*(Level(chs[max(i - 1, 0)], chs[i], cfg.num_res_blocks + 1, p, attn=i == 0,
                                                 resample=None if i == last else "upsample")
                                           for i in range(last + 1)))
        self.norm_out, self.conv_out = Norm(chs[-1]), nn.Conv2d(chs[-1], 3, 3, padding=1)

    def forward(self, z):
        return self.conv_out(swish(self.norm_out(self.conv_blocks(self.mid(self.conv_in(z))))))


def entropy_loss(affinity, temperature=0.01):
    """Low per-token entropy (confident assignments) minus high codebook-wide entropy (use all codes)."""
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs, log_probs = F.softmax(logits, dim=-1), F.log_softmax(logits + 1e-5, dim=-1)
    avg_probs = probs.mean(dim=0)
    avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
    return -(probs * log_probs).sum(dim=-1).mean() - avg_entropy


class VectorQuantizer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, n = cfg, cfg.codebook_size
        self.embedding = nn.Embedding(n, cfg.codebook_embed_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / n, 1.0 / n)
            if cfg.codebook_l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # the most recent code indices; -1 marks "never filled" (LlamaGen's 0 counts code 0 as used)
        self.register_buffer("codebook_used", torch.full((USAGE_WINDOW,), -1.0))

    def codebook(self):
        return F.normalize(self.embedding.weight, dim=-1) if self.cfg.codebook_l2_norm else self.embedding.weight

    def usage(self):
        """Fraction of the codebook seen among the last 65536 codes produced in training mode."""
        return self.codebook_used[self.codebook_used >= 0].unique().numel() / self.cfg.codebook_size

    def forward(self, z):
        """z (B, C, H, W) -> (z_q (B, C, H, W), codes (B, H, W), losses dict; empty in eval mode)."""
        z = z.float().permute(0, 2, 3, 1)  # distances in float32 even under bf16 autocast
        z = F.normalize(z, dim=-1) if self.cfg.codebook_l2_norm else z
        emb, flat = self.codebook().float(), z.reshape(-1, self.cfg.codebook_embed_dim)
        d = flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * flat @ emb.t()
        idx = d.argmin(dim=1)
        z_q, losses = emb[idx].view(z.shape), {}
        if self.training:
            if self.cfg.codebook_show_usage:
                n, used = min(idx.numel(), USAGE_WINDOW), self.codebook_used
                used.copy_(torch.cat([used[n:], idx[-n:].to(used.dtype)]))
            losses["codebook"] = (z_q - z.detach()).pow(2).mean()
            losses["commit"] = self.cfg.commit_loss_beta * (z_q.detach() - z).pow(2).mean()
            if self.cfg.entropy_loss_ratio > 0:
                losses["entropy"] = self.cfg.entropy_loss_ratio * entropy_loss(-d)
            z_q = z + (z_q - z).detach()  # straight-through: the decoder's gradient goes to the encoder
        return z_q.permute(0, 3, 1, 2).contiguous(), idx.view(z.shape[:-1]), losses

# ----------------------------------------------------------------------------------------------------
# The VQ model and its checkpoints


class VQModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config, self.downsample_factor = cfg, 2 ** (len(cfg.encoder_ch_mult) - 1)
        self.encoder, self.decoder, self.quantize = Encoder(cfg), Decoder(cfg), VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def grid_size(self, image_size):
        """Side of the token grid for square images of side image_size."""
        f = self.downsample_factor
        if image_size % f != 0:
            raise ValueError(f"image size {image_size} is not a multiple of the tokenizer's stride {f}")
        return image_size // f

    def forward(self, x):
        """Training pass: x in [-1, 1] -> (reconstruction, codes (B, H, W), quantizer losses dict)."""
        z_q, codes, losses = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(z_q)), codes, losses

    @torch.no_grad()
    def encode(self, x):
        """Images (B, 3, S, S) float in [-1, 1] -> codes (B, S/f, S/f) long."""
        return self.quantize(self.quant_conv(self.encoder(x)))[1]

    @torch.no_grad()
    def decode_code(self, codes, grid=None):
        """Codes (B, H, W) or (B, N) (square grid unless grid=(H, W)) -> images (B, 3, fH, fW), ~[-1, 1]."""
        if codes.dim() == 2:
            h, w = grid or (math.isqrt(codes.shape[1]),) * 2
            if h * w != codes.shape[1]:
                raise ValueError(f"cannot lay {codes.shape[1]} codes on a square grid; pass grid=(H, W)")
            codes = codes.reshape(-1, h, w)
        z_q = self.quantize.codebook()[codes.long()].permute(0, 3, 1, 2).contiguous()
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def encoder_features(self, x):
        """The offline Mirai-I teacher: the encoder output (B, z_channels, H, W) before quant_conv; wider
        than the code space and not squeezed onto the codebook, it carries more of the image than the codes."""
        return self.encoder(x)


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
    elif preset is None:
        raise ValueError(f"VQ checkpoint {path} stores no config; name its architecture with a preset "
                         f"(one of {', '.join(VQ_PRESETS)}), e.g. VQ-16 for LlamaGen's vq_ds16_c2i.pt")
    else:
        cfg = get_config(preset)
    model = VQModel(cfg)
    load_state_dict_strict(model, ckpt.get("model", ckpt), f"VQ checkpoint {path}")
    return model.to(device).eval()


def to_uint8(x):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 numpy."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sample_images(gpt, vq, labels, generator=None, **sampling):
    """Class labels (B,) -> (B, H, W, 3) uint8 images: GPT tokens (generate() with the `sampling` keywords)
    decoded by the tokenizer."""
    labels = torch.as_tensor(labels, dtype=torch.long, device=gpt.tok_embeddings.weight.device)
    tokens = gpt.generate(labels, generator=generator, **sampling)
    g = gpt.config.grid_size
    return to_uint8(vq.decode_code(tokens.to(next(vq.parameters()).device), grid=(g, g)))
