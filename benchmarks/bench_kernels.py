"""Benchmarks of the dsv4_jax_ffi kernels at DeepSeek-V4-Flash shapes, against ceilings measured in the same run.

    python benchmarks/bench_kernels.py [--out results.json] [--markdown table.md]
        [--decode | --prefill | --sparse-attention | --topk
         | --fp4-decode [--fp4-variants wg,wg8,wgb,ring] [--fp4-cvt lut|bits] [--fp4-ksplit auto]
         | --gemv-quant [--gemv-quant-m 1]]

Ceilings (measured here, same process): device copy bandwidth (bytes read + written of a 2 GiB bf16 elementwise
pass) and the dense FP8 GEMM rate of XLA's own FP8 dot (e4m3 x e4m3 -> bf16, 8192^3; cuBLASLt). Baselines: XLA's
dot on dequantized bf16 weights (dense) and `jax.lax.ragged_dot` on dequantized bf16 (grouped), same run.

Timing: each measurement jits R independent calls on rotating inputs (weights rotated where they fit in L2) into one
executable, runs it after a warm-up, dispatches 8 executions back to back and divides the wall time by 8 R (median of
3 such batches; includes the per-launch gaps of XLA's executor, not the host-side dispatch of the executable, which
overlaps). FFI call overhead = a 16-element FFI call repeated 200 times in one executable.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax import kv_format, ops, quant
from dsv4_jax.kernels import ffi_ops, moe_fp8
from dsv4_jax.moe import dispatch

BF16, F32, E4M3 = jnp.bfloat16, jnp.float32, jnp.float8_e4m3fn
# Flash dense FP8 linears (N, K) and the routed-expert projections (N, K: w1/w3, then w2)
DENSE_SHAPES = ((4096, 4096), (32768, 1024), (1024, 4096), (4096, 8192))
EXPERT_SHAPES = ((2048, 4096), (4096, 2048))
# Every dense FP8 linear of a Flash decode step (N, K)
DECODE_LINEARS = ((1024, 4096), (32768, 1024), (512, 4096), (4096, 8192), (2048, 4096), (4096, 2048), (8192, 1024))


def timed(fn, *args, reps: int = 8, per: int = 1) -> float:
    """Seconds per call of a jitted function returning a pytree, divided by `per`: `reps` executions dispatched back
    to back and waited for once (median of 3 such batches). Pipelining matters for the many-argument executables of
    small problems: the host-side dispatch of one (0.1-0.5 ms for a few hundred arguments) overlaps the device work
    of the previous, so the device time is what is measured, as in a decode loop that runs ahead of the GPU."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(reps)])
        ts.append((time.perf_counter() - t0) / reps)
    return float(np.median(ts)) / per


def many(f, r):
    """R calls of f in one executable; arguments are lists of R arrays (list indexing is free, whereas slicing a
    stacked array would add a copy kernel per call in front of every custom call)."""
    return jax.jit(lambda *lists: [f(*[xs[i] for xs in lists]) for i in range(r)])


def fp8_weight(key, shape):
    return quant.quantize_fp8_weight(jax.random.normal(key, shape, F32) * shape[-1] ** -0.5)


def ceilings():
    """(copy B/s, XLA FP8 dot FLOP/s, XLA bf16 dot FLOP/s), each the best of the ways tried, measured now."""
    x = jnp.ones((1 << 30,), BF16)  # 2 GiB
    # Two copies: XLA's elementwise kernel and its device-to-device memcpy (a plain `copy`); the faster one counts.
    t_mul = timed(jax.jit(lambda x: x * 2), x)
    t_cpy = timed(jax.jit(jnp.copy), x)
    print(f"copy ceiling: x*2 {2 * x.nbytes / t_mul / 1e12:.2f} TB/s, memcpy {2 * x.nbytes / t_cpy / 1e12:.2f} TB/s")
    bw = 2 * x.nbytes / min(t_mul, t_cpy)
    del x
    n, r = 8192, 4  # R independent dots in one executable, so that one dispatch does not count
    keys = jax.random.split(jax.random.key(0), 2 * r)
    a = [jax.random.normal(keys[i], (n, n), F32).astype(E4M3) for i in range(r)]
    b = [jax.random.normal(keys[r + i], (n, n), F32).astype(E4M3) for i in range(r)]
    dot = many(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=BF16), r)
    try:
        t = timed(dot, a, b, per=r)
        fp8 = 2 * n**3 / t
    except Exception as e:  # noqa: BLE001
        print(f"XLA FP8 dot failed ({e}); no FP8 ceiling")
        fp8 = float("nan")
    ab, bb = [v.astype(BF16) for v in a], [v.astype(BF16) for v in b]
    t = timed(many(lambda a, b: a @ b.T, r), ab, bb, per=r)
    return bw, fp8, 2 * n**3 / t


def result_row(op: str, shape: str, t: float, t_xla: float, flops: float, nbytes: float, bw: float, fp8: float):
    """One table row: time t (s) against the XLA baseline and the ceilings measured in this run."""
    return dict(
        op=op,
        shape=shape,
        us=t * 1e6,
        xla_bf16_us=t_xla * 1e6,
        tflops=flops / t / 1e12,
        pct_fp8=100 * flops / t / fp8,
        pct_bw=100 * nbytes / t / bw,
    )


