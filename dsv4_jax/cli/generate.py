"""`dsv4-jax generate`: the main job. Until the cache/generate path lands this runs the tiny model's forward pass on
the prompt and prints the next-token distribution and timing."""

from __future__ import annotations

import time

import jax
import numpy as np


def add_parser(sub):
    p = sub.add_parser("generate", help="run the model on a prompt")
    p.add_argument("--prompt", default="Hello, DeepSeek-V4!", help="text prompt (byte-level for the tiny model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=5, help="how many next-token candidates to print")
    p.set_defaults(run=run)


def run(args) -> int:
    import dsv4_jax

    if not args.prompt:
        raise ValueError("--prompt is empty")
    cfg = dsv4_jax.Config.tiny()
    state = dsv4_jax.init_random(cfg, args.seed)
    tokens = np.frombuffer(args.prompt.encode(), np.uint8).astype(np.int32)[None] % cfg.vocab_size
    t0 = time.perf_counter()
    logits = jax.block_until_ready(dsv4_jax.forward(state, tokens))
    t1 = time.perf_counter()
    logits = jax.block_until_ready(dsv4_jax.forward(state, tokens))
    t2 = time.perf_counter()
    p = np.asarray(jax.nn.softmax(logits[0, -1]))
    order = np.argsort(-p)[: args.top]
    print(f"prompt: {args.prompt!r} ({tokens.shape[1]} tokens), tiny random model (seed {args.seed})")
    for t in order:
        print(f"  token {t:4d} {bytes([t]) if t < 256 else b'?'!r:>8}  p={p[t]:.4f}")
    print(
        f"first call (compile + run) {t1 - t0:.2f} s, forward {t2 - t1:.3f} s ({tokens.shape[1] / (t2 - t1):.0f} tok/s)"
    )
    return 0
