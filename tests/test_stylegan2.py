"""StyleGAN2: the converter CLI on the official formats, parity with the official outputs, layer
checks against independent numpy implementations, and bad input."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ifadit_jax
from ifadit_jax.errors import InputError
from ifadit_jax.nets import stylegan2
from ports import convert_stylegan2
from ports.reader import read_checkpoint
from tests.helpers import convert, fixture, load_npz, run_cli

# Fixture README: images reach |10| on untrained nets; f64-vs-f32 differences are ~1e-5 there,
# so 1e-4 is 10x that. Mapping outputs are O(4) with f64-vs-f32 ~2e-6.
IMG_ATOL = 1e-4
W_ATOL = 2e-5


def nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


@pytest.fixture(scope="module")
def rosinality(tmp_path_factory):
    out = tmp_path_factory.mktemp("sg2") / "rosinality.safetensors"
    return ifadit_jax.load(convert("convert_stylegan2.py", str(fixture("rosinality_sg2_256.pt")), out=out))


@pytest.fixture(scope="module")
def nvlabs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sg2") / "ada.safetensors"
    return ifadit_jax.load(convert("convert_stylegan2.py", str(fixture("ada_network_snapshot_256.pkl")), out=out))


@pytest.fixture(scope="module")
def ros_io():
    return load_npz("rosinality_sg2_256_io.npz")


def test_rosinality_config_from_checkpoint(rosinality, ros_io):
    G = rosinality
    assert (G.resolution, G.n_latent, G.w_dim, G.z_dim) == (256, int(ros_io["n_latent"]), 64, 64)
    assert G.config.n_noise == int(ros_io["num_layers"])
    assert dict(G.config.channels) == {4: 64, 8: 64, 16: 64, 32: 64, 64: 64, 128: 32, 256: 16}
    # The checkpoint's latent_avg is G.mean_latent(4096)[0] (fixture README).
    np.testing.assert_allclose(G.latent_avg, ros_io["mean_latent"][0], atol=1e-6)


def test_rosinality_mapping_and_truncation(rosinality, ros_io):
    G = rosinality
    np.testing.assert_allclose(G.mapping(ros_io["z"]), ros_io["w"], atol=W_ATOL, rtol=0)
    w = G.mapping(ros_io["z"], truncation=0.7, truncation_latent=ros_io["mean_latent"])
    np.testing.assert_allclose(w, ros_io["latent_trunc"][:, 0], atol=W_ATOL, rtol=0)
    # Default centre is the checkpoint's own average latent.
    np.testing.assert_allclose(G.mapping(ros_io["z"], truncation=0.7), w, atol=1e-6)
    img = G.synthesis(w)
    np.testing.assert_allclose(nchw(img), ros_io["img_trunc"], atol=IMG_ATOL, rtol=0)


def test_rosinality_wplus_stored_and_explicit_noise(rosinality, ros_io):
    G = rosinality
    img = G.synthesis(ros_io["wplus"], noise_mode="const")
    np.testing.assert_allclose(nchw(img), ros_io["img_wplus_const"], atol=IMG_ATOL, rtol=0)
    noise = [ros_io[f"noise_{i}"] for i in range(G.config.n_noise)]  # official (1,1,r,r)
    img = G.synthesis(ros_io["wplus"], noise=noise)
    np.testing.assert_allclose(nchw(img), ros_io["img_wplus_noise"], atol=IMG_ATOL, rtol=0)


def test_noise_modes(rosinality, ros_io):
    G = rosinality
    ws = ros_io["wplus"]
    a = G.synthesis(ws, "random", rng=jax.random.key(1))
    b = G.synthesis(ws, "random", rng=jax.random.key(1))
    c = G.synthesis(ws, "random", rng=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    zero = [np.zeros((r, r), np.float32) for r in (2 ** ((i + 5) // 2) for i in range(13))]
    np.testing.assert_allclose(G.synthesis(ws, "none"), G.synthesis(ws, noise=zero), atol=1e-5)
    with pytest.raises(InputError, match="rng"):
        G.synthesis(ws, "random")
    with pytest.raises(InputError, match="noise_mode"):
        G.synthesis(ws, "loud")
    with pytest.raises(InputError, match="ws must have shape"):
        G.synthesis(ws[:, :5])


def _synthesis_jaxpr(G, ws):
    return str(jax.make_jaxpr(lambda v, w: G.module.apply(v, w, "const", method="synthesize"))(
        G.variables, ws))


def test_blocks_in_chunks_match_the_official_outputs(rosinality, ros_io, monkeypatch):
    """With a 1-byte cache every block of the batch-2 fixture runs one image at a time; the
    official outputs hold at the same tolerance, for stored, shared and per-image noise."""
    ws = ros_io["wplus"]
    assert "scan" not in _synthesis_jaxpr(rosinality, ws)  # fixture widths fit: one call
    monkeypatch.setattr(stylegan2, "CACHE_BYTES", 1)
    G = stylegan2.StyleGAN2(rosinality.config, rosinality.variables)  # a fresh jit cache
    assert "scan" in _synthesis_jaxpr(G, ws)
    np.testing.assert_allclose(nchw(G.synthesis(ws, "const")), ros_io["img_wplus_const"],
                               atol=IMG_ATOL, rtol=0)
    shared = [ros_io[f"noise_{i}"] for i in range(G.config.n_noise)]  # official (1,1,r,r)
    np.testing.assert_allclose(nchw(G.synthesis(ws, noise=shared)), ros_io["img_wplus_noise"],
                               atol=IMG_ATOL, rtol=0)
    # Image 0 with the official noise, image 1 with none: each must get its own noise.
    per_image = [np.concatenate([n[:, 0], np.zeros_like(n[:, 0])]) for n in shared]
    got = nchw(G.synthesis(ws, noise=per_image))
    np.testing.assert_allclose(got[0], ros_io["img_wplus_noise"][0], atol=IMG_ATOL, rtol=0)
    np.testing.assert_allclose(got[1], nchw(rosinality.synthesis(ws, "none"))[1], atol=IMG_ATOL,
                               rtol=0)
    a, b = (G.synthesis(ws, "random", rng=jax.random.key(1)) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(G.synthesis(ws, "none"))).max() > 1e-3


def test_blocks_in_chunks_keep_gradients_and_vmap(monkeypatch):
    """Training differentiates through G: the chunked blocks give the whole-batch gradients."""
    cfg = stylegan2.Config(resolution=32, z_dim=16, w_dim=16,
                           channels=stylegan2.rosinality_channels(32, 2, 64))
    G = stylegan2.random_generator(cfg, seed=3)
    ws = jax.random.normal(jax.random.key(4), (4, cfg.n_latent, cfg.w_dim))

    def grads():
        loss = lambda v, w: jnp.sum(jnp.square(G.module.apply(v, w, method="synthesize")))
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(G.variables, ws)

    whole = grads()
    monkeypatch.setattr(stylegan2, "CACHE_BYTES", 1)
    chunked = grads()
    # The weight gradients sum over the batch in another order: float32 rounding of sums of
    # terms up to ~1e3, so 1e-4 of each gradient's largest entry.
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(a).max() + 1e-6)
    jax.tree.map(close, whole, chunked)
    per_pair = jax.vmap(lambda w: G.module.apply(G.variables, w, method="synthesize"))(
        ws.reshape(2, 2, *ws.shape[1:]))
    np.testing.assert_allclose(per_pair.reshape(4, 32, 32, 3),
                               G.module.apply(G.variables, ws, method="synthesize"), atol=1e-5)


@pytest.mark.parametrize("batch,image_mib,want", [
    (1, 32, 1), (4, 8, 2), (8, 8, 2), (8, 16, 1), (8, 32, 1), (8, 64, 1), (6, 8, 2), (7, 8, 1),
    (6, 4, 3), (8, 4, 4), (16, 2, 8), (4, 2, 4)])
def test_chunk_size_is_the_largest_divisor_that_fits(batch, image_mib, want):
    # A 32 MiB L3 for a chunk's input and output together: 16 MiB of activation, so 8 MiB
    # images go 2 at a time, 4 MiB 4, 16 MiB and more 1. No budget: the whole batch.
    assert stylegan2.chunk_size(batch, image_mib * 2 ** 20, 32 * 2 ** 20) == want
    assert stylegan2.chunk_size(batch, image_mib * 2 ** 20, None) == batch


def test_the_cache_budget_is_the_cpus_l3_and_none_elsewhere(tmp_path, monkeypatch):
    for text, want in (("32768K\n", 32 * 2 ** 20), ("8M", 8 * 2 ** 20), ("0K", None),
                       ("", None), ("lots", None)):
        (tmp_path / "size").write_text(text)
        assert stylegan2._last_level_cache_bytes(str(tmp_path / "size")) == want, text
    assert stylegan2._last_level_cache_bytes(str(tmp_path / "missing")) is None
    monkeypatch.setattr(stylegan2, "CACHE_BYTES", 123)
    assert stylegan2.cache_budget() == 123  # this suite runs on the CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert stylegan2.cache_budget() is None


def test_nvlabs_mapping_and_synthesis(nvlabs):
    io = load_npz("ada_256_io.npz")
    G = nvlabs
    assert (G.n_latent, G.config.conv_clamp, G.config.flavor) == (int(io["num_ws"]), 256.0, "nvlabs")
    np.testing.assert_allclose(G.latent_avg, io["w_avg"], atol=0)
    np.testing.assert_allclose(G.mapping(io["z"]), io["ws_psi1"][:, 0], atol=W_ATOL, rtol=0)
    w = G.mapping(io["z"], truncation=float(io["truncation_psi"]))
    np.testing.assert_allclose(w, io["ws_trunc"][:, 0], atol=W_ATOL, rtol=0)
    np.testing.assert_allclose(nchw(G.synthesis(io["ws_psi1"], "const")), io["img_const"], atol=IMG_ATOL, rtol=0)
    np.testing.assert_allclose(nchw(G.synthesis(io["ws_psi1"], "none")), io["img_none"], atol=IMG_ATOL, rtol=0)


def test_psp_decoder_converts_to_the_same_generator(rosinality, tmp_path):
    """The pSp fixture's decoder is the rosinality generator (fixture README, item 3)."""
    G = ifadit_jax.load(convert("convert_stylegan2.py", str(fixture("psp_ffhq_encode_256.pt")),
                                out=tmp_path / "psp_decoder.safetensors"))
    assert G.config == rosinality.config
    jax.tree.map(np.testing.assert_array_equal, G.variables, rosinality.variables)


