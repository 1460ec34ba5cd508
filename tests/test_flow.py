"""SIF T: official INN parity (FrEIA 0.2 and master) through the real converter, invertibility,
log-determinants, dtype handling and the converter's refusals."""

from __future__ import annotations

import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ifadit_jax
from ifadit_jax import flow as F
from ifadit_jax import weights
from ports.reader import flatten_state_dict, read_checkpoint
from tests.helpers import convert, fixture, load_npz, run_cli

INN = "ifadit_inn_G_net.pth"


def write_state_dict_pth(path, tensors: dict) -> None:
    """Writes a `torch.save(state_dict)` zip file by hand (pickle opcodes; no torch), for
    checkpoint variants the fixtures do not hold."""
    storage = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
               np.dtype(np.int64): "LongStorage", np.dtype(np.uint8): "ByteStorage"}
    out = bytearray(b"\x80\x02")

    def glob(module, name):
        out.extend(b"c" + f"{module}\n{name}\n".encode())

    def text(t):
        b = t.encode()
        out.extend(b"X" + struct.pack("<I", len(b)) + b)

    def integer(v):
        out.extend(b"J" + struct.pack("<i", int(v)))

    def int_tuple(vs):
        out.extend(b"(")
        for v in vs:
            integer(v)
        out.extend(b"t")

    glob("collections", "OrderedDict")
    out.extend(b")R(")
    blobs = {}
    for i, (name, arr) in enumerate(tensors.items()):
        arr = np.ascontiguousarray(arr)
        blobs[str(i)] = arr.tobytes()
        strides = [int(np.prod(arr.shape[d + 1:])) for d in range(arr.ndim)]
        text(name)
        glob("torch._utils", "_rebuild_tensor_v2")
        out.extend(b"((")
        text("storage")
        glob("torch", storage[arr.dtype])
        text(str(i))
        text("cpu")
        integer(arr.size)
        out.extend(b"tQ")
        integer(0)
        int_tuple(arr.shape)
        int_tuple(strides)
        out.extend(b"\x89")
        glob("collections", "OrderedDict")
        out.extend(b")RtR")
    out.extend(b"u.")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", bytes(out))
        z.writestr("archive/byteorder", "little")
        for key, blob in blobs.items():
            z.writestr(f"archive/data/{key}", blob)


@pytest.fixture(scope="module")
def io02():
    return load_npz("ifadit_inn_io.npz")


@pytest.fixture(scope="module")
def io_master():
    return load_npz("ifadit_inn_freia_master_io.npz")


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    out = convert("convert_ifadit.py", "inn", str(fixture(INN)),
                  out=tmp_path_factory.mktemp("inn") / "inn.safetensors")
    return ifadit_jax.load(out)


@pytest.fixture(scope="module")
def official_master(tmp_path_factory, io_master):
    """The same weights as a FrEIA-master checkpoint: w_perm/w_perm_inv as int64 index vectors
    (the fixture's index form of the dense matrices), everything else unchanged, same order."""
    state = flatten_state_dict(read_checkpoint(fixture(INN)))
    tensors = {}
    for name, t in state.items():
        block = name.split(".")[1]
        if name.endswith(".w_perm"):
            t = io_master["w_perm_index"][int(block)].astype(np.int64)
        elif name.endswith(".w_perm_inv"):
            t = io_master["w_perm_inv_index"][int(block)].astype(np.int64)
        tensors[name] = t
    d = tmp_path_factory.mktemp("inn_master")
    write_state_dict_pth(d / "G_net_master.pth", tensors)
    return ifadit_jax.load(convert("convert_ifadit.py", "inn", str(d / "G_net_master.pth"),
                                   out=d / "inn.safetensors"))


def _close(got, want, atol, name):
    err = float(np.max(np.abs(np.asarray(got) - want)))
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol:.3g}"


def test_converted_config(official, official_master):
    for fl, freia in ((official, "0.2"), (official_master, "master")):
        assert fl.config == F.SifConfig(variant="allinone", n_blocks=4, dim=512, cond_dim=512,
                                        hidden=(256, 128, 128, 256), negative_slope=0.01,
                                        clamp=2.0, freia=freia)
        assert fl.meta.kind == "sif" and fl.meta.extra == {"freia": freia}
    # Both files describe the same permutations: argmax of the dense rows = master's index vector.
    assert official.params.perms == official_master.params.perms


