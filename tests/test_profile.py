"""`dsv4_jax.profile` on the CPU (the backend's thunks stand in for GPU kernels): kernel time is split by the model
part whose named scope launched each kernel, and every listed kernel names the op path it came from."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax import profile


def test_breakdown_names_each_kernel_part_and_op():
    def f(x):
        with jax.named_scope("attention"):
            y = jax.lax.optimization_barrier(jnp.dot(jnp.sin(x), x))  # two kernels, not one CPU fusion
        with jax.named_scope("router"):
            return jnp.tanh(y).sum(-1)

    x = jnp.ones((256, 256), jnp.float32)
    compiled = jax.jit(f).lower(x).compile()
    compiled(x).block_until_ready()

    def run():
        for _ in range(3):
            out = compiled(x)
        out.block_until_ready()

    br = profile._breakdown(compiled.as_text(), run, 3, 50)
    assert br["kernels_per_step"] > 0 and br["kernel_ms"] > 0, br
    assert {"attention", "router"} <= set(br["by_part"]), br["by_part"]
    for part, name, launches, ms, op in br["top_kernels"]:
        assert launches > 0 and ms >= 0, (part, name)
        if part in ("attention", "router"):  # the op path, its jit prefix dropped
            assert op.startswith(f"{part}/") and "jit(" not in op, (part, name, op)
    assert profile._short_op("jit(_decode)/while/body/eval_jaxpr/attention/concatenate") == "attention/concatenate"
    assert profile._short_op(None) == ""