def bench_dense(rows, m, n, k, bw, fp8, label=""):
    # Rotate weights through more than L2; small M runs 64 calls per executable so that the per-executable dispatch
    # (~0.1 ms of host time) does not count.
    r = 64 if m <= 64 else (8 if n * k < (64 << 20) else 2)
    key = jax.random.key(m + n + k)
    ws = [fp8_weight(jax.random.fold_in(key, i), (n, k)) for i in range(r)]
    w = [a for a, _ in ws]
    s = [ffi_ops.sm90_weight_scales(b) for _, b in ws]
    x = [jax.random.normal(jax.random.fold_in(key, 100 + i), (m, k), F32).astype(BF16) for i in range(r)]
    t = timed(many(ffi_ops.fp8_linear, r), x, w, s, per=r)
    wd = [quant.dequant_fp8_weight(a, b).astype(BF16) for a, b in ws]
    tx = timed(many(lambda x, w: x @ w.T, r), x, wd, per=r)
    del wd
    flops, byts = 2 * m * n * k, n * k + m * k * 2 + m * n * 2
    op = ("fp8_linear (quant+GEMV)" if m <= ffi_ops.GEMV_MAX_M else "fp8_linear (quant+GEMM)") + label
    rows.append(result_row(op, f"M={m} N={n} K={k}", t, tx, flops, byts, bw, fp8))


