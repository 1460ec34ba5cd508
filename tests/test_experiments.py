"""experiments/ (paper Tables 1-5) end to end on the built-in demo model.

The demo's numbers are meaningless (random weights); what is tested is the machinery: that every
value is computed from the images and keys it claims (checked against direct recomputation and
against an identity "anonymizer" whose metrics are known by hand), that keys follow the
documented seeded rule, that missing networks give "skipped" cells, and that the command line
writes every file and fails cleanly on bad input.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from experiments import evaluate as ev
from experiments import run, tables
from ifadit_jax import imageio, keys, pipeline, random_nets, weights, weights_folder
from ifadit_jax import roles as roles_lib
from ifadit_jax.errors import InputError, WeightsError
from tests.helpers import convert, fixture, run_cli

SEED = 3


@pytest.fixture(scope="module")
def pipe():
    return ev.demo_pipeline(seed=0)


@pytest.fixture(scope="module")
def mtcnn_file(tmp_path_factory):
    """The real facenet-pytorch MTCNN (tests/fixtures), through the real converter."""
    out = tmp_path_factory.mktemp("mtcnn") / "mtcnn.safetensors"
    return convert("convert_mtcnn.py", str(fixture("mtcnn_weights")), out=out)


@pytest.fixture(scope="module")
def nets(mtcnn_file):
    return ev.load_metric_nets({"mtcnn": str(mtcnn_file)}, demo=True)


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory):
    """Three aligned demo faces as PNG files (three images at batch 2: one padded batch)."""
    d = tmp_path_factory.mktemp("faces") / "faces"
    d.mkdir()
    for i, face in enumerate(ev.demo_faces(3)):
        imageio.write_rgb(d / f"face_{i}.png", face)
    return d


@pytest.fixture(scope="module")
def images(faces_dir):
    return np.stack([imageio.read_rgb(faces_dir / f"face_{i}.png") for i in range(3)])


@contextlib.contextmanager
def shared_between_workers(tmp_path_factory, name):
    """A folder that all pytest-xdist workers of this run share, held under an exclusive lock:
    the first worker fills it, the others wait and read it (compiling the same programs twice
    on CI's two cores would cost more than the wait)."""
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    root = tmp_path_factory.getbasetemp().parent / f"shared-{uid}" if uid else tmp_path_factory.getbasetemp()
    root.mkdir(exist_ok=True)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield root / name
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def produced(pipe, nets, faces_dir, tmp_path_factory):
    """Tables 1-4 of three faces (batch 2: one padded batch), written once per test run."""
    with shared_between_workers(tmp_path_factory, "experiments_tables") as out:
        if not (out / "done").exists():
            if out.exists():
                shutil.rmtree(out)
            dataset = ev.open_dataset(f"faces={faces_dir}")
            tables.produce(list(ev.TABLES), {"model": pipe}, [dataset], nets,
                           ev.KeyScheme(path="vector", seed=SEED), ev.Settings(batch=2, div_keys=3, samples=2),
                           out_dir=str(out), demo=True, progress=False)
            (out / "done").touch()
    return out


def table_json(out, name):
    return json.loads((out / f"{name}.json").read_text())


def per_image(out, name):
    with open(out / f"{name}_per_image.csv") as f:
        return list(csv.DictReader(f))


def column(rows, key):
    return np.array([float(r[key]) for r in rows])


def documented_keys(pipe, stream_id, indices):
    """The documented vector rule, written out: u = (U[0, 1) + 1) / 2 from
    fold_in(fold_in(key(seed), stream), index); k = f(u)."""
    base = jax.random.fold_in(jax.random.key(SEED), stream_id)
    u = np.stack([(np.asarray(jax.random.uniform(jax.random.fold_in(base, i), (512,))) + 1) / 2
                  for i in indices])
    return np.asarray(keys.key_from_vector(jnp.asarray(u), pipeline.mapping(pipe.nets)))


def in_pairs(fn, *arrays):
    """fn over rows 0-1 and 2 (padded to 2): the batch-2 programs the tables compiled."""
    out = []
    for s in (slice(0, 2), slice(2, 3)):
        chunk = [a[s] if len(a[s]) == 2 else np.concatenate([a[s], a[s]]) for a in arrays]
        out.append(np.asarray(fn(*chunk))[:len(arrays[0][s])])
    return np.concatenate(out)


identity = jax.jit(pipeline.identity)


def embed_arcface(pipe, images):
    return in_pairs(lambda x: identity(pipe.nets, x), images)


def anonymize_pairs(pipe, images, k):
    """X_anon clipped to [0, 1] as the tables view it."""
    return np.clip(in_pairs(lambda x, kk: pipe.anonymize(x, kk)[0], images, k), 0, 1)


def cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_every_file_is_written(produced):
    out = produced
    for name in ev.TABLES:
        for path in tables.output_paths(str(out), name):
            assert (out / path.rsplit("/", 1)[-1]).stat().st_size > 0
        md = (out / f"{name}.md").read_text()
        meta = table_json(out, name)
        assert md.startswith(f"## {meta['title']}") and "DEMO" in md and "### Settings" in md
        assert meta["keys"]["path"] == "vector" and meta["keys"]["seed"] == SEED
        assert meta["datasets"][0]["evaluated"] == 3 and meta["settings"]["batch"] == 2
        assert len(meta["keys"]["u_sha256"]["faces"]["anon"]) == 64
        grid = Image.open(out / f"{name}_samples.png")
        assert grid.height > 2 * tables.TILE  # two sample rows
    # Table 3 and 4 used the wrong-key and diversity streams, Table 1 only needed "anon".
    assert set(json.loads((out / "table3.json").read_text())["keys"]["u_sha256"]["faces"]) == {"anon", "wrong", "div1", "div2"}


def test_table1_is_the_cosine_of_the_seeded_keys_anonymization(produced, pipe, images):
    """Recomputed here from the documented key rule: image i's key comes from its index, so the
    padded last batch and the batching do not change it."""
    out = produced
    rows = per_image(out, "table1")
    assert [r["file"] for r in rows] == ["face_0.png", "face_1.png", "face_2.png"]
    k = documented_keys(pipe, 0, [0, 1, 2])
    anon = anonymize_pairs(pipe, images, k)
    e_x, e_anon = embed_arcface(pipe, images), embed_arcface(pipe, anon)
    np.testing.assert_allclose(column(rows, "anon_cos_arcface"), cos(e_anon, e_x), atol=2e-6)
    np.testing.assert_allclose(column(rows, "anon_l1_arcface"), np.mean(np.abs(e_anon - e_x), -1), atol=2e-7)
    # The summary row is the mean of the per-image values, in the CSV and the Markdown.
    with open(out / "table1.csv") as f:
        summary = next(csv.DictReader(f))
    assert summary["dataset"] == "faces" and summary["n"] == "3"
    mean = column(rows, "anon_cos_arcface").mean()
    assert float(summary["anon_cos_arcface"]) == pytest.approx(mean, abs=1e-12)
    assert float(summary["anon_cos_arcface_std"]) == pytest.approx(column(rows, "anon_cos_arcface").std(), abs=1e-12)
    assert f"| faces | 3 | {mean:.4f} |" in (out / "table1.md").read_text()


def test_table3_recovers_with_the_right_and_the_wrong_key(produced, pipe, images):
    out = produced
    rows = per_image(out, "table3")
    k = documented_keys(pipe, 0, [0, 1])
    k_wrong = documented_keys(pipe, 1, [0, 1])
    x = images[:2]
    anon = np.asarray(pipe.anonymize(x, k)[0])  # recovery gets the raw output (not --quantize)
    mses = []
    for which, kk in (("rec", k), ("wrong", k_wrong)):
        rec = np.clip(np.asarray(pipe.recover(anon, kk)[0]), 0, 1)
        mse = np.mean((rec.astype(np.float64) - x) ** 2, axis=(1, 2, 3))
        mses.append(mse)
        np.testing.assert_allclose(column(rows, f"{which}_mse")[:2], mse, rtol=1e-5)
        # PSNR = 10 log10(1 / MSE) for data range 1
        np.testing.assert_allclose(column(rows, f"{which}_psnr")[:2], 10 * np.log10(1 / mse), atol=1e-4)
        e, e_x = identity(pipe.nets, rec), identity(pipe.nets, x)
        np.testing.assert_allclose(column(rows, f"{which}_cos_arcface")[:2], cos(e, e_x), atol=2e-6)
    # the two keys give different recoveries, well beyond the tolerance above
    assert np.all(np.abs(mses[0] - mses[1]) > 1e-3 * mses[0])


def test_table4_pairwise_cosines_and_angles(produced, pipe, images):
    """Three keys per face: 'anon' (stream 0) and 'div1', 'div2' (streams 2, 3); mean pairwise
    cosine and KFFA = mean pairwise angle in degrees, recomputed with numpy's arccos."""
    out = produced
    rows = per_image(out, "table4")
    e = np.stack([embed_arcface(pipe, anonymize_pairs(pipe, images, documented_keys(pipe, stream, [0, 1, 2])))
                  for stream in (0, 2, 3)], axis=1)
    pairs = [(0, 1), (0, 2), (1, 2)]
    cosines = np.stack([cos(e[:, a], e[:, b]) for a, b in pairs], axis=1)
    np.testing.assert_allclose(column(rows, "div_cos_arcface"), cosines.mean(1), atol=2e-6)
    angles = np.degrees(np.arccos(np.clip(cosines, -1, 1)))
    assert angles.min() > 0.1  # the keys give different identities (else the check is vacuous)
    # float32 embeddings: about 1e-7 on a cosine, 1e-7 / sin(0.1 deg) rad on an angle
    np.testing.assert_allclose(column(rows, "div_kffa_arcface"), angles.mean(1), atol=5e-3)


def test_table2_detection_and_fid_columns(produced):
    out = produced
    rows = per_image(out, "table2")
    assert column(rows, "det_original").tolist() == [1.0, 1.0, 1.0]  # real faces, real MTCNN
    row = table_json(out, "table2")["rows"][0]
    assert row["det_original"]["mean"] == 1.0
    det_anon = column(rows, "det_anonymized")
    box = column(rows, "box_l1")
    assert np.array_equal(np.isnan(box), det_anon == 0)  # L1 only where both have a face
    if not det_anon.any():  # undefined, and said so: never a zero
        assert row["box_l1"]["n"] == 0 and "no image has a face" in row["box_l1"]["na"]
        assert "| n/a |" in (out / "table2.md").read_text()
    assert np.isfinite(row["fid"]["value"]) and row["fid"]["n"] == 3 and "note" in row["fid"]


class IdentityPipe:
    """An 'anonymizer' and 'recovery' that return their input: every metric is known by hand."""

    def __init__(self, base):
        self.nets, self.weights_id, self.conventions = base.nets, "identity", base.conventions

    def anonymize(self, x, k, refine=True):
        return jnp.asarray(x), {}

    recover = anonymize


def test_identity_anonymizer_gives_the_hand_values(pipe, nets):
    """X_anon = X_rec = X: cosine 1, L1 0, same detections (box and landmark L1 0), FID 0,
    MSE 0, PSNR inf, SSIM 1, LPIPS 0, mean pairwise cosine 1 and KFFA 0."""
    res = ev.evaluate(IdentityPipe(pipe), nets, ev.demo_dataset(2), ev.KeyScheme(seed=SEED),
                      ev.Settings(batch=2, div_keys=2, samples=0),
                      ev.NEEDS["table2"] | ev.NEEDS["table3"] | ev.NEEDS["table4"])
    v = res.values
    for m in ("arcface", "adaface"):
        np.testing.assert_allclose(v[f"anon_cos_{m}"], 1, atol=1e-6)
        np.testing.assert_array_equal(v[f"anon_l1_{m}"], 0)
        np.testing.assert_allclose(v[f"rec_cos_{m}"], 1, atol=1e-6)
        np.testing.assert_allclose(v[f"div_cos_{m}"], 1, atol=1e-6)
        np.testing.assert_allclose(v[f"div_kffa_{m}"], 0, atol=1e-6)
    np.testing.assert_array_equal(v["det_original"], 1)
    np.testing.assert_array_equal(v["det_anonymized"], 1)
    np.testing.assert_array_equal(v["box_l1"], 0)
    np.testing.assert_array_equal(v["landmark_l1"], 0)
    np.testing.assert_array_equal(v["rec_mse"], 0)
    assert np.isposinf(v["rec_psnr"]).all()
    np.testing.assert_allclose(v["rec_ssim"], 1, atol=1e-6)
    np.testing.assert_allclose(v["rec_lpips"], 0, atol=1e-12)  # one trunk pass for both: rounding
    assert abs(res.fid["value"]) < 1e-4


def test_missing_networks_are_skipped_not_zero(pipe, faces_dir, tmp_path):
    """Without AdaFace, LPIPS, Inception and MTCNN the columns say 'skipped' in every format."""
    none = ev.load_metric_nets({})
    assert none.skipped("adaface") == "no adaface weights given (--adaface)"
    made = tables.produce(["table2"], {"model": pipe}, [ev.open_dataset(str(faces_dir), limit=2)],
                          none, ev.KeyScheme(seed=SEED), ev.Settings(batch=2, samples=1),
                          out_dir=str(tmp_path), progress=False)
    row = made["table2"].rows[0]
    assert all(row[c.key] == {"skipped": none.skipped(r)} for c, r in
               zip(tables.T2_COLUMNS, ["mtcnn"] * 4 + ["inception"]))
    md = (tmp_path / "table2.md").read_text()
    assert md.count("| skipped") == 5 and "FID skipped: no inception weights given (--inception)." in md
    with open(tmp_path / "table2.csv") as f:
        assert next(csv.DictReader(f))["fid"] == "skipped"
    # Table 3's AdaFace and LPIPS cells likewise, from results computed without them.
    res = ev.evaluate(pipe, none, ev.demo_dataset(2), ev.KeyScheme(seed=SEED),
                      ev.Settings(batch=2, samples=0), ev.NEEDS["table3"])
    assert "rec_lpips" not in res.values and "rec_cos_adaface" not in res.values
    t3 = tables.table3([res], none, {})
    assert t3.rows[0]["lpips"] == {"skipped": "no lpips weights given (--lpips)"}
    assert "| skipped | " in t3.markdown() and "skipped" in t3.csv()


def test_photos_are_aligned_with_mtcnn_and_faceless_ones_listed(pipe, nets, tmp_path):
    """--align (LFW-like photos): the largest MTCNN face is aligned to the FFHQ crop; the
    astronaut's crop matches the one from her known landmarks (demo face 0); a photo without a
    face is left out and listed."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(fixture("mtcnn_images") / "astronaut.png", photos / "a.png")
    imageio.write_rgb(photos / "b.png", np.full((200, 300, 3), 0.5, np.float32))
    dataset = ev.open_dataset(f"lfw={photos}", align_faces=True)
    assert dataset.layout == "photo" and dataset.files == ["a.png", "b.png"]
    got = dict(ev.iter_images(dataset, nets.mtcnn))
    assert got[1] is None
    assert np.abs(got[0] - ev.demo_faces(1)[0]).mean() < 0.01
    res = ev.evaluate(pipe, nets, dataset, ev.KeyScheme(seed=SEED), ev.Settings(batch=2, samples=0),
                      ev.NEEDS["table1"])
    assert res.files == ["a.png"] and res.no_face == ["b.png"] and len(res.values["anon_cos_arcface"]) == 1
    with pytest.raises(InputError, match="needs MTCNN"):
        ev.evaluate(pipe, ev.MetricNets(), dataset, ev.KeyScheme(), ev.Settings(), ev.NEEDS["table1"])


def test_kdf_keys_follow_the_recorded_secret_rule(pipe):
    kdf = keys.KdfParams(memory_cost=64, iterations=1)
    scheme = ev.KeyScheme(path="kdf", seed=SEED, kdf=kdf)
    u = scheme.vectors("div2", [5])
    secret = f"ifadit-jax/experiments/seed={SEED}/div2/5".encode()
    np.testing.assert_array_equal(u[0], keys.normalize_bytes(keys.kdf_bytes(secret, kdf)))
    assert scheme.to_dict()["kdf"] == kdf.to_dict()
    # different index, stream or seed: unrelated bytes
    assert not np.array_equal(u, scheme.vectors("div2", [6]))
    assert not np.array_equal(u, scheme.vectors("div1", [5]))


def test_cli_all_on_the_demo_with_kdf_keys(mtcnn_file, faces_dir, tmp_path):
    """The command line in-process (the programs compiled above are reused)."""
    out = tmp_path / "cli"
    argv = ["all", "--demo", "--images", f"faces={faces_dir}", "--limit", "2", "--batch", "2",
            "--div-keys", "2", "--samples", "1", "--mtcnn", str(mtcnn_file), "--key-path", "kdf",
            "--kdf-memory-kib", "64", "--kdf-iterations", "1", "--out", str(out), "--quiet"]
    assert run.main(argv) == 0
    meta = json.loads((out / "table4.json").read_text())
    assert meta["keys"]["path"] == "kdf" and meta["keys"]["kdf"]["memory_cost"] == 64
    assert meta["command"].startswith("python -m experiments.run all --demo")
    assert meta["metric_networks"]["mtcnn"]["source_file"] == "mtcnn_weights"
    assert "random_seed" in meta["metric_networks"]["adaface"]
    assert meta["pipelines"][0]["weights_id"] == "random-0"
    # an existing table is kept unless --force
    with pytest.raises(InputError, match="output exists"):
        run.main(argv)


def save_weights_folder(pipe, out, roles=tuple(roles_lib.ROLES)):
    """Writes an in-memory demo pipeline as a weights folder (what a trainer exports)."""
    nets = pipe.nets
    networks = {}
    for role in roles:
        name, kind = roles_lib.ROLES[role].file, roles_lib.ROLES[role].kind
        if role == "flow":
            config = nets.modules["flow"].config.to_json()
        else:
            config = random_nets.SMALL_CONFIGS[role]
        networks[role] = (name, nets.file_variables(role), weights.Meta(kind=kind, config=config))
    weights_folder.write(out, networks, "official")
    return out


def test_table5_on_the_demo_ablations_and_from_weights_folders(faces_dir, tmp_path):
    common = ["--images", f"faces={faces_dir}", "--limit", "2", "--batch", "2", "--div-keys", "2",
              "--samples", "1", "--quiet"]
    assert run.main(["table5", "--demo", *common, "--out", str(tmp_path / "demo")]) == 0
    with open(tmp_path / "demo" / "table5.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == list(ev.ABLATIONS)
    by = {r["variant"]: r for r in rows}
    # same images and keys: variants with the same flow agree on Table 1 ...
    assert by["no_icl"]["anon_cos_arcface"] == by["full"]["anon_cos_arcface"]
    # ... recovery differs without ICL, and anonymization with another flow
    assert by["no_icl"]["rec_psnr"] != by["full"]["rec_psnr"]
    assert by["no_div"]["anon_cos_arcface"] != by["full"]["anon_cos_arcface"]
    meta = json.loads((tmp_path / "demo" / "table5.json").read_text())
    assert [p["icl"] for p in meta["pipelines"]] == [True, True, True, False, True]
    assert Image.open(tmp_path / "demo" / "table5_samples.png").height >= 5 * tables.TILE

    # The same two variants as weights folders (no_icl without icl.safetensors): the same numbers.
    variants = ev.demo_ablations(ev.demo_pipeline(0))
    full = save_weights_folder(variants["full"], tmp_path / "full")
    no_icl = save_weights_folder(variants["no_icl"], tmp_path / "no_icl",
                                 [r for r in roles_lib.ROLES if r != "icl"])
    assert run.main(["table5", "--ablation", f"full={full}", "--ablation", f"no_icl={no_icl}", *common,
                     "--out", str(tmp_path / "folders")]) == 0
    with open(tmp_path / "folders" / "table5.csv") as f:
        folder_rows = {r["variant"]: r for r in csv.DictReader(f)}
    for variant in ("full", "no_icl"):
        for key in ("anon_cos_arcface", "rec_psnr", "rec_ssim", "rec_cos_arcface", "wrong_cos_arcface",
                    "div_kffa_arcface"):
            assert float(folder_rows[variant][key]) == pytest.approx(float(by[variant][key]), rel=1e-6, abs=1e-6)
        # no metric networks given (no --demo): AdaFace and LPIPS are skipped, not zero
        assert folder_rows[variant]["rec_lpips"] == "skipped"
    meta = json.loads((tmp_path / "folders" / "table5.json").read_text())
    assert [(p["variant"], p["icl"]) for p in meta["pipelines"]] == [("full", True), ("no_icl", False)]
    assert "AdaFace columns skipped" in (tmp_path / "folders" / "table5.md").read_text()


def test_bad_inputs_fail_before_any_work(faces_dir, mtcnn_file, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(WeightsError, match="manifest.json"):
        run.main(["table1", "--weights", str(tmp_path), "--images", str(faces_dir), "--out", str(out)])
    with pytest.raises(InputError, match="does not exist"):
        run.main(["table1", "--demo", "--images", str(tmp_path / "nope"), "--out", str(out)])
    with pytest.raises(InputError, match="--ablation"):
        run.main(["table5", "--images", str(faces_dir), "--out", str(out)])
    with pytest.raises(InputError, match="--weights DIR"):
        run.main(["table3", "--images", str(faces_dir), "--out", str(out)])
    with pytest.raises(WeightsError, match="holds a 'mtcnn' network, expected 'adaface'"):
        run.main(["table1", "--demo", "--adaface", str(mtcnn_file), "--out", str(out)])
    assert not out.exists()


def test_cli_error_is_one_line(faces_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("-m", "experiments.run", "table1", "--weights", str(tmp_path), "--images",
                   str(faces_dir), "--out", str(out), check=False)
    assert proc.returncode == WeightsError.exit_code
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "manifest.json" in lines[0]
    assert not out.exists()


def test_sample_grid_draws_degenerate_and_outside_boxes():
    """A random detector (the demo's) returns corners in either order, boxes off the image and
    NaN; the grid draws what lies inside the tile and nothing else (README's `all --demo` once
    crashed here)."""
    # Tile 100 px for a 50 px image: scale 2; coordinates are clipped to [0, 99].
    assert tables._box_on_tile([30, 40, 10, 5], 2.0, 100) == [20.0, 10.0, 60.0, 80.0]
    assert tables._box_on_tile([-10, 20, 80, 30], 2.0, 100) == [0.0, 40.0, 99.0, 60.0]
    assert tables._box_on_tile([60, 60, 70, 90], 2.0, 100) is None    # wholly right of the image
    assert tables._box_on_tile([10, 10, 10, 30], 2.0, 100) is None    # zero width
    assert tables._box_on_tile([np.nan, 1, 2, 3], 2.0, 100) is None
    image = np.zeros((50, 50, 3), np.float32)
    detections = [(np.array([30.0, 40.0, 10.0, 5.0]), np.array([[np.nan, 1.0], [500.0, 2.0], [10.0, 10.0]])),
                  (np.array([60.0, 60.0, 70.0, 90.0]), np.zeros((5, 2))), None]
    canvas = tables.grid("t", ["a", "b", "c"], [[(image, "x", d) for d in detections]], tile=100)
    tiles = np.asarray(canvas)[2 * tables.HEADER:2 * tables.HEADER + 100]
    first = tiles[:, :100]
    # the reordered box's outline (green) at x = 20..60, y = 10..80, and the one landmark in range
    assert tuple(first[10, 40]) == (0, 255, 0) and tuple(first[45, 20]) == (0, 255, 0)
    assert tuple(first[20, 20]) == (255, 0, 0)
    assert tuple(first[45, 40]) == (0, 0, 0)                          # inside the box: untouched
    # the box off the image leaves nothing but its in-range landmarks at (0, 0)
    assert not np.any(tiles[:, 100:200][5:, 5:])
    assert not np.any(tiles[:, 200:300])


def test_separate_arcface_is_evaluated_on_the_official_idloss_path(pipe, tmp_path):
    """`--arcface FILE` embeds through pipeline.identity with that network standing in for E_ID:
    the official IDLoss features of the fixture (x in [-1, 1] -> ours in [0, 1])."""
    path = convert("convert_arcface.py", str(fixture("arcface_ir_se50.pth")), out=tmp_path / "arcface.safetensors")
    nets = ev.load_metric_nets({"arcface": str(path)})
    with np.load(fixture("arcface_ir_se50_io.npz")) as io:
        x256, want = np.transpose(io["x256"], (0, 2, 3, 1)), io["id_feats"]
    got = ev.embed(nets, pipe.nets, (x256 + 1.0) / 2.0)["arcface"]
    # test_arcface.py's tolerance for id_feats (10x the float64-vs-float32 difference)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6)
