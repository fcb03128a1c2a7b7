# Tests of fid.py (merged into test_all.py by the lead).
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import fid

TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")


def fill_by_recipe(model, seed=2015, he=False):
    """The fixtures' fill_recipe: one generator walks the state_dict in order.

    he=False: shared/reference/fid_inception_random.pt; he=True: testdata/fid_inception_oracle.pt,
    whose weights keep the output dependent on the input (the first fixture's barely is).
    """
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = t
            continue
        r = torch.randn(t.shape, generator=g)
        if name.endswith("running_var"):
            r = 1 + 0.1 * r.abs()
        elif t.dim() > 1:  # conv / linear weight
            r = r * ((2.0 if he else 1.0) / t[0].numel()) ** 0.5
        elif he and name.endswith("bn.weight"):
            r = 1 + 0.1 * r
        else:
            r = 0.1 * r
        state[name] = r
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="module")
def fixture():
    return torch.load(os.path.join(TESTDATA, "fid_inception_random.pt"), weights_only=True)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory, fixture):
    """A weights file in the real file's layout, holding the fixture's random network."""
    model = fill_by_recipe(fid.FIDInceptionV3())
    path = tmp_path_factory.mktemp("weights") / fid.WEIGHTS_NAME
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def model(random_weights):
    return fid.load_inception(random_weights)


def test_fid_inception_matches_pytorch_fid(fixture, model):
    keys = [(k, tuple(v.shape)) for k, v in fid.FIDInceptionV3().state_dict().items()]
    assert keys == [(k, tuple(s)) for k, s in fixture["state_dict_keys"]]
    # float [0, 1] NCHW input through the whole extraction path (channels_last, folded batch norm)
    pool3, logits = fid.extract(model, fixture["images"], batch_size=3, progress=False)
    ref_pool3, ref_logits = fixture["pool3"].numpy(), fixture["logits"].numpy()
    assert np.abs(pool3 - ref_pool3).max() <= 1e-4 * np.abs(ref_pool3).max()
    # extract gives the IS logits (no bias); the fixture holds fc(pool3) with it
    with_bias = logits + model.fc.bias.detach().numpy()
    assert np.abs(with_bias - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max()
    assert np.abs(logits - ref_logits).max() > 1e-3  # the bias really was left out
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fid.extract(model, fixture["images"] * 2 - 1, progress=False)


def test_fid_inception_matches_pytorch_fid_on_input_dependent_weights():
    # Made with pytorch-fid 0.3.0 (see the file's made_by / fill_recipe); it catches the details the
    # random fixture cannot see: pooling kinds, resize corners, input scaling.
    oracle = torch.load(os.path.join(TESTDATA, "fid_inception_oracle.pt"), weights_only=True)
    model = fill_by_recipe(fid.FIDInceptionV3(), seed=oracle["seed"], he=True).eval()
    model = model.to(memory_format=torch.channels_last).fold_batchnorm()
    pool3, logits = fid.extract(model, oracle["images_uint8_nhwc"].numpy(), batch_size=4, progress=False)
    ref_pool3, ref_logits = oracle["pool3"].numpy(), oracle["logits"].numpy()
    assert np.abs(pool3 - ref_pool3).max() <= 1e-4 * np.abs(ref_pool3).max()
    with_bias = logits + model.fc.bias.detach().numpy()
    assert np.abs(with_bias - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max()
    # the unfolded (plain batch-norm) path agrees with the folded one
    model.load_state_dict(model.state_dict())
    assert model.Mixed_7c.branch_pool.folded_weight is None
    plain, _ = fid.extract(model, oracle["images_uint8_nhwc"][3:].numpy(), progress=False)
    assert np.abs(plain - pool3[3:]).max() <= 1e-5 * np.abs(ref_pool3).max()


def numpy_sqrtm_fid(mu1, s1, mu2, s2):
    # The usual formula: tr sqrtm(S1 S2) = sum of sqrt of the (real, >= 0) eigenvalues of S1 S2.
    eig = np.linalg.eigvals(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum())


def random_cov(rng, d, eigenvalues):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * eigenvalues) @ q.T


@pytest.mark.parametrize("case", ["well", "ill", "rank-deficient"])
def test_frechet_distance_matches_numpy_sqrtm(case):
    rng = np.random.default_rng({"well": 0, "ill": 1, "rank-deficient": 2}[case])
    d = 48
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    if case == "well":
        s1, s2 = random_cov(rng, d, rng.uniform(0.5, 2, d)), random_cov(rng, d, rng.uniform(0.5, 2, d))
    elif case == "ill":
        s1, s2 = random_cov(rng, d, np.logspace(-9, 3, d)), random_cov(rng, d, np.logspace(-8, 2, d))
    else:  # covariances of fewer samples than dimensions, as FID of small sets
        s1 = np.cov(rng.standard_normal((20, d)), rowvar=False)
        s2 = np.cov(rng.standard_normal((30, d)) * 2, rowvar=False)
    ours, ref = fid.frechet_distance(mu1, s1, mu2, s2), numpy_sqrtm_fid(mu1, s1, mu2, s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 16)).astype(np.float32) * np.linspace(0.1, 3, 16).astype(np.float32)
    mu, sigma = fid.stats(x, chunk=64)
    x64 = x.astype(np.float64)
    assert np.allclose(mu, x64.mean(0)) and np.allclose(sigma, np.cov(x64, rowvar=False))
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    shift = np.full(16, 0.25)
    small = fid.frechet_distance(mu, sigma, mu + shift, sigma)
    big = fid.frechet_distance(mu, sigma, mu + 4 * shift, sigma)
    assert small == pytest.approx(shift @ shift, rel=1e-6) and big == pytest.approx(16 * shift @ shift, rel=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(mu, sigma, mu[:8], sigma[:8, :8])


def test_inception_score():
    assert fid.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0)
    confident = np.zeros((100, 1008))
    confident[np.arange(100), np.arange(100) % 10] = 50.0  # each split of 10 sees the 10 classes once
    assert fid.inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    # ten splits: a set whose halves each see one class only scores lower than the whole would
    halves = np.zeros((100, 1008))
    halves[np.arange(100), (np.arange(100) >= 50).astype(int)] = 50.0
    assert fid.inception_score(halves) == pytest.approx(1.0, abs=1e-6)
    assert fid.inception_score(halves, splits=1) == pytest.approx(2.0, rel=1e-6)


