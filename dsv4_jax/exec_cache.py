"""A disk cache of compiled executables: a process that asks for a program compiled before (by any process) loads it
without tracing, lowering or compiling.

JAX's persistent compilation cache (`dsv4_jax.cli.compile_cache`) keys on the lowered module, so every process still
traces and lowers each program before it can hit (seconds per program for the generation programs). This cache keys
on what the program is made from instead, before tracing:

  * the program's name and the source of the dsv4_jax package (every `*.py` under it, hashed once per process);
  * jax and jaxlib versions, the backend and its version, the kinds and number of devices;
  * every dynamic argument's pytree structure and each leaf's shape, dtype, weak type and sharding;
  * the static arguments' reprs (`Opts`, `Sampler`, `max_len`: frozen dataclasses and ints);
  * every environment variable named `DSV4_*`, `XLA_*` or `JAX_*` except the cache locations (kernel selection and
    kernel variants are read from the environment while tracing), JAX's tracing configuration (`jax.config` flags,
    the mesh in context) and the kernel extension `dsv4_jax_ffi` (whether it loads here, its binary's path, size and
    modification time).

Off unless `enable(folder)` was called: the CLI calls it from `compile_cache.enable()`, so it shares the compilation
cache's folder (`<folder>/executables/`) and its off switch (`--no-compile-cache`, `DSV4_JAX_COMPILE_CACHE=0`); a
library user gets files written only on asking. An entry is `<name>-<key>.bin`, written atomically (a temporary file,
then a rename) with a checksum; one that is damaged or does not load is compiled again and rewritten; a program that
cannot be serialized (a host callback, a backend without serialization) or a multi-process run compiles as without
the cache. Entries are pickles, loaded as JAX's own cache loads executables: the folder must be trusted as the code is.
Which implementation each op chose while tracing (`ops.record`) is stored with the program and replayed on a load.
Nothing is evicted: entries of old keys stay until the folder is cleared.

A miss compiles with JAX's persistent cache off for that one compile: an executable which that cache returned does
not serialize whole (XLA:CPU keeps no code of one it loads; stored, it would fail at its first run). So after the key
changes (another dsv4_jax source, another environment) the first call compiles in full even where JAX's cache holds
the program; later calls load it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import pickle
import re
import sys
import tempfile

import jax
import jaxlib

__all__ = ["enable", "disable", "folder", "compiled", "COUNTS"]

log = logging.getLogger("dsv4_jax.exec_cache")

MAGIC = b"dsv4_jax executable 1\n"  # a new layout of the entries takes a new number
ENV_PREFIXES = ("DSV4_", "XLA_", "JAX_")
# Where caches and checkpoints live changes no program: leaving them out lets processes with other folders share.
ENV_LOCATIONS = frozenset({"DSV4_JAX_COMPILE_CACHE", "DSV4_JAX_CACHE", "JAX_COMPILATION_CACHE_DIR"})

_ADDRESS = re.compile(r" at 0x[0-9a-f]+")  # an object's address in a repr: differs between processes
_FOLDER: list[str | None] = [None]
COUNTS = {"loaded": 0, "compiled": 0, "stored": 0}  # what this process's cache lookups did (tests read it)
# In-process: (name, fn, structure, avals, statics) -> Compiled, so a repeated call costs no key hash or disk read.
_LOADED: dict = {}


def enable(where: str) -> str:
    """Caches executables under `where` from now on (in this process); returns the folder."""
    _FOLDER[0] = os.path.abspath(where)
    return _FOLDER[0]


def disable() -> None:
    _FOLDER[0] = None


def folder() -> str | None:
    """The folder in use, or None when off."""
    return _FOLDER[0]


@functools.cache
def _source_digest() -> str:
    root = pathlib.Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _kernel_extension() -> str:
    # Loading the extension also registers its FFI handlers, which a program loaded from disk needs before it runs.
    from dsv4_jax import kernels

    why = kernels.unavailable()
    ext = sys.modules.get("dsv4_jax_ffi._ffi")
    binary = getattr(ext, "__file__", None)
    if binary is None:
        return f"unavailable: {why}"
    st = os.stat(binary)
    return f"{binary} {st.st_size} {st.st_mtime_ns}; unavailable: {why}"


def _trace_context() -> str:
    try:  # private: the flags jax's own tracing cache keys on (x64, default device, the mesh in context, ...)
        from jax._src import config

        ctx = repr(config.trace_context())
    except (ImportError, AttributeError):
        ctx = "?"
    return _ADDRESS.sub("", ctx)


@functools.lru_cache(maxsize=64)
def _structure(tree) -> str:
    # ~0.1 s for a model's structure (its GraphDef): once per process, not once per program.
    return _ADDRESS.sub("", str(tree))


def _leaf(x) -> tuple:
    aval = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
    return tuple(aval.shape), str(aval.dtype), bool(aval.weak_type), getattr(x, "sharding", None)


def _disk_key(name: str, args: tuple, leaves, static: dict) -> str:
    devices = jax.devices()
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIXES) and k not in ENV_LOCATIONS)
    parts = [
        name,
        _source_digest(),
        jax.__version__,
        jaxlib.__version__,
        jax.default_backend(),
        devices[0].client.platform_version,
        repr(sorted({d.device_kind for d in devices})),
        str(len(devices)),
        "; ".join(_structure(jax.tree.structure(a)) for a in args),
        repr(leaves),
        repr(sorted(static.items())),
        repr(env),
        _trace_context(),
        _kernel_extension(),
    ]
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() + b"\0")
    return h.hexdigest()[:40]


def _read(path: str):
    with open(path, "rb") as f:
        data = f.read()
    head, digest, payload = data[: len(MAGIC)], data[len(MAGIC) : len(MAGIC) + 64], data[len(MAGIC) + 65 :]
    if head != MAGIC or digest.decode(errors="replace") != hashlib.sha256(payload).hexdigest():
        raise ValueError("not a complete entry")  # truncated or damaged: never handed to the deserializer
    return pickle.loads(payload)


def _write(path: str, entry: dict) -> None:
    payload = pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
        os.replace(tmp, path)  # readers see the old entry or the whole new one
    except BaseException:
        os.unlink(tmp)
        raise


def _load(path: str, args: tuple):
    from jax.experimental import serialize_executable

    from dsv4_jax.ops import registry

    entry = _read(path)
    by_id = {d.id: d for d in jax.devices(entry["platform"])}
    devices = [by_id[i] for i in entry["devices"]]
    in_tree = jax.tree.structure((args, {}))  # what `serialize` returns for these arguments, rebuilt, not stored
    exe = serialize_executable.deserialize_and_load(entry["executable"], in_tree, entry["out_tree"],
                                                    backend=devices[0].client, execution_devices=devices)  # fmt: skip
    registry.replay(entry["ops"])
    COUNTS["loaded"] += 1
    return exe


def _compile_and_store(path: str, fn, args: tuple, static: dict):
    from jax.experimental import serialize_executable

    from dsv4_jax.ops import registry

    with registry.record() as ran:
        lowered = fn.lower(*args, **static)
    exe = _fresh(lowered)
    COUNTS["compiled"] += 1
    try:
        blob, _, out_tree = serialize_executable.serialize(exe)
        devices = list(exe._executable._unloaded_executable.device_list)
        entry = {"executable": blob, "out_tree": out_tree, "platform": devices[0].platform,
                 "devices": [d.id for d in devices], "ops": dict(ran)}  # fmt: skip
        _write(path, entry)
        COUNTS["stored"] += 1
    except Exception as e:  # noqa: BLE001 - a backend or program that cannot be serialized is simply not cached
        log.debug("dsv4_jax: executable %s not cached: %s", os.path.basename(path), e)
    return exe


def _fresh(lowered):
    """`lowered.compile()` by XLA itself: only a freshly compiled executable serializes whole. One that JAX's
    persistent cache returned does not (XLA:CPU keeps no code of an executable it loads: serialized again, it fails
    at its first run with "Function ... not found"), so that cache is off meanwhile, and a compiler option at its
    default value gives the program another key in JAX's in-process cache of executables."""
    from jax.experimental.compilation_cache import compilation_cache

    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        return lowered.compile({"xla_dump_hlo_as_text": False})
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
        compilation_cache.reset_cache()


def compiled(name: str, fn, args: tuple, static: dict):
    """`fn.lower(*args, **static).compile()` (`fn` jitted, `static` its static arguments by name), from the cache
    when it holds this program. The result is called with `args`' structure and types: `exe(*args)`."""
    where = _FOLDER[0]
    if where is None or jax.process_count() > 1:
        return fn.lower(*args, **static).compile()
    leaves, tree = jax.tree.flatten(args)
    leaves = tuple(_leaf(x) for x in leaves)
    memo = (name, fn, tree, leaves, tuple(sorted(static.items())))
    if (exe := _LOADED.get(memo)) is not None:
        return exe
    path = os.path.join(where, f"{name}-{_disk_key(name, args, leaves, static)}.bin")
    exe = None
    if os.path.exists(path):
        try:
            exe = _load(path, args)
        except Exception as e:  # noqa: BLE001 - any unreadable entry is recompiled and replaced
            log.warning("dsv4_jax: cached executable %s did not load (%s); compiling it again", path, e)
    if exe is None:
        exe = _compile_and_store(path, fn, args, static)
    _LOADED[memo] = exe
    return exe
