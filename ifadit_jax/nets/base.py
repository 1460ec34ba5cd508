"""One protocol for every network: a config with a JSON schema, and a loaded network.

A `NetConfig` is a frozen dataclass per network kind. `from_json(dict)` is the only way a config
from a file becomes one: it refuses unknown keys, wrong types and out-of-range values, naming
the key, so that a hostile file can neither crash nor size an allocation. `to_json()` writes the
same JSON the converters write. A config also knows its module (`module()`) and the inputs
`init` needs (`init_inputs()`), hence the variables a file must hold (`variable_shapes()`,
from `jax.eval_shape`: nothing is allocated).

A config reads like the dict it replaces (`config["widths"]`, `dict(config)`), so code written
against the dict idiom keeps working.

`Loaded` is the base of every loaded network: `config`, `module`, `variables`, calls jitted over
the variables, and the same validation on load (`check_variables`): every tensor's name, shape
and dtype against `variable_shapes()`, no extra tensors, finite values.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import math
from typing import Any, Callable, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ifadit_jax.errors import WeightsError

# Documented limits of every config (README "Weights"): large enough for every official network
# the converters read (StyleGAN2 1024 px, IR-152, InceptionV3's 2048-wide blocks), small enough
# that no file can make `eval_shape` or a converter's fallback size an absurd allocation.
MAX_WIDTH = 4096
MAX_RESOLUTION = 1024
MAX_DEPTH = 64  # units per stage, blocks, layers
MAX_LIST = 64  # entries of any list in a config


class ConfigError(WeightsError):
    """A config value is missing, of the wrong type, out of range, or unknown."""


# ------------------------------------------------------------------------- schema of one value

@dataclasses.dataclass(frozen=True)
class Int:
    lo: int = 1
    hi: int = MAX_WIDTH

    def parse(self, v: Any, key: str) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"config field '{key}' must be an integer, got {_show(v)}")
        if not self.lo <= int(v) <= self.hi:
            raise ConfigError(f"config field '{key}' must be in [{self.lo}, {self.hi}], got {int(v)}")
        return int(v)


@dataclasses.dataclass(frozen=True)
class Float:
    lo: float = -math.inf
    hi: float = math.inf
    optional: bool = False

    def parse(self, v: Any, key: str) -> float | None:
        if v is None and self.optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ConfigError(f"config field '{key}' must be a number, got {_show(v)}")
        if not (math.isfinite(float(v)) and self.lo <= float(v) <= self.hi):
            raise ConfigError(f"config field '{key}' must be finite and in [{self.lo}, {self.hi}], "
                              f"got {float(v)}")
        return float(v)


@dataclasses.dataclass(frozen=True)
class Bool:
    def parse(self, v: Any, key: str) -> bool:
        if not isinstance(v, (bool, np.bool_)):
            raise ConfigError(f"config field '{key}' must be true or false, got {_show(v)}")
        return bool(v)


@dataclasses.dataclass(frozen=True)
class Choice:
    values: tuple

    def parse(self, v: Any, key: str) -> Any:
        if not isinstance(v, (str, int, float)) or isinstance(v, bool) or v not in self.values:
            raise ConfigError(f"config field '{key}' must be one of {list(self.values)}, got {_show(v)}")
        return v


@dataclasses.dataclass(frozen=True)
class List:
    """A list of `item`s of a length in [min_len, max_len] (a tuple in the config)."""

    item: Any
    min_len: int = 1
    max_len: int = MAX_LIST

    def parse(self, v: Any, key: str) -> tuple:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"config field '{key}' must be a list, got {_show(v)}")
        if not self.min_len <= len(v) <= self.max_len:
            n = (f"{self.min_len}" if self.min_len == self.max_len
                 else f"{self.min_len} to {self.max_len}")
            raise ConfigError(f"config field '{key}' must have {n} entries, got {len(v)}")
        return tuple(self.item.parse(x, f"{key}[{i}]") for i, x in enumerate(v))


@dataclasses.dataclass(frozen=True)
class Record:
    """A JSON object with exactly these keys (e.g. Inception's width groups)."""

    fields: Mapping[str, Any]

    def parse(self, v: Any, key: str) -> tuple:
        parsed = _parse_fields(self.fields, v, key + ".", {})
        return tuple((k, parsed[k]) for k in self.fields)


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse_fields(schema: Mapping[str, Any], d: Any, prefix: str, defaults: Mapping[str, Any]) -> dict:
    if not isinstance(d, Mapping):
        raise ConfigError(f"config{' field ' + repr(prefix[:-1]) if prefix else ''} must be a JSON "
                          f"object, got {_show(d)}")
    unknown = sorted(str(k) for k in d if k not in schema)
    if unknown:
        raise ConfigError(f"unknown config field '{prefix}{unknown[0]}'"
                          + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    out = {}
    for name, spec in schema.items():
        if name in d:
            out[name] = spec.parse(d[name], prefix + name)
        elif name in defaults:
            out[name] = defaults[name]
        else:
            raise ConfigError(f"config field '{prefix}{name}' is missing")
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple) and v and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
                                          for x in v):
        return {k: _jsonable(x) for k, x in v}  # a Record
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v


