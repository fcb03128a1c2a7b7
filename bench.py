"""
Speed and memory figures, printed as one table. Not a test: numbers depend on the machine.

    python bench.py                  # CPU, the reference config: dim 256, 6 layers, 8x8 grid, batch 32
    python bench.py --device cuda    # on a GPU, with MFU where the device's peak is known
"""
import argparse
import time

import torch

import model as M

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


def build_gpt(args, device):
    torch.manual_seed(0)
    cfg = M.GPTConfig(
        dim=args.dim, n_layer=args.n_layer, n_head=args.n_head, vocab_size=args.vocab,
        grid_size=args.grid, num_classes=args.num_classes,
    )
    return M.GPT(cfg).to(device)


# ----------------------------------------------------------------------------------------------------
# Figures


def bench_train_step(args, device):
    gpt = build_gpt(args, device).train()
    opt = M.make_adamw([gpt], lr=1e-4)
    n = args.grid**2
    x = torch.randint(0, args.vocab, (args.batch, n), device=device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, loss, _ = gpt(x[:, :-1], y, targets=x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timeit(step, device, args.warmup, args.iters), gpt


def bench_generate(args, device, gpt):
    gpt.eval()
    cond = torch.arange(args.gen_batch, device=device) % args.num_classes
    g = torch.Generator(device=device).manual_seed(0)
    cached = timeit(lambda: gpt.generate(cond, cfg_scale=args.cfg_scale, generator=g), device, 1, args.gen_iters)

    def no_cache():  # a full forward over the whole prefix for every token, as without a KV cache
        both = torch.cat([cond, torch.full_like(cond, args.num_classes)])
        seq = torch.zeros(2 * args.gen_batch, 0, dtype=torch.long, device=device)
        with torch.no_grad():
            for _ in range(args.grid**2):
                c, u = gpt(seq, both)[0][:, -1].chunk(2)
                tok = M.sample_logits(u + (c - u) * args.cfg_scale, generator=g)
                seq = torch.cat([seq, torch.cat([tok, tok])[:, None]], dim=1)

    uncached = timeit(no_cache, device, 1, args.gen_iters)
    tokens = args.gen_batch * args.grid**2
    return tokens / cached, tokens / uncached


# ----------------------------------------------------------------------------------------------------
# Main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--grid", type=int, default=8, help="tokens per side")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=32, help="training batch")
    p.add_argument("--gen-batch", type=int, default=8, help="images per generate() call")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--gen-iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rows = []  # (figure, value, unit, note)
    step, gpt = bench_train_step(args, device)
    rows.append(("GPT training step (fwd+bwd+AdamW)", step, "s", f"batch {args.batch}, {args.grid**2} tokens"))
    cached, uncached = bench_generate(args, device, gpt)
    rows.append(("sampling, KV cache", cached, "tokens/s", f"{args.gen_batch} images, CFG {args.cfg_scale}"))
    rows.append(("sampling, no cache", uncached, "tokens/s", f"KV cache is {cached / uncached:.1f}x faster"))

    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"GPT dim {args.dim}, {args.n_layer} layers, {args.n_head} heads, vocab {args.vocab}, {args.grid}x{args.grid} grid")
    w = max(len(r[0]) for r in rows)
    print(f"{'figure':<{w}}  {'value':>10}  {'unit':<9} note")
    for name, value, unit, note in rows:
        print(f"{name:<{w}}  {value:>10.3f}  {unit:<9} {note}")


if __name__ == "__main__":
    main()
