"""Tests of sample.py (merged into test_all.py by the lead). CPU only, tiny checkpoints the tests write."""
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import model as M
import sample as S
import tokenizer as T

torch.set_num_threads(1)  # tiny ops: a second thread only adds OpenMP waits on a busy machine

# 8 px images -> 4x4 tokens (stride 2); GroupNorm(32) needs widths that are multiples of 32
SAMPLE_VQ = T.VQConfig(codebook_size=16, codebook_embed_dim=4, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
                       z_channels=32, ch=32, num_res_blocks=1)


def save_gpt(path, vq_path=None, llamagen=False, **kw):
    torch.manual_seed(0)
    if llamagen:
        cfg = M.gpt_config("GPT-T", vocab_size=16, grid_size=4, num_classes=5)
    else:
        cfg = M.GPTConfig(**{**dict(dim=32, n_layer=2, n_head=4, vocab_size=16, grid_size=4, num_classes=5), **kw})
    gpt = M.GPT(cfg)
    with torch.no_grad():  # the zero-initialised head would make every token equally likely
        gpt.output.weight.normal_(0, 0.5)
    sd = gpt.state_dict()
    ours = {"model": sd, "ema": sd, "gpt_config": asdict(cfg), "vq_ckpt": vq_path}
    torch.save({"model": sd} if llamagen else ours, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_ckpts")
    torch.manual_seed(0)
    vq = T.VQModel(SAMPLE_VQ)
    vq_path = str(root / "vq.pt")
    torch.save({"model": vq.state_dict(), "config": asdict(SAMPLE_VQ)}, vq_path)
    return {"vq": vq_path, "gpt": save_gpt(root / "gpt.pt", vq_path)}


def read_png(path):
    with Image.open(path) as im:
        return np.asarray(im)


def test_grid_png_has_the_right_size_and_is_reproducible(ckpts, tmp_path):
    common = ["--gpt-ckpt", ckpts["gpt"], "--num-samples", "5", "--nrow", "3", "--batch-size", "2", "--ema"]
    S.main(common + ["--vq-ckpt", ckpts["vq"], "--out", str(tmp_path / "a.png")])
    S.main(common + ["--out", str(tmp_path / "b.png")])  # the tokenizer the checkpoint recorded
    S.main(common + ["--out", str(tmp_path / "c.png"), "--seed", "1"])
    a, b, c = (read_png(tmp_path / f"{n}.png") for n in "abc")
    # 2 rows x 3 columns of 8x8 images with 2 px gaps around each
    assert a.shape == (2 + 2 * 10, 2 + 3 * 10, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a[2:10, 2:10].std() > 0 and np.all(a[:2] == 0)  # a picture inside, black padding around


def test_grid_with_given_classes_matches_sample_images(ckpts, tmp_path):
    S.main(["--gpt-ckpt", ckpts["gpt"], "--num-samples", "3", "--nrow", "3", "--batch-size", "3",
            "--classes", "4,0,2", "--cfg-scale", "1.5", "--top-k", "8", "--out", str(tmp_path / "g.png")])
    gpt = M.load_gpt(ckpts["gpt"])
    vq = T.load_vq(ckpts["vq"])
    images = S.sample_images(gpt, vq, [4, 0, 2], cfg_scale=1.5, top_k=8,
                             generator=S.chunk_generator(0, 0, torch.device("cpu")))
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    grid = read_png(tmp_path / "g.png")
    for i in range(3):
        assert np.array_equal(grid[2:10, 2 + 10 * i:10 + 10 * i], images[i])


def fid_args(ckpts, sample_dir, *extra):
    return ["--gpt-ckpt", ckpts["gpt"], "--vq-ckpt", ckpts["vq"], "--num-fid-samples", "7", "--batch-size", "3",
            "--sample-dir", str(sample_dir), *extra]


def test_fid_npz_shape_resume_and_sharding(ckpts, tmp_path, monkeypatch):
    d = tmp_path / "fid"
    S.main(fid_args(ckpts, d))
    with np.load(d / "samples.npz") as z:
        arr, labels = z["arr_0"], z["labels"]
    assert arr.shape == (7, 8, 8, 3) and arr.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert sorted(p.name for p in d.glob("*.png")) == [f"{i:06d}.png" for i in range(7)]
    assert np.array_equal(read_png(d / "000005.png"), arr[5])

    # resumption: deleted PNGs come back identical, the others are left alone
    (d / "000001.png").unlink()
    (d / "000006.png").unlink()
    (d / "samples.npz").rename(tmp_path / "first.npz")
    kept = (d / "000003.png").stat().st_mtime_ns
    S.main(fid_args(ckpts, d))
    with np.load(d / "samples.npz") as z:
        assert np.array_equal(z["arr_0"], arr)
    assert (d / "000003.png").stat().st_mtime_ns == kept

    # two ranks (threads meeting at a real barrier) make the same images as one process
    meet = threading.Barrier(2, timeout=60)
    monkeypatch.setattr(S, "barrier", lambda world: meet.wait())
    d2 = tmp_path / "fid2"
    args = S.build_parser().parse_args(fid_args(ckpts, d2))
    S.check_args(args)
    gpt, vq = S.load_models(args, torch.device("cpu"))
    cpu = torch.device("cpu")
    ranks = [threading.Thread(target=S.make_fid_samples, args=(args, gpt, vq, r, 2, cpu)) for r in (0, 1)]
    for t in ranks:
        t.start()
    for t in ranks:
        t.join()
    monkeypatch.undo()
    with np.load(d2 / "samples.npz") as z:
        assert np.array_equal(z["arr_0"], arr)

    # other settings in the same folder are refused; with --overwrite every old PNG is made again
    (d / "samples.npz").unlink()
    with pytest.raises(SystemExit, match="seed: 0 there, 3 now"):
        S.main(fid_args(ckpts, d, "--seed", "3"))
    S.main(fid_args(ckpts, d, "--seed", "3", "--overwrite"))
    S.main(fid_args(ckpts, tmp_path / "fid3", "--seed", "3"))
    with np.load(d / "samples.npz") as z, np.load(tmp_path / "fid3" / "samples.npz") as z3:
        assert np.array_equal(z["arr_0"], z3["arr_0"]) and not np.array_equal(z["arr_0"], arr)
    with pytest.raises(SystemExit, match="already exists; pass --overwrite"):
        S.main(fid_args(ckpts, d, "--seed", "3"))


def test_vocab_and_grid_mismatch_and_existing_out_are_one_sentence(ckpts, tmp_path):
    big_vocab = save_gpt(tmp_path / "v32.pt", ckpts["vq"], vocab_size=32)
    with pytest.raises(SystemExit, match=r"vocabulary has 32 tokens but the tokenizer's codebook has 16"):
        S.main(["--gpt-ckpt", big_vocab, "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match=r"--image-size 16 makes a 8x8 token grid .* GPT's grid is 4x4 \(image size 8"):
        S.main(["--gpt-ckpt", ckpts["gpt"], "--image-size", "16", "--out", str(tmp_path / "x.png")])
    out = tmp_path / "mine.png"
    out.write_bytes(b"user data")
    with pytest.raises(SystemExit, match="already exists; pass --overwrite"):
        S.main(["--gpt-ckpt", ckpts["gpt"], "--out", str(out)])
    assert out.read_bytes() == b"user data"
    assert not (tmp_path / "x.png").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "000000.png").write_bytes(b"not ours")
    with pytest.raises(SystemExit, match="PNGs this script did not make"):
        S.main(fid_args(ckpts, foreign))
    assert (foreign / "000000.png").read_bytes() == b"not ours"
    moved = save_gpt(tmp_path / "moved.pt", str(tmp_path / "gone" / "vq.pt"))
    with pytest.raises(SystemExit, match="trained with the tokenizer .*gone.* give its path with --vq-ckpt"):
        S.main(["--gpt-ckpt", moved, "--out", str(tmp_path / "x.png")])

    # the real CLI: one line on stderr, no traceback
    r = subprocess.run([sys.executable, "sample.py", "--gpt-ckpt", big_vocab, "--out", str(tmp_path / "x.png")],
                       capture_output=True, text=True, cwd=Path(__file__).parent)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "32" in r.stderr and "16" in r.stderr


def test_llamagen_checkpoint_needs_and_takes_gpt_model(ckpts, tmp_path):
    ll = save_gpt(tmp_path / "c2i_T_8.pt", llamagen=True)
    base = ["--gpt-ckpt", ll, "--vq-ckpt", ckpts["vq"], "--num-samples", "2", "--out", str(tmp_path / "l.png")]
    with pytest.raises(SystemExit, match="give --gpt-model"):
        S.main(base)
    S.main(base + ["--gpt-model", "GPT-T", "--image-size", "8"])
    assert read_png(tmp_path / "l.png").shape == (2 + 10, 2 + 2 * 10, 3)  # one row of two
    with pytest.raises(SystemExit, match="does not record which tokenizer"):
        S.main(["--gpt-ckpt", ll, "--gpt-model", "GPT-T", "--image-size", "8", "--out", str(tmp_path / "m.png")])