def test_precision_recall():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((60, 8)).astype(np.float32)
    assert fid.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert fid.precision_recall(real, real + 100) == (0.0, 0.0)
    fake = np.concatenate([real[:30], rng.standard_normal((30, 8)).astype(np.float32) + 100])
    precision, recall = fid.precision_recall(real, fake)
    assert precision == pytest.approx(0.5)
    assert fid.precision_recall(real, fake, block_size=7) == (precision, recall)  # blocks change nothing
    with pytest.raises(ValueError, match="more than 3"):
        fid.precision_recall(real[:3], fake)


def write_png_folder(folder, images):
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")


def test_cli_and_evaluate(tmp_path, random_weights, model, capsys):
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    reference = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    write_png_folder(tmp_path / "samples", samples)
    np.savez(tmp_path / "ref.npz", arr_0=reference)
    stats_path = tmp_path / "samples_stats.npz"

    fid.main([str(tmp_path / "samples"), str(tmp_path / "ref.npz"), "--inception-weights", random_weights,
              "--batch-size", "3", "--device", "cpu", "--save-stats", str(stats_path), "--json"])
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["fid"] > 0 and metrics["is"] >= 1.0 - 1e-9
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert (metrics["num_samples"], metrics["num_reference"]) == (4, 5)

    saved = np.load(stats_path)
    assert saved["mu"].dtype == np.float64 and saved["sigma"].shape == (2048, 2048)
    assert saved["pool3"].shape == (4, 2048)
    with pytest.raises(SystemExit, match="already exists"):
        fid.main([str(tmp_path / "samples"), "--save-stats", str(stats_path)])

    # the Python API with the roles swapped: FID is symmetric, precision and recall trade places
    swapped = fid.evaluate(reference, str(stats_path), model=model, batch_size=4)
    assert swapped["fid"] == pytest.approx(metrics["fid"], rel=1e-6)
    assert (swapped["precision"], swapped["recall"]) == (metrics["recall"], metrics["precision"])

    # statistics alone: FID without the network (its weights file is absent); no precision or recall
    np.savez(tmp_path / "a.npz", mu=np.zeros(8), sigma=np.eye(8), pool3=np.zeros((5, 8), np.float32))
    np.savez(tmp_path / "b.npz", mu=np.ones(8), sigma=np.eye(8))
    fid.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--inception-weights", str(tmp_path / "absent.pth")])
    table = capsys.readouterr().out
    assert "n/a" in table.split("precision")[1] and "n/a" in table.split("recall")[1]
    fid_line = [line for line in table.splitlines() if line.startswith("FID")][0]
    assert float(fid_line.split()[1]) == pytest.approx(8.0)
    fid.main([str(tmp_path / "b.npz"), "--save-stats", str(tmp_path / "b_again.npz")])
    assert np.array_equal(np.load(tmp_path / "b_again.npz")["mu"], np.ones(8))

    np.savez(tmp_path / "float.npz", arr_0=reference.astype(np.float32))
    with pytest.raises(SystemExit, match="arr_0 must hold uint8"):
        fid.main([str(tmp_path / "float.npz"), str(stats_path), "--inception-weights", random_weights])
    with pytest.raises(SystemExit, match="does not exist"):
        fid.main([str(tmp_path / "missing.npz"), str(stats_path)])


