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
# # dsv4-jax quickstart
#
# Restore the embedded tiny DeepSeek-V4 checkpoint (6 layers, vocab 512, every architectural feature: sliding
# window, CSA with the lightning indexer, HCA, hash and learned MoE routing, mHC, MTP), generate a few tokens, and
# look at which experts each token was routed to.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

import dsv4_jax
from dsv4_jax.checkpoint.default import ensure_default_checkpoint
from dsv4_jax.generation import Sampler, generate
from dsv4_jax.tokenizer import ByteTokenizer

# %% [markdown]
# The embedded tiny checkpoint is written and converted to Orbax on first use, under `~/.cache/dsv4_jax/tiny`
# (`DSV4_JAX_CACHE` moves it). If that fails (no disk space, a read-only home), the error is shown as it is: the
# rest of this notebook is about restoring a checkpoint, so it does not quietly go on with other weights.

# %%
cfg, state = dsv4_jax.load(ensure_default_checkpoint())
print(cfg.n_layers, "layers, compress ratios", cfg.compress_ratios)

# %% [markdown]
# Byte-level tokenizer of the tiny model: id 0 = BOS, 1 = EOS, ids 2..257 = UTF-8 bytes.

# %%
tok = ByteTokenizer(cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id)
prompt = "DeepSeek-V4 in JAX: "
ids = tok.encode(prompt)
out = generate(state, np.array([ids]), sampler=Sampler(max_new_tokens=16, eos_id=cfg.eos_token_id), key=0)
new = np.asarray(out.tokens[0, : int(out.num_tokens[0])])
print("generated ids:", new.tolist())
# float32 values printed as Python floats show float32 noise (-6.239999771118164); 3 decimals are what matters.
print("log-probs:", [round(float(x), 3) for x in np.asarray(out.logprobs[0, : len(new)])])
print(repr(tok.decode(new)), "(random weights: the text is noise)")

# %% [markdown]
# Run the full sequence once more with `capture=True` to see the router's choices per token and layer.

# %%
seq = np.array([[*ids, *new.tolist()]])
res = dsv4_jax.forward_outputs(state, seq, capture=True)
route = np.stack([np.asarray(res.captures[f"layer{i}"]["route_idx"]) for i in range(cfg.n_layers)])  # [L, T, k]
weights = np.stack([np.asarray(res.captures[f"layer{i}"]["route_w"]) for i in range(cfg.n_layers)])
T = seq.shape[1]
load_ = np.zeros((cfg.n_layers, T, cfg.n_routed_experts))
for layer in range(cfg.n_layers):
    for slot in range(route.shape[-1]):
        load_[layer, np.arange(T), route[layer, :, slot]] += weights[layer, :, slot]

fig, axes = plt.subplots(cfg.n_layers, 1, figsize=(10, 1.3 * cfg.n_layers), sharex=True)
for layer, ax in enumerate(axes):
    ax.imshow(load_[layer].T, aspect="auto", cmap="viridis", interpolation="nearest")
    kind = "hash" if cfg.is_hash_layer(layer) else "learned"
    ax.set_ylabel(f"L{layer}\n{kind}", rotation=0, labelpad=25, fontsize=8)
    ax.set_yticks([])
axes[0].set_title("routing weight per expert (rows) for each token (columns)")
axes[-1].axvline(len(ids) - 0.5, color="w", lw=1)
axes[-1].set_xlabel(f"token position (prompt | generated after {len(ids)})")
fig.tight_layout()
if os.environ.get("QUICKSTART_FIG"):  # CI saves the figure to check it was drawn
    fig.savefig(os.environ["QUICKSTART_FIG"], dpi=80)
plt.show()
