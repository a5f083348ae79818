"""Helper of tests/test_kernels_gpu.py::test_commands_buffers_capture_the_kernels (run in a subprocess, since
XLA_FLAGS only apply at backend start-up). Runs one jitted step holding every kind of dsv4 FFI call three times and
prints, as the last line, JSON: whether the executable holding the dsv4 custom calls runs them in a command buffer
(its dumped thunk sequence), a digest of each output, and whether the replays agree."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile

dump = tempfile.mkdtemp(prefix="dsv4_cmdbuf_")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_as_text"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsv4_jax import quant  # noqa: E402
from dsv4_jax.kernels import ffi_ops, moe_fp8  # noqa: E402
from dsv4_jax.moe import dispatch  # noqa: E402


def main() -> None:
    mod, why = ffi_ops.load()
    assert mod is not None, why
    ks = jax.random.split(jax.random.key(0), 8)
    e, n, k, top = 8, 128, 256, 2  # tiny-config shapes (AOT-instantiated for G=8): small and quick to compile
    w_dense, s_dense = quant.quantize_fp8_weight(jax.random.normal(ks[0], (n, k)) * k**-0.5)
    experts = []
    for i, shape in enumerate(((e, n, k), (e, n, k), (e, k, n))):
        w, s = quant.quantize_fp8_weight(jax.random.normal(ks[1 + i], shape) * shape[-1] ** -0.5)
        experts += [w, ffi_ops.sm90_weight_scales(s)]
    x_small = jax.random.normal(ks[4], (4, k)).astype(jnp.bfloat16)
    x_big = jax.random.normal(ks[5], (300, k)).astype(jnp.bfloat16)
    route_small = jax.random.uniform(ks[6], (4, e))
    route_big = jax.random.uniform(ks[7], (300, e))

    def experts_of(x, route, experts):
        w, idx = jax.lax.top_k(route, top)
        rows, lay = dispatch(x, idx.astype(jnp.int32), w, e)
        return moe_fp8.routed_experts(rows, lay.expert, lay.weight, lay.group_sizes, experts, 10.0)

    @jax.jit
    def step(xs, xb, rs, rb, wd, sd, experts):
        return (
            ffi_ops.fp8_linear(xs, wd, sd),  # GEMV
            ffi_ops.fp8_linear(xb, wd, sd),  # tensor-core GEMM
            experts_of(xs, rs, experts),  # per-row GEMV path
            experts_of(xb, rb, experts),  # contiguous grouped GEMMs
        )

    args = (x_small, x_big, route_small, route_big, w_dense, s_dense, tuple(experts))
    print("inputs ready", flush=True)
    runs = []
    for i in range(3):
        runs.append([np.asarray(o) for o in step(*args)])
        print(f"run {i} done", flush=True)
    digests = [hashlib.sha256(o.tobytes()).hexdigest()[:16] for o in runs[0]]
    agree = all(all(np.array_equal(a, b) for a, b in zip(runs[0], r, strict=True)) for r in runs[1:])
    # XLA (jaxlib 0.11) forms command buffers on the thunk sequence: the module holding our custom calls must show a
    # kCommandBuffer thunk after its thunk passes (stream mode: none).
    captured, seq_head = False, ""
    for hlo in sorted(pathlib.Path(dump).rglob("*after_optimizations.txt")):
        if 'custom_call_target="dsv4_' not in hlo.read_text(errors="replace"):
            continue
        seq = hlo.with_name(hlo.name.split(".sm_")[0] + ".thunk_sequence_after_thunk_passes.txt")
        if seq.exists():
            text = seq.read_text(errors="replace")
            seq_head = text[:400]
            captured = captured or "kCommandBuffer" in text
    print(json.dumps(dict(captured=captured, digests=digests, replays_agree=agree, thunk_sequence_head=seq_head)))


if __name__ == "__main__":
    main()
