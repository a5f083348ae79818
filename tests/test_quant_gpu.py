"""GPU tests of the reference's fake quantisations (`quant.fp8_sim`, `quant.fp4_sim`, `quant.cast_e2m1`): under jit on
the GPU, inside a fusion, they give the CPU's bits.

Why: XLA's GPU pipeline removes an f32 -> f8 -> f32 convert pair as "excess precision"; `x.astype(f8).astype(f32)`
came out as the identity on an H200, so the reference's compressor entries were not quantised at all there (found by
the compressor kernel's test). The sims decode by table lookup since; this test keeps it that way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax import quant

pytestmark = pytest.mark.gpu


def _on(device, fn, x):
    return np.asarray(jax.jit(fn)(jax.device_put(x, device)))


@pytest.mark.parametrize(
    "name, fn",
    [
        # fp32 around the sim, which it fuses with (bf16 arithmetic around it would itself keep excess precision
        # on the GPU: the first run of this test, with bf16 x * 3, differed there)
        ("fp8_sim", lambda x: quant.fp8_sim(x * 3.0, 64) + 1),
        ("fp4_sim", lambda x: quant.fp4_sim(x * 3.0, 32) + 1),
        ("cast_e2m1", lambda x: quant.cast_e2m1(jnp.clip(x * 3.0, -6, 6)) + 1),
    ],
)
def test_fake_quantisation_on_the_gpu_equals_the_cpu(name, fn):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 512)) * np.logspace(-6, 2, 512), jnp.float32)
    gpu = _on(jax.devices()[0], fn, x).astype(np.float32)
    cpu = _on(jax.devices("cpu")[0], fn, x).astype(np.float32)
    np.testing.assert_array_equal(gpu.view(np.uint32), cpu.view(np.uint32), err_msg=name)