# Tolerances: 10x the fixture README's float64-vs-float32 column (rev_of_fwd: the README's 5e-5).
def test_inn_parity_freia_0_2(official, io02):
    d = io02
    fwd, ld = official.forward(d["z"], d["k"])
    _close(fwd, d["fwd"], 2.9e-5, "fwd")
    _close(ld, d["logdet_fwd"], 3.8e-4, "logdet_fwd")
    rev, ld = official.inverse(d["fwd"], d["k"])
    _close(rev, d["rev_of_fwd"], 5e-5, "rev_of_fwd")
    _close(ld, d["logdet_rev_of_fwd"], 3.1e-4, "logdet_rev_of_fwd")
    rev, ld = official.inverse(d["v"], d["k"])
    _close(rev, d["rev_v"], 8.3e-5, "rev_v")
    _close(ld, d["logdet_rev_v"], 4.2e-4, "logdet_rev_v")
    rev, _ = official.inverse(d["fwd"], d["k2"])
    _close(rev, d["rev_of_fwd_wrong_key"], 1e-4, "rev_of_fwd_wrong_key")
    h = jnp.asarray(d["z"])
    for i in range(4):
        h, _ = F.sif_block(official.params, i, h, d["k"])
        _close(h, d["fwd_block_outputs"][i], 2.9e-5, f"fwd_block_outputs[{i}]")


def test_inn_parity_freia_master(official_master, io02, io_master):
    d, m = io02, io_master
    fwd, ld = official_master.forward(d["z"], d["k"])
    _close(fwd, m["master_fwd"], 1.5e-5, "master_fwd")
    _close(ld, m["master_logdet_fwd"], 4.4e-4, "master_logdet_fwd")
    rev, ld = official_master.inverse(m["master_fwd"], d["k"])
    _close(rev, m["master_rev_of_fwd"], 1.5e-5, "master_rev_of_fwd")
    _close(ld, m["master_logdet_rev_of_fwd"], 4e-4, "master_logdet_rev_of_fwd")
    rev, ld = official_master.inverse(d["v"], d["k"])
    _close(rev, m["master_rev_v"], 2.5e-5, "master_rev_v")
    _close(ld, m["master_logdet_rev_v"], 3.7e-4, "master_logdet_rev_v")
    rev, _ = official_master.inverse(m["master_fwd"], d["k2"])
    _close(rev, m["master_rev_of_fwd_wrong_key"], 4.1e-5, "master_rev_of_fwd_wrong_key")


def test_one_key_for_the_batch(official, io02):
    z, k = io02["z"], io02["k"][1]
    batch = official.forward(z, np.tile(k, (3, 1)))[0]
    # One key is projected once (a matrix-vector product): equal up to float32 rounding.
    for key in (k, k[None]):
        np.testing.assert_allclose(official.forward(z, key)[0], batch, rtol=0, atol=2e-5)
        np.testing.assert_allclose(official.inverse(batch, key)[0],
                                   official.inverse(batch, np.tile(k, (3, 1)))[0], rtol=0, atol=2e-5)


def test_bad_shapes_are_clear(official):
    with pytest.raises(ifadit_jax.errors.InputError, match=r"\[B, 512\]"):
        official.forward(np.zeros((2, 256), np.float32), np.zeros(512, np.float32))
    with pytest.raises(ifadit_jax.errors.InputError, match="keys must have shape"):
        official.forward(np.zeros((2, 512), np.float32), np.zeros((3, 512), np.float32))


# ----------------------------------------------------------------------------------------------
# Property tests on fresh, random and trained parameters


