"""The cost of the reference MoE as the expert count grows (issue target: 256 experts <= 1.5x the time of 8): a
`forward` of `Config.tiny(n_routed_experts=E)` on tokens `[1, 128]`, best of 3 after compiling, backend "reference".

    JAX_PLATFORMS=cpu python benchmarks/bench_moe_reference.py
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np

import dsv4_jax


def best_forward_s(n_experts: int, repeats: int = 3) -> float:
    cfg = dsv4_jax.Config.tiny(n_routed_experts=n_experts)
    state = dsv4_jax.init_random(cfg, 0)
    tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, (1, 128)).astype(np.int32)
    opts = dsv4_jax.Opts(backend="reference")
    dsv4_jax.forward(state, tokens, opts=opts).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dsv4_jax.forward(state, tokens, opts=opts).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    times = {e: best_forward_s(e) for e in (8, 256)}
    print(
        json.dumps(
            {"device": jax.devices()[0].device_kind, "forward_s": times, "ratio_256_vs_8": times[256] / times[8]}
        )
    )


if __name__ == "__main__":
    main()
