"""Data: image decoding rules, the deterministic split, grain pipelines (values, exact resume from
the iterator state, multi-host sharding, errors), FFHQ* synthesis with the converted fixture
generator (resumable, byte-identical), and the TensorFlow-free tfds array_record builder."""

import json
import os
import re
import shutil
import sys

import grain
import jax
import ml_collections
import numpy as np
import pytest
from etils import epath
from PIL import Image

from ifadit_jax import data, imageio
from ifadit_jax.data import loader, sources, synthesize, tfds_builder
from ifadit_jax.errors import InputError
from ifadit_jax.nets import stylegan2
from tests.helpers import convert, fixture, run_cli

SYNTH_SEED = 3
SYNTH_BATCH = 4
SYNTH_N = 6


def save(path, arr, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def random_rgb(rng, size=16):
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    """11 random 16 px PNGs, some in a subfolder, plus files the listing must skip."""
    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    arrays = {}
    for i in range(11):
        rel = f"sub/{i:02d}.png" if i % 3 == 0 else f"{i:02d}.PNG" if i == 4 else f"{i:02d}.png"
        arrays[rel] = random_rgb(rng)
        save(str(root / rel), arrays[rel])
    save(str(root / ".hidden.png"), random_rgb(rng))
    save(str(root / ".cache" / "x.png"), random_rgb(rng))
    (root / "notes.txt").write_text("not an image")
    return root, arrays


def cfg(root, **kw):
    base = dict(source="folder", path=str(root), batch_size=2, image_size=16, num_threads=2,
                prefetch_buffer_size=4)
    base.update(kw)
    return base


def collect(ds):
    batches = list(ds)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ----------------------------------------------------------------------------- images


def test_load_image_rgb_and_broken_files(tmp_path):
    rng = np.random.default_rng(1)
    rgb = random_rgb(rng, 8)
    np.testing.assert_array_equal(data.load_image(save(str(tmp_path / "a.png"), rgb), 8), rgb)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(InputError, match=str(bad)):
        data.load_image(bad, 8)
    # A truncated PNG is reported too, not silently padded.
    whole = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="cut.png"):
        data.load_image(tmp_path / "cut.png", 8)


def test_load_image_decodes_like_the_command_lines(tmp_path):
    """One reader (imageio.read_rgb) for the CLIs, training data and experiments: for every colour
    mode and an EXIF-rotated file, the data reader gives exactly the CLI reader's pixels, or
    refuses the file (naming it) exactly when the CLI reader does. Where a mode is accepted, its
    pixels are also checked against the hand-made expectation."""
    rng = np.random.default_rng(1)
    rgb = random_rgb(rng, 8)
    gray = rgb[..., 0]
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "p.png")
    exif = Image.Exif()
    exif[0x0112] = 3  # EXIF orientation: rotated by 180 degrees
    Image.fromarray(rgb).save(tmp_path / "turned.png", exif=exif)
    cases = {  # file -> expected uint8 RGB where accepted (None: only agreement is checked)
        save(str(tmp_path / "g.png"), gray): np.repeat(gray[..., None], 3, axis=-1),
        # fully transparent: the colours are kept as stored
        save(str(tmp_path / "t.png"), np.concatenate([rgb, np.zeros((8, 8, 1), np.uint8)], -1)): rgb,
        str(tmp_path / "p.png"): np.asarray(pal.convert("RGB")),
        save(str(tmp_path / "deep.png"), np.full((8, 8), 1000, np.uint16)): None,
        str(tmp_path / "turned.png"): None,
    }
    for path, expected in cases.items():
        try:
            reference = imageio.to_uint8(imageio.read_rgb(path, min_size=1))
        except InputError:
            with pytest.raises(InputError, match=path):
                data.load_image(path, 8)
            continue
        got = data.load_image(path, 8)
        np.testing.assert_array_equal(got, reference)
        if expected is not None:
            np.testing.assert_array_equal(got, expected)


