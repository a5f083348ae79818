"""Is the pure-JAX reference FP8 linear computed the same on the GPU as on the CPU (where it matches the official
fixture bit for bit)? Prints rel-RMS / exact fraction of GPU results against the CPU result, and any cuBLAS custom
calls XLA put into the reference. History: with `astype` decoding of the FP8 operands XLA turned the blockwise dots
into cuBLASLt FP8 GEMMs that were 2.7e-2 off; with table-lookup decoding (now in `quant.e4m3_to_f32`) GPU == CPU.
Run on the device:  python benchmarks/gpu_reference_check.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax import ops, quant

cpu, gpu = jax.devices("cpu")[0], jax.devices()[0]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2))), float(np.mean(a == b))


def on(dev, f, *args):
    return jax.jit(f, device=dev)(*[jax.device_put(a, dev) for a in args])


# Variant: the same blockwise GEMM, operands decoded from their bytes by table lookup (no convert(f8) for XLA
# to pattern-match), on the GPU.
lut = jnp.asarray(np.arange(256, dtype=np.uint8).view(jnp.float8_e4m3fn).astype(np.float32))


def lut_linear(x, w, s):
    xq, sx = quant.act_quant(x, 128)
    xv = lut[jax.lax.bitcast_convert_type(xq, jnp.uint8).astype(jnp.int32)]
    wv = lut[jax.lax.bitcast_convert_type(w, jnp.uint8).astype(jnp.int32)]
    sw = jnp.repeat(quant.e8m0_to_f32(s), 128, axis=0)[: w.shape[0]]
    return ops._blockwise_gemm(xv, sx, wv, sw, 128).astype(jnp.bfloat16)


for m, n, k in [(64, 4096, 2048), (64, 1024, 4096), (256, 2048, 4096)]:
    key = jax.random.key(m + n + k)
    x = (jax.random.normal(key, (m, k)) * 3).astype(jnp.bfloat16)
    w, s = quant.quantize_fp8_weight(jax.random.normal(jax.random.fold_in(key, 1), (n, k)) * k**-0.5)
    f = lambda x, w, s: ops.fp8_linear(x, w, s, opts=ops.Opts(backend="reference"))
    ref = on(cpu, f, x, w, s)
    got = on(gpu, f, x, w, s)
    q_c, s_c = on(cpu, quant.act_quant, x)
    q_g, s_g = on(gpu, quant.act_quant, x)
    aq_same = np.array_equal(np.asarray(q_c).view(np.uint8), np.asarray(q_g).view(np.uint8)) and np.array_equal(
        np.asarray(s_c), np.asarray(s_g)
    )
    hlo = jax.jit(f).lower(x, w, s).compile().as_text()
    f8_calls = [ln.strip()[:160] for ln in hlo.splitlines() if "custom-call" in ln and ("f8" in ln or "cublas" in ln)]

    lut_g = on(gpu, lut_linear, x, w, s)
    print(
        f"M={m} N={n} K={k}: act_quant GPU==CPU {aq_same}; reference GPU vs CPU rel {rel(got, ref)}; "
        f"LUT-decoded GPU vs CPU rel {rel(lut_g, ref)}; fp8/cublas custom calls in GPU HLO: {len(f8_calls)}"
    )
    for ln in f8_calls[:3]:
        print("   ", ln)