# ------------------------------------------------------------------------------------ configs

def netconfig(cls):
    """Decorator of every config class: a frozen dataclass whose equality is `NetConfig`'s."""
    return dataclasses.dataclass(frozen=True, eq=False)(cls)


class NetConfig(collections.abc.Mapping):
    """Base of the per-network config dataclasses (subclasses are decorated with `netconfig`).

    Subclasses set `KIND`, `SCHEMA` (JSON key -> value schema; the keys are the dataclass
    fields) and implement `module()` and `init_inputs()`; `check()` adds cross-field rules.
    """

    KIND: ClassVar[str] = ""
    SCHEMA: ClassVar[Mapping[str, Any]] = {}
    # Keys that files of older converters may lack; they take the field's default. Every other
    # key must be present: a missing one must not silently change what the network computes.
    OPTIONAL: ClassVar[frozenset] = frozenset()

    @classmethod
    def from_json(cls, d: Any):
        defaults = {f.name: f.default for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING and f.name in cls.OPTIONAL}
        config = cls(**_parse_fields(cls.SCHEMA, d, "", defaults))
        config.check()
        return config

    def to_json(self) -> dict:
        return {name: _jsonable(getattr(self, name)) for name in self.SCHEMA}

    to_dict = to_json  # the name some callers used for SifConfig

    def check(self) -> None:
        """Cross-field rules; raise ConfigError naming the field."""

    def module(self):
        raise NotImplementedError

    def init_inputs(self) -> tuple:
        """The inputs `module().init` needs (shapes only)."""
        raise NotImplementedError

    def optional_variables(self) -> dict:
        """Flat name -> ShapeDtypeStruct of tensors a file may hold beyond the module's own."""
        return {}

    def variable_shapes(self) -> dict:
        """`jax.eval_shape` of the module's variables: what a file for this config holds."""
        return _variable_shapes(self)

    def __eq__(self, other: Any) -> bool:
        """Equal to a config of the same kind, or to a dict, with the same JSON."""
        if isinstance(other, NetConfig):
            return type(self) is type(other) and self.to_json() == other.to_json()
        if isinstance(other, Mapping):
            return self.to_json() == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        # Cached: a config is static data of jitted functions, hashed on every call.
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((type(self).__name__, json.dumps(self.to_json(), sort_keys=True)))
            object.__setattr__(self, "_hash", h)
        return h

    # Read-only mapping over the JSON form, for code written against config dicts.
    def __getitem__(self, key: str) -> Any:
        if key not in self.SCHEMA:
            raise KeyError(key)
        return _jsonable(getattr(self, key))

    def __iter__(self):
        return iter(self.SCHEMA)

    def __len__(self) -> int:
        return len(self.SCHEMA)


@functools.lru_cache(maxsize=32)
def _variable_shapes(config: NetConfig) -> dict:
    module = config.module()
    # The inputs are built inside the trace: abstract, so nothing is allocated.
    return jax.eval_shape(lambda: module.init(
        jax.random.key(0), *(jnp.zeros(s.shape, s.dtype) for s in config.init_inputs())))


def check_against_config(config: NetConfig, variables: Mapping[str, Any], what: str) -> None:
    """`check_variables` of `variables` against what `config` builds (WeightsError naming `what`)."""
    try:
        expected = config.variable_shapes()
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to build is the file's config at fault
        detail = str(e).splitlines()[0][:120] if str(e) else ""
        raise WeightsError(f"{what}: the config does not build a network of kind {config.KIND!r} "
                           f"({type(e).__name__}{': ' + detail if detail else ''})") from None
    check_variables(expected, variables, what, config.optional_variables())


