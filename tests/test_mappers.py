"""LatentMapper M and ICL (FusionMapper10) C: official parity through the real converter CLI,
the official concat order, widths from the checkpoint, init, and the converter's refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifadit_jax
from ifadit_jax.nets import mappers
from tests.helpers import convert, fixture, load_npz

M_FILE = "ifadit_mlp_latent_mapper.pth"
ICL_FILE = "ifadit_icl_fusion_mapper10.pth"


@pytest.fixture(scope="module")
def io():
    return load_npz("ifadit_mappers_io.npz")


@pytest.fixture(scope="module")
def latent_mapper(tmp_path_factory):
    out = tmp_path_factory.mktemp("mapper") / "m.safetensors"
    return ifadit_jax.load(convert("convert_ifadit.py", "mapper", str(fixture(M_FILE)), out=out))


@pytest.fixture(scope="module")
def icl(tmp_path_factory):
    out = tmp_path_factory.mktemp("icl") / "icl.safetensors"
    return ifadit_jax.load(convert("convert_ifadit.py", "icl", str(fixture(ICL_FILE)), out=out))


def test_latent_mapper_parity(latent_mapper, io):
    assert isinstance(latent_mapper, mappers.LoadedLatentMapper)
    # Widths come from the checkpoint (the fixture's hidden width is 256, official 512).
    assert latent_mapper.config == {"in_features": 1024, "features": [256, 512], "negative_slope": 0.2}
    out = latent_mapper(io["lm_in"])
    assert out.shape == (2, 14, 512)
    # 10x the README's float64-vs-float32 column (2.4e-6).
    np.testing.assert_allclose(out, io["lm_out"], rtol=0, atol=2.4e-5)


def test_icl_parity(icl, io):
    assert isinstance(icl, mappers.LoadedICL)
    assert icl.config == {"in_features": 512, "features": [192, 256, 160, 512], "negative_slope": 0.2}
    np.testing.assert_allclose(icl(io["fm10_in"]), io["fm10_out"], rtol=0, atol=1.8e-5)


def test_official_concat_order(latent_mapper, icl):
    """The end-to-end fixture's official calls: wplus_anon = M(cat([repeat(id_anon, 14),
    attr_codes], 2)) and id_compensated = ICL(id_vec_of_anon) (README section 12)."""
    with np.load(fixture("ifadit_e2e_io.npz")) as e:
        d = {k: e[k] for k in ("id_anon", "attr_codes", "wplus_anon", "id_recovered",
                               "attr_codes_of_anon", "wplus_rec", "id_vec_of_anon", "id_compensated")}
    np.testing.assert_allclose(latent_mapper.wplus(d["id_anon"], d["attr_codes"]), d["wplus_anon"],
                               rtol=0, atol=1.7e-5)
    np.testing.assert_allclose(latent_mapper.wplus(d["id_recovered"], d["attr_codes_of_anon"]),
                               d["wplus_rec"], rtol=0, atol=3e-5)
    np.testing.assert_allclose(icl(d["id_vec_of_anon"]), d["id_compensated"], rtol=0, atol=3.5e-6)
    x = mappers.latent_mapper_input(d["id_anon"], d["attr_codes"])
    np.testing.assert_array_equal(x[:, 5, :512], d["id_anon"])
    np.testing.assert_array_equal(x[:, 5, 512:], d["attr_codes"][:, 5])


def test_pure_function_is_reachable(latent_mapper, io):
    out = jax.jit(latent_mapper.module.apply)(latent_mapper.variables, io["lm_in"])
    np.testing.assert_array_equal(out, latent_mapper(io["lm_in"]))


def test_official_default_widths_and_init():
    m = mappers.LatentMapper()
    v = m.init(jax.random.key(0), jnp.zeros((1, 14, 1024)))
    assert jax.tree.map(jnp.shape, v["params"]) == {
        "fc0": {"kernel": (1024, 512), "bias": (512,)}, "fc1": {"kernel": (512, 512), "bias": (512,)}}
    c = mappers.ICL()
    vc = c.init(jax.random.key(0), jnp.zeros((1, 512)))
    assert [vc["params"][f"fc{j}"]["kernel"].shape for j in range(4)] == [
        (512, 1024), (1024, 2048), (2048, 1024), (1024, 512)]
    # Official init: kaiming_normal_(a=0.2) weights, std sqrt(2 / (1.04 fan_in)); zero biases.
    w = np.asarray(vc["params"]["fc1"]["kernel"])
    assert abs(w.std() / np.sqrt(2 / (1.04 * 1024)) - 1) < 0.01
    assert not np.any(np.asarray(vc["params"]["fc1"]["bias"]))


def test_bad_input_shape_is_clear(latent_mapper):
    with pytest.raises(ifadit_jax.errors.InputError, match="1024"):
        latent_mapper(np.zeros((2, 14, 512), np.float32))
    with pytest.raises(ifadit_jax.errors.InputError, match="id_dim"):
        latent_mapper.wplus(np.zeros((2, 512), np.float32), np.zeros((3, 14, 512), np.float32))


@pytest.mark.parametrize("command,src,match", [
    ("mapper", ICL_FILE, "found 4 Linear layers"),
    ("icl", M_FILE, "found 2 Linear layers"),
    ("mapper", "ifadit_inn_G_net.pth", "module_list.0.global_scale"),
    ("icl", "arcface_ir_se50.pth", "not an official FusionMapper10"),
])
def test_converter_refuses_other_networks(tmp_path, capsys, command, src, match):
    from ports import convert_ifadit

    out = tmp_path / "out.safetensors"
    with pytest.raises(SystemExit) as exc:
        convert_ifadit.main([command, str(fixture(src)), str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code != 0 and len(lines) == 1 and lines[0].startswith("error: ")
    assert match in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []
