"""
What every entry point shares: flag types checked when parsed, settings dataclasses that are flags, the
one-sentence ending of a command, DDP setup and the seeded epoch order, files written whole, checkpoints
read with one-sentence errors, the run's log, PNG grids.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

# -----------------------------------------------------------------------------
# command-line values, checked when the flags are parsed (every entry point uses these)


def arg_type(kind, lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse `type`: parses with `kind`, refuses non-finite values and values outside [lo, hi]
    (open ends where asked); argparse then names the flag in its one-line error."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        low = lo is not None and (value <= lo if lo_open else value < lo)
        high = hi is not None and (value >= hi if hi_open else value > hi)
        if not math.isfinite(value) or low or high:
            bounds = " and ".join(b for b in (lo is not None and f"{'above' if lo_open else 'at least'} {lo}",
                                              hi is not None and f"{'below' if hi_open else 'at most'} {hi}") if b)
            raise argparse.ArgumentTypeError(f"expected a finite value {bounds}, got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT, NONNEG_INT = arg_type(int, 1), arg_type(int, 0)
POSITIVE, NONNEG = arg_type(float, 0, lo_open=True), arg_type(float, 0)
PROBABILITY = arg_type(float, 0, 1, hi_open=True)  # dropout rates, EMA decays, Adam betas
FINITE = arg_type(float)


def option(default=None, help=None, **argparse_kw):
    """A field of a settings dataclass that is also a command-line flag (add_options makes the flags):
    programs build the dataclass, users type the flags, and both meet the same defaults."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kw})


def add_options(parser, settings):
    """One --kebab-case flag per field of the dataclass `settings`, with its default and metadata."""
    for f in dataclasses.fields(settings):
        default = {} if f.metadata.get("action") == "store_true" else {"default": f.default}
        parser.add_argument("--" + f.name.replace("_", "-"), **f.metadata, **default)


def one_line(error):
    """The one sentence a command prints for a refused input: the message itself, or for an error
    re-raised by a DataLoader worker (which carries the worker's traceback) its last line."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()] or [type(error).__name__]
    return lines[-1] if "Traceback" in str(error) else lines[0]


def run_command(work, *args):
    """An entry point's work, its refusals as one line: functions raise, main prints "error: <sentence>" and
    exits 1 (MIRAI_DEBUG=1 shows the traceback instead)."""
    try:
        return work(*args)
    except (ValueError, OSError, RuntimeError, FloatingPointError) as e:
        if os.environ.get("MIRAI_DEBUG"):
            raise
        raise SystemExit(f"error: {one_line(e)}") from None


@contextlib.contextmanager
def blame(flag):
    """A refused input (a missing file, a wrong value) re-raised as one sentence that names its flag."""
    try:
        yield
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{flag}: {e}") from e


def folder_name(text):
    """A run's folder name: one path component, so it stays inside its results folder."""
    if not text or text in (".", "..") or "/" in text or "\\" in text:
        raise argparse.ArgumentTypeError(f"expected a plain folder name without path separators, got {text!r}")
    return text

# -----------------------------------------------------------------------------
# run plumbing shared by the entry points: one or many processes, files written whole, image grids


def setup_distributed():
    """-> (global rank, world size, device). Under torchrun each process takes the GPU of its local
    rank (its index on its own machine); the global rank decides who writes (rank 0 only)."""
    world, cuda = int(os.environ.get("WORLD_SIZE", 1)), torch.cuda.is_available()
    if world <= 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return torch.distributed.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu")


def barrier(world):
    if world > 1:
        torch.distributed.barrier()


def rng_state(device):
    return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}


def gather(obj, world):
    """-> [obj of rank 0, obj of rank 1, ...] on every rank."""
    out = [obj] * world
    if world > 1:
        torch.distributed.all_gather_object(out, obj)
    return out


def broadcast(obj, world):
    """-> rank 0's obj on every rank."""
    box = [obj]
    if world > 1:
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def cleanup_distributed(world):
    if world > 1:
        torch.distributed.destroy_process_group()


class EpochSampler(torch.utils.data.Sampler):
    """This rank's items of one epoch, as flat indices image * views + view.

    The order and the view of each image are drawn from a generator seeded by (seed, epoch) alone, so
    a resumed run rebuilds them exactly and skips the items it has already seen.
    """

    def __init__(self, num_images, num_views, per_rank, seed, rank, world):
        self.n, self.views, self.per_rank = num_images, num_views, per_rank
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return self.per_rank - self.skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        view = torch.randint(self.views, (self.n,), generator=g)
        flat = (perm * self.views + view[perm])[self.rank :: self.world][: self.per_rank]
        return iter(flat[self.skip :].tolist())


def atomic_write(path, write):
    """write(binary file) into a temporary file beside `path`, then rename it: a reader, or a resume
    after a crash, never sees half a file, and a failed write (a full disk) leaves no temporary file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    umask = os.umask(0)  # read the umask (setting it is the only way), and put it back
    os.umask(umask)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would make it: mkstemp's files are private (0600)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        raise OSError(f"could not write {path} ({one_line(e)}); is the disk full?") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(obj, path, link=None):
    """torch.save through atomic_write; `link` (train.py's last.pt) then names the same file: a hard link,
    not a second copy of the weights, where the filesystem allows one."""
    atomic_write(path, lambda f: torch.save(obj, f))
    if link is not None:
        tmp = f"{link}.tmp"
        if os.path.exists(tmp):
            os.remove(tmp)
        try:
            os.link(path, tmp)
        except OSError:
            atomic_write(tmp, lambda f: torch.save(obj, f))
        os.replace(tmp, link)


class Logger:
    """Rank 0 writes lines to stdout and log.txt, and metrics to metrics.jsonl; other ranks stay quiet."""

    def __init__(self, exp_dir, rank, bar=None):
        self.rank, self.bar = rank, bar
        self.log = open(os.path.join(exp_dir, "log.txt"), "a") if rank == 0 else None
        self.metrics = open(os.path.join(exp_dir, "metrics.jsonl"), "a") if rank == 0 else None

    def __call__(self, msg):
        if self.rank == 0:
            line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
            (self.bar.write if self.bar is not None else print)(line)
            self.log.write(line + "\n")
            self.log.flush()

    def record(self, row):
        if self.rank == 0:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()


def read_checkpoint(path, what, mmap=False):
    """torch.load (tensors only, onto the CPU) of a file a user named; missing or unreadable, it is
    refused in one sentence that names `what` and the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # any failure to unpickle means the same thing to the user
        raise ValueError(f"{what} {path} is not a readable PyTorch checkpoint ({type(e).__name__}): truncated, "
                         f"corrupt, or another kind of file") from None


def save_grid(images, path, nrow=None, padding=2):
    """(N, H, W, C) uint8 -> one PNG, nrow images a row (default: a square), black gaps; atomic."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    nrow = max(1, min(nrow or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((padding + rows * (h + padding), padding + nrow * (w + padding), c), dtype=np.uint8)
    for i, img in enumerate(images):
        y, x = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[y:y + h, x:x + w] = img
    atomic_write(path, lambda f: Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(f, format="PNG"))