def spec(*shape: int, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def parse_config(cls: type[NetConfig], config: Any, what: str) -> NetConfig:
    """`config` (a dict from a file, or already a `cls`) as a `cls`; WeightsError naming `what`."""
    if isinstance(config, cls):
        return config
    try:
        return cls.from_json(dict(config) if isinstance(config, NetConfig) else config)
    except ConfigError as e:
        raise WeightsError(f"{what}: {e}") from None


# ------------------------------------------------------------------------ variable validation

def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(tree, Mapping):
        raise WeightsError(f"{_name(prefix[:-1])} is a tensor where a group of tensors belongs")
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_variables(expected: Mapping[str, Any], got: Mapping[str, Any], what: str,
                    optional: Mapping[str, Any] | None = None) -> None:
    """Refuses (WeightsError naming `what` and the tensor) any missing, extra, misshapen or
    mistyped tensor of `got` against `expected` (arrays or ShapeDtypeStructs), and any
    non-finite value. `optional`: flat names that may be absent."""
    exp = {**_flat(expected), **dict(optional or {})}
    try:
        have = _flat(got)
    except WeightsError as e:
        raise WeightsError(f"{what}: {e}") from None
    problems = [f"missing tensor {k} {tuple(exp[k].shape)}" for k in exp
                if k not in have and k not in (optional or {})]
    problems += [f"unexpected tensor {_name(k)}" for k in have if k not in exp]
    for k in (k for k in exp if k in have):
        e_shape, e_dtype = tuple(exp[k].shape), _expected_dtype(exp[k].dtype)
        shape, dtype = tuple(np.shape(have[k])), _dtype(have[k])
        if shape != e_shape:
            problems.append(f"tensor {k} has shape {shape}, expected {e_shape}")
        elif dtype != e_dtype and not _widened(dtype, e_dtype):
            problems.append(f"tensor {k} has dtype {dtype}, expected {e_dtype}")
        elif np.issubdtype(dtype, np.floating) and not np.all(np.isfinite(have[k])):
            problems.append(f"tensor {k} has non-finite values")
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise WeightsError(f"{what}: " + "; ".join(problems[:3]) + more)


def _expected_dtype(dtype) -> np.dtype:
    """Weights are float32 (`eval_shape` says float64 for some under `jax_enable_x64`)."""
    return np.dtype(np.float32) if np.issubdtype(dtype, np.floating) else np.dtype(dtype)


def _widened(dtype: np.dtype, expected: np.dtype) -> bool:
    """float64 variables in memory under `jax_enable_x64` (a float64 computation); files never
    hold them (`weights.read` admits only F32 and I32 tensors)."""
    return dtype == np.float64 and expected == np.float32 and bool(jax.config.jax_enable_x64)


def _name(text: str) -> str:
    """A name from a file as is if printable, else escaped: it reaches the terminal."""
    return text if text.isprintable() and len(text) <= 200 else repr(text[:200])


def _dtype(x: Any) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


# ------------------------------------------------------------------------------ loaded networks

class Loaded:
    """A loaded network: `config` (a `NetConfig`), `module`, `variables` (validated on load),
    `meta`; subclasses add only their preprocessing and methods.

    Calls are jitted over the variables (`_run`); inside your own jit use the pure function
    `net.module.apply(net.variables, ...)`.
    """

    CONFIG: ClassVar[type[NetConfig]]

    def __init__(self, config: Any, variables: Mapping[str, Any], meta: Any = None):
        # `what`: how messages name this network (its file, else its kind).
        what = self.what = _what(meta, self.CONFIG)
        self.config = parse_config(self.CONFIG, config, what)
        self.meta = meta
        check_against_config(self.config, variables, what)
        self.module, self.variables = self._setup(variables)
        self._jitted: dict[tuple, Callable] = {}

    def _setup(self, variables: Mapping[str, Any]) -> tuple[Any, dict]:
        """(module, variables in memory) from the checked file variables; a network whose
        module depends on its file (the flow's permutations) overrides this."""
        # device_put, not jnp.asarray: the latter compiles a tiny program per distinct shape
        # (about a hundred for a pSp encoder, most of a random pipeline's start-up).
        return self.config.module(), jax.device_put(dict(variables))

    @classmethod
    def from_weights(cls, variables: Mapping[str, Any], meta: Any):
        """The loader `weights.loader(kind)` returns: (variables, meta) -> a loaded network."""
        return cls(meta.config, variables, meta)

    def _run(self, method: str | None, *args, **static):
        """`module.apply(variables, *args, method=method, **static)`, jitted once per method and
        static arguments."""
        key = (method, tuple(sorted(static.items())))
        fn = self._jitted.get(key)
        if fn is None:
            fn = jax.jit(functools.partial(self.module.apply, method=method, **static))
            self._jitted[key] = fn
        return fn(self.variables, *args)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def _what(meta: Any, cls: type[NetConfig]) -> str:
    for attr in ("path", "source_file"):
        name = getattr(meta, attr, "")
        if name:
            return name
    return f"{cls.KIND} weights"


def f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


__all__: Sequence[str] = ("NetConfig", "netconfig", "ConfigError", "Loaded", "check_variables", "parse_config",
                          "Int", "Float", "Bool", "Choice", "List", "Record", "spec", "MAX_WIDTH",
                          "MAX_RESOLUTION", "MAX_DEPTH")
