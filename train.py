"""
Train the GPT on a code dataset: the LlamaGen baseline, Mirai-E or Mirai-I, one process or many.

    python train.py --dataset fashion-mnist --foresight implicit      # tokenizer, codes and GPT in one command
    python train.py --code-path codes/fmnist --gpt-model GPT-T --max-steps 2000 --foresight explicit --vq-ckpt vq.pt
    torchrun --nproc_per_node=8 train.py --code-path codes/imagenet256 --gpt-model GPT-B \
        --foresight implicit --foresight-encoder dinov2_vitb14 --data-path /data/imagenet/train

Writes results/NNN-<model>-<foresight>/ with log.txt, metrics.jsonl, samples/*.png and checkpoints/*.pt
(plus last.pt). A killed run continues with --resume auto (or a path) as if it had never stopped: the data
order is a function of (seed, epoch), and the checkpoint holds the place in the epoch and every rank's RNG.
"""
import argparse
import contextlib
import copy
import glob
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import foresight as FS
import quality
import tokenizer
from data import CodeDataset
from util import (FINITE, NONNEG, NONNEG_INT, POSITIVE, POSITIVE_INT, PROBABILITY, EpochSampler, Logger, broadcast,
                  cleanup_distributed, gather, folder_name, read_checkpoint, rng_state, run_command, save_atomic, save_grid,
                  setup_distributed)
from model import GPT, GPT_PRESETS, MAX_GRAD_NORM, gpt_config, load_gpt, make_adamw
from vq import load_vq, sample_images

