"""JAX wrappers of the dsv4_jax_ffi CUDA kernels (XLA FFI custom calls) and their registration.

The extension (`ffi/`, package `dsv4_jax_ffi`) is optional: `load()` imports it and registers its handlers, or says
why it cannot. These are plain functions of arrays: they never import model code and know nothing of `Opts`; which
op runs which of them is decided in `dsv4_jax.ops` (the registry), never here.

Wrappers:
  * `fp8_linear(x bf16 [..., K], w e4m3 [N, K], s e8m0|f32 [N/128, K/128]) -> bf16 [..., N]`: per-token 1x128 pow2
    FP8 quantization (our kernel) + DeepGEMM SM90 1D2D GEMM, one FFI call; at M <= 8 rows our GEMV (`fp8_gemv`,
    mma.sync on 16 weight rows x 8 tokens per warp tile) replaces the DeepGEMM GEMM, and quantizes the bf16 rows
    itself (one launch; `quant="separate"` or DSV4_FFI_GEMV_QUANT=separate: the quantization kernel first).
  * `act_quant(x) -> (e4m3, f32 [M, K/128])`, bit-identical to `dsv4_jax.quant.act_quant`; `act_quant_rows` gathers
    rows into grouped layouts; `swiglu_quant` fuses `bf16(w * SwiGLU)` with it.
  * grouped GEMMs (`grouped_gemm_contig`, `grouped_gemm_masked`) and the GEMVs (`fp8_gemv`, `fp8_gemv_pair`).
  * the MXFP4 experts' kernels (`fp4_gemv`, `fp4_moe_gate_up`, `fp4_moe_down`, `fp4_widen`, `fp4_grouped`): defined in
    `ffi_fp4`, re-exported here; likewise the attention side's (`hc_split_sinkhorn`, `hc_pre`, `sparse_mla_decode`,
    `indexer_scores`, `indexer_topk`, `compressor_decode`, `kv_row`) from `ffi_attention`.

Weight scales: the SM90 kernels read FP32 scales `[G, ceil(N/128), K/128]` (K-major). `sm90_weight_scales` converts the
checkpoint's UE8M0 bytes once (a loader can store its result); wrappers also accept UE8M0 and convert in-graph.
Activation scales are produced by our quantization kernel directly in the layout the GEMM's TMA wants: FP32,
MN-major, `[groups, K/128, align(rows, 4)]`.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax import quant

__all__ = [
    "load",
    "device_problem",
    "instantiated",
    "sm90_weight_scales",
    "act_quant",
    "act_quant_rows",
    "swiglu_quant",
    "hc_split_sinkhorn",
    "hc_pre",
    "sparse_mla_decode",
    "sparse_mla_splits",
    "indexer_scores",
    "INDEXER_VARIANTS",
    "indexer_topk",
    "TOPK_MAX_K",
    "compressor_decode",
    "kv_row",
    "q_heads",
    "route",
    "dequant_bf16_gemv",
    "DEQUANT_GEMV_MAX_M",
    "dequant_gemv_max_m",
    "fp8_gemm",
    "fp8_linear",
    "fp8_linear_call",
    "grouped_gemm_contig",
    "grouped_gemm_masked",
    "fp8_gemv",
    "fp8_gemv_pair",
    "fp8_gemv_layer",
    "fp8_gemv_layer_pair",
    "GEMV_MAX_M",
    "GEMV_LAYER_MAX_M",
    "GEMV_QUANT_MODES",
    "fp4_gemv",
    "fp4_moe_gate_up",
    "fp4_moe_down",
    "fp4_widen",
    "fp4_grouped",
    "FP4_SEGMENT_ROWS",
    "FP4_VARIANTS",
]

# Rows up to which the dense FP8 linear runs the GEMV (the extension's `gemv_max_m`; no AOT
# instantiation is needed there).
GEMV_MAX_M = 8
# The FFI targets the wrappers below call (a stale build that lacks one is refused at load, not at trace time).
HANDLERS = frozenset(
    "dsv4_" + n
    for n in (
        "act_quant",
        "swiglu_quant",
        "route",
        "hc_split_sinkhorn",
        "hc_pre",
        "sparse_mla_decode",
        "indexer_scores",
        "indexer_topk",
        "compressor_decode",
        "kv_row",
        "q_heads",
        "dequant_bf16_gemv",
        "fp8_gemm",
        "fp8_linear",
        "fp8_gemm_contig",
        "fp8_gemm_masked",
        "fp8_gemv",
        "fp8_gemv_pair",
        "fp8_gemv_layer",
        "fp8_gemv_layer_pair",
        "fp4_gemv",
        "fp4_moe_gate_up",
        "fp4_moe_down",
        "fp4_widen",
        "fp4_grouped",
        "fp4_grouped_pair",
    )
)

E4M3, F32, BF16 = jnp.float8_e4m3fn, jnp.float32, jnp.bfloat16


def _layer_operand(layer) -> jax.Array:
    """The layer-index operand of a handler that reads one layer of a stack on the device: int32 `[1]`, or `[0]` for
    None (no stack: layer 0)."""
    return jnp.zeros((0,), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32).reshape(1)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@functools.cache
def load():
    """(module, None) after importing the extension and registering its handlers for CUDA, or (None, reason)."""
    try:
        import dsv4_jax_ffi
    except ImportError as e:
        return None, f"the extension dsv4_jax_ffi is not installed ({e}); build it with `pip install ./ffi` (BUILD.md)"
    if getattr(dsv4_jax_ffi, "gemv_max_m", None) != GEMV_MAX_M:
        return None, (
            f"the installed dsv4_jax_ffi ({getattr(dsv4_jax_ffi, '__file__', '?')}) does not match this dsv4_jax "
            f"(GEMV row limit {getattr(dsv4_jax_ffi, 'gemv_max_m', 'missing')} != {GEMV_MAX_M}); rebuild it (BUILD.md)"
        )
    handlers = dsv4_jax_ffi.registrations()
    if missing := sorted(HANDLERS - handlers.keys()):
        return None, (
            f"the installed dsv4_jax_ffi ({getattr(dsv4_jax_ffi, '__file__', '?')}) lacks the handlers {missing} "
            "this dsv4_jax calls; rebuild it (BUILD.md)"
        )
    for name, capsule in handlers.items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    return dsv4_jax_ffi, None


def device_problem() -> str | None:
    """Why the default JAX device cannot run these kernels (None: it can)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError as e:
        return f"no JAX device ({e})"
    if dev.platform != "gpu":
        return f"the default JAX device is {dev.platform!r}, not a CUDA GPU"
    cc = str(getattr(dev, "compute_capability", ""))
    if cc and not cc.startswith("9."):
        return f"the GPU has compute capability {cc}; the kernels are built for SM90 (H100/H200) only"
    return None


