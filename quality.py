"""
How good a generator is without the Inception weights, and during training: a small classifier of the dataset
(the Frechet distance of its features to the test split's, and the share of samples it assigns their class), the
held-out next-token loss, and train.py's periodic evaluation (FID where it can, else the classifier's metric).

    python quality.py samples.npz fashion-mnist            # samples (an .npz, labels beside arr_0) vs the test split
    python quality.py fashion-mnist --floors --vq-ckpt vq.pt  # the best numbers to expect: real images, reconstructions
"""
import argparse
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import fid
import util
from vq import load_vq, sample_images, to_uint8

# ----------------------------------------------------------------------------------------------
# The offline metric: a small classifier trained on the dataset's own training split. Where the Inception weights
# cannot be had (and on MNIST-like data, which Inception features fit poorly), the Frechet distance of its features to
# the test split's, and the share of samples it assigns their class, still tell a better generator from a worse.

CLASSIFIER_WIDTHS = (32, 64, 128, 128)  # conv blocks, a 2x2 max pool between each; the last is the feature size
CLASSIFIER_EPOCHS, CLASSIFIER_BATCH, CLASSIFIER_LR = 3, 128, 3e-3
CLASSIFIER_META = ("num_classes", "widths", "dataset", "image_size", "test_accuracy", "num_test")


class SmallClassifier(nn.Module):
    """Images (B, 3, S, S) in [-1, 1] -> (features, logits). Features, the means of the last block's ReLUs, are rarely
    exactly zero; ref_mu and ref_sigma are their statistics on the test split."""

    def __init__(self, num_classes, widths=CLASSIFIER_WIDTHS, dataset=None, image_size=32):
        super().__init__()
        layers, cin = [], 3
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            cin = w
        self.body, self.head = nn.Sequential(*layers[:-1]), nn.Linear(cin, num_classes)
        self.num_classes, self.widths, self.dataset, self.image_size = num_classes, tuple(widths), dataset, image_size
        self.test_accuracy = self.num_test = None
        self.register_buffer("ref_mu", torch.zeros(cin, dtype=torch.float64))
        self.register_buffer("ref_sigma", torch.zeros(cin, cin, dtype=torch.float64))

    def forward(self, x):
        features = self.body(x).mean((2, 3))
        return features, self.head(features)


def _classifier_input(batch, size):  # what fid.as_nchw takes, any size -> floats NCHW in [-1, 1], size x size
    x = fid.as_nchw(batch)
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (2 * x - 1).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def classify(classifier, images, batch_size=250):
    """Features (N, D) float32 and predicted classes (N,) of a batch of images, as numpy."""
    device = next(classifier.parameters()).device
    out = [classifier(_classifier_input(images[i:i + batch_size], classifier.image_size).to(device))
           for i in range(0, len(images), batch_size)]
    return torch.cat([f for f, _ in out]).float().cpu().numpy(), torch.cat([y.argmax(1) for _, y in out]).cpu().numpy()


def _views(source, size, indices=None, progress=True):  # images as the generator trains on them, and their labels
    indices = range(len(source)) if indices is None else indices
    images = [data.make_view(source.image(i), size, "none", 0)
              for i in tqdm(indices, "reading images", disable=not progress, leave=False)]
    return np.stack(images), np.array([source.label(i) for i in indices], dtype=np.int64)


def _base_name(dataset):  # the classifier learns from the training split, whichever split is named
    return re.sub("-(train|test|val)$", "", dataset)