# ----------------------------------------------------------------------------------------------------
# Flags

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("data and model").add_argument
    a("--code-path", help="code dataset folder from `tokenizer.py extract`")
    a("--dataset", help="instead of --code-path, the whole job for this dataset (fashion-mnist, mnist, cifar10, "
                        "folder): tokenizer, codes and GPT, each stage reusing what --out already holds")
    a("--out", help="with --dataset: the folder of all stages (default runs/<dataset>)")
    a("--image-size", type=POSITIVE_INT, default=32, help="with --dataset: image side (VQ-S makes 8x8 tokens of 32 px)")
    a("--vq-steps", type=POSITIVE_INT, help="with --dataset: tokenizer steps (default 700 on a CPU, 5000 on a GPU)")
    a("--data-path", help="the images the codes came from (Mirai-I); default: meta.json's")
    a("--results-dir", default="results")
    a("--gpt-model", default="GPT-B", choices=list(GPT_PRESETS))
    a("--gpt-ckpt", help="start from these GPT weights (ours or LlamaGen's)")
    a("--vq-ckpt", help="the tokenizer: decodes samples; the 'vq' Mirai-I teacher")
    a("--dropout-p", type=PROBABILITY, default=0.1, help="residual and FFN dropout")
    a("--token-dropout-p", type=PROBABILITY, default=0.1)
    a("--drop-path-rate", type=PROBABILITY, default=0.0)
    a("--class-dropout-prob", type=PROBABILITY, default=0.1, help="label dropout for CFG")
    f = p.add_argument_group("foresight (Mirai)").add_argument
    f("--foresight", default="none", choices=["none", "explicit", "implicit"])
    f("--foresight-level", default="representation", choices=["representation", "output"],
      help="align hidden states (Mirai) or predict the neighbours' tokens with extra heads")
    f("--foresight-depth", type=POSITIVE_INT, help="student block (1-based); default 2/3 of the layers")
    f("--foresight-k", type=POSITIVE_INT, help="targets per position; default 3 explicit, 1 implicit")
    f("--foresight-layout", default="2d", choices=["2d", "1d"])
    f("--foresight-coef", type=FS.coef_list, default="2", help="lambda: one for all targets or one per target (1,0.5,0.5)")
    f("--foresight-warmup", type=FS.warmup_text, help="next-token training first: steps (500), epochs (15ep) or a "
                                                   "share of the run (10%%); default 15ep explicit, 0 implicit")
    f("--foresight-schedule", default="constant", help="lambda after warm-up: constant, cosine, or 'step:scale,...'")
    f("--foresight-encoder", default="dinov2_vitb14",
      help="Mirai-I teacher: dinov2_vit{s,b,l,g}14[_reg] (torch.hub) or vq (the tokenizer's encoder, offline)")
    f("--foresight-proj-dim", type=POSITIVE_INT, help="projector width; default 2048 from dim 768, else 2*dim")
    o = p.add_argument_group("optimisation").add_argument
    o("--epochs", type=POSITIVE_INT, default=300)
    o("--max-steps", type=POSITIVE_INT, help="stop after this many steps (overrides --epochs)")
    o("--global-batch-size", type=POSITIVE_INT, default=256)
    o("--grad-accum", type=POSITIVE_INT, default=1, help="micro-batches per step on each rank")
    o("--lr", type=POSITIVE, default=1e-4)
    o("--weight-decay", type=NONNEG, default=5e-2)
    o("--ema", action="store_true", help="keep an EMA of the weights (always on for Mirai-E: it is the teacher)")
    o("--ema-decay", type=PROBABILITY, default=0.9999)
    o("--mixed-precision", choices=["none", "bf16", "fp16"], help="autocast; default bf16 on a GPU, none on a CPU "
      "(bf16 there: ~1.8x faster steps where the CPU has AMX, slower where it lacks bf16 matmuls)")
    o("--compile", action="store_true", help="torch.compile the student")
    o("--global-seed", "--seed", dest="seed", type=NONNEG_INT, default=0)
    o("--num-workers", type=NONNEG_INT, help="data loader workers; default 4 on GPU, 0 on CPU")
    r = p.add_argument_group("logging, checkpoints, samples, evaluation").add_argument
    r("--log-every", type=POSITIVE_INT, default=100)
    r("--ckpt-every", type=POSITIVE_INT, default=5000)
    r("--sample-every", type=POSITIVE_INT, help="save a sample grid every N steps (default: only at the end)")
    r("--cfg-scale", type=FINITE, default=2.0, help="guidance of sample grids and evaluation samples")
    r("--num-sample-images", type=POSITIVE_INT, default=32)
    r("--eval-every", type=POSITIVE_INT, help="score --eval-samples samples every N steps")
    r("--eval-metric", default="auto", choices=["auto", "inception", "classifier"],
      help="auto: FID where the Inception weights and --eval-reference are, else the dataset classifier's FD and "
           "class agreement (MNIST, Fashion-MNIST, CIFAR-10)")
    r("--eval-weights", default="ema", choices=["ema", "raw", "both"], help="the weights that make evaluation samples")
    r("--eval-samples", type=POSITIVE_INT, default=1000, help="samples per evaluation, and held-out images scored")
    r("--eval-batch-size", type=POSITIVE_INT, default=250)
    r("--eval-reference", help="reference for FID: stats .npz, images .npz or a dataset name")
    r("--eval-codes", help="a held-out code dataset: its NTP loss is logged at each evaluation")
    r("--resume", help="a checkpoint path, or 'auto': the newest run of this model and foresight")
    r("--exp-name", type=folder_name, help="experiment folder name; default NNN-<model>-<foresight>")
    r("--no-progress", action="store_true", help="no tqdm bar")
    return p


# ----------------------------------------------------------------------------------------------------
# Building blocks: EMA, RNG, the meter, the models, checkpoints and what a resume must share


@torch.no_grad()
def update_ema(ema, model, decay):
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)


