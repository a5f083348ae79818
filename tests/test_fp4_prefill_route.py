"""CPU tests of the MXFP4 experts' prefill route (`dsv4_jax.kernels.moe_fp4`): which kernels the grouped route lowers
to under DSV4_FFI_FP4_PREFILL. The one-pass kernel's compile check is in tests/test_kernel_ptxas.py, its numerics
are GPU tests (tests/test_fp4_prefill_gpu.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from dsv4_jax.layer_view import LayerSlice


def _route_text(e: int = 8, d: int = 256, i: int = 128, rows: int = 96) -> str:
    """The grouped route of `moe_fp4.routed_experts` on one layer of a 2-layer stack, lowered (no GPU needed)."""
    from dsv4_jax.kernels import moe_fp4

    u8, e8 = jnp.uint8, jnp.float8_e8m0fnu
    ws = (jax.ShapeDtypeStruct((2, e, i, d // 2), u8), jax.ShapeDtypeStruct((2, e, i, d // 32), e8),
          jax.ShapeDtypeStruct((2, e, i, d // 2), u8), jax.ShapeDtypeStruct((2, e, i, d // 32), e8),
          jax.ShapeDtypeStruct((2, e, d, i // 2), u8), jax.ShapeDtypeStruct((2, e, d, i // 32), e8))  # fmt: skip
    x = jax.ShapeDtypeStruct((rows, d), jnp.bfloat16)
    ex, gs = jax.ShapeDtypeStruct((rows,), jnp.int32), jax.ShapeDtypeStruct((e,), jnp.int32)
    rw = jax.ShapeDtypeStruct((rows,), jnp.float32)

    def f(x, ex, rw, gs, ws, layer):
        return moe_fp4.routed_experts(x, ex, rw, gs, tuple(LayerSlice(a, layer) for a in ws), limit=10.0)

    return jax.jit(f).lower(x, ex, rw, gs, ws, jnp.int32(1)).as_text()


def test_fused_prefill_route_lowers_to_one_pass_kernels(monkeypatch):
    """At prefill sizes up to `FUSED_MAX_ROWS` rows the route is the one-pass kernel: rows quantized in the wgmma
    order, gate and up in one `dsv4_fp4_grouped_pair` launch reading the stacks in place (a layer index, no slice
    copied out), the SwiGLU's requantization, down in `dsv4_fp4_grouped`; no widening and no FP8 GEMM. Beyond, the
    widen route where its DeepGEMM GEMMs exist (a built extension's AOT table; without it, as here, the one-pass
    kernel still). DSV4_FFI_FP4_PREFILL=fused|widen forces one (widen without its GEMMs: the GEMVs); other values are
    refused by name."""
    from dsv4_jax.kernels import moe_fp4

    monkeypatch.setenv("DSV4_FFI_FP4_GROUPED_MIN_ROWS", "1")
    monkeypatch.delenv("DSV4_FFI_FP4_PREFILL", raising=False)
    assert moe_fp4.prefill_kernel(moe_fp4.FUSED_MAX_ROWS) == "fused"
    assert moe_fp4.prefill_kernel(moe_fp4.FUSED_MAX_ROWS + 1) == "widen"
    for rows in (96, moe_fp4.FUSED_MAX_ROWS + 8):
        text = _route_text(rows=rows)
        assert text.count("custom_call @dsv4_fp4_grouped_pair") == 1, rows
        assert text.count("custom_call @dsv4_fp4_grouped(") == 1, rows
        assert "dsv4_fp4_widen" not in text and "dsv4_fp8_gemm" not in text and "dsv4_fp4_moe" not in text
    for target in ("dsv4_act_quant", "dsv4_swiglu_quant"):
        (line,) = [ln for ln in text.splitlines() if f"custom_call @{target}" in ln]
        assert "order = 1" in line, line
    (pair,) = [ln for ln in text.splitlines() if "custom_call @dsv4_fp4_grouped_pair" in ln]
    assert "tensor<2x8x128x128xui8>" in pair and "tensor<1xi32>" in pair, pair  # the whole stack + the layer index
    monkeypatch.setenv("DSV4_FFI_FP4_PREFILL", "fused")
    assert moe_fp4.prefill_kernel(1 << 30) == "fused"
    monkeypatch.setenv("DSV4_FFI_FP4_PREFILL", "widen")
    assert moe_fp4.prefill_kernel(96) == "widen"
    text = _route_text()  # (no AOT GEMMs here: the GEMVs)
    assert "custom_call @dsv4_fp4_grouped" not in text and "custom_call @dsv4_fp4_moe_gate_up" in text
    monkeypatch.setenv("DSV4_FFI_FP4_PREFILL", "fast")
    with pytest.raises(ValueError, match="DSV4_FFI_FP4_PREFILL='fast'"):
        moe_fp4.prefill_kernel(96)
