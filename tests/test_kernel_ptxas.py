"""Our CUDA kernel files compiled for sm_90a one by one (no DeepGEMM needed): ptxas reports no local-memory spills
for any kernel (a spill in a weight stream costs bandwidth), register counts within each kernel's occupancy target,
and no wgmma serialization where that is asserted. Each file's object and ptxas log are test_kernels_switch's
(`kernel_object`: one compile per file for both tests, cached by content)."""

from __future__ import annotations

import shutil

import pytest
from test_kernels_switch import kernel_object


def _ptxas_log(source: str) -> str:
    """The `ptxas -v` report of one kernel file compiled for sm_90a (once per content of it and the headers)."""
    return kernel_object(source).with_suffix(".log").read_text()


def _ptxas_entries(log: str):
    """(mangled name, registers) of every entry function in a `ptxas -v` log, asserting that none spills."""
    import re

    for entry in re.split(r"Compiling entry function '", log)[1:]:
        name = entry.split("'", 1)[0]
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", entry)
        regs = re.findall(r"Used (\d+) registers", entry)
        assert spills and regs, f"no ptxas report for {name}:\n{entry[:2000]}"
        assert all(a == "0" and b == "0" for a, b in spills), f"ptxas reports spills for {name}:\n{entry[:2000]}"
        yield name, int(regs[0])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the CUDA extension cannot be compiled here")
def test_fp4_gemv_kernels_compile_for_sm90a_without_spills():
    """The MXFP4 decode kernels (the fused gate/up + SwiGLU and the plain GEMV/down projection of every variant:
    fp4_gemv_kernels.cu's ring kernels (one- and eight-token passes, table and bit-placement conversions),
    fp4_wg_kernels.cu's wgmma kernels (f16 "wg" and FP8 "wg8", 1/2/4/8 tokens per pass), fp4_wgb_kernels.cu's "wgb"
    kernels (bit-placement and table conversions, stored and slab layouts)) compile for sm_90a, and ptxas reports no
    local-memory spills for
    any of them (a spill in the weight stream costs bandwidth), within the register budgets of their occupancy
    targets: ring and wgb <= 128 (two blocks of 256 threads per SM), wg <= 168 (three blocks of 128 threads). No
    DeepGEMM needed."""
    kinds = {"fp4_wgb_kernel": "wgb", "fp4_wg_kernel": "wg", "fp4_gemv_kernel": "ring"}
    for source, want in (
        ("fp4_gemv_kernels", {"ring": 8}),
        ("fp4_wg_kernels", {"wg": 16}),
        ("fp4_wgb_kernels", {"wgb": 8}),
    ):
        log = _ptxas_log(source + ".cu")
        found = {}
        for name, regs in _ptxas_entries(log):
            kind = next((v for key, v in kinds.items() if key in name), None)
            if kind is None:
                continue
            limit = 168 if kind == "wg" else 128
            assert regs <= limit, f"{name} uses {regs} registers (> {limit}: below its occupancy target)"
            found[kind] = found.get(kind, 0) + 1
        assert found == want, f"{source}: expected instantiations {want}, found {found}:\n{log[-3000:]}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the CUDA extension cannot be compiled here")
def test_fp4_widen_kernel_compiles_for_sm90a_without_spills():
    """The MXFP4 -> FP8 widening of the experts' prefill route (fp4_widen_kernels.cu: one and four tiles per block)
    compiles for sm_90a without spills, within 85 registers (three blocks of 256 threads per SM)."""
    log = _ptxas_log("fp4_widen_kernels.cu")
    regs = [r for name, r in _ptxas_entries(log) if "fp4_widen_kernel" in name]
    assert len(regs) == 2 and max(regs) <= 85, (regs, log[-2000:])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the CUDA extension cannot be compiled here")
