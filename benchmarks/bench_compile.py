"""Compile time of the programs `generate` compiles, lowered from abstract shapes (the weights need not exist):

  * `generate`: the one program (prefill + `lax.while_loop` of decode steps);
  * `GenerationStream` (the CLI): its start (prefill + token 0) and step programs.

Each measurement runs in a fresh process: "cold" with empty caches, then "warm" with the caches the cold run filled,
as the CLI has them: JAX's persistent compilation cache and the executable cache (`dsv4_jax.exec_cache`, a warm hit
neither traces nor lowers); `--no-exec-cache` measures JAX's cache alone (every process traces and lowers; the
lowering and compiling times are then reported apart). `--layers-scaling 6,12` instead compiles `forward` of
Flash-shaped models of 6 and 12 layers (same layer kinds), the ratio that shows whether compile time grows with depth.

    python benchmarks/bench_compile.py --preset flash --prompt 128 --out compile.json
    JAX_PLATFORMS=cpu python benchmarks/bench_compile.py --preset tiny --prompt 64 --backend reference
    JAX_PLATFORMS=cpu python benchmarks/bench_compile.py --layers-scaling 6,12 --width 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _state(cfg, fp32_scales: bool):
    """An abstract ModelState (ShapeDtypeStruct parameters); FP8 block scales as f32 when `fp32_scales` (what
    `prepare_params` gives the kernels)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import dsv4_jax

    ab = dsv4_jax.abstract(cfg)
    if not fp32_scales:
        return ab
    flat = dict(nnx.to_flat_state(ab.params))
    out = []
    for path, var in flat.items():
        w = flat.get(path[:-1] + ("weight",))
        if path[-1] == "scale" and w is not None and w.dtype == jnp.float8_e4m3fn:
            var = var.replace(jax.ShapeDtypeStruct(var.shape, jnp.float32))
        out.append((path, var))
    return dsv4_jax.ModelState(ab.graphdef, nnx.from_flat_state(out), cfg)


def one(mode: str, preset: str, prompt: int, new: int, backend: str, layers: int, width: int, exec_on: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import dsv4_jax
    from dsv4_jax import exec_cache as ec
    from dsv4_jax import generation as G
    from dsv4_jax import runner

    cfg = getattr(dsv4_jax.Config, preset)()
    if layers:
        ratios = tuple(0 if i < 2 else (4 if i % 2 == 0 else 128) for i in range(layers)) + (0,)
        cfg = cfg.replace(n_layers=layers, compress_ratios=ratios, n_hash_layers=min(3, layers))
    if width:
        cfg = cfg.replace(dim=width, q_lora_rank=width // 4, n_heads=8, o_groups=2, o_lora_rank=width // 8,
                          index_n_heads=8, n_routed_experts=16, moe_inter_dim=width // 2, vocab_size=4096)  # fmt: skip
    opts = dsv4_jax.Opts(backend=backend)
    state = _state(cfg, fp32_scales=backend != "reference")
    out = {"mode": mode, "preset": preset, "layers": cfg.n_layers, "backend": backend,
           "device": jax.devices()[0].device_kind}  # fmt: skip
    tokens = jnp.zeros((1, prompt), jnp.int32)
    if mode == "forward":
        t = time.perf_counter()
        low = runner._forward_jit.lower(state, tokens, None, opts, False)
        t1 = time.perf_counter()
        low.compile()
        out.update(lower_s=t1 - t, compile_s=time.perf_counter() - t1)
        return out
    sampler = G.Sampler(max_new_tokens=new)
    lengths = jnp.full((1,), prompt, jnp.int32)
    key = jax.random.key(0)
    max_len = prompt + new
    args = (state, tokens, lengths, key, sampler.knobs())
    static = {"sampler": sampler.static(), "max_len": max_len, "opts": opts}
    if exec_on:
        ec.enable(os.path.join(os.environ["DSV4_JAX_BENCH_CACHE"], "executables"))
    t = time.perf_counter()
    if exec_on:  # what `generate` does with the cache on
        ec.compiled("generate", G._generate, args, static)
    else:
        low = G._generate.lower(*args, **static)
        out["generate_lower_s"] = time.perf_counter() - t
        low.compile()
    t2 = time.perf_counter()
    out["generate_s"] = t2 - t
    G.GenerationStream(state, np.zeros((1, prompt), np.int32), sampler=sampler, key=key, max_len=max_len,
                       opts=opts).compile()  # fmt: skip
    out["stream_s"] = time.perf_counter() - t2
    out["total_s"] = time.perf_counter() - t
    out["exec_cache"] = dict(ec.COUNTS) if exec_on else None
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--layers-scaling", default=None, help="e.g. 6,12: forward compile of Flash-shaped models")
    ap.add_argument("--width", type=int, default=0, help="reduced model width (CPU layer-scaling runs)")
    ap.add_argument("--no-exec-cache", action="store_true", help="JAX's persistent compilation cache alone")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, layers = args.child.split(":")
        use = not args.no_exec_cache
        print(json.dumps(one(mode, args.preset, args.prompt, args.new, args.backend, int(layers), args.width, use)))
        return
    results = []
    runs = ([("forward", int(n)) for n in args.layers_scaling.split(",")] if args.layers_scaling
            else [("generate", 0)])  # fmt: skip
    for mode, layers in runs:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, DSV4_JAX_BENCH_CACHE=cache)
            for phase in ("cold", "warm"):
                cmd = [sys.executable, __file__, "--child", f"{mode}:{layers}", "--preset", args.preset,
                       "--prompt", str(args.prompt), "--new", str(args.new), "--backend", args.backend,
                       "--width", str(args.width)] + ["--no-exec-cache"] * args.no_exec_cache  # fmt: skip
                t = time.perf_counter()
                r = subprocess.run(cmd, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t
                if r.returncode:
                    print(r.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"{phase} run failed")
                res = json.loads(r.stdout.strip().splitlines()[-1])
                res.update(phase=phase, process_wall_s=wall)
                results.append(res)
                print(json.dumps(res), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__" and os.environ.get("DSV4_JAX_BENCH_CACHE"):
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["DSV4_JAX_BENCH_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    main()
elif __name__ == "__main__":
    main()
