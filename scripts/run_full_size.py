"""The full-size model on a mesh through the product path, in one process: weights initialised straight into their
shardings (random bytes in the storage formats: the machine's disk cannot hold the checkpoint), `generate` from a
prompt, per-GPU memory, the batch-1 time per token (TPOT, from two generation lengths), batch throughput, and where
a decode step's time goes.

    python scripts/run_full_size.py --preset flash --mesh expert=2            # 2 x H200
    python scripts/run_full_size.py --preset pro --mesh expert=8              # 8 x H200
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python scripts/run_full_size.py --preset tiny --mesh expert=8 --new 4,8 --batch 4   # a dry run on CPU

Prints one JSON line per phase.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import dsv4_jax
from dsv4_jax import generation as G
from dsv4_jax import ops
from dsv4_jax.sharding import make_mesh


def memory() -> list[dict]:
    out = []
    for d in jax.local_devices():
        st = d.memory_stats() or {}
        gb = {k: st.get(f, 0) / 1e9 for k, f in (("in_use_GB", "bytes_in_use"), ("peak_GB", "peak_bytes_in_use"),
                                                    ("limit_GB", "bytes_limit"))}  # fmt: skip
        out.append({"device": d.id, **gb})
    return out


def say(**kw) -> None:
    print(json.dumps(kw, default=str), flush=True)


def timed_generate(state, tokens, n: int, opts, repeats: int = 2) -> tuple[float, object]:
    sampler = G.Sampler(max_new_tokens=n, eos_id=None)
    out = G.generate(state, tokens, sampler=sampler, opts=opts)
    out.tokens.block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = G.generate(state, tokens, sampler=sampler, opts=opts)
        out.tokens.block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="flash", choices=("tiny", "flash", "pro"))
    ap.add_argument("--layers", type=int, default=0, help="fewer layers (a dry run); 0 = all")
    ap.add_argument("--mesh", default="expert=2", help="mesh axes, e.g. expert=2 or expert=4,tensor=2")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--prompt", default="The capital of France is Paris. The capital of Germany is")
    ap.add_argument("--new", default="32,96", help="two generation lengths (TPOT from their difference)")
    ap.add_argument("--batch", type=int, default=64, help="batch for the throughput measurement (0: skip)")
    ap.add_argument("--batch-prompt", type=int, default=256)
    ap.add_argument("--breakdown", action="store_true", help="profile a decode step (jax.profiler)")
    args = ap.parse_args(argv)
    axes = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
    mesh = make_mesh(**axes)
    cfg = getattr(dsv4_jax.Config, args.preset)()
    if args.layers:
        ratios = cfg.compress_ratios[: args.layers] + cfg.compress_ratios[cfg.n_layers :]
        cfg = cfg.replace(
            n_layers=args.layers, compress_ratios=ratios, n_hash_layers=min(cfg.n_hash_layers, args.layers)
        )
    if args.preset == "tiny":
        cfg = cfg.replace(n_routed_experts=max(cfg.n_routed_experts, 8 * axes.get("expert", 1)))
    opts = dsv4_jax.Opts(backend=args.backend)
    say(phase="start", devices=[str(d) for d in jax.devices()], mesh=dict(mesh.shape), layers=cfg.n_layers)

    t = time.perf_counter()
    state = dsv4_jax.init_random(cfg, 0, mesh=mesh, values="bytes" if args.preset != "tiny" else "normal")
    jax.block_until_ready(state.params)
    init_s = time.perf_counter() - t
    state = dsv4_jax.prepare_params(state)
    jax.block_until_ready(state.params)
    say(phase="init", seconds=init_s, prepared_s=time.perf_counter() - t - init_s, memory=memory())

    ids = [b % cfg.vocab_size for b in args.prompt.encode()]
    tokens = np.asarray([ids], np.int32)
    n1, n2 = (int(x) for x in args.new.split(","))
    with jax.set_mesh(mesh):
        t = time.perf_counter()
        with ops.record() as ran:
            out = G.generate(state, tokens, sampler=G.Sampler(max_new_tokens=n1, eos_id=None), opts=opts)
            out.tokens.block_until_ready()
        say(phase="first_generate", seconds=time.perf_counter() - t, kernels=ran, tokens=np.asarray(out.tokens)[0])
        t1, _ = timed_generate(state, tokens, n1, opts)
        t2, out = timed_generate(state, tokens, n2, opts)
        tpot = (t2 - t1) / (n2 - n1)
        say(phase="batch1", prompt_tokens=len(ids), gen_s={n1: t1, n2: t2}, tpot_ms=1e3 * tpot,
            tokens=np.asarray(out.tokens)[0][:16], memory=memory())  # fmt: skip
        if args.batch:
            bt = np.random.default_rng(0).integers(2, cfg.vocab_size, (args.batch, args.batch_prompt)).astype(np.int32)
            b1, _ = timed_generate(state, bt, n1, opts, repeats=1)
            b2, _ = timed_generate(state, bt, n2, opts, repeats=1)
            step = (b2 - b1) / (n2 - n1)
            say(phase=f"batch{args.batch}", step_ms=1e3 * step, tokens_per_s=args.batch / step,
                tokens_per_s_per_gpu=args.batch / step / len(jax.devices()), memory=memory())  # fmt: skip
        if args.breakdown:
            from dsv4_jax import profile

            rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            cache = jax.device_put(dsv4_jax.init_cache(cfg, 1, len(ids) + 64), rep)
            logits, _, cache = dsv4_jax.prefill(state, cache, tokens, opts=opts)
            nxt = jnp.argmax(logits, -1).astype(jnp.int32)
            br = profile.decode_breakdown(state, cache, nxt, opts=opts, steps=8)
            br.pop("cache")
            say(phase="breakdown", **br)
    say(phase="end", memory=memory())


if __name__ == "__main__":
    main()