def test_fp8_gemv_mma_kernels_compile_for_sm90a_without_spills():
    """The tensor-core FP8 GEMV (gemv_kernels.cu), plain and with the fused activation quantisation of the dense
    fp8_linear at decode, for 1, 2, 4 and 8 tokens per pass: no local-memory spills (the fused kernel at 8 tokens once
    spilt), and <= 128 registers (two blocks of 256 threads per SM, as the plain kernel has); the wide kernels (16
    and 32 tokens per pass, one block per SM) without spills either."""
    import re

    log = _ptxas_log("gemv_kernels.cu")
    found, wide = set(), set()
    for name, regs in _ptxas_entries(log):
        if m := re.search(r"gemv_mma_wide_kernelILi(\d)E", name):
            wide.add(8 * int(m.group(1)))
        m = re.search(r"gemv_mma_kernelILi(\d)ELb([01])E", name)
        if m is None:
            continue
        assert regs <= 128, f"{name} uses {regs} registers (> 128: one block per SM fewer)"
        found.add((int(m.group(1)), m.group(2) == "1"))
    assert found == {(tb, fused) for tb in (1, 2, 4, 8) for fused in (False, True)}, f"{found}:\n{log[-3000:]}"
    assert wide == {16, 32}, f"{wide}:\n{log[-3000:]}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the CUDA extension cannot be compiled here")
def test_dequant_gemv_kernels_compile_for_sm90a_without_spills():
    """The grouped `wo_a` kernels (dequant_gemv_kernels.cu): the tensor-core kernel for 8, 16 and 32 tokens per pass
    and the CUDA-core one for 1..8 rows compile for sm_90a with no spills; the one-tile tensor-core kernel (one
    token: the decode step at batch 1) within 128 registers (two blocks of 256 threads per SM)."""
    import re

    log = _ptxas_log("dequant_gemv_kernels.cu")
    mma, cuda = {}, set()
    for name, regs in _ptxas_entries(log):
        if m := re.search(r"dequant_bf16_mma_kernelILi(\d)E", name):
            mma[int(m.group(1))] = regs
        elif m := re.search(r"dequant_bf16_gemv_kernelILi(\d)E", name):
            cuda.add(int(m.group(1)))
    assert set(mma) == {1, 2, 4} and cuda == set(range(1, 9)), f"{mma} {cuda}:\n{log[-3000:]}"
    assert mma[1] <= 128, mma


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the CUDA extension cannot be compiled here")
def test_indexer_score_kernels_compile_without_spills():
    """The indexer's score kernels (indexer_kernels.cu: mma.sync, and wgmma m64n64k16 with the keys in registers)
    compile for sm_90a within two blocks of 256 threads per SM (<= 128 registers), with no spills, and ptxas keeps
    the wgmma steps asynchronous (it warns when it has to serialise them)."""
    log = _ptxas_log("indexer_kernels.cu")
    entries = {("wg" if "wg_kernel" in name else "mma"): regs for name, regs in _ptxas_entries(log)}
    assert set(entries) == {"wg", "mma"} and max(entries.values()) <= 128, f"{entries}:\n{log[-2000:]}"
    assert "serialized" not in log, log[-2000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the CUDA extension cannot be compiled here")
def test_fp4_grouped_kernel_compiles_for_sm90a_without_spills():
    """The one-pass prefill kernel (two 64-row wgmma tiles x 128 columns: the accumulator and the chunk's partial sums
    in registers) compiles for sm_90a without local-memory spills, within the 255 registers of one block of 256
    threads per SM, and without ptxas serializing its wgmmas for lack of registers (which it did with the weights in
    registers and with a second, 64-column wgmma shape on the same partial sums)."""
    log = _ptxas_log("fp4_grouped_kernels.cu")
    regs = [r for name, r in _ptxas_entries(log) if "fp4_grouped_kernel" in name]
    assert len(regs) == 1 and regs[0] <= 255, (regs, log[-2000:])
    assert "serialized" not in log, log[-2000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the CUDA extension cannot be compiled here")
def test_sparse_mla_wgmma_kernel_compiles_for_sm90a_without_spills():
    """The wgmma sparse-MLA decode kernel in both forms compiles for sm_90a without spills and without ptxas
    serializing its wgmmas: two warpgroups (each holds 64 heads x 256 dims of O, 128 fp32 registers a thread, within
    one block of 256 threads per SM) and four (128 dims each, within the 128 registers of 512 threads; the
    descriptors hoisted out of the tile loop had made it spill)."""
    log = _ptxas_log("sparse_mla_wgmma_kernels.cu")
    regs = {("4" if "ILi4E" in name else "2"): r for name, r in _ptxas_entries(log) if "decode_wgmma_kernel" in name}
    assert set(regs) == {"2", "4"} and regs["2"] <= 255 and regs["4"] <= 128, (regs, log[-2000:])
    assert "serialized" not in log and "Performance" not in log, log[-2000:]