def test_missing_noise_buffers_fall_back_with_a_warning():
    ckpt = read_checkpoint(fixture("rosinality_sg2_256.pt"))
    g = {k: v for k, v in ckpt["g_ema"].items() if not k.startswith("noises.")}
    with pytest.warns(UserWarning, match="no stored noise buffers"):
        cfg, variables, _, extra = convert_stylegan2._convert_rosinality(g, ckpt["latent_avg"], "old.pt")
    assert extra["noise_source"].startswith("fallback")
    const = variables["consts"]["synthesis"]["b256"]["conv1"]["noise_const"]
    assert const.shape == (256, 256) and abs(const.std() - 1) < 0.05


# ---- layer-level checks against independent numpy implementations of the official ops ----

def _upfirdn2d_np(x, kernel, up, pad0, pad1):
    """Official upfirdn2d semantics on one NCHW-free [H, W] plane: zero-insert, pad, correlate
    with the flipped kernel."""
    h, w = x.shape
    u = np.zeros((h * up, w * up), np.float64)
    u[::up, ::up] = x
    u = np.pad(u, ((pad0, pad1), (pad0, pad1)))
    k = np.flip(kernel)
    kh, kw = k.shape
    out = np.zeros((u.shape[0] - kh + 1, u.shape[1] - kw + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = (u[i:i + kh, j:j + kw] * k).sum()
    return out


def test_upsample_matches_upfirdn2d():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, 6, 2)).astype(np.float32)
    got = np.asarray(stylegan2.upsample2x(jnp.asarray(x)))
    for c in range(2):
        want = _upfirdn2d_np(x[0, :, :, c], stylegan2.blur_kernel(4.0), up=2, pad0=2, pad1=1)
        np.testing.assert_allclose(got[0, :, :, c], want, atol=1e-5)


