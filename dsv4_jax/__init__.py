"""DeepSeek-V4 (Flash and Pro) inference in JAX.

Restore weights with `load(path)` (an Orbax or released safetensors folder) or make random ones with
`init_random(cfg)`; `forward(state, tokens)` gives fp32 logits `[B, S, V]`; `generate(state, tokens, sampler=...)`
runs prefill and a compiled decode loop. README.md has a tour.
"""

from dsv4_jax.cache import Cache, cache_bytes_per_token, init_cache
from dsv4_jax.checkpoint.restore import load
from dsv4_jax.config import Config, ConfigError
from dsv4_jax.decode import decode_step, prefill
from dsv4_jax.generation import GenerateOutput, Sampler, generate, generate_stream
from dsv4_jax.model import ModelState, Output, abstract, forward, forward_outputs, init_random
from dsv4_jax.ops import Opts

__all__ = [
    "Cache",
    "Config",
    "ConfigError",
    "GenerateOutput",
    "ModelState",
    "Opts",
    "Output",
    "Sampler",
    "abstract",
    "cache_bytes_per_token",
    "decode_step",
    "forward",
    "forward_outputs",
    "generate",
    "generate_stream",
    "init_cache",
    "init_random",
    "load",
    "prefill",
]
__version__ = "0.1.0"
