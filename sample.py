"""Sampling from a GPT checkpoint: a PNG grid to look at, or a folder of PNGs and an .npz for FID.

    python sample.py --gpt-ckpt results/000-fmnist/checkpoints/0002000.pt --vq-ckpt vq.pt --ema \
        --cfg-scale 2.0 --num-samples 32 --out grid.png
    torchrun --nproc_per_node 8 sample.py --gpt-ckpt c2i_B_256.pt --gpt-model GPT-B --image-size 256 \
        --vq-ckpt vq_ds16_c2i.pt --vq-model VQ-16 --cfg-scale 2.0 --num-fid-samples 50000 --sample-dir fid/B

Randomness comes in fixed chunks of --batch-size samples: chunk k (samples k*B .. k*B+B-1) draws from a
generator seeded by (seed, k*B), and FID sample i has class i % num_classes. So sample i depends on
the seed, i, the batch size and the device type, never on the number of ranks (chunk k goes to rank
k % world) or on resumption (a chunk with a missing PNG is made again, whole, and the same).
"""
import argparse
import json
import math
import os
import re
import zipfile

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from model import GPT_PRESETS, load_gpt
from util import (FINITE, NONNEG_INT, POSITIVE, POSITIVE_INT, arg_type, atomic_write, barrier, blame,
                  cleanup_distributed, read_checkpoint, run_command, save_grid, setup_distributed)
from vq import VQ_PRESETS, load_vq, sample_images

SETTINGS_FILE = "sample_settings.json"  # in --sample-dir: what made its PNGs, so a resume cannot mix runs
PNG_NAME = re.compile(r"\d{6,}\.png")  # 000000.png ...: the only PNGs this script makes or removes
PRECISIONS = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# ----------------------------------------------------------------------------------------------------
# Building blocks: models, sampling, grids and .npz files


def check_compatible(gpt, vq, image_size=None):
    """The GPT must speak the tokenizer's vocabulary on the tokenizer's grid; say both numbers if not."""
    vocab, codebook = gpt.config.vocab_size, vq.config.codebook_size
    if vocab != codebook:
        raise ValueError(f"the GPT's vocabulary has {vocab} tokens but the tokenizer's codebook has {codebook} "
                         "entries: --gpt-ckpt and --vq-ckpt do not belong together.")
    g, f = gpt.config.grid_size, vq.downsample_factor
    if image_size is not None and vq.grid_size(image_size) != g:
        raise ValueError(f"--image-size {image_size} makes a {vq.grid_size(image_size)}x{vq.grid_size(image_size)} "
                         f"token grid with this tokenizer, but the GPT's grid is {g}x{g} (image size {g * f}).")


def recorded_vq_ckpt(gpt_ckpt):
    """The tokenizer path a training checkpoint recorded, or None (LlamaGen's record none)."""
    try:
        ckpt = read_checkpoint(gpt_ckpt, "--gpt-ckpt", mmap=True)
    except (FileNotFoundError, ValueError):
        return None  # load_gpt explains an unreadable file better
    args = ckpt.get("args") if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict) else {}
    return (ckpt.get("vq_ckpt") if isinstance(ckpt, dict) else None) or args.get("vq_ckpt")


def chunk_generator(seed, start, device):
    """The generator of the chunk starting at sample `start`: a function of (seed, start) alone."""
    mixed = int(np.random.SeedSequence([seed, start]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(mixed)


@torch.no_grad()
def save_png(image, path):  # atomic: a run killed mid-write must not leave a PNG that a resume would skip
    atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


def write_npz(path, png_paths, labels):
    """ADM-evaluator .npz (arr_0: uint8 NHWC, plus labels) from PNGs, streamed: 50k images need no RAM."""
    with Image.open(png_paths[0]) as im:
        shape = np.asarray(im.convert("RGB")).shape
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(png_paths), *shape)}

    def write(out):
        with zipfile.ZipFile(out, "w") as zf:  # stored, not deflated, like np.savez
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for p in tqdm(png_paths, desc="npz", unit="img", dynamic_ncols=True):
                    with Image.open(p) as im:
                        img = np.asarray(im.convert("RGB"))
                    if img.shape != shape:
                        raise ValueError(f"{p} is {img.shape[1]}x{img.shape[0]} pixels, the others {shape[1]}x{shape[0]}")
                    f.write(img.tobytes())
            with zf.open("labels.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))

    atomic_write(path, write)

# ----------------------------------------------------------------------------------------------------
# The two jobs: a grid, and FID samples sharded over ranks


def sampling_kwargs(args):
    return dict(cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, compile=args.compile)


def make_grid(args, gpt, vq, device):
    num_classes = gpt.config.num_classes
    if args.classes:
        labels = np.resize(args.classes, args.num_samples)
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"--classes must lie in 0..{num_classes - 1} (the GPT has {num_classes} classes).")
    else:
        gen = torch.Generator().manual_seed(args.seed)
        labels = torch.randint(num_classes, (args.num_samples,), generator=gen).numpy()
    b = args.batch_size  # labels padded (cyclically) to whole chunks: the batch shape decides the random stream
    labels = np.resize(np.asarray(labels, dtype=np.int64), math.ceil(len(labels) / b) * b)
    chunks = []
    for start in tqdm(range(0, len(labels), b), desc="sample", unit="batch", dynamic_ncols=True):
        gen = chunk_generator(args.seed, start, device)
        chunks.append(sample_images(gpt, vq, labels[start:start + b], generator=gen, **sampling_kwargs(args)))
    save_grid(np.concatenate(chunks)[:args.num_samples], args.out, nrow=args.nrow)
    print(f"wrote {args.num_samples} samples (classes {' '.join(map(str, labels[:args.num_samples]))}) to {args.out}")


