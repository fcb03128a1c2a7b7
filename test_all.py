"""Every test of the project. CPU only, tiny models, data the tests write themselves or testdata/.

Run: python -m pytest -q test_all.py"""
import argparse
import functools
import gzip
import hashlib
import itertools
import json
import math
import os
import pickle
import re
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import fid
import foresight as FS
import model as M
import quality
import sample as S
import tokenizer as T
import train as TR
import util
import vq as V

ROOT = Path(__file__).parent
TESTDATA = ROOT / "testdata"
torch.set_num_threads(1)  # tiny ops: a second OpenMP thread costs more than it gives


# ==== What the sections share: tiny models and their checkpoints, image folders, code datasets, refusals ====

# a VQ small enough for a few CPU steps: 16 px -> 8x8 tokens, GroupNorm(32) still divides every width;
# the sampling tests' one has 16 codes (8 px images -> 4x4 tokens)
TINY_VQ = V.VQConfig(codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
                     z_channels=32, ch=32, num_res_blocks=1)
SAMPLE_VQ = replace(TINY_VQ, codebook_size=16)
TINY_GPT = dict(dim=32, n_layer=2, n_head=4, vocab_size=16, grid_size=3, num_classes=5)


def tiny_gpt(seed=0, config=None, **kw):
    torch.manual_seed(seed)
    gpt = M.GPT(config or M.GPTConfig(**(TINY_GPT | kw)))
    with torch.no_grad():  # the zero-initialised head would make every logit equal
        gpt.output.weight.normal_(0, 0.5)
    return gpt.eval()


def save_gpt(path, vq_path=None, llamagen=False, **kw):
    """A tiny 4x4-grid GPT as train.py saves it, or as LlamaGen does (GPT-T, a bare state_dict under "model")."""
    config = M.gpt_config("GPT-T", vocab_size=16, grid_size=4, num_classes=5) if llamagen else None
    gpt = tiny_gpt(config=config, **{"grid_size": 4, **kw})
    sd = gpt.state_dict()
    torch.save({"model": sd} if llamagen else {"model": sd, "ema": sd, "gpt_config": asdict(gpt.config),
                                               "vq_ckpt": vq_path}, path)
    return str(path)


def save_tiny_vq(path, seed=0, config=TINY_VQ):
    torch.manual_seed(seed)
    vq = V.VQModel(config).eval()
    torch.save({"model": vq.state_dict(), "config": asdict(config)}, path)
    return vq


def save_files(folder, files):
    """Tiny checkpoints and junk files: {name: content} into folder, bytes as they are, anything else torch.save'd."""
    for name, content in files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            torch.save(content, folder / name)


def last_ckpt(exp):
    return str(Path(exp) / "checkpoints" / "last.pt")


def make_image_folder(root, classes=2, per_class=8, size=16, seed=0, sizes=None):
    """An ImageNet-style folder of smooth, class-dependent pictures; `sizes`: each one's (width, height) in order."""
    rng = np.random.default_rng(seed)
    for k, (w, h) in enumerate(sizes or [(size, size)] * (classes * per_class)):
        c, i = divmod(k, per_class)
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        f, p = rng.uniform(1, 3, size=3), rng.uniform(0, 6.28, size=3)
        img = np.stack([np.sin(f[j] * (xx if (j + c) % 2 else yy) * 6.28 + p[j]) for j in range(3)], -1)
        Image.fromarray(((img + 1) * 127.5).astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def write_code_dataset(root, n=48, grid=4, vocab=32, classes=3, views=2, seed=0, codes=None, labels=None, **meta):
    """A code dataset as `tokenizer.py extract` writes it; without `codes`, a learnable one (a noised class pattern)."""
    labels = np.arange(n) % classes if labels is None else np.asarray(labels)
    if codes is None:
        rng = np.random.default_rng(seed)
        codes = np.repeat(rng.integers(0, vocab, (classes, grid * grid))[labels][:, None], views, axis=1)
        noise = rng.random(codes.shape) < 0.1
        codes[noise] = rng.integers(0, vocab, noise.sum())
    os.makedirs(root, exist_ok=True)
    np.save(root / "codes.npy", codes.astype(np.int16))
    np.save(root / "labels.npy", labels.astype(np.int64))
    meta = {"grid": [grid, grid], "vocab_size": vocab, "num_classes": classes, "image_size": 16, "views": "flip",
            "num_views": views, "dataset": "folder", "split": "train", "data_path": None, "tokenizer": None,
            "tokenizer_config": {}, "num_images": len(labels), **meta}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def random_inception(monkeypatch):
    """fid.load_inception gives a random network: FID and rFID are then finite without the real weights."""
    torch.manual_seed(0)
    net = fid.FIDInceptionV3().eval()
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: net)


def read_shapes(name):
    """testdata's listing of a LlamaGen state_dict: {key: shape}."""
    rows = [line.split("\t") for line in (TESTDATA / name).read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    return {key: tuple(int(s) for s in shape.strip("()").split(",") if s.strip()) for key, shape in rows}


def refused(capsys, main, argv, match):
    """A refusal: a non-zero exit, one line naming what was wrong, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    msg = e.value.code if isinstance(e.value.code, str) else err.strip().splitlines()[-1]
    assert e.value.code != 0 and "Traceback" not in err and "\n" not in msg and re.search(match, msg), (msg, err)
    return msg


def cli(*parts):
    """An argv of flags and values: strings are split at spaces (paths hold none)."""
    return " ".join(map(str, parts)).split()


def trace_compile(monkeypatch):
    """torch.compile through dynamo's whole-graph trace with the eager backend: the compiled code paths, no C++ build."""
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, backend="eager", **kw))


def raises(error, match, fn, /, *args, **kw):
    """fn(*args, **kw) raises `error` with a message that `match` finds; returns the message."""
    with pytest.raises(error, match=match) as e:
        fn(*args, **kw)
    return str(e.value)


# ==== model.py ==========================================================================================

def test_llamagen_fixture_parity_and_load_gpt_reads_llamagen_and_our_formats_and_explains_mismatches(tmp_path):
    ref = torch.load(TESTDATA / "llamagen_gpt_tiny.pt", weights_only=True)
    c, sd = ref["config"], ref["state_dict"]
    keys = ("dim", "n_layer", "n_head", "vocab_size", "num_classes", "cls_token_num")
    gpt = M.GPT(M.GPTConfig(**{k: c[k] for k in keys}, grid_size=int(c["block_size"] ** 0.5))).eval()
    gpt.load_state_dict(sd, strict=True)
    idx, cond = ref["idx"][:, :-1], ref["cond"]
    logits, null = (gpt(idx, y)[0].detach() for y in (cond, torch.full_like(cond, gpt.config.num_classes)))
    assert logits.shape == ref["logits"].shape
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(null, ref["logits_null_class"], atol=1e-4, rtol=0)
    assert torch.equal(gpt.generate(cond, cfg_scale=2.0, temperature=1.0, top_k=1, top_p=1.0), ref["generated"])
    tiny = dict(preset="GPT-T", grid_size=4, dim=64, n_layer=2, n_head=4)
    ours = {"model": sd, "ema": {k: v + 1 for k, v in sd.items()}, "gpt_config": asdict(gpt.config)}
    broken = {**{k: v for k, v in sd.items() if k != "norm.weight"}, "extra.weight": sd["norm.weight"]}
    save_files(tmp_path, {"bare.pt": sd, "llamagen.pt": {"model": sd}, "ema_only.pt": {"ema": sd}, "ours.pt": ours,
                          "d.pt": broken, "junk.pt": b"not a checkpoint"})
    for name in ("bare.pt", "llamagen.pt", "ema_only.pt"):
        assert all(torch.equal(M.load_gpt(tmp_path / name, **tiny).state_dict()[k], v) for k, v in sd.items()), name
    assert torch.equal(M.load_gpt(tmp_path / "ours.pt").output.weight, gpt.output.weight)
    assert torch.equal(M.load_gpt(tmp_path / "ours.pt", use_ema=True).output.weight, gpt.output.weight + 1)
    raises(ValueError, "give --gpt-model", M.load_gpt, tmp_path / "llamagen.pt")
    msg = raises(ValueError, "shape mismatches", M.load_gpt, tmp_path / "llamagen.pt", preset="GPT-T", grid_size=4)
    assert "tok_embeddings.weight (64, 64) vs model (64, 128)" in msg  # GPT-T is dim 128, not 64
    assert "vocabulary 64, 10 classes" in msg and "\n" not in msg
    raises(ValueError, "missing keys: norm.weight; unexpected keys: extra.weight", M.load_gpt, tmp_path / "d.pt",
           **tiny)
    raises(ValueError, "not a readable PyTorch checkpoint", M.load_gpt, tmp_path / "junk.pt")
    raises(FileNotFoundError, "does not exist", M.load_gpt, tmp_path / "nope.pt")
    raises(ValueError, "GPT-Q.*unknown", M.gpt_config, "GPT-Q")


def test_class_position_has_zero_rotary_table():
    rope = torch.view_as_real(M.rotary_table(M.GPTConfig(dim=64, n_head=4, grid_size=4)))  # (positions, pairs, 2)
    assert rope.shape == (1 + 16, 8, 2) and torch.all(rope[0] == 0)
    # cell (0, 0): identity rotation; cell (0, 1): rows half unrotated, columns half rotated
    assert torch.allclose(rope[1, :, 0], torch.ones(8)) and torch.all(rope[1, :, 1] == 0)
    assert torch.all(rope[2, :4, 1] == 0) and rope[2, 4, 1] > 0
    # cell (1, 0) rotates the first pair by row frequency 1: angle 1 radian
    torch.testing.assert_close(rope[1 + 4, 0], torch.tensor([math.cos(1.0), math.sin(1.0)]))


def test_presets_have_llamagen_keys_and_sizes_and_swiglu_is_rounded_like_llamagen():
    for preset, params, tolerance in (("GPT-B", 111e6, 1e6), ("GPT-L", 343e6, 3.43e6), ("GPT-XL", 775e6, 7.75e6)):
        with torch.device("meta"):
            gpt = M.GPT(M.gpt_config(preset, vocab_size=16384, grid_size=16, num_classes=1000))
        assert abs(gpt.num_params() - params) < tolerance, preset
        if preset == "GPT-B":
            shapes = {k: tuple(v.shape) for k, v in gpt.state_dict().items()}
            assert shapes == read_shapes("llamagen_gpt_b_state_dict.txt")
    assert [M.ffn_hidden_dim(M.GPTConfig(dim=d)) for d in (768, 1024, 256)] == [2048, 2816, 768]


