"""
Compare training runs from their metrics.jsonl: a table of the evaluation metrics per variant and
step (mean ± std over seeds), and one PNG with FD vs step (a line per variant, the seed spread
shaded) beside each variant's last sample grid.

    python compare.py runs/fashion-mnist/gpt-* --out runs/fashion-mnist/compare.png

Runs are grouped by what they were trained with (foresight mode, unless --group-by names other
flags); the seed is what varies inside a group.
"""
import argparse
import glob
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from util import atomic_write, read_checkpoint

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def read_run(path):
    """-> (args of its last checkpoint or command, {step: evaluation row}) of one run folder."""
    rows = {}
    with open(os.path.join(path, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if any(k.startswith("eval_") for k in row):
                rows.setdefault(row["step"], {}).update(row)
    ckpt = os.path.join(path, "checkpoints", "last.pt")
    args = {}
    if os.path.isfile(ckpt):
        args = read_checkpoint(ckpt, "checkpoint", mmap=True).get("args", {})  # the flags, not the weights
    return args, rows


def group_runs(paths, keys):
    groups = {}
    for path in paths:
        args, rows = read_run(path)
        if rows:
            shown = [k for k in keys if k == "foresight" or (  # unset flags were defaults; a baseline has no heads
                args.get(k) is not None and not (k.startswith("foresight_") and args.get("foresight") == "none"))]
            name = " ".join(f"{args.get(k)}" if k == "foresight" else f"{k}={args[k]}" for k in shown)
            groups.setdefault(name, []).append((path, args, rows))
    return groups


def summarise(groups, metric):
    """{group: {step: (mean, std, n)}} of one metric over the group's seeds."""
    out = {}
    for name, runs in groups.items():
        steps = sorted({s for _, _, rows in runs for s in rows})
        out[name] = {}
        for s in steps:
            v = [rows[s][metric] for _, _, rows in runs if metric in rows.get(s, {})]
            if v:
                out[name][s] = (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
    return out


def paired(groups, base, metrics):
    """Markdown rows of metric(variant, seed) - metric(base, seed), mean ± std over the seeds both have: runs of
    one seed share their initial weights and data order, so the difference holds less of the seed's noise."""
    lines = [f"| variant - {base}, seed by seed | step | " + " | ".join(m.removeprefix("eval_") for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    ref = {args.get("seed"): rows for _, args, rows in groups[base]}
    for name in [g for g in groups if g != base]:
        diffs = {}
        for _, args, rows in groups[name]:
            for step, row in rows.items():
                for m in metrics:
                    if m in row and m in ref.get(args.get("seed"), {}).get(step, {}):
                        diffs.setdefault(step, {}).setdefault(m, []).append(row[m] - ref[args.get("seed")][step][m])
        for step in sorted(diffs):
            cells = [f"{np.mean(v):+.3f} ± {np.std(v, ddof=1):.3f} (n={len(v)})" if len(v) > 1 else f"{v[0]:+.3f} (n=1)"
                     if v else "" for v in (diffs[step].get(m, []) for m in metrics)]
            lines.append(f"| {name} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(groups, metrics):
    lines = ["| variant | step | " + " | ".join(m.removeprefix("eval_") for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    sums = {m: summarise(groups, m) for m in metrics}
    for name in groups:
        for s in sorted({s for m in metrics for s in sums[m][name]}):
            cells = []
            for m in metrics:
                mean, std, n = sums[m][name].get(s, (math.nan, 0, 0))
                cells.append("" if not n else f"{mean:.3f}" if n == 1 else f"{mean:.3f} ± {std:.3f} (n={n})")
            lines.append(f"| {name} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary, title, size=(520, 360), margin=(60, 20, 30, 40)):
    """FD vs step on a white canvas: a line per group through the seed means, the ±std band shaded."""
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, top, right, bottom = margin[0], margin[1], size[0] - margin[2], size[1] - margin[3]
    pts = [(s, m - sd, m + sd) for series in summary.values() for s, (m, sd, _) in series.items()]
    if not pts:
        return img
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[2] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    X = lambda s: left + (s - x0) / (x1 - x0) * (right - left)
    Y = lambda v: bottom - (v - y0) / (y1 - y0) * (bottom - top)
    d.rectangle([left, top, right, bottom], outline="black")
    for k in range(5):
        v, s = y0 + (y1 - y0) * k / 4, x0 + (x1 - x0) * k / 4
        d.text((4, Y(v) - 5), f"{v:.1f}", fill="black", font=font)
        d.text((X(s) - 12, bottom + 4), f"{s:.0f}", fill="black", font=font)
    d.text((left, size[1] - 14), f"{title} vs training step (mean of seeds, band: ±1 std)", fill="black", font=font)
    for i, (name, series) in enumerate(summary.items()):
        colour = COLOURS[i % len(COLOURS)]
        steps = sorted(series)
        band = [(X(s), Y(series[s][0] + series[s][1])) for s in steps] + \
               [(X(s), Y(series[s][0] - series[s][1])) for s in reversed(steps)]
        if len(steps) > 1:
            overlay = Image.new("RGBA", size, (0, 0, 0, 0))
            ImageDraw.Draw(overlay).polygon(band, fill=colour + (50,))
            img.paste(overlay, (0, 0), overlay)
            d = ImageDraw.Draw(img)
            d.line([(X(s), Y(series[s][0])) for s in steps], fill=colour, width=2)
        for s in steps:
            d.ellipse([X(s) - 3, Y(series[s][0]) - 3, X(s) + 3, Y(series[s][0]) + 3], fill=colour)
        d.text((right - 170, top + 6 + 12 * i), f"{name} (n={max(v[2] for v in series.values())})", fill=colour, font=font)
    return img


def last_grids(groups, height):
    """The newest sample grid of each group (from whichever of its runs got furthest), labelled, side by
    side, enlarged by a whole factor towards `height` pixels."""
    tiles = []
    for name, runs in groups.items():
        pngs = [p for path, _, _ in runs for p in glob.glob(os.path.join(path, "samples", "*.png"))]
        if pngs:
            newest = max(pngs, key=lambda p: int(os.path.basename(p)[:-4]))
            g = Image.open(newest).convert("RGB")
            k = max(1, (height - 14) // g.height)
            g = g.resize((g.width * k, g.height * k), Image.NEAREST)
            tile = Image.new("RGB", (g.width, g.height + 14), "white")
            tile.paste(g, (0, 14))
            ImageDraw.Draw(tile).text((2, 1), f"{name}, step {int(os.path.basename(newest)[:-4])}", fill="black")
            tiles.append(tile)
    return tiles


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    p.add_argument("--metric", default="fd_classifier", help="what the figure shows: a column of the tables")
    p.add_argument("--group-by", default="foresight", help="comma-separated training flags that make a variant")
    p.add_argument("--out", default=None, help="the PNG: the figure beside the last sample grids")
    p.add_argument("--paired", metavar="VARIANT", help="also each variant's difference to VARIANT (e.g. none), seed by seed")
    args = p.parse_args(argv)
    missing = [r for r in args.runs if not os.path.isfile(os.path.join(r, "metrics.jsonl"))]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} {'is not a run folder' if len(missing) == 1 else 'are not run folders'} "
                         f"(no metrics.jsonl); give the folders train.py made")
    groups = group_runs(args.runs, args.group_by.split(","))
    if not groups:
        raise SystemExit("error: none of the runs has evaluation rows in its metrics.jsonl (train with --eval-every)")
    names = {k for runs in groups.values() for _, _, rows in runs for r in rows.values() for k, v in r.items()
             if k.startswith("eval_") and isinstance(v, (int, float))}  # not notes beside the metrics
    metric = args.metric if args.metric in names else "eval_" + args.metric  # the tables' names work too
    if metric not in names:
        raise SystemExit(f"error: --metric {args.metric} is none of the runs' evaluations "
                         f"({', '.join(sorted(k.removeprefix('eval_') for k in names))})")
    names = sorted(names, key=lambda k: ("raw_" in k, k.replace("raw_", "") != metric, k.replace("raw_", "")))
    print(table(groups, names))
    if args.paired:
        if args.paired not in groups:
            raise SystemExit(f"error: --paired {args.paired} is none of the variants ({', '.join(groups)})")
        print("\n" + paired(groups, args.paired, names))
    if args.out:
        figure = plot(summarise(groups, metric), metric)
        panels = [figure] + last_grids(groups, figure.height)
        h = max(p.height for p in panels)
        canvas = Image.new("RGB", (sum(p.width for p in panels) + 10 * (len(panels) - 1), h), "white")
        x = 0
        for panel in panels:
            canvas.paste(panel, (x, 0))
            x += panel.width + 10
        atomic_write(args.out, lambda f: canvas.save(f, format="PNG"))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
