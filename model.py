"""
The GPT: a class-conditional, LlamaGen-compatible causal transformer over a grid of VQ tokens.

Parameter names and shapes equal LlamaGen's c2i GPT, so its checkpoints (c2i_B_256.pt, ...) load
with strict=True, and the numerics match it, including its quirk that the class-token position has
an all-zero rotary table (its query and key are zero). Training forward, KV-cache generation with
classifier-free guidance, and checkpoint loading that explains a mismatch in one message.
"""
import contextlib
import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class GPTConfig:
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # grouped-query attention when smaller than n_head
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to this
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    class_dropout_prob: float = 0.1
    cls_token_num: int = 1
    # these three come from the data (code dataset / tokenizer), never from a preset
    vocab_size: int = 16384
    grid_size: int = 16  # tokens per side
    num_classes: int = 1000

    @property
    def block_size(self):
        return self.grid_size**2

    @property
    def head_dim(self):
        return self.dim // self.n_head


# LlamaGen's sizes, plus small ones for CIFAR-scale runs on one GPU or a CPU.
GPT_PRESETS = {
    "GPT-T": dict(n_layer=4, n_head=4, dim=128),
    "GPT-S": dict(n_layer=6, n_head=8, dim=256),
    "GPT-M": dict(n_layer=8, n_head=8, dim=512),
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
}