def test_forward_gives_a_uniform_first_loss_the_hidden_state_after_a_block_and_drops_labels_in_train_mode(monkeypatch):
    torch.manual_seed(0)
    gpt = M.GPT(M.GPTConfig(**(TINY_GPT | {"vocab_size": 50})))
    idx = torch.randint(0, 50, (4, 9))
    _, loss, _ = gpt(idx[:, :-1], torch.tensor([0, 1, 2, 3]), targets=idx)
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 1e-5
    gpt, idx, cond = tiny_gpt(), torch.randint(0, 16, (3, 9)), torch.tensor([0, 1, 4])
    logits, loss, hidden = gpt(idx[:, :-1], cond, targets=idx, hidden_layer=1)
    assert logits.shape == (3, 9, 16) and hidden.shape == (3, 9, 32)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 16), idx.reshape(-1)))
    # the residual stream after block 1 is what block 1 alone produces from the embeddings
    torch.testing.assert_close(hidden, gpt.layers[0](gpt.embed(idx[:, :-1], cond), gpt.rope[:9]))
    none, _, early = gpt(idx[:, :-1], cond, hidden_layer=1, stop_at_hidden=True)  # a teacher's forward stops there
    assert none is None and torch.equal(early, hidden)
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention  # a CPU's bf16 autocast: attention in fp32
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((q.dtype, k.dtype, torch.is_autocast_enabled("cpu"))) or sdpa(q, k, v, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = gpt(idx[:, :-1], cond)[0]
    assert set(seen) == {(torch.float32, torch.float32, False)} and len(seen) == len(gpt.layers)
    assert not torch.equal(low, logits) and (low - logits).abs().max() < 0.1 * logits.abs().max()  # bf16 matmuls
    gpt = tiny_gpt(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.5)
    idx, cond = torch.randint(0, 16, (64, 9))[:, :-1], torch.randint(0, 5, (64,))
    a, b = (gpt(idx, cond)[0] for _ in range(2))
    assert torch.equal(a, b)
    gpt.train()
    c, null = gpt(idx, cond)[0], gpt(idx, torch.full_like(cond, 5), drop_labels=False)[0]
    changed = ~torch.isclose(c, a).all(-1).all(-1)
    assert 10 < changed.sum() < 54  # about half the labels became the null class ...
    torch.testing.assert_close(c[changed], null[changed])  # ... and those rows equal null-class rows


def reference_generate(gpt, cond, cfg_scale, first_unguided=None):
    """Greedy CFG generation, a full forward a token (no cache); from token first_unguided on, conditional logits."""
    seq, null = torch.zeros(cond.shape[0], 0, dtype=torch.long), torch.full_like(cond, gpt.config.num_classes)
    for t in range(gpt.config.block_size):
        with torch.no_grad():
            c, u = gpt(seq, cond)[0][:, -1], gpt(seq, null)[0][:, -1]
        logits = u + (c - u) * cfg_scale if first_unguided is None or t < first_unguided else c
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


def test_kv_cache_generation_equals_full_forward_cfg_interval_stops_guidance_and_top_k_top_p_filter(monkeypatch):
    trace_compile(monkeypatch)  # the compiled decode step
    for n_kv_head in (None, 2):
        gpt, cond = tiny_gpt(n_kv_head=n_kv_head), torch.tensor([0, 3, 4])
        for cfg in (3.0, 1.0):
            assert torch.equal(gpt.generate(cond, cfg_scale=cfg, top_k=1), reference_generate(gpt, cond, cfg)), cfg
        for kw in (dict(cfg_scale=3.0), dict(cfg_scale=3.0, cfg_interval=2)):
            a, b = (gpt.generate(cond, generator=torch.Generator().manual_seed(0), compile=c, **kw) for c in (True, False))
            assert torch.equal(a, b), kw
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the cache takes autocast's dtype (bf16 rounding may
            for c in (True, False):                          # flip near-ties between the two, so no equality here)
                assert gpt.generate(cond, cfg_scale=3.0, compile=c).shape == (3, 9)
    gpt = tiny_gpt()  # a generator makes sampling reproducible
    a, b, c = (gpt.generate(torch.arange(5).repeat(4), cfg_scale=2.0, generator=torch.Generator().manual_seed(s))
               for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (20, 9) and a.min() >= 0 and a.max() < 16
    cond = torch.tensor([0, 1, 2, 3])
    guided = gpt.generate(cond, cfg_scale=4.0, top_k=1)
    assert not torch.equal(guided, gpt.generate(cond, cfg_scale=1.0, top_k=1))
    assert torch.equal(gpt.generate(cond, cfg_scale=4.0, cfg_interval=100, top_k=1), guided)
    # LlamaGen's count: interval 2 keeps guidance for tokens 0..3, then conditional logits only
    mixed = gpt.generate(cond, cfg_scale=4.0, cfg_interval=2, top_k=1)
    assert torch.equal(mixed[:, :4], guided[:, :4])
    assert torch.equal(mixed, reference_generate(gpt, cond, 4.0, first_unguided=4))
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)  # top-k and top-p filtering
    g = torch.Generator().manual_seed(0)  # top_p 0.7: 0.5 < 0.7, 0.8 crosses
    for kw, drawn in ((dict(top_k=2), {0, 1}), (dict(top_p=0.7), {0, 1}), (dict(top_p=0.4), {0}),
                      ({}, {0, 1, 2, 3}), (dict(temperature=0.0), {0})):
        assert set(M.sample_logits(logits, generator=g, **kw).tolist()) == drawn, kw
    # the inverse-CDF draw keeps torch.multinomial's distribution: frequencies within 4 sigma of the probabilities
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]).double()
    draws = M.sample_logits(torch.log(p.float()).repeat(40_000, 1), generator=g)
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    assert torch.all((freq - p).abs() <= 4 * (p * (1 - p) / len(draws)).sqrt() + 1e-12) and freq[4] == 0, freq


# ==== foresight.py ======================================================================================

def pair_map(pairs):
    return dict(zip(pairs[0].tolist(), pairs[1].tolist()))


def direct_cos_loss(fs, hidden, targets, offsets, explicit, grid):
    """The loss written out pair by pair: one student vector through its head at a time."""
    losses = []
    for j, (dy, dx) in enumerate(offsets):
        terms = []
        for cell in range(grid * grid - 1):
            (r, c), tcell = divmod(cell, grid), cell + dy * grid + dx
            if r + dy >= grid or c + dx >= grid or (explicit and tcell >= grid * grid - 1):
                continue
            tgt = targets[:, tcell + 1] if explicit else targets[:, tcell]
            terms.append(-torch.nn.functional.cosine_similarity(fs.projectors[j](hidden[:, cell + 1]), tgt, dim=-1))
        losses.append(torch.stack(terms).mean())
    return torch.stack(losses)


def test_neighbours_are_masked_at_edges_never_wrapped_and_explicit_implicit_and_output_losses_are_direct_ones():
    pairs = FS.neighbour_pairs(3, 3, "2d", num_targets=8)  # explicit: cell 8 is never read
    assert pair_map(pairs[1]) == {0: 1, 1: 2, 3: 4, 4: 5, 6: 7}  # (0, +1): no 2->3, 5->6 wrap, no 7->8
    assert pair_map(pairs[2]) == {0: 3, 1: 4, 2: 5, 3: 6, 4: 7}  # (+1, 0)
    assert torch.equal(pairs[0][0], torch.arange(8)) and torch.equal(pairs[0][1], torch.arange(8))
    # (1, 1) for an encoder: cell 8 is a target
    assert pair_map(FS.neighbour_pairs(3, 4, "2d", num_targets=9)[3]) == {0: 4, 1: 5, 3: 7, 4: 8}
    assert FS.NEIGHBOURS_2D[3:] == ((1, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0))
    raises(ValueError, "foresight-k 10", FS.neighbour_pairs, 4, 10, "2d")
    s, t = FS.neighbour_pairs(3, 3, "1d", num_targets=8)[2]  # 1D: two steps later, across the row end (its future)
    assert s.tolist() == [0, 1, 2, 3, 4, 5] and t.tolist() == [2, 3, 4, 5, 6, 7]
    torch.manual_seed(0)
    fs = FS.Foresight("explicit", dim=8, grid=3, k=4, proj_dim=16)
    hidden, targets = torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    torch.testing.assert_close(fs(hidden, targets), direct_cos_loss(fs, hidden, targets, FS.NEIGHBOURS_2D[:4], True, 3))
    torch.manual_seed(0)  # implicit: the student that read a cell is paired with that cell's patch
    fs = FS.Foresight("implicit", dim=8, grid=3, k=1, proj_dim=16, target_dim=5)
    s, t = fs.pairs(0)
    assert torch.equal(s, t) and s.tolist() == list(range(8))
    hidden, feats = torch.randn(2, 9, 8), torch.randn(2, 9, 5)
    torch.testing.assert_close(fs(hidden, feats), direct_cos_loss(fs, hidden, feats, [(0, 0)], False, 3))
    feats2 = torch.cat([feats[:, :8], torch.randn(2, 1, 5)], dim=1)  # the last cell: no student pairs with it
    torch.testing.assert_close(fs(hidden, feats2), fs(hidden, feats))
    torch.manual_seed(0)  # output level: the heads predict the neighbours' next token
    fs = FS.Foresight("output", dim=8, grid=3, k=3, proj_dim=16, vocab_size=7)
    assert fs.k == 2  # the (0, 0) target is the model's own next-token head
    hidden, tokens = torch.randn(2, 9, 8), torch.randint(0, 7, (2, 9))
    s, t = fs.pairs(0)  # (0, 1): the position that read cell t predicts token t + 1
    assert pair_map((s, t)) == {0: 1, 1: 2, 3: 4, 4: 5, 6: 7}
    logits = fs.projectors[0](hidden[:, 1:])  # every student, then keep the valid ones
    want = torch.nn.functional.cross_entropy(logits[:, s].reshape(-1, 7), tokens[:, t + 1].reshape(-1))
    torch.testing.assert_close(fs(hidden, tokens)[0], want)


def test_coefficient_schedules_and_warmup():
    assert FS.coef_schedule(9, 100, 10) == 0.0 and FS.coef_schedule(10, 100, 10) == 1.0
    assert FS.coef_schedule(10, 110, 10, "cosine") == 1.0 and abs(FS.coef_schedule(60, 110, 10, "cosine") - 0.5) < 1e-9
    assert [FS.coef_schedule(step, 100, 0, "50:0.5,80:0") for step in (5, 60, 90)] == [1.0, 0.5, 0.0]
    assert [FS.parse_warmup(w, 100, n) for w, n in (("15ep", 10_000), ("10%", 2000), ("250", 2000))] == [1500, 200, 250]
    raises(argparse.ArgumentTypeError, "15ep", FS.warmup_text, "soon")
    raises(ValueError, "foresight-schedule", FS.parse_schedule, "linear")


def test_ema_teacher_is_the_ema_weights_without_gradient_and_image_teacher_normalises_and_checks_its_grid():
    student, ema = tiny_gpt(seed=1).train(), tiny_gpt(seed=2).requires_grad_(False)
    TR.update_ema(ema, student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), student.parameters()))
    before = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    TR.update_ema(ema, student, 0.9)
    for e, b, s in zip(ema.parameters(), before, student.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * s)
    idx, cond = torch.randint(0, 16, (2, 8)), torch.tensor([1, 2])
    t = FS.ema_targets(ema, idx, cond, 1)
    assert torch.equal(t, ema.layers[0](ema.embed(idx, cond, drop_labels=False), ema.rope[:9])) and not t.requires_grad
    fs = FS.Foresight("explicit", dim=32, grid=3, k=3, proj_dim=16)
    _, loss, hidden = student(idx, cond, targets=torch.randint(0, 16, (2, 9)), hidden_layer=1)
    (loss + fs(hidden, t).sum()).backward()
    assert all(p.grad is None for p in ema.parameters()) and ema.training is False
    assert student.layers[0].attention.wqkv.weight.grad is not None and fs.projectors[0][0].weight.grad is not None

    class Fake(torch.nn.Module):  # stands in for DINOv2: 14x14 patches, mean-pooled pixels as "features"
        def forward_features(self, x):
            return {"x_norm_patchtokens": torch.nn.functional.avg_pool2d(x, 14).flatten(2).transpose(1, 2)}
    # the image teacher resizes and normalises, and refuses a grid mismatch
    teacher = FS.ImageEncoderTeacher(Fake(), grid=2, feature_dim=3, input_size=28, mean=FS.IMAGENET_MEAN,
                                     std=FS.IMAGENET_STD, kind="dinov2")
    img = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    img[:, :, :8, 8:] = 255  # top-right quarter white: patch (0, 1)
    feats = teacher(img)
    white = (1 - torch.tensor(FS.IMAGENET_MEAN)) / torch.tensor(FS.IMAGENET_STD)
    assert feats.shape == (1, 4, 3) and torch.allclose(feats[0, 1], white, atol=0.05)
    assert feats[0, 1].sum() > feats[0, 0].sum() + 5
    raises(ValueError, "teacher gives 4 patches",
           lambda: FS.ImageEncoderTeacher(Fake(), grid=3, feature_dim=3, input_size=28, kind="dinov2")(img))
    raises(ValueError, "foresight-encoder", FS.dinov2_teacher, "dinov3_vitb16", 16)


# ==== train.py ==========================================================================================

@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory):
    return write_code_dataset(tmp_path_factory.mktemp("codes"))


def train_argv(tmp, codes, *extra, name="run"):
    """train.py's argv for a tiny GPT-T run, then `extra` (flags and values, as cli takes them)."""
    return cli(f"--code-path {codes} --results-dir {tmp} --exp-name {name} --gpt-model GPT-T --global-batch-size 8",
               "--log-every 5 --ckpt-every 1000 --no-progress", *extra)


def run_train(tmp, codes, *extra, name="run"):
    return Path(TR.main(train_argv(tmp, codes, *extra, name=name)))


def metrics(exp):
    return [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]


