"""Tests of tokenizer.py (merged into test_all.py by the lead). CPU only, tiny models and data."""
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data as D
import model as M
import tokenizer as T

TESTDATA = Path(__file__).parent / "testdata"
torch.set_num_threads(min(2, torch.get_num_threads()))

# a VQ small enough for a few CPU steps: 16 px -> 8x8 tokens, GroupNorm(32) still divides every width
TINY_VQ = T.VQConfig(codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
                     z_channels=32, ch=32, num_res_blocks=1)


@pytest.fixture(scope="module")
def vq_fixture():
    ref = torch.load(TESTDATA / "llamagen_vq_tiny.pt", weights_only=True)
    vq = T.VQModel(T.VQConfig(**ref["config"]))
    M.load_state_dict_strict(vq, ref["state_dict"], "fixture")
    return vq.eval(), ref


def make_image_folder(root, classes=2, per_class=8, size=16, seed=0):
    """An ImageNet-style folder of smooth, class-dependent pictures (a reconstructable signal)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            f = rng.uniform(1, 3, size=3)
            p = rng.uniform(0, 6.28, size=3)
            img = np.stack([np.sin(f[k] * (xx if (k + c) % 2 else yy) * 6.28 + p[k]) for k in range(3)], -1)
            Image.fromarray(((img + 1) * 127.5).astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def save_tiny_vq(path, seed=0):
    torch.manual_seed(seed)
    vq = T.VQModel(TINY_VQ).eval()
    torch.save({"model": vq.state_dict(), "config": asdict(TINY_VQ)}, path)
    return vq


def test_vq_fixture_parity(vq_fixture):
    vq, ref = vq_fixture
    codes = vq.encode(ref["images"])
    assert codes.dtype == torch.long and torch.equal(codes, ref["codes"])
    with torch.no_grad():
        quant = vq.quantize(vq.quant_conv(vq.encoder(ref["images"])))[0]
    torch.testing.assert_close(quant, ref["quant"], atol=1e-4, rtol=0)
    torch.testing.assert_close(vq.decode_code(ref["codes"]), ref["decoded"], atol=1e-4, rtol=0)
    # the flat (B, N) form the GPT produces decodes to the same images
    torch.testing.assert_close(vq.decode_code(ref["codes"].flatten(1)), ref["decoded"], atol=1e-4, rtol=0)
    feats = vq.encoder_features(ref["images"])
    assert feats.shape == (2, ref["config"]["z_channels"], 8, 8)
    assert vq.grid_size(32) == 8
    with pytest.raises(ValueError, match="multiple of"):
        vq.grid_size(30)


def test_vq16_preset_has_llamagen_keys_and_shapes():
    expected = {}
    for line in (TESTDATA / "llamagen_vq16_state_dict.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")
            expected[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    with torch.device("meta"):  # no memory, no init cost
        vq = T.VQModel(T.get_config("VQ-16"))
    assert {k: tuple(v.shape) for k, v in vq.state_dict().items()} == expected
    assert vq.grid_size(256) == 16
    with torch.device("meta"):
        assert T.VQModel(T.get_config("VQ-8")).grid_size(256) == 32
        assert T.VQModel(T.get_config("VQ-S")).grid_size(32) == 8


def test_load_vq_reads_llamagen_and_our_formats_and_explains_mismatches(tmp_path, vq_fixture):
    vq, ref = vq_fixture
    cfg = T.VQConfig(**ref["config"])
    sd = ref["state_dict"]
    torch.save({"model": sd}, tmp_path / "llamagen.pt")
    torch.save(sd, tmp_path / "bare.pt")
    torch.save({"model": sd, "config": asdict(cfg), "steps": 3}, tmp_path / "ours.pt")
    for path, preset in (("llamagen.pt", cfg), ("bare.pt", cfg), ("ours.pt", None)):
        loaded = T.load_vq(str(tmp_path / path), preset=preset)
        assert not loaded.training
        assert torch.equal(loaded.encode(ref["images"]), ref["codes"])

    with pytest.raises(ValueError, match="stores no config"):
        T.load_vq(str(tmp_path / "llamagen.pt"))
    shapes = r"shape mismatches.*quant_conv.weight \(8, 32, 1, 1\) vs model \(8, 64, 1, 1\)"
    with pytest.raises(ValueError, match=shapes):
        T.load_vq(str(tmp_path / "llamagen.pt"), preset="VQ-S")
    broken = dict(sd)
    broken.pop("encoder.conv_in.bias")
    broken["extra.weight"] = torch.zeros(1)
    torch.save({"model": broken}, tmp_path / "broken.pt")
    keys = r"missing keys: encoder.conv_in.bias; unexpected keys: extra.weight"
    with pytest.raises(ValueError, match=keys):
        T.load_vq(str(tmp_path / "broken.pt"), preset=cfg)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.load_vq(str(tmp_path / "nope.pt"))


def test_training_reduces_reconstruction_loss_and_resumes(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "images")
    monkeypatch.setitem(T.VQ_PRESETS, "VQ-T", TINY_VQ)
    out = tmp_path / "run"
    argv = (f"train --dataset folder --data-path {folder} --image-size 16 --vq-model VQ-T "
            f"--results-dir {out} --global-batch-size 8 --lr 2e-3 --log-every 10 --sample-every 60 "
            "--ckpt-every 30 --disc-start 50 "
            "--disc-weight 0.05 --grid-images 4 --l1-weight 0.1").split()
    last = T.main(argv + ["--steps", "60"])
    assert Path(last) == out / "checkpoints" / "0000060.pt"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [10, 20, 30, 40, 50, 60]
    before_gan = metrics[4]
    assert before_gan["rec"] < 0.5 * metrics[0]["rec"]
    assert before_gan["psnr"] > metrics[0]["psnr"] + 3
    assert "d_loss" in metrics[-1] and "d_loss" not in before_gan  # the GAN switched on at step 50
    assert metrics[-1]["rec"] < metrics[0]["rec"]
    assert 0 < metrics[-1]["usage"] <= 1
    assert (out / "samples" / "recon_0000060.png").is_file()
    vq = T.load_vq(last)
    assert vq.config == TINY_VQ

    with pytest.raises(SystemExit, match="already holds checkpoints; pass --resume auto"):
        T.main(argv + ["--steps", "65"])
    last = T.main(argv + ["--steps", "65", "--resume", "auto"])
    assert Path(last) == out / "checkpoints" / "0000065.pt"
    assert "resuming from" in (out / "log.txt").read_text()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 65
    assert torch.load(last, weights_only=True)["steps"] == 65


def test_extract_writes_what_code_dataset_reads(tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=5)
    vq = save_tiny_vq(tmp_path / "vq.pt")
    out = tmp_path / "codes"
    argv = (f"extract --vq-ckpt {tmp_path / 'vq.pt'} --dataset folder --data-path {folder} --image-size 16 "
            f"--views flip --code-path {out} --batch-size 3").split()
    T.main(argv)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["grid"] == [8, 8] and meta["vocab_size"] == 32 and meta["num_views"] == 2
    assert meta["num_images"] == 10 and meta["num_classes"] == 2 and meta["views"] == "flip"
    assert T.VQConfig(**meta["tokenizer_config"]) == TINY_VQ
    assert np.load(out / "codes.npy", mmap_mode="r").dtype == np.int16

    ds = D.CodeDataset(str(out), with_images=True, random_view=False)
    assert len(ds) == 20
    seen_views = set()
    for k in range(len(ds)):
        codes, label, view, image = ds[k]
        x = image.float().unsqueeze(0) / 127.5 - 1.0
        assert torch.equal(codes, vq.encode(x).flatten())
        assert label.item() == k // 2 // 5  # classes are sorted, 5 images each
        seen_views.add(view.item())
    assert seen_views == {0, 1}
    # a flipped crop gives other codes than the plain one (the views are not duplicates)
    assert not torch.equal(ds[0][0], ds[1][0])

    with pytest.raises(SystemExit, match="already holds codes.npy; pass --overwrite"):
        T.main(argv)
    before = (out / "meta.json").stat().st_mtime_ns
    T.main(argv + ["--overwrite", "--views", "none"])
    assert json.loads((out / "meta.json").read_text())["num_views"] == 1
    assert (out / "meta.json").stat().st_mtime_ns >= before
    assert np.load(out / "codes.npy", mmap_mode="r").shape == (10, 1, 64)


def test_a_wrong_checkpoint_ends_with_one_sentence(tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=1)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    gpt_like = {"model": {"tok_embeddings.weight": torch.zeros(4, 4)}, "config": {"n_layer": 2}}
    torch.save(gpt_like, tmp_path / "gpt.pt")
    torch.save({"model": T.VQModel(TINY_VQ).state_dict()}, tmp_path / "bare.pt")
    cases = [("notes.txt", [], "not a readable PyTorch checkpoint"),
             ("gpt.pt", [], "not a VQ tokenizer's"),
             ("bare.pt", [], "stores no config"),
             ("bare.pt", ["--vq-model", "VQ-S"], "does not fit the model"),
             ("missing.pt", [], "does not exist")]
    for name, extra, message in cases:
        argv = (f"extract --vq-ckpt {tmp_path / name} --dataset folder --data-path {folder} "
                f"--image-size 16 --code-path {tmp_path / 'codes'}").split() + extra
        with pytest.raises(SystemExit, match=message) as e:
            T.main(argv)
        assert str(e.value).startswith("--vq-ckpt") and "\n" not in str(e.value)
    assert not (tmp_path / "codes").exists()  # nothing was written

    train = (f"train --dataset folder --data-path {folder} --image-size 16 --results-dir {tmp_path / 'run'} "
             f"--resume {tmp_path / 'bare.pt'}").split()
    with pytest.raises(SystemExit, match="is not a checkpoint of `tokenizer.py train`"):
        T.main(train)