def test_dataset_reference_is_cached(tmp_path, model, monkeypatch):
    images = np.random.default_rng(1).integers(0, 256, (4, 12, 12, 3), dtype=np.uint8)

    class Source:  # stands in for data.py's SourceDataset
        def __len__(self):
            return len(images)

        def image(self, i):
            return Image.fromarray(images[i])

    fake_data = types.ModuleType("data")
    fake_data.open_dataset = lambda name, data_path=None, **kw: Source()
    fake_data.make_view = lambda img, size, views, v: np.asarray(img.resize((size, size)))
    monkeypatch.setitem(sys.modules, "data", fake_data)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = fid.load_side("toy-train", lambda: model, batch_size=4, image_size=12)
    cached = os.path.join(fid.cache_dir(), "toy-train-12px.npz")
    assert os.path.isfile(cached) and first.num_images == 4

    def no_network():
        raise AssertionError("the cached statistics should have been used")

    again = fid.load_side("toy-train", no_network, image_size=12)
    assert np.allclose(again.mu, first.mu) and np.allclose(again.pool3, first.pool3)
    assert again.inception_score == pytest.approx(first.inception_score)


def test_weights_errors_are_one_sentence(tmp_path, monkeypatch):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        fid.load_inception(str(garbage))

    good = tmp_path / "small.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        fid.load_inception(str(truncated))
    with pytest.raises(ValueError, match="keys missing"):
        fid.load_inception(str(good))

    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as e:
        fid.main([str(tmp_path / "s.npz"), str(tmp_path / "s.npz"), "--inception-weights", str(truncated)])
    assert "truncated" in str(e.value) and "\n" not in str(e.value)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as e:
        fid.load_inception(download=False)
    message = str(e.value)
    assert fid.WEIGHTS_URL in message and os.path.join(str(tmp_path / "hub"), "checkpoints") in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fid.load_inception(str(tmp_path / "nowhere.pth"))
