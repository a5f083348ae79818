#!/usr/bin/env python3
"""Emit the ahead-of-time (AOT) instantiations of the SM90 FP8 GEMM kernel template for the DeepSeek-V4 shapes.

Reads the model presets (`dsv4_jax.Config.flash()`, `.pro()`, `.tiny()`) straight from `dsv4_jax/config.py`
(loaded by path: the build environment need not have jax or flax), lists every FP8 linear (N, K) and every FP8
routed-expert grouped GEMM (N, K, G), picks a launch configuration for each (M bucket, layout) with our own port of
the SM90 block heuristics, and writes:

  <out>/gemm_<name>.cu   one translation unit per instantiation (a kernel-address table entry)
  <out>/gemm_table.cc    the table the FFI handlers search at run time
  <out>/manifest.json    the same table, for Python (which shapes are compiled)

Usage: gen_instantiations.py --out DIR [--presets flash,pro,tiny] [--limit N] [--num-sms 132]

The heuristic (our own code): BLOCK_K = 128 (one FP8 scale block); BLOCK_M from the M bucket (64 for M <= 64, else
128; grouped layouts use the layout's row alignment); BLOCK_N from 16..192 (steps of 16, restricted to the values
the 1D2D kernel's B-scale promotion supports) minimising the number of waves over the persistent grid, then
maximising the last wave's occupancy, then preferring the wider tile (less A re-reading); stages = as many as fit
in 232448 B of shared memory, at most 8. Prefill instantiations (BLOCK_M >= 128) also get a TMA-multicast variant
(`_mc2`: clusters of 2 CTAs on neighbouring M blocks share each B (weight) tile, loaded once) whose BLOCK_N is picked
among tilings with an even number of N blocks: the kernel pairs blocks (2j, 2j+1) of its persistent schedule, and an
even N-block count keeps every pair inside one expert's group (the scheduler then drops multicast itself on an odd
M tail). The host launch uses them only when `DSV4_FFI_TMA_MULTICAST=1` (opt-in; see BENCHMARKS.md), and they are
emitted only for K >= 1024 (a tiny-config forward, 1-2 K blocks, hung with them).

Layer GEMMs: every FP8 linear (N, K) also gets an m-grouped contiguous instantiation with BLOCK_M 64
(`layer_n*_k*_g1_bm64`, the layout with a group index per row): a layer of a weight stack `[L, N, K]` read in place,
the layer chosen on the device by the rows' group indices (every row in group `layer`), for 17..64 rows at decode
(`dsv4_fp8_gemv_layer`'s "gemm" route). Each block looks its group up in one load; G does not enter that layout's
schedule (the psum layout's walk over the groups cost ~4 us a call at 8 layers), and the host describes B as the
stack's real L layers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
SMEM_CAPACITY = 232448  # opt-in dynamic shared memory per block on H100/H200
MAX_STAGES = 8

KIND_NORMAL, KIND_CONTIG_PSUM, KIND_MASKED, KIND_LAYER = 0, 1, 2, 3
GEMM_TYPE = {KIND_NORMAL: "Normal", KIND_CONTIG_PSUM: "MGroupedContiguousWithPsumLayout", KIND_MASKED: "MGroupedMasked",
             KIND_LAYER: "MGroupedContiguous"}  # fmt: skip
KIND_NAME = {KIND_NORMAL: "dense", KIND_CONTIG_PSUM: "contig", KIND_MASKED: "masked", KIND_LAYER: "layer"}


def load_config_module():
    spec = importlib.util.spec_from_file_location("_dsv4_config", REPO / "dsv4_jax" / "config.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_dsv4_config"] = mod
    spec.loader.exec_module(mod)
    return mod


def fp8_linear_shapes(cfg) -> set[tuple[int, int]]:
    """(N, K) of every FP8 block-scaled linear of the model (spec §2.2)."""
    h, d = cfg.n_heads, cfg.head_dim
    g, r = cfg.o_groups, cfg.o_lora_rank
    i_sh = cfg.moe_inter_dim * cfg.n_shared_experts
    return {
        (cfg.q_lora_rank, cfg.dim),  # attn.wq_a
        (h * d, cfg.q_lora_rank),  # attn.wq_b
        (d, cfg.dim),  # attn.wkv
        (g * r, h // g * d),  # attn.wo_a (stored FP8; the reference may run it as a bf16 einsum)
        (cfg.dim, g * r),  # attn.wo_b
        (cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank),  # indexer.wq_b
        (i_sh, cfg.dim),  # shared expert w1, w3
        (cfg.dim, i_sh),  # shared expert w2
        (cfg.dim, cfg.dim),  # MTP e_proj, h_proj
    }


# Expert-parallel splits whose per-device expert count gets its own grouped GEMMs (G is a template parameter): one
# device and the 2-GPU expert axis. Add a split here for a larger `expert` mesh axis.
EXPERT_SPLITS = (1, 2)


def expert_shapes(cfg) -> set[tuple[int, int, int]]:
    """(N, K, G) of the routed experts' grouped GEMMs: FP8 experts (Config(expert_dtype='fp8')) and the MXFP4 experts'
    prefill route (widened to FP8), per expert-parallel split."""
    e, i, dim = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim
    return {(n, k, e // s) for s in EXPERT_SPLITS if e % s == 0 for n, k in ((i, dim), (dim, i))}


def _block_n_ok(bn: int) -> bool:
    # The 1D2D kernel promotes with at most two B-scale rows per N tile.
    return math.ceil(bn / 128) == 1 or math.gcd(bn, 128) == bn - 128


def swizzle_bytes(inner_bytes: int) -> int:
    for mode in (128, 64, 32):
        if inner_bytes % mode == 0:
            return mode
    return 0


def smem_bytes(bm: int, bn: int, k: int, stages: int) -> int:
    d = -(-bm * bn * 2 // 1024) * 1024
    per_stage = bm * 128 + bn * 128 + -(-bm * 4 // 128) * 128
    rows_sfb = 1 if 128 % bn == 0 else 2
    sfb = -(-(-(-k // 128) * rows_sfb * 4) // 8) * 8
    return d + stages * per_stage + sfb + stages * 2 * 8


def pick_config(kind: int, n: int, k: int, m_rep: int, bm: int, num_sms: int, multicast: int = 1) -> dict | None:
    best = None
    for bn in range(16, 193, 16):  # 1D2D: <= 192 keeps both accumulator sets in registers
        if not _block_n_ok(bn):
            continue
        if multicast > 1 and -(-n // bn) % multicast:
            continue
        if bn > max(16, -(-n // 16) * 16):
            continue
        blocks = -(-m_rep // bm) * -(-n // bn)
        waves = -(-blocks // num_sms)
        last = blocks - (waves - 1) * num_sms
        key = (waves, -last, -bn)
        if best is None or key < best[0]:
            best = (key, bn)
    if best is None:
        return None
    bn = best[1]
    stages = 0
    for s in range(MAX_STAGES, 1, -1):
        if smem_bytes(bm, bn, k, s) <= SMEM_CAPACITY:
            stages = s
            break
    if stages < 2:
        raise ValueError(f"no stage count fits for bm={bm} bn={bn} k={k}")
    return {
        "block_m": bm,
        "block_n": bn,
        "stages": stages,
        "swizzle_d": swizzle_bytes(bn * 2),
        "math_threads": 128 if bm <= 64 else 256,
        "tma_threads": 128,
        "smem": smem_bytes(bm, bn, k, stages),
        "multicast": multicast,
    }


def plan(presets: list[str], num_sms: int) -> list[dict]:
    cfgmod = load_config_module()
    Config = cfgmod.Config
    entries: dict[tuple, dict] = {}

    def add(kind, n, k, g, bm, m_rep, preset):
        # Multicast variants only with >= 8 K blocks: a tiny-config forward (1-2 K blocks, fewer than the pipeline's
        # stages) hung with them on an H100; the Flash/Pro shapes passed every test.
        for mc in (1, 2) if bm >= 128 and k // 128 >= 8 else (1,):
            cfg_d = pick_config(kind, n, k, m_rep, bm, num_sms, multicast=mc)
            if cfg_d is None:
                continue
            key = (kind, n, k, g, bm, mc)
            entries.setdefault(key, {"presets": set()})["presets"].add(preset)
            entries[key].update(kind=kind, n=n, k=k, g=g, **cfg_d)

    for p in presets:
        cfg = getattr(Config, p)()
        for n, k in sorted(fp8_linear_shapes(cfg)):
            # Bucket "small M" (M <= 64) and "large M" (prefill; represented by M = 4096). M <= 8 runs the GEMV.
            for bm, m_rep in ((64, 64), (128, 4096)):
                add(KIND_NORMAL, n, k, 1, bm, m_rep, p)
            add(KIND_LAYER, n, k, 1, 64, 64, p)  # a stack's layer in place: every row's group is the layer
        for n, k, g in sorted(expert_shapes(cfg)):
            # Contiguous (psum) layout: rows of each expert start on a BLOCK_M boundary; 64 for small batches.
            for bm, m_rep in ((64, 64), (128, 8192 * cfg.n_activated_experts // g)):
                add(KIND_CONTIG_PSUM, n, k, g, bm, max(m_rep, bm) * g, p)
            add(KIND_MASKED, n, k, g, 64, 64 * g, p)
    out = []
    for key in sorted(entries):
        e = entries[key]
        e["presets"] = sorted(e["presets"])
        e["num_sms"] = num_sms
        mc = "_mc2" if e["multicast"] == 2 else ""
        e["name"] = f"{KIND_NAME[e['kind']]}_n{e['n']}_k{e['k']}_g{e['g']}_bm{e['block_m']}{mc}"
        out.append(e)
    return out


TU = """// Generated by ffi/gen/gen_instantiations.py; do not edit. One AOT instantiation of the SM90 FP8 1D2D GEMM.
#include <deep_gemm/impls/sm90_fp8_gemm_1d2d.cuh>
#include "gemm_entry.h"