def _modconv_np(x, weight, style, demodulate, up):
    """The official per-sample formulation: modulate the weights, then convolve each sample
    (transposed conv stride 2 + blur for `up`)."""
    b, h, w, cin = x.shape
    k, _, _, cout = weight.shape
    outs = []
    for n in range(b):
        wn = weight.astype(np.float64) * style[n][None, None, :, None]
        if demodulate:
            wn = wn / np.sqrt((wn ** 2).sum(axis=(0, 1, 2)) + 1e-8)
        if up:  # conv_transpose2d(stride=2, padding=0), kernel [k,k,I,O] unflipped
            y = np.zeros((2 * h + k - 2, 2 * w + k - 2, cout))
            for i in range(h):
                for j in range(w):
                    y[2 * i:2 * i + k, 2 * j:2 * j + k] += np.einsum("c,abco->abo", x[n, i, j], wn)
            y = np.stack([_upfirdn2d_np(y[:, :, o], stylegan2.blur_kernel(4.0), 1, 1, 1)
                          for o in range(cout)], -1)
        else:
            p = k // 2
            xp = np.pad(x[n], ((p, p), (p, p), (0, 0)))
            y = np.zeros((h, w, cout))
            for i in range(h):
                for j in range(w):
                    y[i, j] = np.einsum("abc,abco->o", xp[i:i + k, j:j + k], wn)
        outs.append(y)
    return np.stack(outs)