class Meter:
    """Sums since the last log line, kept on the device (no sync per step): NTP loss, gradient norm,
    steps with foresight on, and the foresight losses (averaged over those steps)."""

    def __init__(self, k, device):
        self.sums, self.count, self.start = torch.zeros(3 + k, device=device), 0, time.perf_counter()

    def add(self, ntp, fs_losses, accum):
        self.sums[0] += ntp.detach() / accum
        if fs_losses is not None:
            self.sums[3:] += fs_losses.detach() / accum

    def step(self, grad_norm, fs_on):
        self.sums[1] += grad_norm
        self.sums[2] += float(fs_on)
        self.count += 1

    def flush(self, world):
        """-> the averages over all ranks since the last flush (None if no step since), and a reset."""
        if self.count == 0:
            return None
        s = self.sums.clone()
        if world > 1:
            dist.all_reduce(s)
            s /= world
        fs_steps = s[2].item()
        s[3:] /= max(fs_steps, 1.0)
        s[:2] /= self.count
        s = s.tolist()
        row = {"loss": s[0], "grad_norm": s[1], "steps_per_sec": self.count / (time.perf_counter() - self.start)}
        if fs_steps:
            row["foresight"] = s[3:]
        self.sums.zero_()
        self.count, self.start = 0, time.perf_counter()
        return row


def check_data(args, meta, vocab, grid, classes, what):
    """Refuse a model or tokenizer that disagrees with the code dataset, naming both numbers."""
    for name, mine, theirs in (("vocabulary", vocab, meta["vocab_size"]), ("grid", grid, meta["grid"][0]),
                               ("classes", classes, meta["num_classes"])):
        if mine is not None and mine != theirs:
            raise ValueError(f"{what} has {name} {mine}, but the codes in {args.code_path} have {name} {theirs}")


def build_models(args, meta, device):
    grid = meta["grid"][0]
    overrides = dict(resid_dropout_p=args.dropout_p, ffn_dropout_p=args.dropout_p, token_dropout_p=args.token_dropout_p,
                     drop_path_rate=args.drop_path_rate, class_dropout_prob=args.class_dropout_prob)
    if args.gpt_ckpt:
        gpt = load_gpt(args.gpt_ckpt, preset=args.gpt_model, grid_size=grid, **overrides)
        c, arch = gpt.config, ("dim", "n_layer", "n_head", "n_kv_head", "multiple_of", "ffn_dim_multiplier")
        preset = lambda name: [getattr(gpt_config(name), k) for k in arch]
        if [getattr(c, k) for k in arch] != preset(args.gpt_model):  # the run's folder and logs carry --gpt-model
            same = [name for name in GPT_PRESETS if [getattr(c, k) for k in arch] == preset(name)] + ["custom"]
            want = gpt_config(args.gpt_model)
            raise ValueError(f"--gpt-ckpt {args.gpt_ckpt} holds a {same[0]} model (dim {c.dim}, {c.n_layer} layers), not "
                             f"--gpt-model {args.gpt_model} (dim {want.dim}, {want.n_layer} layers): pass the "
                             f"--gpt-model it was made with")
        check_data(args, meta, c.vocab_size, c.grid_size, c.num_classes, f"--gpt-ckpt {args.gpt_ckpt}")
    else:
        gpt = GPT(gpt_config(args.gpt_model, vocab_size=meta["vocab_size"], grid_size=grid,
                             num_classes=meta["num_classes"], **overrides))
    vq = load_vq(args.vq_ckpt, device=device) if args.vq_ckpt else None
    if vq is not None:
        check_data(args, meta, vq.config.codebook_size, vq.grid_size(meta["image_size"]), None, f"--vq-ckpt {args.vq_ckpt}")
    fs, teacher, depth = FS.build(args.foresight, gpt, args.foresight_level, args.foresight_k, args.foresight_depth,
                                  args.foresight_layout, args.foresight_proj_dim, args.foresight_encoder, vq)
    coefs = FS.expand_coefs(args.foresight_coef, fs.k) if fs is not None else []
    to = lambda m: m.to(device) if m is not None else None
    return gpt.to(device), vq, to(fs), to(teacher), depth, coefs


