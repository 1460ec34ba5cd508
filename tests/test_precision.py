"""The bfloat16 compute mode (`pipeline.Nets.precision`): an option, weights kept float32, the
networks E_ID, E_Attr, M, G and the parser in bfloat16, the flow T, the ICL C and the key path
in float32, and its accuracy against float32 on the release fixtures.

Accuracy bounds are derived, not fitted. bfloat16 keeps 8 significant bits: one rounding has a
relative error of at most u = 2^-9. A layer rounds its input and its weights (the float32
accumulation adds nothing comparable), and a network of n such layers whose independent
rounding errors add up gives an output off by about u * sqrt(2 n) relative to its size. We allow
an amplification of A = 4 on top (deep networks are not isometries) and count n from the
network's own program (its convolutions and matrix products). For unit identity vectors a
relative error e costs 1 - cos = e^2 / 2; for an image with RMS value r it costs
PSNR = -20 log10(e r).
"""

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ifadit_jax import pipeline
from ifadit_jax.errors import InputError
from tests.helpers import load_config, load_npz, nchw_to_nhwc

U = 2.0 ** -9  # bfloat16 unit roundoff
A = 4.0  # allowed amplification of the accumulated rounding error
LAYER_OPS = ("conv_general_dilated", "dot_general")


@pytest.fixture(scope="module")
def f32(release_weights):
    return pipeline.load(release_weights)


@pytest.fixture(scope="module")
def b16(release_weights):
    return pipeline.load(release_weights, precision="bfloat16")


@pytest.fixture(scope="module")
def e2e():
    return load_npz("ifadit_e2e_io.npz")


def layer_ops(fn, *args) -> collections.Counter:
    """{(op, operand dtypes): count} of the convolutions and matrix products in `fn`'s program,
    nested calls included."""
    found = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in LAYER_OPS:
                found[(eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars))] += 1
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def relative_error_bound(n_layers: int) -> float:
    return A * U * math.sqrt(2 * n_layers)


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(1.0 / mse)


def test_float32_is_the_default_and_the_weights_stay_float32(release_weights, f32, b16):
    assert f32.precision == "float32" and b16.precision == "bfloat16"
    leaves_f32, tree_f32 = jax.tree.flatten(f32.nets.variables)
    leaves_b16, tree_b16 = jax.tree.flatten(b16.nets.variables)
    assert tree_f32 == tree_b16
    assert {str(a.dtype) for a in leaves_b16} == {"float32"}
    assert all(np.array_equal(a, b) for a, b in zip(leaves_f32, leaves_b16))
    with pytest.raises(InputError, match="precision must be one of"):
        pipeline.load(release_weights, precision="float16")


def test_bfloat16_runs_the_networks_in_bfloat16(b16, f32):
    x, z, attr = jnp.zeros((1, 256, 256, 3)), jnp.zeros((1, 512)), jnp.zeros((1, 14, 512))
    passes = {"E_ID": (pipeline.identity, x), "E_Attr": (pipeline.attributes, x),
              "M+G": (pipeline.render, z, attr), "parser": (pipeline.face_mask, x)}
    for name, (fn, *args) in passes.items():
        ops = layer_ops(fn, b16.nets, *args)
        convs = {k: n for k, n in ops.items() if k[0] == "conv_general_dilated"}
        # Every convolution in bfloat16: a float32 constant inside a network would promote the
        # layers after it back to float32 silently.
        assert convs and all(k[1] == ("bfloat16", "bfloat16") for k in convs), (name, ops)
        assert not any("bfloat16" in k[1] for k in layer_ops(fn, f32.nets, *args)), name
    # The float32 products left are float32 by design: E_ID's crop pooling and the parser's
    # resize (input preparation, before the network) and StyleGAN2's demodulation.
    assert sum(n for k, n in layer_ops(pipeline.render, b16.nets, z, attr).items()
               if "bfloat16" in k[1]) > 0


def test_flow_icl_and_key_path_stay_float32_and_bit_identical(b16, f32, e2e):
    u, k = np.broadcast_to(e2e["u"], (2, 512)), jnp.asarray(e2e["k"])
    z = jnp.asarray(e2e["id_vec"])
    for nets in (b16.nets, f32.nets):
        assert not any("bfloat16" in key[1] for key in (
            layer_ops(lambda n, z, k: n.apply("flow", z, k, method="inverse"), nets, z, k)
            + layer_ops(lambda n, z: n.apply("icl", z), nets, z)
            + layer_ops(lambda n, u: pipeline.mapping(n)(u), nets, jnp.asarray(u))))
    np.testing.assert_array_equal(b16.key_from_vector(u), f32.key_from_vector(u))
    for method in ("forward", "inverse"):
        np.testing.assert_array_equal(b16.nets.apply("flow", z, k, method=method)[0],
                                      f32.nets.apply("flow", z, k, method=method)[0])
    np.testing.assert_array_equal(b16.nets.apply("icl", z), f32.nets.apply("icl", z))


