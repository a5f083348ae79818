"""DeepSeek-V4 (Flash and Pro) inference in JAX.

Restore weights with `load(path)` (an Orbax or released safetensors folder) or make random ones with
`init_random(cfg)`; `forward(state, tokens)` gives fp32 logits `[B, S, V]`; `generate(state, tokens, sampler=...)`
runs prefill and a compiled decode loop. Every model function takes `opts=Opts(...)` (numerics simulation and the
kernel backend). README.md has a tour.
"""

from dsv4_jax.cache import Cache, cache_bytes_per_token, init_cache
from dsv4_jax.checkpoint.restore import load
from dsv4_jax.config import Config, ConfigError
from dsv4_jax.generation import GenerateOutput, Sampler, generate, generate_stream
from dsv4_jax.model import ModelState, abstract, init_random
from dsv4_jax.options import Opts
from dsv4_jax.parallel import Plan, make_mesh, memory_plan
from dsv4_jax.prepare import prepare_params
from dsv4_jax.runner import (
    Capture,
    Output,
    decode_step,
    extend,
    forward,
    forward_outputs,
    mtp_decode_step,
    mtp_extend,
    mtp_prefill,
    prefill,
)

__all__ = [
    "Cache",
    "Capture",
    "Config",
    "ConfigError",
    "GenerateOutput",
    "ModelState",
    "Opts",
    "Output",
    "Plan",
    "Sampler",
    "abstract",
    "cache_bytes_per_token",
    "decode_step",
    "extend",
    "forward",
    "forward_outputs",
    "generate",
    "generate_stream",
    "init_cache",
    "init_random",
    "load",
    "make_mesh",
    "memory_plan",
    "mtp_decode_step",
    "mtp_extend",
    "mtp_prefill",
    "prefill",
    "prepare_params",
]
__version__ = "0.1.0"
