"""`Opts`: the static switches of every model function (`forward`, `prefill`, `decode_step`, `extend`, `generate`).

Hashable, so it is part of each jit cache key: changing a switch compiles a new program, calling again with the same
switches reuses it.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Opts", "BACKENDS", "KV_CACHES"]

BACKENDS = ("reference", "ffi", "auto")
KV_CACHES = ("auto", "fp8", "bf16")


@dataclasses.dataclass(frozen=True)
class Opts:
    """quant_sim: simulate the official in-forward quantization (FP8 activations before every FP8/FP4 GEMM, FP8 KV
      and FP4 indexer fake-quant). False gives the exact-arithmetic model that e.g. HF transformers implements.
    backend: which implementation each op runs (`dsv4_jax.ops.registry`):
      * "auto" (default): the FFI kernel where it can run (extension importable, CUDA SM90 device, shape supported,
        not killed by `DSV4_JAX_DISABLE_KERNELS`), else the pure-JAX reference: silently on CPU, with one log line
        per op and reason on a GPU;
      * "ffi": the kernel or a clear error naming the op and why it cannot run;
      * "reference": the pure-JAX reference everywhere.
    prefill_chunk: prefill prompts longer than this many tokens in chunks of it (the extend step, one compiled body
      in a loop), so that no score tensor grows with the square of the prompt (whole-prompt prefill builds the
      indexer's `[B, S, heads, S/4]` scores); None (default): the whole prompt at once. Chunked and whole prefill
      agree within the reference's reduction-order noise.
    kv_cache: the layout of the cache `generate` allocates (`dsv4_jax.init_cache(..., kv=)`): "fp8", the official
      packed layout (584 B per KV row, 68 B per indexer key; half of bf16's bytes, and lossless for the FP8/FP4-
      simulated rows quant_sim produces), or "bf16"; "auto" (default): fp8 with quant_sim, bf16 without.
    """

    quant_sim: bool = True
    backend: str = "auto"
    prefill_chunk: int | None = None
    kv_cache: str = "auto"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
        if not isinstance(self.quant_sim, bool):
            raise ValueError(f"quant_sim={self.quant_sim!r} must be a bool")
        c = self.prefill_chunk
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"prefill_chunk={c!r} must be a positive int or None")
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache={self.kv_cache!r}; expected one of {', '.join(map(repr, KV_CACHES))}")
        if self.kv_cache == "fp8" and not self.quant_sim:
            raise ValueError("kv_cache='fp8' needs quant_sim=True: the packed FP8 cache cannot hold the exact model's "
                             "KV rows (use 'bf16' or 'auto')")  # fmt: skip

    @property
    def cache_layout(self) -> str:
        """The cache layout `kv_cache` resolves to: "fp8" or "bf16"."""
        if self.kv_cache == "auto":
            return "fp8" if self.quant_sim else "bf16"
        return self.kv_cache