def gpt_config(preset, **overrides):
    if preset not in GPT_PRESETS:
        raise ValueError(f"--gpt-model {preset!r} is unknown; expected one of {', '.join(GPT_PRESETS)}")
    known = {f.name for f in fields(GPTConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown GPT config field(s) {bad}")
    return GPTConfig(**{**GPT_PRESETS[preset], **overrides})


# ----------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (as LlamaGen does) so bf16 activations do not lose the scale
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def ffn_hidden_dim(cfg):
    hidden = int(2 * 4 * cfg.dim / 3)
    if cfg.ffn_dim_multiplier is not None:
        hidden = int(cfg.ffn_dim_multiplier * hidden)
    return cfg.multiple_of * math.ceil(hidden / cfg.multiple_of)


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = ffn_hidden_dim(cfg)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x):
        y = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.ffn_dropout(y) if self.training else y


def rotary_table(cfg):
    """(cls + H*W, head_dim/2) complex table of LlamaGen's 2D rotary embedding.

    The first half of each head rotates with the row index, the second half with the column; the
    class-token rows are all zero (not identity), which zeroes that position's query and key.
    """
    half = cfg.head_dim // 2
    freqs = 1.0 / (cfg.rope_base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    g = cfg.grid_size
    pos = torch.arange(g, dtype=torch.float32)
    angles = torch.outer(pos, freqs)  # (g, head_dim/4)
    grid = torch.cat([angles[:, None, :].expand(g, g, -1), angles[None, :, :].expand(g, g, -1)], dim=-1)
    table = torch.polar(torch.ones_like(grid), grid).flatten(0, 1)  # (g*g, head_dim/2)
    return torch.cat([torch.zeros(cfg.cls_token_num, half, dtype=table.dtype), table])


def apply_rotary(x, rope):
    """x: (B, L, H, D); rope: (L, D/2) complex. Pairs of interleaved (even, odd) elements are complex
    numbers, rotated by one complex product (in fp32, as LlamaGen; ~3x faster than the real form)."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rope[None, :, None, :]).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)

    def forward(self, x, rope, cache=None, pos=None, mask=None):
        """Causal self-attention over x (B, L, dim).

        With cache=(k_cache, v_cache) of shape (B, n_kv_head, max_len, head_dim), x holds the tokens at
        positions pos..pos+L-1 (an int): their keys/values are written into the cache, and the queries attend
        to everything cached so far, so a decode step needs no (L, L) mask. For a compiled step, pos is the
        (L,) tensor of positions and mask (L, max_len) says which cached keys each query sees: the whole
        cache is read, so every decode step has the same shapes (what torch.compile and CUDA graphs need).
        """
        B, L, _ = x.shape
        hq, hk, d = self.n_head, self.n_kv_head, self.head_dim
        qk, v = self.wqkv(x).split([(hq + hk) * d, hk * d], dim=-1)
        q, k = apply_rotary(qk.view(B, L, hq + hk, d), rope).transpose(1, 2).split([hq, hk], dim=1)  # one rotation
        v = v.view(B, L, hk, d).transpose(1, 2)
        if cache is not None and mask is None:
            k_cache, v_cache = cache
            k_cache[:, :, pos : pos + L] = k
            v_cache[:, :, pos : pos + L] = v
            k, v = k_cache[:, :, : pos + L], v_cache[:, :, : pos + L]
        elif cache is not None:
            cache[0].index_copy_(2, pos, k)
            cache[1].index_copy_(2, pos, v)
            k, v = cache
        if hk != hq:
            k = k.repeat_interleave(hq // hk, dim=1)
            v = v.repeat_interleave(hq // hk, dim=1)
        cpu_amp = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if cpu_amp:  # a CPU's bf16 attention backward takes ~10x the fp32 one: attention in fp32, matmuls in bf16
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if cpu_amp else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and L > 1,
                                               dropout_p=self.attn_dropout_p if self.training else 0.0)
        y = self.wo(y.transpose(1, 2).reshape(B, L, hq * d))
        return self.resid_dropout(y) if self.training else y


class DropPath(nn.Module):
    """Stochastic depth: drop a block's residual branch per sample."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class TransformerBlock(nn.Module):
    def __init__(self, cfg, drop_path):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, rope, cache=None, pos=None, mask=None):
        if not self.training:  # decoding: no dropout or drop-path modules to call per token
            h = x + self.attention(self.attention_norm(x), rope, cache, pos, mask)
            return h + self.feed_forward(self.ffn_norm(h))
        h = x + self.drop_path(self.attention(self.attention_norm(x), rope))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra "null" row (index num_classes) for classifier-free guidance."""

    def __init__(self, num_classes, dim, dropout_prob):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def drop(self, labels, generator=None):
        drop = torch.rand(labels.shape, device=labels.device, generator=generator) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels):
        return self.embedding_table(labels).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        rates = [cfg.drop_path_rate * i / max(cfg.n_layer - 1, 1) for i in range(cfg.n_layer)]
        self.layers = nn.ModuleList(TransformerBlock(cfg, r) for r in rates)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # not a buffer: LlamaGen's state_dict has no rotary table, and ours must equal it
        self.rope = rotary_table(cfg)
        self.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)  # so the first logits are uniform, as in LlamaGen

    def _init_weights(self, m):
        std = self.config.initializer_range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)

    def _apply(self, fn, *args, **kwargs):
        # keep the (non-buffer) rotary table on the model's device; it always stays fp32
        super()._apply(fn, *args, **kwargs)
        self.rope = self.rope.to(self.tok_embeddings.weight.device)
        return self

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def embed(self, idx, cond, drop_labels=None):
        """[class token(s), tokens] embeddings. drop_labels defaults to self.training."""
        if drop_labels is None:
            drop_labels = self.training
        if drop_labels:
            cond = self.cls_embedding.drop(cond)
        c = self.cls_embedding(cond)[:, : self.config.cls_token_num]
        if idx is None:
            return self.tok_dropout(c)
        return self.tok_dropout(torch.cat([c, self.tok_embeddings(idx)], dim=1))

    def forward(self, idx, cond, targets=None, hidden_layer=None, drop_labels=None, stop_at_hidden=False):
        """Teacher-forced forward over [class, x_0 .. x_{N-2}]; works the same in train and eval mode.

        idx: (B, T) tokens, T <= N-1 (the last token is never input); cond: (B,) class labels.
        Returns (logits (B, T+1, V) fp32, loss or None, hidden): hidden is the residual stream after
        block `hidden_layer` (1-based, before the final norm), None when not asked for. With
        stop_at_hidden the blocks after it are skipped and logits is None (a teacher's forward).
        """
        h = self.embed(idx, cond, drop_labels)
        L = h.shape[1]
        if L > self.rope.shape[0]:
            raise ValueError(f"sequence of {L} positions is longer than the model's {self.rope.shape[0]}")
        rope = self.rope[:L]
        hidden = None
        for i, layer in enumerate(self.layers):
            h = layer(h, rope)
            if hidden_layer is not None and i + 1 == hidden_layer:
                hidden = h
                if stop_at_hidden:
                    return None, None, hidden
        logits = self.output(self.norm(h))[:, self.config.cls_token_num - 1 :].float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss, hidden

    # ------------------------------------------------------------------------------------------------
    # Generation with a KV cache

    def _step(self, x, cache, pos):
        """Logits after the tokens x (B, L, dim) at positions pos (an int: the first one; or the (L,) tensor of
        them, for a compiled step: see Attention), with the KV cache."""
        if torch.is_tensor(pos):
            rope = self.rope.index_select(0, pos)
            mask = torch.arange(cache[0][0].shape[2], device=x.device) <= pos[:, None]  # (L, max_len)
        else:
            rope, mask = self.rope[pos : pos + x.shape[1]], None
        for layer, c in zip(self.layers, cache):
            x = layer(x, rope, c, pos, mask)
        return self.output(self.norm(x[:, -1])).float()

    @torch.inference_mode()
    def generate(self, cond, cfg_scale=1.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0, generator=None,
                 num_tokens=None, compile=False):
        """Sample (B, N) tokens for class labels cond (B,).

        Guidance mixes logits as uncond + (cond - uncond) * cfg_scale with the batch doubled (null class
        in the second half). With cfg_interval >= 0, guidance stops after that many decode steps
        (LlamaGen's convention) and the unconditional half is dropped from the cache to save work.
        compile=True runs the decode step through torch.compile (with CUDA graphs on a GPU): the first
        call compiles; the same computation, up to the rounding of inductor's fused kernels.
        """
        was_training = self.training
        self.eval()
        cfg = self.config
        n = num_tokens or cfg.block_size
        B = cond.shape[0]
        guided = cfg_scale > 1.0
        if guided:
            cond = torch.cat([cond, torch.full_like(cond, cfg.num_classes)])
        dev, dtype = cond.device, self.tok_embeddings.weight.dtype
        if torch.is_autocast_enabled(dev.type):  # keys and values come out of autocast's matmuls in its dtype
            dtype = torch.get_autocast_dtype(dev.type)
        shape = (cond.shape[0], cfg.n_kv_head or cfg.n_head, cfg.cls_token_num + n - 1, cfg.head_dim)
        cache = getattr(self, "_static_cache", None) if compile else None  # a CUDA graph replays at fixed addresses
        if cache is None or (cache[0][0].shape, cache[0][0].dtype, cache[0][0].device) != (shape, dtype, dev):
            cache = [tuple(torch.zeros(shape, dtype=dtype, device=dev) for _ in "kv") for _ in self.layers]
        step = self._step
        if compile:  # the cache is kept for the next call (stale entries are masked out) and written in place
            self._static_cache = cache
            for t in (t for kv in cache for t in kv):
                torch._dynamo.mark_static_address(t)
            mode = "reduce-overhead" if dev.type == "cuda" else None
            step = torch.compile(self._step, fullgraph=True, dynamic=False, mode=mode)
        out = torch.empty(B, n, dtype=torch.long, device=dev)
        x = self.embed(None, cond, drop_labels=False)
        pos = torch.arange(cfg.cls_token_num, device=dev) if compile else 0  # see _step
        for i in range(n):
            logits = step(x, cache, pos)
            pos = pos[-1:] + 1 if compile else pos + x.shape[1]
            if guided:
                c, u = logits.chunk(2)
                logits = u + (c - u) * cfg_scale
                if 0 <= cfg_interval < i - 1:  # LlamaGen's count: decode step i-1 past the interval
                    guided = False
                    cache = [(k[:B], v[:B]) for k, v in cache]
                    logits = c
            tok = sample_logits(logits, temperature, top_k, top_p, generator)
            out[:, i] = tok
            x = self.tok_embeddings(torch.cat([tok, tok]) if guided else tok)[:, None]
        self.train(was_training)
        return out


def sample_logits(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token per row from (B, V) logits, with LlamaGen's temperature / top-k / top-p filtering."""
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum > top_p
        remove[:, 1:] = remove[:, :-1].clone()  # keep the token that crosses top_p
        remove[:, 0] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    # inverse-CDF draw: one uniform number per row where torch.multinomial draws one per vocabulary entry
    # (the same distribution, ~15x less time at batch 8); u < total, so a zero-probability token is never hit
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.shape[1] - 1)


# ----------------------------------------------------------------------------------------------------
# Checkpoints: ours and LlamaGen's, loaded strictly, with mismatches explained


def describe_state_dict(sd):
    """A short phrase saying which preset / vocabulary a GPT state_dict looks like."""
    try:
        vocab, dim = sd["tok_embeddings.weight"].shape
        classes = sd["cls_embedding.embedding_table.weight"].shape[0] - 1
    except KeyError:
        return "not a GPT state_dict (no tok_embeddings / cls_embedding weights)"
    n_layer = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    preset = next((n for n, p in GPT_PRESETS.items() if p["dim"] == dim and p["n_layer"] == n_layer), None)
    like = f"{preset}-sized" if preset else "no preset"
    return f"{like} (dim {dim}, {n_layer} layers), vocabulary {vocab}, {classes} classes"


def load_state_dict_strict(model, sd, what="checkpoint", looks_like=None):
    """load_state_dict(strict=True), but a mismatch raises one ValueError that lists all of it.

    looks_like(sd) may add a phrase saying what the checkpoint seems to be instead.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for name, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                more = f" ... (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{name}: {', '.join(items[:5])}{more}")
        hint = f" The checkpoint looks like {looks_like(sd)}." if looks_like else ""
        raise ValueError(f"{what} does not fit the model: {'; '.join(parts)}.{hint}")
    model.load_state_dict(sd, strict=True)


def gpt_state_dict(ckpt, use_ema=False):
    """The GPT weights inside ours / LlamaGen's checkpoint formats, or a bare state_dict."""
    if not isinstance(ckpt, dict):
        raise ValueError("checkpoint is not a dict of tensors")
    key = "ema" if use_ema else "model"
    if key in ckpt and isinstance(ckpt[key], dict):
        return ckpt[key]
    if use_ema and "model" in ckpt:
        raise ValueError("checkpoint has no 'ema' weights (drop --ema to use 'model')")
    if "model" not in ckpt and "ema" in ckpt and isinstance(ckpt["ema"], dict):
        return ckpt["ema"]
    if any(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise ValueError("checkpoint holds neither 'model', 'ema' nor a bare GPT state_dict")


def load_gpt(path, preset=None, grid_size=None, use_ema=False, device="cpu", **overrides):
    """Build a GPT from a checkpoint file and load it strictly.

    Our checkpoints carry their config ("gpt_config"); LlamaGen's do not, so there the preset
    (--gpt-model) and grid size are needed; vocabulary and classes are read from the weights.
    """
    from util import read_checkpoint

    ckpt = read_checkpoint(path, "GPT checkpoint")
    sd = gpt_state_dict(ckpt, use_ema)
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in sd.items()}
    if isinstance(ckpt, dict) and isinstance(ckpt.get("gpt_config"), dict):
        cfg = GPTConfig(**{**ckpt["gpt_config"], **overrides})
    else:
        if preset is None or grid_size is None:
            raise ValueError(
                f"{path} carries no config (a LlamaGen checkpoint?): give --gpt-model and the image size; "
                f"it looks like {describe_state_dict(sd)}"
            )
        try:
            vocab, classes = sd["tok_embeddings.weight"].shape[0], sd["cls_embedding.embedding_table.weight"].shape[0] - 1
        except KeyError:
            raise ValueError(f"{path} is not a GPT checkpoint: {describe_state_dict(sd)}") from None
        cfg = gpt_config(preset, vocab_size=vocab, num_classes=classes, grid_size=grid_size, **overrides)
    model = GPT(cfg)
    load_state_dict_strict(model, sd, what=f"GPT checkpoint {path}", looks_like=describe_state_dict)
    return model.to(device)


# ----------------------------------------------------------------------------------------------------
# Optimizer


BETAS, MAX_GRAD_NORM = (0.9, 0.95), 1.0  # LlamaGen's, for every optimizer here (GPT, tokenizer, discriminator)


def make_adamw(modules, lr=1e-4, weight_decay=0.05, betas=BETAS):
    """LlamaGen's AdamW: weight decay on matrices (and embeddings) only, never on norms or biases.

    The fused kernel is used where torch has one (CUDA, and CPU since 2.4): it is the same update,
    several times faster than the per-tensor loop on a CPU.
    """
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