def test_load_image_crop_and_resize(tmp_path):
    rng = np.random.default_rng(2)
    centre = random_rgb(rng, 16)
    wide = np.zeros((16, 26, 3), np.uint8)
    wide[:, :5] = (0, 255, 0)
    wide[:, 21:] = (0, 255, 0)
    wide[:, 5:21] = centre  # (26 - 16) // 2 = 5 columns cut on the left, 5 on the right
    np.testing.assert_array_equal(data.load_image(save(str(tmp_path / "w.png"), wide), 16), centre)
    # 32 -> 16 with LANCZOS (support 3 output pixels): far from the edge, halves keep their colour.
    halves = np.zeros((32, 32, 3), np.uint8)
    halves[:, :16] = (200, 10, 30)
    halves[:, 16:] = (5, 60, 250)
    out = data.load_image(save(str(tmp_path / "h.png"), halves), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :5], np.broadcast_to((200, 10, 30), (16, 5, 3)))
    np.testing.assert_array_equal(out[:, 11:], np.broadcast_to((5, 60, 250), (16, 5, 3)))
    assert np.all(out[:, 7, 0] > out[:, 8, 0])  # the edge is between columns 7 and 8
    # Lanczos-3 rings with two lobes before a step (an overshoot, and an undershoot before it);
    # bilinear and box do not ring, bicubic has one lobe.
    assert np.all(out[:, 6, 0] > 200) and np.all(out[:, 5, 0] < 200)
    const = np.full((200, 300, 3), (17, 99, 230), np.uint8)  # 300 wide, 200 high
    np.testing.assert_array_equal(data.load_image(save(str(tmp_path / "c.png"), const), 16),
                                  np.full((16, 16, 3), (17, 99, 230), np.uint8))


def test_list_images(folder, tmp_path):
    root, arrays = folder
    assert data.list_images(root) == sorted(arrays)
    assert data.list_images(root)[:3] == ["01.png", "02.png", "04.PNG"]
    with pytest.raises(InputError, match="does not exist"):
        data.list_images(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "a.txt").write_text("x")
    with pytest.raises(InputError, match=f"no images .* found in {tmp_path / 'empty'}"):
        data.list_images(tmp_path / "empty")
    with pytest.raises(InputError, match="no images"):
        loader.make_dataset(cfg(tmp_path / "empty"), "train", process_index=0, process_count=1)
    with pytest.raises(InputError, match="does not exist"):
        loader.make_dataset(cfg(tmp_path / "nope"), "train", process_index=0, process_count=1)


# ----------------------------------------------------------------------------- split


def _splitmix64_reference(x):
    """splitmix64 written from its definition with Python integers."""
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_split_is_seeded_permutation():
    # The first output of splitmix64 seeded with 0 (the published test value).
    assert int(sources._splitmix64(np.uint64(0))) == 0xE220A8397B1DCDAF
    for seed in (0, 7):
        s = _splitmix64_reference(seed)
        keys = [_splitmix64_reference(i ^ s) for i in range(50)]
        expected_val = sorted(sorted(range(50), key=keys.__getitem__)[:5])
        assert data.split_indices(50, "val", split_seed=seed).tolist() == expected_val
    train = data.split_indices(70000, "train")
    val = data.split_indices(70000, "val")
    assert (len(train), len(val)) == (63000, 7000)
    assert not np.intersect1d(train, val).size
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(70000))
    np.testing.assert_array_equal(val, data.split_indices(70000, "val"))
    assert not np.array_equal(val, data.split_indices(70000, "val", split_seed=1))
    with pytest.raises(InputError, match="split"):
        data.split_indices(10, "test")


# ----------------------------------------------------------------------------- pipelines


def test_folder_pipeline_values_and_split(folder):
    root, arrays = folder
    names = sorted(arrays)
    seen = []
    for split in ("train", "val"):
        got = collect(loader.make_dataset(cfg(root, batch_size=1), split, process_index=0,
                                          process_count=1, shuffle=False, num_epochs=1))
        assert got["image"].dtype == np.float32 and got["image"].shape[1:] == (16, 16, 3)
        np.testing.assert_array_equal(got["index"], data.split_indices(11, split))
        for img, i in zip(got["image"], got["index"]):
            np.testing.assert_array_equal(img, arrays[names[i]].astype(np.float32) / 255)
        seen.append(got["index"])
    assert len(seen[1]) == 1 and not np.intersect1d(*seen).size


