"""End to end through the product path: N full-width V4-Flash layers (+ the MTP layer), random weights in the storage
formats, per expert format and backend:

  * prefill of a batch of prompts (the first call, which compiles, and a steady call);
  * steady-state `decode_step`: the median of a loop of steps after warm-up, each waited for;
  * `generate`'s per-token time: two generations of different lengths, (t2 - t1) / (n2 - n1);
  * optionally a long prefill (`--long-prefill 2048`);
  * optionally the decode step at long contexts (`--context 4096,131072`): caches filled synthetically to that
    position (`dsv4_jax.cache.fill_synthetic`: valid packed rows of random values, no prefill of that length).

The roofline of a decode step is the weight-read floor: the bytes of the parameters a step must read (everything but
the routed experts no token picks, the embedding table (a row per token) and the MTP layer, which `decode_step` does
not run), computed from the model's own parameter tree, over the copy bandwidth measured in the same process.

    python benchmarks/bench_e2e.py --layers 2 --experts fp4,fp8 --backends auto,reference --batch 1,32 \\
        --out e2e.json --markdown e2e.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dsv4_jax
from dsv4_jax import generation as G
from dsv4_jax import ops, profile


def flash_layers(n_layers: int, expert_dtype: str) -> dsv4_jax.Config:
    """n full-width Flash layers alternating CSA and HCA (CSA first), no hash layers, plus the MTP layer."""
    ratios = tuple(4 if i % 2 == 0 else 128 for i in range(n_layers)) + (0,)
    return dsv4_jax.Config.flash(n_layers=n_layers, compress_ratios=ratios, n_hash_layers=0, expert_dtype=expert_dtype)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes moved per second (read + write) by XLA's device copy of a 2 GiB buffer: the best of 5."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    f(x).block_until_ready()
    best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(5))
    return 2 * nbytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def floor_bytes(state: dsv4_jax.ModelState, batch: int) -> dict[str, float]:
    """Bytes a decode step of `batch` tokens must read, by part: the expected share of the routed experts that the
    tokens pick (1 - (1 - k/E)^batch of each layer's experts), all other main-layer parameters, the head, and one
    embedding row per token."""
    cfg = state.config
    hit = 1.0 - (1.0 - cfg.n_activated_experts / cfg.n_routed_experts) ** batch
    parts = {"experts": 0.0, "layers": 0.0, "head": 0.0, "embed": 0.0}
    for path, var in nnx.to_flat_state(state.params):
        nbytes = int(np.prod(var.shape)) * np.dtype(var.dtype).itemsize
        if path[0] == "mtp":
            continue
        if path[0] == "embed":
            parts["embed"] += batch * nbytes / var.shape[0]
        elif "experts" in path:
            parts["experts"] += hit * nbytes
        elif path[0] == "groups":
            parts["layers"] += nbytes
        else:
            parts["head"] += nbytes
    return parts


def run_case(
    cfg,
    backend: str,
    batch: int,
    prompt: int,
    steps: int,
    gen: tuple[int, int] | None,
    long_prefill: int,
    breakdown: str | None = None,
    breakdown_top: int = 120,
    kv_cache: str = "auto",
    contexts: tuple[int, ...] = (),
    expert_layout: str = "auto",
):
    opts = dsv4_jax.Opts(backend=backend, kv_cache=kv_cache)
    t0 = time.perf_counter()
    state = dsv4_jax.prepare_params(dsv4_jax.init_random(cfg, 0, values="bytes"), expert_layout=expert_layout,
                                    donate=True)  # fmt: skip
    jax.block_until_ready(state.params)
    init_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, cfg.vocab_size, (batch, prompt)).astype(np.int32)
    max_len = prompt + max(steps + 8, (gen[1] if gen else 0) + 8)
    out: dict = {"backend": backend, "batch": batch, "prompt": prompt, "init_s": init_s}

    with ops.record() as ran:
        cache = dsv4_jax.init_cache(cfg, batch, max_len, opts.cache_layout)
        t = time.perf_counter()
        logits, _, cache = dsv4_jax.prefill(state, cache, tokens, opts=opts)
        logits.block_until_ready()
        out["prefill_first_s"] = time.perf_counter() - t
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        t = time.perf_counter()
        logits, _, cache = dsv4_jax.decode_step(state, cache, tok, opts=opts)
        logits.block_until_ready()
        out["decode_first_s"] = time.perf_counter() - t
    out["ran"] = ran
    cache2 = dsv4_jax.init_cache(cfg, batch, max_len, opts.cache_layout)
    out["prefill_s"] = _timed(lambda: dsv4_jax.prefill(state, cache2, tokens, opts=opts)[0].block_until_ready())
    times = []
    for _ in range(steps + 3):
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        t = time.perf_counter()
        logits, _, cache = dsv4_jax.decode_step(state, cache, tok, opts=opts)
        logits.block_until_ready()
        times.append(time.perf_counter() - t)
    out["decode_step_ms"] = 1e3 * statistics.median(times[3:])
    out["decode_step_min_ms"] = 1e3 * min(times[3:])
    if breakdown:  # a path prefix for the compiled program's text
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        br = profile.decode_breakdown(
            state, cache, tok, opts=opts, steps=10, top=breakdown_top, hlo_path=f"{breakdown}.hlo.txt"
        )
        cache = br.pop("cache")
        out["breakdown"] = br

    per = {}
    for n in gen or ():
        sampler = G.Sampler(max_new_tokens=n, eos_id=None)
        G.generate(state, tokens, sampler=sampler, opts=opts).tokens.block_until_ready()  # compile
        run = lambda s=sampler: G.generate(state, tokens, sampler=s, opts=opts).tokens.block_until_ready()  # noqa: E731
        per[n] = min(_timed(run) for _ in range(2))
    if gen:
        out["generate_s"] = {str(k): v for k, v in per.items()}
        out["generate_token_ms"] = 1e3 * (per[gen[1]] - per[gen[0]]) / (gen[1] - gen[0])

    if contexts:
        out["context_step_ms"] = {str(n): context_step_ms(state, batch, n, steps, opts) for n in contexts}

    if long_prefill:
        long = rng.integers(2, cfg.vocab_size, (1, long_prefill)).astype(np.int32)
        c = dsv4_jax.init_cache(cfg, 1, long_prefill + 8, opts.cache_layout)
        t = time.perf_counter()
        dsv4_jax.prefill(state, c, long, opts=opts)[0].block_until_ready()
        out["long_prefill_first_s"] = time.perf_counter() - t
        c = dsv4_jax.init_cache(cfg, 1, long_prefill + 8, opts.cache_layout)
        out["long_prefill_s"] = _timed(lambda: dsv4_jax.prefill(state, c, long, opts=opts)[0].block_until_ready())
        out["long_prefill_tokens"] = long_prefill
        if breakdown:
            br = profile.prefill_breakdown(
                state, lambda: dsv4_jax.init_cache(cfg, 1, long_prefill + 8, opts.cache_layout), long, opts=opts,
                steps=1, hlo_path=f"{breakdown}-prefill.hlo.txt",
            )  # fmt: skip
            out["long_prefill_breakdown"] = br
            parts = ", ".join(f"{k} {v:.1f}" for k, v in br["by_part"].items())
            print(f"long prefill {long_prefill} tokens: {br['step_ms']:.1f} ms, kernels {br['kernel_ms']:.1f} ms; "
                  f"by part (ms) {parts}", flush=True)  # fmt: skip
    floor = floor_bytes(state, batch)
    out["floor_bytes"] = floor
    return out


def context_step_ms(state, batch: int, context: int, steps: int, opts) -> float:
    """Median decode step (ms) of `batch` rows at position `context` of a synthetically filled cache."""
    cfg = state.config
    cache = dsv4_jax.cache.fill_synthetic(dsv4_jax.init_cache(cfg, batch, context + steps + 8, opts.cache_layout),
                                          context)  # fmt: skip
    tok = jnp.full((batch,), 7, jnp.int32)
    times = []
    for _ in range(steps + 3):
        t = time.perf_counter()
        logits, _, cache = dsv4_jax.decode_step(state, cache, tok, opts=opts)
        logits.block_until_ready()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[3:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", default="fp4,fp8")
    ap.add_argument("--backends", default="auto,reference")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--gen", default="8,24", help="two generate lengths for the per-token time")
    ap.add_argument("--gen-backends", default="auto,reference", help="backends whose generate is timed")
    ap.add_argument(
        "--gen-batches", default="1", help="batch sizes whose generate is timed (a step decodes one token per row)"
    )
    ap.add_argument("--batch-backends", default="auto,reference", help="backends run at batch sizes > 1")
    ap.add_argument("--cases", default=None, help="only these experts:backend pairs, e.g. fp4:auto,fp8:auto")
    ap.add_argument("--long-prefill", type=int, default=0, help="also time a prefill of this many tokens (batch 1)")
    ap.add_argument("--long-prefill-backends", default="reference,auto")
    ap.add_argument(
        "--breakdown",
        default=None,
        help="profile the decode step of each case; the compiled programs are written as PREFIX-<case>.hlo.txt",
    )
    ap.add_argument("--breakdown-top", type=int, default=120, help="kernels listed per breakdown (by time)")
    ap.add_argument("--context", default="", help="decode steps at these positions of a synthetic cache: 4096,131072")
    ap.add_argument("--kv-cache", default="auto", choices=("auto", "fp8", "bf16"), help="cache layout (Opts.kv_cache)")
    ap.add_argument("--expert-layout", default="auto", choices=("auto", "slabs", "stored"),
                    help="the MXFP4 experts' layout (prepare_params(expert_layout=))")  # fmt: skip
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    gen = tuple(int(x) for x in args.gen.split(","))
    ctx = tuple(int(x) for x in args.context.split(",") if x)
    dev = jax.devices()[0]
    meta = {
        "device": getattr(dev, "device_kind", str(dev)),
        "jax": jax.__version__,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        or "unknown",
        "layers": args.layers,
        "kv_cache": args.kv_cache,
        "expert_layout": args.expert_layout,
    }
    bw = copy_bandwidth()
    meta["copy_bandwidth_GBps"] = bw / 1e9
    print(json.dumps(meta), flush=True)
    rows = []
    for fmt in args.experts.split(","):
        cfg = flash_layers(args.layers, fmt)
        for backend in args.backends.split(","):
            if args.cases and f"{fmt}:{backend}" not in args.cases.split(","):
                continue
            for b in (int(x) for x in args.batch.split(",")):
                if b > 1 and backend not in args.batch_backends.split(","):
                    continue
                lp = args.long_prefill if (b == 1 and backend in args.long_prefill_backends.split(",")) else 0
                timed = b in (int(x) for x in args.gen_batches.split(",")) and backend in args.gen_backends.split(",")
                g = gen if timed else None
                bd = f"{args.breakdown}-{fmt}-{backend}-b{b}" if args.breakdown else None
                r = run_case(cfg, backend, b, args.prompt, args.steps, g, lp, bd, args.breakdown_top, args.kv_cache,
                             ctx, args.expert_layout)  # fmt: skip
                r["experts"] = fmt
                total = sum(r["floor_bytes"].values())
                r["floor_ms"] = 1e3 * total / bw
                r["ratio"] = r["decode_step_ms"] / r["floor_ms"]
                rows.append(r)
                print(json.dumps(r), flush=True)
    result = {"meta": meta, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(result))
    print(markdown(result))


def markdown(result) -> str:
    m = result["meta"]
    lines = [
        f"{m['device']}, jax {m['jax']}, commit {m['commit']}, {m['layers']} full-width Flash layers + MTP, copy "
        f"{m['copy_bandwidth_GBps']:.0f} GB/s",
        "",
        "| experts | backend | batch | decode step ms (median) | floor ms | ratio | generate ms/step | prefill "
        "(first / steady) s | long prefill s | decode step ms at context | kernels ran |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lp = f"{r['long_prefill_s']:.3f} ({r['long_prefill_tokens']} tok)" if "long_prefill_s" in r else ""
        kern = ", ".join(f"{k}:{v}" for k, v in sorted(r["ran"].items()))
        ctx = ", ".join(f"{n}: {ms:.2f}" for n, ms in r.get("context_step_ms", {}).items())
        lines.append(
            f"| {r['experts']} | {r['backend']} | {r['batch']} | {r['decode_step_ms']:.2f} | {r['floor_ms']:.3f} | "
            f"{r['ratio']:.1f}x | {r.get('generate_token_ms', float('nan')):.2f} | {r['prefill_first_s']:.1f} / "
            f"{r['prefill_s']:.3f} | "
            f"{lp} | {ctx} | {kern} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
