"""One process of `test_exec_cache.py`, printing JSON with what the executable cache did:

    python tests/exec_cache_worker.py stream FOLDER   # greedy tokens streamed from the tiny random model
    python tests/exec_cache_worker.py small FOLDER    # a small jitted function, run then loaded back from FOLDER

`stream` compiles the programs `dsv4-jax generate --prompt Hello --max-new-tokens 8` compiles on the embedded tiny
checkpoint (`init_random`, then `prepare_params` as the CLI does: the same structure, shapes and dtypes), so that
the CLI test and this one share the entries. `small` runs the function through plain `jax.jit` first: with JAX's
persistent cache warm (a second run), that executable comes from the cache, and the executable cache must still
store one that loads and runs.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def stream(folder: str) -> dict:
    import jax

    import dsv4_jax
    from dsv4_jax import exec_cache, ops
    from dsv4_jax import generation as G

    exec_cache.enable(folder)
    # Prepared as the CLI prepares what it restores (FP8 scales as f32): the programs' arguments, and so their
    # entries, are then the CLI's (unprepared, the scales' dtype alone made other keys and two more compiles).
    state = dsv4_jax.prepare_params(dsv4_jax.init_random(dsv4_jax.Config.tiny(), 0), donate=True)
    tokens = np.zeros((1, 64), np.int32)
    tokens[0, :6] = [0, 72, 101, 108, 108, 111]  # BOS "Hello"
    sampler = G.Sampler(max_new_tokens=8, eos_id=None)  # the EOS id is not part of the program: all 8 tokens
    run = G.GenerationStream(state, tokens, [6], sampler=sampler, key=jax.random.key(0), max_len=128)
    with ops.record() as ran:
        run.compile()
    out = [int(t[0]) for t, _ in run]
    return {"tokens": out, "counts": exec_cache.COUNTS, "ran": ran, "compile_s": run.compile_s}


def small(folder: str) -> dict:
    import jax
    import jax.numpy as jnp

    from dsv4_jax import exec_cache

    fn = jax.jit(lambda x: jnp.sin(x) * 3 + 1)
    x = jnp.arange(8, dtype=jnp.float32)
    want = np.asarray(fn(x)).tolist()
    exec_cache.enable(folder)
    exec_cache.compiled("small", fn, (x,), {})
    exec_cache._LOADED.clear()  # as in a new process: from the disk
    got = np.asarray(exec_cache.compiled("small", fn, (x,), {})(x)).tolist()
    return {"equal": got == want, "counts": exec_cache.COUNTS}


if __name__ == "__main__":
    print(json.dumps({"stream": stream, "small": small}[sys.argv[1]](sys.argv[2])))
