"""KeyGen (paper §3.3.1, Eq. 4): from a secret to the key k that conditions the flow.

    k = f(Norm(KDF(s)))

KDF is Argon2id (memory-hard, from `cryptography`) with 512 output bytes; Norm maps each byte b
to b / 127.5 - 1 in [-1, 1]; f is StyleGAN2's mapping network, passed in as a callable
`mapping(u [B, 512]) -> [B, 512]` (e.g. `G.mapping` of a loaded generator). One changed bit of
the secret gives unrelated KDF bytes, hence an unrelated key.

The KDF parameters (`KdfParams`: memory cost, iterations, lanes, salt) are configuration, not
secrets: record `kdf.to_json()` with every anonymized output so that recovery can re-derive the
key from the same secret. The default salt is a fixed, public project constant
(`DEFAULT_SALT`), so that the secret alone (with the recorded parameters) recovers; a per-user
or per-dataset salt from `random_salt()` makes precomputed guessing tables useless and must be
recorded the same way.

The official code has no KDF: its key is k = f(u) with u ~ U[0.5, 1)^512 drawn at random
(`official_key_seed`, `key_from_vector`).

KDF parameters from flags or from a sidecar are untrusted: `KdfParams` refuses values Argon2
cannot take (0 iterations, 2^32 KiB), and `check_caps` refuses costs above CAP_* (1 GiB, 16
passes, 16 lanes) unless explicitly allowed. `key_check(kdf_output)` is an opt-in short check
value (HMAC-SHA256 under a domain-separated label) that lets recovery say "wrong secret".

Secrets come from a file, an environment variable or an interactive prompt (`read_secret`);
one given on the command line (visible to other users in `ps` and in shell history) is refused
unless explicitly allowed. A secret is never put into messages, logs or files by this module.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import secrets as _secrets
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax.errors import InputError, SecretError

KEY_BYTES = 512  # one KDF byte per key coordinate
# Public and fixed on purpose: recovery must re-derive the key from the recorded parameters.
DEFAULT_SALT = b"ifadit-jax/keygen/argon2id/v1"
MIN_SALT_BYTES = 8  # Argon2 (RFC 9106) minimum
MAX_SALT_BYTES = 1024  # a salt longer than this is a malformed record, not more security
# Caps on what a sidecar or a flag may ask the KDF to spend, unless the user explicitly allows
# more (`--kdf-allow-costly`): 1 GiB of memory, 16 passes, 16 lanes. The defaults sit far below.
CAP_MEMORY_KIB = 1 << 20
CAP_ITERATIONS = 16
CAP_LANES = 16
# Argon2's own limits (RFC 9106: 32-bit fields, lanes < 2^24); beyond them the library overflows.
LIMIT_MEMORY_KIB = 2**32 - 1
LIMIT_ITERATIONS = 2**32 - 1
LIMIT_LANES = 2**24 - 1
MAX_SECRET_BYTES = 64 * 1024
CHECK_LABEL = b"ifadit-jax/key-check/v1"  # domain separation: the check never equals key bytes
CHECK_HEX = 16  # 64 bits: enough to tell secrets apart, short enough to show

Mapping = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters (RFC 9106 names). Safe to record and publish; never holds a secret.

    memory_cost: KiB of memory per derivation (default 64 MiB, RFC 9106's second
      recommended setting); iterations: passes over that memory (3); lanes: parallelism (4);
    salt: bytes, at least 8 (default: the public `DEFAULT_SALT`).
    The default costs about 0.1 s per derivation on a 2-core x86 CPU (see bench/bench_flow.py).
    """

    memory_cost: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4
    salt: bytes = DEFAULT_SALT
    algorithm: str = "argon2id"

    def __post_init__(self):
        problems = []
        if self.algorithm != "argon2id":
            # Never repr() an arbitrary value from a file: a deeply nested one would recurse.
            shown = (repr(self.algorithm[:40]) if isinstance(self.algorithm, str)
                     else type(self.algorithm).__name__)
            problems.append(f"unknown KDF {shown} (only 'argon2id')")
        if not isinstance(self.salt, bytes) or not MIN_SALT_BYTES <= len(self.salt) <= MAX_SALT_BYTES:
            problems.append(f"salt must be {MIN_SALT_BYTES} to {MAX_SALT_BYTES} bytes")
        for name, limit in (("memory_cost", LIMIT_MEMORY_KIB), ("iterations", LIMIT_ITERATIONS),
                            ("lanes", LIMIT_LANES)):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= limit:
                problems.append(f"{name} must be an integer from 1 to {limit}")
        if not problems and self.memory_cost < 8 * self.lanes:
            problems.append(f"memory_cost must be at least 8 KiB per lane ({8 * self.lanes})")
        if problems:
            raise InputError("KDF parameters: " + "; ".join(problems))

    def check_caps(self, allow_costly: bool = False) -> None:
        """Refuses parameters above the caps (CAP_*): they could exhaust memory or hang."""
        if allow_costly:
            return
        for name, cap in (("memory_cost", CAP_MEMORY_KIB), ("iterations", CAP_ITERATIONS),
                          ("lanes", CAP_LANES)):
            if getattr(self, name) > cap:
                raise InputError(f"KDF parameters: {name} {getattr(self, name)} is above the cap "
                                 f"{cap} (pass --kdf-allow-costly to allow it)")

    def to_dict(self) -> dict:
        return {"algorithm": self.algorithm, "memory_cost": int(self.memory_cost),
                "iterations": int(self.iterations), "lanes": int(self.lanes),
                "salt": self.salt.hex(), "output_bytes": KEY_BYTES}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "KdfParams":
        d = dict(d)
        if d.pop("output_bytes", KEY_BYTES) != KEY_BYTES:
            raise InputError(f"KDF parameters: output_bytes must be {KEY_BYTES}")
        unknown = sorted(set(d) - {"algorithm", "memory_cost", "iterations", "lanes", "salt"})
        if unknown:
            raise InputError(f"KDF parameters: unknown fields {unknown}")
        try:
            if "salt" in d:
                if not isinstance(d["salt"], str) or len(d["salt"]) > 2 * MAX_SALT_BYTES:
                    raise ValueError("salt must be a hexadecimal string")
                try:
                    d["salt"] = bytes.fromhex(d["salt"])
                except ValueError:
                    raise ValueError("salt must be a hexadecimal string") from None
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise InputError(f"KDF parameters: {e}") from None

    @classmethod
    def from_json(cls, text: str) -> "KdfParams":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"KDF parameters: not JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise InputError("KDF parameters: expected a JSON object")
        return cls.from_dict(d)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def random_salt(n_bytes: int = 16) -> bytes:
    """A fresh random salt (from the OS CSPRNG) for `KdfParams(salt=...)`; record it."""
    if n_bytes < MIN_SALT_BYTES:
        raise InputError(f"a salt needs at least {MIN_SALT_BYTES} bytes")
    return _secrets.token_bytes(n_bytes)