def state(exp, step):
    return torch.load(exp / "checkpoints" / f"{step:07d}.pt", weights_only=True)


def assert_same_weights(a, b, exact=True):
    tolerance = dict(atol=0, rtol=0) if exact else dict(atol=1e-5, rtol=1e-4)
    for key in ("model", "ema", "foresight"):
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], **tolerance, msg=lambda m: f"{key} {k}: {m}")


@pytest.mark.parametrize("variant", ["none", "none --mixed-precision bf16", "explicit --foresight-warmup 5 --ema-decay 0.9",
                                     "explicit --foresight-level output --foresight-warmup 0",
                                     "explicit --foresight-warmup 100"])
def test_each_variant_reduces_the_loss_and_a_warmup_keeps_the_foresight_heads_untouched(tmp_path, codes_dir, variant):
    exp = run_train(tmp_path, codes_dir, "--max-steps 40 --lr 2e-3 --foresight", variant)
    rows, ckpt = metrics(exp), state(exp, 40)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert ("bf16 autocast" in (exp / "log.txt").read_text()) == ("bf16" in variant)  # a CPU runs fp32 unless asked
    assert set(ckpt) >= {"model", "ema", "optimizer", "steps", "epoch", "args", "gpt_config", "rng"}
    assert ckpt["steps"] == 40 and ckpt["epoch"] == 40 // 6 and ckpt["step_in_epoch"] == 40 % 6
    assert set(ckpt["model"]) == set(M.GPT(M.GPTConfig(**ckpt["gpt_config"])).state_dict())  # as LlamaGen reads it
    if variant.endswith("0.9"):
        assert "foresight" not in rows[0] and rows[-1]["foresight"][0] < rows[1]["foresight"][0]
    if variant.endswith("100"):  # the 3 heads' 6 tensors each were never stepped
        n_gpt = len(list(FS.Student(M.GPT(M.GPTConfig(**ckpt["gpt_config"]))).parameters()))
        n_all = sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"])
        assert all("foresight" not in r for r in rows)
        assert len(set(ckpt["optimizer"]["state"])) == n_gpt and n_all == n_gpt + 3 * 6


def test_resume_is_bit_identical_and_a_resume_that_would_change_the_run_is_refused(tmp_path, codes_dir, capsys):
    common = "--foresight explicit --foresight-warmup 3 --ema-decay 0.9 --ckpt-every 4"
    full = run_train(tmp_path, codes_dir, "--max-steps 10", common, name="full")
    half = run_train(tmp_path, codes_dir, "--max-steps 4", common, name="half")  # "killed" after step 4
    last = last_ckpt(half)
    for extra, match in [("--global-batch-size 4", r"--global-batch-size 8 \(now 4\)"),
                         ("--lr 0.001", r"--lr 0\.0001 \(now 0\.001\)"),
                         ("--global-seed 3", r"--global-seed 0 \(now 3\)"),
                         ("--foresight-coef 1", r"--foresight-coef \[2\.0, 2\.0, 2\.0\] \(now \[1\.0, 1\.0, 1\.0\]\)"),
                         ("--foresight-k 2", r"foresight k 3 \(now 2\)"),
                         ("--dropout-p 0.2", r"resid_dropout_p 0\.1 \(now 0\.2\)")]:
        argv = train_argv(tmp_path, codes_dir, "--max-steps 7", common, extra, "--resume", last, name="half")
        assert "{" not in refused(capsys, TR.main, argv, match)  # names the fields, not whole dicts
    assert sorted(os.listdir(half / "checkpoints")) == ["0000004.pt", "last.pt"]
    # a longer run is what --max-steps is for: applied and logged; --resume auto finds the --exp-name run, and a
    # checkpoint's path finds that checkpoint's run; either way the result is the uninterrupted run's to the bit
    run_train(tmp_path, codes_dir, "--max-steps 7", common, "--resume auto", name="half")
    assert torch.load(last, weights_only=True)["steps"] == 7
    assert "--max-steps changed from 4 to 7" in (half / "log.txt").read_text()
    run_train(tmp_path, codes_dir, "--max-steps 10", common, "--resume", last)
    a, b = state(full, 10), state(half, 10)
    assert_same_weights(a, b)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


# dropout off: then how the batch of a step is split cannot change its update
SPLIT = ("--max-steps 3 --ckpt-every 3 --lr 1e-3 --dropout-p 0 --token-dropout-p 0 --class-dropout-prob 0 "
         "--foresight explicit --foresight-warmup 1 --ema-decay 0.5")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, codes_dir):
    return state(run_train(tmp_path_factory.mktemp("one"), codes_dir, SPLIT), 3)


@pytest.mark.parametrize("nodes,per_node,accum", [(1, 2, 1), (2, 1, 1), (1, 1, 2)])
def test_ddp_and_grad_accumulation_equal_one_process_training(tmp_path, codes_dir, one_process, nodes, per_node, accum):
    # DDP with two gloo processes; (2, 1): two torchrun launchers as on two "machines" of one process each, so
    # local rank 0 twice and global ranks 0 and 1; (1, 1, 2): one process, two accumulated half batches
    if accum > 1:
        a = state(run_train(tmp_path, codes_dir, SPLIT, "--grad-accum", accum), 3)
    else:
        with socket.socket() as s:  # a free port
            s.bind(("127.0.0.1", 0))
            port, launchers = s.getsockname()[1], []
        for node in range(nodes):  # output to files: a full pipe of one launcher would stall them all
            log = tempfile.TemporaryFile("w+")
            where = ["--standalone"] if nodes == 1 else [  # one node: torchrun picks a free port itself, no race
                f"--nnodes={nodes}", f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}"]
            cmd = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={per_node}",
                   str(ROOT / "train.py"), *train_argv(tmp_path, codes_dir, SPLIT)]
            launchers.append((subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                                               stderr=subprocess.STDOUT), log))
        for p, log in launchers:
            p.wait(timeout=300)
            log.seek(0)
            assert p.returncode == 0, f"torchrun exited {p.returncode}:\n{log.read()[-6000:]}"
        a = state(tmp_path / "run", 3)
        assert len(a["rng"]) == 2
    assert_same_weights(a, one_process, exact=False)
    assert not torch.equal(a["model"]["output.weight"], torch.zeros_like(a["model"]["output.weight"]))


def test_bad_flags_fail_with_one_sentence(tmp_path, codes_dir, capsys):
    other = write_code_dataset(tmp_path / "other", vocab=40)
    gpt = last_ckpt(run_train(tmp_path, other, "--max-steps 1 --ckpt-every 1", name="v40"))
    small = last_ckpt(run_train(tmp_path, codes_dir, "--max-steps 1 --ckpt-every 1 --gpt-model GPT-S", name="s"))
    save_files(tmp_path, {"other.pt": {"model": {}}, "tensor.pt": torch.zeros(3)})
    for extra, match in [
        ("--foresight explicit --foresight-coef 1,2", "2 values for 3 targets"),
        ("--foresight explicit --foresight-depth 9", "outside the model's 1..4 blocks"),
        ("--foresight implicit --foresight-encoder vq", "needs --data-path"),
        ("--global-batch-size 64", "larger than the dataset"),
        (f"--foresight implicit --foresight-level output --data-path {tmp_path}", "use it with --foresight explicit"),
        (f"--gpt-ckpt {gpt}", "vocabulary 40, but the codes .* vocabulary 32"),
        (f"--resume {tmp_path / 'nope.pt'}", "--resume .*nope.pt does not exist"),
        (f"--resume {tmp_path / 'other.pt'}", "not a checkpoint of train.py .it lacks optimizer"),
        (f"--max-steps 2 --foresight explicit --resume {gpt} --code-path {other}", "another model or foresight setup"),
        (f"--code-path {tmp_path / 'empty'}", "not a code dataset"),
        (f"--gpt-ckpt {small}", r"holds a GPT-S model .* not --gpt-model GPT-T"),
        (f"--resume {tmp_path / 'tensor.pt'}", r"tensor.pt is not a checkpoint of train.py"),
        *[("--mixed-precision fp16", "fp16 needs a GPU")] * (not torch.cuda.is_available()),
    ]:
        refused(capsys, TR.main, train_argv(tmp_path, codes_dir, "--max-steps 1", extra), "^error: .*" + match)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("main,argv,flag", [
    *[("train", f"--code-path {{codes}} --results-dir {{out}} --foresight explicit {flag} {value}", flag)
      for flag, value in [
        ("--max-steps", "0"), ("--max-steps", "-5"), ("--foresight-k", "0"), ("--foresight-depth", "0"),
        ("--global-batch-size", "0"), ("--foresight-coef", "nan"), ("--foresight-coef", "1,inf"), ("--lr", "nan"),
        ("--ema-decay", "1.5"), ("--epochs", "0"), ("--eval-every", "0"), ("--foresight-warmup", "later"),
        ("--exp-name", "../outside"), ("--exp-name", "a/b")]],
    ("tokenizer", "train --dataset folder --results-dir {out} --steps -5", "--steps"),
    ("tokenizer", "train --dataset folder --results-dir {out} --global-batch-size 0", "--global-batch-size"),
    ("tokenizer", "extract --vq-ckpt v.pt --dataset folder --image-size 16 --code-path {out} --batch-size 0",
     "--batch-size"),
    ("sample", "--gpt-ckpt x.pt --num-fid-samples 0 --sample-dir {out}", "--num-fid-samples"),
    ("sample", "--gpt-ckpt x.pt --sample-dir {out}", "give --num-fid-samples"),
])
def test_counts_and_choices_are_refused_when_parsed(tmp_path, codes_dir, capsys, main, argv, flag):
    argv = argv.format(codes=codes_dir, out=tmp_path / "r").split()
    refused(capsys, {"train": TR.main, "tokenizer": T.main, "sample": S.main}[main], argv, re.escape(flag))
    assert not (tmp_path / "r").exists() and not (tmp_path / "outside").exists() and not os.path.exists("samples.png")


@pytest.mark.parametrize("where,value,match", [("codes", 32, r"code 32 at index \(5, 1, 3\), outside 0..31"),
                                               ("codes", -1, r"code -1 at index \(5, 1, 3\)"),
                                               ("labels", 3, r"label 3 at index \(5,\), outside 0..2")])
def test_codes_out_of_range_are_refused_before_training(tmp_path, capsys, where, value, match):
    root = write_code_dataset(tmp_path / "bad")
    array = np.load(root / f"{where}.npy")
    array[(5, 1, 3) if where == "codes" else 5] = value
    np.save(root / f"{where}.npy", array)
    argv = ["--code-path", str(root), "--results-dir", str(tmp_path / "r"), "--max-steps", "1"]
    assert f"{where}.npy" in refused(capsys, TR.main, argv, match) and not (tmp_path / "r").exists()


def test_atomic_writes_leave_ordinary_files_and_the_range_check_reads_in_chunks(tmp_path):
    util.save_grid(np.zeros((4, 8, 8, 3), np.uint8), tmp_path / "grid.png")
    (tmp_path / "plain").write_bytes(b"")
    assert (tmp_path / "grid.png").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "plain"]  # no temporary file left
    codes = np.lib.format.open_memmap(tmp_path / "c.npy", mode="w+", dtype=np.int16, shape=(1000, 2, 16))
    codes[:] = 7
    codes[999, 1, 15] = 99
    raises(ValueError, r"code 99 at index \(999, 1, 15\)", data.check_range, codes, 32, "c.npy", "code",
           "the vocabulary", rows=64)
    data.check_range(codes, 100, "c.npy", "code", "the vocabulary", rows=64)


