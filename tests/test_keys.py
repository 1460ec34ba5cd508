"""KeyGen: k = f(Norm(Argon2id(secret))), KDF parameters, secret sources, and that the secret
never leaks into messages, logs, warnings or files."""

from __future__ import annotations

import argparse
import logging
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from ifadit_jax import keys
from ifadit_jax.errors import InputError, SecretError

CHEAP = keys.KdfParams(memory_cost=8, iterations=1, lanes=1)  # tests only: no real cost
SECRET = b"correct horse battery staple 9f2c"


def _stand_in_mapping():
    """A small StyleGAN-like mapping f for tests: PixelNorm, then 2 leaky-ReLU linear layers
    (the real f is the converted generator's `G.mapping`)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    w1 = jax.random.normal(k1, (512, 512)) / np.sqrt(512)
    w2 = jax.random.normal(k2, (512, 512)) / np.sqrt(512)

    @jax.jit
    def mapping(u):
        x = u * jax.lax.rsqrt(jnp.mean(u * u, axis=1, keepdims=True) + 1e-8)
        x = jax.nn.leaky_relu(x @ w1, 0.2) * np.sqrt(2)
        return jax.nn.leaky_relu(x @ w2, 0.2) * np.sqrt(2)

    return mapping


MAPPING = _stand_in_mapping()


def test_norm_is_b_over_127_5_minus_1():
    np.testing.assert_allclose(keys.normalize_bytes(bytes([0, 255, 127, 128, 51])),
                               [-1.0, 1.0, -0.5 / 127.5, 0.5 / 127.5, 51 / 127.5 - 1], rtol=0, atol=1e-7)
    assert keys.normalize_bytes(b"\x00\xff").dtype == np.float32


def test_derive_key_is_f_of_norm_of_argon2id():
    k = keys.derive_key(SECRET, MAPPING, CHEAP)
    raw = Argon2id(salt=keys.DEFAULT_SALT, length=512, iterations=1, lanes=1, memory_cost=8).derive(SECRET)
    u = np.frombuffer(raw, np.uint8).astype(np.float32) / 127.5 - 1.0
    assert k.shape == (512,) and k.dtype == jnp.float32
    np.testing.assert_allclose(k, MAPPING(jnp.asarray(u)[None])[0], rtol=1e-6, atol=1e-6)
    # Deterministic: the same secret and parameters give the same key (recovery depends on it).
    np.testing.assert_array_equal(k, keys.derive_key(SECRET, MAPPING, CHEAP))
    # A str secret is its UTF-8 bytes.
    np.testing.assert_array_equal(k, keys.derive_key(SECRET.decode(), MAPPING, CHEAP))


def test_default_kdf_parameters():
    kdf = keys.KdfParams()
    # RFC 9106's second recommended setting (about 0.1 s here; bench/bench_flow.py measures it).
    assert (kdf.memory_cost, kdf.iterations, kdf.lanes, kdf.salt) == (65536, 3, 4, keys.DEFAULT_SALT)
    assert len(keys.kdf_bytes(b"x", kdf)) == 512


def test_kdf_parameters_json_roundtrip_and_salt():
    kdf = keys.KdfParams(memory_cost=4096, iterations=2, lanes=2, salt=keys.random_salt())
    assert keys.KdfParams.from_json(kdf.to_json()) == kdf
    assert keys.KdfParams.from_json(keys.KdfParams().to_json()) == keys.KdfParams()
    assert len(kdf.salt) == 16 and keys.random_salt() != keys.random_salt()
    # The salt matters: another salt gives other bytes.
    other = keys.KdfParams(memory_cost=8, iterations=1, lanes=1, salt=b"another salt")
    assert keys.kdf_bytes(SECRET, CHEAP) != keys.kdf_bytes(SECRET, other)
    with pytest.raises(InputError, match="salt"):
        keys.KdfParams(salt=b"short")
    with pytest.raises(InputError, match="memory_cost"):
        keys.KdfParams(memory_cost=16, lanes=4)
    with pytest.raises(InputError, match="unknown fields"):
        keys.KdfParams.from_json('{"memory_cost": 8, "lanes": 1, "pepper": 1}')


def test_one_bit_flips_about_half_the_kdf_bits():
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(100):
        secret = rng.integers(0, 256, size=int(rng.integers(1, 40)), dtype=np.uint8).tobytes()
        bit = int(rng.integers(0, 8 * len(secret)))
        flipped = bytearray(secret)
        flipped[bit // 8] ^= 1 << (bit % 8)
        a = np.unpackbits(np.frombuffer(keys.kdf_bytes(secret, CHEAP), np.uint8))
        b = np.unpackbits(np.frombuffer(keys.kdf_bytes(bytes(flipped), CHEAP), np.uint8))
        fractions.append(np.mean(a != b))
    fractions = np.array(fractions)
    assert fractions.min() >= 0.4 and fractions.max() <= 0.6, (fractions.min(), fractions.max())
    assert abs(fractions.mean() - 0.5) < 0.01


def test_key_vector_path_is_official_k_equals_f_of_u():
    u = keys.official_key_seed(jax.random.key(1), batch=3)
    assert u.shape == (3, 512) and float(u.min()) >= 0.5 and float(u.max()) < 1.0
    np.testing.assert_array_equal(keys.key_from_vector(u, MAPPING), MAPPING(u))
    one = keys.official_key_seed(jax.random.key(2))
    assert one.shape == (512,)
    np.testing.assert_allclose(keys.key_from_vector(one, MAPPING), MAPPING(one[None])[0],
                               rtol=1e-6, atol=1e-6)


def test_empty_secret_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(SecretError, match="the secret is empty"):
        keys.derive_key(b"", MAPPING, CHEAP)
    (tmp_path / "empty").write_bytes(b"\n")
    with pytest.raises(SecretError, match="the secret is empty"):
        keys.read_secret(file=tmp_path / "empty")
    monkeypatch.setenv("IFADIT_TEST_SECRET", "")
    with pytest.raises(SecretError, match="the secret is empty"):
        keys.read_secret(env="IFADIT_TEST_SECRET")


def test_secret_sources(tmp_path, monkeypatch):
    (tmp_path / "s").write_bytes(SECRET + b"\n")
    assert keys.read_secret(file=tmp_path / "s") == SECRET  # one trailing newline dropped
    (tmp_path / "s2").write_bytes(b" spaced \r\n")
    assert keys.read_secret(file=tmp_path / "s2") == b" spaced "
    monkeypatch.setenv("IFADIT_TEST_SECRET", SECRET.decode())
    assert keys.read_secret(env="IFADIT_TEST_SECRET") == SECRET
    # Prompt: only with a terminal.
    class Stdin:
        def __init__(self, tty):
            self.isatty = lambda: tty

    monkeypatch.setattr(keys, "_prompt", lambda text: SECRET.decode())
    monkeypatch.setattr("sys.stdin", Stdin(True))
    assert keys.read_secret(prompt="secret: ") == SECRET
    monkeypatch.setattr("sys.stdin", Stdin(False))
    with pytest.raises(SecretError, match="no terminal"):
        keys.read_secret(prompt="secret: ")
    # Command line: refused unless explicitly allowed.
    with pytest.raises(SecretError, match="refusing a secret given on the command line"):
        keys.read_secret(unsafe_value=SECRET.decode())
    assert keys.read_secret(unsafe_value=SECRET.decode(), allow_unsafe=True) == SECRET
    with pytest.raises(SecretError, match="one way only"):
        keys.read_secret(file=tmp_path / "s", env="IFADIT_TEST_SECRET")
    with pytest.raises(SecretError, match="not set"):
        keys.read_secret(env="IFADIT_TEST_SECRET_UNSET")
    with pytest.raises(SecretError, match="no secret given"):
        keys.read_secret()


def test_cli_arguments(tmp_path):
    parser = argparse.ArgumentParser()
    keys.add_secret_arguments(parser)
    with pytest.raises(SecretError, match="command line"):
        keys.secret_from_args(parser.parse_args(["--secret", SECRET.decode()]))
    args = parser.parse_args(["--secret", SECRET.decode(), "--unsafe-secret-on-command-line"])
    assert keys.secret_from_args(args) == SECRET
    (tmp_path / "s").write_bytes(SECRET)
    assert keys.secret_from_args(parser.parse_args(["--secret-file", str(tmp_path / "s")])) == SECRET


def test_secret_never_leaks(tmp_path, monkeypatch, caplog, capsys):
    """Every path that touches the secret, with all logging at DEBUG, warnings recorded and
    stdout/stderr captured; then no message, log record, warning or written file holds it."""
    secret_dir = tmp_path / "secret"
    out_dir = tmp_path / "out"
    secret_dir.mkdir()
    out_dir.mkdir()
    (secret_dir / "s").write_bytes(SECRET + b"\n")
    monkeypatch.setenv("IFADIT_TEST_SECRET", SECRET.decode())
    caplog.set_level(logging.DEBUG)
    messages = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = keys.read_secret(file=secret_dir / "s")
        k = keys.derive_key(s, MAPPING, CHEAP)
        kdf = keys.KdfParams(memory_cost=8, iterations=1, lanes=1, salt=keys.random_salt())
        k2 = keys.derive_key(keys.read_secret(env="IFADIT_TEST_SECRET"), MAPPING, kdf)
        # What an anonymizer records next to its output, and the output itself.
        (out_dir / "recovery.json").write_text(kdf.to_json())
        np.save(out_dir / "key.npy", np.asarray(k))
        np.save(out_dir / "key2.npy", np.asarray(k2))
        print(repr(kdf), kdf)
        for call in (lambda: keys.read_secret(unsafe_value=SECRET.decode()),
                     lambda: keys.read_secret(file=secret_dir / "s", unsafe_value=SECRET),
                     lambda: keys.read_secret(env="IFADIT_TEST_SECRET", unsafe_value=SECRET.decode()),
                     lambda: keys.read_secret(file=secret_dir / "missing"),
                     lambda: keys.derive_key(b"", MAPPING, CHEAP)):
            with pytest.raises(SecretError) as exc:
                call()
            messages += [str(exc.value), repr(exc.value)]
    out, err = capsys.readouterr()
    texts = {"log": caplog.text, "stdout": out, "stderr": err,
             "warnings": " ".join(str(w.message) for w in caught), "errors": " ".join(messages)}
    for root, _, files in os.walk(tmp_path):
        for name in files:
            path = os.path.join(root, name)
            if path != str(secret_dir / "s"):
                with open(path, "rb") as f:
                    texts[path] = f.read().decode("latin-1")
    needles = {SECRET.decode(), SECRET.hex(), SECRET.decode()[:12]}
    for where, text in texts.items():
        for needle in needles:
            assert needle not in text, f"the secret appears in {where}"
    assert messages and len(texts) >= 8


@pytest.mark.parametrize("fields,text", [
    ({"iterations": 0}, "iterations"),
    ({"memory_cost": 2**32}, "memory_cost"),
    ({"lanes": 2**24}, "lanes"),
    ({"memory_cost": 64.0}, "memory_cost"),
    ({"iterations": True}, "iterations"),
    ({"salt": b"x" * 2000}, "salt"),
])
def test_kdf_parameters_are_refused_not_replaced(fields, text):
    with pytest.raises(InputError, match=text):
        keys.KdfParams(**fields)


def test_kdf_caps_need_an_explicit_allowance():
    costly = keys.KdfParams(memory_cost=keys.CAP_MEMORY_KIB + 1)
    with pytest.raises(InputError, match="cap"):
        costly.check_caps()
    costly.check_caps(allow_costly=True)
    keys.KdfParams().check_caps()  # the defaults lie within the caps
    with pytest.raises(InputError, match="iterations"):
        keys.KdfParams(iterations=keys.CAP_ITERATIONS + 1).check_caps()


def test_key_check_is_a_domain_separated_hmac_of_the_kdf_output():
    import hashlib
    import hmac

    raw = Argon2id(salt=keys.DEFAULT_SALT, length=512, iterations=1, lanes=1, memory_cost=8).derive(SECRET)
    want = hmac.new(raw, b"ifadit-jax/key-check/v1", hashlib.sha256).hexdigest()[:16]
    assert keys.key_check(raw) == want
    assert want not in raw.hex() and keys.key_check(raw[:-1] + bytes([raw[-1] ^ 1])) != want


def test_non_utf8_environment_secret_is_refused(monkeypatch):
    monkeypatch.setitem(os.environb, b"IFADIT_TEST_SECRET", b"\xff\xfe")
    with pytest.raises(SecretError, match="not valid UTF-8"):
        keys.read_secret(env="IFADIT_TEST_SECRET")
    monkeypatch.setitem(os.environb, b"IFADIT_TEST_SECRET", "s\u00e9cret".encode())
    assert keys.read_secret(env="IFADIT_TEST_SECRET") == "s\u00e9cret".encode()


def test_secret_file_is_read_with_a_bound(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"x" * (keys.MAX_SECRET_BYTES + 1))
    with pytest.raises(SecretError, match="longer than"):
        keys.read_secret(file=big)