def _random_params(variant: str, seed: int) -> F.SifParams:
    """init_sif, then pushed off the near-identity init (as the fixture recipe does): last MLP
    layers x12 so the scale nonlinearities saturate, random global scales and offsets."""
    p = F.init_sif(jax.random.key(seed), F.SifConfig(variant=variant))
    rng = np.random.default_rng(seed)
    blocks = []
    for b in p.blocks:
        b = jax.tree.map(np.array, b)
        for net in [n for n in b if n not in ("global_scale", "global_offset")]:
            last = b[net][f"fc{len(b[net]) - 1}"]
            last["kernel"] *= 12.0
            last["bias"] *= 12.0
        if variant == "allinone":
            b["global_scale"] += 2.0 * rng.standard_normal(b["global_scale"].shape, np.float32)
            b["global_offset"] += 0.1 * rng.standard_normal(b["global_offset"].shape, np.float32)
        blocks.append(jax.tree.map(jnp.asarray, b))
    return p.replace(blocks=tuple(blocks))


def _adam_steps(params: F.SifParams, n_steps: int = 5) -> F.SifParams:
    """A few Adam updates on a toy anonymization loss (push T(z, k) away from z, keep it
    normalized-ish): enough to move every parameter."""
    z = jax.random.normal(jax.random.key(7), (16, 512))
    z = z / jnp.linalg.norm(z, axis=1, keepdims=True)
    k = jax.random.normal(jax.random.key(8), (16, 512))

    def loss(p):
        y, logdet = F.sif_forward(p, z, k)
        cos = jnp.sum(y * z, axis=1) / jnp.linalg.norm(y, axis=1)
        return jnp.mean(cos) + 1e-3 * jnp.mean((jnp.linalg.norm(y, axis=1) - 1.0) ** 2) \
            + 1e-6 * jnp.mean(logdet ** 2)

    opt = optax.adam(1e-2)

    @jax.jit
    def step(p, state):
        updates, state = opt.update(jax.grad(loss)(p), state, p)
        return optax.apply_updates(p, updates), state

    state = opt.init(params)
    for _ in range(n_steps):
        params, state = step(params, state)
    return params


@jax.jit
def _roundtrip_error(params, z, keys):
    """max |T^-1(T(z, k), k) - z| over groups z [K, N, 512] with one key per group keys [K, 512]."""

    def one(zg, k):
        y, ld_f = F.sif_forward(params, zg, k)
        x, ld_i = F.sif_inverse(params, y, k)
        return jnp.max(jnp.abs(x - zg)), jnp.max(jnp.abs(ld_f + ld_i) / (1.0 + jnp.abs(ld_f)))

    err, ld_err = jax.vmap(one)(z, keys)
    return jnp.max(err), jnp.max(ld_err)


@pytest.mark.parametrize("variant", F.VARIANTS)
def test_inverse_undoes_forward_10k_z_100_keys(variant):
    # 100 keys x 100 different unit-norm z each (the SIF's inputs are normalized ArcFace vectors).
    z = jax.random.normal(jax.random.key(1), (100, 100, 512))
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    keys = jax.random.normal(jax.random.key(2), (100, 512))
    params = _random_params(variant, 3)
    trained = _adam_steps(params)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), params, trained)
    assert min(jax.tree.leaves(moved)) > 1e-3, "Adam did not move every parameter"
    for p in (params, trained):
        err, ld_err = _roundtrip_error(p, z, keys)
        assert float(err) <= 1e-5, f"{variant}: max inversion error {float(err):.3g}"
        assert float(ld_err) <= 1e-5, f"{variant}: forward and inverse log-dets do not cancel"


@jax.jit
def _block_logdets_and_jacobians(params, x, k):
    """Runs the blocks one by one from x [P, 512]; for each block, its log-det and the Jacobian
    of the same map (jax.jacfwd) at its actual inputs. Also the whole flow's log-det. (The
    inverse's log-det is checked against the forward's in the round-trip test.)"""
    out, h = [], x
    for i in range(params.config.n_blocks):
        def fn(v, i=i):
            return F.sif_block(params, i, v[None], k)[0][0]
        y, logdet = F.sif_block(params, i, h, k)
        out.append((logdet, jax.vmap(jax.jacfwd(fn))(h)))
        h = y
    return out, F.sif_forward(params, x, k)[1]