def train_classifier(dataset, data_path=None, device="cpu", image_size=32, seed=0, progress=True):
    """Adam with a one-cycle schedule on the training split; accuracy and reference statistics from the test split.
    The same seed gives the same network (on one device and thread count)."""
    train, test = (data.open_dataset(dataset, data_path, split) for split in ("train", "test"))
    images, labels = (torch.from_numpy(a) for a in _views(train, image_size, progress=progress))
    steps = CLASSIFIER_EPOCHS * math.ceil(len(images) / CLASSIFIER_BATCH)
    with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream alone
        torch.manual_seed(seed)
        net = SmallClassifier(max(train.num_classes, int(labels.max()) + 1), dataset=_base_name(dataset),
                              image_size=image_size).to(device, memory_format=torch.channels_last)
        opt = torch.optim.Adam(net.parameters(), lr=CLASSIFIER_LR)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, CLASSIFIER_LR, total_steps=steps)
        batches = (i for _ in range(CLASSIFIER_EPOCHS) for i in torch.randperm(len(images)).split(CLASSIFIER_BATCH))
        for idx in tqdm(batches, f"training the {net.dataset} classifier", total=steps, disable=not progress):
            logits = net(_classifier_input(images[idx], image_size).to(device))[1]
            F.cross_entropy(logits, labels[idx].to(device)).backward()
            opt.step()
            opt.zero_grad()
            schedule.step()
    test_images, test_labels = _views(test, image_size, progress=progress)
    features, predicted = classify(net.eval(), test_images)
    net.test_accuracy, net.num_test = float((predicted == test_labels).mean()), len(test_images)
    net.ref_mu, net.ref_sigma = (torch.from_numpy(a).to(device) for a in fid.stats(features))
    return net


def load_classifier(dataset, data_path=None, device="cpu", image_size=32, seed=0, train_if_missing=True,
                    progress=True):
    """The dataset's SmallClassifier in eval mode on `device`, from the cache or trained (minutes on a CPU) and cached;
    it carries .dataset, .image_size, .test_accuracy, .num_test and the reference .ref_mu, .ref_sigma."""
    path = fid.cache_dir(f"{_base_name(dataset)}-{image_size}px-classifier{f'-seed{seed}' if seed else ''}.pt", data_path)
    if not os.path.isfile(path):
        if not train_if_missing:
            raise FileNotFoundError(f"no classifier for {dataset} at {path}; train it with "
                                    f"`python quality.py {_base_name(dataset)} --floors`.")
        start = time.time()
        net = train_classifier(dataset, data_path, device, image_size, seed, progress)
        ckpt = {"state_dict": net.state_dict(), **{k: getattr(net, k) for k in CLASSIFIER_META}}
        util.atomic_write(path, lambda f: torch.save(ckpt, f))
        print(f"classifier of {net.dataset} at {image_size}px: test accuracy {net.test_accuracy:.4f}, trained in "
              f"{time.time() - start:.0f} s, saved to {path}", file=sys.stderr)
    try:
        ckpt = util.read_checkpoint(path, "the cached classifier")
        net = SmallClassifier(ckpt["num_classes"], ckpt["widths"])
        net.load_state_dict(ckpt["state_dict"])
    except Exception as e:  # a stale or broken cache file, which retraining replaces
        raise ValueError(f"{path} is not a readable classifier ({type(e).__name__}); delete it to retrain.") from None
    net.__dict__.update({k: ckpt[k] for k in CLASSIFIER_META})
    return net.eval().to(device, memory_format=torch.channels_last)


def classifier_metrics(images_uint8_nhwc, labels, dataset, data_path=None, classifier=None, device="cpu",
                       image_size=32):
    """{"fd_classifier": Frechet distance of the classifier's features to the test split's, "class_agreement": share
    of the images classified as their `labels`, None without labels}."""
    classifier, n = classifier or load_classifier(dataset, data_path, device, image_size), len(images_uint8_nhwc)
    if classifier.dataset != _base_name(dataset):
        raise ValueError(f"the classifier was trained on {classifier.dataset}, not on {_base_name(dataset)}.")
    if n < 2 or (labels is not None and len(labels) != n):
        raise ValueError(f"the classifier metric needs 2 images or more and one label per image, got {n} images and "
                         f"{'no' if labels is None else len(labels)} labels.")
    features, predicted = classify(classifier, images_uint8_nhwc)
    return {"fd_classifier": fid.frechet_distance(*fid.stats(features), classifier.ref_mu.cpu(), classifier.ref_sigma.cpu()),
            "class_agreement": None if labels is None else float((predicted == np.asarray(labels)).mean())}


# ----------------------------------------------------------------------------------------------
# Evaluation during training: sample quality (FID, or offline the classifier metric) and held-out loss


