# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # dsv4-jax at full size: V4-Flash on 2 x H200
#
# DeepSeek-V4-Flash is 284 B parameters, 160 GB in its released formats (MXFP4 routed experts, FP8 linears). One
# H200 holds 140 GiB, so the routed experts are split over two GPUs (expert parallelism) and the rest is either
# replicated or split the same way. This notebook
#
# 1. plans the memory of one GPU before anything is allocated,
# 2. places random weights straight into their shardings (each GPU draws only its own shards),
# 3. generates from a prompt,
# 4. times decode steps.
#
# `SIZE = "flash"` runs the real thing on 2 x H200. `SIZE = "tiny"` (the default, and what CI runs) runs the same
# code on the tiny model over 8 simulated CPU devices.

# %% tags=["parameters"]
import os

SIZE = os.environ.get("DSV4_NOTEBOOK_SIZE", "tiny")  # "tiny" (8 simulated CPU devices) or "flash" (2 x H200)

# %% [markdown]
# JAX reads its device settings once, when it starts, so they are set before the first `import jax`. On GPUs its
# memory pool is 75 % of the device by default; the full model needs 95 %.

# %%
# ruff: noqa: E402 (these settings must come before `import jax`)
if SIZE == "tiny":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
else:
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    os.environ.setdefault("XLA_CLIENT_MEM_FRACTION", "0.95")

import time

import jax
import matplotlib.pyplot as plt
import numpy as np

import dsv4_jax
from dsv4_jax.parallel import describe_mesh, make_mesh, memory_plan
from dsv4_jax.parallel.plan import GiB
from dsv4_jax.sharding import rules_preset
from dsv4_jax.tokenizer import ByteTokenizer

cfg = {"tiny": dsv4_jax.Config.tiny(), "flash": dsv4_jax.Config.flash()}[SIZE]
N_DEVICES = {"tiny": 8, "flash": 2}[SIZE]
RULES = "ep"  # routed experts split over the devices, everything else replicated ("ep-tp": heads split too)
print(jax.device_count(), "devices:", jax.devices()[0].device_kind)

# %% [markdown]
# ## 1. The memory plan
#
# `memory_plan` takes the model's abstract parameters (shapes, dtypes, logical axes), places them on a mesh of the
# given shape exactly as `init_random` and `load` will, and adds the cache of `batch` rows of `context` tokens and
# an estimate of the largest temporaries of a step. Capacity is the longest context at batch 1 and the largest batch
# at the given context that fit. The same plan is printed by `dsv4-jax info --preset flash --mesh expert=2`.

# %%
plan = memory_plan(cfg, {"expert": N_DEVICES}, rules_preset(RULES), batch=1, context=4096)
print(plan.summary())

# %% [markdown]
# For the full model, both rule presets side by side, and what a chunked prefill (4096 tokens per step through
# `extend`: `Opts(prefill_chunk=4096)`) changes: a whole 64K-token prompt in one step needs hundreds of GiB for the
# lightning indexer's scores alone.

# %%
rows = []
for rules in ("ep", "ep-tp"):
    for chunk in (None, 4096):
        p = memory_plan(dsv4_jax.Config.flash(), {"expert": 2}, rules_preset(rules), 1, 65536, prefill_chunk=chunk)
        at_4k = memory_plan(dsv4_jax.Config.flash(), {"expert": 2}, rules_preset(rules), 1, 4096, prefill_chunk=chunk)
        rows.append((rules, chunk or "whole", p.weights / GiB, p.max_context, at_4k.max_batch, p.max_batch))
print(f"{'rules':6} {'prefill':>7} {'weights GiB':>12} {'longest ctx (b=1)':>18} {'batch @4K':>10} {'batch @64K':>10}")
for r in rows:
    print(f"{r[0]:6} {r[1]:>7} {r[2]:12.2f} {r[3]:18,} {r[4]:10} {r[5]:10}")

# %% [markdown]
# ## 2. Placing the model on the mesh
#
# `make_mesh(expert=N)` covers every device of every process (after `dsv4_jax.parallel.distributed.initialize()`
# on several hosts). `init_random(..., mesh=mesh)` creates every parameter in its sharding: each device draws only
# its own shards, so the 160 GB model never exists on one device or on the host. `values="bytes"` writes random
# bytes in the storage formats (no fp32 draws, no quantization pass): the way to fill 160 GB quickly (and the tiny
# model is drawn the same way, so that both sizes run the same program).

# %%
mesh = make_mesh(expert=N_DEVICES)
print(describe_mesh(mesh))
t0 = time.perf_counter()
state = dsv4_jax.init_random(cfg, 0, mesh=mesh, rules=rules_preset(RULES), values="bytes")
jax.block_until_ready(state.params)
print(f"init_random: {time.perf_counter() - t0:.1f} s")