def bench_grouped(rows, t_tokens, n, k, bw, fp8, layout, e=256, topk=6, block_m=None, baseline=True, label=""):
    """One expert projection (N x K per expert) of E=256 FP8 experts, top-6 random routing; layout "gemv_pair": the
    gate and up projections (two such weights) in one GEMV launch. Small batches (T <= 256) run R calls with
    different routings in one executable (the launch gaps between them are counted), so the weights of one call are
    not still in L2 from the last."""
    reps = 32 if t_tokens <= 64 else (8 if t_tokens <= 256 else 1)
    key = jax.random.key(t_tokens + n)
    w, s = fp8_weight(jax.random.fold_in(key, 1), (e, n, k))
    s = ffi_ops.sm90_weight_scales(s)
    pair = layout == "gemv_pair"
    if pair:  # the up projection: a second weight of the same shape
        w3, s3 = fp8_weight(jax.random.fold_in(key, 2), (e, n, k))
        w, s = (w, w3), (s, ffi_ops.sm90_weight_scales(s3))
        layout = "gemv"
    if block_m is None and layout != "gemv":
        block_m = moe_fp8.choose_block_m(layout, t_tokens * topk)
    calls, actives, padded = [], [], []
    for r in range(reps):
        kr = jax.random.fold_in(key, 100 + r)
        idx = jnp.argsort(jax.random.uniform(kr, (t_tokens, e)), -1)[:, :topk].astype(jnp.int32)
        x = jax.random.normal(kr, (t_tokens, k), F32).astype(BF16)
        actives.append(int(jnp.sum(jnp.bincount(idx.reshape(-1), length=e) > 0)))
        if layout == "gemv":
            q, sfa = ffi_ops.act_quant_rows(x)
            tok = jnp.arange(t_tokens * topk, dtype=jnp.int32) // topk
            calls.append((q, sfa, tok, idx.reshape(-1)))
            continue
        _, dl = dispatch(jnp.zeros((t_tokens, 1), BF16), idx, jnp.ones(idx.shape, F32), e)
        dest, rows_total, lay = moe_fp8.plan_rows(dl.expert, dl.group_sizes, layout, block_m)
        padded.append(rows_total)
        tok = jnp.zeros((t_tokens * topk,), jnp.int32).at[dl.row_of_pair.reshape(-1)].set(
            jnp.repeat(jnp.arange(t_tokens, dtype=jnp.int32), topk))  # fmt: skip
        src = jnp.full((rows_total,), -1, jnp.int32).at[dest].set(tok, mode="drop")
        groups = e if layout == "masked" else 1
        q, sfa = ffi_ops.act_quant_rows(x, src=src, rows_out=rows_total, groups=groups)
        if layout == "masked":
            q = q.reshape(e, rows_total // e, k)
        calls.append((q, sfa, lay))

    if pair:

        def one(w, s, q, sfa, tok, grp):
            return ffi_ops.fp8_gemv_pair(q, sfa, w[0], s[0], w[1], s[1], rows=tok, groups=grp)
    elif layout == "gemv":

        def one(w, s, q, sfa, tok, grp):
            return ffi_ops.fp8_gemv(q, sfa, w, s, rows=tok, groups=grp)
    elif layout == "masked":

        def one(w, s, q, sfa, lay):
            return ffi_ops.grouped_gemm_masked(q, sfa, w, s, lay, block_m)
    else:

        def one(w, s, q, sfa, lay):
            return ffi_ops.grouped_gemm_contig(q, sfa, w, s, lay, block_m)

    # Weights are arguments, not closed-over constants (2 GB of constants would be baked into the executable).
    f = jax.jit(lambda w, s, calls: [one(w, s, *c) for c in calls])
    tm = timed(f, w, s, calls, per=reps)
    active = float(np.mean(actives))
    a = t_tokens * topk
    flops = 2 * a * n * k * (2 if pair else 1)
    wbytes = active * n * k * (2 if pair else 1)
    # XLA baseline: ragged_dot on dequantized bf16 weights, rows sorted by expert (first routing only).
    tx = float("nan")
    if baseline and not pair:
        idx = calls[0][-1].reshape(t_tokens, topk) if layout == "gemv" else None
        if idx is None:
            kr = jax.random.fold_in(key, 100)
            idx = jnp.argsort(jax.random.uniform(kr, (t_tokens, e)), -1)[:, :topk].astype(jnp.int32)
        tok = jnp.repeat(jnp.arange(t_tokens, dtype=jnp.int32), topk)
        x = jax.random.normal(jax.random.fold_in(key, 100), (t_tokens, k), F32).astype(BF16)
        order = jnp.argsort(idx.reshape(-1), stable=True)
        xs = x[tok[order]]
        sizes = jnp.bincount(idx.reshape(-1), length=e).astype(jnp.int32)
        wd = quant.dequant_fp8_weight(w, quant.f32_to_e8m0(s)).astype(BF16).transpose(0, 2, 1)
        try:
            tx = timed(jax.jit(lambda xs, wd, sz: jax.lax.ragged_dot(xs, wd, sz)), xs, wd, sizes)
        except Exception as ex:  # noqa: BLE001
            print("ragged_dot baseline failed:", ex)
        del wd
    name = "gemv per (token, expert) pair" if layout == "gemv" else f"grouped {layout} BLOCK_M {block_m}"
    name = "gemv gate+up pair, one launch," if pair else name
    shape = f"T={t_tokens} N={n} K={k} active={active:.0f}"
    if layout == "contig":  # rows the tile grid computes (each expert's rows padded to BLOCK_M), vs T * top-k useful
        shape += f" rows={np.mean(padded):.0f}"
    rows.append(result_row(f"{name}{label} (E=256 top-6)", shape, tm, tx, flops, wbytes, bw, fp8))


def bench_overhead(rows):
    s = jnp.full((200, 16), 127, jnp.uint8)
    f = jax.jit(
        lambda s: [jax.ffi.ffi_call("dsv4_e8m0_to_f32", jax.ShapeDtypeStruct((16,), F32))(s[i]) for i in range(200)]
    )
    t = timed(f, s, per=200)
    g = jax.jit(lambda s: [(s[i].astype(F32) * 2.0) for i in range(200)])
    tg = timed(g, s, per=200)
    rows.append(
        dict(
            op="FFI call overhead (16-element kernel)",
            shape="200 calls / executable",
            us=t * 1e6,
            xla_bf16_us=tg * 1e6,
            tflops=float("nan"),
            pct_fp8=float("nan"),
            pct_bw=float("nan"),
        )
    )


class Rows(list):
    """Result rows, each printed as soon as it is measured (a run cut short by a time limit keeps what it has)."""

    def append(self, r):
        super().append(r)
        print(
            f"{r['op']:52s} {r['shape']:34s} {r['us']:9.1f} us  {r['tflops']:6.0f} TFLOP/s "
            f"{r['pct_fp8']:4.0f}% FP8  {r['pct_bw']:4.0f}% copy BW",
            flush=True,
        )


@contextlib.contextmanager
def ffi_env(name: str, value: str):
    """Sets one of the extension's DSV4_FFI_* switches (TMA_MULTICAST, GEMV), which it reads at every launch, so
    executables built inside see the setting; restores the old value after."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def multicast(on: bool):
    return ffi_env("DSV4_FFI_TMA_MULTICAST", "1" if on else "0")


def gemv_impl(name: str):
    return ffi_env("DSV4_FFI_GEMV", name)  # mma | cuda


def bench_decode(rows, bw, fp8, impls=("mma", "cuda")):
    """Decode sizes only: the GEMV's variants on the routed experts and the dense linears, next to the
    tensor-core GEMMs that would otherwise run."""
    for impl in impls:
        with gemv_impl(impl):
            for t in (1, 2, 4, 8, 16):
                bench_grouped(rows, t, 2048, 4096, bw, fp8, "gemv", baseline=False, label=f" [{impl}]")
            for t in (1, 8):
                bench_grouped(rows, t, 4096, 2048, bw, fp8, "gemv", baseline=False, label=f" [{impl}]")
            for t in (1, 2, 4, 8):
                bench_grouped(rows, t, 2048, 4096, bw, fp8, "gemv_pair", baseline=False, label=f" [{impl}]")
            for m in (1, 2, 4, 8):
                for n, k in DENSE_SHAPES:
                    bench_dense(rows, m, n, k, bw, fp8, label=f" [{impl}]")
    for t in (8, 16):
        bench_grouped(rows, t, 2048, 4096, bw, fp8, "masked", baseline=False)
    for n, k in DENSE_SHAPES:
        bench_dense(rows, 64, n, k, bw, fp8)


def bench_gemv_quant(rows, bw, fp8, ms=(1,), rounds=3):
    """fp8_linear at decode sizes with the activation quantisation fused into the GEMV (one launch) vs separate (our
    quantisation kernel, then the GEMV): the same 64 rotating weights and inputs, 64 calls per executable (launch
    gaps counted, as in a decode step), the two modes interleaved `rounds` times, best of each."""
    for m in ms:
        for n, k in DECODE_LINEARS:
            r = 64
            key = jax.random.key(m + n + k)
            ws = [fp8_weight(jax.random.fold_in(key, i), (n, k)) for i in range(r)]
            w = [a for a, _ in ws]
            s = [ffi_ops.sm90_weight_scales(b) for _, b in ws]
            x = [jax.random.normal(jax.random.fold_in(key, 100 + i), (m, k), F32).astype(BF16) for i in range(r)]
            fns = {q: many(functools.partial(ffi_ops.fp8_linear, quant=q), r) for q in ffi_ops.GEMV_QUANT_MODES}
            best = dict.fromkeys(fns, float("inf"))
            for _ in range(rounds):
                for q, f in fns.items():
                    best[q] = min(best[q], timed(f, x, w, s, per=r))
            flops, byts = 2 * m * n * k, n * k + m * k * 2 + m * n * 2
            for q in fns:
                rows.append(
                    result_row(
                        f"fp8_linear [{q} quant]", f"M={m} N={n} K={k}", best[q], float("nan"), flops, byts, bw, fp8
                    )
                )
            saved = best["separate"] - best["fused"]
            print(f"  fused vs separate: {saved * 1e6:+.2f} us per call ({100 * saved / best['separate']:+.1f}%)")
            del ws, w, s, x


def fp4_weight(key, shape, scale_bytes=(117, 125)):
    """Random MXFP4 weight for a logical `[..., N, K]`: packed uint8 `[..., N, K/2]` (any e2m1 code in either nibble)
    and e8m0 scales `[..., N, K/32]` in 2^-10..2^-3, drawn as bytes from uint32 bits (1 GiB per Flash projection)."""
    *lead, n, k = shape
    k1, k2 = jax.random.split(key)
    bits = jax.random.bits(k1, (*lead, n, k // 8), jnp.uint32)
    w = jax.lax.bitcast_convert_type(bits, jnp.uint8).reshape(*lead, n, k // 2)
    s = jax.random.randint(k2, (*lead, n, k // 32), scale_bytes[0], scale_bytes[1], jnp.int32).astype(jnp.uint8)
    return w, jax.lax.bitcast_convert_type(s, jnp.float8_e8m0fnu)


def bench_fp4_decode(
    rows,
    bw,
    fp8,
    variants=("wg", "wg8", "wgb", "ring"),
    cvt="lut",
    ksplit="auto",
    e=256,
    d=4096,
    inter=2048,
    topk=6,
    reps=32,
    rounds=3,
    tag="",
):
    """The MXFP4 routed experts of a decode step at Flash shapes (E=256, top-6, hidden 4096, intermediate 2048):
    `fp4_moe_gate_up` (gate + up projections, SwiGLU and routing weight; FP8 activation quantization inside) then
    `fp4_moe_down`: two launches per step, T = 1, 2, 4, 8 tokens, for each kernel variant (`variant=` of the
    wrappers: the variant is part of the program, so command buffers replay what was asked for). Each executable runs
    `reps` steps with different routings (the launch gaps between them are counted; the weights of one step are not
    in L2 from the last). The variants are measured in interleaved rounds (`rounds` x, best kept), so that clock or
    thermal drift does not favour one. Pairs are sorted by expert, as a caller should pass them (pairs of one expert
    share a weight pass); at T = 8 also in token order (no sharing). Rows per launch as well: gate/up alone, down
    alone (on the h of the same steps). `cvt` (DSV4_FFI_FP4_CVT) and `ksplit` (DSV4_FFI_FP4_KSPLIT) only affect the
    ring variant. "wg8" is not the reference's numerics (FP8 accumulator: see ffi_ops.FP4_VARIANTS): it is measured
    to show what the FP8 tensor cores would give.

    "% copy BW" counts the bytes read: packed weights and scales of the experts hit (3 projections; distinct experts
    per step, averaged) + the activations read (x by gate/up, h by down); the bf16 outputs written are not counted
    (<0.5% of the bytes at T = 8)."""
    key = jax.random.key(14)
    w1, s1 = fp4_weight(jax.random.fold_in(key, 1), (e, inter, d))
    w3, s3 = fp4_weight(jax.random.fold_in(key, 2), (e, inter, d))
    w2, s2 = fp4_weight(jax.random.fold_in(key, 3), (e, d, inter))
    ws = (w1, s1, w3, s3, w2, s2)
    per_expert = 3 * (inter * d // 2 + inter * d // 32)  # packed bytes + scale bytes of one expert's 3 projections
    limit = 10.0

    def jitted(t: int, variant: str):
        """(both launches, gate/up alone, down alone on given h) over a list of steps, for t tokens."""

        def gate_up(ws, c):
            x, tok, grp, rw = c
            return ffi_ops.fp4_moe_gate_up(x, tok, grp, rw, *ws[:4], limit, variant=variant)

        def down(ws, c, h):
            return ffi_ops.fp4_moe_down(h, c[2], ws[4], ws[5], tokens=t, variant=variant)

        both = jax.jit(lambda ws, calls: [down(ws, c, gate_up(ws, c)) for c in calls])
        gu = jax.jit(lambda ws, calls: [gate_up(ws, c) for c in calls])
        dn = jax.jit(lambda ws, calls, hs: [down(ws, c, h) for c, h in zip(calls, hs, strict=True)])
        return both, gu, dn

    env = {"DSV4_FFI_FP4_CVT": cvt}
    if ksplit != "auto":
        env["DSV4_FFI_FP4_KSPLIT"] = ksplit
    summary = []
    with contextlib.ExitStack() as stack:
        for name, value in env.items():
            stack.enter_context(ffi_env(name, value))
        for t in (1, 2, 4, 8):
            for sort in (True, False) if t == 8 else (True,):
                calls, actives = [], []
                for r in range(reps):
                    kr = jax.random.fold_in(key, 1000 * t + r)
                    idx = np.asarray(jnp.argsort(jax.random.uniform(kr, (t, e)), -1)[:, :topk])
                    tok, grp = np.repeat(np.arange(t), topk).astype(np.int32), idx.reshape(-1).astype(np.int32)
                    if sort:
                        order = np.argsort(grp, kind="stable")
                        tok, grp = tok[order], grp[order]
                    x = jax.random.normal(jax.random.fold_in(kr, 1), (t, d), F32).astype(BF16)
                    rw = jax.random.uniform(jax.random.fold_in(kr, 2), (t * topk,), F32, 0.05, 1.0)
                    calls.append((x, jnp.asarray(tok), jnp.asarray(grp), rw))
                    actives.append(len(np.unique(grp)))
                pairs, active = t * topk, float(np.mean(actives))
                wbytes = active * per_expert
                act_gu, act_dn = t * d * 2, pairs * inter * 2  # x read by gate/up, h read by down
                shape = f"T={t} pairs={pairs} active={active:.1f}" + ("" if sort else " (token order)")
                flops = 6.0 * pairs * inter * d
                fns = {v: jitted(t, v) for v in variants}
                hs = {v: jax.block_until_ready(fns[v][1](ws, calls)) for v in variants} if sort else {}
                best = {v: [float("inf")] * 3 for v in variants}
                for _ in range(rounds):  # interleaved: every variant once per round
                    for v in variants:
                        f_step, f_gu, f_dn = fns[v]
                        best[v][0] = min(best[v][0], timed(f_step, ws, calls, per=reps))
                        if sort:
                            best[v][1] = min(best[v][1], timed(f_gu, ws, calls, per=reps))
                            best[v][2] = min(best[v][2], timed(f_dn, ws, calls, hs[v], per=reps))
                for v in variants:
                    label = f" [{v}{tag}]"
                    tm, tg, td = best[v]
                    rows.append(
                        result_row(
                            f"fp4 routed experts: gate/up + down{label}",
                            shape,
                            tm,
                            float("nan"),
                            flops,
                            wbytes + act_gu + act_dn,
                            bw,
                            fp8,
                        )
                    )
                    if not sort:
                        continue
                    rows.append(
                        result_row(
                            f"  fp4 gate/up + SwiGLU alone{label}",
                            shape,
                            tg,
                            float("nan"),
                            flops * 2 / 3,
                            wbytes * 2 / 3 + act_gu,
                            bw,
                            fp8,
                        )
                    )
                    rows.append(
                        result_row(
                            f"  fp4 down alone{label}",
                            shape,
                            td,
                            float("nan"),
                            flops / 3,
                            wbytes / 3 + act_dn,
                            bw,
                            fp8,
                        )
                    )
                summary.append(
                    (shape, {v: (best[v], 100 * (wbytes + act_gu + act_dn) / best[v][0] / bw) for v in variants})
                )
    print(
        f"\nMXFP4 decode step (gate/up + down){tag}, best of the interleaved rounds; % of copy bandwidth on the bytes"
        " read:"
    )
    for shape, res in summary:
        parts = [f"{v} {r[0] * 1e6:7.1f} us {pct:3.0f}%" for v, (r, pct) in res.items()]
        ref = res.get("ring")
        speed = "".join(
            f"  {v}/ring x{ref[0][0] / r[0]:.2f}" for v, (r, _) in res.items() if ref is not None and v != "ring"
        )
        print(f"  {shape:40s} " + " | ".join(parts) + speed)


def _packed_rows(key, shape):
    """Random packed KV rows `[..., 584]` (NoPE FP8-simulated in tiles of 64, RoPE bf16), as the cache stores them."""
    v = jax.random.normal(key, (*shape, 512), F32)
    v = jnp.concatenate([quant.fp8_sim(v[..., :448], 64), v[..., 448:]], axis=-1).astype(BF16)
    return kv_format.pack_kv(v, 64)


def device_us(fn, *args, calls: int = 10) -> float:
    """Device kernel time per call (µs, every GPU kernel event of `calls` calls under `jax.profiler`, summed): for
    programs shorter than their host-side dispatch, which `timed` then measures instead."""
    from dsv4_jax.profile import traced_events

    jax.block_until_ready(fn(*args))
    events, _ = traced_events(lambda: [jax.block_until_ready(fn(*args)) for _ in range(calls)])
    return sum(ev[4] for ev in events) / calls / 1e3


def bench_topk(
    rows, bw, fp8, cases=((64, 16384), (32, 32768), (1, 16384), (1, 32768), (1, 262144), (8192, 2048)), k=512
):
    """The indexer's top-512 (`ops.indexer_topk`): the kernel against `jax.lax.top_k` (XLA's sort) on bf16-valued
    scores, (rows, entries) = decode at batch x context / 4 and one 8K prefill (8,192 query rows of 2,048 entries,
    the visible counts causal); wall time per call (`timed`) and device kernel time per call (`device_us`: small
    rows are shorter than a call's dispatch); % copy BW on the scores read once."""
    from dsv4_jax.kernels import indexer as kernel_indexer

    ffi = ops.Opts(backend="ffi")
    for r, n in cases:
        sc = jax.random.normal(jax.random.key(r + n), (r, n), F32).astype(jnp.bfloat16).astype(F32)
        nv = jnp.full((r,), n, jnp.int32) if r < 8192 else jnp.arange(1, r + 1, dtype=jnp.int32) // 4
        kern = jax.jit(lambda s, v: ops.indexer_topk(s, v, k=k, opts=ffi))
        lax = jax.jit(lambda s, v: ops.indexer_topk(s, v, k=k, opts=ops.Opts(backend="reference")))
        same = bool((kern(sc, nv) == lax(sc, nv)).all())
        t_k, t_x = min(timed(kern, sc, nv) for _ in range(2)), min(timed(lax, sc, nv) for _ in range(2))
        d_k, d_x = device_us(kern, sc, nv), device_us(lax, sc, nv)
        rows.append(result_row("indexer top-512 (kernel)", f"{r}x{n}", d_k * 1e-6, d_x * 1e-6, 0, sc.nbytes, bw, fp8))
        routed = n > kernel_indexer.XLA_TOPK_MIN_N and r < kernel_indexer.XLA_TOPK_MAX_ROWS
        print(f"  top-{k} of {r} x {n}{' (the op routes it to XLA)' if routed else ''}: "
              f"kernel {t_k * 1e6:.1f} us per call, {d_k:.1f} us on the device "
              f"({100 * sc.nbytes / d_k / 1e-6 / bw:.0f}% copy); jax.lax.top_k {t_x * 1e6:.1f} / {d_x:.1f} us; "
              f"device x{d_x / d_k:.1f}; picks equal: {same}")  # fmt: skip


def bench_sparse_attention(rows, bw, fp8, bf16, context=65536, batch=64, prefill=8192, rounds=2):
    """Issue #16's attention targets, V4-Flash shapes (64 heads, 512 = 448 + 64 dims, packed 584-byte rows; the
    indexer's 64 heads of 128 over packed MXFP4 keys, top 512; window 128).

    Decode of a CSA layer at `context` tokens, `batch` rows (the cache holds context / 4 entries per row): the
    indexer's scores over every cached key, its top 512, then sparse attention over the window + those entries; the
    bytes the step must read (every key once, every chosen row once) over the time, against the copy ceiling.
    Prefill of `prefill` tokens (fresh: causal window, top 512 of the visible entries): the attention FLOPs actually
    computed (2 x 64 heads x (512 + 512) per valid key) over the time, against XLA's bf16 dot rate (the kernel's
    tensor-core type); the reference (`backend="reference"`) is the XLA column."""
    h, d, w_, top, ih = 64, 512, 128, 512, 64
    key = jax.random.key(16)
    ks = jax.random.split(key, 8)
    cap = context // 4
    ring = _packed_rows(ks[0], (batch, w_))
    entries = jnp.concatenate([_packed_rows(jax.random.fold_in(ks[1], i), (batch, cap // 8)) for i in range(8)], 1)
    keys_f = jax.random.normal(ks[2], (batch, cap, 128), F32)
    idx_keys = kv_format.pack_index_keys(quant.fp4_sim(keys_f, 32))
    del keys_f
    q = jax.random.normal(ks[3], (batch, h, d), F32).astype(BF16)
    qi = quant.fp4_sim(jax.random.normal(ks[4], (batch, 1, ih, 128), F32), 32).astype(BF16)
    wi = (jax.random.normal(ks[5], (batch, 1, ih), F32) * 0.1).astype(BF16)
    sink = jax.random.normal(ks[6], (h,), F32)
    ffi = ops.Opts(backend="ffi")
    win = jnp.broadcast_to(jnp.arange(w_, dtype=jnp.int32), (batch, w_))

    n_vis = jnp.full((batch,), cap, jnp.int32)

    def decode(q, qi, wi, ring, entries, idx_keys, sink):
        scores = ops.indexer_scores(qi, wi, idx_keys, opts=ffi)[:, 0]
        sel = ops.indexer_topk(scores, n_vis, k=top, opts=ffi)
        idx = jnp.concatenate([win, w_ + sel], axis=-1)
        return ops.sparse_decode(q, ring, entries, None, idx, sink, scale=d**-0.5, rope_dim=64, opts=ffi)

    def scores_only(qi, wi, idx_keys):
        return ops.indexer_topk(ops.indexer_scores(qi, wi, idx_keys, opts=ffi)[:, 0], n_vis, k=top, opts=ffi)

    sel = jax.jit(scores_only)(qi, wi, idx_keys)
    scores = jax.jit(lambda qi, wi, k: ops.indexer_scores(qi, wi, k, opts=ffi)[:, 0])(qi, wi, idx_keys)
    idx = jnp.concatenate([win, w_ + sel.astype(jnp.int32)], axis=-1)

    def attn_only(q, ring, entries, idx, sink):
        return ops.sparse_decode(q, ring, entries, None, idx, sink, scale=d**-0.5, rope_dim=64, opts=ffi)

    attn = jax.jit(attn_only)
    fns = {"indexer scores alone": (jax.jit(lambda qi, wi, k: ops.indexer_scores(qi, wi, k, opts=ffi)),
                                    (qi, wi, idx_keys), idx_keys.nbytes),
           "indexer scores alone (wgmma variant)": (
               jax.jit(lambda qi, wi, k: ffi_ops.indexer_scores(qi[:, 0], wi[:, 0], k, variant="wgmma")),
               (qi, wi, idx_keys), idx_keys.nbytes),
           "top-k alone (jax.lax.top_k)": (jax.jit(lambda sc: jax.lax.top_k(sc, top)[1]), (scores,), scores.nbytes),
           "top-k alone (kernel)": (jax.jit(lambda sc: ops.indexer_topk(sc, n_vis, k=top, opts=ffi)), (scores,),
                                    scores.nbytes),
           "indexer scores + top-k": (jax.jit(scores_only), (qi, wi, idx_keys), idx_keys.nbytes),
           "sparse decode": (attn, (q, ring, entries, idx, sink), batch * (w_ + top) * 584),
           "the CSA step (both)": (jax.jit(decode), (q, qi, wi, ring, entries, idx_keys, sink),
                                   idx_keys.nbytes + batch * (w_ + top) * 584)}  # fmt: skip
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, (f, args, _) in fns.items():
            best[name] = min(best[name], timed(f, *args))
    for name, (_, _, nbytes) in fns.items():
        rows.append(result_row(f"CSA decode: {name}", f"B={batch} context={context}", best[name], float("nan"), 0,
                               nbytes, bw, fp8))  # fmt: skip
        print(f"  {name}: {best[name] * 1e6:.1f} us, {nbytes / 1e6:.1f} MB read, "
              f"{100 * nbytes / best[name] / bw:.0f}% of copy")  # fmt: skip
    del entries, idx_keys, ring, scores

    # prefill: fresh, one sequence of `prefill` tokens; its own rows [0, S) and its S / 4 entries at S
    s_len, n_ent = prefill, prefill // 4
    rows_p = _packed_rows(ks[7], (1, s_len))
    ent_p = _packed_rows(jax.random.fold_in(ks[7], 1), (1, n_ent))
    pos = np.arange(s_len)[:, None]
    u = np.maximum(pos - w_ + 1, 0) + np.arange(w_)[None, :]
    win_p = np.where(u <= pos, u, -1)
    visible = (pos + 1) // 4  # entries complete before or at the query
    rng = np.random.default_rng(0)
    pick = (rng.random((s_len, top)) * np.maximum(visible, 1)).astype(np.int64)
    comp_p = np.where(np.arange(top)[None, :] < visible, s_len + pick, -1)
    idx_p = jnp.asarray(np.concatenate([win_p, comp_p], axis=1)[None].astype(np.int32))
    valid = int((np.asarray(idx_p) >= 0).sum())
    qp = jax.random.normal(jax.random.fold_in(ks[3], 1), (1, s_len, h, d), F32).astype(BF16)
    flops = 2.0 * h * valid * (d + d)
    pre = {b: jax.jit(lambda q, r, e, i, s, b=b: ops.sparse_prefill(q, r, None, e, i, s, scale=d**-0.5, rope_dim=64,
                                                                     opts=ops.Opts(backend=b)))
           for b in ("ffi", "reference")}  # fmt: skip
    t = {b: timed(f, qp, rows_p, ent_p, idx_p, sink, reps=2) for b, f in pre.items()}
    rows.append(result_row("sparse prefill (kernel; XLA = reference)", f"S={s_len} keys/query<={w_ + top}", t["ffi"],
                           t["reference"], flops, 0, bw, fp8))  # fmt: skip
    print(
        f"  sparse prefill S={s_len}: {t['ffi'] * 1e3:.2f} ms = {flops / t['ffi'] / 1e12:.0f} TFLOP/s "
        f"({100 * flops / t['ffi'] / bf16:.0f}% of XLA's bf16 dot rate); reference {t['reference'] * 1e3:.1f} ms"
    )


def bench_dense_gemm(rows, m, n, k, bw, fp8):
    """The dense FP8 GEMM alone (activations quantized beforehand): the rate of the prefill kernels' template."""
    key = jax.random.key(m + n + k + 1)
    w, s = fp8_weight(key, (n, k))
    a, sfa = ffi_ops.act_quant_rows(jax.random.normal(jax.random.fold_in(key, 1), (m, k), F32).astype(BF16))
    t = timed(jax.jit(ffi_ops.fp8_gemm), a, sfa[0], w, ffi_ops.sm90_weight_scales(s))
    flops, byts = 2 * m * n * k, n * k + m * k + m * n * 2
    rows.append(result_row("fp8_gemm (GEMM only)", f"M={m} N={n} K={k}", t, float("nan"), flops, byts, bw, fp8))


def bench_prefill(rows, bw, fp8):
    """The two Flash expert projections at 8192 tokens: BLOCK_M 128 (plain, TMA multicast) and BLOCK_M 64; and the
    same GEMM template dense at M=8192, the rate the grouped kernel can reach on its (padded) rows."""
    for n, k in ((4096, 4096), (4096, 8192)):
        bench_dense_gemm(rows, 8192, n, k, bw, fp8)
    for n, k in EXPERT_SHAPES:
        bench_grouped(rows, 8192, n, k, bw, fp8, "contig", baseline=False)
        with multicast(True):
            bench_grouped(rows, 8192, n, k, bw, fp8, "contig", baseline=False, label=" multicast")
        bench_grouped(rows, 8192, n, k, bw, fp8, "contig", block_m=64, baseline=False)


def bench_all(rows, bw, fp8, quick: bool):
    bench_overhead(rows)
    base = not quick  # --quick: no XLA bf16 baselines for the grouped rows
    for t in (1, 8, 16):
        bench_grouped(rows, t, 2048, 4096, bw, fp8, "gemv", baseline=base)
    for t in (16, 32, 64, 128, 256):
        bench_grouped(rows, t, 2048, 4096, bw, fp8, "masked" if t <= 64 else "contig", baseline=base)
    bench_prefill(rows, bw, fp8)
    for m in (1, 8, 64, 1024, 8192):
        for n, k in DENSE_SHAPES:
            bench_dense(rows, m, n, k, bw, fp8)
    with multicast(True):  # the same BLOCK_M 128 GEMMs as their opt-in TMA-multicast (cluster of 2) variants
        for m in (1024, 8192):
            for n, k in DENSE_SHAPES:
                bench_dense(rows, m, n, k, bw, fp8, label=" multicast")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--markdown", default="")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--grouped-block-m", action="store_true", help="only the prefill grouped GEMMs, BLOCK_M 64 vs 128")
    ap.add_argument("--decode", action="store_true", help="only decode sizes: GEMV variants vs tensor-core GEMMs")
    ap.add_argument("--prefill", action="store_true", help="only the grouped GEMMs at 8192 tokens")
    ap.add_argument(
        "--sparse-attention", action="store_true", help="issue #16's targets: CSA decode at 64K x 64, 8K prefill"
    )
    ap.add_argument("--topk", action="store_true", help="only the indexer's top-512: kernel vs jax.lax.top_k")
    ap.add_argument("--gemv-impls", default="mma,cuda", help="GEMV variants for --decode (DSV4_FFI_GEMV values)")
    ap.add_argument(
        "--gemv-quant",
        action="store_true",
        help="only the Flash decode linears, activation quantisation fused into the GEMV vs a separate launch",
    )
    ap.add_argument("--gemv-quant-m", default="1", help="rows (M <= 8) for --gemv-quant (comma list)")
    ap.add_argument(
        "--fp4-decode",
        action="store_true",
        help="only the MXFP4 routed experts of a decode step (gate/up + down launches), T = 1, 2, 4, 8",
    )
    ap.add_argument(
        "--fp4-variants", default="wg,wg8,wgb,ring", help="MXFP4 kernel variants for --fp4-decode (comma list)"
    )
    ap.add_argument(
        "--fp4-cvt", default="lut", help="ring variant's e2m1 -> e4m3 conversion for --fp4-decode: lut, bits"
    )
    ap.add_argument("--fp4-ksplit", default="auto", help="ring variant's K split for --fp4-decode: auto, 1, 2, 4, 8")
    ap.add_argument(
        "--fp4-tiles",
        default="",
        help="after the main comparison, also the wg variants with DSV4_FFI_FP4_TILES = each of these (comma list)",
    )
    args = ap.parse_args()
    mod, why = ffi_ops.load()
    assert mod is not None, why
    dev = jax.devices()[0]
    bw, fp8, bf16 = ceilings()
    print(
        f"device {dev.device_kind}: copy {bw / 1e12:.2f} TB/s, "
        f"XLA FP8 dot {fp8 / 1e12:.0f} TFLOP/s, bf16 {bf16 / 1e12:.0f} TFLOP/s"
    )
    rows = Rows()
    if args.fp4_decode:
        bench_fp4_decode(
            rows, bw, fp8, variants=tuple(args.fp4_variants.split(",")), cvt=args.fp4_cvt, ksplit=args.fp4_ksplit
        )
        for tiles in filter(None, args.fp4_tiles.split(",")):  # row tiles per block of the wg kernels (tuning)
            with ffi_env("DSV4_FFI_FP4_TILES", tiles):
                wg = tuple(v for v in args.fp4_variants.split(",") if v.startswith("wg"))
                bench_fp4_decode(rows, bw, fp8, variants=wg, rounds=1, tag=f", tiles {tiles}")
    elif args.gemv_quant:
        bench_gemv_quant(rows, bw, fp8, ms=tuple(int(v) for v in args.gemv_quant_m.split(",")))
    elif args.decode:
        bench_overhead(rows)
        bench_decode(rows, bw, fp8, impls=tuple(args.gemv_impls.split(",")))
    elif args.prefill:
        bench_prefill(rows, bw, fp8)
    elif args.sparse_attention:
        bench_sparse_attention(rows, bw, fp8, bf16)
    elif args.topk:
        bench_topk(rows, bw, fp8)
    elif args.grouped_block_m:
        for t in (8192, 32768):
            for n, k in EXPERT_SHAPES:
                for bm in (64, 128):
                    bench_grouped(rows, t, n, k, bw, fp8, "contig", block_m=bm, baseline=False)
    else:
        bench_all(rows, bw, fp8, quick=args.quick)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = dict(
        date=datetime.date.today().isoformat(),
        device=dev.device_kind,
        commit=commit or "unknown",
        copy_tbs=bw / 1e12,
        xla_fp8_tflops=fp8 / 1e12,
        xla_bf16_tflops=bf16 / 1e12,
        jax=jax.__version__,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )
    hdr = "| op | shape | time µs | XLA bf16 µs | TFLOP/s | % FP8 ceiling | % copy BW |"
    lines = [hdr, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['us']:.1f} | {r['xla_bf16_us']:.1f} | {r['tflops']:.0f} | "
            f"{r['pct_fp8']:.0f} | {r['pct_bw']:.0f} |"
        )
    text = "\n".join(lines)
    print(json.dumps(meta))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
