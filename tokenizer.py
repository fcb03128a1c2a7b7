"""Training the VQ tokenizer (vq.py's model) and encoding a dataset to codes.

    python tokenizer.py train --dataset fashion-mnist --image-size 32 --vq-model VQ-S --results-dir runs/vq
    python tokenizer.py extract --vq-ckpt runs/vq/checkpoints/0005000.pt --dataset fashion-mnist \
        --image-size 32 --views flip --code-path codes/fmnist

Losses as LlamaGen's: L2 (+ L1) reconstruction, codebook and commitment, a PatchGAN from --disc-start on.
There is no perceptual (LPIPS) loss: it needs VGG weights, which we do not ship.
"""
import argparse
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from vq import VQ_PRESETS, VQConfig, VQModel, get_config, load_vq, to_uint8
from util import (NONNEG, NONNEG_INT, POSITIVE, POSITIVE_INT, EpochSampler, Logger, add_options, arg_type, atomic_write,
                  barrier, blame, cleanup_distributed, option, read_checkpoint, run_command, save_atomic, save_grid,
                  setup_distributed)
from model import BETAS, MAX_GRAD_NORM, load_state_dict_strict

# ----------------------------------------------------------------------------------------------------
# Training: L2 (+ L1) reconstruction, codebook and commitment losses, a PatchGAN from --disc-start on


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming): every output logit judges one patch of the image. LlamaGen's 3
    layers leave a 2x2 map at 32 px; fewer layers on small images keep the map at least 6x6."""

    def __init__(self, image_size, ndf=64):
        super().__init__()
        n_layers, mult = max(1, min(3, int(math.log2(image_size / 8)))), 1
        layers = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        self.main = nn.Sequential(*layers, nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        for m in self.modules():  # DCGAN init, as the PatchGAN papers use
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


@torch.no_grad()
def reconstruct(model, images, device):
    """Reconstructions (float32, on the CPU), 64 images at a time in eval mode; the model goes back to training."""
    model.eval()
    out = torch.cat([model(b.to(device))[0].float().cpu() for b in images.split(64)])
    model.train()
    return out


def psnr(x, y):
    """Mean PSNR in dB of images in [-1, 1], measured on the [0, 1] scale."""
    mse = ((x.float().clamp(-1, 1) - y.float()) / 2).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()


class RFID:
    """rFID: the Fréchet distance of a model's reconstructions of held-out images to the images themselves."""

    def __init__(self, s, device):
        import fid  # here, not at the top: the tokenizer's model and extraction never need it (3 import levels)

        self.fid = fid
        self.inception, self.device = fid.load_inception(s.inception_weights, device, download=False), device
        source = data.open_dataset(s.dataset, s.data_path, split="test", download=False)
        held_out = data.ViewDataset(source, s.image_size)
        self.images = torch.stack([held_out[i][0] for i in range(min(s.rfid_images, len(held_out)))])
        self.real = self.stats(self.images)

    def stats(self, images):
        return self.fid.stats(self.fid.extract(self.inception, to_uint8(images), device=self.device, progress=False)[0])

    def __call__(self, model):
        return self.fid.frechet_distance(*self.stats(reconstruct(model, self.images, self.device)), *self.real)


def read_resume(s, cfg):
    """(path, checkpoint) that --resume names, checked against cfg; (None, None) for a fresh run."""
    folder = os.path.join(s.results_dir, "checkpoints")
    existing = sorted(f for f in os.listdir(folder) if f.endswith(".pt")) if os.path.isdir(folder) else []
    if s.resume is None and existing:
        raise ValueError(f"--results-dir {s.results_dir} already holds checkpoints; pass "
                         "--resume auto to continue that run or choose another folder.")
    if s.resume is None or (s.resume == "auto" and not existing):
        return None, None
    path = os.path.join(folder, existing[-1]) if s.resume == "auto" else s.resume
    if not os.path.isfile(path):
        raise ValueError(f"--resume {path}: no such checkpoint file.")
    ckpt = read_checkpoint(path, "--resume")
    needed = ("model", "config", "optimizer", "disc", "disc_optimizer", "steps")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        raise ValueError(f"--resume {path} is not a checkpoint of `tokenizer.py train` "
                         f"(it lacks some of {', '.join(needed)}).")
    if VQConfig(**ckpt["config"]) != cfg:
        raise ValueError(f"--resume {path} was trained with another tokenizer config than --vq-model {s.vq_model} "
                         f"and the flags given now: {ckpt['config']}.")
    return path, ckpt