def _check_secret(secret) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not isinstance(secret, (bytes, bytearray, memoryview)):
        raise SecretError(f"the secret must be bytes, got {type(secret).__name__}")
    if len(secret) == 0:
        raise SecretError("the secret is empty")
    return bytes(secret)


def kdf_bytes(secret: bytes, kdf: KdfParams = KdfParams()) -> bytes:
    """KDF(s): 512 Argon2id output bytes."""
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    secret = _check_secret(secret)
    return Argon2id(salt=kdf.salt, length=KEY_BYTES, iterations=int(kdf.iterations),
                    lanes=int(kdf.lanes), memory_cost=int(kdf.memory_cost)).derive(secret)


def key_check(kdf_output: bytes) -> str:
    """A short check value of the key material (HMAC-SHA256 of the KDF output under a
    domain-separated label): equal checks mean the same secret with near certainty, and the
    check reveals neither the secret nor the key bytes. Stored only with `--key-check`."""
    import hashlib
    import hmac

    return hmac.new(bytes(kdf_output), CHECK_LABEL, hashlib.sha256).hexdigest()[:CHECK_HEX]


def norm(b):
    """Norm (paper Eq. 4): byte values b (0..255, a float numpy or jax array) -> b / 127.5 - 1,
    in [-1, 1], in b's dtype. Training draws random bytes on the device and uses it too."""
    return b / 127.5 - 1.0


def normalize_bytes(b: bytes) -> np.ndarray:
    """Norm of a byte string: float32 [len(b)] (see `norm`)."""
    return norm(np.frombuffer(bytes(b), dtype=np.uint8).astype(np.float32))


def key_from_vector(u, mapping: Mapping) -> jax.Array:
    """The key path k = f(u). u [B, 512] or [512] -> k of the same shape, float32 (float64 for
    float64 u: a float64 training step keys in float64)."""
    u = jnp.asarray(u)
    if u.dtype != jnp.float64:
        u = u.astype(jnp.float32)
    if u.ndim not in (1, 2):
        raise InputError(f"key vector must have shape [512] or [B, 512], got {tuple(u.shape)}")
    k = jnp.asarray(mapping(u[None] if u.ndim == 1 else u), u.dtype)
    return k[0] if u.ndim == 1 else k


def official_key_seed(rng: jax.Array, batch: int | None = None, dim: int = 512) -> jax.Array:
    """The official random key seed u ~ U[0.5, 1)^dim, i.e. (rand + 1) / 2 (test.py):
    [dim], or [batch, dim] with independent rows."""
    shape = (dim,) if batch is None else (batch, dim)
    return (jax.random.uniform(rng, shape, jnp.float32) + 1.0) / 2.0


