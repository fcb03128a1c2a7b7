"""Every test of the project. CPU only, tiny models, data the tests write themselves or testdata/.

Run: python -m pytest -q test_all.py
"""
import math
import os
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import model as M

TESTDATA = Path(__file__).parent / "testdata"
torch.set_num_threads(min(2, torch.get_num_threads()))


# ====================================================================================================
# model.py


@pytest.fixture(scope="module")
def llamagen_tiny():
    ref = torch.load(TESTDATA / "llamagen_gpt_tiny.pt", weights_only=True)
    c = ref["config"]
    cfg = M.GPTConfig(
        dim=c["dim"], n_layer=c["n_layer"], n_head=c["n_head"], vocab_size=c["vocab_size"],
        grid_size=int(c["block_size"] ** 0.5), num_classes=c["num_classes"], cls_token_num=c["cls_token_num"],
    )
    gpt = M.GPT(cfg)
    gpt.load_state_dict(ref["state_dict"], strict=True)
    return gpt.eval(), ref


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = M.GPTConfig(**{**dict(dim=32, n_layer=2, n_head=4, vocab_size=16, grid_size=3, num_classes=5), **kw})
    gpt = M.GPT(cfg)
    with torch.no_grad():  # the zero-initialised head would make every logit equal
        gpt.output.weight.normal_(0, 0.5)
    return gpt.eval()


def test_llamagen_logits_match_fixture(llamagen_tiny):
    gpt, ref = llamagen_tiny
    with torch.no_grad():
        logits, _, _ = gpt(ref["idx"][:, :-1], ref["cond"])
        null, _, _ = gpt(ref["idx"][:, :-1], torch.full_like(ref["cond"], gpt.config.num_classes))
    assert logits.shape == ref["logits"].shape
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(null, ref["logits_null_class"], atol=1e-4, rtol=0)


def test_llamagen_greedy_cfg_generation_matches_fixture(llamagen_tiny):
    gpt, ref = llamagen_tiny
    out = gpt.generate(ref["cond"], cfg_scale=2.0, temperature=1.0, top_k=1, top_p=1.0)
    assert torch.equal(out, ref["generated"])


def test_class_position_has_zero_rotary_table():
    cfg = M.GPTConfig(dim=64, n_head=4, grid_size=4)
    rope = torch.view_as_real(M.rotary_table(cfg))  # (positions, pairs, [cos, sin])
    assert rope.shape == (1 + 16, 8, 2)
    assert torch.all(rope[0] == 0)
    # cell (0, 0): identity rotation; cell (0, 1): rows half unrotated, columns half rotated
    assert torch.allclose(rope[1, :, 0], torch.ones(8)) and torch.all(rope[1, :, 1] == 0)
    assert torch.all(rope[2, :4, 1] == 0) and rope[2, 4, 1] > 0
    # cell (1, 0) rotates the first pair by row frequency 1: angle 1 radian
    torch.testing.assert_close(rope[1 + 4, 0], torch.tensor([math.cos(1.0), math.sin(1.0)]))


def test_gpt_b_has_llamagen_keys_and_shapes():
    expected = {}
    for line in (TESTDATA / "llamagen_gpt_b_state_dict.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            expected[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    with torch.device("meta"):
        gpt = M.GPT(M.gpt_config("GPT-B", vocab_size=16384, grid_size=16, num_classes=1000))
    got = {k: tuple(v.shape) for k, v in gpt.state_dict().items()}
    assert got == expected
    assert 110e6 < gpt.num_params() < 112e6


@pytest.mark.parametrize("preset,params", [("GPT-L", 343e6), ("GPT-XL", 775e6)])
def test_large_presets_have_llamagen_sizes(preset, params):
    with torch.device("meta"):
        gpt = M.GPT(M.gpt_config(preset, vocab_size=16384, grid_size=16, num_classes=1000))
    assert abs(gpt.num_params() - params) / params < 0.01


def test_swiglu_hidden_size_is_rounded_like_llamagen():
    assert M.ffn_hidden_dim(M.GPTConfig(dim=768)) == 2048
    assert M.ffn_hidden_dim(M.GPTConfig(dim=1024)) == 2816
    assert M.ffn_hidden_dim(M.GPTConfig(dim=256)) == 768


def test_init_zero_head_gives_uniform_first_loss():
    torch.manual_seed(0)
    gpt = M.GPT(M.GPTConfig(dim=32, n_layer=2, n_head=4, vocab_size=50, grid_size=3, num_classes=5))
    idx = torch.randint(0, 50, (4, 9))
    _, loss, _ = gpt(idx[:, :-1], torch.tensor([0, 1, 2, 3]), targets=idx)
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 1e-5


def test_forward_returns_hidden_after_chosen_block_and_loss():
    gpt = tiny_gpt()
    idx = torch.randint(0, 16, (3, 9))
    cond = torch.tensor([0, 1, 4])
    logits, loss, hidden = gpt(idx[:, :-1], cond, targets=idx, hidden_layer=1)
    assert logits.shape == (3, 9, 16) and hidden.shape == (3, 9, 32)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 16), idx.reshape(-1)))
    # the residual stream after block 1 is what block 1 alone produces from the embeddings
    h = gpt.layers[0](gpt.embed(idx[:, :-1], cond), gpt.rope[:9])
    torch.testing.assert_close(hidden, h)
    # a teacher's forward stops there and gives the same hidden state
    none, _, early = gpt(idx[:, :-1], cond, hidden_layer=1, stop_at_hidden=True)
    assert none is None and torch.equal(early, hidden)