def test_gradients_and_batch_statistics_stay_float32(b16):
    """Training in bfloat16 keeps its state float32: gradients reach the float32 weights as
    float32, and E_Attr's updated BatchNorm statistics come back float32."""
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)

    def loss(variables, images):
        nets = b16.nets.with_variables({"attr_encoder": variables})
        return jnp.mean(pipeline.attributes(nets, images))

    grads = jax.eval_shape(jax.grad(loss), b16.nets["attr_encoder"], x)
    assert {str(a.dtype) for a in jax.tree.leaves(grads)} == {"float32"}
    codes, stats = jax.eval_shape(pipeline.attributes_train, b16.nets, x)
    assert codes.dtype == jnp.float32
    assert {str(a.dtype) for a in jax.tree.leaves(stats)} == {"float32"}


def test_bfloat16_accuracy_against_float32(b16, f32, e2e):
    x, k = nchw_to_nhwc(e2e["x"]), e2e["k"]
    layers = lambda fn, *a: sum(n for key, n in layer_ops(fn, b16.nets, *a).items()  # noqa: E731
                                if "bfloat16" in key[1])
    identity = jax.jit(pipeline.identity)
    # E_ID: unit vectors, 1 - cos <= e^2 / 2.
    e_id = relative_error_bound(layers(pipeline.identity, jnp.asarray(x)))
    cos_id = cosine(identity(b16.nets, x), identity(f32.nets, x))
    assert np.all(cos_id >= 1 - e_id ** 2 / 2), (cos_id, e_id)
    # G alone from the official W+ codes: PSNR >= -20 log10(e * RMS of the image).
    wplus = jnp.asarray(e2e["wplus_anon"])
    synth = jax.jit(lambda n, w: (n.apply("generator", w, "const", method="synthesize") + 1) / 2)
    img_f32, img_b16 = synth(f32.nets, wplus), synth(b16.nets, wplus)
    e_g = relative_error_bound(layers(lambda n, w: n.apply("generator", w, "const", method="synthesize"),
                                      wplus))
    rms = np.sqrt(np.mean(np.square(np.asarray(img_f32, np.float64)), axis=(1, 2, 3)))
    assert np.all(psnr(img_b16, img_f32) >= -20 * np.log10(e_g * rms))
    assert np.all(np.isfinite(psnr(img_b16, img_f32)))  # bfloat16 did run: the images differ
    # Anonymize -> recover, each pipeline on its own outputs: the recovered identity vector
    # z_rec. The error path is E_ID, E_Attr, M, G, the parser, then E_ID again. Only z_rec of
    # the recovery is compiled (XLA drops its unused image half: a second whole bfloat16
    # program would double this test's compile time).
    z_rec = jax.jit(lambda n, a, k: pipeline.recover(n, a, k)[1]["z_rec"])
    anon_b16, _ = b16.anonymize(x, k)
    anon_f32, inter = f32.anonymize(x, k)
    n = (2 * layers(pipeline.identity, jnp.asarray(x)) + layers(pipeline.attributes, jnp.asarray(x))
         + layers(pipeline.render, inter["z_anon"], inter["attr"])
         + layers(pipeline.face_mask, jnp.asarray(x)))
    e_rec = relative_error_bound(n)
    cos_rec = cosine(z_rec(b16.nets, anon_b16, k), z_rec(f32.nets, anon_f32, k))
    assert np.all(cos_rec >= 1 - e_rec ** 2 / 2), (cos_rec, e_rec)


def test_cli_flag_reaches_the_load_and_bad_values_are_usage_errors(tmp_path, monkeypatch):
    from PIL import Image

    from ifadit_jax import commands

    image, secret = tmp_path / "face.png", tmp_path / "secret"
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(image)
    secret.write_bytes(b"correct horse")
    seen = []

    class Loaded(Exception):
        pass

    def load(weights_dir, precision="float32"):
        seen.append(precision)
        raise Loaded

    monkeypatch.setattr(pipeline, "load", load)
    argv = [str(image), str(tmp_path / "out.png"), "--weights", str(tmp_path), "--aligned",
            "--secret-file", str(secret)]
    for flags, want in (([], "float32"), (["--precision", "bfloat16"], "bfloat16")):
        with pytest.raises(Loaded):
            commands.anonymize_main(argv + flags)
        assert seen.pop() == want
    with pytest.raises(SystemExit) as exit_info:
        commands.anonymize_main(argv + ["--precision", "float16"])
    assert exit_info.value.code == 2 and not seen


def test_training_config_selects_the_precision(tmp_path):
    from ifadit_jax.training import networks

    assert load_config(1, None).precision == "float32" == load_config(2, None).precision
    cfg = load_config(2, "smoke")
    cfg.precision = "bfloat16"
    built = networks.build(cfg)
    assert built.nets.precision == "bfloat16"
    assert {str(a.dtype) for a in jax.tree.leaves(built.nets.variables)} == {"float32"}
    cfg.precision = "half"
    with pytest.raises(InputError, match="precision must be one of"):
        networks.build(cfg)