def load_metric(args, meta, device, rank, world, log):
    """-> ("inception", network), ("classifier", network), or None with one notice (the run trains on).
    Chosen once, on rank 0, before the first step; the other ranks learn only whether there is one."""
    choice, reasons = None, []
    if rank == 0:
        if args.eval_metric in ("auto", "inception") and args.eval_reference:
            try:
                choice = ("inception", fid.load_inception(device=device))
            except (FileNotFoundError, ValueError) as e:
                reasons.append(f"no FID ({util.one_line(e)})")
        elif args.eval_metric == "auto":
            reasons.append("no FID (no --eval-reference)")
        if choice is None and args.eval_metric in ("auto", "classifier"):
            if meta["dataset"].split("-")[0] in ("mnist", "fashion", "cifar10"):
                choice = ("classifier", load_classifier(meta["dataset"], args.data_path or meta.get("data_path"),
                                                        device, meta["image_size"], progress=not args.no_progress))
                log(f"evaluation: {''.join(r + '; ' for r in reasons)}the {meta['dataset']} classifier's FD and class "
                    f"agreement (its test accuracy {choice[1].test_accuracy:.4f})")
            else:
                reasons.append(f"no classifier metric for {meta['dataset']} (MNIST, Fashion-MNIST and CIFAR-10 only)")
        if choice is None:
            log(f"evaluation skipped: {'; '.join(reasons)}")
    there = util.broadcast(choice is not None, world)
    return choice if rank == 0 else there


@torch.no_grad()
def held_out_loss(model, codes, device, images, batch=1000):
    """Mean next-token loss over every view of the first `images` images of a held-out code dataset, without
    dropout or label drop (all 10,000 of Fashion-MNIST's test split would cost a run 6% of its time)."""
    was_training, total = model.training, 0.0
    model.eval()
    x_all = torch.from_numpy(np.asarray(codes.codes[:images], dtype=np.int64).reshape(-1, codes.codes.shape[-1]))
    y_all = torch.from_numpy(np.repeat(np.asarray(codes.labels[:images], dtype=np.int64), codes.num_views))
    for x, y in zip(x_all.split(batch), y_all.split(batch)):
        x, y = x.to(device), y.to(device)
        total += model(x[:, :-1], y, targets=x, drop_labels=False)[1].item() * len(x)
    model.train(was_training)
    return total / len(x_all)


def evaluate(args, step, gpt, ema, vq, metric, held_out, meta, rank, world, device, log):
    """Samples of --eval-weights made by all ranks and scored on rank 0, and the held-out loss. Its own
    random generator: evaluating never changes the training run."""
    which = ["raw"] if ema is None else {"ema": ["ema"], "raw": ["raw"], "both": ["ema", "raw"]}[args.eval_weights]
    row = {"step": step}
    for name in which:
        model, prefix = (ema if name == "ema" else gpt), ("eval_" if name == which[0] else f"eval_{name}_")
        mine = torch.arange(rank, args.eval_samples, world) % meta["num_classes"]
        g, was_training = torch.Generator(device=device).manual_seed(args.seed * world + rank), model.training
        imgs = [sample_images(model, vq, chunk, cfg_scale=args.cfg_scale, generator=g)
                for chunk in mine.split(args.eval_batch_size)]
        model.train(was_training)
        imgs = [i for part in util.gather(imgs, world) for i in part]
        if held_out is not None:
            row[prefix + "heldout_loss"] = held_out_loss(model, held_out, device, args.eval_samples)
        if rank != 0:
            continue
        imgs = np.concatenate(imgs)
        if metric[0] == "inception":
            result = fid.evaluate(imgs, args.eval_reference, model=metric[1], data_path=args.data_path)
        else:
            labels = torch.cat([torch.arange(r, args.eval_samples, world) for r in range(world)]) % meta["num_classes"]
            result = classifier_metrics(imgs, labels.numpy(), meta["dataset"], classifier=metric[1], device=device)
        row.update({prefix + k: v for k, v in result.items() if v is not None})
    gpt.train()
    log("eval " + " | ".join(f"{k[5:]} {v:.4f}" if isinstance(v, float) else f"{k[5:]} {v}"
                             for k, v in row.items() if k != "step"))
    log.record(row)