namespace dsv4ffi {{
extern const GemmEntry gemm_{name};
const GemmEntry gemm_{name} = {{
    {kind}, {n}u, {k}u, {g}u, {block_m}u, {block_n}u, {stages}u, {math_threads}u, {tma_threads}u, {swizzle_d}u,
    {smem}u, {num_sms}u, {multicast}u, "{name}",
    reinterpret_cast<const void*>(&deep_gemm::sm90_fp8_gemm_1d2d_impl<
        cute::UMMA::Major::K, 0u, {n}u, {k}u, {g}u, {block_m}u, {block_n}u, 128u, 128u, 128u, {swizzle_d}u,
        {stages}u, {tma_threads}u, {math_threads}u, {multicast}u, false, {num_sms}u, deep_gemm::GemmType::{gemm_type},
        cutlass::bfloat16_t, 128u>)}};
}}  // namespace dsv4ffi
"""


def write(out_dir: pathlib.Path, entries: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for e in entries:
        text = TU.format(gemm_type=GEMM_TYPE[e["kind"]], **e)
        path = out_dir / f"gemm_{e['name']}.cu"
        if not path.exists() or path.read_text() != text:  # keep mtimes: no needless recompiles
            path.write_text(text)
        names.append(e["name"])
    table = [
        "// Generated by ffi/gen/gen_instantiations.py; do not edit.",
        '#include "gemm_entry.h"',
        "",
        "namespace dsv4ffi {",
    ]
    table += [f"extern const GemmEntry gemm_{n};" for n in names]
    table += ["", "const GemmEntry* const kGemmTable[] = {"]
    table += [f"    &gemm_{n}," for n in names] + [
        "    nullptr,",
        "};",
        f"const int kGemmTableSize = {len(names)};",
        "}  // namespace dsv4ffi",
        "",
    ]
    text = "\n".join(table)
    p = out_dir / "gemm_table.cc"
    if not p.exists() or p.read_text() != text:
        p.write_text(text)
    (out_dir / "manifest.json").write_text(json.dumps(entries, indent=1))
    (out_dir / "sources.txt").write_text("".join(f"gemm_{n}.cu\n" for n in names))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=pathlib.Path)
    ap.add_argument("--presets", default="flash,pro,tiny")
    ap.add_argument("--num-sms", type=int, default=132)
    ap.add_argument("--limit", type=int, default=0, help="emit only the first N instantiations (CI compile smoke)")
    ap.add_argument("--print", action="store_true", help="print the plan")
    a = ap.parse_args(argv)
    entries = plan([p for p in a.presets.split(",") if p], a.num_sms)
    if a.limit:
        entries = entries[: a.limit]
    if a.print:
        for e in entries:
            print(f"{e['name']:44s} bn={e['block_n']:3d} stages={e['stages']} smem={e['smem']} {e['presets']}")
    write(a.out, entries)
    print(f"{len(entries)} instantiations -> {a.out}")


if __name__ == "__main__":
    main()
