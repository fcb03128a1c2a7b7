"""Every test of the project. CPU only, tiny models, data the tests write themselves or testdata/.

Run: python -m pytest -q test_all.py
"""
import os
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
    rope = M.rotary_table(cfg)
    assert rope.shape == (1 + 16, 8, 2)
    assert torch.all(rope[0] == 0)
    # cell (0, 0): identity rotation; cell (0, 1): rows half unrotated, columns half rotated
    assert torch.allclose(rope[1, :, 0], torch.ones(8)) and torch.all(rope[1, :, 1] == 0)
    assert torch.all(rope[2, :4, 1] == 0) and rope[2, 4, 1] > 0


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