def run_settings(a, fs, dim):
    """The flags that define a run, as values: the data order in the epoch, the optimizer state and the
    heads were made with them, so a resumed run must use the same ones."""
    out = {k: a.get(k) for k in ("global_batch_size", "grad_accum", "lr", "weight_decay", "seed")}
    out["ema"] = bool(a.get("ema")) or a.get("foresight") == "explicit"
    if out["ema"]:
        out["ema_decay"] = a.get("ema_decay")
    if fs is not None:
        proj = a.get("foresight_proj_dim")
        out.update(foresight_coef=FS.expand_coefs(a.get("foresight_coef"), fs.k), foresight_warmup=FS.warmup_flag(a),
                   foresight_schedule=a.get("foresight_schedule"),
                   foresight_proj_dim=proj if proj is not None else FS.default_proj_dim(dim))
    return out


def check_resume(path, ckpt, args, gpt, fs, meta):
    """Refuse, in one sentence naming each field with both values, a resume that would be another run."""
    def differences(old, new, flag=lambda k: k):
        return [f"{flag(k)} {old.get(k)!r} (now {new.get(k)!r})" for k in sorted({*old, *new}) if old.get(k) != new.get(k)]
    diff = differences(ckpt.get("gpt_config") or {}, asdict(gpt.config)) + differences(
        ckpt.get("foresight_setup") or {}, fs.setup if fs else {}, lambda k: f"foresight {k}")
    if diff:
        raise ValueError(f"--resume {path} was trained with another model or foresight setup: {'; '.join(diff)}; "
                         f"use the flags it was made with")
    flag = lambda k: {"seed": "--global-seed"}.get(k, "--" + k.replace("_", "-"))
    diff = differences(run_settings(ckpt["args"], fs, gpt.config.dim), run_settings(vars(args), fs, gpt.config.dim), flag)
    keys = ("dataset", "split", "num_images", "num_views", "grid", "vocab_size", "num_classes")
    diff += differences({k: (ckpt.get("data_meta") or {}).get(k) for k in keys}, {k: meta.get(k) for k in keys},
                        lambda k: f"codes' {k}")
    if diff:
        raise ValueError(f"--resume {path} was made with other settings: {'; '.join(diff)}; resume with the flags it "
                         f"was made with, or start a new run")


def run_folder(args, rank, world):
    """-> (checkpoint to resume or None, the run's folder): --resume, or a new NNN-<model>-<foresight>."""
    suffix, resume = f"{args.gpt_model}-{args.foresight}", args.resume
    if resume == "auto":  # the run named by --exp-name, else the newest of this model and foresight
        found = sorted(glob.glob(os.path.join(glob.escape(args.results_dir), args.exp_name or f"*-{suffix}",
                                              "checkpoints", "last.pt")))
        resume = found[-1] if found else None
    if resume:
        return resume, os.path.dirname(os.path.dirname(os.path.abspath(resume)))
    exp_dir = os.path.join(args.results_dir, args.exp_name or "")
    if rank == 0 and not args.exp_name:
        nums = [int(m.group(1)) for d in (os.listdir(args.results_dir) if os.path.isdir(args.results_dir) else [])
                if (m := re.match(r"(\d+)-", d))]
        exp_dir = os.path.join(args.results_dir, f"{max(nums, default=-1) + 1:03d}-{suffix}")
    exp_dir = broadcast(exp_dir, world)
    if os.path.exists(os.path.join(exp_dir, "checkpoints", "last.pt")):
        raise ValueError(f"{exp_dir} already holds a run; pass --resume auto or another --exp-name")
    return None, exp_dir

# ----------------------------------------------------------------------------------------------------
# Training


def train(args):
    rank, world, device = setup_distributed()
    try:
        return _train(args, rank, world, device)
    finally:
        cleanup_distributed(world)