def settings_of(args, gpt, device):
    """Everything that decides the pixels of sample i (the sample count does not)."""
    keys = ("gpt_model", "ema", "vq_model", "cfg_scale", "cfg_interval", "temperature", "top_k", "top_p",
            "seed", "batch_size", "precision")
    s = {k: getattr(args, k) for k in keys}
    s.update(gpt_ckpt=os.path.abspath(args.gpt_ckpt), vq_ckpt=os.path.abspath(args.vq_ckpt),
             grid_size=gpt.config.grid_size, num_classes=gpt.config.num_classes, device=device.type)
    if args.compile:  # inductor's kernels may round differently (recorded only when on: older folders still match)
        s["compile"] = True
    return s


def make_fid_samples(args, gpt, vq, rank, world, device):
    out, n, b = args.sample_dir, args.num_fid_samples, args.batch_size
    settings, settings_path = settings_of(args, gpt, device), os.path.join(out, SETTINGS_FILE)
    old = None
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            old = json.load(f)
    pngs = sorted(f for f in os.listdir(out) if PNG_NAME.fullmatch(f)) if os.path.isdir(out) else []
    stale = bool(pngs) and old != settings
    if stale and not args.overwrite:
        diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old and old.get(k) != v]
        why = f"samples made with other settings ({'; '.join(diff)})" if old else "PNGs this script did not make"
        raise ValueError(f"--sample-dir {out} holds {why}; choose another --sample-dir or pass --overwrite "
                         "to make them again.")
    barrier(world)  # every rank has looked at the folder before rank 0 changes it
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        for f in pngs if stale else []:  # first, so that no old PNG can outlive the new settings file
            os.remove(os.path.join(out, f))
        atomic_write(settings_path, lambda f: f.write(json.dumps(settings, indent=1).encode()))
    barrier(world)

    labels = np.arange(math.ceil(n / b) * b) % gpt.config.num_classes  # balanced; sample i has class i % C
    paths = [os.path.join(out, f"{i:06d}.png") for i in range(n)]
    todo = [s for s in range(rank * b, n, world * b) if not all(map(os.path.exists, paths[s:s + b]))]
    bar = tqdm(total=sum(len(paths[s:s + b]) for s in todo), desc=f"{n} samples for FID", unit="img",
               disable=rank != 0, dynamic_ncols=True)
    for start in todo:
        gen = chunk_generator(args.seed, start, device)
        images = sample_images(gpt, vq, labels[start:start + b], generator=gen, **sampling_kwargs(args))
        for path, img in zip(paths[start:start + b], images):
            if not os.path.exists(path):
                save_png(img, path)
        bar.update(len(paths[start:start + b]))
    bar.close()
    barrier(world)
    if rank == 0:
        try:
            write_npz(args.npz, paths, labels[:n])
        except (OSError, ValueError) as e:  # a PNG changed or broken by hand since it was made
            raise ValueError(f"--npz {args.npz} not written: {e}")
        print(f"wrote {n} samples to {out} and {args.npz}")

# ----------------------------------------------------------------------------------------------------
# CLI