def train(s):
    """Train a tokenizer as the TrainSettings `s` say; returns the path of the last checkpoint."""
    rank, world, device = setup_distributed()
    torch.manual_seed(s.seed * world + rank)
    with blame("--vq-model"):
        cfg = get_config(s.vq_model)
    cfg = replace(cfg, codebook_size=s.codebook_size or cfg.codebook_size,
                  codebook_embed_dim=s.codebook_embed_dim or cfg.codebook_embed_dim)
    if s.global_batch_size % world != 0:
        raise ValueError(f"--global-batch-size {s.global_batch_size} is not divisible by the {world} processes.")
    batch = s.global_batch_size // world
    resume_path, ckpt = read_resume(s, cfg)
    model, disc = VQModel(cfg).to(device), PatchDiscriminator(s.image_size).to(device)
    opt, opt_d = (torch.optim.Adam(m.parameters(), lr=s.lr, betas=BETAS) for m in (model, disc))
    if ckpt:
        load_state_dict_strict(model, ckpt["model"], resume_path)
        for obj, key in ((disc, "disc"), (opt, "optimizer"), (opt_d, "disc_optimizer")):
            obj.load_state_dict(ckpt[key])
    step = ckpt["steps"] if ckpt else 0
    raw_model, raw_disc = model, disc
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model, disc = (nn.parallel.DistributedDataParallel(m, device_ids=ids) for m in (model, disc))

    with blame(f"--dataset {s.dataset}"):
        source = data.open_dataset(s.dataset, s.data_path)
    with blame("--image-size"):
        side = raw_model.grid_size(s.image_size)
    per_epoch = len(source) // s.global_batch_size
    if per_epoch == 0:
        raise ValueError(f"--global-batch-size {s.global_batch_size} is larger than the dataset "
                         f"({len(source)} images).")
    total = s.steps or s.epochs * per_epoch
    dataset = data.ViewDataset(source, s.image_size, views=s.views)  # item = image * views + view
    sampler = EpochSampler(len(source), dataset.num_views, per_epoch * batch, s.seed, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True,
                                         num_workers=s.num_workers, generator=torch.Generator())
    fixed = torch.stack([dataset[i * dataset.num_views][0] for i in range(min(s.grid_images, len(source)))])
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    if rank == 0:
        os.makedirs(os.path.join(s.results_dir, "samples"), exist_ok=True)
    log, rfid = Logger(s.results_dir, rank), None
    try:
        rfid = RFID(s, device) if rank == 0 and s.rfid_images > 0 else None
    except (FileNotFoundError, ValueError) as e:  # no Inception weights or no held-out split: train on
        log(f"rFID skipped: {e}")
    log(f"VQ {s.vq_model}: {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters, "
        f"codebook {cfg.codebook_size}x{cfg.codebook_embed_dim}, grid {side}x{side}; {len(source)} images x "
        f"{dataset.num_views} views, {total} steps" + (f", resuming from {resume_path} at step {step}" if ckpt else ""))

    model.train()
    disc.train()
    bar = log.bar = tqdm(total=total, initial=step, disable=rank != 0, desc="train vq", dynamic_ncols=True)
    sums, t0, last_good = Counter(), time.time(), resume_path
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        sampler.set_epoch(epoch, skip * batch)  # a resumed run skips what it has seen of this epoch
        for x, *_ in loader:
            x, gan_on = x.to(device, non_blocking=True), 0 <= s.disc_start <= step
            with autocast:
                recon, _, q = model(x)
                recon = recon.float()
                rec = F.mse_loss(recon, x)
                loss = rec + q["codebook"] + q["commit"]
                if s.l1_weight > 0:
                    loss = loss + s.l1_weight * (recon - x).abs().mean()
                if "entropy" in q:
                    loss = loss + q["entropy"]
                if gan_on:  # hinge generator loss: push the discriminator's logits on fakes up
                    g_loss = -disc(recon).float().mean()
                    loss = loss + s.disc_weight * g_loss
            if not torch.isfinite(loss):
                bar.close()
                raise FloatingPointError(f"the loss became {loss.item()} at step {step}; the last good checkpoint "
                                         f"is {last_good}.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            opt.step()
            sums.update(loss=loss.item(), rec=rec.item(), psnr=psnr(recon.detach(), x), codebook=q["codebook"].item(),
                        commit=q["commit"].item(), n=1)
            if gan_on:  # hinge discriminator loss on real images and detached reconstructions
                with autocast:
                    real, fake = disc(x).float(), disc(recon.detach()).float()
                    d_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                nn.utils.clip_grad_norm_(disc.parameters(), MAX_GRAD_NORM)
                opt_d.step()
                sums.update(g_loss=g_loss.item(), d_loss=d_loss.item())
            step += 1
            bar.update(1)

            if step % s.log_every == 0 or step == total:
                n = sums.pop("n")
                avg = {k: v / n for k, v in sums.items()}
                avg.update(step=step, usage=raw_model.quantize.usage(), steps_per_s=n / (time.time() - t0))
                bar.set_postfix(psnr=f"{avg['psnr']:.2f}", usage=f"{avg['usage']:.3f}")
                log(f"step {step:7d} " + " ".join(f"{k} {v:.4f}" for k, v in avg.items() if k != "step"))
                log.record(avg)
                sums, t0 = Counter(), time.time()
            if rank == 0 and (step % s.sample_every == 0 or step == total):  # rows of k originals, k reconstructions
                out, k = reconstruct(raw_model, fixed, device), min(8, len(fixed))
                rows = [to_uint8(a[i:i + k]) for i in range(0, len(fixed) - len(fixed) % k, k) for a in (fixed, out)]
                path = os.path.join(s.results_dir, "samples", f"recon_{step:07d}.png")
                save_grid(np.concatenate(rows), path, nrow=k, padding=0)
                log(f"step {step:7d} fixed-batch psnr {psnr(out, fixed):.2f} dB -> {path}")
            if step % s.ckpt_every == 0 or step == total:
                if rank == 0:
                    last_good = os.path.join(s.results_dir, "checkpoints", f"{step:07d}.pt")
                    save_atomic({"model": raw_model.state_dict(), "config": asdict(cfg), "optimizer": opt.state_dict(),
                                 "disc": raw_disc.state_dict(), "disc_optimizer": opt_d.state_dict(), "steps": step,
                                 "args": asdict(s)}, last_good)
                if rfid is not None:
                    value = rfid(raw_model)
                    log(f"step {step:7d} rFID {value:.3f} on {s.rfid_images} held-out images")
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


def extract(s):
    """Encode every view of every image of a dataset as the ExtractSettings `s` say; torchrun shards it."""
    rank, world, device = setup_distributed()
    codes_path, labels_path, meta_path = (os.path.join(s.code_path, name)
                                          for name in ("codes.npy", "labels.npy", "meta.json"))
    if os.path.exists(codes_path) and not s.overwrite:
        raise ValueError(f"--code-path {s.code_path} already holds codes.npy; pass --overwrite to replace it.")
    with blame("--vq-ckpt"):
        vq = load_vq(s.vq_ckpt, preset=s.vq_model, device=device)
    with blame("--image-size"):
        grid = vq.grid_size(s.image_size)
    with blame(f"--dataset {s.dataset}"):
        source = data.open_dataset(s.dataset, s.data_path, split=s.split)
    n, a, vocab = len(source), data.num_views(s.views), vq.config.codebook_size
    dtype = np.int16 if vocab <= 1 << 15 else np.int32
    barrier(world)  # every rank has checked the output folder before rank 0 touches it
    if rank == 0:
        os.makedirs(s.code_path, exist_ok=True)
        if os.path.exists(meta_path):  # an overwrite in progress must not look complete
            os.remove(meta_path)
        np.lib.format.open_memmap(codes_path, mode="w+", dtype=dtype, shape=(n, a, grid * grid)).flush()
        np.lib.format.open_memmap(labels_path, mode="w+", dtype=np.int64, shape=(n,)).flush()
    barrier(world)

    lo, hi = n * rank // world, n * (rank + 1) // world  # this rank's images; item k is view k % a of image k // a
    mine = torch.utils.data.Subset(data.ViewDataset(source, s.image_size, views=s.views), range(lo * a, hi * a))
    loader = torch.utils.data.DataLoader(mine, batch_size=s.batch_size, num_workers=s.num_workers)
    codes, labels = (np.lib.format.open_memmap(p, mode="r+") for p in (codes_path, labels_path))
    try:
        for x, y, idx, v in tqdm(loader, disable=rank != 0, desc=f"extract {s.views}", dynamic_ncols=True):
            codes[idx.numpy(), v.numpy()] = vq.encode(x.to(device)).flatten(1).cpu().numpy().astype(dtype)
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
    if rank == 0:  # meta.json last: its presence means the codes are complete
        split = next((x for x in data.SPLITS if s.dataset.endswith("-" + x)), s.split)
        meta = {"grid": [grid, grid], "vocab_size": vocab, "num_classes": source.num_classes,
                "image_size": s.image_size, "views": s.views, "num_views": a, "dataset": s.dataset, "split": split,
                "data_path": s.data_path and os.path.abspath(s.data_path), "tokenizer": os.path.abspath(s.vq_ckpt),
                "tokenizer_config": asdict(vq.config), "num_images": n}
        atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
        print(f"wrote {n} x {a} x {grid * grid} codes to {s.code_path}")
    cleanup_distributed(world)

# ----------------------------------------------------------------------------------------------------
# CLI: the settings dataclasses are the flags (util.add_options); train.py's one command builds them


@dataclass
class TrainSettings:
    dataset: str = option(required=True, help="cifar10, mnist, fashion-mnist or folder (its train split)")
    results_dir: str = option(required=True)
    data_path: str = option()
    image_size: int = option(32, type=POSITIVE_INT)
    views: str = option("flip", choices=data.VIEWS, help="augmentation: a random view per image")
    vq_model: str = option("VQ-S", choices=VQ_PRESETS)
    codebook_size: int = option(type=POSITIVE_INT, help="override the preset's")
    codebook_embed_dim: int = option(type=POSITIVE_INT, help="override the preset's")
    resume: str = option(help="'auto' (newest checkpoint in --results-dir) or a checkpoint path")
    steps: int = option(type=POSITIVE_INT, help="total training steps (default: from --epochs)")
    epochs: int = option(40, type=POSITIVE_INT)
    global_batch_size: int = option(128, type=POSITIVE_INT)
    lr: float = option(1e-4, type=POSITIVE)
    l1_weight: float = option(0.0, type=NONNEG, help="an L1 loss beside the L2 one")
    disc_start: int = option(20000, type=arg_type(int, -1), help="step that switches the GAN loss on; -1: never")
    disc_weight: float = option(0.5, type=NONNEG)
    log_every: int = option(100, type=POSITIVE_INT)
    sample_every: int = option(1000, type=POSITIVE_INT)
    ckpt_every: int = option(5000, type=POSITIVE_INT)
    grid_images: int = option(16, type=POSITIVE_INT)
    rfid_images: int = option(1000, type=NONNEG_INT, help="rFID on this many test images at each checkpoint; 0: never")
    inception_weights: str = option(help="pt_inception-2015-12-05-6726825d.pth (fid.py)")
    num_workers: int = option(0, type=NONNEG_INT)
    seed: int = option(0, type=NONNEG_INT)


@dataclass
class ExtractSettings:
    vq_ckpt: str = option(required=True)
    dataset: str = option(required=True)
    image_size: int = option(type=POSITIVE_INT, required=True)
    code_path: str = option(required=True)
    vq_model: str = option(choices=VQ_PRESETS, help="architecture of a LlamaGen checkpoint (ours store their config)")
    data_path: str = option()
    split: str = option("train")
    views: str = option("none", choices=data.VIEWS)
    overwrite: bool = option(False, action="store_true")
    batch_size: int = option(64, type=POSITIVE_INT)
    num_workers: int = option(0, type=NONNEG_INT)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    add_options(sub.add_parser("train", help="train a VQ tokenizer"), TrainSettings)
    add_options(sub.add_parser("extract", help="encode a dataset into a code dataset"), ExtractSettings)
    args = vars(p.parse_args(argv))
    if args.pop("command") == "train":
        return run_command(lambda: train(TrainSettings(**args)))
    return run_command(lambda: extract(ExtractSettings(**args)))


if __name__ == "__main__":
    main()