def _train(args, rank, world, device):
    # setup: everything that can be refused is checked before any file is written
    torch.manual_seed(args.seed * world + rank)
    if args.global_batch_size % (world * args.grad_accum):
        raise ValueError(f"--global-batch-size {args.global_batch_size} does not split into {world} ranks x "
                         f"{args.grad_accum} micro-batches")
    if args.foresight_level == "output" and args.foresight == "implicit":
        raise ValueError("--foresight-level output predicts the neighbours' own tokens: use it with --foresight explicit")
    precision = args.mixed_precision or ("bf16" if device.type == "cuda" else "none")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--mixed-precision fp16 needs a GPU; on a CPU use bf16 (fast where it has AMX) or none")
    per_rank, micro = args.global_batch_size // world, args.global_batch_size // world // args.grad_accum
    data = CodeDataset(args.code_path, with_images=args.foresight == "implicit", data_path=args.data_path)
    meta, n_images = data.meta, len(data.labels)
    H, W = meta["grid"]
    if H != W:
        raise ValueError(f"{args.code_path} has a {H}x{W} grid; the GPT's 2D rotary table needs a square grid")
    steps_per_epoch = n_images // args.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is larger than the dataset ({n_images} images)")
    total_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    warmup = FS.parse_warmup(FS.warmup_flag(vars(args)), steps_per_epoch, total_steps)
    FS.parse_schedule(args.foresight_schedule)
    if args.eval_every and not args.vq_ckpt:
        raise ValueError("--eval-every needs --vq-ckpt, the tokenizer that decodes the samples")
    if args.eval_metric == "inception" and args.eval_every and not args.eval_reference:
        raise ValueError("--eval-metric inception needs --eval-reference (what to compare the samples with)")
    held_out = CodeDataset(args.eval_codes) if args.eval_codes else None
    if held_out is not None:
        check_data(args, held_out.meta, meta["vocab_size"], H, meta["num_classes"], f"--eval-codes {args.eval_codes}")

    gpt, vq, fs, teacher, depth, coefs = build_models(args, meta, device)
    ema = copy.deepcopy(gpt).requires_grad_(False).eval() if args.ema or args.foresight == "explicit" else None
    student = FS.Student(gpt, fs, depth).to(device)
    opt = make_adamw([student], lr=args.lr, weight_decay=args.weight_decay)
    resume, exp_dir = run_folder(args, rank, world)
    step, epoch, in_epoch = 0, 0, 0
    if resume:
        ckpt = read_checkpoint(resume, "--resume")
        lacks = [k for k in ("model", "optimizer", "steps", "epoch", "step_in_epoch", "rng", "args")
                 if not isinstance(ckpt, dict) or k not in ckpt]
        if lacks:
            raise ValueError(f"--resume {resume} is not a checkpoint of train.py (it lacks {', '.join(lacks)})")
        check_resume(resume, ckpt, args, gpt, fs, meta)
        gpt.load_state_dict(ckpt["model"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
        if fs is not None:
            fs.load_state_dict(ckpt["foresight"])
        opt.load_state_dict(ckpt["optimizer"])
        step, epoch, in_epoch = ckpt["steps"], ckpt["epoch"], ckpt["step_in_epoch"]
        if len(ckpt["rng"]) == world:
            torch.set_rng_state(ckpt["rng"][rank]["cpu"])
            if "cuda" in ckpt["rng"][rank] and device.type == "cuda":
                torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)
        else:  # still a correct run, just not the same random stream as an uninterrupted one
            print(f"note: {resume} was written by {len(ckpt['rng'])} rank(s), this run has {world}; RNG states start afresh")
    ckpt_dir = os.path.join(exp_dir, "checkpoints")
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        os.makedirs(os.path.join(exp_dir, "samples"), exist_ok=True)

    raw_student = student
    if args.compile:
        student = torch.compile(student)
    if world > 1:
        student = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = dict(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    sampler = EpochSampler(n_images, data.num_views, steps_per_epoch * per_rank, args.seed, rank, world)
    workers = args.num_workers if args.num_workers is not None else (4 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(data, batch_size=micro, sampler=sampler, num_workers=workers, drop_last=True,
                                         pin_memory=device.type == "cuda",
                                         generator=torch.Generator())  # its own: never draws from the training RNG

    bar = tqdm(total=total_steps, initial=step, disable=rank != 0 or args.no_progress, dynamic_ncols=True, desc="train")
    log = Logger(exp_dir, rank, bar)
    if resume:
        log(f"resumed from {resume} at step {step} (epoch {epoch}, {in_epoch} steps into it)")
        for k in ("max_steps", "epochs"):  # the length of a run may change; said once, and logged
            if ckpt["args"].get(k) != getattr(args, k):
                log(f"--{k.replace('_', '-')} changed from {ckpt['args'].get(k)} to {getattr(args, k)}: "
                    f"the run now ends at step {total_steps}")
    else:
        log(f"command: {' '.join(sys.argv)}")
    log(f"{args.gpt_model}: {gpt.num_params() / 1e6:.2f}M parameters, vocabulary {meta['vocab_size']}, grid {H}x{W}, "
        f"{meta['num_classes']} classes; {n_images} images x {data.num_views} views; {steps_per_epoch} steps/epoch, "
        f"{total_steps} steps; {world} rank(s) x {args.grad_accum} x {micro} = batch {args.global_batch_size} on {device}"
        f"{', ' + precision + ' autocast' if amp['enabled'] else ''}")
    if fs is not None:
        log(f"foresight {args.foresight} at the {args.foresight_level} level: depth {depth}, {fs.k} target(s), layout "
            f"{args.foresight_layout}, lambda {coefs}, warm-up {warmup} steps, schedule {args.foresight_schedule}, "
            f"projectors {sum(p.numel() for p in fs.parameters()) / 1e6:.2f}M")
    coef_t, meter = torch.tensor(coefs, device=device), Meter(len(coefs), device)
    metric = quality.load_metric(args, meta, device, rank, world, log) if args.eval_every else None
    if not resume:  # training's own random stream: not shifted by whichever optional models were built above
        torch.manual_seed(args.seed * world + rank + 1_000_003)
    if ema is not None and step == 0:
        update_ema(ema, gpt, 0.0)  # the EMA starts as a copy of the initial weights

    # the loop: one optimizer step per iteration, --grad-accum micro-batches each
    gpt.train()
    while step < total_steps:
        sampler.set_epoch(epoch, in_epoch * per_rank)
        batches = iter(loader)
        for _ in range(steps_per_epoch - in_epoch):
            scale = FS.coef_schedule(step, total_steps, warmup, args.foresight_schedule) if coefs else 0.0
            for micro_step in range(args.grad_accum):
                batch = [t.to(device, non_blocking=True) for t in next(batches)]
                sync = micro_step == args.grad_accum - 1 or world == 1
                with (contextlib.nullcontext() if sync else student.no_sync()), torch.autocast(**amp):
                    cond = gpt.cls_embedding.drop(batch[1])  # student and teacher see the same (dropped) labels
                    loss, ntp, fs_losses = FS.step_losses(student, fs, depth, teacher, ema, batch[0], cond,
                                                           batch[3] if len(batch) > 3 else None, coef_t, scale)
                scaler.scale(loss / args.grad_accum).backward()
                meter.add(ntp, fs_losses if scale > 0 else None, args.grad_accum)
            scaler.unscale_(opt)
            if fs is not None and scale == 0:
                for p in fs.parameters():  # warm-up: the heads are not stepped (nor weight-decayed) yet
                    p.grad = None
            meter.step(nn.utils.clip_grad_norm_(raw_student.parameters(), MAX_GRAD_NORM), scale > 0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                update_ema(ema, gpt, args.ema_decay)
            step, in_epoch = step + 1, in_epoch + 1
            if in_epoch == steps_per_epoch:  # before any checkpoint, so that a resume starts the next epoch
                epoch, in_epoch = epoch + 1, 0
            bar.update(1)
            last = step == total_steps
            row = meter.flush(world) if step % args.log_every == 0 or step % args.ckpt_every == 0 or last else None
            if row is not None:  # the NaN check comes before any checkpoint is written
                if not all(math.isfinite(v) for v in [row["loss"], row["grad_norm"], *row.get("foresight", [])]):
                    good = os.path.join(ckpt_dir, "last.pt")
                    what = f" (foresight {row['foresight']})" if "foresight" in row else ""
                    raise FloatingPointError(f"the loss became {row['loss']}{what} before step {step}; stopping. "
                                             f"The last good checkpoint is {good if os.path.exists(good) else 'none yet'}")
                row = {"step": step, "epoch": epoch, **row, "lr": opt.param_groups[0]["lr"],
                       "tokens_per_sec": row["steps_per_sec"] * args.global_batch_size * H * W}
                fs_text = ""
                if "foresight" in row:
                    scale_now = FS.coef_schedule(step - 1, total_steps, warmup, args.foresight_schedule)
                    row["foresight_coef"] = [c * scale_now for c in coefs]
                    fs_text = f" | foresight {' '.join(f'{v:.4f}' for v in row['foresight'])} x {row['foresight_coef'][0]:.3g}"
                log.record(row)
                log(f"step {step:7d} | loss {row['loss']:.4f}{fs_text} | grad {row['grad_norm']:.3f} | "
                    f"{row['steps_per_sec']:.2f} steps/s")
            if step % args.ckpt_every == 0 or last:
                state = {"model": gpt.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                         "optimizer": opt.state_dict(), "steps": step, "epoch": epoch, "step_in_epoch": in_epoch,
                         "args": vars(args), "gpt_config": asdict(gpt.config), "foresight": fs.state_dict() if fs else None,
                         "foresight_setup": fs.setup if fs else None, "rng": gather(rng_state(device), world),
                         "vq_ckpt": args.vq_ckpt, "data_meta": meta}
                if rank == 0:
                    save_atomic(state, os.path.join(ckpt_dir, f"{step:07d}.pt"), link=os.path.join(ckpt_dir, "last.pt"))
                    log(f"saved checkpoint {ckpt_dir}/{step:07d}.pt")
            if vq is not None and rank == 0 and ((args.sample_every and step % args.sample_every == 0) or last):
                path = os.path.join(exp_dir, "samples", f"{step:07d}.png")
                classes = meta["num_classes"]  # one class a column where the classes fit in a row
                imgs = sample_images(gpt if ema is None else ema, vq, torch.arange(args.num_sample_images) % classes, cfg_scale=args.cfg_scale,
                                     generator=torch.Generator(device=device).manual_seed(args.seed))
                save_grid(imgs, path, nrow=classes if classes <= 16 else math.ceil(math.sqrt(args.num_sample_images)))
                log(f"saved samples {path}")
            if metric and (step % args.eval_every == 0 or last):
                quality.evaluate(args, step, gpt, ema, vq, metric, held_out, meta, rank, world, device, log)
            if last:
                break
    bar.close()
    log(f"done: {step} steps in {exp_dir}")
    return exp_dir

# ----------------------------------------------------------------------------------------------------
# The main job in one command: tokenizer -> codes -> GPT, each stage reusing what --out already holds

# A small run's settings in place of LlamaGen's ImageNet defaults; flags on the command line win.
# GPT-S for 1000 steps: where Mirai-I's head start showed on three seeds out of three (GPT-T at 3000 steps,
# about as long a run, showed none; experiments.md holds both).
SMALL_RUN = dict(gpt_model="GPT-S", global_batch_size=64, lr=5e-4, max_steps=1000, ema=True, ema_decay=0.99,
                 log_every=100, ckpt_every=500, sample_every=500, foresight_encoder="vq", eval_every=500, eval_samples=1000)
# Mirai-E's teacher is the EMA, which must learn something first: a short run's warm-up and a smaller
# lambda (2 per target overwhelms a small model's next-token loss early on). Mirai-I needs neither.
SMALL_RUN_EXPLICIT = dict(foresight_warmup="10%", foresight_coef=[1.0])


def pipeline(args, argv):
    parser, marker = build_parser(), object()  # which flags argv sets itself: parsed again, every default a marker
    parser.set_defaults(**{dest: marker for dest in vars(args)})
    given = {dest for dest, value in vars(parser.parse_args(argv)).items() if value is not marker}
    for key, value in {**SMALL_RUN, **(SMALL_RUN_EXPLICIT if args.foresight == "explicit" else {})}.items():
        if key not in given:
            setattr(args, key, value)
    out = args.out or os.path.join("runs", args.dataset)
    where = dict(dataset=args.dataset, image_size=args.image_size, data_path=args.data_path)

    if not args.vq_ckpt:  # 1. the tokenizer, trained to its final step once
        vq_dir = os.path.join(out, "vq")
        steps = args.vq_steps or (5000 if torch.cuda.is_available() else 700)
        args.vq_ckpt = os.path.join(vq_dir, "checkpoints", f"{steps:07d}.pt")
        if not os.path.exists(args.vq_ckpt):
            started = glob.glob(os.path.join(vq_dir, "checkpoints", "*.pt"))
            print(f"== stage 1/3: tokenizer -> {vq_dir}" + (" (resuming)" if started else ""))
            tokenizer.train(tokenizer.TrainSettings(
                **where, vq_model="VQ-S", results_dir=vq_dir, steps=steps, global_batch_size=32, lr=1e-3, disc_start=-1,
                log_every=50, sample_every=100, ckpt_every=100, resume="auto" if started else None))

    code_path = os.path.join(out, "codes")  # 2. the codes, made once per tokenizer
    if os.path.exists(os.path.join(code_path, "meta.json")):
        with open(os.path.join(code_path, "meta.json")) as f:
            made_with = json.load(f)["tokenizer"]
        if made_with != os.path.abspath(args.vq_ckpt):
            raise ValueError(f"{code_path} holds codes of another tokenizer ({made_with}); remove it or choose another --out")
    else:  # a codes.npy without meta.json is an extraction that was cut short: made again
        print(f"== stage 2/3: codes -> {code_path}")
        tokenizer.extract(tokenizer.ExtractSettings(**where, vq_ckpt=args.vq_ckpt, views="flip", code_path=code_path,
                                                    batch_size=256, overwrite=True))
    if args.dataset in ("fashion-mnist", "mnist", "cifar10") and "eval_codes" not in given:
        args.eval_codes = os.path.join(out, "codes-test")  # the test split's codes: a held-out loss
        if not os.path.exists(os.path.join(args.eval_codes, "meta.json")):
            print(f"== stage 2/3: held-out codes -> {args.eval_codes}")
            tokenizer.extract(tokenizer.ExtractSettings(**where, split="test", vq_ckpt=args.vq_ckpt, views="none",
                                                        code_path=args.eval_codes, batch_size=256, overwrite=True))

    args.code_path, args.results_dir = code_path, out  # 3. the GPT, resumed if a run is there
    args.exp_name = args.exp_name or f"gpt-{args.foresight}"
    last = os.path.join(out, args.exp_name, "checkpoints", "last.pt")
    if args.resume is None and os.path.exists(last):
        args.resume = last
    print(f"== stage 3/3: GPT -> {os.path.join(out, args.exp_name)}" + (" (resuming)" if args.resume else ""))
    return train(args)


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if (args.code_path is None) == (args.dataset is None):
        parser.error("give either --code-path (a code dataset) or --dataset (the whole pipeline), not both")
    return run_command(pipeline, args, argv) if args.dataset else run_command(train, args)


if __name__ == "__main__":
    main()