def test_a_nan_loss_or_full_disk_stops_the_run_keeping_only_good_checkpoints(tmp_path, codes_dir, monkeypatch, capsys):
    real, calls = FS.step_losses, itertools.count(1)

    def poisoned(*a, **k):
        loss, ntp, fs_losses = real(*a, **k)
        return (loss * float("nan"), ntp * float("nan"), fs_losses) if next(calls) > 3 else (loss, ntp, fs_losses)
    with monkeypatch.context() as patch:
        patch.setattr(FS, "step_losses", poisoned)
        argv = train_argv(tmp_path, codes_dir, "--max-steps 6 --log-every 1 --ckpt-every 2", name="r")
        msg = refused(capsys, TR.main, argv, r"the loss became nan before step 4.*last good checkpoint is .*last\.pt")
    ckpts = sorted(os.listdir(tmp_path / "r" / "checkpoints"))
    assert ckpts == ["0000002.pt", "last.pt"] and state(tmp_path / "r", 2)["steps"] == 2, (ckpts, msg)

    def full_disk(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\nmore detail")
    monkeypatch.setattr(torch, "save", full_disk)
    msg = refused(capsys, TR.main, train_argv(tmp_path, codes_dir, "--max-steps 1 --ckpt-every 1", name="t"),
                  r"could not write .*0000001.pt \(.*enforce fail.*\); is the disk full\?")
    assert not list((tmp_path / "t" / "checkpoints").glob("*.tmp")) and "more detail" not in msg


def test_training_logs_the_offline_quality_metric_without_changing_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("offline")))
    rng = np.random.default_rng(0)  # Fashion-MNIST's files: class c is a bright band at rows 6c..6c+8, on noise
    for split, n in (("train", 300), ("test", 60)):
        labels = np.arange(n) % 3
        row = np.arange(28)[None, :, None] - 6 * labels[:, None, None]  # the row's offset into its class's band
        images = (rng.integers(0, 60, (n, 28, 28)) + 150 * ((row >= 0) & (row < 8))).astype(np.uint8)
        write_idx(tmp_path / "fm", split, images, labels)
    save_tiny_vq(tmp_path / "vq.pt")
    codes, held = (write_code_dataset(tmp_path / name, grid=8, seed=seed, dataset="fashion-mnist",
                                      data_path=str(tmp_path / "fm")) for name, seed in (("c", 0), ("h", 1)))
    common = f"--max-steps 4 --ckpt-every 4 --vq-ckpt {tmp_path / 'vq.pt'} --ema --ema-decay 0.5 --foresight explicit"
    plain = run_train(tmp_path, codes, common, "--foresight-warmup 1", name="plain")
    scored = run_train(tmp_path, codes, common, "--foresight-warmup 1 --eval-every 2 --eval-samples 12 --eval-weights "
                       f"both --eval-reference fashion-mnist-test --eval-codes {held}", name="scored")
    rows = [r for r in metrics(scored) if "eval_fd_classifier" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for r, prefix in ((r, prefix) for r in rows for prefix in ("eval_", "eval_raw_")):
        assert math.isfinite(r[prefix + "fd_classifier"]) and r[prefix + "fd_classifier"] >= 0
        assert 0 <= r[prefix + "class_agreement"] <= 1 and 1.0 < r[prefix + "heldout_loss"] < 10
    log = (scored / "log.txt").read_text()
    assert "no FID (offline)" in log and "classifier's FD and class agreement (its test accuracy" in log
    assert_same_weights(state(plain, 4), state(scored, 4))  # scoring draws from its own generator: the same run


def test_compare_tabulates_seeds_and_draws_the_curve(tmp_path, capsys):
    import compare
    for variant, base, seed in ((v, b, s) for v, b in (("none", 30.0), ("implicit", 20.0)) for s in range(3)):
        run = tmp_path / f"{variant}-{seed}"
        (run / "samples").mkdir(parents=True)
        (run / "checkpoints").mkdir()
        rows = [r for s in (1, 2) for r in [
            {"step": s, "loss": 2.0}, {"step": s, "eval_class_agreement": 0.5, "eval_fd_classifier": base / s + seed}]]
        rows.append({"step": 2, "eval_class_agreement": 0.6, "posthoc": "recomputed"})  # a later row wins; notes skip
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        torch.save({"args": {"foresight": variant, "seed": seed, "foresight_coef": [2.0]}}, last_ckpt(run))
        Image.new("RGB", (20, 10), (200, 0, 0)).save(run / "samples" / "0000002.png")
    compare.main([str(p) for p in sorted(tmp_path.iterdir())] + ["--out", str(tmp_path / "c.png"), "--paired", "none"])
    out = capsys.readouterr().out
    for row in ("| implicit | 2 | -5.000 ± 0.000 (n=3) | +0.000 ± 0.000 (n=3) |",  # 10 + seed against 15 + seed
                "| variant | step | fd_classifier | class_agreement |", "| implicit | 1 | 21.000 ± 1.000 (n=3)",
                "| none | 2 | 16.000 ± 1.000 (n=3) | 0.600 ± 0.000 (n=3) |",
                "| none | 1 | 31.000 ± 1.000 (n=3) | 0.500"):
        assert row in out, row
    assert "posthoc" not in out
    figure = np.asarray(Image.open(tmp_path / "c.png")).astype(int)
    assert figure.shape[1] > 520 + 2 * 20 and (figure[..., 0] > 150).any()
    assert (np.ptp(figure[:, :520], axis=-1) > 100).sum() > 200  # the curves: coloured lines left of the grids
    runs = [str(p) for p in sorted(tmp_path.iterdir()) if p.is_dir()]
    compare.main(runs + ["--metric", "class_agreement", "--out", str(tmp_path / "a.png")])
    assert "wrote" in capsys.readouterr().out  # a column of the tables names the figure's metric
    runs = [str(tmp_path / f"{v}-{s}") for v in ("none", "implicit") for s in range(3)]
    groups = compare.group_runs(runs, ["foresight", "foresight_coef"])
    assert sorted(groups) == ["implicit foresight_coef=[2.0]", "none"]
    (tmp_path / "none-0" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")  # no evaluation
    for argv, match in (
            ([tmp_path / "implicit-0", "--paired", "baseline"], "--paired baseline is none of the variants"),
            ([tmp_path / "implicit-0", "--metric", "fid"], r"--metric fid is none of .*\(class_agreement, fd_c"),
            ([tmp_path / "none-0"], "none of the runs has evaluation rows"),
            ([tmp_path / "nowhere" / "gpt-*"], r"nowhere/gpt-\* is not a run folder \(no metrics.jsonl\)")):
        raises(SystemExit, match, compare.main, [str(a) for a in argv])


# ==== data.py ===========================================================================================

def write_cifar(root):
    """cifar-10-python.tar.gz in the official layout, two images a batch; returns (tarball, {batch: (data, labels)})."""
    rng, folder, batches = np.random.default_rng(0), root / data.CIFAR_DIR, {}
    folder.mkdir()
    for name in data.CIFAR_BATCHES["train"] + data.CIFAR_BATCHES["test"]:
        d, labels = batches[name] = rng.integers(0, 256, (2, 3072), dtype=np.uint8), rng.integers(0, 10, 2).tolist()
        batch = {"batch_label": name, "labels": labels, "data": d, "filenames": ["0.png", "1.png"]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    with tarfile.open(root / data.CIFAR_FILE, "w:gz") as tar:
        tar.add(folder, arcname=data.CIFAR_DIR)
    return str(root / data.CIFAR_FILE), batches


def write_idx(folder, split, images, labels, image_magic=2051):
    os.makedirs(folder, exist_ok=True)
    img_file, lbl_file = (Path(folder) / name for name in data.IDX_FILES[split])
    img_file.write_bytes(gzip.compress(struct.pack(">iiii", image_magic, *images.shape) + images.tobytes()))
    lbl_file.write_bytes(gzip.compress(struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes()))


def test_cifar_loads_pixels_and_labels_download_checks_md5_restarts_stale_parts_reports_offline(tmp_path, monkeypatch):
    tarball, batches = write_cifar(tmp_path)
    for path in (str(tmp_path), tarball, os.path.join(str(tmp_path), data.CIFAR_DIR)):
        train = data.open_dataset("cifar10", path)
        assert len(train) == 10 and train.num_classes == 10 and train.name == "cifar10"
        for i in range(10):  # every image, in batch order: image 5 is the second of the third batch
            d, labels = batches[data.CIFAR_BATCHES["train"][i // 2]]
            img = train.image(i)
            assert img.mode == "RGB" and img.size == (32, 32) and train.label(i) == labels[i % 2]
            assert np.array_equal(np.asarray(img), d[i % 2].reshape(3, 32, 32).transpose(1, 2, 0))
    test = data.open_dataset("cifar10-test", str(tmp_path))
    d, labels = batches["test_batch"]
    assert len(test) == 2 and [test.label(0), test.label(1)] == labels
    assert np.array_equal(np.asarray(test.image(1))[:, :, 2], d[1, 2048:].reshape(32, 32))
    # the download: a corrupted one (MD5 mismatch) is deleted, never kept as the dataset
    monkeypatch.setattr(data, "CIFAR_URL", "file://" + tarball)
    monkeypatch.setattr(data, "CIFAR_MD5", "0" * 32)
    raises(ValueError, "MD5", data.open_dataset, "cifar10", str(tmp_path / "dl"))
    assert os.listdir(tmp_path / "dl") == []
    monkeypatch.setattr(data, "CIFAR_MD5", hashlib.md5(open(tarball, "rb").read()).hexdigest())
    ds = data.open_dataset("cifar10-test", str(tmp_path / "dl"))  # the right MD5: downloaded, renamed from .part
    assert sorted(os.listdir(tmp_path / "dl")) == [data.CIFAR_FILE] and ds.label(0) == labels[0]
    (tmp_path / "src.bin").write_bytes(b"abc")
    assert data.file_md5(str(tmp_path / "src.bin")) == "900150983cd24fb0d6963f7d28e17f72"
    dest = str(tmp_path / "dest.bin")
    Path(dest + ".part").write_bytes(b"junk that is not a prefix")  # file:// cannot resume: it is rewritten
    data.download_file("file://" + str(tmp_path / "src.bin"), dest, "900150983cd24fb0d6963f7d28e17f72")
    assert open(dest, "rb").read() == b"abc" and not os.path.exists(dest + ".part")
    msg = raises(FileNotFoundError, "by hand", data.download_file, "file://" + str(tmp_path / "nowhere.tar.gz"),
                 str(tmp_path / "x"))
    assert "\n" not in msg and not os.path.exists(tmp_path / "x")


def test_idx_files_load_bad_headers_are_refused_and_missing_datasets_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DATASETS", str(tmp_path / "system"))  # not the machine's /usr/share/datasets
    images, labels = np.random.default_rng(2).integers(0, 256, (5, 28, 28), dtype=np.uint8), np.array([3, 1, 4, 1, 5])
    write_idx(str(tmp_path / "fashion-mnist"), "test", images, labels)
    ds = data.open_dataset("fashion-mnist-test", str(tmp_path))  # found in data_path/<name>/
    assert len(ds) == 5 and ds.num_classes == 10 and [ds.label(i) for i in range(5)] == labels.tolist()
    img = ds.image(2)
    assert img.mode == "RGB" and img.size == (28, 28)
    assert all(np.array_equal(np.asarray(img)[:, :, c], images[2]) for c in range(3))
    write_idx(str(tmp_path / "bad"), "train", images, labels, image_magic=2049)
    raises(ValueError, "magic number 2049, expected 2051", data.open_dataset, "mnist", str(tmp_path / "bad"))
    labels_file = tmp_path / "fashion-mnist" / data.IDX_FILES["test"][1]
    labels_file.write_bytes(gzip.compress(struct.pack(">ii", 2049, 5) + bytes(3)))  # the header says 5, the body has 3
    raises(ValueError, "truncated", data.open_dataset, "fashion-mnist", str(tmp_path), split="test")
    for name, hint in [("cifar10", "cifar-10-python.tar.gz"), ("mnist", "t10k-images-idx3-ubyte.gz"),
                       ("fashion-mnist", "fashion-mnist")]:
        msg = raises(FileNotFoundError, "not found", data.open_dataset, name + "-test", str(tmp_path / "empty"),
                     download=False)
        assert hint in msg and "\n" not in msg
    raises(FileNotFoundError, "--data-path", data.open_dataset, "folder", None)
    raises(FileNotFoundError, "no class sub-folders", data.open_dataset, "folder", str(tmp_path / "bad"))
    raises(ValueError, "known: cifar10, mnist", data.open_dataset, "svhn")
    r = subprocess.run([sys.executable, "data.py", "mnist", "--data-path", str(tmp_path / "e"), "--no-download"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode != 0 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_copy():
    ds = data.open_dataset("fashion-mnist-test", None, download=False)
    assert len(ds) == 10000 and ds.image(0).size == (28, 28)
    assert sorted(set(ds.labels.tolist())) == list(range(10))


def test_image_folder_views_and_code_dataset_read_their_files_and_remake_the_crop_from_matching_images(tmp_path):
    make_image_folder(tmp_path / "train", per_class=2, sizes=((40, 30), (25, 50), (64, 64), (33, 33)))
    files = sorted((tmp_path / "train").glob("*/*.png"))
    for path in (tmp_path, tmp_path / "train"):  # root with train/, or the folder itself
        ds = data.open_dataset("folder", str(path))
        assert ds.classes == ["class0", "class1"] and len(ds) == 4 and ds.num_classes == 2
        for i, p in enumerate(files):
            assert ds.label(i) == int(p.parent.name[-1])
            assert np.array_equal(np.asarray(ds.image(i)), np.asarray(Image.open(p).convert("RGB")))
    assert ds.image(3).size == (33, 33)
    all_views = data.ViewDataset(ds, 16, "flip")  # its views as a dataset
    x, label, i, v = all_views[3]
    assert len(all_views) == 8 and (i, v, label) == (1, 1, ds.label(1)) and x.dtype == torch.float32
    assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1
    want = torch.from_numpy(data.make_view(ds.image(1), 16, "flip", 1)).permute(2, 0, 1)
    assert torch.allclose((x + 1) * 127.5, want.float(), atol=1e-4)
    crops = data.ViewDataset(ds, 16, "tencrop")
    assert len(crops) == 40 and [crops[k][2:] for k in (0, 9, 10, 39)] == [(0, 0), (0, 9), (1, 0), (3, 9)]
    codes = np.arange(4 * 2 * 4).reshape(4, 2, 4)  # every code distinct: (image, view) is read back exactly
    write_code_dataset(tmp_path / "codes", grid=2, vocab=100, classes=2, codes=codes, labels=[0, 0, 1, 1],
                       data_path=str(tmp_path / "train"))
    cds = data.CodeDataset(str(tmp_path / "codes"))
    c, label, view = cds[5]
    assert len(cds) == 8 and cds.meta["grid"] == [2, 2]
    assert c.dtype == torch.int64 and c.tolist() == codes[2, 1].tolist()
    assert label.item() == 1 and view.item() == 1 and label.dtype == torch.int64
    clone = pickle.loads(pickle.dumps(cds))  # as a spawned DataLoader worker gets it
    assert clone.codes is None and clone[5][0].tolist() == codes[2, 1].tolist()
    cds = data.CodeDataset(str(tmp_path / "codes"), with_images=True)
    for k in (6, 7):  # image 3, both views
        c, label, view, img = cds[k]
        assert view.item() == k - 6 and c.tolist() == codes[3, view.item()].tolist()
        assert img.dtype == torch.uint8 and img.shape == (3, 16, 16)
        assert np.array_equal(img.permute(1, 2, 0).numpy(), data.make_view(ds.image(3), 16, "flip", view.item()))
    make_image_folder(tmp_path / "other", classes=3, per_class=1)
    raises(ValueError, "do not match", data.CodeDataset, str(tmp_path / "codes"), with_images=True,
           data_path=str(tmp_path / "other"))
    # missing and broken files are named, with how to remake them
    raises(FileNotFoundError, "codes.npy, labels.npy, meta.json", data.CodeDataset, str(tmp_path))
    for k, (file, breaks, match) in enumerate([
        ("meta.json", lambda p: p.write_text('{"grid": [4, 4], "vocab_size": '),
         r"meta.json is not a valid .*tokenizer.py extract"),
        ("codes.npy", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
         r"codes.npy cannot be read .*truncated.*tokenizer.py extract"),
        ("codes.npy", lambda p: np.save(p, np.zeros((48, 2, 9), dtype=np.int16)), r"\(48, 2, 16\)"),
        ("labels.npy", lambda p: np.save(p, np.zeros(47, dtype=np.int64)),
         r"labels.npy holds int64 \(47,\), but meta.json says .* \(48,\)"),
    ]):
        root = write_code_dataset(tmp_path / str(k), n=48)
        breaks(root / file)
        raises(ValueError, match, data.CodeDataset, str(root))


def test_views_are_reproducible_and_well_formed_and_adm_crop_halves_with_box_and_pads_small_images():
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (41, 50, 3), dtype=np.uint8))
    for views, n in (("none", 1), ("flip", 2), ("tencrop", 10)):
        assert data.num_views(views) == n
        crops = [data.make_view(img, 32, views, v) for v in range(n)]
        for v, c in enumerate(crops):
            assert c.shape == (32, 32, 3) and c.dtype == np.uint8
            assert np.array_equal(c, data.make_view(img.copy(), 32, views, v))
        assert len({c.tobytes() for c in crops}) == n  # all distinct
    none = data.make_view(img, 32, "none", 0)
    assert np.array_equal(data.make_view(img, 32, "flip", 1), none[:, ::-1])
    assert np.array_equal(data.make_view(img, 32, "flip", 0), none)
    # ten-crop: the mirrored top-left is the mirror of the top-right (torchvision's order)
    assert np.array_equal(data.make_view(img, 32, "tencrop", 5), data.make_view(img, 32, "tencrop", 1)[:, ::-1])
    raises(ValueError, "views must be one of", data.make_view, img, 32, "fivecrop", 0)
    raises(ValueError, "out of range", data.make_view, img, 32, "flip", 2)
    # 64x80 -> BOX halving to 32x40 (2x2 means), no further resize, then the middle 32 rows
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (80, 64, 3), dtype=np.uint8))
    box = np.asarray(img).astype(np.float64).reshape(40, 2, 32, 2, 3).mean((1, 3))
    assert np.abs(data.make_view(img, 32, "none", 0).astype(np.float64) - box[4:36]).max() <= 1
    digit = Image.fromarray(np.random.default_rng(4).integers(1, 256, (28, 28), dtype=np.uint8))
    v = data.make_view(digit.convert("RGB"), 32, "none", 0)
    assert np.array_equal(v[2:30, 2:30, 0], np.asarray(digit)) and v[:2].max() == 0
    assert data.make_view(digit.convert("RGB"), 64, "none", 0).shape == (64, 64, 3)  # resized


# ==== tokenizer.py ======================================================================================

def test_vq_fixture_parity_load_vq_reads_llamagen_and_our_formats_and_vq16_preset_has_llamagen_keys(tmp_path):
    ref = torch.load(TESTDATA / "llamagen_vq_tiny.pt", weights_only=True)
    cfg, sd = V.VQConfig(**ref["config"]), ref["state_dict"]
    vq = V.VQModel(cfg).eval()
    M.load_state_dict_strict(vq, sd, "fixture")
    codes = vq.encode(ref["images"])
    assert codes.dtype == torch.long and torch.equal(codes, ref["codes"])
    with torch.no_grad():
        quant = vq.quantize(vq.quant_conv(vq.encoder(ref["images"])))[0]
    torch.testing.assert_close(quant, ref["quant"], atol=1e-4, rtol=0)
    # the (B, H, W) codes and the flat (B, N) form the GPT produces decode to the same images
    for codes in (ref["codes"], ref["codes"].flatten(1)):
        torch.testing.assert_close(vq.decode_code(codes), ref["decoded"], atol=1e-4, rtol=0)
    assert vq.encoder_features(ref["images"]).shape == (2, ref["config"]["z_channels"], 8, 8)
    assert vq.grid_size(32) == 8
    raises(ValueError, "multiple of", vq.grid_size, 30)
    broken = {**{k: v for k, v in sd.items() if k != "encoder.conv_in.bias"}, "extra.weight": torch.zeros(1)}
    save_files(tmp_path, {"llamagen.pt": {"model": sd}, "bare.pt": sd, "broken.pt": {"model": broken},
                          "ours.pt": {"model": sd, "config": asdict(cfg), "steps": 3}})
    for path, preset in (("llamagen.pt", cfg), ("bare.pt", cfg), ("ours.pt", None)):
        loaded = V.load_vq(str(tmp_path / path), preset=preset)
        assert not loaded.training and torch.equal(loaded.encode(ref["images"]), ref["codes"])
    for path, preset, error, match in (
            ("llamagen.pt", None, ValueError, "stores no config"),
            ("llamagen.pt", "VQ-S", ValueError, r"shape mismatches.*quant_conv.weight \(8, 32, 1, 1\) vs model "
                                                r"\(8, 64, 1, 1\)"),
            ("broken.pt", cfg, ValueError, r"missing keys: encoder.conv_in.bias; unexpected keys: extra.weight"),
            ("nope.pt", None, FileNotFoundError, "does not exist")):
        raises(error, match, V.load_vq, str(tmp_path / path), preset=preset)
    with torch.device("meta"):  # no memory, no init cost
        vq = V.VQModel(V.get_config("VQ-16"))
        assert V.VQModel(V.get_config("VQ-8")).grid_size(256) == 32
        assert V.VQModel(V.get_config("VQ-S")).grid_size(32) == 8
    assert {k: tuple(v.shape) for k, v in vq.state_dict().items()} == read_shapes("llamagen_vq16_state_dict.txt")
    assert vq.grid_size(256) == 16


def vq_train(folder, out, flags):
    """`tokenizer.py train` of TINY_VQ (the test registers it as preset VQ-T) on 16 px images."""
    return T.main(f"train --dataset folder --data-path {folder} --image-size 16 --vq-model VQ-T --results-dir {out} "
                  f"{flags}".split())


def test_tokenizer_training_reduces_the_loss_resumes_bit_identically_and_reports_rfid(tmp_path, monkeypatch):
    monkeypatch.setitem(V.VQ_PRESETS, "VQ-T", TINY_VQ)
    folder, out = make_image_folder(tmp_path / "images"), tmp_path / "run"
    flags = ("--global-batch-size 8 --lr 2e-3 --log-every 10 --sample-every 60 --ckpt-every 30 --disc-start 50 "
             "--disc-weight 0.05 --grid-images 4 --l1-weight 0.1 --steps")
    last = vq_train(folder, out, flags + " 60")
    rows = metrics(out)
    before_gan = rows[4]
    assert Path(last) == out / "checkpoints" / "0000060.pt" and [m["step"] for m in rows] == [10, 20, 30, 40, 50, 60]
    assert before_gan["rec"] < 0.5 * rows[0]["rec"] and before_gan["psnr"] > rows[0]["psnr"] + 3
    assert "d_loss" in rows[-1] and "d_loss" not in before_gan  # the GAN switched on at step 50
    assert rows[-1]["rec"] < rows[0]["rec"] and 0 < rows[-1]["usage"] <= 1
    assert (out / "samples" / "recon_0000060.png").is_file() and V.load_vq(last).config == TINY_VQ
    raises(SystemExit, "already holds checkpoints; pass --resume auto", vq_train, folder, out, flags + " 65")
    last = vq_train(folder, out, flags + " 65 --resume auto")
    assert Path(last) == out / "checkpoints" / "0000065.pt" and "resuming from" in (out / "log.txt").read_text()
    assert metrics(out)[-1]["step"] == 65 and torch.load(last, weights_only=True)["steps"] == 65
    # an interrupted run resumed is bit-identical to the uninterrupted one
    folder = make_image_folder(tmp_path / "images10", per_class=10)
    flags = "--global-batch-size 4 --views flip --disc-start -1 --rfid-images 0 --log-every 2 --ckpt-every 3 --steps"
    full = vq_train(folder, tmp_path / "full", flags + " 8")
    vq_train(folder, tmp_path / "half", flags + " 3")  # "killed" after step 3, mid-epoch
    half = vq_train(folder, tmp_path / "half", flags + " 8 --resume auto")
    a, b = (torch.load(p, weights_only=True)["model"] for p in (full, half))
    assert all(torch.equal(a[k], b[k]) for k in a)
    folder = make_image_folder(tmp_path / "images4", per_class=4)
    flags = "--global-batch-size 4 --steps 2 --log-every 2 --ckpt-every 2 --disc-start -1 --rfid-images 6"
    vq_train(folder, tmp_path / "without", flags)  # no weights here: one notice, training goes on
    assert "rFID skipped: FID Inception weights not found" in (tmp_path / "without" / "log.txt").read_text()
    random_inception(monkeypatch)
    vq_train(folder, tmp_path / "with", flags)
    rows = metrics(tmp_path / "with")
    assert [r["step"] for r in rows if "rfid" in r] == [2] and math.isfinite(rows[-1]["rfid"]) and rows[-1]["rfid"] >= 0


def extract_argv(folder, codes, vq, extra=""):
    return (f"extract --dataset folder --data-path {folder} --image-size 16 --code-path {codes} --vq-ckpt {vq} "
            f"{extra}").split()


def test_extract_writes_what_code_dataset_reads_and_a_bad_checkpoint_or_image_ends_in_one_sentence(tmp_path, capsys):
    folder, out = make_image_folder(tmp_path / "images", per_class=5), tmp_path / "codes"
    vq = save_tiny_vq(tmp_path / "vq.pt")
    argv = extract_argv(folder, out, tmp_path / "vq.pt", "--views flip --batch-size 3")
    T.main(argv)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["grid"], meta["vocab_size"], meta["num_views"], meta["num_images"], meta["num_classes"],
            meta["views"]) == ([8, 8], 32, 2, 10, 2, "flip")
    assert V.VQConfig(**meta["tokenizer_config"]) == TINY_VQ
    assert np.load(out / "codes.npy", mmap_mode="r").dtype == np.int16
    ds = data.CodeDataset(str(out), with_images=True)
    assert len(ds) == 20
    for k in range(len(ds)):
        codes, label, view, image = ds[k]
        assert torch.equal(codes, vq.encode(image.float().unsqueeze(0) / 127.5 - 1.0).flatten())
        assert label.item() == k // 2 // 5 and view.item() == k % 2  # classes are sorted, 5 images each
    assert not torch.equal(ds[0][0], ds[1][0])  # a flipped crop gives other codes than the plain one
    raises(SystemExit, "already holds codes.npy; pass --overwrite", T.main, argv)
    before = (out / "meta.json").stat().st_mtime_ns
    T.main(argv + ["--overwrite", "--views", "none"])
    assert json.loads((out / "meta.json").read_text())["num_views"] == 1
    assert (out / "meta.json").stat().st_mtime_ns >= before
    assert np.load(out / "codes.npy", mmap_mode="r").shape == (10, 1, 64)
    # a wrong checkpoint or an unreadable image ends with one sentence and no codes
    folder, codes = make_image_folder(tmp_path / "images3", per_class=3), tmp_path / "codes3"
    save_files(tmp_path, {"notes.txt": b"not a checkpoint", "bare.pt": {"model": V.VQModel(TINY_VQ).state_dict()},
                          "gpt.pt": {"model": {"tok_embeddings.weight": torch.zeros(4, 4)}, "config": {"n_layer": 2}}})
    for name, extra, message in [("notes.txt", "", "not a readable PyTorch checkpoint"),
                                 ("gpt.pt", "", "not a VQ tokenizer's"), ("bare.pt", "", "stores no config"),
                                 ("bare.pt", "--vq-model VQ-S", "does not fit the model"),
                                 ("missing.pt", "", "does not exist")]:
        refused(capsys, T.main, extract_argv(folder, codes, tmp_path / name, extra), "^error: --vq-ckpt.*" + message)
    assert not codes.exists()  # nothing was written
    train = f"train --dataset folder --data-path {folder} --image-size 16 --results-dir "
    refused(capsys, T.main, f"{train}{tmp_path / 'run'} --resume {tmp_path / 'bare.pt'}".split(),
            "is not a checkpoint of `tokenizer.py train`")
    png = folder / "class1" / "1.png"
    png.write_bytes(png.read_bytes()[:60])
    refused(capsys, T.main, extract_argv(folder, codes, tmp_path / "vq.pt", "--batch-size 2"),
            r"cannot read the image .*1\.png")
    assert not (codes / "codes.npy").exists() and not (codes / "meta.json").exists()
    refused(capsys, T.main, f"{train}{tmp_path / 'vq'} --global-batch-size 2 --steps 4 --num-workers 1".split(),
            r"^error: .*cannot read the image .*1\.png")


# ==== sample.py =========================================================================================

def read_png(path):
    with Image.open(path) as im:
        return np.asarray(im)


def fid_samples(folder):
    with np.load(folder / "samples.npz") as z:
        return z["arr_0"], z["labels"]


def test_sample_grid_png_fid_npz_resume_sharding_refusals_and_llamagen_checkpoints(tmp_path, monkeypatch, capsys):
    save_tiny_vq(tmp_path / "vq.pt", config=SAMPLE_VQ)
    vq, gpt = str(tmp_path / "vq.pt"), save_gpt(tmp_path / "gpt.pt", str(tmp_path / "vq.pt"))
    # a grid PNG: reproducible, compiled or not (dynamo's trace, eager backend), the tokenizer the checkpoint
    # recorded by default, the given classes' samples
    trace_compile(monkeypatch)
    for n, extra in (("a", f"--vq-ckpt {vq}"), ("b", "--compile"), ("c", "--seed 1")):
        S.main(cli(f"--gpt-ckpt {gpt} --num-samples 5 --nrow 3 --batch-size 2 --ema --out {tmp_path}/{n}.png", extra))
    a, b, c = (read_png(tmp_path / f"{n}.png") for n in "abc")
    # 2 rows x 3 columns of 8x8 images with 2 px gaps around each
    assert a.shape == (2 + 2 * 10, 2 + 3 * 10, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a[2:10, 2:10].std() > 0 and np.all(a[:2] == 0)  # a picture inside, black padding around
    S.main(cli(f"--gpt-ckpt {gpt} --num-samples 3 --nrow 3 --batch-size 3 --classes 4,0,2 --cfg-scale 1.5 --top-k 8",
               "--out", tmp_path / "g.png"))
    images = V.sample_images(M.load_gpt(gpt), V.load_vq(vq), [4, 0, 2], cfg_scale=1.5, top_k=8,
                             generator=S.chunk_generator(0, 0, torch.device("cpu")))
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    grid = read_png(tmp_path / "g.png")
    assert all(np.array_equal(grid[2:10, 2 + 10 * i:10 + 10 * i], images[i]) for i in range(3))

    def fid_args(folder, *extra):  # FID samples: an ADM .npz and PNGs
        return cli(f"--gpt-ckpt {gpt} --vq-ckpt {vq} --num-fid-samples 7 --batch-size 3 --sample-dir", folder, *extra)
    d = tmp_path / "fid"
    S.main(fid_args(d))
    arr, labels = fid_samples(d)
    assert arr.shape == (7, 8, 8, 3) and arr.dtype == np.uint8 and labels.tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert sorted(p.name for p in d.glob("*.png")) == [f"{i:06d}.png" for i in range(7)]
    assert np.array_equal(read_png(d / "000005.png"), arr[5])
    (d / "000001.png").unlink()  # resumption: deleted PNGs come back identical, the others are left alone
    (d / "000006.png").unlink()
    (d / "samples.npz").rename(tmp_path / "first.npz")
    kept = (d / "000003.png").stat().st_mtime_ns
    S.main(fid_args(d))
    assert np.array_equal(fid_samples(d)[0], arr) and (d / "000003.png").stat().st_mtime_ns == kept
    # two ranks (threads meeting at a real barrier) make the same images as one process
    meet, cpu = threading.Barrier(2, timeout=60), torch.device("cpu")
    with monkeypatch.context() as patch, ThreadPoolExecutor(2) as ranks:
        patch.setattr(S, "barrier", lambda world: meet.wait())
        args = S.build_parser().parse_args(fid_args(tmp_path / "fid2"))
        S.check_args(args)
        models = S.load_models(args, cpu)
        list(ranks.map(lambda rank: S.make_fid_samples(args, *models, rank, 2, cpu), (0, 1)))
    assert np.array_equal(fid_samples(tmp_path / "fid2")[0], arr)
    # other settings in the same folder are refused; with --overwrite every old PNG is made again
    (d / "samples.npz").unlink()
    raises(SystemExit, "seed: 0 there, 3 now", S.main, fid_args(d, "--seed 3"))
    S.main(fid_args(d, "--seed 3 --overwrite"))
    S.main(fid_args(tmp_path / "fid3", "--seed 3"))
    again = fid_samples(d)[0]
    assert np.array_equal(again, fid_samples(tmp_path / "fid3")[0]) and not np.array_equal(again, arr)
    raises(SystemExit, "already exists; pass --overwrite", S.main, fid_args(d, "--seed 3"))
    big_vocab = save_gpt(tmp_path / "v32.pt", vq, vocab_size=32)  # mismatches and existing outputs: one sentence
    moved = save_gpt(tmp_path / "moved.pt", str(tmp_path / "gone" / "vq.pt"))
    (tmp_path / "foreign").mkdir()
    save_files(tmp_path, {"mine.png": b"user data", "foreign/000000.png": b"not ours"})
    x = cli("--out", tmp_path / "x.png")
    for argv, match in [
        (cli("--gpt-ckpt", big_vocab, *x), r"vocabulary has 32 tokens but the tokenizer's codebook has 16"),
        (cli("--gpt-ckpt", gpt, "--image-size 16", *x),
         r"--image-size 16 makes a 8x8 token grid .* GPT's grid is 4x4 \(image size 8"),
        (cli("--gpt-ckpt", gpt, "--out", tmp_path / "mine.png"), "already exists; pass --overwrite"),
        (fid_args(tmp_path / "foreign"), "PNGs this script did not make"),
        (cli("--gpt-ckpt", moved, *x), "trained with the tokenizer .*gone.* give its path with --vq-ckpt"),
    ]:
        refused(capsys, S.main, argv, match)
    assert (tmp_path / "mine.png").read_bytes() == b"user data" and not (tmp_path / "x.png").exists()
    assert (tmp_path / "foreign" / "000000.png").read_bytes() == b"not ours"
    r = subprocess.run([sys.executable, "sample.py", "--gpt-ckpt", big_vocab, *x], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "32" in r.stderr and "16" in r.stderr
    ll = save_gpt(tmp_path / "c2i_T_8.pt", llamagen=True)  # a LlamaGen checkpoint needs and takes --gpt-model
    base = cli(f"--gpt-ckpt {ll} --vq-ckpt {vq} --num-samples 2 --out {tmp_path}/l.png")
    raises(SystemExit, "give --gpt-model", S.main, base)
    S.main(base + cli("--gpt-model GPT-T --image-size 8"))
    assert read_png(tmp_path / "l.png").shape == (2 + 10, 2 + 2 * 10, 3)  # one row of two
    raises(SystemExit, "does not record which tokenizer", S.main,
           cli(f"--gpt-ckpt {ll} --gpt-model GPT-T --image-size 8 --out {tmp_path}/m.png"))


# ==== fid.py ============================================================================================

def fill_by_recipe(model, seed=2015, he=False):
    """The fixtures' fill_recipe, one generator walking the state_dict in order: he=False gives the random fixture's
    network, he=True testdata/fid_inception_oracle.pt's, whose output depends on the input (the first barely)."""
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for name, t in state.items():
        if not name.endswith("num_batches_tracked"):
            r = torch.randn(t.shape, generator=g)
            state[name] = (1 + 0.1 * r.abs() if name.endswith("running_var") else
                           r * ((2.0 if he else 1.0) / t[0].numel()) ** 0.5 if t.dim() > 1 else  # conv / linear
                           1 + 0.1 * r if he and name.endswith("bn.weight") else 0.1 * r)
    model.load_state_dict(state, strict=True)
    return model


def test_fid_inception_matches_pytorch_fid_and_serves_cli_evaluate_and_cached_references(tmp_path, capsys, monkeypatch):
    weights = str(tmp_path / fid.WEIGHTS_NAME)
    torch.save(fill_by_recipe(fid.FIDInceptionV3()).state_dict(), weights)
    model = fid.load_inception(weights)
    # the random fixture, and the oracle made with pytorch-fid 0.3.0 (its made_by, fill_recipe) on weights that let
    # it see what the first cannot: pooling kinds, resize corners, input scaling
    ref, oracle = (torch.load(TESTDATA / f"fid_inception_{k}.pt", weights_only=True) for k in ("random", "oracle"))
    keys = [(k, tuple(v.shape)) for k, v in fid.FIDInceptionV3().state_dict().items()]
    assert keys == [(k, tuple(s)) for k, s in ref["state_dict_keys"]]
    he = fill_by_recipe(fid.FIDInceptionV3(), seed=oracle["seed"], he=True).eval()
    he = he.to(memory_format=torch.channels_last).fold_batchnorm()
    # float [0, 1] NCHW and uint8 NHWC input through the whole extraction path (channels_last, folded batch norm)
    for net, images, fixture, batch in ((model, ref["images"], ref, 3),
                                        (he, oracle["images_uint8_nhwc"].numpy(), oracle, 4)):
        pool3, logits = fid.extract(net, images, batch_size=batch, progress=False)
        ref_pool3, ref_logits = fixture["pool3"].numpy(), fixture["logits"].numpy()
        assert np.abs(pool3 - ref_pool3).max() <= 1e-4 * np.abs(ref_pool3).max()
        # extract gives the IS logits (no bias); the fixtures hold fc(pool3) with it
        with_bias = logits + net.fc.bias.detach().numpy()
        assert np.abs(with_bias - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max()
        assert np.abs(logits - ref_logits).max() > 1e-3  # the bias really was left out
    # the oracle's network unfolded: the plain batch-norm path agrees with the folded one
    he.load_state_dict(he.state_dict())
    assert he.Mixed_7c.branch_pool.folded_weight is None
    plain, _ = fid.extract(he, oracle["images_uint8_nhwc"][3:].numpy(), progress=False)
    assert np.abs(plain - pool3[3:]).max() <= 1e-5 * np.abs(ref_pool3).max()
    raises(ValueError, r"\[0, 1\]", fid.extract, model, ref["images"] * 2 - 1, progress=False)
    reference = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)  # the CLI
    samples = str(make_image_folder(tmp_path / "samples", classes=1, per_class=4))
    np.savez(tmp_path / "ref.npz", arr_0=reference)
    stats_path = tmp_path / "samples_stats.npz"
    fid.main([samples, str(tmp_path / "ref.npz"), "--inception-weights", weights, "--batch-size", "3",
              "--device", "cpu", "--save-stats", str(stats_path), "--json"])
    got = json.loads(capsys.readouterr().out)
    assert got["fid"] > 0 and got["is"] >= 1.0 - 1e-9 and (got["num_samples"], got["num_reference"]) == (4, 5)
    assert 0 <= got["precision"] <= 1 and 0 <= got["recall"] <= 1
    saved = np.load(stats_path)
    assert saved["mu"].dtype == np.float64 and saved["sigma"].shape == (2048, 2048)
    assert saved["pool3"].shape == (4, 2048)
    # the Python API with the roles swapped: FID is symmetric, precision and recall trade places
    swapped = fid.evaluate(reference, str(stats_path), model=model, batch_size=4)
    assert swapped["fid"] == pytest.approx(got["fid"], rel=1e-6)
    assert (swapped["precision"], swapped["recall"]) == (got["recall"], got["precision"])
    # statistics alone: FID without the network (its weights file is absent); no precision or recall
    np.savez(tmp_path / "a.npz", mu=np.zeros(8), sigma=np.eye(8), pool3=np.zeros((5, 8), np.float32))
    np.savez(tmp_path / "b.npz", mu=np.ones(8), sigma=np.eye(8))
    fid.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--inception-weights", str(tmp_path / "absent.pth")])
    table = capsys.readouterr().out
    assert "n/a" in table.split("precision")[1] and "n/a" in table.split("recall")[1]
    assert float([line for line in table.splitlines() if line.startswith("FID")][0].split()[1]) == pytest.approx(8.0)
    fid.main([str(tmp_path / "b.npz"), "--save-stats", str(tmp_path / "b_again.npz")])
    assert np.array_equal(np.load(tmp_path / "b_again.npz")["mu"], np.ones(8))
    np.savez(tmp_path / "float.npz", arr_0=reference.astype(np.float32))
    for argv, match in (([samples, "--save-stats", str(stats_path)], "already exists"),
                        ([str(tmp_path / "missing.npz"), str(stats_path)], "does not exist"),
                        ([str(tmp_path / "float.npz"), str(stats_path), "--inception-weights", weights],
                         "arr_0 must hold uint8")):
        refused(capsys, fid.main, argv, match)
    # a dataset as the reference: its statistics are computed once, then read from the cache
    with monkeypatch.context() as patch:
        patch.setattr(fid.data, "open_dataset", lambda name, data_path=None, **kw:
                      data.ArraySource("toy", reference, np.zeros(5), ["x"]))
        patch.setenv("XDG_CACHE_HOME", str(tmp_path))
        first = fid.load_side("toy-train", lambda: model, batch_size=4, image_size=12)
        assert os.path.isfile(os.path.join(fid.cache_dir(), "toy-train-12px.npz")) and first.num_images == 5
        again = fid.load_side("toy-train", lambda: pytest.fail("the cached statistics should have been used"),
                              image_size=12)
    assert np.allclose(again.mu, first.mu) and np.allclose(again.pool3, first.pool3)
    assert again.inception_score == pytest.approx(first.inception_score)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all" * 10)  # weights errors are one sentence
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "small.pth")
    whole = (tmp_path / "small.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(whole[: len(whole) // 2])
    for name, error, match in (("garbage", ValueError, "corrupt"), ("truncated", ValueError, "truncated"),
                               ("small", ValueError, "does not fit the model: missing keys"),
                               ("nowhere", FileNotFoundError, "does not exist")):
        raises(error, match, fid.load_inception, str(tmp_path / f"{name}.pth"))
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    refused(capsys, fid.main, [str(tmp_path / "s.npz")] * 2 + ["--inception-weights", str(tmp_path / "truncated.pth")],
            "truncated")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    msg = raises(FileNotFoundError, None, fid.load_inception, download=False)
    assert fid.WEIGHTS_URL in msg and os.path.join(str(tmp_path / "hub"), "checkpoints") in msg


def numpy_sqrtm_fid(mu1, s1, mu2, s2):  # the usual formula: tr sqrtm(S1 S2) = sum of roots of S1 S2's eigenvalues
    eig = np.linalg.eigvals(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum())


def random_cov(rng, d, eigenvalues):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * eigenvalues) @ q.T


def test_frechet_distance_matches_numpy_sqrtm_even_degenerate_is_zero_on_itself_grows_with_a_shift_and_refuses(
        tmp_path, capsys, monkeypatch):
    for seed, case in enumerate(["well", "ill", "rank-deficient"]):
        rng, d = np.random.default_rng(seed), 48
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        if case == "well":
            s1, s2 = random_cov(rng, d, rng.uniform(0.5, 2, d)), random_cov(rng, d, rng.uniform(0.5, 2, d))
        elif case == "ill":
            s1, s2 = random_cov(rng, d, np.logspace(-9, 3, d)), random_cov(rng, d, np.logspace(-8, 2, d))
        else:  # covariances of fewer samples than dimensions, as FID of small sets
            s1 = np.cov(rng.standard_normal((20, d)), rowvar=False)
            s2 = np.cov(rng.standard_normal((30, d)) * 2, rowvar=False)
        ours, ref = fid.frechet_distance(mu1, s1, mu2, s2), numpy_sqrtm_fid(mu1, s1, mu2, s2)
        assert abs(ours - ref) <= 1e-6 * abs(ref), case
    x = np.random.default_rng(0).standard_normal((400, 16)).astype(np.float32)
    x *= np.linspace(0.1, 3, 16, dtype=np.float32)
    mu, sigma = fid.stats(x, chunk=64)
    x64 = x.astype(np.float64)
    assert np.allclose(mu, x64.mean(0)) and np.allclose(sigma, np.cov(x64, rowvar=False))
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    shift = np.full(16, 0.25)
    for k in (1, 4):  # the squared distance of the means
        assert fid.frechet_distance(mu, sigma, mu + k * shift, sigma) == pytest.approx(k * k * shift @ shift, rel=1e-6)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    nan_sigma, skew = sigma.copy(), sigma.copy()
    nan_sigma[2, 3] = np.nan
    skew[0, 1] += 1.0
    for bad_mu, bad_sigma, words in ((mu, nan_sigma, "NaN"), (mu, -np.eye(8), "negative eigenvalues"),
                                     (mu, skew, "not symmetric"), (mu * np.inf, sigma, "NaN or infinite"),
                                     (mu[:4], sigma[:4, :4], "do not match")):
        assert "\n" not in raises(ValueError, words, fid.frechet_distance, mu, sigma, bad_mu, bad_sigma)
    # round-off negatives of a real covariance (and a float32 copy of it) pass
    low_rank = np.cov(rng.standard_normal((5, 8)), rowvar=False)
    assert fid.frechet_distance(mu, sigma, mu, low_rank.astype(np.float32)) > 0
    # 2048-d statistics as MKL's eigh fails on them: exactly-zero rows and columns, low rank
    rng, d = np.random.default_rng(0), 2048
    sparse = np.zeros((64, d), np.float32)  # 64 samples, 50 non-zero feature columns
    sparse[:, rng.choice(d, 50, replace=False)] = rng.standard_normal((64, 50))
    rank3 = np.zeros((64, d), np.float32)  # rank 3 on 3 columns, the other rows exactly zero
    rank3[:, rng.choice(d, 3, replace=False)] = rng.standard_normal((64, 3)) * 3
    dense = rng.standard_normal((300, d)).astype(np.float32) * np.linspace(0.2, 1.5, d).astype(np.float32) + 0.1
    stats = {name: fid.stats(x) for name, x in (("sparse", sparse), ("rank3", rank3), ("dense", dense))}
    refs = {low: numpy_sqrtm_fid(*stats[low], *stats["dense"]) for low in ("sparse", "rank3")}
    for low, ref in refs.items():
        for first, second in ((low, "dense"), ("dense", low)):
            assert abs(fid.frechet_distance(*stats[first], *stats[second]) - ref) <= 1e-6 * abs(ref), (first, second)
        mu, sigma = stats[low]  # a set with itself
        assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) <= 1e-9 * np.trace(sigma)
    for name in ("sparse", "dense"):
        fid.Side(name, *stats[name], num_images=64).save(str(tmp_path / f"{name}.npz"))
    fid.main([str(tmp_path / "sparse.npz"), str(tmp_path / "dense.npz"), "--json",
              "--inception-weights", str(tmp_path / "absent.pth")])  # statistics alone need no network
    assert json.loads(capsys.readouterr().out)["fid"] == pytest.approx(refs["sparse"], rel=1e-6)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(d), sigma=-np.eye(d))
    refused(capsys, fid.main, [str(tmp_path / "bad.npz"), str(tmp_path / "dense.npz")], "not a covariance")
    for module in (torch.linalg, np.linalg):  # torch's LAPACK fails: numpy's takes over; both: eigvals(S1 S2)
        def eigh(*args, _error=module.LinAlgError, **kwargs):
            raise _error("failed to converge: too many repeated eigenvalues")
        monkeypatch.setattr(module, "eigh", eigh)
        assert fid.frechet_distance(*stats["dense"], *stats["sparse"]) == pytest.approx(refs["sparse"], rel=1e-6)


def test_inception_score_and_precision_recall_on_known_answers():
    assert fid.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0)
    confident, halves = np.zeros((100, 1008)), np.zeros((100, 1008))
    confident[np.arange(100), np.arange(100) % 10] = 50.0  # each split of 10 sees the 10 classes once
    assert fid.inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    # ten splits: a set whose halves each see one class only scores lower than the whole would
    halves[np.arange(100), (np.arange(100) >= 50).astype(int)] = 50.0
    assert fid.inception_score(halves) == pytest.approx(1.0, abs=1e-6)
    assert fid.inception_score(halves, splits=1) == pytest.approx(2.0, rel=1e-6)
    rng = np.random.default_rng(0)
    real = rng.standard_normal((60, 8)).astype(np.float32)
    assert fid.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert fid.precision_recall(real, real + 100) == (0.0, 0.0)
    fake = np.concatenate([real[:30], rng.standard_normal((30, 8)).astype(np.float32) + 100])
    precision, recall = fid.precision_recall(real, fake)
    assert precision == pytest.approx(0.5)
    assert fid.precision_recall(real, fake, block_size=7) == (precision, recall)  # blocks change nothing
    raises(ValueError, "more than 3", fid.precision_recall, real[:3], fake)