def derive_key(secret: bytes, mapping: Mapping, kdf: KdfParams = KdfParams()) -> jax.Array:
    """k = f(Norm(KDF(secret))): one key [512] float32 for `sif_forward`/`sif_inverse`.

    secret: non-empty bytes (a str is UTF-8 encoded); mapping: f, [B, 512] -> [B, 512].
    Raises SecretError for an empty secret (the message never contains the secret).
    """
    return key_from_vector(jnp.asarray(normalize_bytes(kdf_bytes(secret, kdf))), mapping)


# ----------------------------------------------------------------------------------------------
# Reading secrets


def _strip_newline(b: bytes) -> bytes:
    """Files written with `echo` end in a newline that is not part of the secret."""
    if b.endswith(b"\r\n"):
        return b[:-2]
    if b.endswith(b"\n"):
        return b[:-1]
    return b


def _prompt(text: str) -> str:
    return getpass.getpass(text)


def read_secret(file: str | os.PathLike | None = None, env: str | None = None,
                prompt: str | None = None, unsafe_value: str | bytes | None = None,
                allow_unsafe: bool = False) -> bytes:
    """Reads the secret from exactly one source and returns it as bytes.

    file: path of a file holding the secret, at most MAX_SECRET_BYTES (one trailing newline is
      dropped; other bytes, including spaces, are part of the secret).
    env: name of an environment variable holding it (must be valid UTF-8).
    prompt: if neither is given, ask interactively (without echo) with this text; needs a
      terminal.
    unsafe_value: a secret given on the command line; refused unless `allow_unsafe` (argv is
      visible to other users and kept in shell history).
    Raises SecretError (exit code 6 in the CLIs) with a message that never contains the secret.
    """
    given = [name for name, v in (("a secret file", file), ("an environment variable", env),
                                  ("a command-line secret", unsafe_value)) if v is not None]
    if len(given) > 1:
        raise SecretError(f"give the secret in one way only (got {' and '.join(given)})")
    if unsafe_value is not None:
        if not allow_unsafe:
            raise SecretError("refusing a secret given on the command line (other users can read it "
                              "from the process list and shell history); use a secret file, an "
                              "environment variable or the prompt, or allow it explicitly")
        secret = unsafe_value.encode("utf-8") if isinstance(unsafe_value, str) else bytes(unsafe_value)
    elif file is not None:
        try:
            with open(file, "rb") as f:
                secret = f.read(MAX_SECRET_BYTES + 1)  # bounded: the file may be a pipe
            if len(secret) > MAX_SECRET_BYTES:
                raise SecretError(f"the secret file {os.fspath(file)} is longer than "
                                  f"{MAX_SECRET_BYTES} bytes")
            secret = _strip_newline(secret)
        except OSError as e:
            raise SecretError(f"cannot read the secret file {os.fspath(file)}: {e.strerror}") from None
    elif env is not None:
        secret = _secret_from_env(env)
    elif prompt is not None:
        if not sys.stdin or not sys.stdin.isatty():
            raise SecretError("no secret given and no terminal to ask for one "
                              "(give a secret file or an environment variable)")
        try:
            secret = _prompt(prompt).encode("utf-8")
        except EOFError:
            raise SecretError("no secret entered") from None
    else:
        raise SecretError("no secret given (give a secret file, an environment variable or use the prompt)")
    if len(secret) == 0:
        raise SecretError("the secret is empty")
    return secret


def _secret_from_env(env: str) -> bytes:
    value = os.environb.get(os.fsencode(env)) if os.supports_bytes_environ else None
    if value is None and not os.supports_bytes_environ:
        text = os.environ.get(env)
        value = None if text is None else text.encode("utf-8", "surrogateescape")
    if value is None:
        raise SecretError(f"the environment variable {env} is not set")
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        # A prompt or a file typed elsewhere would give UTF-8: refuse rather than derive a key
        # from bytes the user could not type again.
        raise SecretError(f"the environment variable {env} is not valid UTF-8") from None
    return value


def add_secret_arguments(parser) -> None:
    """Adds --secret-file, --secret-env, --secret and --unsafe-secret-on-command-line to an
    argparse parser; read the secret with `secret_from_args(args)`."""
    g = parser.add_argument_group("secret (give one; without any, you are asked for it)")
    g.add_argument("--secret-file", metavar="PATH",
                   help="file holding the secret (a trailing newline is dropped)")
    g.add_argument("--secret-env", metavar="VAR", help="environment variable holding the secret")
    g.add_argument("--secret", metavar="TEXT", help="the secret itself: UNSAFE (visible to other users), "
                   "needs --unsafe-secret-on-command-line")
    g.add_argument("--unsafe-secret-on-command-line", action="store_true",
                   help="allow --secret")


def secret_from_args(args, prompt: str = "secret: ") -> bytes:
    """The secret selected by the options of `add_secret_arguments`."""
    return read_secret(file=args.secret_file, env=args.secret_env,
                       prompt=prompt, unsafe_value=args.secret,
                       allow_unsafe=args.unsafe_secret_on_command_line)