@functools.cache
def _table() -> frozenset:
    mod, _ = load()
    if mod is None:
        return frozenset()
    return frozenset((d["kind"], d["n"], d["k"], d["g"], d["block_m"]) for d in mod.instantiations())


def instantiated(kind: str, n: int, k: int, g: int, block_m: int) -> bool:
    return (kind, n, k, g, block_m) in _table()


# ---- weight scales -------------------------------------------------------------------------------------------


def sm90_weight_scales(s: jax.Array) -> jax.Array:
    """Checkpoint UE8M0 block scales `[..., ceil(N/128), ceil(K/128)]` -> the FP32 powers of two the SM90 GEMMs
    read (same shape, K-major). Idempotent on FP32 input. Call once at load to keep the conversion out of the step."""
    if s.dtype == F32:
        return s
    return quant.e8m0_to_f32(s).astype(F32)


# ---- activation quantization -----------------------------------------------------------------------------------


def act_quant_rows(
    x2: jax.Array, *, src: jax.Array | None = None, rows_out: int | None = None, groups: int = 1, wgmma: bool = False
):
    """Our FP8 quantization kernel. `x2` bf16 `[R_in, K]`; output row r is input row `src[r]` (skipped, i.e. left
    unwritten, where `src[r] < 0`). Returns `(q e4m3 [R_out, K], sfa f32 [groups, K/128, align(R_out/groups, 4)])`.
    `wgmma`: each 32-block of q in the order `fp4_grouped` reads (element 8i + 4h + j at 16h + 4i + j)."""
    r_in, k = x2.shape
    r_out = r_in if rows_out is None else rows_out
    if k % 128:
        raise ValueError(f"act_quant: K={k} is not a multiple of 128")
    if r_out % groups:
        raise ValueError(f"act_quant: {r_out} rows do not split into {groups} groups")
    pitch = _round_up(r_out // groups, 4)
    src = jnp.zeros((0,), jnp.int32) if src is None else src.astype(jnp.int32)
    return jax.ffi.ffi_call(
        "dsv4_act_quant",
        (jax.ShapeDtypeStruct((r_out, k), E4M3), jax.ShapeDtypeStruct((groups, k // 128, pitch), F32)),
    )(x2.astype(BF16), src, groups=np.int64(groups), order=np.int64(wgmma))


def act_quant(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Same contract as `dsv4_jax.quant.act_quant(x, 128)` (bit-identical), computed by the CUDA kernel."""
    *lead, k = x.shape
    x2 = x.reshape(-1, k)
    q, sfa = act_quant_rows(x2)
    m = x2.shape[0]
    return q.reshape(*lead, k), sfa[0, :, :m].T.reshape(*lead, k // 128)


def swiglu_quant(
    g: jax.Array,
    u: jax.Array,
    w: jax.Array,
    valid: jax.Array | None,
    limit: float,
    groups: int = 1,
    wgmma: bool = False,
):
    """`q, sfa = act_quant(bf16(w[:, None] * silu(min(g, L)) * clip(u, -L, L)))` in one kernel; rows with
    `valid < 0` are skipped. g, u: bf16 `[R, I]`; w: f32 `[R]`; `wgmma` as for `act_quant_rows`."""
    r, i = g.shape
    pitch = _round_up(r // groups, 4)
    valid = jnp.zeros((0,), jnp.int32) if valid is None else valid.astype(jnp.int32)
    return jax.ffi.ffi_call(
        "dsv4_swiglu_quant",
        (jax.ShapeDtypeStruct((r, i), E4M3), jax.ShapeDtypeStruct((groups, i // 128, pitch), F32)),
    )(g, u, w.astype(F32), valid, limit=np.float32(limit), groups=np.int64(groups), order=np.int64(wgmma))


SPARSE_MLA_BLOCKS_PER_SM = 2  # the 16-head kernel (its shared memory allows two); the 64-head kernel: one (16 warps)


@functools.cache
def gpu_sms() -> int:
    """Streaming multiprocessors of the first GPU (jax's `core_count`; 132 on an H100 / H200), which the split-KV
    grids are sized by; 132 where there is no GPU or jax does not say."""
    dev = next((d for d in jax.devices() if d.platform == "gpu"), None) if jax.default_backend() == "gpu" else None
    sms = int(getattr(dev, "core_count", 0) or 0)
    return sms if 0 < sms <= 4096 else 132


def sparse_mla_splits(batch: int, heads: int, n_idx: int) -> int:
    """Split-KV runs for `sparse_mla_decode`, at most one run per 64-key tile. Heads a multiple of 64 (the 64-head
    kernel): at most one wave of batch x heads/64 x splits blocks, one per SM (a second, partial wave would cost a
    whole tile loop). Otherwise (16 heads per block): enough blocks for two per SM."""
    tiles = -(-n_idx // 64)
    if heads % 64 == 0:
        return max(1, min(gpu_sms() // max(batch * (heads // 64), 1), tiles))
    blocks = max(batch * (heads // 16), 1)
    return max(1, min(-(-(SPARSE_MLA_BLOCKS_PER_SM * gpu_sms()) // blocks), tiles))


def route(logits, bias, table, token_ids, layer, *, k: int, route_scale: float) -> tuple[jax.Array, jax.Array]:
    """The MoE router in one launch: fp32 logits `[T, E]` (E <= 512) -> (weights f32 `[T, k]`, expert ids int32
    `[T, k]`), from the top k of `sqrt(softplus(logits)) + bias` (bias f32 `[(L,) E]`, table None) or the hash
    table's row of each token (table int32 `[(L,) V, k]` and token_ids `[T]`, bias None); stacks with `layer` (an
    int32 scalar), one layer with None."""
    t = logits.shape[0]
    empty_f, empty_i = jnp.zeros((0,), F32), jnp.zeros((0,), jnp.int32)
    return jax.ffi.ffi_call(
        "dsv4_route", (jax.ShapeDtypeStruct((t, k), F32), jax.ShapeDtypeStruct((t, k), jnp.int32))
    )(logits.astype(F32), empty_f if bias is None else bias.astype(F32), empty_i if table is None else
      table.astype(jnp.int32), empty_i if token_ids is None else token_ids.astype(jnp.int32), _layer_operand(layer),
      k=np.int64(k), route_scale=np.float32(route_scale))  # fmt: skip


DEQUANT_GEMV_MAX_M = 32  # rows of x one launch takes (the extension's kDequantGemvMaxM: the tensor-core kernel)
DEQUANT_GEMV_CUDA_MAX_M = 8  # ... on the CUDA-core kernel (kDequantGemvCudaMaxM)


def dequant_gemv_max_m(rows_per_group: int) -> int:
    """Rows `dequant_bf16_gemv` takes for weight groups of `rows_per_group` rows: the tensor-core kernel's 32 where a
    group is whole 16-row tiles, else (or with `DSV4_FFI_DEQUANT_GEMV=cuda`, the CUDA-core kernel) 8. As the
    extension decides at launch; read when the program is traced."""
    mma = rows_per_group % 16 == 0 and os.environ.get("DSV4_FFI_DEQUANT_GEMV") != "cuda"
    return DEQUANT_GEMV_MAX_M if mma else DEQUANT_GEMV_CUDA_MAX_M


def dequant_bf16_gemv(x: jax.Array, w: jax.Array, s: jax.Array, layer: jax.Array | None = None) -> jax.Array:
    """`y [M, N] = bf16(x . bf16(W * s))` (the grouped `wo_a`): x bf16 `[M, G, K]` (M <= `dequant_gemv_max_m`),
    weight row r belongs to group `r // (N / G)`; W e4m3 `[N, K]`, or a layer stack `[L, N, K]` with `layer` (an
    int32 scalar) naming the layer; f32 or UE8M0 block scales `[(L,) ceil(N/128), K/128]`."""
    m = x.shape[0]
    layer = _layer_operand(layer)
    return jax.ffi.ffi_call("dsv4_dequant_bf16_gemv", jax.ShapeDtypeStruct((m, w.shape[-2]), BF16))(
        x, w, sm90_weight_scales(s), layer
    )


# ---- GEMMs -----------------------------------------------------------------------------------------------------


def dense_block_m(m: int) -> int:
    return 64 if m <= 64 else 128


def fp8_gemm(a: jax.Array, sfa: jax.Array, w: jax.Array, sw: jax.Array) -> jax.Array:
    """`a` e4m3 `[M, K]`, `sfa` f32 `[K/128, align(M, 4)]`, `w` e4m3 `[N, K]`, `sw` f32 `[N/128, K/128]`
    -> bf16 `[M, N]`."""
    m = a.shape[0]
    n = w.shape[0]
    return jax.ffi.ffi_call("dsv4_fp8_gemm", jax.ShapeDtypeStruct((m, n), BF16))(a, sfa, w, sm90_weight_scales(sw))


# How `fp8_linear` quantizes its activations at M <= GEMV_MAX_M (`quant=`; None: DSV4_FFI_GEMV_QUANT at launch,
# fused unless it is "separate" or DSV4_FFI_GEMV=cuda): "fused" inside the GEMV (one launch), "separate" our
# quantization kernel, then the GEMV (two launches). Bit-identical results; larger M always quantizes separately.
GEMV_QUANT_MODES = ("fused", "separate")


def fp8_linear(x: jax.Array, w: jax.Array, s: jax.Array, *, quant: str | None = None) -> jax.Array:
    """Drop-in kernel for `ops.fp8_linear` (quant_sim numerics): bf16 `[..., K]` x e4m3 `[N, K]` -> bf16 `[..., N]`.
    `quant`: one of `GEMV_QUANT_MODES` or None (see there; an A/B switch fixed in the program)."""
    *lead, k = x.shape
    n = w.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m > GEMV_MAX_M and not instantiated("dense", n, k, 1, dense_block_m(m)):
        raise ValueError(f"fp8_linear: dsv4_jax_ffi has no FP8 GEMM instantiation for N={n} K={k} (M={m}); add the "
                         "shape to ffi/gen/gen_instantiations.py and rebuild")  # fmt: skip
    out, _, _ = fp8_linear_call(x2, w, s, quant=quant)
    return out.reshape(*lead, n)


def fp8_linear_call(x2: jax.Array, w: jax.Array, s: jax.Array, *, quant: str | None = None):
    """The `dsv4_fp8_linear` call itself: x2 bf16 `[M, K]` -> (y bf16 `[M, N]`, q e4m3 `[M, K]`, sfa f32
    `[K/128, align(M, 4)]`), q and sfa being `act_quant(x2)` in the GEMM's layout (the fused GEMV writes them too;
    columns M.. of sfa are not written). For tests; `fp8_linear` discards q and sfa."""
    if quant is not None and quant not in GEMV_QUANT_MODES:
        raise ValueError(f"fp8_linear: quant={quant!r} is not one of {GEMV_QUANT_MODES}")
    m, k = x2.shape
    return jax.ffi.ffi_call(
        "dsv4_fp8_linear" + ("" if quant is None else "_" + quant),
        (
            jax.ShapeDtypeStruct((m, w.shape[0]), BF16),
            jax.ShapeDtypeStruct((m, k), E4M3),
            jax.ShapeDtypeStruct((k // 128, _round_up(max(m, 1), 4)), F32),
        ),
    )(x2.astype(BF16), w, sm90_weight_scales(s))


def grouped_gemm_contig(a, sfa, w, sw, psum, block_m: int) -> jax.Array:
    """m-grouped contiguous GEMM with the prefix-sum layout. `a` e4m3 `[Mp, K]` where group g owns rows
    `[align(psum[g-1], block_m), psum[g])`; `sfa` f32 with `K/128 * Mp` elements (MN-major); `w` e4m3 `[G, N, K]`;
    `sw` f32 `[G, N/128, K/128]`; `psum` int32 `[G]`. Returns bf16 `[Mp, N]` (rows outside the groups: garbage)."""
    mp = a.shape[0]
    n = w.shape[1]
    return jax.ffi.ffi_call("dsv4_fp8_gemm_contig", jax.ShapeDtypeStruct((mp, n), BF16))(
        a, sfa, w, sm90_weight_scales(sw), psum.astype(jnp.int32), block_m=np.int64(block_m)
    )


def grouped_gemm_masked(a, sfa, w, sw, masked_m, block_m: int = 64) -> jax.Array:
    """m-grouped masked GEMM: `a` e4m3 `[G, M_max, K]`, `sfa` f32 `[G, K/128, M_max]`, `masked_m` int32 `[G]` (valid
    rows per group, on device). Returns bf16 `[G, M_max, N]`; rows past `masked_m[g]` are garbage."""
    g, mm, _ = a.shape
    n = w.shape[1]
    return jax.ffi.ffi_call("dsv4_fp8_gemm_masked", jax.ShapeDtypeStruct((g, mm, n), BF16))(
        a, sfa, w, sm90_weight_scales(sw), masked_m.astype(jnp.int32), block_m=np.int64(block_m)
    )


def _gemv_maps(name: str, a, w, rows, groups):
    """Output row count and the int32 row/group maps (empty when absent) of a GEMV call."""
    if w.ndim == 3 and groups is None:
        raise ValueError(f"{name}: a grouped weight [G, N, K] needs `groups` (the group of every output row)")
    p = a.shape[0] if rows is None and groups is None else (rows if rows is not None else groups).shape[0]
    empty = jnp.zeros((0,), jnp.int32)
    rows = empty if rows is None else rows.astype(jnp.int32)
    groups = empty if groups is None else groups.astype(jnp.int32)
    return p, rows, groups


def fp8_gemv(a, sfa, w, sw, *, rows=None, groups=None) -> jax.Array:
    """Small-M FP8 GEMM for decode on the tensor cores (`DSV4_FFI_GEMV=cuda`: the CUDA-core loop). `a` e4m3
    `[R, K]` with scales `sfa` f32 `[..., K/128, pitch >= R]` (the layout `act_quant_rows`/`swiglu_quant` produce);
    `w` e4m3 `[N, K]` or `[G, N, K]` with f32 (or UE8M0) scales `[(G,) N/128, K/128]`. Output row p is activation
    row `rows[p]` (default p) times weight group `groups[p]` (required for 3-D `w`); rows whose index or group is
    out of range are zeros. Returns bf16 `[P, N]`."""
    p, rows, groups = _gemv_maps("fp8_gemv", a, w, rows, groups)
    return jax.ffi.ffi_call("dsv4_fp8_gemv", jax.ShapeDtypeStruct((p, w.shape[-2]), BF16))(
        a, sfa, w, sm90_weight_scales(sw), rows, groups
    )


# Rows `fp8_gemv_layer` takes (the extension's kGemvLayerMaxM).
GEMV_LAYER_MAX_M = 64
# How `fp8_gemv_layer` runs 9..64 rows. "gemm": quantised once, then DeepGEMM's m-grouped contiguous GEMM reading the
# layer of the stack in place (the extension's layer GEMMs: every row's group the layer, BLOCK_M 64); "wide":
# quantised once, then our GEMV in passes of 16 or 32 rows; "passes": the fused one-launch GEMV in passes of 8 rows,
# each re-quantising its rows per weight tile. Default: "gemm" from LAYER_GEMM_MIN_ROWS rows where every weight of the
# call has its instantiation, else "wide" (one H200: at 32 rows DeepGEMM is faster on every Flash shape, at 16 on the
# large ones only; BENCHMARKS.md, seventeenth session). `DSV4_FFI_GEMV_LAYER` (read when the program is traced) fixes
# one; up to 8 rows always take the fused GEMV.
GEMV_LAYER_ROUTES = ("gemm", "wide", "passes")
LAYER_GEMM_BLOCK_M = 64  # the extension's kLayerGemmBlockM: one row block, the rows' group map this long
LAYER_GEMM_MIN_ROWS = 17


def layer_gemm_instantiated(n: int, k: int) -> bool:
    """Whether the extension has the layer GEMM (any stack of `[n, k]` layers)."""
    return instantiated("layer", n, k, 1, LAYER_GEMM_BLOCK_M)


def gemv_layer_route(rows: int, weights=()) -> str:
    """The route `fp8_gemv_layer` takes for `rows` rows against the stacks `weights` ((w, s), ...): "fused" up to
    GEMV_MAX_M, else one of GEMV_LAYER_ROUTES."""
    if rows <= GEMV_MAX_M:
        return "fused"
    v = os.environ.get("DSV4_FFI_GEMV_LAYER")
    if v is not None and v not in GEMV_LAYER_ROUTES:
        raise ValueError(f"DSV4_FFI_GEMV_LAYER={v!r} is not one of {GEMV_LAYER_ROUTES}")
    if v is not None:
        return v
    gemm = rows >= LAYER_GEMM_MIN_ROWS and all(layer_gemm_instantiated(*w.shape[-2:]) for w, _ in weights)
    return "gemm" if gemm and weights else "wide"


def _gemv_layer_call(target: str, x: jax.Array, weights, layer) -> tuple:
    """The outputs `[R, N]` of `target` (`dsv4_fp8_gemv_layer` or its pair) for bf16 rows x against the layer stacks
    `weights` ((w, s), ...), by the route `gemv_layer_route` picks (the workspaces select it)."""
    r, k = x.shape
    if r > GEMV_LAYER_MAX_M:
        raise ValueError(f"{target[5:]}: {r} rows, at most {GEMV_LAYER_MAX_M}")
    for w, _ in weights:
        if w.ndim != 3 or w.shape[0] != weights[0][0].shape[0] or w.shape[-1] != k:
            raise ValueError(f"{target[5:]}: weights {[w.shape for w, _ in weights]} for rows {x.shape}: each must be "
                             "an [L, N, K] stack of one L and the rows' K")  # fmt: skip
    route = gemv_layer_route(r, weights)
    per_pass = {"fused": GEMV_MAX_M, "passes": GEMV_MAX_M, "wide": 16 if r <= 16 else 32, "gemm": r}[route]
    passes = -(-r // per_pass)
    layer = jnp.broadcast_to(_layer_operand(layer), (passes,))
    quantised = route in ("wide", "gemm")
    outs = jax.ffi.ffi_call(
        target,
        (
            *(jax.ShapeDtypeStruct((r, w.shape[-2]), BF16) for w, _ in weights),
            jax.ShapeDtypeStruct((r, k) if quantised else (0,), E4M3),  # empty selects the fused GEMV
            jax.ShapeDtypeStruct((k // 128, _round_up(r, 4)) if quantised else (0,), F32),
            jax.ShapeDtypeStruct((LAYER_GEMM_BLOCK_M,) if route == "gemm" else (0,), jnp.int32),  # the rows' groups
        ),
    )(x.astype(BF16), *(a for w, s in weights for a in (w, sm90_weight_scales(s))), layer)
    return tuple(outs[: len(weights)])


def fp8_gemv_layer(x: jax.Array, w: jax.Array, s: jax.Array, layer) -> jax.Array:
    """bf16 `[R, K]` (R <= 64) x layer `layer` (an int32 scalar, read on the device) of an FP8 weight stack e4m3
    `[L, N, K]` with f32 (or UE8M0) scales `[L, N/128, K/128]` -> bf16 `[R, N]`, quant_sim numerics, bit-identical to
    `act_quant_rows` then `fp8_gemv`. Up to 8 rows: one launch, the rows quantised inside the GEMV. More rows
    (`gemv_layer_route`): "gemm", our quantisation kernel into a workspace, then DeepGEMM's GEMM on the layer in place
    (bit-identical to `fp8_linear` on the layer's slice instead); "wide", the same quantisation, then one pass of our
    GEMV per 32 rows (16 when R <= 16); "passes", the one-launch GEMV in passes of 8 rows. The layer index is passed
    once per pass."""
    return _gemv_layer_call("dsv4_fp8_gemv_layer", x, ((w, s),), layer)[0]


def fp8_gemv_layer_pair(x: jax.Array, w1: jax.Array, s1: jax.Array, w2: jax.Array, s2: jax.Array, layer):
    """`(fp8_gemv_layer(x, w1, s1, layer), fp8_gemv_layer(x, w2, s2, layer))` in one launch (and one quantisation of
    the rows on the wide route), bit-identical to the two calls: two FP8 stacks `[L, N1, K]` and `[L, N2, K]` with
    their scales. At batch 1 a small layer GEMV costs its launch's latency (~4.4 us on an H200), not its bytes: the
    weights one input feeds share one."""
    return _gemv_layer_call("dsv4_fp8_gemv_layer_pair", x, ((w1, s1), (w2, s2)), layer)


def fp8_gemv_pair(a, sfa, w1, s1, w3, s3, *, rows=None, groups=None) -> tuple[jax.Array, jax.Array]:
    """`(fp8_gemv(a, sfa, w1, s1, ...), fp8_gemv(a, sfa, w3, s3, ...))` in one launch, bit-identical to the two
    calls: the gate and up projections of the routed experts at decode sizes read twice the weight bytes per launch,
    so one launch gap less per layer. `w1` and `w3` (and their scales) must have the same shape."""
    if w1.shape != w3.shape or s1.shape != s3.shape:
        raise ValueError(f"fp8_gemv_pair: weights differ in shape: {w1.shape}/{s1.shape} vs {w3.shape}/{s3.shape}")
    p, rows, groups = _gemv_maps("fp8_gemv_pair", a, w1, rows, groups)
    out = jax.ShapeDtypeStruct((p, w1.shape[-2]), BF16)
    g, u = jax.ffi.ffi_call("dsv4_fp8_gemv_pair", (out, out))(
        a, sfa, w1, sm90_weight_scales(s1), w3, sm90_weight_scales(s3), rows, groups
    )
    return g, u


# The attention side's wrappers live in ffi_attention and the MXFP4 ones in ffi_fp4 (imported last: they use this
# module's helpers); re-exported here, the one namespace of the extension's wrappers.
from dsv4_jax.kernels.ffi_attention import (  # noqa: E402
    INDEXER_VARIANTS,
    TOPK_MAX_K,
    compressor_decode,
    hc_pre,
    hc_split_sinkhorn,
    indexer_scores,
    indexer_topk,
    kv_row,
    q_heads,
    sparse_mla_decode,
)
from dsv4_jax.kernels.ffi_fp4 import (  # noqa: E402
    FP4_SEGMENT_ROWS,
    FP4_VARIANTS,
    fp4_gemv,
    fp4_grouped,
    fp4_moe_down,
    fp4_moe_gate_up,
    fp4_widen,
)