per_device = {}
for leaf in jax.tree.leaves(state.params):
    for shard in leaf.addressable_shards:
        per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
for dev, nbytes in sorted(per_device.items()):
    print(f"device {dev}: {nbytes / GiB:.3f} GiB of parameters (plan: {plan.weights / GiB:.3f})")
experts = state.params["groups"][0][0]["ffn"]["experts"]["w1"]["weight"].get_value()
wq_b = state.params["groups"][0][0]["attn"]["wq_b"]["weight"].get_value()
print("routed experts w1", experts.shape, experts.sharding.spec, "| attention wq_b", wq_b.shape, wq_b.sharding.spec)

# %% [markdown]
# `prepare_params` converts once what the kernels read in another form: the FP8 linears' block scales to f32, and on
# H200s the MXFP4 experts' gate/up weights to the slab layout of the decode kernel (the same bytes in another order,
# up to 10% faster gate/up launches). `donate=True`: in place of the arrays just drawn, so the experts never exist
# twice.

# %%
state = dsv4_jax.prepare_params(state, donate=True)
w1_scale = state.params["groups"][0][0]["ffn"]["experts"]["w1"]["scale"].get_value()
print("routed experts:", "slab layout" if w1_scale.dtype == jax.numpy.uint32 else "as stored", "| w1 scales",
      w1_scale.dtype, w1_scale.shape, w1_scale.sharding.spec)  # fmt: skip

# %% [markdown]
# ## 3. Generating from a prompt
#
# The weights are random, so the text is noise; what matters is that the whole product path (prefill, the compiled
# decode loop, sampling) runs on the mesh. The tokenizer here is byte-level (ids 2..257 = UTF-8 bytes).

# %%
tok = ByteTokenizer(cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id)
prompt = np.asarray([tok.encode("DeepSeek-V4 on a mesh: ")], np.int32)
t0 = time.perf_counter()
out = dsv4_jax.generate(state, prompt, sampler=dsv4_jax.Sampler(max_new_tokens=8, eos_id=None))
new = np.asarray(out.tokens[0, : int(out.num_tokens[0])])
print(f"generated ids: {new.tolist()} ({time.perf_counter() - t0:.1f} s, compile included)")

# %% [markdown]
# ## 4. Where a decode step's time goes
#
# Prefill the prompt into a cache, then time single `decode_step` calls (each waited for). The first call compiles.
# Then `dsv4_jax.profile.decode_breakdown` profiles a few steps (`jax.profiler`) and splits the device time of a step
# by part of the model (the `jax.named_scope`s the model code carries); what is left of the wall time is launch gaps
# and host work. Figures are per device.

# %%
from dsv4_jax import profile  # noqa: E402

cache = dsv4_jax.init_cache(cfg, 1, prompt.shape[1] + 16)
logits, _, cache = dsv4_jax.prefill(state, cache, prompt)
token = np.asarray(jax.numpy.argmax(logits, -1), np.int32)
step_ms = []
for _ in range(8):
    t0 = time.perf_counter()
    logits, _, cache = dsv4_jax.decode_step(state, cache, token)
    token = np.asarray(jax.numpy.argmax(logits, -1), np.int32)  # waits for the step
    step_ms.append((time.perf_counter() - t0) * 1e3)
print("decode steps (ms):", [round(t, 1) for t in step_ms])

breakdown = profile.decode_breakdown(state, cache, token, opts=dsv4_jax.Opts(), steps=3)
cache = breakdown.pop("cache")
print(f"profiled step {breakdown['step_ms']:.2f} ms: kernels {breakdown['kernel_ms']:.2f} ms busy, "
      f"{breakdown['kernels_per_step']:.0f} kernels per device")  # fmt: skip
parts = sorted(breakdown["by_part"].items(), key=lambda kv: -kv[1]) + [("launch gaps + host", breakdown["overhead_ms"])]
fig, ax = plt.subplots(figsize=(8, 3.5))
ax.barh([k for k, _ in parts], [v for _, v in parts], color=["tab:blue"] * (len(parts) - 1) + ["tab:gray"])
ax.invert_yaxis()
ax.set_xlabel("ms per decode step (per device)")
ax.set_title(f"{SIZE}: where a decode step's time goes ({len(jax.devices())} devices, batch 1)")
fig.tight_layout()
if os.environ.get("FULL_SIZE_FIG"):  # CI saves the figure to check it was drawn
    fig.savefig(os.environ["FULL_SIZE_FIG"], dpi=80)
plt.show()