# 3x3 layers run as nine matmuls below 32x32 pixels and as XLA's convolution from there on (the
# last case): both paths against the per-sample reference.
@pytest.mark.parametrize("shape,up,demodulate", [((2, 4, 5), False, True), ((2, 4, 5), True, True),
                                                 ((2, 4, 5), False, False), ((1, 32, 33), False, True)])
def test_modulated_conv_matches_per_sample_weights(shape, up, demodulate):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((*shape, 3)).astype(np.float32)
    weight = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    style = rng.standard_normal((shape[0], 3)).astype(np.float32)
    got = stylegan2.modulated_conv(jnp.asarray(x), jnp.asarray(weight), jnp.asarray(style),
                                   demodulate=demodulate, up=up)
    np.testing.assert_allclose(got, _modconv_np(x, weight, style, demodulate, up), atol=1e-4)


# ---- bad input: one line, non-zero exit, nothing written ----

@pytest.mark.parametrize("case", ["text", "other_network", "truncated", "no_dir", "missing"])
def test_converter_bad_input(tmp_path, case):
    out = tmp_path / "out.safetensors"
    if case == "text":
        src = tmp_path / "notes.pt"
        src.write_text("not a checkpoint")
    elif case == "other_network":
        src = fixture("bisenet_faceparsing.pth")
    elif case == "truncated":
        data = fixture("rosinality_sg2_256.pt").read_bytes()
        src = tmp_path / "cut.pt"
        src.write_bytes(data[:100_000])
    elif case == "no_dir":
        src = fixture("rosinality_sg2_256.pt")
        out = tmp_path / "does" / "not" / "exist.safetensors"
    else:
        src = tmp_path / "missing.pt"
    proc = run_cli("ports/convert_stylegan2.py", str(src), str(out), check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    if out.parent.exists():
        assert not list(out.parent.glob(".tmp-*"))


def test_load_rejects_wrong_kind_and_missing_file(tmp_path, rosinality):
    from ifadit_jax import weights
    from ifadit_jax.errors import WeightsError

    with pytest.raises(WeightsError, match="not found"):
        stylegan2.load(tmp_path / "nope.safetensors")
    p = tmp_path / "other.safetensors"
    weights.save(p, {"params": {"x": np.zeros(3, np.float32)}}, weights.Meta(kind="bisenet", config={}))
    with pytest.raises(WeightsError, match="holds a 'bisenet' network, expected 'stylegan2'"):
        stylegan2.load(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rosinality.synthesis(np.zeros((1, 64), np.float32)).shape == (1, 256, 256, 3)