def test_train_mode_drops_labels_and_eval_mode_is_deterministic():
    gpt = tiny_gpt(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_prob=0.5)
    idx = torch.randint(0, 16, (64, 9))
    cond = torch.randint(0, 5, (64,))
    a, _, _ = gpt(idx[:, :-1], cond)
    b, _, _ = gpt(idx[:, :-1], cond)
    assert torch.equal(a, b)
    gpt.train()
    c, _, _ = gpt(idx[:, :-1], cond)
    null, _, _ = gpt(idx[:, :-1], torch.full_like(cond, 5), drop_labels=False)
    changed = ~torch.isclose(c, a).all(-1).all(-1)
    assert 10 < changed.sum() < 54  # about half the labels became the null class ...
    torch.testing.assert_close(c[changed], null[changed])  # ... and those rows equal null-class rows


def reference_generate(gpt, cond, cfg_scale):
    """Greedy CFG generation without a cache: a full forward for every token."""
    seq = torch.zeros(cond.shape[0], 0, dtype=torch.long)
    null = torch.full_like(cond, gpt.config.num_classes)
    for _ in range(gpt.config.block_size):
        with torch.no_grad():
            c = gpt(seq, cond)[0][:, -1]
            u = gpt(seq, null)[0][:, -1]
        logits = u + (c - u) * cfg_scale
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_kv_cache_generation_equals_full_forward(n_kv_head):
    gpt = tiny_gpt(n_kv_head=n_kv_head)
    cond = torch.tensor([0, 3, 4])
    assert torch.equal(gpt.generate(cond, cfg_scale=3.0, top_k=1), reference_generate(gpt, cond, 3.0))
    assert torch.equal(gpt.generate(cond, cfg_scale=1.0, top_k=1), reference_generate(gpt, cond, 1.0))


def test_generation_is_reproducible_with_a_generator():
    gpt = tiny_gpt()
    cond = torch.arange(5).repeat(4)
    a = gpt.generate(cond, cfg_scale=2.0, generator=torch.Generator().manual_seed(1))
    b = gpt.generate(cond, cfg_scale=2.0, generator=torch.Generator().manual_seed(1))
    c = gpt.generate(cond, cfg_scale=2.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (20, 9) and a.min() >= 0 and a.max() < 16


def test_cfg_interval_stops_guidance_after_the_interval():
    gpt = tiny_gpt()
    cond = torch.tensor([0, 1, 2, 3])
    guided = gpt.generate(cond, cfg_scale=4.0, top_k=1)
    plain = gpt.generate(cond, cfg_scale=1.0, top_k=1)
    assert not torch.equal(guided, plain)
    assert torch.equal(gpt.generate(cond, cfg_scale=4.0, cfg_interval=100, top_k=1), guided)
    # LlamaGen's count: interval 2 keeps guidance for tokens 0..3, then conditional logits only
    mixed = gpt.generate(cond, cfg_scale=4.0, cfg_interval=2, top_k=1)
    assert torch.equal(mixed[:, :4], guided[:, :4])
    assert torch.equal(mixed, reference_mixed(gpt, cond, 4.0, first_unguided=4))


def reference_mixed(gpt, cond, scale, first_unguided):
    seq = torch.zeros(cond.shape[0], 0, dtype=torch.long)
    null = torch.full_like(cond, gpt.config.num_classes)
    for t in range(gpt.config.block_size):
        with torch.no_grad():
            c = gpt(seq, cond)[0][:, -1]
            u = gpt(seq, null)[0][:, -1]
        logits = u + (c - u) * scale if t < first_unguided else c
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(M.sample_logits(logits, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(M.sample_logits(logits, top_p=0.7, generator=g).tolist()) == {0, 1}  # 0.5 < 0.7, 0.8 crosses
    assert set(M.sample_logits(logits, top_p=0.4, generator=g).tolist()) == {0}
    assert set(M.sample_logits(logits, generator=g).tolist()) == {0, 1, 2, 3}
    cold = M.sample_logits(logits, temperature=0.0, generator=g)
    assert torch.all(cold == 0)


def test_load_llamagen_and_our_checkpoint_formats(tmp_path, llamagen_tiny):
    gpt, ref = llamagen_tiny
    sd = ref["state_dict"]
    for name, ckpt in [("bare.pt", sd), ("llamagen.pt", {"model": sd}), ("ema_only.pt", {"ema": sd})]:
        torch.save(ckpt, tmp_path / name)
        loaded = M.load_gpt(tmp_path / name, preset="GPT-T", grid_size=4, dim=64, n_layer=2, n_head=4)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    ours = {"model": gpt.state_dict(), "ema": {k: v + 1 for k, v in gpt.state_dict().items()}, "gpt_config": asdict(gpt.config)}
    torch.save(ours, tmp_path / "ours.pt")
    assert torch.equal(M.load_gpt(tmp_path / "ours.pt").output.weight, gpt.output.weight)
    assert torch.equal(M.load_gpt(tmp_path / "ours.pt", use_ema=True).output.weight, gpt.output.weight + 1)


def test_checkpoint_mismatch_is_explained(tmp_path, llamagen_tiny):
    _, ref = llamagen_tiny
    torch.save({"model": ref["state_dict"]}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="give --gpt-model"):
        M.load_gpt(tmp_path / "c.pt")
    with pytest.raises(ValueError) as e:
        M.load_gpt(tmp_path / "c.pt", preset="GPT-T", grid_size=4)  # GPT-T is dim 128, not 64
    msg = str(e.value)
    assert "shape mismatches" in msg and "tok_embeddings.weight (64, 64) vs model (64, 128)" in msg
    assert "vocabulary 64, 10 classes" in msg and "\n" not in msg
    sd = dict(ref["state_dict"])
    sd["extra.weight"] = sd.pop("norm.weight")
    torch.save(sd, tmp_path / "d.pt")
    with pytest.raises(ValueError, match="missing keys: norm.weight; unexpected keys: extra.weight"):
        M.load_gpt(tmp_path / "d.pt", preset="GPT-T", grid_size=4, dim=64, n_layer=2, n_head=4)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        M.load_gpt(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.load_gpt(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="GPT-Q.*unknown"):
        M.gpt_config("GPT-Q")


# ====================================================================================================
# foresight.py


import json
import subprocess
import sys

import numpy as np

import foresight as FS
import train as TR

ROOT = Path(__file__).parent


def test_2d_neighbours_are_masked_at_edges_never_wrapped():
    pairs = FS.neighbour_pairs(3, 3, "2d", num_targets=8)  # explicit: cell 8 is never read
    s, t = pairs[1]  # (0, +1)
    assert dict(zip(s.tolist(), t.tolist())) == {0: 1, 1: 2, 3: 4, 4: 5, 6: 7}  # no 2->3, 5->6 wrap, no 7->8
    s, t = pairs[2]  # (+1, 0)
    assert dict(zip(s.tolist(), t.tolist())) == {0: 3, 1: 4, 2: 5, 3: 6, 4: 7}
    assert torch.equal(pairs[0][0], torch.arange(8)) and torch.equal(pairs[0][1], torch.arange(8))
    s, t = FS.neighbour_pairs(3, 4, "2d", num_targets=9)[3]  # (1, 1) for an encoder: cell 8 is a target
    assert dict(zip(s.tolist(), t.tolist())) == {0: 4, 1: 5, 3: 7, 4: 8}
    assert FS.NEIGHBOURS_2D[3:] == ((1, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0))
    with pytest.raises(ValueError, match="foresight-k 10"):
        FS.neighbour_pairs(4, 10, "2d")


def test_1d_layout_takes_the_next_tokens_in_raster_order():
    pairs = FS.neighbour_pairs(3, 3, "1d", num_targets=8)
    s, t = pairs[2]  # two steps later, across the row end (that is the 1D sequence's own future)
    assert s.tolist() == [0, 1, 2, 3, 4, 5] and t.tolist() == [2, 3, 4, 5, 6, 7]


def direct_cos_loss(fs, hidden, targets, offsets, explicit, grid):
    """The loss written out pair by pair: one student vector through its head at a time."""
    losses = []
    for j, (dy, dx) in enumerate(offsets):
        terms = []
        for cell in range(grid * grid - 1):
            r, c = divmod(cell, grid)
            tr, tc = r + dy, c + dx
            tcell = tr * grid + tc
            if tr >= grid or tc >= grid or (explicit and tcell >= grid * grid - 1):
                continue
            tgt = targets[:, tcell + 1] if explicit else targets[:, tcell]
            terms.append(-torch.nn.functional.cosine_similarity(fs.projectors[j](hidden[:, cell + 1]), tgt, dim=-1))
        losses.append(torch.stack(terms).mean())
    return torch.stack(losses)


def test_explicit_loss_equals_direct_computation():
    torch.manual_seed(0)
    fs = FS.Foresight("explicit", dim=8, grid=3, k=4, proj_dim=16)
    hidden, targets = torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    want = direct_cos_loss(fs, hidden, targets, FS.NEIGHBOURS_2D[:4], True, 3)
    torch.testing.assert_close(fs(hidden, targets), want)


def test_implicit_pairs_student_that_read_cell_with_patch_of_that_cell():
    torch.manual_seed(0)
    fs = FS.Foresight("implicit", dim=8, grid=3, k=1, proj_dim=16, target_dim=5)
    s, t = fs.pairs(0)
    assert torch.equal(s, t) and s.tolist() == list(range(8))
    hidden, feats = torch.randn(2, 9, 8), torch.randn(2, 9, 5)
    torch.testing.assert_close(fs(hidden, feats), direct_cos_loss(fs, hidden, feats, [(0, 0)], False, 3))
    # moving patch (r, c) changes exactly the loss term of the student at position r*W + c + 1
    feats2 = feats.clone()
    feats2[:, 8] = torch.randn(2, 5)  # the last cell is never read: no student pairs with it
    torch.testing.assert_close(fs(hidden, feats2), fs(hidden, feats))


def test_output_level_heads_predict_the_neighbours_next_token():
    torch.manual_seed(0)
    fs = FS.Foresight("output", dim=8, grid=3, k=3, proj_dim=16, vocab_size=7)
    assert fs.k == 2  # the (0, 0) target is the model's own next-token head
    hidden, tokens = torch.randn(2, 9, 8), torch.randint(0, 7, (2, 9))
    s, t = fs.pairs(0)  # (0, 1): the position that read cell t predicts token t + 1
    assert dict(zip(s.tolist(), t.tolist())) == {0: 1, 1: 2, 3: 4, 4: 5, 6: 7}
    logits = fs.projectors[0](hidden[:, 1:])  # every student, then keep the valid ones
    want = torch.nn.functional.cross_entropy(logits[:, s].reshape(-1, 7), tokens[:, t + 1].reshape(-1))
    torch.testing.assert_close(fs(hidden, tokens)[0], want)


def test_coefficient_schedules_and_warmup():
    assert FS.coef_schedule(9, 100, 10) == 0.0 and FS.coef_schedule(10, 100, 10) == 1.0
    assert FS.coef_schedule(10, 110, 10, "cosine") == 1.0
    assert abs(FS.coef_schedule(60, 110, 10, "cosine") - 0.5) < 1e-9
    assert FS.coef_schedule(5, 100, 0, "50:0.5,80:0") == 1.0
    assert FS.coef_schedule(60, 100, 0, "50:0.5,80:0") == 0.5 and FS.coef_schedule(90, 100, 0, "50:0.5,80:0") == 0.0
    assert TR.parse_warmup("15ep", 100, 10_000) == 1500 and TR.parse_warmup("10%", 100, 2000) == 200
    assert TR.parse_warmup("250", 100, 2000) == 250
    with pytest.raises(ValueError, match="foresight-warmup"):
        TR.parse_warmup("soon", 1, 1)
    with pytest.raises(ValueError, match="foresight-schedule"):
        FS.parse_schedule("linear")


def test_ema_teacher_is_the_ema_weights_up_to_depth_and_gets_no_gradient():
    student = tiny_gpt(seed=1).train()
    ema = tiny_gpt(seed=2).requires_grad_(False)
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
    h = ema.layers[0](ema.embed(idx, cond, drop_labels=False), ema.rope[:9])
    assert torch.equal(t, h) and not t.requires_grad
    fs = FS.Foresight("explicit", dim=32, grid=3, k=3, proj_dim=16)
    _, loss, hidden = student(idx, cond, targets=torch.randint(0, 16, (2, 9)), hidden_layer=1)
    (loss + fs(hidden, t).sum()).backward()
    assert all(p.grad is None for p in ema.parameters())
    assert student.layers[0].attention.wqkv.weight.grad is not None and fs.projectors[0][0].weight.grad is not None
    assert ema.training is False


def test_image_teacher_resizes_and_normalises_and_refuses_a_grid_mismatch():
    class Fake(torch.nn.Module):  # stands in for DINOv2: 14x14 patches, mean-pooled pixels as "features"
        def forward_features(self, x):
            p = torch.nn.functional.avg_pool2d(x, 14)
            return {"x_norm_patchtokens": p.flatten(2).transpose(1, 2)}

    teacher = FS.ImageEncoderTeacher(Fake(), grid=2, feature_dim=3, input_size=28, mean=FS.IMAGENET_MEAN,
                                     std=FS.IMAGENET_STD, kind="dinov2")
    img = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    img[:, :, :8, 8:] = 255  # top-right quarter white: patch (0, 1)
    feats = teacher(img)
    assert feats.shape == (1, 4, 3)
    white = (1 - torch.tensor(FS.IMAGENET_MEAN)) / torch.tensor(FS.IMAGENET_STD)
    assert torch.allclose(feats[0, 1], white, atol=0.05) and feats[0, 1].sum() > feats[0, 0].sum() + 5
    with pytest.raises(ValueError, match="teacher gives 4 patches"):
        FS.ImageEncoderTeacher(Fake(), grid=3, feature_dim=3, input_size=28, kind="dinov2")(img)
    with pytest.raises(ValueError, match="foresight-encoder"):
        FS.dinov2_teacher("dinov3_vitb16", 16)


# ====================================================================================================
# train.py


def write_code_dataset(root, n=48, grid=4, vocab=32, classes=3, views=2, seed=0):
    """A learnable code dataset: each class is a fixed token pattern, a few tokens noised per view."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, vocab, (classes, grid * grid))
    labels = np.arange(n) % classes
    codes = np.repeat(patterns[labels][:, None], views, axis=1)
    noise = rng.random(codes.shape) < 0.1
    codes[noise] = rng.integers(0, vocab, noise.sum())
    os.makedirs(root, exist_ok=True)
    np.save(root / "codes.npy", codes.astype(np.int16))
    np.save(root / "labels.npy", labels.astype(np.int64))
    meta = {"grid": [grid, grid], "vocab_size": vocab, "num_classes": classes, "image_size": 16, "views": "flip",
            "num_views": views, "dataset": "folder", "split": "train", "data_path": None, "tokenizer": None,
            "tokenizer_config": {}, "num_images": n}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory):
    return write_code_dataset(tmp_path_factory.mktemp("codes"))


def run_train(tmp, codes, *extra, name="run"):
    args = ["--code-path", str(codes), "--results-dir", str(tmp), "--exp-name", name, "--gpt-model", "GPT-T",
            "--global-batch-size", "8", "--log-every", "5", "--ckpt-every", "1000", "--no-progress", *extra]
    return Path(TR.main(args))


def metrics(exp):
    return [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]


def state(exp, step):
    return torch.load(exp / "checkpoints" / f"{step:07d}.pt", weights_only=True)


@pytest.mark.parametrize("variant", [
    ["--foresight", "none"],
    ["--foresight", "explicit", "--foresight-warmup", "5", "--ema-decay", "0.9"],
    ["--foresight", "explicit", "--foresight-level", "output", "--foresight-warmup", "0"],
])
def test_each_variant_reduces_the_loss(tmp_path, codes_dir, variant):
    exp = run_train(tmp_path, codes_dir, "--max-steps", "40", "--lr", "2e-3", *variant)
    rows = metrics(exp)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    ckpt = state(exp, 40)
    assert set(ckpt) >= {"model", "ema", "optimizer", "steps", "epoch", "args", "gpt_config", "rng"}
    assert ckpt["steps"] == 40 and ckpt["epoch"] == 40 // 6 and ckpt["step_in_epoch"] == 40 % 6
    # what LlamaGen reads: a bare GPT state_dict under "model"
    assert set(ckpt["model"]) == set(M.GPT(M.GPTConfig(**ckpt["gpt_config"])).state_dict())
    if variant[1] == "explicit" and variant[-1] != "0":
        assert "foresight" not in rows[0] and rows[-1]["foresight"][0] < rows[1]["foresight"][0]


def test_warmup_keeps_the_foresight_heads_untouched(tmp_path, codes_dir):
    exp = run_train(tmp_path, codes_dir, "--max-steps", "6", "--foresight", "explicit", "--foresight-warmup", "100",
                    "--ckpt-every", "6")
    torch.manual_seed(0)
    ckpt = state(exp, 6)
    assert all("foresight" not in r for r in metrics(exp))
    assert all(not ckpt["optimizer"]["state"].get(i) for i in range(len(ckpt["optimizer"]["param_groups"][0]["params"]), 0))
    fresh = TR.Student(M.GPT(M.GPTConfig(**ckpt["gpt_config"])))
    n_gpt = len(list(fresh.parameters()))
    stepped = set(ckpt["optimizer"]["state"])
    n_all = sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"])
    assert len(stepped) == n_gpt and n_all == n_gpt + 3 * 6  # the 3 heads' 6 tensors each were never stepped


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, codes_dir):
    common = ["--foresight", "explicit", "--foresight-warmup", "3", "--ema-decay", "0.9", "--ckpt-every", "4"]
    full = run_train(tmp_path, codes_dir, "--max-steps", "10", *common, name="full")
    half = run_train(tmp_path, codes_dir, "--max-steps", "4", *common, name="half")  # "killed" after step 4
    run_train(tmp_path, codes_dir, "--max-steps", "10", *common, "--resume", str(half / "checkpoints" / "last.pt"))
    a, b = state(full, 10), state(half, 10)
    for key in ("model", "ema", "foresight"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_ddp_with_two_gloo_processes_equals_one_process(tmp_path, codes_dir):
    common = ["--code-path", str(codes_dir), "--results-dir", str(tmp_path), "--gpt-model", "GPT-T",
              "--global-batch-size", "8", "--max-steps", "3", "--ckpt-every", "3", "--no-progress", "--lr", "1e-3",
              "--dropout-p", "0", "--token-dropout-p", "0", "--class-dropout-prob", "0",
              "--foresight", "explicit", "--foresight-warmup", "1", "--ema-decay", "0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                    str(ROOT / "train.py"), *common, "--exp-name", "ddp"], check=True, env=env, capture_output=True)
    TR.main([*common, "--exp-name", "single"])
    a = torch.load(tmp_path / "ddp" / "checkpoints" / "0000003.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "checkpoints" / "0000003.pt", weights_only=True)
    assert len(a["rng"]) == 2
    for key in ("model", "ema", "foresight"):
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], atol=1e-5, rtol=1e-4)
    assert not torch.equal(a["model"]["output.weight"], torch.zeros_like(a["model"]["output.weight"]))


def test_bad_flags_fail_with_one_sentence(tmp_path, codes_dir, capsys):
    def fails(*extra, match):
        with pytest.raises(SystemExit) as e:
            run_train(tmp_path, codes_dir, "--max-steps", "1", *extra)
        msg = str(e.value)
        assert msg.startswith("error: ") and "\n" not in msg and re.search(match, msg), msg
        assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()

    fails("--foresight", "explicit", "--foresight-coef", "1,2", match="2 values for 3 targets")
    fails("--foresight", "explicit", "--foresight-depth", "9", match="outside the model's 1..4 blocks")
    fails("--foresight", "implicit", "--foresight-encoder", "vq", match="needs --data-path")
    fails("--global-batch-size", "64", match="larger than the dataset")
    fails("--foresight", "explicit", "--foresight-warmup", "later", match="foresight-warmup")
    other = write_code_dataset(tmp_path / "other", vocab=40)
    gpt = run_train(tmp_path, other, "--max-steps", "1", "--ckpt-every", "1", name="v40")
    fails("--gpt-ckpt", str(gpt / "checkpoints" / "last.pt"), match="vocabulary 40, but the codes .* vocabulary 32")
    with pytest.raises(SystemExit, match="no such checkpoint"):
        run_train(tmp_path, codes_dir, "--max-steps", "1", "--resume", str(tmp_path / "nope.pt"))
    with pytest.raises(SystemExit, match="not a code dataset"):
        run_train(tmp_path, tmp_path / "empty", "--max-steps", "1")