def test_iterator_state_gives_exact_resume(folder, tmp_path):
    root, _ = folder
    config = ml_collections.ConfigDict(cfg(root, seed=5))
    it = iter(loader.make_dataset(config, "train", process_index=0, process_count=1))
    first = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))  # what an orbax checkpoint stores
    expected = [next(it) for _ in range(8)]
    resumed = iter(loader.make_dataset(config, "train", process_index=0, process_count=1))
    resumed.set_state(state)
    # The same through grain's orbax handler (what the trainer's checkpoint manager calls).
    ckpt = tmp_path / "data_state"
    ckpt.mkdir()
    saved = iter(loader.make_dataset(config, "train", process_index=0, process_count=1))
    for _ in range(3):
        next(saved)
    grain.checkpoint.CheckpointHandler().save(epath.Path(ckpt), item=saved)
    restored = grain.checkpoint.CheckpointHandler().restore(
        epath.Path(ckpt), item=iter(loader.make_dataset(config, "train")))
    for it_ in (resumed, restored):
        for a, b in zip(expected, [next(it_) for _ in range(8)]):
            assert a.keys() == b.keys() == {"image", "index"}
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    # 10 train images, batch 2: each epoch is a permutation of the split, reshuffled each epoch.
    order = np.concatenate([b["index"] for b in first + expected])[:20]
    train = data.split_indices(11, "train")
    np.testing.assert_array_equal(np.sort(order[:10]), train)
    np.testing.assert_array_equal(np.sort(order[10:]), train)
    assert not np.array_equal(order[:10], order[10:]) and not np.array_equal(order[:10], train)
    other = iter(loader.make_dataset(config, "train", process_index=0, process_count=1, seed=6))
    assert not np.array_equal(np.concatenate([next(other)["index"] for _ in range(5)]), order[:10])


def test_process_sharding(folder):
    root, _ = folder
    shards = [collect(loader.make_dataset(cfg(root, batch_size=2), "train", process_index=p,
                                          process_count=2, shuffle=True, num_epochs=1))
              for p in range(2)]
    assert [len(s["index"]) for s in shards] == [5, 5]  # 10 train images, local batch 1
    assert not np.intersect1d(shards[0]["index"], shards[1]["index"]).size
    np.testing.assert_array_equal(np.sort(np.concatenate([s["index"] for s in shards])),
                                  data.split_indices(11, "train"))
    ds = loader.make_dataset(cfg(root, batch_size=4), "train", process_index=1, process_count=2)
    assert next(iter(ds))["image"].shape == (2, 16, 16, 3)
    with pytest.raises(InputError, match="multiple of the process count 2"):
        loader.make_dataset(cfg(root, batch_size=3), "train", process_index=0, process_count=2)
    with pytest.raises(InputError, match="unknown data config keys \\['batch'\\]"):
        loader.make_dataset(dict(cfg(root), batch=2), "train", process_index=0, process_count=1)


def test_unreadable_image_names_the_file(folder):
    root, arrays = folder
    bad = root / sorted(arrays)[data.split_indices(11, "train")[3]]
    bad.write_bytes(b"garbage")
    it = iter(loader.make_dataset(cfg(root), "train", process_index=0, process_count=1))
    with pytest.raises(InputError, match=re.escape(str(bad))):
        for _ in range(10):
            next(it)


# ----------------------------------------------------------------------------- FFHQ*


@pytest.fixture(scope="module")
def generator_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("sg2") / "G.safetensors"
    return convert("convert_stylegan2.py", str(fixture("rosinality_sg2_256.pt")), out=out)


def synth_args(weights, out, n, *extra):
    return ["--weights", str(weights), "--n", str(n), "--out", str(out), "--seed",
            str(SYNTH_SEED), "--quiet", *extra]