# ==== fid.py: the offline classifier metric =============================================================

def toy_source(rng, n):
    """n 28x28 gray pictures of two classes: class 0 bright at the top, class 1 at the bottom, on noise."""
    labels = rng.integers(0, 2, n)
    rows = np.arange(28)[None, :, None] // 14 == labels[:, None, None]
    x = rng.integers(0, 60, (n, 28, 28)) + rows * rng.integers(120, 190, (n, 1, 1))
    return data.ArraySource("toy", x.astype(np.uint8), labels, ["top", "bottom"])


def toy_views(source):
    return np.stack([data.make_view(source.image(i), 32, "none", 0) for i in range(len(source))])


def test_classifier_trains_deterministically_is_cached_and_scores_samples_and_floors(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)  # a dataset "toy" that data.open_dataset serves: train 256, test 128 images
    splits = {split: toy_source(rng, n) for split, n in (("train", 256), ("test", 128))}
    monkeypatch.setattr(data, "open_dataset", lambda name, data_path=None, split="train", download=True:
                        splits["test" if name.endswith("-test") else split])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(quality, "CLASSIFIER_EPOCHS", 2)
    monkeypatch.setattr(quality, "CLASSIFIER_BATCH", 32)
    net = quality.load_classifier("toy", progress=False)
    assert net.test_accuracy >= 0.95 and (net.dataset, net.image_size, net.num_test) == ("toy", 32, 128)
    assert not net.training and os.listdir(fid.cache_dir()) == ["toy-32px-classifier.pt"]  # no temporary file left
    twin = quality.train_classifier("toy", progress=False)  # the same seed, the same network
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in net.state_dict().items())
    # from here on (the CLI too) the cached classifier serves
    monkeypatch.setattr(quality, "train_classifier", lambda *a, **k: pytest.fail("the cached classifier was not used"))
    again = quality.load_classifier("toy-test", train_if_missing=False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())
    assert again.test_accuracy == net.test_accuracy and torch.equal(again.ref_sigma, net.ref_sigma)
    raises(FileNotFoundError, "quality.py toy --floors", quality.load_classifier, "toy", seed=1, train_if_missing=False)
    test, labels = toy_views(splits["test"]), splits["test"].labels
    score = functools.partial(quality.classifier_metrics, dataset="toy", classifier=net)
    itself = score(test, labels)
    assert abs(itself["fd_classifier"]) < 1e-6 and itself["class_agreement"] >= 0.95
    rng = np.random.default_rng(5)
    fresh_source = toy_source(rng, 128)
    fresh = toy_views(fresh_source)
    real = score(fresh, fresh_source.labels)
    noise = score(rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8), None)
    assert noise["fd_classifier"] > 10 * real["fd_classifier"] and noise["class_agreement"] is None
    shuffled = score(fresh, rng.permutation(fresh_source.labels))
    assert real["class_agreement"] >= 0.95 and 0.3 <= shuffled["class_agreement"] <= 0.7
    # one channel, or another size (resized with antialiasing), is the same picture to the classifier
    gray_features, gray_classes = quality.classify(net, fresh[..., :1])
    assert np.allclose(gray_features, quality.classify(net, fresh)[0], atol=1e-5)
    assert quality.classify(net, fresh.repeat(2, axis=1).repeat(2, axis=2))[1].tolist() == gray_classes.tolist()
    raises(ValueError, "128 images and 3 labels", score, fresh, [0, 1, 0])
    # the CLI: samples with their labels, then the floors (a random tokenizer's reconstructions are far off)
    np.savez(tmp_path / "samples.npz", arr_0=test, labels=labels)
    quality.main([str(tmp_path / "samples.npz"), "toy-test", "--json", "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    assert out["test_accuracy"] >= 0.95 and out["num_reference"] == 128
    assert abs(out["rows"][0]["fd_classifier"]) < 1e-6 and out["rows"][0]["class_agreement"] >= 0.95
    save_tiny_vq(tmp_path / "vq.pt")
    quality.main(["toy", "--floors", "--vq-ckpt", str(tmp_path / "vq.pt")])
    real_row, recon_row = capsys.readouterr().out.splitlines()[1:]
    assert real_row.startswith("real (256 training images)") and recon_row.startswith("recon (256 training images)")
    fd = [float(row.split("fd_classifier")[1].split()[0]) for row in (real_row, recon_row)]
    assert float(real_row.split("class_agreement")[1]) >= 0.95 and fd[1] > fd[0]
    refused(capsys, quality.main, [str(tmp_path / "vq.pt"), "toy"], "not an .npz of images")
    refused(capsys, quality.main, [str(tmp_path / "samples.npz")], "give the dataset whose classifier scores SAMPLES")


# ==== The same numbers: weights after a fixed tiny run of each variant, and a fixed sample batch, as
# random projections recorded from the code before the redesign (testdata/behaviour_signature.json).
# A change of the math or of any random stream moves them by percent; round-off between machines and
# thread counts, by far less than the tolerance.

SIGNATURE = TESTDATA / "behaviour_signature.json"


def projections(state, n=4):
    flat = torch.cat([state[k].double().flatten() for k in sorted(state)])
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, flat.numel(), generator=g, dtype=torch.float64) @ flat).tolist()