@pytest.mark.parametrize("variant", F.VARIANTS)
def test_block_logdet_matches_jacobian(variant):
    params = _random_params(variant, 11)
    x = jax.random.normal(jax.random.key(12), (2, 512)) * 0.3
    k = jax.random.normal(jax.random.key(13), (512,))
    blocks, total = _block_logdets_and_jacobians(params, x, k)
    for i, (logdet, jacs) in enumerate(blocks):
        for b in range(2):
            sign, want = np.linalg.slogdet(np.asarray(jacs[b], np.float64))
            assert sign != 0
            assert abs(float(logdet[b]) - want) <= 1e-4 * max(1.0, abs(want)), (i, b)
    # The whole flow's log-det is the sum of its blocks'.
    np.testing.assert_allclose(total, sum(ld for ld, _ in blocks), rtol=1e-5)


def test_sacb_block_is_paper_eq_5_to_8():
    """One sacb block against Eq. 5-8 written out with numpy (float64)."""
    cfg = F.SifConfig(variant="sacb", n_blocks=1, dim=6, cond_dim=3, hidden=(5,), c=1.7)
    params = _random_params_small(cfg)
    x = np.random.default_rng(0).normal(size=(4, 6))
    k = np.random.default_rng(1).normal(size=(4, 3))
    bp = jax.tree.map(lambda a: np.asarray(a, np.float64), params.blocks[0])

    def mlp(net, h):
        h = h @ bp[net]["fc0"]["kernel"] + bp[net]["fc0"]["bias"]
        h = np.where(h >= 0, h, 0.01 * h)
        return h @ bp[net]["fc1"]["kernel"] + bp[net]["fc1"]["bias"]

    def a(v):
        return 1.7 / (1.0 + np.exp(-v))

    z1, z2 = x[:, :3], x[:, 3:]
    s2 = a(mlp("w", np.concatenate([z1, k], 1)))
    z2n = z2 * np.exp(s2) + mlp("phi", np.concatenate([z1, k], 1))
    s1 = a(mlp("rho", np.concatenate([z2n, k], 1)))
    z1n = z1 * np.exp(s1) + mlp("eta", np.concatenate([z2n, k], 1))
    y, logdet = F.sif_forward(params, x, k)
    np.testing.assert_allclose(y, np.concatenate([z1n, z2n], 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logdet, s1.sum(1) + s2.sum(1), rtol=1e-5)


def _random_params_small(cfg):
    p = F.init_sif(jax.random.key(0), cfg)
    return p.replace(blocks=jax.tree.map(lambda a: 3.0 * a, p.blocks))


def test_never_narrower_than_float32():
    cfg = F.SifConfig(variant="allinone", n_blocks=2, dim=16, cond_dim=8, hidden=(32,))
    params = F.init_sif(jax.random.key(21), cfg)
    params = params.replace(blocks=jax.tree.map(lambda a: 3.0 * a, params.blocks))
    params_bf16 = params.replace(blocks=jax.tree.map(lambda a: a.astype(jnp.bfloat16), params.blocks))
    z = jax.random.normal(jax.random.key(22), (8, 16)).astype(jnp.bfloat16)
    k = jax.random.normal(jax.random.key(23), (8,)).astype(jnp.bfloat16)
    y, logdet = F.sif_forward(params_bf16, z, k)
    assert y.dtype == jnp.float32 and logdet.dtype == jnp.float32
    # bfloat16 values in, float32 math: identical to upcasting first.
    params_up = params.replace(blocks=jax.tree.map(lambda a: a.astype(jnp.float32), params_bf16.blocks))
    y32, _ = F.sif_forward(params_up, z.astype(jnp.float32), k.astype(jnp.float32))
    np.testing.assert_array_equal(y, y32)
    x, _ = F.sif_inverse(params_bf16, y, k)
    assert float(jnp.max(jnp.abs(x - z.astype(jnp.float32)))) <= 1e-5
    # float64 in (jax_enable_x64): float64 math, the inverse exact to float64 rounding; float32
    # parameters with float64 inputs are widened too.
    with jax.enable_x64(True):
        z64 = np.asarray(z, np.float64)
        y64, logdet64 = F.sif_forward(params_up, z64, np.asarray(k, np.float64))
        assert y64.dtype == logdet64.dtype == jnp.float64
        np.testing.assert_allclose(y64, y32, rtol=1e-5, atol=1e-5)
        x64, _ = F.sif_inverse(params_up, y64, np.asarray(k, np.float64))
        assert float(np.max(np.abs(np.asarray(x64) - z64))) <= 1e-12


def test_init_and_config_roundtrip(tmp_path):
    for variant in F.VARIANTS:
        cfg = F.SifConfig(variant=variant, n_blocks=2, hidden=(64, 32))
        assert F.SifConfig.from_json(cfg.to_json()) == cfg
        params = F.init_sif(jax.random.key(0), cfg)
        y, _ = F.sif_forward(params, np.ones((2, 512), np.float32), np.ones(512, np.float32))
        weights.save(tmp_path / f"{variant}.safetensors", F.to_variables(params),
                     weights.Meta(kind="sif", config=cfg.to_dict()))
        loaded = ifadit_jax.load(tmp_path / f"{variant}.safetensors")
        assert loaded.config == cfg and loaded.params.perms == params.perms
        ones = np.ones((2, 512), np.float32)
        np.testing.assert_array_equal(loaded.forward(ones, ones[0])[0], y)
    allinone = F.init_sif(jax.random.key(0), F.SifConfig(variant="allinone"))
    # FrEIA's init: sigma = 1 and no offset, so the block is coupling + permutation only.
    np.testing.assert_allclose(F.global_scale(allinone.blocks[0]), 1.0, rtol=1e-6)
    with pytest.raises(ifadit_jax.errors.InputError, match="variant"):
        F.SifConfig(variant="glow")


# ----------------------------------------------------------------------------------------------
# Converter refusals: one line, non-zero exit, no output file


def _refused(tmp_path, *args, match, capsys=None):
    """Runs the converter CLI (a subprocess, or in-process `main(argv)` when capsys is given,
    which saves a Python start) and checks its refusal."""
    out = tmp_path / "out.safetensors"
    if capsys is None:
        proc = run_cli("ports/convert_ifadit.py", *args, str(out), check=False)
        code, stderr = proc.returncode, proc.stderr
    else:
        from ports import convert_ifadit

        with pytest.raises(SystemExit) as exc:
            convert_ifadit.main([*args, str(out)])
        code, stderr = exc.value.code, capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert match in lines[0], lines[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_converter_refuses_wrong_networks(tmp_path, capsys):
    _refused(tmp_path, "inn", str(fixture("ifadit_icl_fusion_mapper10.pth")), match="not an iFADIT INN")
    _refused(tmp_path, "inn", str(fixture("ifadit_mlp_latent_mapper.pth")), match="not an iFADIT INN",
             capsys=capsys)
    _refused(tmp_path, "inn", str(tmp_path / "missing.pth"), match="no such file", capsys=capsys)


def test_converter_refuses_broken_inn(tmp_path, capsys):
    state = flatten_state_dict(read_checkpoint(fixture(INN)))
    names = list(state)
    # A truncated file (last bias missing).
    write_state_dict_pth(tmp_path / "short.pth", {n: state[n] for n in names[:-1]})
    _refused(tmp_path, "inn", str(tmp_path / "short.pth"), match="module_list.3.subnet.8.weight",
             capsys=capsys)
    # A w_perm that is not a permutation matrix.
    bad = dict(state)
    w = bad["module_list.2.w_perm"].copy()
    w[0, :] = 0
    bad["module_list.2.w_perm"] = w
    write_state_dict_pth(tmp_path / "badperm.pth", bad)
    _refused(tmp_path, "inn", str(tmp_path / "badperm.pth"), match="permutation matrix", capsys=capsys)
    # w_perm_inv that does not invert w_perm.
    bad = dict(state)
    bad["module_list.1.w_perm_inv"] = state["module_list.0.w_perm_inv"]
    write_state_dict_pth(tmp_path / "badinv.pth", bad)
    _refused(tmp_path, "inn", str(tmp_path / "badinv.pth"), match="block 1 is not the inverse",
             capsys=capsys)
    # A block whose subnet is narrower than the others'.
    bad = {n: (t[:, :100] if n == "module_list.3.subnet.4.weight" else t) for n, t in state.items()}
    write_state_dict_pth(tmp_path / "narrow.pth", bad)
    _refused(tmp_path, "inn", str(tmp_path / "narrow.pth"), match="module_list.3", capsys=capsys)