# ----------------------------------------------------------------------------------------------
# The command line: samples scored by the classifier, or the floors


def classifier_report(args, device):
    """SAMPLES (an .npz, labels beside arr_0) against the test split of the dataset REFERENCE; or --floors:
    the best numbers to expect, 2000 and 10000 random training images of the dataset SAMPLES against its test split
    ("real") and, with --vq-ckpt, their reconstructions by that tokenizer ("recon"), made as samples are."""
    dataset = args.samples if args.floors else args.reference
    clf = load_classifier(dataset, args.data_path, device, args.image_size or 32)
    if args.floors:
        vq = load_vq(args.vq_ckpt, device=device) if args.vq_ckpt else None
        train = data.open_dataset(clf.dataset, args.data_path, "train")
        sizes = sorted({min(n, len(train)) for n in (2000, 10000)})
        order = np.random.default_rng(0).permutation(len(train))[:sizes[-1]]  # nested subsets
        images, labels = _views(train, clf.image_size, order)
        kinds = {"real": images}
        if vq is not None:
            batches = np.array_split(images, math.ceil(len(images) / 100))
            with torch.inference_mode():
                recon = [vq.decode_code(vq.encode(_classifier_input(b, clf.image_size).to(device))).cpu()
                         for b in tqdm(batches, "reconstructing", leave=False)]
            kinds["recon"] = to_uint8(torch.cat(recon))  # as samples are made
        sets = [(f"{kind} ({n} training images)", x[:n], labels[:n]) for kind, x in kinds.items() for n in sizes]
    else:
        try:
            npz = np.load(args.samples)
            images, labels = npz["arr_0"], npz["labels"] if "labels" in npz.files else None
        except Exception as e:
            raise ValueError(f"{args.samples} is not an .npz of images (arr_0) ({type(e).__name__}).") from None
        sets = [(f"{os.path.basename(args.samples)} ({len(images)} images)", images, labels)]
    rows = [(what, classifier_metrics(x, y, clf.dataset, classifier=clf)) for what, x, y in sets]
    head = (f"classifier of {clf.dataset} at {clf.image_size}px (test accuracy {clf.test_accuracy:.4f}); "
            f"reference: its {clf.num_test} test images")
    if args.json:
        return json.dumps({"classifier": head, "test_accuracy": clf.test_accuracy, "num_reference": clf.num_test,
                           "rows": [{"images": k, **m} for k, m in rows]})
    return "\n".join([head] + [f"{k:<32} fd_classifier {m['fd_classifier']:.4f}  class_agreement "
                               f"{fid.show(m['class_agreement'])}" for k, m in rows])

# ----------------------------------------------------------------------------------------------
# CLI


def main(argv=None):
    p = argparse.ArgumentParser(description="The offline metric of generated images: FD in the features of a small "
                                            "classifier of the dataset, and the share of samples classified as their labels.")
    p.add_argument("samples", help=".npz of images (arr_0, uint8 NHWC; labels beside it), or with --floors the dataset")
    p.add_argument("reference", nargs="?", help="the dataset whose classifier scores SAMPLES (its test split is the reference)")
    p.add_argument("--floors", action="store_true", help="the best numbers to expect, from 2000 and 10000 training "
                   "images of the dataset SAMPLES (and their reconstructions, with --vq-ckpt)")
    p.add_argument("--vq-ckpt", metavar="PATH", help="with --floors: the tokenizer whose reconstructions to score")
    p.add_argument("--image-size", type=util.POSITIVE_INT, default=32, help="the classifier's input size")
    p.add_argument("--data-path", help="data folder for the dataset (data.py's data_path)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    args = p.parse_args(argv)
    if args.reference is None and not args.floors:
        p.error("give the dataset whose classifier scores SAMPLES, or --floors")
    return util.run_command(lambda a: print(classifier_report(a, fid.parse_device(a.device))), args)


if __name__ == "__main__":
    main()