def test_weights_and_samples_match_the_recorded_behaviour(tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=3, per_class=8)
    save_tiny_vq(tmp_path / "vq.pt")
    codes = write_code_dataset(tmp_path / "codes", n=24, grid=8, data_path=str(folder))
    np.save(codes / "labels.npy", np.repeat(np.arange(3), 8))  # the folder's order: sorted classes, 8 images each
    got = {}
    for variant in ("none", "explicit --foresight-warmup 2", "implicit --foresight-encoder vq"):
        name = variant.split()[0]
        ckpt = state(run_train(tmp_path, codes, "--max-steps 6 --ckpt-every 6 --lr 1e-3 --ema --ema-decay 0.9",
                               "--vq-ckpt", tmp_path / "vq.pt", "--foresight", variant, name=name), 6)
        got[name] = {key: projections(ckpt[key]) for key in ("model", "ema", "foresight") if ckpt.get(key)}
    gpt = M.load_gpt(last_ckpt(tmp_path / "explicit"), use_ema=True)
    tokens = gpt.generate(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), cfg_scale=2.0,
                          generator=torch.Generator().manual_seed(0))
    got["samples"] = tokens.tolist()
    if os.environ.get("MIRAI_RECORD_SIGNATURE"):  # only when the behaviour is meant to change
        SIGNATURE.write_text(json.dumps(got, indent=1))
    want = json.loads(SIGNATURE.read_text())
    assert set(got) == set(want)
    for variant in ("none", "explicit", "implicit"):
        assert set(got[variant]) == set(want[variant])
        for key in want[variant]:
            np.testing.assert_allclose(got[variant][key], want[variant][key], rtol=1e-5, err_msg=f"{variant} {key}")
    same = np.mean(np.asarray(got["samples"]) == np.asarray(want["samples"]))
    assert same >= 0.95, f"only {same:.0%} of the sampled tokens are the recorded ones"


