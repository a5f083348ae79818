"""DeepSeek-V4 (Flash and Pro) inference in JAX.

import dsv4_jax
cfg = dsv4_jax.Config.tiny()
state = dsv4_jax.init_random(cfg, 0)
logits = dsv4_jax.forward(state, tokens)          # [B, S, V] fp32
"""

from dsv4_jax.checkpoint.restore import load
from dsv4_jax.config import Config, ConfigError
from dsv4_jax.model import ModelState, Output, abstract, forward, forward_outputs, init_random
from dsv4_jax.ops import Opts

__all__ = ["Config", "ConfigError", "ModelState", "Output", "Opts", "abstract", "forward", "forward_outputs",
           "init_random", "load"]  # fmt: skip
__version__ = "0.1.0"
