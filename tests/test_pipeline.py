"""End-to-end: the official release converts into a weights folder and the pipeline reproduces
the official anonymize and recover passes (fixture README section 12)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ifadit_jax import pipeline, random_nets, roles
from ifadit_jax.errors import InputError, WeightsError
from tests.helpers import RELEASE_FIXTURES, fixture, load_npz, nchw_to_nhwc, run_cli

def make_release_dir(path, skip=()):
    path.mkdir()
    for name, src in RELEASE_FIXTURES.items():
        if name not in skip:
            os.symlink(fixture(src), path / name)
    return path


@pytest.fixture(scope="module")
def pipe(release_weights):
    return pipeline.load(release_weights)


@pytest.fixture(scope="module")
def e2e():
    return load_npz("ifadit_e2e_io.npz")


def nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


# Tolerances: 10x the float64-vs-float32 column of fixture README section 12.
TOL = {"id_vec": 3e-6, "id_anon": 2.3e-5, "attr_codes": 1.1e-6, "wplus_anon": 1.7e-5,
       "img_anon": 8.3e-6, "id_vec_of_anon": 1.9e-6, "id_compensated": 3.5e-6,
       "id_recovered": 6.2e-5, "attr_codes_of_anon": 1.1e-6, "wplus_rec": 3e-5, "img_rec": 1.8e-5,
       "wplus_rec_wrong_key": 3.5e-5}


def check(name, got, want):
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL[name], rtol=0, err_msg=name)


def test_manifest(release_weights, pipe):
    manifest = json.loads((release_weights / "manifest.json").read_text())
    assert manifest["conventions"] == "official" and pipe.conventions == pipeline.OFFICIAL
    assert set(manifest["files"]) == set(roles.ROLES)
    assert manifest["files"]["flow"]["source_file"] == "G_net_15.pth"
    assert len(pipe.weights_id) == 16 and pipe.weights_id == manifest["weights_id"]


def test_official_key_path(pipe, e2e):
    u = np.broadcast_to(e2e["u"], (2, 512))
    np.testing.assert_allclose(pipe.key_from_vector(u), e2e["k"], atol=2e-5, rtol=0)


def test_anonymize_matches_official(pipe, e2e):
    out, inter = pipe.anonymize(nchw_to_nhwc(e2e["x"]), e2e["k"], refine=False)
    check("id_vec", inter["z"], e2e["id_vec"])
    check("id_anon", inter["z_anon"], e2e["id_anon"])
    check("attr_codes", inter["attr"], e2e["attr_codes"])
    check("wplus_anon", inter["wplus"], e2e["wplus_anon"])
    check("img_anon", nchw(out), e2e["img_anon"])
    assert inter["mask"] is None


def test_recover_matches_official(pipe, e2e):
    anon = nchw_to_nhwc(e2e["img_anon"])
    out, inter = pipe.recover(anon, e2e["k"], refine=False)
    check("id_vec_of_anon", inter["z"], e2e["id_vec_of_anon"])
    check("id_compensated", inter["z_comp"], e2e["id_compensated"])
    check("id_recovered", inter["z_rec"], e2e["id_recovered"])
    check("attr_codes_of_anon", inter["attr"], e2e["attr_codes_of_anon"])
    check("wplus_rec", inter["wplus"], e2e["wplus_rec"])
    check("img_rec", nchw(out), e2e["img_rec"])
    _, wrong = pipe.recover(anon, e2e["k_wrong"], refine=False)
    check("wplus_rec_wrong_key", wrong["wplus"], e2e["wplus_rec_wrong_key"])


def test_refinement_blends_with_the_parser_mask(pipe, e2e):
    """With refinement, the output is mask*generated + (1-mask)*input, the mask coming from the
    face parser on the image whose background is kept (Eq. 11)."""
    x = nchw_to_nhwc(e2e["x"])
    one_key = e2e["k"][0]  # one [512] key for the whole batch
    out, inter = pipe.anonymize(x, one_key, refine=True)
    mask = np.asarray(inter["mask"])
    # float32 Gaussian taps (as cv2 stores them) can sum to 1 + 1 ulp
    assert mask.shape == (2, 256, 256, 1) and mask.min() >= 0 and mask.max() <= 1 + 1e-6
    want = mask * np.asarray(inter["generated"]) + (1 - mask) * x
    np.testing.assert_allclose(out, want, atol=1e-6)
    np.testing.assert_allclose(inter["generated"], nchw_to_nhwc(e2e["img_anon"]), atol=TOL["img_anon"])
    from ifadit_jax import refine
    assert roles.ROLES["parser"].kind == "bisenet"
    want_mask = refine.face_mask_from_parser(pipe.nets.module("parser"), pipe.nets["parser"], jnp.asarray(x))
    np.testing.assert_allclose(mask, want_mask, atol=1e-6)


def test_pure_functions_jit_and_grad(pipe, e2e):
    """`anonymize` is a pure function of the Nets pytree: it jits, and gradients flow to the
    flow's parameters (what phase-2 training needs)."""
    x = jnp.asarray(nchw_to_nhwc(e2e["x"]))
    k = jnp.asarray(e2e["k"])

    def loss(flow_params):
        nets = pipe.nets.with_variables({"flow": flow_params})
        out, _ = pipeline.anonymize(nets, x, k, refine=False)
        return jnp.mean(out)

    g = jax.jit(jax.grad(loss))(pipe.nets["flow"])
    norms = [float(jnp.abs(leaf).sum()) for leaf in jax.tree.leaves(g)]
    assert all(np.isfinite(norms)) and sum(norms) > 0