# ==== bench.py: the GPU check's code paths, at toy shapes on the CPU (what it measures is not tested) ====

def test_gpu_check_runs_its_rows_at_toy_shapes_and_official_checkouts_import_side_by_side(tmp_path, capsys):
    import bench
    bench.main(["--device", "cpu", "--gpu-check", "--small", "--no-compile", "--threads", "1"])
    out = capsys.readouterr().out
    for row in ("train step baseline", "train step Mirai-E", "train step Mirai-I", "DINOv2-B/14 shapes",
                "sampling, batch 8", "FID Inception"):
        assert row in out, out
    assert re.search(r"Mirai-E .*tokens/s, \d+\.\d\dx baseline", out)
    assert bench.guarded("a section", lambda: 1 / 0) is None  # a section that breaks leaves a row and the rest goes on
    assert re.search(r"a section +nan +failed: ZeroDivisionError: division by zero", capsys.readouterr().out)
    bench.main(cli("--dim 32 --n-layer 2 --n-head 2 --vocab 16 --batch 2 --foresight-depth 1 --proj-dim 8",
                   "--teacher-dim 8 --warmup 0 --iters 1 --threads 1 --skip sample,inception,memory --bf16"))  # the CPU rows
    out = capsys.readouterr().out
    assert re.search(r"train step: baseline, dropout off +\d+\.\d+ +s", out) and "Mirai-I teacher: VQ-S" in out, out
    assert "training steps in bf16 autocast" in out
    # --official: LlamaGen's and Mirai-Code's checkouts both hold a package `autoregressive`; imported side by side,
    # they leave nothing behind
    for repo in ("LlamaGen", "Mirai-Code"):
        pkg = tmp_path / repo / "autoregressive" / "models"
        pkg.mkdir(parents=True)
        (pkg.parent / "__init__.py").write_text("")
        (pkg / "__init__.py").write_text("")
        (pkg / "gpt.py").write_text(f"from timm.data import IMAGENET_DEFAULT_MEAN\nimport wandb\nWHO = {repo!r}\n")
    a, b = (bench.import_from(str(tmp_path / r), ["autoregressive.models.gpt"])[0] for r in ("LlamaGen", "Mirai-Code"))
    assert (a.WHO, b.WHO, a.IMAGENET_DEFAULT_MEAN) == ("LlamaGen", "Mirai-Code", None)
    assert not {"timm", "wandb", "autoregressive"} & set(sys.modules) and str(tmp_path) not in " ".join(sys.path)
    raises(SystemExit, "holds no LlamaGen checkout", bench.main,
           ["--official", str(tmp_path / "nowhere"), "--skip", "train,sample,inception,memory"])


