#!/usr/bin/env python
"""A full-size model on a mesh, end to end: the memory plan, random weights initialised straight into their shardings
(`init_random(..., mesh=, values="bytes")`: no host copy, no checkpoint needed), generation from a prompt, and each
device's memory against the plan.

    # V4-Flash on 2 x H200, experts split in two (issue #15)
    python scripts/run_full_size.py --preset flash --mesh expert=2 --rules ep
    # V4-Pro on 8 x H200 (issue #17): attention split over the same 8 devices as the experts. The extension must
    # hold Pro's GEMM shapes (its default presets, flash,pro,tiny; a flash,tiny build runs five Pro linears on the
    # reference: BENCHMARKS.md, 2026-12-01)
    python scripts/run_full_size.py --preset pro --mesh expert=8 --rules ep-tp --tpot 16,48 --throughput-batch 64 \
        --throughput-prompt 32 --json pro.json
    # a dry run at reduced depth (the same layer pattern, first N layers + MTP); tried on 2 x H200 with
    # --mesh expert=2 --layers 4: 8.1 ms TPOT, 37 GiB per GPU
    python scripts/run_full_size.py --preset pro --mesh expert=8 --rules ep-tp --layers 4
    # several hosts: one process per host, DSV4_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID set on each
    # batch-1 time per token from two generation lengths, batch throughput, and where a decode step's time goes
    python scripts/run_full_size.py --preset flash --mesh expert=2 --tpot 16,48 --throughput-batch 64 --breakdown
    # CI: 8 simulated CPU devices
    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python scripts/run_full_size.py --preset tiny --mesh expert=8 --values normal

JAX's GPU memory pool is 75 % of the device by default; the script sets `XLA_CLIENT_MEM_FRACTION` (the newer name of
`XLA_PYTHON_CLIENT_MEM_FRACTION`; jaxlib 0.11 refuses both together) to `--mem-fraction` (0.95) before JAX starts,
unless one of them is already set.
Exit status: 0 done, 2 bad flags, 3 the plan does not fit (`--ignore-plan` runs anyway).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=("tiny", "flash", "pro"), default="flash")
    p.add_argument("--mesh", default="expert=2", help="devices per mesh axis, e.g. expert=8 or expert=4,tensor=2")
    p.add_argument("--rules", default="ep", help="sharding rules preset: ep, ep-tp, default, replicated")
    p.add_argument("--layers", type=int, help="keep only the first N main layers (and the MTP layer): a dry run")
    p.add_argument("--values", choices=("bytes", "normal"), default="bytes", help="random bytes in the storage "
                   "formats (fast, any size) or quantized normal draws (a well-behaved model)")  # fmt: skip
    p.add_argument("--prompt", default="DeepSeek-V4 in JAX on a mesh: ")
    p.add_argument(
        "--prompt-tokens", type=int, default=0, help="repeat the prompt to this many tokens (TPOT at a longer context)"
    )
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=None, help="prefill in chunks of N tokens (Opts.prefill_chunk)")
    p.add_argument("--kv-cache", default="auto", choices=("auto", "fp8", "bf16"), help="cache layout (Opts.kv_cache)")
    p.add_argument("--batch", type=int, default=1, help="copies of the prompt generated at once")
    p.add_argument("--context", type=int, help="tokens the plan assumes per sequence (default: prompt + new tokens)")
    p.add_argument("--mem-fraction", type=float, default=0.95)
    p.add_argument("--ignore-plan", action="store_true", help="run even if the memory plan says it does not fit")
    p.add_argument("--tpot", help="N1,N2: batch-1 time per token = (t(N2) - t(N1)) / (N2 - N1) of whole `generate` "
                   "calls (compiled first)")  # fmt: skip
    p.add_argument("--throughput-batch", type=int, default=0, help="also time `generate` at this batch (random "
                   "prompts)")  # fmt: skip
    p.add_argument("--throughput-prompt", type=int, default=256, help="prompt length of the throughput batch")
    p.add_argument(
        "--long-context",
        type=int,
        default=0,
        help="also time batch-1 decode steps at this position of a "
        "synthetically filled cache (dsv4_jax.cache.fill_synthetic), e.g. 1000000",
    )
    p.add_argument("--breakdown", action="store_true", help="profile decode steps (dsv4_jax.profile.decode_breakdown)")
    p.add_argument("--json", help="write the results to this file")
    return p.parse_args(argv)


def timed_generate(state, tokens, n: int, opts, repeats: int = 2) -> float:
    """Best wall time of `generate` of `n` new tokens (after a compiling call)."""
    import dsv4_jax

    sampler = dsv4_jax.Sampler(max_new_tokens=n, eos_id=None)
    dsv4_jax.generate(state, tokens, sampler=sampler, opts=opts).tokens.block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dsv4_jax.generate(state, tokens, sampler=sampler, opts=opts).tokens.block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best


def measure(args, state, cfg, prompt, mesh, opts, say) -> dict:
    """The optional measurements: TPOT, batch throughput, the decode-step breakdown."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import dsv4_jax

    out: dict = {}
    tokens = np.asarray([prompt], np.int32)
    if args.tpot:
        n1, n2 = (int(x) for x in args.tpot.split(","))
        t1, t2 = timed_generate(state, tokens, n1, opts), timed_generate(state, tokens, n2, opts)
        out["tpot_ms"] = 1e3 * (t2 - t1) / (n2 - n1)
        say(f"batch 1: generate {n1} tokens {t1:.3f} s, {n2} tokens {t2:.3f} s: TPOT {out['tpot_ms']:.2f} ms")
    if args.throughput_batch:
        n1, n2 = (int(x) for x in (args.tpot or "16,48").split(","))
        b = args.throughput_batch
        bt = np.random.default_rng(0).integers(2, cfg.vocab_size, (b, args.throughput_prompt)).astype(np.int32)
        t1, t2 = timed_generate(state, bt, n1, opts, repeats=1), timed_generate(state, bt, n2, opts, repeats=1)
        step = (t2 - t1) / (n2 - n1)
        per_device = b / step / jax.device_count()
        out["throughput"] = {"batch": b, "step_ms": 1e3 * step, "tokens_per_s_per_device": per_device}
        say(f"batch {b}: {1e3 * step:.2f} ms per step, {b / step / jax.device_count():.1f} tokens/s per device")
    if args.long_context:
        n = args.long_context
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        cache = jax.device_put(dsv4_jax.init_cache(cfg, 1, n + 16, opts.cache_layout), rep)
        cache = dsv4_jax.cache.fill_synthetic(cache, n)
        step_opts = dataclasses.replace(opts, prefill_chunk=None)
        tok, times = jnp.asarray([7], jnp.int32), []
        for _ in range(11):
            t = time.perf_counter()
            logits, _, cache = dsv4_jax.decode_step(state, cache, tok, opts=step_opts)
            logits.block_until_ready()
            times.append(time.perf_counter() - t)
        out["long_context"] = {"context": n, "step_ms": 1e3 * float(np.median(times[3:])),
                               "cache_bytes": int(sum(x.nbytes for x in jax.tree.leaves(cache)))}  # fmt: skip
        del cache
        say(
            f"batch 1 at position {n}: decode step {out['long_context']['step_ms']:.2f} ms (cache "
            f"{out['long_context']['cache_bytes'] / 2**30:.2f} GiB)"
        )
    if args.breakdown:
        from dsv4_jax import profile

        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        step_opts = dataclasses.replace(opts, prefill_chunk=None)  # the prompt in one prefill, then decode steps
        cache = jax.device_put(dsv4_jax.init_cache(cfg, 1, len(prompt) + 64, opts.cache_layout), rep)
        logits, _, cache = dsv4_jax.prefill(state, cache, tokens, opts=step_opts)
        br = profile.decode_breakdown(state, cache, jnp.argmax(logits, -1).astype(jnp.int32), opts=step_opts)
        br.pop("cache")
        out["breakdown"] = br
        say(f"decode step: {br['step_ms']:.2f} ms, kernels {br['kernel_ms']:.2f} ms, rest {br['overhead_ms']:.2f} ms, "
            f"{br['kernels_per_step']:.0f} kernels; by part (ms): "
            + ", ".join(f"{k} {v:.2f}" for k, v in br["by_part"].items()))  # fmt: skip
    return out


