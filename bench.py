"""
Speed and memory figures, printed as one table. Not a test: numbers depend on the machine.

    python bench.py                  # CPU, the reference config: dim 256, 6 layers, 8x8 grid, batch 32
    python bench.py --device cuda    # on a GPU, with MFU where the device's peak is known
    python bench.py --official REF --compile   # beside LlamaGen's and Mirai-Code's steps, both compiled
    python bench.py --device cuda --gpu-check          # GPT-B at ImageNet-256 shapes: the H200 check
    python bench.py --device cpu --gpu-check --small --no-compile   # its code paths at toy sizes
"""
import argparse
import copy
import os
import resource
import sys
import time
import types

import numpy as np
import torch

import fid
import foresight as FS
import model as M
import vq as V

# ----------------------------------------------------------------------------------------------------
# Timing helpers


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, warmup, iters):
    """Median seconds per call of fn() after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def bf16(device, on_cpu=False):
    """bf16 autocast on a GPU (as both codes' training scripts), on a CPU only where asked (--bf16: training steps)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or on_cpu)


def build_gpt(args, device):
    torch.manual_seed(0)
    cfg = M.GPTConfig(dim=args.dim, n_layer=args.n_layer, n_head=args.n_head, vocab_size=args.vocab,
                      grid_size=args.grid, num_classes=args.num_classes)
    return M.GPT(cfg).to(device)


# ----------------------------------------------------------------------------------------------------
# Figures


def bench_train_steps(args, device, extra=None, dropout_floor=False):
    """Seconds per training step of the baseline, Mirai-E and Mirai-I, interleaved so that a machine
    that gets busier or quieter during the run moves all three alike."""
    gpt = build_gpt(args, device).train()
    ema = copy.deepcopy(gpt).requires_grad_(False).eval()
    depth, k, P = args.foresight_depth, args.foresight_k, args.proj_dim
    heads = {
        "none": None,
        "explicit": FS.Foresight("explicit", args.dim, args.grid, k=k, proj_dim=P).to(device),
        "implicit": FS.Foresight("implicit", args.dim, args.grid, k=1, proj_dim=P, target_dim=args.teacher_dim).to(device),
    }
    n = args.grid**2
    x = torch.randint(0, args.vocab, (args.batch, n), device=device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    feats = torch.randn(args.batch, n, args.teacher_dim, device=device)  # the encoder's output, timed apart

    forward = torch.compile(gpt) if getattr(args, "compile", False) else gpt

    def make_step(mode):
        fs = heads[mode]
        opt = M.make_adamw([gpt] + ([fs] if fs is not None else []), lr=1e-4)

        def step():
            with bf16(device, args.bf16):
                if mode == "explicit":
                    targets = FS.ema_targets(ema, x[:, :-1], y, depth)
                _, loss, hidden = forward(x[:, :-1], y, targets=x, hidden_layer=depth if fs is not None else None)
                if fs is not None:
                    loss = loss + 2.0 * fs(hidden, targets if mode == "explicit" else feats).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gpt.parameters(), M.MAX_GRAD_NORM)
            opt.step()
            if mode == "explicit":
                with torch.no_grad():
                    torch._foreach_lerp_(list(ema.parameters()), list(gpt.parameters()), 1e-4)

        return step

    steps = {**{m: make_step(m) for m in heads}, **(extra or {})}
    if dropout_floor:  # the baseline step in eval mode: no dropout masks drawn or applied
        steps["no dropout"] = lambda: (gpt.eval(), steps["none"](), gpt.train())
    memory = {}
    for m in steps:  # warm-up (and compilation), with each variant's own peak memory on a GPU
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timeit(steps[m], device, args.warmup, 1)
        memory[m] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    times = {m: [] for m in steps}
    for _ in range(args.iters):
        for m in steps:
            times[m].append(timeit(steps[m], device, 0, 1))
    bench_train_steps.memory = memory
    return {m: sorted(t)[len(t) // 2] for m, t in times.items()}, gpt


def peak_memory(args, device):
    """Peak memory of one baseline training step: allocated bytes on CUDA, the process's peak RSS on a CPU."""
    gpt = build_gpt(args, device).train()
    opt = M.make_adamw([gpt], lr=1e-4)
    x = torch.randint(0, args.vocab, (args.batch, args.grid**2), device=device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with bf16(device, args.bf16):
        _, loss, _ = gpt(x[:, :-1], y, targets=x)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "MiB", "allocated by torch"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MiB", "peak RSS of this process (all rows so far)"


def bench_inception(device, n, size):
    """Images/s of the FID Inception on batches of n random size x size images (resized to 299), after a warm-up."""
    model = fid.FIDInceptionV3().eval().to(device, memory_format=torch.channels_last).fold_batchnorm()
    imgs = np.random.default_rng(0).integers(0, 256, (2 * n, size, size, 3), dtype=np.uint8)
    fid.extract(model, imgs[:n], batch_size=n, device=device, progress=False)
    sync(device)
    t = time.perf_counter()
    fid.extract(model, imgs[n:], batch_size=n, device=device, progress=False)
    sync(device)
    return n / (time.perf_counter() - t)


def bench_vq_teacher(args, device):
    """The offline Mirai-I teacher's own forward (the VQ-S encoder at 32 px), per training batch."""
    vq = V.VQModel(V.get_config("VQ-S")).to(device)
    teacher = FS.vq_teacher(vq, args.grid).to(device)
    imgs = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, device=device)
    return timeit(lambda: teacher(imgs), device, 1, max(3, args.iters // 2))


PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "A10": 125, "4090": 165, "V100": 125}


def device_peak(device):
    """-> (the device's name, its dense bf16 TFLOPS for MFU; None on a CPU or a GPU not in PEAK_BF16_TFLOPS)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return name, next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def train_flops(args, gpt):
    """Model FLOPs of one training step: 6 x non-embedding parameters x tokens, plus attention."""
    emb = gpt.tok_embeddings.weight.numel() + gpt.cls_embedding.embedding_table.weight.numel()
    tokens = args.batch * args.grid**2
    attn = 6 * 2 * args.n_layer * args.dim * args.grid**2 * tokens // 2  # causal: half of the score matrix
    return 6 * (gpt.num_params() - emb) * tokens + attn


def bench_generate(args, device, gpt, official=None):
    """Tokens/s of generate() with the KV cache, of a full forward per token (as without a cache), and of
    the official generate() where given; interleaved like the training steps."""
    gpt.eval()
    cond = torch.arange(args.gen_batch, device=device) % args.num_classes
    g = torch.Generator(device=device).manual_seed(0)

    def no_cache():
        both = torch.cat([cond, torch.full_like(cond, args.num_classes)])
        seq = torch.zeros(2 * args.gen_batch, 0, dtype=torch.long, device=device)
        with torch.no_grad():
            for _ in range(args.grid**2):
                c, u = gpt(seq, both)[0][:, -1].chunk(2)
                tok = M.sample_logits(u + (c - u) * args.cfg_scale, generator=g)
                seq = torch.cat([seq, torch.cat([tok, tok])[:, None]], dim=1)

    calls = {"cached": lambda: gpt.generate(cond, cfg_scale=args.cfg_scale, generator=g), "uncached": no_cache}
    if getattr(args, "compile", False):
        calls["compiled"] = lambda: gpt.generate(cond, cfg_scale=args.cfg_scale, generator=g, compile=True)
    if official is not None:
        calls["official"] = lambda: official(args.gen_batch)
    times = {k: [] for k in calls}
    for k, f in calls.items():
        timeit(f, device, 1, 1)
    for _ in range(args.gen_iters):
        for k, f in calls.items():
            times[k].append(timeit(f, device, 0, 1))
    return {k: args.gen_batch * args.grid**2 / sorted(t)[len(t) // 2] for k, t in times.items()}


# ----------------------------------------------------------------------------------------------------
# The GPU check (issue: H200 figures): GPT-B at LlamaGen's ImageNet-256 shapes, in one run of a few minutes

GPU_CHECK = dict(dim=768, n_layer=12, n_head=12, grid=16, vocab=16384, num_classes=1000, batch=64,
                 foresight_depth=8, foresight_k=3, proj_dim=2048, teacher_dim=768, image_size=256)
GPU_CHECK_SMALL = dict(dim=64, n_layer=3, n_head=4, grid=4, vocab=64, num_classes=10, batch=4,
                       foresight_depth=2, foresight_k=3, proj_dim=32, teacher_dim=48, image_size=32)


class ViTB14(torch.nn.Module):
    """DINOv2 ViT-B/14's shapes with random weights (patch 14, 12 pre-norm blocks of width 768): what the
    Mirai-I teacher costs per batch, timed without a download."""

    def __init__(self, dim=768, depth=12, heads=12):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, dim, 14, 14)
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    def forward(self, x):
        return self.blocks(self.patch(x).flatten(2).transpose(1, 2))


def guarded(what, fn, *args):
    """fn(*args); if it raises, one row naming the error instead, so that a section that breaks on a new device
    costs the GPU check only its own rows."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001  (the check goes on; the row says what broke)
        print_row((what, float("nan"), "", f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"))


def gpu_train_rows(args, device, extra, peak):
    """The three variants' steps (and the official ones beside them): tokens/s, MFU, peak memory. -> our GPT."""
    t, gpt = bench_train_steps(args, device, extra)
    mem, tokens, tag = bench_train_steps.memory, args.batch * args.grid**2, " (compiled)" if args.compile else ""
    for mode, label in (("none", "baseline"), ("explicit", "Mirai-E"), ("implicit", "Mirai-I")):
        note = f"{tokens / t[mode]:,.0f} tokens/s"
        if mode == "none" and peak:
            note += f", MFU {train_flops(args, gpt) / t[mode] / (peak * 1e12):.1%} of {peak} TFLOPS"
        if mode != "none":
            note += f", {t[mode] / t['none']:.2f}x baseline"
        if mem[mode] is not None:
            note += f", peak {mem[mode]:.1f} GiB"
        print_row((f"train step {label}{tag}", t[mode], "s", note))
    for name in extra:
        ours = t["none" if name == "official baseline" else "explicit"]
        print_row((f"  {name} (eager)", t[name], "s", f"ours (eager) {ours / t[name]:.2f}x its time"))
    return gpt


def gpu_sample_rows(args, device, gpt, official_sample, theirs):
    """Images/s of generate() at two batch sizes with CFG (compiled: CUDA graphs), beside LlamaGen's generate()
    (timed once, in the eager pass, into `theirs`)."""
    for batch in ((4, 8) if args.small else (64, 256)):
        cond = torch.arange(batch, device=device) % args.num_classes
        g = torch.Generator(device=device).manual_seed(0)
        with bf16(device):
            sec = timeit(lambda: gpt.generate(cond, cfg_scale=2.0, generator=g, compile=args.compile), device, 1,
                         1 if args.small else 3)
        if official_sample is not None and batch not in theirs:
            theirs[batch] = timeit(lambda: official_sample(batch), device, 1, 1 if args.small else 3)
        note = f"CFG 2.0, KV cache, {args.grid**2} tokens"
        if batch in theirs:
            note += f"; LlamaGen's generate() {batch / theirs[batch]:.1f} images/s: ours {theirs[batch] / sec:.2f}x its speed"
        print_row((f"sampling, batch {batch}{' (compiled)' if args.compile else ''}", batch / sec, "images/s", note))


def gpu_other_rows(args, device):
    """The Mirai-I teacher's cost (DINOv2-B/14's shapes, random weights) and FID Inception at full size."""
    vit = ViTB14(*((48, 2, 4) if args.small else ())).to(device).eval()
    imgs = torch.randn(args.batch, 3, 14 * args.grid, 14 * args.grid, device=device)
    with torch.no_grad(), bf16(device):
        enc = timeit(lambda: vit(imgs), device, args.warmup, args.iters)
    print_row(("Mirai-I teacher: DINOv2-B/14 shapes", enc, "s", f"random weights, batch {args.batch} at {14 * args.grid} px"))
    n = 8 if args.small else 256
    print_row(("FID Inception", bench_inception(device, n, args.image_size), "images/s",
               f"batch {n}, {args.image_size} px resized to 299"))


def gpu_check(args, device):
    """The GPU check's rows, each printed as it comes: the eager sections first, then the compiled ones (their
    compilation takes minutes), so that a run cut short keeps what it measured."""
    for k, v in (GPU_CHECK_SMALL if args.small else GPU_CHECK).items():
        setattr(args, k, v)
    args.warmup, args.iters = (1, 2) if args.small else (3, 10)
    peak = device_peak(device)[1]
    print_header(args, device)
    args.compile = False  # their steps stay eager; ours are timed both ways
    official = guarded("official code", official_steps, args, device) if args.official else None
    (extra, official_sample), theirs = official or ({}, None), {}
    gpt = guarded("train steps", gpu_train_rows, args, device, extra, peak) or build_gpt(args, device)
    guarded("sampling", gpu_sample_rows, args, device, gpt.eval(), official_sample, theirs)
    guarded("teacher and FID", gpu_other_rows, args, device)
    if not args.no_compile:
        args.compile = True
        guarded("train steps (compiled)", gpu_train_rows, args, device, {}, peak)
        guarded("sampling (compiled)", gpu_sample_rows, args, device, gpt.eval(), None, theirs)


# ----------------------------------------------------------------------------------------------------
# The official code, side by side (--official DIR holding checkouts of LlamaGen and Mirai-Code): their
# model, loss and optimizer code run from there, imported as they are, never copied here


def import_from(root, names):
    """Import modules of a checkout whose package names (autoregressive, utils, dataset) clash with the
    other's; what the training scripts import but a model step never uses (timm, wandb, ...) is stubbed
    while they import, and gone from sys.modules afterwards."""
    clash = ("autoregressive", "utils", "dataset")
    stubs = [n for n in ("timm", "timm.data", "torchvision", "torchvision.transforms", "wandb", "dataset.build")
             if n not in sys.modules]
    for name in stubs:
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__getattr__ = lambda attr: None
    sys.path.insert(0, root)
    try:
        return [__import__(n, fromlist=["_"]) for n in names]
    finally:
        sys.path.remove(root)
        for name in [m for m in sys.modules if m.split(".")[0] in clash] + stubs:
            sys.modules.pop(name, None)


def official_steps(args, device):
    """-> ({name: training step}, sampling call): LlamaGen's baseline step and generate(), Mirai-Code's
    Mirai-E step, at the bench's shapes, for bench_train_steps and bench_generate to time beside ours."""
    for repo, path in (("LlamaGen", "autoregressive/models/gpt.py"), ("Mirai-Code", "autoregressive/models/Mirai.py")):
        if not os.path.isfile(os.path.join(args.official, repo, path)):
            raise SystemExit(f"error: --official {args.official} holds no {repo} checkout ({repo}/{path} is missing); "
                             f"clone it there")
    lg_gpt, lg_gen, lg_train, lg_ema = import_from(os.path.join(args.official, "LlamaGen"), [
        "autoregressive.models.gpt", "autoregressive.models.generate", "autoregressive.train.train_c2i", "utils.ema"])
    mi_model, mi_train = import_from(os.path.join(args.official, "Mirai-Code"), [
        "autoregressive.models.Mirai", "autoregressive.train.train_c2i_Mirai_E"])
    quiet = type("Log", (), {"info": lambda self, msg: None})()
    shape = dict(dim=args.dim, n_layer=args.n_layer, n_head=args.n_head, vocab_size=args.vocab,
                 block_size=args.grid**2, num_classes=args.num_classes, cls_token_num=1)
    n = args.grid**2
    x = torch.randint(0, args.vocab, (args.batch, n), device=device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)

    torch.manual_seed(0)
    base = lg_gpt.Transformer(lg_gpt.ModelArgs(**shape)).to(device).train()
    base_opt = lg_train.creat_optimizer(base, 0.05, 1e-4, (0.9, 0.95), quiet)
    compiled = getattr(args, "compile", False)  # as their train scripts do by default: torch.compile(model)
    base_fwd = torch.compile(base) if compiled else base

    def base_step():  # the loop body of LlamaGen's train_c2i.py
        with bf16(device, args.bf16):  # as their scripts (on a CPU with --bf16)
            _, loss = base_fwd(cond_idx=y, idx=x[:, :-1], targets=x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(base.parameters(), 1.0)
        base_opt.step()
        base_opt.zero_grad(set_to_none=True)

    heads = args.foresight_k
    mirai = mi_model.Transformer(mi_model.ModelArgs(**shape, encoder_depth=args.foresight_depth, z_dims=[args.dim],
                                                    projector_dim=args.proj_dim, num_heads=heads)).to(device).train()
    ema, teacher = copy.deepcopy(mirai).eval(), copy.deepcopy(mirai).eval()
    for m in (ema, teacher):
        m.requires_grad_(False)
    mirai_opt = mi_train.creat_optimizer(mirai, 0.05, 1e-4, (0.9, 0.95), quiet)
    mirai_fwd = torch.compile(mirai) if compiled else mirai

    def mirai_step():  # the loop body of Mirai-Code's train_c2i_Mirai_E.py after its warm-up (--use-prev-iter-ema)
        with bf16(device, args.bf16):
            _, zs, loss = mirai_fwd(cond_idx=y, idx=x[:, :-1], targets=x)
            with torch.no_grad():
                target = teacher.forward_ema(cond_idx=y, idx=x[:, :-1], targets=None)
        losses = mi_train.calculate_foresight_loss([target], zs)  # its offsets assume 16x16 tokens: the same work
        loss = loss + sum(2.0 * l for l in losses[:heads])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mirai.parameters(), 1.0)
        mirai_opt.step()
        mirai_opt.zero_grad(set_to_none=True)
        lg_ema.update_ema(ema, mirai)
        teacher.load_state_dict(ema.state_dict())

    base_gen = copy.deepcopy(base).eval()

    def sample(batch):  # LlamaGen's generate() at our sampling settings: CFG, temperature 1, no top-k / top-p
        cond = torch.arange(batch, device=device) % args.num_classes
        with torch.no_grad(), bf16(device):
            lg_gen.generate(base_gen, cond, n, cfg_scale=args.cfg_scale, temperature=1.0, top_k=0, top_p=1.0)

    return {"official baseline": base_step, "official Mirai-E": mirai_step}, sample


# ----------------------------------------------------------------------------------------------------
# Main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--grid", type=int, default=8, help="tokens per side")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=32, help="training batch")
    p.add_argument("--foresight-depth", type=int, default=4)
    p.add_argument("--foresight-k", type=int, default=3)
    p.add_argument("--proj-dim", type=int, default=512, help="projector hidden size")
    p.add_argument("--teacher-dim", type=int, default=768, help="Mirai-I feature size (768: DINOv2 ViT-B)")
    p.add_argument("--gen-batch", type=int, default=8, help="images per generate() call")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--fid-batch", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--gen-iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--official", default=None,
                   help="a folder holding checkouts of LlamaGen and Mirai-Code: their steps and sampling, side by side")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the trained models: ours, and with --official theirs (their scripts' "
                        "default); --gpu-check times ours both ways by itself")
    p.add_argument("--bf16", action="store_true", help="on a CPU, the training steps (ours and the official ones) "
                   "under bf16 autocast, as on a GPU (fast where the CPU has AMX)")
    p.add_argument("--skip", default="", help="comma-separated rows to leave out: train,sample,inception,memory")
    p.add_argument("--gpu-check", action="store_true",
                   help="GPT-B, batch 64, 16x16 tokens, bf16, with and without torch.compile; DINOv2-B; sampling at "
                        "batch 64 and 256; FID Inception at 256 px (a few minutes on an H200)")
    p.add_argument("--small", action="store_true", help="with --gpu-check: toy shapes, to try its code paths on a CPU")
    p.add_argument("--no-compile", action="store_true", help="with --gpu-check: leave out the torch.compile rows")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    skip = set(args.skip.split(","))

    if args.gpu_check:  # its rows are printed as they come (a GPU's time is short; a run cut short keeps them)
        return gpu_check(args, device)
    rows, gpt = [], None  # rows: (figure, value, unit, note)
    extra, official_sample = official_steps(args, device) if args.official else ({}, None)
    if "train" not in skip:
        t, gpt = bench_train_steps(args, device, extra, dropout_floor=True)
        note = f"batch {args.batch} x {args.grid**2} tokens"
        name, peak = device_peak(device)
        if peak:
            note += f", MFU {train_flops(args, gpt) / t['none'] / (peak * 1e12):.1%} of {name}'s {peak} TFLOPS"
        rows.append(("train step: baseline", t["none"], "s", note))
        if "no dropout" in t:
            rows.append(("train step: baseline, dropout off", t["no dropout"], "s", "the floor of any faster dropout" + (
                f": {t['no dropout'] / t['official baseline']:.2f}x LlamaGen's step with dropout" if extra else "")))
        rows.append(("train step: Mirai-E", t["explicit"], "s",
                     f"{t['explicit'] / t['none']:.2f}x baseline (depth {args.foresight_depth}, K={args.foresight_k}, P={args.proj_dim})"))
        rows.append(("train step: Mirai-I", t["implicit"], "s",
                     f"{t['implicit'] / t['none']:.2f}x baseline, encoder excluded (features {args.teacher_dim})"))
        if extra:
            rows.append(("  official: LlamaGen baseline", t["official baseline"], "s",
                         f"ours {t['none'] / t['official baseline']:.2f}x its time"))
            rows.append(("  official: Mirai-Code Mirai-E", t["official Mirai-E"], "s",
                         f"ours {t['explicit'] / t['official Mirai-E']:.2f}x its time (with --use-prev-iter-ema, the teacher its script needs)"))
        enc = bench_vq_teacher(args, device)
        rows.append(("Mirai-I teacher: VQ-S encoder", enc, "s", f"per batch of {args.batch} (32 px); DINOv2 is timed by no one here"))
    if "sample" not in skip:
        r = bench_generate(args, device, gpt or build_gpt(args, device), official_sample)
        rows.append(("sampling, KV cache", r["cached"], "tokens/s", f"{args.gen_batch} images, CFG {args.cfg_scale}"))
        rows.append(("sampling, no cache", r["uncached"], "tokens/s", f"KV cache is {r['cached'] / r['uncached']:.1f}x faster"))
        if "compiled" in r:
            rows.append(("sampling, KV cache, compiled", r["compiled"], "tokens/s",
                         f"{r['compiled'] / r['cached']:.2f}x eager (torch.compile of the decode step)"))
        if "official" in r:
            rows.append(("  official: LlamaGen generate()", r["official"], "tokens/s",
                         f"ours {r['cached'] / r['official']:.2f}x its speed"))
    if "inception" not in skip:
        rows.append(("FID Inception", bench_inception(device, args.fid_batch, 32), "images/s",
                     f"32 px inputs resized to 299, batch {args.fid_batch}"))
    if "memory" not in skip:
        value, unit, note = peak_memory(args, device)
        rows.append(("peak memory, baseline train step", value, unit, note))

    print_header(args, device)
    for row in rows:
        print_row(row)


def print_header(args, device):
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"GPT dim {args.dim}, {args.n_layer} layers, {args.n_head} heads, vocab {args.vocab}, {args.grid}x{args.grid} grid; "
          f"training steps in {'bf16 autocast' if device.type == 'cuda' or args.bf16 else 'fp32'}")
    print(f"{'figure':<40}  {'value':>10}  {'unit':<9} note")


def print_row(row):
    name, value, unit, note = row
    print(f"{name:<40}  {value:>10.3f}  {unit:<9} {note}", flush=True)


if __name__ == "__main__":
    main()