@pytest.fixture(scope="module")
def ffhq(generator_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ffhq") / "full"
    assert synthesize.main(synth_args(generator_file, out, SYNTH_N, "--batch", str(SYNTH_BATCH))) == 0
    return out


def tree_bytes(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def test_ffhq_star_layout_and_generator_rules(ffhq, generator_file):
    meta = json.loads((ffhq / "meta.json").read_text())
    assert (meta["n"], meta["seed"], meta["truncation"], meta["batch"]) == (6, 3, 0.7, 4)
    assert meta["generator"]["source_sha256"] == stylegan2_source_sha(generator_file)
    assert sorted(os.listdir(ffhq / "images")) == [f"{i:06d}.png" for i in range(6)]
    mode = os.stat(ffhq / "images" / "000000.png").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    latents = np.load(ffhq / "latents.npy")
    assert latents.dtype == np.float32 and latents.shape == (6, 64)
    # The documented rules, recomputed here image by image.
    G = stylegan2.load(generator_file)
    z = np.stack([jax.random.normal(jax.random.fold_in(jax.random.key(SYNTH_SEED), i), (64,))
                  for i in range(4)])
    w = G.mapping(z, truncation=0.7)
    np.testing.assert_array_equal(latents[:4], np.asarray(w))
    x = np.asarray(G.synthesis(w, noise_mode="const"))
    expected = np.round(np.clip((x + 1) / 2, 0, 1) * 255).astype(np.uint8)
    for i in range(4):
        np.testing.assert_array_equal(np.asarray(Image.open(ffhq / "images" / f"{i:06d}.png")),
                                      expected[i])
    assert len({latents[i].tobytes() for i in range(6)}) == 6


def stylegan2_source_sha(generator_file):
    from ifadit_jax import weights

    return weights.read(generator_file)[1].source_sha256


def test_synthesize_resume_is_byte_identical(ffhq, generator_file, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    # First part through the real CLI, as a user would (sharing the compilation cache).
    env = {"JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
           "JAX_DEFAULT_MATMUL_PRECISION": "float32"}
    proc = run_cli("-m", "ifadit_jax.data.synthesize",
                   *synth_args(generator_file, out, 3, "--batch", str(SYNTH_BATCH)), env=env)
    assert "wrote FFHQ*" in proc.stdout
    assert sorted(os.listdir(out / "images")) == [f"{i:06d}.png" for i in range(3)]
    # An interruption after two more images (n=6, batch from meta.json), then a clean resume.
    real_write, calls = synthesize._write_png, []

    def failing_write(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[0])
        real_write(*args)

    monkeypatch.setattr(synthesize, "_write_png", failing_write)
    with pytest.raises(KeyboardInterrupt):
        synthesize.main(synth_args(generator_file, out, SYNTH_N))
    names = os.listdir(out / "images")
    assert len(names) == 5 and not [n for n in names if not n.endswith(".png") or n[0] == "."]
    with pytest.raises(InputError, match="incomplete \\(5 of 6 images\\)"):
        loader.make_dataset(dict(source="ffhq_star", path=str(out)), "train",
                              process_index=0, process_count=1)
    monkeypatch.setattr(synthesize, "_write_png", real_write)
    assert synthesize.main(synth_args(generator_file, out, SYNTH_N)) == 0
    assert tree_bytes(out) == tree_bytes(ffhq)


def test_synthesize_bad_arguments(ffhq, generator_file, tmp_path):
    proc = run_cli("-m", "ifadit_jax.data.synthesize", *synth_args(generator_file, tmp_path / "o", 0),
                   check=False)
    assert proc.returncode != 0 and proc.stderr.strip() == "error: --n must be at least 1, got 0"
    assert not (tmp_path / "o").exists()
    with pytest.raises(InputError, match="invalid int value: 'x'"):
        synthesize.main(["--weights", str(generator_file), "--n", "x", "--out", str(tmp_path)])
    with pytest.raises(InputError, match="does not exist"):
        synthesize.main(synth_args(tmp_path / "missing.safetensors", tmp_path / "o", 2))
    with pytest.raises(InputError, match="truncation 0.7, this run uses 0.5"):
        synthesize.main(synth_args(generator_file, ffhq, SYNTH_N, "--truncation", "0.5"))
    with pytest.raises(InputError, match="--batch 4, this run uses 2"):
        synthesize.main(synth_args(generator_file, ffhq, SYNTH_N, "--batch", "2"))
    with pytest.raises(InputError, match="at least 6"):
        synthesize.main(synth_args(generator_file, ffhq, 4))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        synthesize.main(synth_args(generator_file, tmp_path / "busy", 2))


def test_ffhq_star_pipeline_reads_back(ffhq):
    latents = np.load(ffhq / "latents.npy")
    config = dict(source="ffhq_star", path=str(ffhq), batch_size=1, num_threads=2)
    got = {s: collect(loader.make_dataset(config, s, process_index=0, process_count=1,
                                          shuffle=False, num_epochs=1)) for s in ("train", "val")}
    np.testing.assert_array_equal(got["val"]["index"], data.split_indices(6, "val"))
    assert len(got["val"]["index"]) == 1 and len(got["train"]["index"]) == 5
    for g in got.values():
        assert g["image"].shape[1:] == (256, 256, 3) and g["w"].shape[1:] == (64,)
        for img, w, i in zip(g["image"], g["w"], g["index"]):
            png = np.asarray(Image.open(ffhq / "images" / f"{i:06d}.png"))
            np.testing.assert_array_equal(img, png.astype(np.float32) / 255)
            np.testing.assert_array_equal(w, latents[i])


# ----------------------------------------------------------------------------- tfds / array_record


def test_tfds_pack_ffhq_star_without_tensorflow(ffhq, tmp_path):
    path = tfds_builder.pack(str(ffhq), str(tmp_path / "tfds"))
    assert os.path.basename(os.path.dirname(path)) == "ffhq_star"
    assert [f for f in os.listdir(path) if "array_record" in f] and "tensorflow" not in sys.modules
    latents = np.load(ffhq / "latents.npy")
    for split in ("train", "val"):
        got = collect(loader.make_dataset(
            dict(source="array_record", path=str(tmp_path / "tfds"), batch_size=1, num_threads=2),
            split, process_index=0, process_count=1, shuffle=False, num_epochs=1))
        np.testing.assert_array_equal(np.sort(got["index"]), data.split_indices(6, split))
        for img, w, i in zip(got["image"], got["w"], got["index"]):
            png = np.asarray(Image.open(ffhq / "images" / f"{i:06d}.png"))
            np.testing.assert_array_equal(img, png.astype(np.float32) / 255)
            np.testing.assert_array_equal(w, latents[i])
    assert "tensorflow" not in sys.modules
    with pytest.raises(InputError, match="split_seed, val_fraction = \\(0, 0.1\\)"):
        loader.make_dataset(dict(source="array_record", path=path, split_seed=1), "train",
                              process_index=0, process_count=1)
    with pytest.raises(InputError, match="already exists"):
        tfds_builder.pack(str(ffhq), str(tmp_path / "tfds"))


def test_tfds_cli_packs_a_folder(folder, tmp_path):
    root, arrays = folder
    # A JPEG is re-encoded as PNG (colour modes are the one reader's: test_load_image_decodes_...)
    ramp = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=-1)
    save(str(root / "zz_ramp.jpg"), ramp, quality=100)
    proc = run_cli("-m", "ifadit_jax.data.tfds_builder", str(root), str(tmp_path / "packed"),
                   "--image-size", "16")
    assert "wrote" in proc.stdout
    names = sorted(arrays) + ["zz_ramp.jpg"]
    config = cfg(tmp_path / "packed", source="array_record", batch_size=1)
    got = [collect(loader.make_dataset(config, s, process_index=0, process_count=1,
                                       shuffle=False, num_epochs=1)) for s in ("train", "val")]
    index = np.concatenate([g["index"] for g in got])
    image = np.concatenate([g["image"] for g in got])
    np.testing.assert_array_equal(np.sort(index), np.arange(12))
    for img, i in zip(image, index):
        expected = data.load_image(root / names[i], 16)  # the JPEG comes back as RGB
        np.testing.assert_array_equal(img, expected.astype(np.float32) / 255)
    with pytest.raises(InputError, match="holds 16 px images, but 256 px"):
        loader.make_dataset(dict(config, image_size=256), "train", process_index=0,
                            process_count=1)
    shutil.copy(root / "01.png", root / "bad.png")
    (root / "bad.png").write_bytes(b"nope")
    proc = run_cli("-m", "ifadit_jax.data.tfds_builder", str(root), str(tmp_path / "p2"),
                   "--image-size", "16", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 4 and last.startswith("error: ") and str(root / "bad.png") in last
    assert not os.path.exists(tmp_path / "p2" / "face_images" / "folder" / "1.0.0")