def build_parser():
    p = argparse.ArgumentParser(
        description="Sample images from a class-conditional GPT checkpoint: a PNG grid, or PNGs + .npz for FID.",
        epilog="LlamaGen's own checkpoints carry no config: give --gpt-model (e.g. GPT-B for c2i_B_256.pt), "
               "--image-size (256) and --vq-model VQ-16 for vq_ds16_c2i.pt. Our training checkpoints need "
               "none of these, and --vq-ckpt only when they do not record their tokenizer.")
    p.add_argument("--gpt-ckpt", required=True, help="our training checkpoint or LlamaGen's c2i_*.pt")
    p.add_argument("--gpt-model", default=None, choices=list(GPT_PRESETS), help="architecture of a LlamaGen checkpoint")
    p.add_argument("--ema", action="store_true", help="sample from the EMA weights")
    p.add_argument("--vq-ckpt", default=None, help="tokenizer checkpoint (default: the one the GPT checkpoint records)")
    p.add_argument("--vq-model", default=None, choices=list(VQ_PRESETS),
                   help="architecture of a LlamaGen tokenizer, e.g. VQ-16")
    p.add_argument("--image-size", type=POSITIVE_INT, default=None,
                   help="image side in pixels; needed for LlamaGen's checkpoints")
    p.add_argument("--precision", default="bf16", choices=list(PRECISIONS),
                   help="GPT weights' dtype on a GPU (a CPU uses fp32)")
    p.add_argument("--cfg-scale", type=FINITE, default=2.0, help="classifier-free guidance; 1.0 turns it off")
    p.add_argument("--cfg-interval", type=arg_type(int, -1), default=-1, help="stop guidance after this many tokens; -1: never")
    p.add_argument("--temperature", type=POSITIVE, default=1.0)
    p.add_argument("--top-k", type=NONNEG_INT, default=0, help="0: no top-k filtering")
    p.add_argument("--top-p", type=arg_type(float, 0, 1, lo_open=True), default=1.0, help="1.0: no nucleus filtering")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA graphs on a GPU): the same computation, though inductor's "
                        "kernels may round differently")
    p.add_argument("--seed", "--global-seed", dest="seed", type=NONNEG_INT, default=0)
    p.add_argument("--batch-size", "--per-proc-batch-size", dest="batch_size", type=POSITIVE_INT, default=32,
                   help="samples per forward; part of what decides the samples (it shapes the random stream)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out / --npz, or a --sample-dir made with other settings")
    g = p.add_argument_group("grid")
    g.add_argument("--num-samples", type=POSITIVE_INT, default=32)
    g.add_argument("--classes", default=None,
                   help="comma-separated class ids, repeated to fill the grid (default: drawn with --seed)")
    g.add_argument("--nrow", type=POSITIVE_INT, default=None, help="images per grid row; default: a square")
    g.add_argument("--out", default="samples.png", help="the grid PNG")
    f = p.add_argument_group("FID samples (sharded over ranks under torchrun, resumable)")
    f.add_argument("--num-fid-samples", type=POSITIVE_INT, default=None, help="make this many samples as PNGs and an .npz")
    f.add_argument("--sample-dir", default=None, help="folder of the PNGs 000000.png ...")
    f.add_argument("--npz", default=None, help="the ADM-evaluator .npz (default: <sample-dir>/samples.npz)")
    return p


def check_args(args):
    """Everything a user can get wrong without loading a model, said before any rank starts work."""
    if args.classes is not None:
        try:
            args.classes = [int(c) for c in args.classes.split(",") if c.strip()]
        except ValueError:
            raise ValueError(f"--classes expects comma-separated integers like 1,2,3, got {args.classes!r}.") from None
    if args.num_fid_samples is None and (args.sample_dir or args.npz):
        raise ValueError("--sample-dir and --npz are for FID samples: give --num-fid-samples too (or --out for a grid).")
    if args.num_fid_samples:
        if not args.sample_dir:
            raise ValueError("--num-fid-samples needs --sample-dir, the folder for its PNGs.")
        args.npz = args.npz or os.path.join(args.sample_dir, "samples.npz")
        if os.path.exists(args.npz) and not args.overwrite:
            raise ValueError(f"--npz {args.npz} already exists; pass --overwrite to replace it.")
    elif os.path.exists(args.out) and not args.overwrite:
        raise ValueError(f"--out {args.out} already exists; pass --overwrite to replace it.")
    if not os.path.isfile(args.gpt_ckpt):
        raise ValueError(f"--gpt-ckpt {args.gpt_ckpt} does not exist.")
    if args.vq_ckpt is None:
        args.vq_ckpt = recorded_vq_ckpt(args.gpt_ckpt)
        if args.vq_ckpt is None:
            raise ValueError(f"--vq-ckpt is needed: {args.gpt_ckpt} does not record which tokenizer it was trained on.")
        if not os.path.isfile(args.vq_ckpt):
            raise ValueError(f"{args.gpt_ckpt} was trained with the tokenizer {args.vq_ckpt}, which does not exist "
                             "here; give its path with --vq-ckpt.")


def load_models(args, device):
    with blame("--vq-ckpt"):
        vq = load_vq(args.vq_ckpt, preset=args.vq_model, device=device)
    with blame("--image-size"):
        grid = vq.grid_size(args.image_size) if args.image_size else None
    with blame("--gpt-ckpt"):
        gpt = load_gpt(args.gpt_ckpt, preset=args.gpt_model, grid_size=grid, use_ema=args.ema, device=device)
    check_compatible(gpt, vq, args.image_size)
    if device.type == "cuda":  # a CPU has no fast half-precision matmuls; fp32 there
        gpt = gpt.to(PRECISIONS[args.precision])
    else:
        args.precision = "none"
    return gpt.eval(), vq.eval()


def sample(args):
    check_args(args)
    rank, world, device = setup_distributed()
    try:
        gpt, vq = load_models(args, device)
        if args.num_fid_samples:
            make_fid_samples(args, gpt, vq, rank, world, device)
        elif rank == 0:  # a grid is one process's work, even under torchrun
            make_grid(args, gpt, vq, device)
    finally:
        cleanup_distributed(world)


def main(argv=None):
    run_command(sample, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