def test_bad_calls(pipe, e2e):
    with pytest.raises(InputError, match="256, 256, 3"):
        pipe.anonymize(np.zeros((1, 128, 128, 3)), e2e["k"][0])
    with pytest.raises(InputError, match="key"):
        pipe.anonymize(np.zeros((1, 256, 256, 3)), np.zeros(100))


def test_incomplete_weights_folder(tmp_path, release_weights):
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in release_weights.iterdir():
        if f.name != "sif.safetensors":
            os.symlink(f, partial / f.name)
    with pytest.raises(WeightsError, match="sif.safetensors"):
        pipeline.load(partial)
    # A file of another network under the flow's name.
    os.symlink(release_weights / "icl.safetensors", partial / "sif.safetensors")
    with pytest.raises(WeightsError, match="holds a 'icl' network, expected 'sif'"):
        pipeline.load(partial)
    with pytest.raises(WeightsError, match="manifest.json"):
        pipeline.load(tmp_path)


def test_release_converter_bad_input(tmp_path):
    src = make_release_dir(tmp_path / "official", skip=("mlp_best.pth",))
    out = tmp_path / "weights"
    proc = run_cli("ports/convert_ifadit.py", "release", str(src), str(out), check=False)
    assert proc.returncode != 0 and "mlp_best.pth" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()
    # A file of the wrong network under an official name: nothing is left behind either.
    os.symlink(fixture("ifadit_icl_fusion_mapper10.pth"), src / "mlp_best.pth")
    os.unlink(src / "550000.pt")
    os.symlink(fixture("ifadit_mlp_latent_mapper.pth"), src / "550000.pt")
    proc = run_cli("ports/convert_ifadit.py", "release", str(src), str(out), check=False)
    assert proc.returncode != 0 and proc.stderr.startswith("error: ")
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_conventions_are_checked_against_the_weights(tmp_path, release_weights):
    """The official release (AllInOne flow, E_Attr on [0, 1]) cannot be run under the paper's
    conventions by mistake; the built-in model follows whichever conventions it is given."""
    copy = tmp_path / "w"
    copy.mkdir()
    for f in release_weights.iterdir():
        if f.name != "manifest.json":
            os.symlink(f, copy / f.name)
    manifest = json.loads((release_weights / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "conventions": "paper"}))
    with pytest.raises(WeightsError, match="'allinone' variant but the 'paper' conventions"):
        pipeline.load(copy)
    paper = random_nets.random_pipeline(0, conventions=pipeline.PAPER)
    assert paper.nets.modules["flow"].config.variant == "sacb"
    assert tuple(paper.nets.modules["attr_encoder"].input_range) == (-1.0, 1.0)


def test_the_key_mapping_is_traced_once(pipe, monkeypatch):
    """Every key derivation reuses one compiled f (a jit made per call would trace it again)."""
    traced = []
    real = pipeline.mapping
    monkeypatch.setattr(pipeline, "mapping", lambda nets: traced.append(1) or real(nets))
    u = np.full((3, 512), 0.75, np.float32)  # a batch size no other test uses: traced here
    first = pipe.key_from_vector(u)
    np.testing.assert_array_equal(pipe.key_from_vector(u), first)
    assert len(traced) == 1


def test_nets_are_keyed_by_role_and_a_new_role_is_one_row(release_weights, pipe, tmp_path, monkeypatch):
    nets = pipe.nets
    assert nets.roles == tuple(roles.ROLES)
    leaves, weights = jax.tree.leaves(nets), jax.tree.leaves(nets.variables)
    assert len(leaves) == len(weights) and all(a is b for a, b in zip(leaves, weights))  # modules static
    frozen = nets.without(("flow", "icl"))
    assert set(frozen.variables) == set(roles.ROLES) - {"flow", "icl"} and "flow" in frozen
    back = frozen.with_variables({"flow": nets["flow"], "icl": nets["icl"]})
    assert jax.tree.structure(back) == jax.tree.structure(nets)
    assert "icl" not in nets.drop("icl") and "icl" not in nets.drop("icl").variables
    with pytest.raises(ValueError, match="not optional"):
        nets.drop("generator")
    with pytest.raises(KeyError, match="no network for role"):
        nets.with_variables({"discriminator": {}})
    # A role added to the registry loads from its file with no other change.
    copy = tmp_path / "w"
    copy.mkdir()
    for f in release_weights.iterdir():
        os.symlink(f, copy / f.name)
    os.symlink(release_weights / "icl.safetensors", copy / "icl_second.safetensors")
    monkeypatch.setitem(roles.ROLES, "icl_second",
                        roles.Role("icl_second", "icl_second.safetensors", "icl", optional=True))
    more = pipeline.load(copy).nets
    assert more.roles == (*roles.ROLES,) and "icl_second" in more.roles
    z = jnp.asarray(np.eye(2, 512, dtype=np.float32))
    np.testing.assert_array_equal(more.apply("icl_second", z), nets.apply("icl", z))