def truncated(cfg, n_layers: int | None):
    """`cfg` with only its first `n_layers` main layers (same kinds in the same order) and its MTP layers."""
    if n_layers is None or n_layers == cfg.n_layers:
        return cfg
    if not 1 <= n_layers <= cfg.n_layers:
        raise ValueError(f"--layers {n_layers} must be in 1..{cfg.n_layers}")
    ratios = cfg.compress_ratios[:n_layers] + cfg.compress_ratios[cfg.n_layers :]
    return cfg.replace(n_layers=n_layers, compress_ratios=ratios, n_hash_layers=min(cfg.n_hash_layers, n_layers))


def device_memory() -> list[dict]:
    """Per local device: `bytes_in_use` / `peak_bytes_in_use` / `bytes_limit` where the backend reports them."""
    import jax

    out = []
    for d in jax.local_devices():
        stats = d.memory_stats() or {}
        out.append({"device": d.id, **{k: stats[k] for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
                                       if k in stats}})  # fmt: skip
    return out


def param_bytes_per_device(state) -> dict[int, int]:
    import jax

    out: dict[int, int] = {}
    for leaf in jax.tree.leaves(state.params):
        for s in leaf.addressable_shards:
            out[s.device.id] = out.get(s.device.id, 0) + s.data.nbytes
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    # jaxlib 0.11 refuses the two names together (the older one is deprecated): set the new one unless either is set.
    if not {"XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION"} & os.environ.keys():
        os.environ["XLA_CLIENT_MEM_FRACTION"] = str(args.mem_fraction)

    from dsv4_jax.parallel import distributed

    distributed.initialize()  # several hosts: from the DSV4_JAX_* variables; one host: nothing to do
    import jax
    import numpy as np

    import dsv4_jax
    from dsv4_jax.parallel import describe_mesh, make_mesh, memory_plan, parse_mesh
    from dsv4_jax.parallel.plan import GiB
    from dsv4_jax.prepare import slabs_by_default
    from dsv4_jax.sharding import rules_preset
    from dsv4_jax.tokenizer import ByteTokenizer

    main_proc = jax.process_index() == 0
    say = print if main_proc else (lambda *a, **k: None)
    try:
        cfg = truncated(getattr(dsv4_jax.Config, args.preset)(), args.layers)
        mesh = make_mesh(**parse_mesh(args.mesh))
        rules = rules_preset(args.rules)
        tok = ByteTokenizer(cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id)
        prompt = tok.encode(args.prompt)
        if args.prompt_tokens:  # a long context for TPOT: the text repeated to this many tokens
            prompt = (prompt * (args.prompt_tokens // max(len(prompt), 1) + 1))[: args.prompt_tokens]
        context = args.context or len(prompt) + args.max_new_tokens
        opts = dsv4_jax.Opts(prefill_chunk=args.prefill_chunk, kv_cache=args.kv_cache)
        plan = memory_plan(
            cfg,
            dict(mesh.shape),
            rules,
            args.batch,
            context,
            mem_fraction=args.mem_fraction,
            prefill_chunk=args.prefill_chunk,
            kv_dtype=opts.cache_layout,
            prepared_scales=True,
        )
    except ValueError as e:
        print(f"run_full_size: error: {e}", file=sys.stderr)
        return 2
    say(f"model: {args.preset}, {cfg.n_layers} layers (+{cfg.n_mtp_layers} MTP), {cfg.n_routed_experts} experts")
    say(describe_mesh(mesh))
    say(plan.summary())
    if not plan.fits and not args.ignore_plan:
        say("the plan does not fit: stopping (--ignore-plan runs anyway)")
        return 3

    t0 = time.perf_counter()
    state = dsv4_jax.init_random(cfg, 0, mesh=mesh, rules=rules, values=args.values)
    jax.block_until_ready(state.params)
    init_s = time.perf_counter() - t0
    say(f"init_random ({args.values}) straight into the shardings: {init_s:.1f} s")
    t0 = time.perf_counter()
    slabs = slabs_by_default()
    state = dsv4_jax.prepare_params(state, donate=True)  # the kernels' formats, in place of the arrays drawn
    jax.block_until_ready(state.params)
    say(
        f"prepare_params: {time.perf_counter() - t0:.1f} s (FP8 scales as f32; MXFP4 experts "
        f"{'in slabs' if slabs else 'as stored'})"
    )
    placed = param_bytes_per_device(state)
    for d in device_memory():
        have = placed.get(d["device"], 0)
        used = f", in use {d['bytes_in_use'] / GiB:.2f} GiB" if "bytes_in_use" in d else ""
        say(f"  device {d['device']}: parameters {have / GiB:.3f} GiB (plan {plan.weights / GiB:.3f}){used}")
    mismatch = {i: b for i, b in placed.items() if b != plan.weights}

    tokens = np.asarray([prompt] * args.batch, np.int32)
    sampler = dsv4_jax.Sampler(max_new_tokens=args.max_new_tokens, eos_id=None)
    # The mesh in context: the routed experts run expert-parallel (dsv4_jax.parallel.expert_parallel).
    with jax.set_mesh(mesh), dsv4_jax.ops.record() as ran:
        stream = dsv4_jax.generate_stream(
            state,
            tokens,
            sampler=sampler,
            key=0,
            max_len=context,
            opts=opts,
        )
        compile_s = stream.compile()
        for _ in stream:
            pass
    out = stream.output
    new = np.asarray(out.tokens[0, : int(out.num_tokens[0])]).tolist()
    steps = max(stream.decode_steps, 1)
    say(f"generate: compile {compile_s:.1f} s, prefill of {len(prompt)} tokens {stream.prefill_s * 1e3:.1f} ms, "
        f"{stream.decode_steps} decode steps {stream.decode_s / steps * 1e3:.2f} ms each")  # fmt: skip
    say(f"generated ids: {new} (random weights: the text is noise); ops: {ran}")
    with jax.set_mesh(mesh):
        measured = measure(args, state, cfg, prompt, mesh, opts, say)
    memory = device_memory()
    for d in memory:
        if "peak_bytes_in_use" in d:
            say(f"  device {d['device']}: peak {d['peak_bytes_in_use'] / GiB:.2f} GiB of {plan.budget / GiB:.2f} "
                f"planned budget ({plan.total / GiB:.2f} planned total)")  # fmt: skip
    if args.json and main_proc:
        result = {"plan": plan.as_dict(), "init_s": init_s, "compile_s": compile_s, "prefill_s": stream.prefill_s,
                  "decode_s_per_step": stream.decode_s / steps, "generated": new, "param_bytes": placed,
                  "memory": memory, "ops": ran, **measured}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    if mismatch:
        say(f"parameters per device differ from the plan: {mismatch}")
        return 1
    say("RUN OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