# ==== The main job end to end: tokenizer -> codes -> each foresight variant -> samples -> statistics ======

def test_the_whole_pipeline_end_to_end(tmp_path, monkeypatch, capsys):
    folder, out = make_image_folder(tmp_path / "images", classes=2, per_class=16), tmp_path / "run"
    common = cli("--dataset folder --data-path", folder, "--out", out, "--image-size 16 --vq-steps 4 --max-steps 10",
                 "--global-batch-size 4 --no-progress --num-sample-images 4 --foresight-proj-dim 32")
    for variant in ("none", "explicit", "implicit"):
        TR.main(common + ["--foresight", variant])
    assert (out / "vq" / "checkpoints" / "0000004.pt").is_file()
    meta = json.loads((out / "codes" / "meta.json").read_text())
    assert meta["grid"] == [4, 4] and meta["num_views"] == 2 and meta["num_images"] == 32
    for variant in ("none", "explicit", "implicit"):
        exp = out / f"gpt-{variant}"
        assert (exp / "samples" / "0000010.png").is_file() and os.path.isfile(last_ckpt(exp))
        assert variant == "none" or "foresight" in metrics(exp)[-1]
    # a small run's defaults: Mirai-E waits 10% of the run with lambda 1, Mirai-I starts at once with lambda 2
    assert "lambda [1.0, 1.0, 1.0], warm-up 1 steps" in (out / "gpt-explicit" / "log.txt").read_text()
    assert "lambda [2.0], warm-up 0 steps" in (out / "gpt-implicit" / "log.txt").read_text()
    # a second run of the same command reuses every stage: nothing is trained or extracted again
    codes_made = (out / "codes" / "codes.npy").stat().st_mtime_ns
    capsys.readouterr()
    TR.main(common + ["--foresight", "implicit"])
    said = capsys.readouterr().out
    assert "stage 1/3" not in said and "stage 2/3" not in said and "(resuming)" in said
    assert (out / "codes" / "codes.npy").stat().st_mtime_ns == codes_made
    # samples: a grid and an ADM .npz, then their statistics with a (random) Inception network
    S.main(cli("--gpt-ckpt", last_ckpt(out / "gpt-explicit"), "--ema --num-samples 4 --out", tmp_path / "grid.png"))
    assert Image.open(tmp_path / "grid.png").size[0] > 16
    S.main(cli("--gpt-ckpt", last_ckpt(out / "gpt-implicit"), "--ema --num-fid-samples 6 --sample-dir",
               tmp_path / "fid"))
    arr = np.load(tmp_path / "fid" / "samples.npz")["arr_0"]
    assert arr.shape == (6, 16, 16, 3) and arr.dtype == np.uint8
    random_inception(monkeypatch)
    fid.main([str(tmp_path / "fid" / "samples.npz"), "--save-stats", str(tmp_path / "stats.npz")])
    stats = np.load(tmp_path / "stats.npz")
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048) and np.isfinite(stats["sigma"]).all()
